"""torch.compile with LoRD: keep the DENSE model code, compile its forward with a plan, and generate.

    python examples/compile_generate.py [MODEL_DIR --calib PATH ...]

``lord_export.compile(model, plan)`` compiles ``model.forward`` with the ``lord`` backend, so
``model(...)``, ``model.generate(...)`` and pipelines run the factorized graph (one bottleneck GEMM
per group). ``torch.compile(model, backend="lord")`` would NOT do for generation: the wrapper it
returns hands ``generate`` to the original model, whose forward is not compiled (lord_export warns).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from common import compress_into, model_and_data, parser

import lord_export as le
from lord_export.persist.hf import load_dense, load_tokenizer


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    model_dir, calib = model_and_data(args)
    with tempfile.TemporaryDirectory() as tmp:
        lord_dir = compress_into(model_dir, Path(tmp) / "lord", calib, args.rank_reduction)
        tokenizer = load_tokenizer(model_dir)
        ids = tokenizer(args.prompt, return_tensors="pt").input_ids
        greedy = dict(max_new_tokens=16, do_sample=False, pad_token_id=tokenizer.pad_token_id or 0)

        fast = le.compile(load_dense(model_dir, dtype=torch.float32), lord_dir, dynamic=True)  # the dense model + plan
        compiled = fast.generate(ids, **greedy)
        eager = le.load(lord_dir, dtype=torch.float32).generate(ids, **greedy)  # the LoRD model, eager
        print(tokenizer.decode(compiled[0]))
        print("compiled dense + plan == eager LoRD:", torch.equal(compiled, eager))


if __name__ == "__main__":
    main()
