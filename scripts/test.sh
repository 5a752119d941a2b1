#!/usr/bin/env bash
# Set up two fresh virtual environments, install lord_export with its test extras (versions from
# constraints.txt), lint once, and run the tests on both transformers lines the package supports:
#   .venv      transformers 4.57 (optimum-onnx pins < 4.58) + the onnx, optimum, peft and humaneval
#              extras: the full suite.
#   .venv-tf5  transformers 5.25, without optimum (optimum-onnx does not support it yet): the full
#              suite again; tests that need optimum skip with the reason.
# torch is pinned to 2.13.0 so pip takes the CPU wheel instead of the CUDA build.
# Arguments go to both pytest runs (e.g. -m "not slow" for the fast loop). LORD_TEST_LINES="4" or "5"
# runs one line only. A line whose selection holds no test (pytest exit 5) is reported, not failed.
set -euo pipefail
cd "$(dirname "$0")/.."
lines="${LORD_TEST_LINES:-4 5}"

setup() {  # setup VENV PIP-REQUIREMENTS...
    local venv="$1"
    shift
    python3 -m venv --clear "$venv"
    "$venv/bin/python" -m pip install -q --upgrade pip
    # a regular (not -e) install: the torch.compile entry point and optimum's plugin file must be installed
    rm -rf build
    "$venv/bin/python" -m pip install -q -c constraints.txt "torch==2.13.0" "$@"
    rm -rf build
}

suite() {  # suite VENV PYTEST-ARGS...
    local venv="$1"
    shift
    echo "== transformers $("$venv/bin/python" -c 'import transformers; print(transformers.__version__)') ($venv)"
    local start=$SECONDS rc=0
    "$venv/bin/python" -m pytest -q "$@" || rc=$?
    echo "== $venv suite: $((SECONDS - start)) s"
    if [[ $rc -eq 5 ]]; then
        echo "== $venv: no test selected by these arguments"
    elif [[ $rc -ne 0 ]]; then
        exit "$rc"
    fi
}

linted=0
if [[ " $lines " == *" 4 "* ]]; then
    setup .venv "transformers==4.57.6" ".[test,onnx,optimum,peft,humaneval]"
    .venv/bin/python -m ruff check . && linted=1
    suite .venv "$@"
fi

if [[ " $lines " == *" 5 "* ]]; then
    setup .venv-tf5 "transformers==5.25.0" ".[test,onnx,peft,humaneval]"
    [[ $linted -eq 1 ]] || .venv-tf5/bin/python -m ruff check .
    suite .venv-tf5 "$@"
fi
