#!/usr/bin/env bash
# Set up a virtual environment in .venv, install lord_export, and run the main job on its embedded default.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0" .
.venv/bin/python examples/quickstart.py "$@"
