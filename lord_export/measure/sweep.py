"""Rank-reduction sweeps: calibrate once, then factorize, evaluate and count for every setting.

Settings are the product of methods × target presets × rank reductions. Calibration runs once over
every linear layer any target preset can select; each setting reuses those statistics on a fresh
copy of the dense model. Outputs: rows (method, targets, rank reduction, parameters, perplexity),
written as CSV and JSON, and PNG plots in the style of the LoRD paper — perplexity vs rank
reduction (Fig. 1) and vs parameter count (Fig. 3) per method and target, and parameters vs rank
reduction with each layer group's parity point marked (Fig. 2).
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from torch import nn

from ..config import LordConfig
from ..core.factorize import parity_rank
from ..core.fingerprint import count_parameters
from ..pipeline.compress import compress_settings
from ..pipeline.evaluate import perplexity

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
    calibration: str = "independent"
    param_ratio: float | None = None
    allocation: str | None = None
    humaneval_pass1: float | None = None

    @property
    def label(self) -> str:
        """The curve this row belongs to in the plots."""
        parts = [self.method]
        if self.calibration != "independent":
            parts.append(self.calibration)
        if self.param_ratio is not None:
            parts.append(f"alloc={self.allocation}")
        return " ".join(parts)


def run_sweep(
    model: nn.Module,
    calib_batches: list,
    eval_windows: list,
    *,
    rank_reductions: Sequence[float] = (),
    targets: Sequence[str] = ("all",),
    methods: Sequence[str] = ("lord", "svd"),
    calibrations: Sequence[str] = ("independent",),
    param_ratios: Sequence[float] = (),
    allocations: Sequence[str] = (),
    batch_size: int = 8,
    pad_id: int = 0,
    device: str | None = None,
    progress: bool = False,
    humaneval: Callable[[nn.Module, str], dict[str, Any]] | None = None,
) -> tuple[dict[str, Any], list[SweepRow], list[dict[str, Any]]]:
    """Return (dense baseline, rows, parity points). ``model`` is not modified.

    ``humaneval(model, label)``, when given, is called on the dense model (label ``"dense"``) and on
    every setting's model and returns an :func:`~lord_export.measure.humaneval.evaluate_humaneval`
    result; its pass@1 lands in the baseline and the rows (``humaneval_pass1``).

    Settings are methods × calibration modes × targets × (rank reductions, and parameter ratios ×
    allocations); independent settings share one calibration and budget settings one survey
    (:func:`lord_export.compress.compress_settings`).
    """
    dense_params = count_parameters(model)
    base = perplexity(model, eval_windows, batch_size=batch_size, pad_id=pad_id)
    baseline = {"params": dense_params, **base.to_dict()}
    if humaneval is not None:
        baseline["humaneval_pass1"] = humaneval(model, "dense")["pass_at_k"]["pass@1"]
    configs = [
        LordConfig(rank_reduction=r, method=m, targets=(t,), calibration=c)
        for m in methods
        for c in calibrations
        for t in targets
        for r in rank_reductions
    ] + [
        LordConfig(param_ratio=p, allocation=a, method=m, targets=(t,), calibration=c)
        for m in methods
        for c in calibrations
        for t in targets
        for a in allocations
        for p in param_ratios
    ]
    results = compress_settings(model, calib_batches, configs, device=device, progress=progress)
    if progress:
        from tqdm.auto import tqdm

        results = tqdm(results, desc="sweep", unit="setting", total=len(configs))
    rows, shapes = [], {}
    for config, work, plan in results:
        ppl = perplexity(work, eval_windows, batch_size=batch_size, pad_id=pad_id)
        params = count_parameters(work)
        rows.append(
            SweepRow(
                config.method,
                config.targets[0],
                config.rank_reduction,
                params,
                params / dense_params,
                ppl.perplexity,
                ppl.nll,
                ppl.tokens,
                len(plan.factorized_groups),
                config.calibration,
                config.param_ratio,
                config.allocation if config.param_ratio is not None else None,
            )
        )
        if humaneval is not None:
            rows[-1].humaneval_pass1 = humaneval(work, setting_name(rows[-1]))["pass_at_k"]["pass@1"]
        shapes.update({g.name: (g.d_out, g.d_in) for g in plan.groups})
        log.info("%s: ppl %.4f, %d params", rows[-1].label, ppl.perplexity, params)
    return baseline, rows, parity_points(shapes.values())


def setting_name(row: SweepRow) -> str:
    """One row's setting in a word list: curve label, targets and size (``R=0.3`` or ``P=0.8``)."""
    size = f"R={row.rank_reduction:g}" if row.param_ratio is None else f"P={row.param_ratio:g}"
    return f"{row.label} {row.targets} {size}"


def parity_points(shapes: Iterable[tuple[int, int]]) -> list[dict[str, Any]]:
    """Per distinct group shape (stacked d_out, d_in): the rank reduction where factors break even."""
    counts: dict[tuple[int, int], int] = {}
    for key in shapes:
        counts[key] = counts.get(key, 0) + 1
    return [
        {"d_out": o, "d_in": i, "groups": n, "parity_rank_reduction": 1 - parity_rank(o, i) / min(o, i)}
        for (o, i), n in sorted(counts.items())
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
        lines.setdefault((r.label, r.targets), []).append(r)
    styles = {"lord": "-", "svd": "--", "asvd": ":"}
    for x_key, name, xlabel in (
        ("rank_reduction", "ppl_vs_rank_reduction.png", "rank reduction (fraction of full rank removed)"),
        ("params", "ppl_vs_params.png", "parameters"),
    ):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for (method, target), pts in sorted(lines.items()):
            if x_key == "rank_reduction" and pts[0].param_ratio is not None:
                continue  # budget settings have no single rank reduction: they are in the parameters plot
            pts = sorted(pts, key=lambda r: getattr(r, x_key))
            ax.plot(
                [getattr(p, x_key) for p in pts],
                [p.perplexity for p in pts],
                styles.get(method.split()[0], "-"),
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
        if method != rows[0].method or pts[0].param_ratio is not None:
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
