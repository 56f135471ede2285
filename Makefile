# The two commands of the README: `make demo` and `make test`. Each installs what it needs.
PY := .venv/bin/python

.PHONY: setup demo test bench clean

setup:
	@bash scripts/setup.sh

demo: setup
	@$(PY) -m vllm_magic demo

test: setup
	@$(PY) -m vllm_magic demo-model --quiet
	$(PY) -m pytest tests notebooks --nbval --nbval-sanitize-with notebooks/sanitize.cfg -p no:cacheprovider -rsx --durations=15

bench: setup
	$(PY) -m benchmarks.run

clean:
	rm -rf .venv .pytest_cache artifacts
