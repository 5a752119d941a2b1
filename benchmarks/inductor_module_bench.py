"""Time inductor-generated modules (their call(get_args())) interleaved, without dynamo or Python model code.

Issue 16 helper: NAME PATH pairs, one must be named dense; prints the median ms per call and dense/this.

    OMP_NUM_THREADS=1 python benchmarks/inductor_module_bench.py 1 dense DENSE.py lord LORD.py
"""

import importlib.util
import statistics
import sys
import time

import torch

torch.set_num_threads(int(sys.argv[1]))


def load(p):
    spec = importlib.util.spec_from_file_location("m" + str(abs(hash(p))), p)
    m = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(m)
    return m


mods = {n: load(p) for n, p in zip(sys.argv[2::2], sys.argv[3::2], strict=True)}
args = {n: m.get_args() for n, m in mods.items()}
for n, m in mods.items():
    for _ in range(10):
        m.call(list(args[n]))
res = {n: [] for n in mods}
for _ in range(40):
    for n, m in mods.items():
        t = time.perf_counter()
        for _ in range(10):
            m.call(list(args[n]))
        res[n].append((time.perf_counter() - t) / 10 * 1e3)
d = statistics.median(res["dense"])
print(
    f"threads {torch.get_num_threads()}: "
    + "; ".join(
        f"{n} {statistics.median(v):.2f} ms (dense/this {d / statistics.median(v):.3f}, "
        f"min-based {min(res['dense']) / min(v):.3f})"
        for n, v in res.items()
    )
)
