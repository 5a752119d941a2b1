"""From a parameter budget to per-group ranks: the spectra-first pass before compression.

``param_ratio`` needs every group's error curve before any rank is fixed, so compression runs in
two passes: this survey (calibration of the dense model, one output-spectrum decomposition per
group and, for the ``fisher`` allocation, the loss's sensitivity to each group's output:
:mod:`lord_export.pipeline.sensitivity`), then the allocation (:mod:`lord_export.core.allocate`),
then the compression itself with the chosen ranks (any calibration mode). Groups named by
``config.overrides`` keep their override and count against the budget as fixed.

In memory (:func:`survey`) the decompositions are kept, so an independent-calibration compression
that follows reuses them. Block by block (:func:`streamed_survey`) statistics and decompositions
are freed with each block; with independent calibration every group is also factorized at the
largest rank an allocation can give it and the factors are parked on disk, so the compression that
follows only truncates them (one calibration pass in all); the other modes calibrate again at the
allocated ranks.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..calibration.blocks import find_blocks, run_block
from ..calibration.statistics import Calibration, Calibrator, batch_kwargs, calibrating, exact_matmuls, warn_few_tokens
from ..config import LordConfig
from ..core.allocate import GroupCurve, allocate, predicted_loss, split_groups
from ..core.fingerprint import count_parameters
from ..core.targets import pattern_matches, select_targets
from ..device import model_device
from ..errors import TargetError, UsageError
from ..progress import Progress
from .planner import build_groups, shared_experts, survey_groups
from .sensitivity import (
    SensitivityProbe,
    check_causal_lm,
    fisher_sensitivities,  # noqa: F401 (part of this module's API since 0.1)
    lm_loss_sum,  # noqa: F401
    sensitivity_batch_count,  # noqa: F401 (part of this module's API since 0.2)
    sensitivity_batches,
    streamed_fisher,
)

log = logging.getLogger(__name__)


@dataclass
class Budget:
    """The survey's result: ranks for every group (None: dense) and what was measured on the way."""

    ranks: dict[str, int | None]
    calibration: Calibration
    cache: dict
    report: dict[str, Any] = field(default_factory=dict)
    fisher: Any = None  # the OutputFisher that weights the closed form (None: unweighted)


@dataclass
class Survey:
    """Everything the allocation needs that does not depend on the budget (reusable across budgets)."""

    curves: list[GroupCurve]
    fixed_removed: int
    fixed: dict[str, int | None]
    total: int
    calibration: Calibration | None  # None after a streamed survey (nothing kept)
    cache: dict
    timings: dict[str, float]
    fisher: Any = None  # the OutputFisher weighting the spectra (None: unweighted)


def survey(
    model: nn.Module, batches: Sequence[dict[str, torch.Tensor]], config: LordConfig, layers: list[str]
) -> Survey:
    """Calibrate the dense model, decompose every group once, measure sensitivities (``fisher``).

    With ``fisher`` the probe's batches are calibration batches run with gradients: their forward
    feeds the statistics too, so the sensitivities cost one backward pass over a few batches.
    """
    t0 = time.perf_counter()
    check_overrides(config, layers)
    probe = SensitivityProbe(model, layers, find_blocks(model)) if config.allocation == "fisher" else None
    probe_batches = set(sensitivity_batches(batches)) if probe is not None else set()
    probe_s = 0.0

    device = model_device(model)
    with calibrating(model, layers) as cal:
        for i, batch in enumerate(batches):
            if i in probe_batches:  # the whole model, with gradients: its forward calibrates too
                t = time.perf_counter()
                probe.run(batch)
                probe_s += time.perf_counter() - t
            else:  # no gradients, and nothing after the last targeted layer
                with torch.no_grad():
                    cal.run_batch(model, batch_kwargs(batch, device))
    calibration = shared_experts(cal.result(), config)
    warn_few_tokens(calibration)
    groups = build_groups(layers, calibration.input_of, config.grouping)
    fisher = probe.fisher if probe is not None and config.output_weighting == "fisher" else None
    surveyed = survey_groups(dict(model.named_modules()), groups, calibration, config, decompose=True, fisher=fisher)
    if probe is not None and surveyed.curves:
        sensitivities = probe.sensitivities(surveyed.members)
        for c in every_curve(surveyed.curves):
            c.sensitivity = sensitivities[c.name]
    # sensitivity_s: the forward + backward of the probe's batches (their forward also calibrated)
    timings = {"survey_s": round(time.perf_counter() - t0 - probe_s, 3), "sensitivity_s": round(probe_s, 3)}
    return Survey(
        surveyed.curves,
        surveyed.fixed_removed,
        surveyed.fixed,
        count_parameters(model),
        calibration,
        surveyed.decompositions,
        timings,
        fisher,
    )


def streamed_survey(
    engine: Any,
    batches: Sequence[dict[str, torch.Tensor]],
    blocks: Any,
    *,
    spill: Any = None,
    checkpoints: Any = None,
) -> Survey:
    """The survey of a model whose blocks are read one at a time (:class:`lord_export.pipeline.engine.Engine`).

    Same curves, sensitivities and fixed groups as :func:`survey`. With the ``fisher`` allocation the
    loss's per-feature Fisher at every targeted layer is measured first, block by block
    (:func:`lord_export.pipeline.sensitivity.streamed_fisher`): it gives the sensitivities and weights
    the closed form. Then forward over the blocks: calibrate each block on the dense stream and keep its
    groups' output spectra (statistics and decompositions are freed with the block). With ``spill`` (a
    :class:`~lord_export.persist.checkpoint.FactorSpill`; independent calibration) every group is also
    factorized at the largest rank any allocation can give it and the factors are parked there, for
    :meth:`~lord_export.pipeline.engine.Engine.run` to truncate. With ``checkpoints`` every block's step
    is saved, and a resumed run continues after the last one.
    """
    config = engine.config
    layers = select_targets(engine.model, config.targets, config.exclude)
    check_overrides(config, layers)
    inside, outside = engine.layers_by_block(blocks)
    if outside:
        raise UsageError(f"the streamed survey covers the blocks only; {outside[0]!r} is outside them")
    use_fisher = config.allocation == "fisher"
    if use_fisher:
        check_causal_lm(engine.model)
    total = count_parameters(engine.model)
    saved = checkpoints.state.get("survey") if checkpoints is not None else None
    t0 = time.perf_counter() - (saved["seconds"] if saved else 0.0)
    with torch.no_grad(), exact_matmuls():
        setup = engine.begin(batches, blocks, two=False)
        fisher = None
        if use_fisher:
            probe = [b for b in sensitivity_batches(batches) if b < len(setup.streams.dense)]
            with engine.times("sensitivity_s"):
                fisher = streamed_fisher(engine, blocks, setup, probe, batches, inside, checkpoints=checkpoints)
        weights = fisher if fisher is not None and config.output_weighting == "fisher" else None
        if saved and saved.get("done"):
            engine.say("the survey was done before the interruption: resuming after it")
            engine.source_fingerprints(saved["fingerprints"])
            return StreamedSurvey.restore(saved, checkpoints).survey(total, saved["timings"], weights)
        result = StreamedSurvey.restore(saved, checkpoints) if saved else StreamedSurvey()
        start = saved["blocks_done"] if saved else 0
        if start:
            _restore_streams(setup.streams, checkpoints)
            engine.source_fingerprints(saved["fingerprints"])
            engine.say(f"resuming the survey after block {start} of {len(blocks)}")
        progress = Progress(engine.say, "survey", len(blocks) - start, unit="block")
        for i in range(start, len(blocks)):
            t_block = time.perf_counter()
            block, prefix = engine.materialize(blocks, i), blocks.name(i)
            try:
                block_weights = weights.renamed(prefix) if weights is not None else None
                kept, meta = _survey_block(
                    engine, block, prefix, inside[i], setup.calls[i], setup.streams, spill is not None, result,
                    block_weights,
                )  # fmt: skip
            finally:
                engine.source.release(block)
            if spill is not None:
                spill.put(i, kept, {**meta, "seconds": time.perf_counter() - t_block})
            if checkpoints is not None:
                state = result.state(i + 1, time.perf_counter() - t0, getattr(engine.source, "fingerprints", {}))
                checkpoints.save(_stream_tensors(setup.streams) | result.spectra(), survey=state)
            progress.step(prefix)
    if fisher is not None:
        members = {name: ms for per_block in result.members for name, ms in per_block.items()}
        for c in every_curve(result.curves):
            c.sensitivity = fisher.sensitivity(members[c.name])
    timings = {"survey_s": round(time.perf_counter() - t0, 3), **engine.times.rounded()}
    if checkpoints is not None:
        state = result.state(len(blocks), time.perf_counter() - t0, getattr(engine.source, "fingerprints", {}))
        checkpoints.save(result.spectra(), survey={**state, "done": True, "timings": timings})
    return result.survey(total, timings, weights)


def _stream_tensors(streams: Any) -> dict[str, dict[str, torch.Tensor]]:
    return {"ckpt-streams": {f"dense.{b}": h for b, h in enumerate(streams.dense)}}


def _restore_streams(streams: Any, checkpoints: Any) -> None:
    saved = checkpoints.load_tensors("ckpt-streams")
    for b in range(len(streams)):
        streams.dense[b] = streams.park(saved[f"dense.{b}"])


@dataclass
class StreamedSurvey:
    """What :func:`streamed_survey` collects block by block (and what its checkpoints save)."""

    curves: list[GroupCurve] = field(default_factory=list)
    fixed: dict[str, int | None] = field(default_factory=dict)
    fixed_removed: int = 0
    members: list[dict[str, list[str]]] = field(default_factory=list)  # per block: curve name → full layer names

    def spectra(self) -> dict[str, dict[str, torch.Tensor]]:
        return {"ckpt-spectra": {c.name: c.spectrum for c in every_curve(self.curves)}}

    def state(self, blocks_done: int, seconds: float, fingerprints: dict) -> dict[str, Any]:
        def described(c: GroupCurve) -> dict[str, Any]:
            d = {"name": c.name, "kind": c.kind, "d_in": c.d_in, "d_out": c.d_out, "sensitivity": c.sensitivity}
            return d | ({"alternatives": [described(m) for m in c.alternatives]} if c.alternatives else {})

        curves = [described(c) for c in self.curves]
        return {
            "blocks_done": blocks_done,
            "seconds": seconds,
            "curves": curves,
            "fixed": self.fixed,
            "fixed_removed": self.fixed_removed,
            "members": self.members,
            "fingerprints": fingerprints,
        }

    @classmethod
    def restore(cls, state: dict[str, Any], checkpoints: Any) -> StreamedSurvey:
        spectra = checkpoints.load_tensors("ckpt-spectra") if state["curves"] else {}

        def curve(c: dict[str, Any]) -> GroupCurve:
            alternatives = [curve(m) for m in c.get("alternatives", [])]
            return GroupCurve(
                c["name"], c["kind"], c["d_in"], c["d_out"], spectra[c["name"]], c["sensitivity"], alternatives
            )

        curves = [curve(c) for c in state["curves"]]
        return cls(curves, dict(state["fixed"]), state["fixed_removed"], list(state["members"]))

    def survey(self, total: int, timings: dict[str, float], fisher: Any = None) -> Survey:
        return Survey(self.curves, self.fixed_removed, self.fixed, total, None, {}, timings, fisher)


def _survey_block(
    engine, block, prefix, local, calls, streams, keep, result: StreamedSurvey, fisher: Any = None
) -> tuple[dict, dict]:
    """Calibrate ``block`` on the dense stream (advancing it) and survey its groups into ``result``;
    returns what the spill keeps of the block: (kept factor tensors, their description)."""
    with (
        engine.times("survey_calibrate_s"),
        Calibrator(block, local, batch_hooks=False, stats_device=engine.stats_device) as cal,
    ):
        for b, call in enumerate(calls):
            cal.begin_batch(call.mask)
            streams.dense[b] = streams.park(run_block(block, streams.load(streams.dense[b]), call))
            cal.end_batch()
    members: dict[str, list[str]] = {}
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, Any] = {"groups": [], "kept": []}
    if local:
        calibration = shared_experts(cal.result(), engine.config)
        if keep:
            warn_few_tokens(calibration)
            engine._add_warnings(calibration.warnings)
        groups = build_groups(local, calibration.input_of, engine.config.grouping)
        with engine.times("survey_factorize_s"):
            surveyed = survey_groups(
                dict(block.named_modules()), groups, calibration, engine.config, prefix=prefix, keep=keep, fisher=fisher
            )
        result.curves.extend(surveyed.curves)
        result.fixed.update(surveyed.fixed)
        result.fixed_removed += surveyed.fixed_removed
        members = {name: [f"{prefix}.{n}" for n in ms] for name, ms in surveyed.members.items()}
        meta["groups"] = [(names, calibration.of(names[0]).tokens) for names in groups]
        meta["kept"] = list(surveyed.kept)
        for name, factors in surveyed.kept.items():
            tensors.update({f"{name}|{k}": v for k, v in factors.tensors().items()})
    result.members.append(members)
    return tensors, meta


def plan_budget(
    model: nn.Module,
    batches: Sequence[dict[str, torch.Tensor]],
    config: LordConfig,
    layers: list[str],
    *,
    surveyed: Survey | None = None,
) -> Budget:
    """Survey ``model`` (or reuse ``surveyed``) and allocate ``config.param_ratio`` (module docstring)."""
    sv = surveyed or survey(model, batches, config, layers)
    multiple = config.rank_multiple
    target = sv.total - int(config.param_ratio * sv.total) - sv.fixed_removed
    reachable = sum(c.removed(c.ranks(multiple)[-1]) for c in sv.curves if c.ranks(multiple))
    if target > reachable:
        smallest = (sv.total - sv.fixed_removed - reachable) / sv.total
        raise UsageError(
            f"parameter ratio {config.param_ratio} cannot be reached: with every target at rank {multiple} the "
            f"model keeps {smallest:.4f} of its parameters; ask for at least that (or target more layers)"
        )
    ranks = allocate(sv.curves, target, method=config.allocation, multiple=multiple)
    ranks.update(sv.fixed)
    report = {
        "params_total": sv.total,
        "params_target": int(config.param_ratio * sv.total),
        "allocation": config.allocation,
        "predicted_loss": predicted_loss(sv.curves, ranks),
        **sv.timings,
        "sensitivities": {c.name: c.sensitivity for c in sv.curves} if config.allocation == "fisher" else {},
        "grouping": config.grouping,
        "split_groups": split_groups(sv.curves, ranks),
    }
    report["output_weighting"] = "fisher" if sv.fisher is not None else "none"
    return Budget(ranks, sv.calibration, sv.cache, report, sv.fisher)


def every_curve(curves: Sequence[GroupCurve]) -> list[GroupCurve]:
    """``curves`` and their alternatives (the members of groups the allocation may split)."""
    return [*curves, *(m for c in curves for m in c.alternatives)]


def check_overrides(config: LordConfig, layers: list[str]) -> None:
    """TargetError for an override pattern that matches none of ``layers``."""
    for pattern in config.overrides:
        if not any(pattern_matches(pattern, n) for n in layers):
            raise TargetError(f"override pattern {pattern!r} matches none of the targeted layers")
