"""Rank allocation: hit a whole-model parameter budget with the least predicted damage.

For a group g with output spectrum λ₁ ≥ λ₂ ≥ … (eigenvalues of W C Wᵀ), LoRD's output error at rank
r is exactly E_g(r) = Σ_{i>r} λ_i (squared, summed over the calibration tokens), so one
decomposition gives every group's whole error-vs-parameters curve. The allocation minimizes the
predicted loss increase Σ_g s_g · E_g(r_g) subject to the parameter budget, where s_g is the
sensitivity of the model's loss to that group's output error:

* ``fisher`` (default) — s_g = Σ_t ‖∂L/∂y_t‖² / (N · d_out): the empirical Fisher information of the
  language-model loss L with respect to the group's output y, averaged over tokens and output
  features (the isotropic form of ½ δyᵀ F δy, the second-order change of L under a perturbation δy
  of a trained model). One forward + backward over calibration batches measures every group at once;
  truncation probes would need one evaluation per group and rank.
* ``spectrum`` — s_g = 1: the exact output errors alone (shows what the sensitivity buys).
* ``uniform`` — the same rank reduction everywhere (today's behaviour), the smallest one that meets
  the budget.
* ``svdllm-v2`` — SVD-LLM V2's rule: groups of the same type (the same member names, e.g. all
  q|k|v groups) share the parameters that type removes under the uniform setting, in proportion to
  1 / log(truncation loss at the uniform rank).

``fisher`` and ``spectrum`` allocate greedily over the lower convex hull of each group's (parameters
removed, s_g·E_g) curve: a group saves nothing until its rank is below the parity rank, so its
first step into factorization is one move that may span many rank units (parity-aware); later
moves are hull segments in order of loss per parameter removed, and the last move is cut back to
the smallest number of rank steps that meets the budget. Ties go to the earlier group, so the same
inputs give the same ranks. Ranks are multiples of ``rank_multiple``.

A group may come with ``alternatives``: the curves of its members factorized on their own (no shared
bottleneck; ``grouping="auto"``). Sharing one B saves parameters but forces one subspace on all
members; which is better depends on the group and on the budget. For ``fisher``/``spectrum`` such a
group's options are its shared ranks and the split configurations on the lower hull of its members'
combined curves (their hull segments merged by slope), and the greedy runs over the lower hull of
them all: the allocation chooses, per group and per budget, shared or split, with the ranks.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from ..errors import UsageError

ALLOCATIONS = ("fisher", "spectrum", "uniform", "svdllm-v2")
DEFAULT_ALLOCATION = "fisher"


@dataclass
class GroupCurve:
    """What the allocation knows about one group: its shape, spectrum and sensitivity."""

    name: str
    kind: str  # the type of the group: its members' leaf names, e.g. "q_proj,k_proj,v_proj"
    d_in: int
    d_out: int
    spectrum: torch.Tensor  # descending eigenvalues of W C Wᵀ (float64)
    sensitivity: float = 1.0
    alternatives: list[GroupCurve] = field(default_factory=list)  # the members on their own (the split option)

    @property
    def full_rank(self) -> int:
        return min(self.d_in, self.d_out)

    def removed(self, rank: int | None) -> int:
        """Parameters removed at ``rank`` (None: dense, nothing removed; never negative)."""
        if rank is None:
            return 0
        return max(self.d_in * self.d_out - rank * (self.d_in + self.d_out), 0)

    def error(self, rank: int | None) -> float:
        """E_g(rank): the output error the discarded eigenvalues carry (0 when dense)."""
        return 0.0 if rank is None else float(self.spectrum[rank:].sum())

    def ranks(self, multiple: int) -> list[int]:
        """Ranks that save parameters, largest first, multiples of ``multiple`` (at least ``multiple``)."""
        top = math.floor((self.d_in * self.d_out - 1) / (self.d_in + self.d_out))  # largest rank below parity
        top = min(top, self.full_rank)
        top -= top % multiple
        return list(range(top, 0, -multiple)) if top >= 1 else []


def allocate(
    curves: Sequence[GroupCurve], target_removed: int, *, method: str = DEFAULT_ALLOCATION, multiple: int = 1
) -> dict[str, int | None]:
    """Rank of every group (None: dense) removing at least ``target_removed`` parameters."""
    if method not in ALLOCATIONS:
        raise UsageError(f"unknown allocation {method!r}; choose one of {', '.join(ALLOCATIONS)}")
    reachable = sum(c.removed(c.ranks(multiple)[-1]) for c in curves if c.ranks(multiple))
    if target_removed > reachable:
        raise UsageError(f"the budget needs {target_removed:,} parameters removed, at most {reachable:,} can be")
    if target_removed <= 0:
        return {c.name: None for c in curves}
    if method == "uniform":
        return uniform(curves, target_removed, multiple)[0]
    if method == "svdllm-v2":
        return svdllm_v2(curves, target_removed, multiple)
    every = [*curves, *(m for c in curves for m in c.alternatives)]
    weights = {c.name: (c.sensitivity if method == "fisher" else 1.0) for c in every}
    return greedy(curves, target_removed, multiple, weights)


def uniform_rank(c: GroupCurve, rank_reduction: float, multiple: int) -> int | None:
    """The rank one global rank reduction gives ``c`` (None below parity), as ``factorize.rank_for``."""
    from .factorize import rank_for

    r = rank_for(c.d_out, c.d_in, rank_reduction, multiple)
    return r if c.removed(r) > 0 else None


def uniform(curves: Sequence[GroupCurve], target_removed: int, multiple: int) -> tuple[dict, float]:
    """The smallest uniform rank reduction (to 1e-4) that removes ``target_removed``; (ranks, R)."""

    def removed(r: float) -> int:
        return sum(c.removed(uniform_rank(c, r, multiple)) for c in curves)

    lo, hi = 0.0, 1.0 - 1e-9
    if removed(hi) < target_removed:
        raise UsageError("no uniform rank reduction meets this budget")
    while hi - lo > 1e-4:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if removed(mid) < target_removed else (lo, mid)
    return {c.name: uniform_rank(c, hi, multiple) for c in curves}, hi


def _hull(points: list[tuple[int, float, int | None]]) -> list[tuple[int, float, int | None]]:
    """Lower convex hull of (removed, loss, rank) points sorted by removed (the dense point first)."""
    hull: list[tuple[int, float, int | None]] = []
    for p in points:
        while len(hull) >= 2:
            (x1, y1, _), (x2, y2, _) = hull[-2], hull[-1]
            if (y2 - y1) * (p[0] - x1) >= (p[1] - y1) * (x2 - x1):  # hull[-1] is not below the chord
                hull.pop()
            else:
                break
        hull.append(p)
    return hull


#: One complete configuration of a group: (parameters removed, weighted loss, ranks by curve name).
Choice = tuple[int, float, dict[str, int | None]]


def choices(c: GroupCurve, multiple: int, weights: Mapping[str, float]) -> list[Choice]:
    """Every configuration the greedy may give ``c``: dense, each shared rank and, with
    ``alternatives``, the split configurations on the lower hull of the members' combined curves."""
    out: list[Choice] = [(0, 0.0, {c.name: None})]
    out += [(c.removed(r), weights[c.name] * c.error(r), {c.name: r}) for r in c.ranks(multiple)]
    if not c.alternatives:
        return out
    hulls, segments = [], []
    for mi, m in enumerate(c.alternatives):
        pts = [(0, 0.0, None)] + [(m.removed(r), weights[m.name] * m.error(r), r) for r in m.ranks(multiple)]
        hull = _hull(sorted(pts, key=lambda p: (p[0], p[1])))
        hulls.append(hull)
        for si in range(1, len(hull)):
            segments.append(((hull[si][1] - hull[si - 1][1]) / (hull[si][0] - hull[si - 1][0]), mi, si))
    config: dict[str, int | None] = {m.name: None for m in c.alternatives}
    removed, loss = 0, 0.0
    for _, mi, si in sorted(segments, key=lambda s: (s[0], s[1], s[2])):
        before, after = hulls[mi][si - 1], hulls[mi][si]
        removed, loss = removed + after[0] - before[0], loss + after[1] - before[1]
        config = {**config, c.alternatives[mi].name: after[2]}
        out.append((removed, loss, config))
    return out


def greedy(
    curves: Sequence[GroupCurve], target_removed: int, multiple: int, weights: Mapping[str, float]
) -> dict[str, int | None]:
    """Greedy over each group's convex (removed, weighted loss) hull; see the module docstring."""
    segments = []  # (slope, group index, segment index)
    options, hulls = [], []
    for gi, c in enumerate(curves):
        options.append(choices(c, multiple, weights))
        hull = _hull(sorted(options[-1], key=lambda p: (p[0], p[1])))
        hulls.append(hull)
        for si in range(1, len(hull)):
            d_removed = hull[si][0] - hull[si - 1][0]
            segments.append(((hull[si][1] - hull[si - 1][1]) / d_removed, gi, si))
    segments.sort(key=lambda s: (s[0], s[1], s[2]))  # convex hulls: a group's segments come in order
    chosen: list[dict[str, int | None]] = [{c.name: None} for c in curves]
    removed = 0
    for _, gi, si in segments:
        before, after = hulls[gi][si - 1], hulls[gi][si]
        if removed + after[0] - before[0] >= target_removed:
            # cut the move back: the least loss among the group's configurations between the segment's
            # ends that meet the budget (for a single curve: the largest rank that does)
            need = target_removed - removed + before[0]
            fits = [o for o in options[gi] if need <= o[0] <= after[0]]
            chosen[gi] = min(fits, key=lambda o: (o[1], o[0]))[2]
            break
        chosen[gi] = after[2]
        removed += after[0] - before[0]
    return {name: rank for config in chosen for name, rank in config.items()}


def svdllm_v2(curves: Sequence[GroupCurve], target_removed: int, multiple: int) -> dict[str, int | None]:
    """SVD-LLM V2's allocation (module docstring), scaled until the whole budget is met."""
    base, rr = uniform(curves, target_removed, multiple)
    kinds: dict[str, list[GroupCurve]] = {}
    for c in curves:
        kinds.setdefault(c.kind, []).append(c)

    def ranks_for(scale: float) -> dict[str, int | None]:
        out: dict[str, int | None] = {}
        for members in kinds.values():
            budget = scale * sum(c.removed(base[c.name]) for c in members)
            score = {
                c.name: 1.0 / math.log(max(c.error(uniform_rank(c, rr, multiple) or c.full_rank), 1.0) + math.e)
                for c in members
            }
            total = sum(score.values())
            for c in members:
                share = budget * score[c.name] / total
                out[c.name] = _rank_removing(c, share, multiple)
        return out

    def removed(scale: float) -> int:
        ranks = ranks_for(scale)
        return sum(c.removed(ranks[c.name]) for c in curves)

    lo, hi = 0.0, 4.0
    while removed(hi) < target_removed and hi < 64:
        hi *= 2
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if removed(mid) < target_removed else (lo, mid)
    return ranks_for(hi)


def _rank_removing(c: GroupCurve, removed: float, multiple: int) -> int | None:
    """The largest allowed rank that removes at least ``removed`` parameters (None if ~nothing)."""
    if removed <= 0:
        return None
    for r in c.ranks(multiple):  # largest first
        if c.removed(r) >= removed:
            return r
    ranks = c.ranks(multiple)
    return ranks[-1] if ranks else None


def predicted_loss(curves: Sequence[GroupCurve], ranks: Mapping[str, int | None]) -> float:
    """Σ_g s_g · E_g(r_g): what the fisher allocation minimizes (a split group: its members' sum)."""
    total = 0.0
    for c in curves:
        if c.name in ranks or not c.alternatives:
            total += c.sensitivity * c.error(ranks[c.name])
        else:
            total += sum(m.sensitivity * m.error(ranks[m.name]) for m in c.alternatives)
    return total


def split_groups(curves: Sequence[GroupCurve], ranks: Mapping[str, int | None]) -> list[str]:
    """The groups ``ranks`` splits into their members (their own names absent, their members' present)."""
    return [c.name for c in curves if c.alternatives and c.name not in ranks]
