"""Compress to a quality target: the smallest parameter ratio whose model stays within a perplexity
increase on held-out calibration tokens (``--max-ppl-increase``).

The survey of a parameter budget does not depend on the budget: it measures every group's error
curve and keeps its factors at the largest rank any allocation can give it. So every candidate ratio
is cheap: allocate, truncate the kept factors, swap them into a copy of the dense model, measure the
held-out perplexity. The increase falls as the ratio grows, so a bisection over the ratio finds the
smallest one within the bound in a few measurements; every measured point is reported. The final
compression then writes the chosen ratio (refinement, when on, lowers the increase further).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..core.allocate import allocate
from ..errors import UsageError
from .planner import KeptFactors, compress_groups, truncated

#: Bisection stops when the ratio is known to this precision.
RATIO_TOLERANCE = 0.005


@dataclass
class TargetSearch:
    """What the search measured and chose."""

    bound: float
    dense_perplexity: float
    points: list[dict[str, float]] = field(default_factory=list)  # {"param_ratio", "perplexity", "increase"}
    chosen: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "max_ppl_increase": self.bound,
            "dense_perplexity": self.dense_perplexity,
            "chosen_param_ratio": self.chosen,
            "curve": sorted(self.points, key=lambda p: p["param_ratio"]),
        }


def smallest_ratio(survey: Any, multiple: int) -> float:
    """The smallest parameter ratio the survey's groups can reach (every group at its smallest rank)."""
    reachable = sum(c.removed(c.ranks(multiple)[-1]) for c in survey.curves if c.ranks(multiple))
    return (survey.total - survey.fixed_removed - reachable) / survey.total


def ranks_at(survey: Any, ratio: float, method: str, multiple: int) -> dict[str, int | None]:
    """The allocation's ranks at ``ratio`` (the overridden groups' fixed ranks included)."""
    target = survey.total - int(ratio * survey.total) - survey.fixed_removed
    ranks = allocate(survey.curves, max(target, 0), method=method, multiple=multiple)
    ranks.update(survey.fixed)
    return ranks


def search_ratio(
    bound: float,
    survey: Any,
    evaluate: Callable[[dict[str, int | None]], float],
    dense_perplexity: float,
    *,
    method: str,
    multiple: int,
    say: Callable[[str], None] = lambda msg: None,
) -> TargetSearch:
    """Bisection over the parameter ratio for the smallest one with ``evaluate(ranks)`` (a held-out
    perplexity) within ``(1 + bound)`` of ``dense_perplexity`` (module docstring)."""
    if not bound > 0:
        raise UsageError(f"the perplexity increase bound must be > 0, got {bound}")
    result = TargetSearch(bound, dense_perplexity)
    limit = dense_perplexity * (1 + bound)

    def measure(ratio: float) -> bool:
        ppl = evaluate(ranks_at(survey, ratio, method, multiple))
        increase = ppl / dense_perplexity - 1
        result.points.append({"param_ratio": round(ratio, 5), "perplexity": ppl, "increase": increase})
        say(f"quality target: ratio {ratio:.4f} -> held-out perplexity {ppl:.4f} ({100 * increase:+.2f}%)")
        return ppl <= limit

    lo = max(smallest_ratio(survey, multiple), 0.0)
    hi = 1.0
    if measure(lo):
        result.chosen = lo
        return result
    while hi - lo > RATIO_TOLERANCE:
        mid = (lo + hi) / 2
        if measure(mid):
            hi = mid
        else:
            lo = mid
    result.chosen = hi
    return result


def truncation_evaluator(
    dense: nn.Module,
    blocks_path: str,
    kept: dict[int, tuple[dict[str, KeptFactors], list[tuple[list[str], int]]]],
    config: Any,
    perplexity_of: Callable[[nn.Module], float],
) -> Callable[[dict[str, int | None]], float]:
    """``evaluate(ranks)`` for :func:`search_ratio`: a copy of ``dense`` with every block's kept factors
    (block index → (relative group name → factors, the block's groups)) truncated to ``ranks``."""

    def evaluate(ranks: dict[str, int | None]) -> float:
        model = copy.deepcopy(dense)
        blocks = model.get_submodule(blocks_path)
        for i, (factors, groups) in kept.items():
            compress_groups(blocks[i], [names for names, _ in groups], config, truncated(factors),
                            ranks=ranks, prefix=f"{blocks_path}.{i}")  # fmt: skip
        with torch.no_grad():
            ppl = perplexity_of(model)
        del model
        return ppl if math.isfinite(ppl) else float("inf")

    return evaluate


def held_out_evaluation(windows: Sequence[Sequence[int]], pad_id: int, batch_size: int) -> Callable[[nn.Module], float]:
    """Held-out perplexity of a model on ``windows`` (the held-out calibration blocks)."""
    from .evaluate import perplexity

    def ppl(model: nn.Module) -> float:
        return perplexity(model, windows, batch_size=batch_size, pad_id=pad_id).perplexity

    return ppl
