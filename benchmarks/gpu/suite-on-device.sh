#!/usr/bin/env bash
# Runs ON the GPU machine from a copy of the project (the working tree), after vLLM is installed there
# (../shared/gpu recipe: install-on-device.sh puts the demo model's wheel in ~/.cache/vllm-magic/downloads).
# The suite, the notebooks and the shared-card measurements, one PART per device command (each fits 10 min):
#   engine     the in-process test files (the session's shared demo engine, magics, widgets, LangChain)
#   kernels    the real-kernel test files: interrupts, SIGKILL, two kernels sharing the card, serving, handoff
#   servers    persisted engines, --remote, LangChain's standard tests, the benchmark smoke tests, scaling
#   notebooks  notebooks 01-05 under nbval (strict, the project's sanitizers)
#   share      the batch with the shared-card default vs gpu_memory_utilization 0.92 (Llama-3-8B shape)
#   scenario   load/stream/switch/unload x5 in vLLM's default mode (CUDA graphs), then in eager mode
#   look       logprobs, branches, grids and the prefix cache: their tests (in process and over a server)
#              and notebook 06 under nbval
#   lookbench  benchmarks.look_inside: a branch's and turn 10's time to first token, decode with logprobs
#   adapters   LoRA adapters and embeddings: their tests (the demo adapter against transformers + peft, base
#              and adapter in one submission, a server's runtime loading, the embeddings engine beside the
#              generation engine, LangChain's standard embeddings tests) and notebook 07 under nbval
#   lora       the LoRA part of adapters alone: tests/test_lora.py and notebook 07 under nbval
#   adapterbench  benchmarks.adapters and benchmarks.embeddings: adapter vs base decode, embeddings per second
# Extra wheels (langchain-tests, langchain-community, matplotlib and their dependencies) are installed
# from ~/chunks/extra when that folder is there. Results and logs go to $OUT.
set -uo pipefail
cd "$(dirname "$0")/../.."
PART=${1:-engine}
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false VLLM_USE_FLASHINFER_SAMPLER=0
if [ -d "$HOME/chunks/extra" ] && ! python3 -c "import langchain_tests, langchain_community" 2>/dev/null; then
  python3 -m pip install --quiet --no-index --find-links "$HOME/chunks/extra" langchain-tests langchain-community \
    matplotlib 2>&1 | tail -n 3
fi
if [ -d "$HOME/chunks/extra" ] && ! python3 -c "import peft" 2>/dev/null; then
  python3 -m pip install --quiet --no-deps --no-index --find-links "$HOME/chunks/extra" peft accelerate 2>&1 | tail -n 3
fi
python3 -m ipykernel install --user --name python3 >/dev/null 2>&1
python3 -m vllm_magic demo-model --quiet 2>&1 | tail -n 3
[ -d "$HOME/models/llama8b-shape" ] || python3 -m benchmarks.model_dirs "$HOME/models" >/dev/null
PYTEST="python3 -m pytest -p no:cacheprovider -rsx -v --durations=10"
LIMIT=${LIMIT:-570}
case "$PART" in
  engine)
    timeout "$LIMIT" $PYTEST --junitxml="$OUT/engine.xml" tests \
      --ignore=tests/test_kernel_interrupts.py --ignore=tests/test_serve_kernels.py \
      --ignore=tests/test_gpu_sharing.py --ignore=tests/test_persisted_kernels.py --ignore=tests/test_remote.py \
      --ignore=tests/test_langchain_standard.py --ignore=tests/test_benchmarks.py --ignore=tests/test_scaling.py \
      --ignore=tests/test_browser.py 2>&1 | tee "$OUT/engine.log" | tail -n 60 ;;
  kernels)
    timeout "$LIMIT" $PYTEST --junitxml="$OUT/kernels.xml" tests/test_gpu_sharing.py tests/test_kernel_interrupts.py \
      tests/test_serve_kernels.py tests/test_browser.py 2>&1 | tee "$OUT/kernels.log" | tail -n 60 ;;
  servers)
    timeout "$LIMIT" $PYTEST --junitxml="$OUT/servers.xml" tests/test_persisted_kernels.py tests/test_remote.py \
      tests/test_langchain_standard.py tests/test_benchmarks.py tests/test_scaling.py 2>&1 \
      | tee "$OUT/servers.log" | tail -n 60 ;;
  notebooks)
    timeout "$LIMIT" $PYTEST --junitxml="$OUT/notebooks.xml" ${NOTEBOOKS:-notebooks} --nbval \
      --nbval-sanitize-with notebooks/sanitize.cfg 2>&1 | tee "$OUT/notebooks.log" | tail -n 80 ;;
  look)
    timeout "$LIMIT" $PYTEST --junitxml="$OUT/look.xml" tests/test_look_inside.py \
      "tests/test_remote.py::test_logprobs_grids_branches_and_the_prefix_cache_work_over_a_remote_session" \
      notebooks/06-look-inside.ipynb --nbval --nbval-sanitize-with notebooks/sanitize.cfg 2>&1 \
      | tee "$OUT/look.log" | tail -n 60 ;;
  lookbench)
    timeout "$LIMIT" python3 -m benchmarks.look_inside --rounds 3 --json "$OUT/gpu-look-inside.json" 2>&1 \
      | tee "$OUT/look-inside.log" | tail -n 30 ;;
  adapters)
    timeout "$LIMIT" $PYTEST --junitxml="$OUT/adapters.xml" tests/test_demo_lora.py tests/test_lora.py \
      tests/test_embeddings.py tests/test_langchain_embeddings_standard.py \
      notebooks/07-adapters-and-retrieval.ipynb --nbval --nbval-sanitize-with notebooks/sanitize.cfg 2>&1 \
      | tee "$OUT/adapters.log" | tail -n 60 ;;
  lora)
    timeout "$LIMIT" $PYTEST --junitxml="$OUT/lora.xml" tests/test_lora.py \
      notebooks/07-adapters-and-retrieval.ipynb --nbval --nbval-sanitize-with notebooks/sanitize.cfg 2>&1 \
      | tee "$OUT/lora.log" | tail -n 60 ;;
  adapterbench)
    timeout "$LIMIT" bash -c "python3 -m benchmarks.adapters --rounds 3 --json $OUT/gpu-adapters.json; \
      python3 -m benchmarks.embeddings --rounds 3 --json $OUT/gpu-embeddings.json" 2>&1 \
      | tee "$OUT/adapters-bench.log" | tail -n 30 ;;
  share)
    timeout "$LIMIT" python3 -m benchmarks.gpu_memory_default --model "$HOME/models/llama8b-shape" --rounds 2 \
      --engine-args '{"load_format": "dummy", "dtype": "bfloat16", "max_model_len": 4096}' \
      --json "$OUT/memory-default-8b.json" 2>&1 | tee "$OUT/memory-default-8b.log" | tail -n 12 ;;
  scenario)
    DEMO=$HOME/.cache/vllm-magic/SmolLM2-135M-Instruct
    timeout 330 python3 -m benchmarks.gpu_scenario --model-a "$DEMO" --model-b "$HOME/models/demo-shape" \
      --engine-args '{"max_model_len": 4096}' --engine-args-b '{"load_format": "dummy"}' \
      --label "demo model <-> demo shape (dummy), vLLM's default mode" --json "$OUT/scenario-default.json" 2>&1 \
      | tee "$OUT/scenario-default.log" | tail -n 14
    timeout 220 python3 -m benchmarks.gpu_scenario --model-a "$DEMO" --model-b "$HOME/models/demo-shape" \
      --engine-args '{"enforce_eager": true, "max_model_len": 4096}' --engine-args-b '{"load_format": "dummy"}' \
      --label "demo model <-> demo shape (dummy), eager mode" --json "$OUT/scenario-eager.json" 2>&1 \
      | tee "$OUT/scenario-eager.log" | tail -n 14 ;;
esac
tail -n 40 "$HOME"/.cache/vllm-magic/logs/*.log > "$OUT/engine-log-$PART.txt" 2>/dev/null || true
