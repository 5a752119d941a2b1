#!/usr/bin/env bash
# Set up a virtual environment in .venv, install lord_export with its test extras, lint, run the tests.
# torch is pinned to 2.13.0 so pip takes the CPU wheel instead of the CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0" ".[test,onnx,optimum,peft,humaneval]"
.venv/bin/python -m ruff check .
.venv/bin/python -m pytest -q "$@"
