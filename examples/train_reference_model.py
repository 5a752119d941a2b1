"""Train the reference code model that ships with lord_export (lord_export/assets/reference-code-llama).

A small Llama-architecture causal LM (grouped-query attention, SwiGLU MLP, tied embeddings) with a
byte-level BPE tokenizer, both trained on the Python standard library sources of this interpreter.
Files are split by a hash of their relative path (lord_export.measure.reference: 90% train, 5% calibration,
5% evaluation; no file in two splits). The script writes the fp16 safetensors weights, the
tokenizer, training_log.json and a README.md with the record of the run (command, data, steps,
time, train/held-out loss, held-out perplexity against a unigram baseline).

    python examples/train_reference_model.py --minutes 60 --overwrite     # what produced the shipped model
    python examples/train_reference_model.py --steps 2000 --out /tmp/ref   # a fixed number of steps

With ``--minutes`` the learning-rate schedule follows elapsed time (so the run anneals properly on
any machine); with ``--steps`` it follows the step count and the run is reproducible step for step.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

from lord_export.calibration.data import document_windows
from lord_export.measure.reference import REFERENCE_MODEL, SEPARATOR_TOKEN, stdlib_split
from lord_export.measure.timing import cpu_name
from lord_export.persist.io import atomic_output_dir
from lord_export.pipeline.evaluate import perplexity

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "lord_export" / "assets" / REFERENCE_MODEL


def read(paths: list[Path]) -> list[str]:
    return [p.read_text(encoding="utf-8", errors="replace") for p in paths]


def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[SEPARATOR_TOKEN, "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=SEPARATOR_TOKEN, eos_token=SEPARATOR_TOKEN, pad_token="<pad>"
    )


def token_stream(tokenizer, texts: list[str]) -> np.ndarray:
    """All documents as one stream, each preceded by the separator token."""
    sep = tokenizer.convert_tokens_to_ids(SEPARATOR_TOKEN)
    encoded = tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
    parts = [np.array([sep] + e.ids, dtype=np.int32) for e in encoded]
    return np.concatenate(parts + [np.array([sep], dtype=np.int32)])


def unigram_nll(train: np.ndarray, windows: list[list[int]], vocab_size: int) -> tuple[float, int]:
    """Total NLL (nats) and token count of an add-one-smoothed unigram model on the windows' targets."""
    counts = np.bincount(train, minlength=vocab_size).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    targets = np.concatenate([np.asarray(w[1:]) for w in windows])
    return float(-logp[targets].sum()), int(targets.size)


def lr_at(progress: float, peak: float, warmup: float) -> float:
    """Linear warm-up over the first ``warmup`` fraction, then cosine decay to 10% of the peak."""
    if progress < warmup:
        return peak * progress / warmup
    t = min(1.0, (progress - warmup) / (1.0 - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * t)))


@torch.no_grad()
def heldout_loss(model, batch: torch.Tensor) -> float:
    model.eval()
    loss = model(input_ids=batch, labels=batch).loss.item()
    model.train()
    return loss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(DEFAULT_OUT), help="output model directory (default: the shipped asset)")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    budget = ap.add_mutually_exclusive_group()
    budget.add_argument("--minutes", type=float, help="train for this wall-clock time (schedule follows time)")
    budget.add_argument("--steps", type=int, help="train for this many steps (default 2000)")
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--hidden-size", type=int, default=256)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--intermediate-size", type=int, default=768)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (AdamW)")
    ap.add_argument("--warmup", type=float, default=0.05, help="warm-up fraction of the run")
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--eval-every", type=int, default=100, help="held-out loss every N steps")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch CPU threads")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-files", type=int, default=None, help="use at most N files per split (quick trial runs)")
    args = ap.parse_args()
    if args.minutes is None and args.steps is None:
        args.steps = 2000
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        sys.exit(f"error: {out} exists; pass --overwrite to replace it")
    if not out.absolute().parent.is_dir():
        sys.exit(f"error: the parent directory of {out} does not exist")
    if (args.steps is not None and args.steps < 1) or (args.minutes is not None and args.minutes <= 0):
        sys.exit("error: --steps must be >= 1 and --minutes > 0")

    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    t_start = time.perf_counter()

    files = {s: stdlib_split(s)[: args.max_files] for s in ("train", "calib", "eval")}
    texts = {s: read(fs) for s, fs in files.items()}
    data_record = {
        "source": f"Python {platform.python_version()} standard library sources (sysconfig stdlib path)",
        "split": "sha256(relative path) % 100: 0-89 train, 90-94 calib, 95-99 eval",
        **{f"{s}_files": len(fs) for s, fs in files.items()},
        **{f"{s}_bytes": sum(len(t.encode()) for t in texts[s]) for s in texts},
    }
    print(f"data: {json.dumps(data_record)}", flush=True)

    print(f"training a {args.vocab_size}-token byte-level BPE on the train split ...", flush=True)
    tokenizer = train_tokenizer(texts["train"], args.vocab_size)
    train = token_stream(tokenizer, texts["train"])
    eval_windows = document_windows(tokenizer, texts["eval"], args.seq_len)
    data_record["train_tokens"] = int(train.size)
    data_record["eval_tokens"] = sum(len(w) - 1 for w in eval_windows)
    print(f"train stream: {train.size:,} tokens; eval: {data_record['eval_tokens']:,} predicted tokens", flush=True)

    config = LlamaConfig(
        vocab_size=args.vocab_size,
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=max(1024, args.seq_len),
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters on {device}", flush=True)

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
    )
    gen = torch.Generator().manual_seed(args.seed)
    train_t = torch.from_numpy(train.astype(np.int64))
    full = [w for w in eval_windows if len(w) == args.seq_len]
    if not full:
        sys.exit(f"error: no evaluation file holds {args.seq_len} tokens; use more files or a smaller --seq-len")
    probe_batch = torch.tensor(full[:: max(1, len(eval_windows) // 64)][:16], device=device)

    log: list[dict] = []
    losses: list[float] = []
    step, t_train = 0, time.perf_counter()
    while True:
        elapsed = time.perf_counter() - t_train
        progress = elapsed / (60 * args.minutes) if args.minutes else step / args.steps
        if progress >= 1.0:
            break
        lr = lr_at(progress, args.lr, args.warmup)
        for group in opt.param_groups:
            group["lr"] = lr
        starts = torch.randint(0, train_t.numel() - args.seq_len - 1, (args.batch_size,), generator=gen)
        batch = torch.stack([train_t[s : s + args.seq_len] for s in starts.tolist()]).to(device)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        step += 1
        if step % args.eval_every == 0:
            entry = {
                "step": step,
                "minutes": round((time.perf_counter() - t_train) / 60, 2),
                "lr": round(lr, 6),
                "train_loss": round(float(np.mean(losses[-args.eval_every :])), 4),
                "heldout_loss": round(heldout_loss(model, probe_batch), 4),
            }
            log.append(entry)
            print(json.dumps(entry), flush=True)
    train_minutes = (time.perf_counter() - t_train) / 60

    print("evaluating on the whole evaluation split ...", flush=True)
    model.eval()
    ppl = perplexity(model, eval_windows, batch_size=16)
    uni_nll, uni_tokens = unigram_nll(train, eval_windows, args.vocab_size)
    result = {
        "steps": step,
        "train_minutes": round(train_minutes, 1),
        "tokens_seen": step * args.batch_size * args.seq_len,
        "final_train_loss": round(float(np.mean(losses[-args.eval_every :])), 4),
        "heldout_loss": round(ppl.nll / ppl.tokens, 4),
        "heldout_perplexity": round(ppl.perplexity, 3),
        "unigram_heldout_perplexity": round(math.exp(uni_nll / uni_tokens), 3),
        "parameters": n_params,
        "machine": f"{cpu_name()}, {args.threads} threads, {device}",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "total_minutes": round((time.perf_counter() - t_start) / 60, 1),
    }
    print(json.dumps(result), flush=True)

    command = "python examples/train_reference_model.py " + shlex.join(sys.argv[1:])
    with atomic_output_dir(out, overwrite=args.overwrite) as tmp:
        model.to(torch.float16).save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        recorded_args = {**vars(args), "out": out.name}  # no machine-specific paths in the shipped record
        record = {"command": command, "args": recorded_args, "data": data_record, "result": result, "log": log}
        (tmp / "training_log.json").write_text(json.dumps(record, indent=2) + "\n")
        (tmp / "README.md").write_text(model_card(record, config))
    print(f"wrote {out}", flush=True)


def model_card(record: dict, config) -> str:
    r, d, a = record["result"], record["data"], record["args"]
    rows = "\n".join(
        f"| {e['step']} | {e['minutes']} | {e['lr']} | {e['train_loss']} | {e['heldout_loss']} |" for e in record["log"]
    )
    return f"""# {REFERENCE_MODEL}

A small code LM trained by lord_export so that its demo, tests and benchmarks have a real trained
model without a model hub. Llama architecture: {config.num_hidden_layers} layers, hidden
{config.hidden_size}, SwiGLU MLP {config.intermediate_size}, {config.num_attention_heads} query /
{config.num_key_value_heads} key-value heads, tied embeddings, {config.vocab_size}-token byte-level
BPE; {r["parameters"] / 1e6:.2f}M parameters, stored in fp16 safetensors.

## Data
{d["source"]}. Split by `{d["split"]}` (see `lord_export/reference.py`): {d["train_files"]} train files
({d["train_bytes"] / 1e6:.1f} MB, {d["train_tokens"]:,} tokens), {d["calib_files"]} calibration files,
{d["eval_files"]} evaluation files ({d["eval_tokens"]:,} predicted tokens). The tokenizer was trained
on the train split only. Each file is one document, preceded by `{SEPARATOR_TOKEN}`.

## Training
    {record["command"]}

AdamW (β = 0.9, 0.95, weight decay {a["weight_decay"]} on matrices), peak learning rate {a["lr"]},
{a["warmup"]:.0%} linear warm-up then cosine to 10%, batch {a["batch_size"]} × {a["seq_len"]} tokens
sampled at random offsets of the train stream, gradient clipping 1.0, seed {a["seed"]}.
{r["steps"]} steps ({r["tokens_seen"]:,} tokens) in {r["train_minutes"]} min on {r["machine"]},
torch {r["torch"]}, {r["date"]}.

## Result
| | value |
|---|---|
| final train loss (mean of the last {a["eval_every"]} steps) | {r["final_train_loss"]} |
| held-out loss (whole evaluation split, windows of {a["seq_len"]}) | {r["heldout_loss"]} |
| held-out perplexity | **{r["heldout_perplexity"]}** |
| unigram baseline perplexity (add-one, train counts) | {r["unigram_heldout_perplexity"]} |

Held-out perplexity follows `lord-export eval`'s windowing (each file starts fresh, windows of
{a["seq_len"]} tokens, stride = window).

## Training log (held-out loss on 16 fixed evaluation windows)
| step | minutes | lr | train loss | held-out loss |
|---|---|---|---|---|
{rows}
"""


if __name__ == "__main__":
    main()
