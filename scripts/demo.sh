#!/usr/bin/env bash
# Set up a virtual environment in .venv, install lord_export (ONNX Runtime and plots included), and run the
# main job: `lord-export demo` on the shipped reference code model. Extra arguments go to the demo
# (see `lord-export demo --help`), e.g. `bash scripts/demo.sh MODEL_DIR --calib data/ --eval held-out/`.
# torch is pinned to 2.13.0 so pip takes the CPU wheel instead of the CUDA build; other versions come from
# constraints.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
rm -rf build
.venv/bin/python -m pip install -q -c constraints.txt "torch==2.13.0" ".[onnx,plots]"
rm -rf build
.venv/bin/lord-export demo "$@"
