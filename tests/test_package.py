"""The package stays lean: importing it pulls in neither transformers, onnx, optimum nor CUDA."""

from __future__ import annotations

import subprocess
import sys


def test_import_is_lean():
    code = (
        "import sys, torch, lord_export\n"
        "heavy = [m for m in ('transformers', 'onnx', 'onnxruntime', 'optimum', 'torch_tensorrt', 'tensorrt')"
        " if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "assert not torch.cuda.is_initialized()\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"
