#!/usr/bin/env bash
# Create .venv and install rectalfl with its dev tools. Safe to re-run (it only adds what is missing).
#
# torch is installed first, on purpose: a plain `torch` requirement pulls a multi-GB CUDA build.
#   - If pip's own configuration already resolves a CPU build (e.g. a local wheel), that is used.
#   - Else, on a machine without an NVIDIA GPU, the CPU build comes from PyTorch's CPU index.
#   - Else (GPU box), the default CUDA build from PyPI.
# Override with TORCH_SPEC (e.g. "torch==2.13.0") and TORCH_INDEX_URL (e.g. a cu12x index URL).
set -euo pipefail
cd "$(dirname "$0")/.."

PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  for cand in python3.11 python3.12 python3; do
    if command -v "$cand" >/dev/null 2>&1; then PY="$cand"; break; fi
  done
fi
"$PY" -c 'import sys; assert (3, 11) <= sys.version_info[:2] < (3, 13), sys.version' \
  || { echo "rectalfl needs Python 3.11 or 3.12 (found: $("$PY" --version 2>&1)); set PYTHON=..." >&2; exit 1; }

[ -x .venv/bin/python ] || "$PY" -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1

TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
if ! python -c 'import torch' >/dev/null 2>&1; then
  if [ -n "${TORCH_INDEX_URL:-}" ]; then
    pip install "$TORCH_SPEC" --index-url "$TORCH_INDEX_URL"
  elif report=$(mktemp) && pip install -q --dry-run --ignore-installed --report "$report" "$TORCH_SPEC" >/dev/null 2>&1 \
       && python - "$report" <<'PY'
import json, sys
items = json.load(open(sys.argv[1]))["install"]
sys.exit(0 if any(i["metadata"]["name"] == "torch" and "+cpu" in i["metadata"]["version"] for i in items) else 1)
PY
  then
    # pip's own configuration already offers a CPU build (e.g. a local wheel): take it.
    pip install "$TORCH_SPEC"
  elif command -v nvidia-smi >/dev/null 2>&1; then
    pip install "$TORCH_SPEC"
  else
    pip install "$TORCH_SPEC" --index-url https://download.pytorch.org/whl/cpu
  fi
fi
python -c 'import torch; print(f"setup: torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}")'

pip install -q -e ".[dev]"
echo "setup: done. Activate with: . .venv/bin/activate"
