#!/usr/bin/env bash
# The PEFT side's interpreter for the benchmarks' two-process runs (benchmarks/workers.py): a venv
# (default .venv-peft) on Python 3.11 with what a PEFT user installs today, and no jax or jlora:
#
#     bash benchmarks/setup-peft.sh [VENV] [PYTHON]        # ~3-5 min; then --peft-python VENV/bin/python
#
# Only Python 3.11 has a CPU build of torch 2.13.0 on these machines (a file on disk that
# `pip install torch==2.13.0` takes); on 3.12 the registry's torch is a CUDA build of GBs. So torch
# is installed first, alone, checked to be a CPU build, and then pinned while the rest installs.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${1:-.venv-peft}
python=${2:-python3}
TORCH=2.13.0 TRANSFORMERS=5.25.0 PEFT=0.21.2

if ! "$python" -c 'import sys; assert sys.version_info[:2] == (3, 11)' 2>/dev/null; then
    echo "setup-peft.sh: $python is not Python 3.11 ($("$python" --version 2>&1)); the CPU torch $TORCH wheel is" \
         "for 3.11 only (on 3.12 pip would pull a CUDA build of GBs). Pass a Python 3.11 as the second argument." >&2
    exit 1
fi
"$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip install -q --disable-pip-version-check)
"${pip[@]}" "torch==$TORCH"
"$venv/bin/python" -I -W ignore - <<'EOF'
import sys, torch
if torch.version.cuda is not None or not torch.__version__.startswith("2.13.0"):
    sys.exit(f"setup-peft.sh: got torch {torch.__version__} (CUDA {torch.version.cuda}), not the CPU build of 2.13.0")
EOF
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
"$venv/bin/python" -I -W ignore -c 'import torch; print(f"torch=={torch.__version__}")' >"$constraints"
"${pip[@]}" -c "$constraints" "transformers==$TRANSFORMERS" "peft==$PEFT" safetensors numpy
"$venv/bin/python" -I - <<'EOF'
import importlib.util, sys
import numpy, peft, safetensors, torch, transformers
for name in ("jax", "jlora", "flax"):
    if importlib.util.find_spec(name) is not None:
        sys.exit(f"setup-peft.sh: {name} is importable in the PEFT venv; it must hold the PEFT side only")
print(f"PEFT side ready: {sys.executable}: Python {sys.version.split()[0]}, torch {torch.__version__} "
      f"(CUDA {torch.version.cuda}), transformers {transformers.__version__}, peft {peft.__version__}, "
      f"safetensors {safetensors.__version__}, numpy {numpy.__version__}")
EOF
