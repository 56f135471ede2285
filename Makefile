# The two commands of the README: `make demo` and `make test`. Each installs what it needs.
PY := .venv/bin/python

.PHONY: setup demo test test-gpu bench clean

setup:
	@bash scripts/setup.sh

demo: setup
	@$(PY) -m vllm_magic demo

test: setup
	@$(PY) -m vllm_magic demo-model --quiet
	$(PY) -m pytest tests notebooks --nbval --nbval-sanitize-with notebooks/sanitize.cfg -p no:cacheprovider -rsx --durations=15

# On an NVIDIA GPU machine: vLLM's real sleep/keep/wake path (CPU runs skip it and use fakes).
# Fails, rather than skips, where no GPU is visible.
test-gpu: setup
	@$(PY) -m vllm_magic demo-model --quiet
	$(PY) -m pytest tests/test_sleep_gpu.py tests/test_sleep_session.py --require-gpu -p no:cacheprovider -rsx --durations=15

bench: setup
	$(PY) -m benchmarks.run

clean:
	rm -rf .venv .pytest_cache artifacts
