"""optimum-cli with LoRD: one more flag on the ONNX export you already run, then ORTModelForCausalLM.

    python examples/optimum_onnx.py [MODEL_DIR --calib PATH ...] [--out DIR]

Needs ``pip install lord_export[optimum,onnx]`` (optimum-onnx pins transformers < 4.58). The model
optimum loads is compressed before optimum's own export, so the output is optimum's usual
decoder-with-past layout and loads with ``ORTModelForCausalLM``.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from common import model_and_data, parser


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--out", default=None, help="where to write the ONNX export (default: a temporary folder)")
    args = p.parse_args()
    model_dir, calib = model_and_data(args)
    out = Path(args.out or tempfile.mkdtemp()) / "onnx-lord"
    optimum_cli = shutil.which("optimum-cli") or f"{Path(sys.executable).parent}/optimum-cli"
    command = [optimum_cli, "export", "onnx", "--model", str(model_dir), "--task", "text-generation-with-past"]
    command += ["--lord-rank-reduction", str(args.rank_reduction), "--lord-calib-samples", "16"]
    command += ["--lord-calib-seqlen", "128", str(out)]
    for path in calib:
        command += ["--lord-calib", str(path)]
    subprocess.run(command, check=True)

    from optimum.onnxruntime import ORTModelForCausalLM
    from transformers import AutoTokenizer

    model = ORTModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer(args.prompt, return_tensors="pt").input_ids
    tokens = model.generate(ids, max_new_tokens=16, do_sample=False, pad_token_id=tokenizer.pad_token_id or 0)
    print(tokenizer.decode(tokens[0]))
    print("ONNX files:", sorted(f.name for f in out.glob("*.onnx*")))


if __name__ == "__main__":
    main()
