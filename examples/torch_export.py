"""torch.export with LoRD: a saveable ExportedProgram of the DENSE model code with the plan's factors.

    python examples/torch_export.py [MODEL_DIR --calib PATH ...]

``export_lord`` exports the dense model and rewrites its graph: one bottleneck matmul per group,
the factors as parameters of the program. The program saves with ``torch.export.save`` and feeds
AOTInductor, ExecuTorch or TensorRT.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from common import compress_into, model_and_data, parser

import lord_export as le
from lord_export.export import export_lord
from lord_export.persist.hf import load_dense, load_tokenizer


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    model_dir, calib = model_and_data(args)
    with tempfile.TemporaryDirectory() as tmp:
        lord_dir = compress_into(model_dir, Path(tmp) / "lord", calib, args.rank_reduction)
        dense = load_dense(model_dir, dtype=torch.float32)
        ids = load_tokenizer(model_dir)(args.prompt, return_tensors="pt").input_ids
        program = export_lord(dense, le.read_plan(lord_dir), (), {"input_ids": ids, "use_cache": False})
        torch.export.save(program, Path(tmp) / "model-lord.pt2")
        loaded = torch.export.load(Path(tmp) / "model-lord.pt2")
        out = loaded.module()(input_ids=ids, use_cache=False)
        logits = out.logits if hasattr(out, "logits") else out[0]
        reference = le.load(lord_dir, dtype=torch.float32)(input_ids=ids).logits
        print(f"exported program vs eager LoRD: max abs difference {(logits - reference).abs().max():.2e}")


if __name__ == "__main__":
    main()
