"""PEFT LoRA on a LoRD model: the target names you already write, merged back into the factors exactly.

    python examples/peft_finetune.py [MODEL_DIR --calib PATH ...] [--steps 20]

The adapters read each group's shared bottleneck (rank r), so ``merge_and_unload`` folds them into
the up-projections without changing a rank: the result is a LoRD model again, saved as one. (The
command ``lord-export heal`` does this with distillation, schedules and a report.)
"""

from __future__ import annotations

import itertools
import tempfile
from pathlib import Path

import torch
from common import compress_into, model_and_data, parser
from peft import LoraConfig, get_peft_model

import lord_export as le
from lord_export.calibration.data import CalibrationOptions, calibration_set
from lord_export.persist.hf import load_tokenizer


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20, help="training steps (default 20)")
    args = p.parse_args()
    model_dir, calib = model_and_data(args)
    with tempfile.TemporaryDirectory() as tmp:
        lord_dir = compress_into(model_dir, Path(tmp) / "lord", calib, args.rank_reduction)
        model = le.load(lord_dir, dtype=torch.float32)
        plan = le.read_plan(lord_dir, with_tensors=False)
        targets = sorted({m.name.rsplit(".", 1)[-1] for g in plan.factorized_groups for m in g.members})
        peft_model = get_peft_model(model, LoraConfig(target_modules=targets, r=8, lora_alpha=16))
        peft_model.print_trainable_parameters()

        data = calibration_set(load_tokenizer(lord_dir), calib, CalibrationOptions(samples=8, seqlen=128, batch_size=2))
        optimizer = torch.optim.AdamW([q for q in peft_model.parameters() if q.requires_grad], lr=1e-4)
        peft_model.train()
        for step, batch in enumerate(itertools.islice(itertools.cycle(data.batches()), args.steps)):
            loss = peft_model(**batch, labels=batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if step % 5 == 0:
                print(f"step {step}: loss {loss.item():.4f}")

        merged = peft_model.merge_and_unload().eval()  # a LoRD model of the same ranks
        le.save_compressed(merged, le.read_plan(lord_dir), Path(tmp) / "tuned")
        print("LoRD layers after merging:", sum(isinstance(m, le.LordLinear) for m in merged.modules()))
        print("tuned model reloads:", sum(isinstance(m, le.LordLinear) for m in le.load(Path(tmp) / "tuned").modules()))


if __name__ == "__main__":
    main()
