#!/usr/bin/env bash
# Set up two virtual environments, install lord_export with its test extras, lint, run the tests on
# both transformers lines the package supports:
#   .venv      transformers 4.57 (optimum-onnx pins < 4.58) + the onnx, optimum, peft and humaneval
#              extras: the full suite.
#   .venv-tf5  the newest transformers 5.x, without optimum (optimum-onnx does not support it yet):
#              the full suite again; tests that need optimum skip with the reason.
# torch is pinned to 2.13.0 in both so pip takes the CPU wheel instead of the CUDA build.
# Arguments go to both pytest runs. LORD_TEST_LINES="4" or "5" runs one line only.
set -euo pipefail
cd "$(dirname "$0")/.."
lines="${LORD_TEST_LINES:-4 5}"

setup() {  # setup VENV PIP-REQUIREMENTS...
    local venv="$1"
    shift
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install -q --upgrade pip
    # a regular (not -e) install: the torch.compile entry point and optimum's plugin file must be installed
    "$venv/bin/python" -m pip install -q "torch==2.13.0" "$@"
}

if [[ " $lines " == *" 4 "* ]]; then
    setup .venv "transformers>=4.57,<4.58" ".[test,onnx,optimum,peft,humaneval]"
    .venv/bin/python -m ruff check .
    echo "== transformers $(.venv/bin/python -c 'import transformers; print(transformers.__version__)') (.venv)"
    start=$SECONDS
    .venv/bin/python -m pytest -q "$@"
    echo "== .venv suite: $((SECONDS - start)) s"
fi

if [[ " $lines " == *" 5 "* ]]; then
    setup .venv-tf5 "transformers>=5,<6" ".[test,onnx,peft,humaneval]"
    .venv-tf5/bin/python -m ruff check .
    echo "== transformers $(.venv-tf5/bin/python -c 'import transformers; print(transformers.__version__)') (.venv-tf5)"
    start=$SECONDS
    .venv-tf5/bin/python -m pytest -q "$@"
    echo "== .venv-tf5 suite: $((SECONDS - start)) s"
fi
