"""Rank-reduction sweeps: calibrate once, then factorize, evaluate and count for every setting.

Settings are the product of methods × target presets × rank reductions. Calibration runs once over
every linear layer any target preset can select; each setting reuses those statistics on a fresh
copy of the dense model. Outputs: rows (method, targets, rank reduction, parameters, perplexity),
written as CSV and JSON, and PNG plots in the style of the LoRD paper — perplexity vs rank
reduction (Fig. 1) and vs parameter count (Fig. 3) per method and target, and parameters vs rank
reduction with each layer group's parity point marked (Fig. 2).
"""

from __future__ import annotations

import copy
import csv
import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from torch import nn

from .apply import apply_plan
from .calibrate import calibrate
from .config import LordConfig
from .evaluate import perplexity
from .plan import count_parameters, make_plan
from .targets import select_targets

log = logging.getLogger(__name__)


@dataclass
class SweepRow:
    method: str
    targets: str
    rank_reduction: float
    params: int
    params_ratio: float
    perplexity: float
    nll: float
    tokens: int
    groups_factorized: int


def run_sweep(
    model: nn.Module,
    calib_batches: list,
    eval_windows: list,
    *,
    rank_reductions: Sequence[float],
    targets: Sequence[str] = ("all",),
    methods: Sequence[str] = ("lord", "svd"),
    batch_size: int = 8,
    pad_id: int = 0,
    progress: bool = False,
) -> tuple[dict[str, Any], list[SweepRow], list[dict[str, Any]]]:
    """Return (dense baseline, rows, parity points). ``model`` is not modified."""
    dense_params = count_parameters(model)
    layers_by_target = {t: select_targets(model, (t,)) for t in targets}
    every = sorted({n for names in layers_by_target.values() for n in names})
    calibration = calibrate(model, calib_batches, every, progress=progress)
    base = perplexity(model, eval_windows, batch_size=batch_size, pad_id=pad_id)
    baseline = {"params": dense_params, **base.to_dict()}
    parity = parity_points(model, calibration, every)
    settings = [(m, t, r) for m in methods for t in targets for r in rank_reductions]
    it: Any = settings
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(settings, desc="sweep", unit="setting")
    rows = []
    for method, target, rr in it:
        work = copy.deepcopy(model)
        config = LordConfig(rank_reduction=rr, method=method, targets=(target,))
        plan = make_plan(work, calibration, layers_by_target[target], config)
        apply_plan(work, plan)
        ppl = perplexity(work, eval_windows, batch_size=batch_size, pad_id=pad_id)
        params = count_parameters(work)
        rows.append(
            SweepRow(
                method,
                target,
                rr,
                params,
                params / dense_params,
                ppl.perplexity,
                ppl.nll,
                ppl.tokens,
                len(plan.factorized_groups),
            )
        )
        log.info("%s %s %.2f: ppl %.4f, params %d", method, target, rr, ppl.perplexity, params)
    return baseline, rows, parity


def parity_points(model: nn.Module, calibration: Any, layers: Sequence[str]) -> list[dict[str, Any]]:
    """Per distinct group shape (stacked d_out, d_in): the rank reduction where factors break even."""
    from .factorize import parity_rank
    from .plan import build_groups
    from .targets import find_linears

    infos = find_linears(model)
    shapes: dict[tuple[int, int], int] = {}
    for names in build_groups(list(layers), calibration, True):
        key = (sum(infos[n].d_out for n in names), infos[names[0]].d_in)
        shapes[key] = shapes.get(key, 0) + 1
    return [
        {"d_out": o, "d_in": i, "groups": n, "parity_rank_reduction": 1 - parity_rank(o, i) / min(o, i)}
        for (o, i), n in sorted(shapes.items())
    ]


def write_sweep(out_dir: Path, baseline: dict[str, Any], rows: list[SweepRow], parity: list[dict[str, Any]]) -> None:
    """CSV, JSON and the three PNG plots (matplotlib, imported lazily)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "sweep.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(asdict(rows[0])))
        writer.writeheader()
        writer.writerows(asdict(r) for r in rows)
    (out_dir / "sweep.json").write_text(
        json.dumps({"dense": baseline, "parity": parity, "rows": [asdict(r) for r in rows]}, indent=2) + "\n"
    )
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines: dict[tuple[str, str], list[SweepRow]] = {}
    for r in rows:
        lines.setdefault((r.method, r.targets), []).append(r)
    styles = {"lord": "-", "svd": "--", "asvd": ":"}
    for x_key, name, xlabel in (
        ("rank_reduction", "ppl_vs_rank_reduction.png", "rank reduction (fraction of full rank removed)"),
        ("params", "ppl_vs_params.png", "parameters"),
    ):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for (method, target), pts in sorted(lines.items()):
            pts = sorted(pts, key=lambda r: getattr(r, x_key))
            ax.plot(
                [getattr(p, x_key) for p in pts],
                [p.perplexity for p in pts],
                styles.get(method, "-"),
                marker="o",
                label=f"{method} / {target}",
            )
        ax.axhline(baseline["perplexity"], color="k", lw=0.8, label="dense")
        if x_key == "params":
            ax.axvline(baseline["params"], color="k", lw=0.5, ls=":")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("perplexity")
        ax.set_yscale("log")
        ax.legend(fontsize=7, ncol=2)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=120)
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (method, target), pts in sorted(lines.items()):
        if method != rows[0].method:
            continue
        pts = sorted(pts, key=lambda r: r.rank_reduction)
        ax.plot([p.rank_reduction for p in pts], [p.params for p in pts], marker="o", label=target)
    for p in parity:
        ax.axvline(p["parity_rank_reduction"], color="gray", lw=0.6, ls="--")
        ax.text(
            p["parity_rank_reduction"],
            ax.get_ylim()[1],
            f" {p['d_out']}x{p['d_in']}",
            rotation=90,
            va="top",
            fontsize=6,
            color="gray",
        )
    ax.axhline(baseline["params"], color="k", lw=0.8, label="dense")
    ax.set_xlabel("rank reduction (dashed: parity point of each layer shape)")
    ax.set_ylabel("parameters")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_dir / "params_vs_rank_reduction.png", dpi=120)
    plt.close(fig)
