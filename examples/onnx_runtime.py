"""A LoRD model in ONNX Runtime: export (validated against PyTorch) and run the session yourself.

    python examples/onnx_runtime.py [MODEL_DIR --calib PATH ...]

The export holds one bottleneck MatMul per factorized group; ONNX Runtime's CUDA provider is used
when the machine has one (onnxruntime-gpu), else the CPU provider.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch
from common import compress_into, model_and_data, parser

import lord_export as le
from lord_export.export.onnx import export_onnx, make_session
from lord_export.persist.hf import load_tokenizer


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    model_dir, calib = model_and_data(args)
    with tempfile.TemporaryDirectory() as tmp:
        lord_dir = compress_into(model_dir, Path(tmp) / "lord", calib, args.rank_reduction)
        report = export_onnx(lord_dir, Path(tmp) / "onnx")  # raises if ONNX Runtime disagrees with PyTorch
        print(f"{report['bottleneck_matmuls']} bottleneck MatMuls for {report['factorized_groups']} groups")
        session = make_session(Path(tmp) / "onnx" / "model.onnx")
        ids = load_tokenizer(lord_dir)(args.prompt, return_tensors="np").input_ids.astype(np.int64)
        feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
        feeds = {i.name: feeds[i.name] for i in session.get_inputs()}
        logits = session.run(None, feeds)[0]
        with torch.no_grad():
            reference = le.load(lord_dir, dtype=torch.float32)(**{k: torch.from_numpy(v) for k, v in feeds.items()})
        error = np.abs(logits - reference.logits.numpy()).max() / np.abs(reference.logits.numpy()).max()
        print(f"ONNX Runtime ({session.get_providers()[0]}) vs PyTorch: max relative error {error:.2e}")


if __name__ == "__main__":
    main()
