#!/usr/bin/env bash
# Runs ON the GPU machine, from the bundle folder (benchmarks/gpu/bundle.sh made it), once vLLM is
# installed there. PART (each fits one 10-minute device command):
#   check  the engine session's GPU check (demo model's shape, eager mode)
#   demo   the benchmark, demo model's shape, eager mode
#   8b     the benchmark, Llama-3-8B shape, vLLM's defaults (torch.compile + CUDA graphs)
#   served the served rows alone (openai client, %%vllm --remote, LangChain over --remote), 8B shape
#   persist   a persisted engine on the GPU (sleep through its server, keep and switch back, attach,
#             stop), then restart to first answer in real kernels, demo model's shape, eager mode
#   persist8b restart to first answer in real kernels, Llama-3-8B shape, vLLM's defaults
# Results go to $OUT.
set -uo pipefail
cd "$(dirname "$0")"
PART=${1:-check}
OUT=${OUT:-/tmp/bench-out}
mkdir -p "$OUT"
[ -f models/llama8b-shape/tokenizer.json.gz ] && gunzip -f models/llama8b-shape/tokenizer.json.gz
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
# FlashInfer's sampler JIT-compiles for about two minutes on a fresh machine; vLLM's own sampler is used instead.
export VLLM_USE_FLASHINFER_SAMPLER=0
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
DUMMY='"load_format": "dummy", "dtype": "bfloat16"'
case "$PART" in
  check)
    timeout 400 python3 -m benchmarks.gpu_session_check --model models/demo-shape \
      --engine-args "{$DUMMY, \"enforce_eager\": true}" --switch-max-model-len 4096 \
      --json "$OUT/gpu-session-check.json" 2>&1 | tee "$OUT/gpu-session-check.log" ;;
  demo)
    timeout 560 python3 -m benchmarks.run --size gpu --model models/demo-shape --no-chart \
      --model-label "SmolLM2-135M shape, dummy weights" --title "Demo model's shape (135M), eager mode, on GPU" \
      --engine-args "{$DUMMY, \"enforce_eager\": true}" --switch-max-model-len 4096 --no-switch-back \
      --tag gpu-demo-shape --out "$OUT" 2>&1 | tee "$OUT/gpu-demo-shape.log" ;;
  8b)
    timeout 560 python3 -m benchmarks.run --size gpu --model models/llama8b-shape --no-chart \
      --model-label "Llama-3-8B shape, dummy weights" --title "Llama-3-8B shape, bf16, CUDA graphs, on GPU" \
      --engine-args "{$DUMMY}" --switch-max-model-len 4096 --no-switch-back --no-control \
      --tag gpu-llama8b --out "$OUT" 2>&1 | tee "$OUT/gpu-llama8b.log" ;;
  served)
    timeout 560 python3 -m benchmarks.run --size gpu --model models/llama8b-shape --no-chart --served-only \
      --model-label "Llama-3-8B shape, dummy weights" --title "Served engine: Llama-3-8B shape, bf16, CUDA graphs, on GPU" \
      --engine-args "{$DUMMY}" --tag gpu-llama8b-served --out "$OUT" 2>&1 | tee "$OUT/gpu-llama8b-served.log" ;;
  persist)
    python3 -m ipykernel install --user --name python3 >/dev/null 2>&1
    timeout 280 python3 -m benchmarks.gpu_persist_check --model models/demo-shape \
      --engine-args "{$DUMMY, \"enforce_eager\": true, \"gpu_memory_utilization\": 0.3}" 2>&1 | tee "$OUT/gpu-persist-check.log"
    timeout 300 python3 -m benchmarks.restart --rounds 2 --model models/demo-shape --tag gpu-restart-demo-shape \
      --engine-args "--load-format dummy --dtype bfloat16 --enforce-eager --gpu-memory-utilization 0.3" \
      2>&1 | tee "$OUT/gpu-restart-demo-shape.log"
    cp benchmarks/results/gpu-restart-demo-shape.json "$OUT/" 2>/dev/null ;;
  persist8b)
    python3 -m ipykernel install --user --name python3 >/dev/null 2>&1
    timeout 580 python3 -m benchmarks.restart --rounds 2 --model models/llama8b-shape --tag gpu-restart-llama8b \
      --engine-args "--load-format dummy --dtype bfloat16 --gpu-memory-utilization 0.42" \
      2>&1 | tee "$OUT/gpu-restart-llama8b.log"
    cp benchmarks/results/gpu-restart-llama8b.json "$OUT/" 2>/dev/null ;;
esac
tail -n 40 /root/.cache/vllm-magic/logs/*.log > "$OUT/engine-log-tail-$PART.txt" 2>/dev/null
ls -la "$OUT"
