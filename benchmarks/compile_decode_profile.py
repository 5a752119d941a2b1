"""Profile/time compiled decode, dense (inductor) vs LoRD (backend="lord"), one run, interleaved.

Issue 16 helper. Model of compile_speed.add_model_args (use --layers 1-2 to iterate); prompt 128 tokens,
then --steps greedy decode steps per round; --prof prints torch.profiler tables of 4 decode steps;
--opts passes backend options, e.g. --opts 'up="concat"'. Set TORCHINDUCTOR_CACHE_DIR to keep the
generated modules (benchmarks/inductor_module_bench.py times them without dynamo).
--cache static decodes into transformers' StaticCache (cache_position given) instead of the default
DynamicCache; --factors-from-file also compiles LoRD with the plan's factors read from a saved LoRD
directory, once as views of the safetensors memory map and once copied (what read_plan returns).

    cd benchmarks && PYTHONPATH=.. python compile_decode_profile.py --layers 2 --prof
"""

import argparse  # noqa: E401
import copy
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch
from compile_speed import build

from lord_export.export.dynamo import make_backend
from lord_export.measure.backends import RECOMPILE_LIMIT

ap = argparse.ArgumentParser()
ap.add_argument("--layers", type=int, default=2)
ap.add_argument("--hidden", type=int, default=1024)
ap.add_argument("--intermediate", type=int, default=2816)
ap.add_argument("--vocab", type=int, default=8192)
ap.add_argument("--rank-reduction", type=float, default=0.5)
ap.add_argument("--rank-multiple", type=int, default=64)
ap.add_argument("--tokens", type=int, nargs="+", default=[256])
ap.add_argument("--steps", type=int, default=16)
ap.add_argument("--prof", action="store_true")
ap.add_argument("--opts", default="")
ap.add_argument("--rounds", type=int, default=3)
ap.add_argument("--cache", choices=["dynamic", "static"], default="dynamic")
ap.add_argument("--factors-from-file", action="store_true")
args = ap.parse_args()
torch.manual_seed(0)
dense, lord, plan = build(args)
opts = eval("dict(" + args.opts + ")")
# both models share dynamo's cache of one forward; at the default limit (8) LoRD's steps run eager
torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
models = {
    "dense": torch.compile(copy.deepcopy(dense), backend="inductor", dynamic=True),
    "lord": torch.compile(copy.deepcopy(dense), backend=make_backend(plan=plan, **opts), dynamic=True),
}
if args.factors_from_file:
    import tempfile

    from lord_export.persist.checkpoint import CheckpointReader
    from lord_export.persist.io import read_plan, save_compressed

    saved = os.path.join(tempfile.mkdtemp(), "lord")
    save_compressed(lord, plan, saved)
    mapped, copied = read_plan(saved, with_tensors=False), read_plan(saved)
    reader = CheckpointReader(saved)
    mapped.tensors = {k: reader.get(k) for k in copied.tensors}  # views of the memory map
    for name, p in (("lord, factors mapped", mapped), ("lord, factors copied", copied)):
        models[name] = torch.compile(copy.deepcopy(dense), backend=make_backend(plan=p, **opts), dynamic=True)
prompt = torch.randint(0, args.vocab, (1, 128))


def decode(model, steps):
    with torch.no_grad():
        static = args.cache == "static"
        kw = {}
        if static:
            from transformers import StaticCache

            kw = {"past_key_values": StaticCache(config=dense.config, max_cache_len=prompt.shape[1] + steps + 1)}
            kw["cache_position"] = torch.arange(prompt.shape[1])
        out = model(input_ids=prompt, use_cache=True, **kw)
        past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        t = time.perf_counter()
        toks = []
        for i in range(steps):
            kw = {"cache_position": torch.tensor([prompt.shape[1] + i])} if static else {}
            out = model(input_ids=nxt, past_key_values=past, use_cache=True, **kw)
            past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
            toks.append(nxt.item())
        return (time.perf_counter() - t) / steps, toks


for m in models.values():
    decode(m, 3)
    decode(m, 3)
res = {name: [] for name in models}
for _ in range(args.rounds):
    for name, m in models.items():
        res[name].append(decode(m, args.steps)[0])
d = statistics.median(res["dense"])
print(f"decode ({args.cache} cache), ms per token; median of {args.rounds} interleaved rounds")
for name in models:
    v = statistics.median(res[name])
    print(f"  {name:22} {v * 1e3:7.2f}  speed-up {d / v:.3f}  spread {(max(res[name]) - min(res[name])) * 1e3:.2f}")
if args.prof:
    from torch.profiler import ProfilerActivity, profile

    for name, m in (("dense", models["dense"]), ("lord", models["lord"])):
        with torch.no_grad():
            out = m(input_ids=prompt, use_cache=True)
            past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
            with profile(activities=[ProfilerActivity.CPU]) as p:
                for _ in range(4):
                    out = m(input_ids=nxt, past_key_values=past, use_cache=True)
                    past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        print("=====", name)
        print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=18))
