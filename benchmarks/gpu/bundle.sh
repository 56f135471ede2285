#!/usr/bin/env bash
# Bundle what a GPU run of the benchmarks needs into one folder (default .gpu/run, git-ignored):
# the package, the benchmarks, dummy-weight model directories (demo shape, Llama-3-8B shape) and
# the script that runs them there. Run from the repository root with the venv's python.
set -euo pipefail
DEST=${1:-.gpu/run}
PY=${PY:-.venv/bin/python}
rm -rf "$DEST"
mkdir -p "$DEST"
cp -r vllm_magic benchmarks "$DEST/"
rm -rf "$DEST/benchmarks/results"
find "$DEST" -name __pycache__ -prune -exec rm -rf {} +
"$PY" -m benchmarks.model_dirs "$DEST/models" >/dev/null
gzip -9 "$DEST/models/llama8b-shape/tokenizer.json"  # 18 MB of placeholder tokens: 2 MB to carry
cp benchmarks/gpu/run-on-device.sh "$DEST/"
du -sh "$DEST"
