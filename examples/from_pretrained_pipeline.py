"""A LoRD directory through transformers: ``AutoModelForCausalLM.from_pretrained`` and ``pipeline``.

    python examples/from_pretrained_pipeline.py [MODEL_DIR --calib PATH ...]

After ``import lord_export`` (it registers the "lord_export" quantization method with transformers), a
LoRD directory loads like any model directory; ``save_pretrained`` writes one back.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from common import compress_into, model_and_data, parser
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

import lord_export  # teaches transformers the "lord_export" quantization method


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    model_dir, calib = model_and_data(args)
    with tempfile.TemporaryDirectory() as tmp:
        lord_dir = compress_into(model_dir, Path(tmp) / "lord", calib, args.rank_reduction)
        model = AutoModelForCausalLM.from_pretrained(lord_dir)
        tokenizer = AutoTokenizer.from_pretrained(lord_dir)
        print("LoRD layers:", sum(isinstance(m, lord_export.LordLinear) for m in model.modules()))
        generate = pipeline("text-generation", model=model, tokenizer=tokenizer)
        print(generate(args.prompt, max_new_tokens=16, do_sample=False)[0]["generated_text"])
        model.save_pretrained(Path(tmp) / "resaved")  # still a LoRD directory
        again = AutoModelForCausalLM.from_pretrained(Path(tmp) / "resaved")
        print("after save_pretrained:", sum(isinstance(m, lord_export.LordLinear) for m in again.modules()))


if __name__ == "__main__":
    main()
