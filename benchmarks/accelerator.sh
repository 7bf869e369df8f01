#!/usr/bin/env bash
# The accelerator check (benchmarks/accelerator.py): B/16 NaViT bf16 step time
# and MFU, cuDNN vs dense segment-masked attention, the ring loss on 1 device
# vs the dense reference, compile time and peak memory. Under 5 minutes on
# one H100/H200.
#
#   bash benchmarks/accelerator.sh [--json FILE]     # on a GPU machine
#   bash benchmarks/accelerator.sh --cpu-smoke       # tiny shapes, CPU
#
# Python: $ACCELERATOR_PYTHON if set, else python3 if its jax imports (and
# sees the GPU when there is one: an accelerator image's own jax and CUDA
# wheels are used as they are; other modules it lacks are installed with
# --no-deps into .accelerator-site), else a venv, .venv-accelerator, with
# jax[cuda13] (CUDA 13 driver) or jax[cuda12] and what the trainer imports,
# from the package index, pinned by constraints.txt. Where no index is
# reachable, put wheels in a folder and set PIP_NO_INDEX=1
# PIP_FIND_LINKS=that-folder: pip reads both.
set -euo pipefail
cd "$(dirname "$0")/.."

gpu_present() { command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; }
jax_ready() {  # $1 imports jax, on the GPU where there is one.
  if gpu_present; then
    "$1" -c 'import jax, sys; sys.exit(jax.default_backend() != "gpu")' 2>/dev/null
  else
    "$1" -c 'import jax' 2>/dev/null
  fi
}

PY=${ACCELERATOR_PYTHON:-python3}
if [[ -z ${ACCELERATOR_PYTHON:-} ]] && ! jax_ready "$PY"; then
  VENV=.venv-accelerator
  [[ -x $VENV/bin/python ]] || python3 -m venv "$VENV"
  PY=$VENV/bin/python
  if ! jax_ready "$PY"; then
    jax=jax
    if gpu_present; then
      cuda=12
      nvidia-smi | grep -q 'CUDA Version: 1[3-9]' && cuda=13
      jax="jax[cuda${cuda}]"
    fi
    echo "installing $jax and the trainer's modules into $VENV" >&2
    "$PY" -m pip install -q -c constraints.txt "$jax" flax optax ml_collections \
      orbax-checkpoint pillow sentencepiece pyarrow tqdm
  fi
fi

# Modules lit_navit's trainer imports, and the distribution that provides each.
missing=$("$PY" - <<'EOF'
import importlib
need = {'flax': 'flax', 'optax': 'optax', 'ml_collections': 'ml_collections',
        'orbax.checkpoint': 'orbax-checkpoint', 'PIL': 'pillow',
        'sentencepiece': 'sentencepiece', 'pyarrow': 'pyarrow', 'tqdm': 'tqdm',
        'absl': 'absl-py', 'yaml': 'PyYAML'}
missing = []
for module, dist in need.items():
  try:
    importlib.import_module(module)
  except ImportError:
    missing.append(dist)
print(' '.join(missing))
EOF
)
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if [[ -n $missing ]]; then
  echo "installing $missing into .accelerator-site" >&2
  "$PY" -m pip install -q --no-deps -c constraints.txt --target .accelerator-site $missing
  export PYTHONPATH=$PWD/.accelerator-site:$PYTHONPATH
fi
exec "$PY" benchmarks/accelerator.py "$@"
