#!/usr/bin/env bash
# Create .venv/ in the repo and install GhostVis with its dev extras.
# Without a CUDA GPU it installs the CPU build of torch first, so pip never pulls a multi-GB CUDA wheel.
# Re-running is cheap: it only reinstalls when pyproject.toml changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.ghostvis-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
# (this machine's pip config lists local indexes that may be missing; drop the warnings about them)
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@" 2> >(grep -v "neither a file nor a directory" >&2); }
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    pip install "torch>=2.11,<2.15"
  else
    # the CPU wheel (present on local disk here; otherwise from the CPU index)
    pip install torch==2.13.0 || pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
  fi
fi
pip install -e ".[dev,triton,jax]"
echo "$want" > "$stamp"
