"""The compression engine: calibrate, factorize and swap one block at a time.

Memory is bounded by one block: the model's repeated blocks (:mod:`lord_export.blocks`) are
processed in order, each loaded onto the compute device (from the model in memory, or read from the
checkpoint's safetensors shards while the rest of the model stays on the meta device), calibrated,
factorized, swapped to LoRD modules, run to produce the next block's inputs, written out and freed.
Statistics exist for one block at a time; calibration activations (one hidden-state tensor per
batch and stream) are kept between blocks.

Calibration modes (``LordConfig.calibration``), for a linear layer W whose input on the dense model
is X and on the model compressed so far is X̂:

* ``independent`` — LoRD on the dense model's activations, min ‖W X − A B X‖ (every layer fitted on
  its own; identical to whole-model calibration). One pass per block.
* ``sequential`` — LoRD on the compressed model's activations, min ‖W X̂ − A B X̂‖: each layer sees
  the inputs it will see at inference, including the error of everything compressed before it.
* ``compensating`` — fit the DENSE output from the compressed input, min ‖W X − A B X̂‖: the closed
  form of :func:`lord_export.factorize.compensated_weight` (reduces exactly to LoRD when X̂ = X).

The last two run a block in stages, one per distinct layer input in execution order (q|k|v, then o,
then gate|up, then down for a Llama block): a stage's inputs are captured after the earlier stages
of the same block were swapped, so even within a block nothing is fitted on activations it will
not see. Both keep the dense stream too, to report each group's error against the dense output and
the best error any rank-r factors could reach from those inputs.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .apply import apply_group
from .blocks import BlockCall, Blocks, capture_block_inputs, find_blocks, mixed_layer_types, run_block
from .calibrate import Calibrator, InputStats, exact_matmuls, select_tokens, warn_few_tokens
from .config import LordConfig
from .device import statistics_device
from .errors import CalibrationError, PlanError
from .plan import Group
from .planner import build_groups, describe_group, factorize_group, factorize_group_on_compressed
from .targets import select_targets

log = logging.getLogger(__name__)


class WeightSource:
    """Where a block's weights come from while it is processed, and where they go afterwards."""

    def materialize(self, module: nn.Module, prefix: str, device: torch.device) -> None:
        raise NotImplementedError

    def release(self, module: nn.Module) -> None:
        raise NotImplementedError


class InMemoryWeights(WeightSource):
    """The model is in memory: a block visits the compute device and goes back where it was."""

    def __init__(self) -> None:
        self._home: dict[int, torch.device] = {}

    def materialize(self, module: nn.Module, prefix: str, device: torch.device) -> None:
        p = next(module.parameters(), None)
        self._home[id(module)] = p.device if p is not None else torch.device(device)
        module.to(device)

    def release(self, module: nn.Module) -> None:
        module.to(self._home.pop(id(module), "cpu"))


class CheckpointWeights(WeightSource):
    """Blocks read from safetensors one at a time into a model built on the meta device; freed after."""

    def __init__(self, reader: Any, dtype: torch.dtype | None, base_prefix: str = ""):
        self.reader = reader
        self.dtype = dtype
        self.base_prefix = base_prefix

    def checkpoint_name(self, name: str) -> str | None:
        """The checkpoint's name for the model's tensor ``name`` (with or without the base prefix)."""
        if name in self.reader:
            return name
        p = self.base_prefix + "."
        if self.base_prefix and name.startswith(p) and name[len(p) :] in self.reader:
            return name[len(p) :]
        if self.base_prefix and p + name in self.reader:
            return p + name
        return None

    def load_into(self, module: nn.Module, names: dict[str, str], device: torch.device | str) -> list[str]:
        """Assign ``{local name: model name}`` tensors of ``module``; returns model names not in the checkpoint."""
        state, missing = {}, []
        try:
            for local, full in names.items():
                ckpt = self.checkpoint_name(full)
                if ckpt is None:
                    missing.append(full)
                    continue
                t = self.reader.get(ckpt)
                dtype = self.dtype if self.dtype is not None and t.is_floating_point() else t.dtype
                # a copy, never a view of the memory map: a view would pin the shard's whole mapping
                # (every page read from it) for as long as the tensor lives, e.g. in the writer's buffer
                state[local] = t.to(device=device, dtype=dtype, copy=True)
        finally:
            # unmap the shards: pages of blocks already done would otherwise stay in RSS
            self.reader.close()
        module.load_state_dict(state, strict=False, assign=True)
        return missing

    def materialize(self, module: nn.Module, prefix: str, device: torch.device) -> None:
        names = {local: f"{prefix}.{local}" for local in module.state_dict()}
        missing = self.load_into(module, names, device)
        if missing:
            raise CalibrationError(f"the checkpoint lacks tensors of {prefix}: {missing[:5]}")
        module.to(device)  # non-persistent buffers (rotary tables) follow the weights

    def release(self, module: nn.Module) -> None:
        module.to("meta")


@dataclass
class EngineResult:
    """What the engine produced: the plan's groups, its factor tensors (unless streamed to disk)."""

    groups: list[Group]
    tensors: dict[str, torch.Tensor]
    warnings: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    blocks: int = 0
    streamed: bool = True
    calibration_batches: int = 0


class _Stop(Exception):
    """Stops a block's forward once the input of the layer being calibrated was captured."""


def capture_input(block: nn.Module, layer: nn.Module, hidden: torch.Tensor, call: BlockCall) -> torch.Tensor:
    """The (tokens, d) rows entering ``layer`` when ``block`` runs on ``hidden`` (padding removed).

    The block's forward is stopped right there: later layers of the block are not computed.
    """
    box: dict[str, torch.Tensor] = {}

    def hook(module: nn.Module, args: tuple) -> None:
        box["x"] = args[0]
        raise _Stop

    handle = layer.register_forward_pre_hook(hook)
    try:
        run_block(block, hidden, call)
    except _Stop:
        pass
    finally:
        handle.remove()
    if "x" not in box:
        raise CalibrationError("the block never reached the layer being calibrated")
    rows = select_tokens(box["x"], call.mask)
    return rows if rows is not None else box["x"].detach().reshape(-1, box["x"].shape[-1])


class Engine:
    """Compress ``model`` block by block (see the module docstring); one instance per run."""

    def __init__(
        self,
        model: nn.Module,
        config: LordConfig,
        *,
        device: torch.device | str,
        source: WeightSource | None = None,
        stats_device: torch.device | str | None = None,
        writer: Any = None,
        progress: Callable[[str], None] | None = None,
        bars: bool = False,
        ranks: dict[str, int | None] | None = None,
    ):
        self.model = model
        self.ranks = ranks
        self.config = config
        self.device = torch.device(device)
        self.source = source or InMemoryWeights()
        self.stats_device = statistics_device(self.device, stats_device)
        self.writer = writer
        self.say = progress or (lambda msg: None)
        self.bars = bars
        self.groups: list[Group] = []
        self.tensors: dict[str, torch.Tensor] = {}
        self.warnings: list[str] = []
        self.batches = 0

    # -- the run ------------------------------------------------------------------------------
    def run(self, batches: Sequence[dict[str, torch.Tensor]], blocks: Blocks) -> EngineResult:
        """Compress every block of ``blocks`` (and targeted layers outside them) on ``batches``."""
        t0 = time.perf_counter()
        layers = select_targets(self.model, self.config.targets, self.config.exclude)
        inside = {i: [n for n in layers if n.startswith(blocks.name(i) + ".")] for i in range(len(blocks))}
        outside = [n for n in layers if not any(n in names for names in inside.values())]
        with torch.no_grad(), exact_matmuls():
            self.say(f"capturing the inputs of {blocks.path}.0 for {len(batches)} batch(es)")
            hiddens, calls = capture_block_inputs(self.model, blocks.modules[0], batches, self._embed_device())
            calls = [self._on_device(c) for c in calls]
            dense = [self._park(h) for h in hiddens]
            comp = list(dense)
            self.batches = len(calls)
            template = None
            it: Any = range(len(blocks))
            if self.bars:
                from tqdm.auto import tqdm

                it = tqdm(it, desc="compress", unit="block")
            block_seconds = []
            for i in it:
                t_block = time.perf_counter()
                block = blocks.modules[i]
                self.source.materialize(block, blocks.name(i), self.device)
                prefix = blocks.name(i)
                local = [n[len(prefix) + 1 :] for n in inside[i]]
                self.prefix = prefix
                if self.config.calibration == "independent":
                    groups, tensors = self._independent_block(block, local, dense, calls)
                else:
                    groups, tensors = self._staged_block(block, local, dense, comp, calls)
                if i == 0 and outside:
                    template = _output_structure(block, self._load(dense[0]), calls[0])
                self._record(groups, tensors, prefix, block)
                self.source.release(block)
                block_seconds.append(round(time.perf_counter() - t_block, 3))
                self.say(
                    f"block {i + 1}/{len(blocks)}: {sum(g.factorized for g in groups)} group(s) factorized "
                    f"in {block_seconds[-1]:.1f} s"
                )
            final = dense if self.config.calibration == "independent" else comp
            if outside:
                self._outside_layers(outside, blocks, final, calls, batches, template)
        timings = {"compress_s": round(time.perf_counter() - t0, 3), "blocks_s": block_seconds}
        return EngineResult(self.groups, self.tensors, self.warnings, timings, len(blocks), True, self.batches)

    # -- the survey for a parameter budget ----------------------------------------------------
    def survey(
        self,
        batches: Sequence[dict[str, torch.Tensor]],
        blocks: Blocks,
        *,
        fisher: bool,
        fisher_batches: int,
        spill: Any = None,
    ):
        """The allocation's survey of the dense model, one block at a time (see :mod:`lord_export.budget`).

        Forward over the blocks: calibrate each block on the dense stream and keep only its groups'
        output spectra (statistics and decompositions are freed with the block). With ``spill`` (a
        :class:`~lord_export.checkpoint.FactorSpill`; independent calibration) every group is also
        factorized at the largest rank any allocation can give it (its override's rank for a fixed
        group) and the factors are parked there, so that :meth:`write_kept` finishes the
        compression by truncation instead of a second calibration pass. With ``fisher``, the
        inputs of every block for the first ``fisher_batches`` batches are kept too, the LM loss is
        taken on the final hidden states (the blocks replayed, as for targets outside them), and its
        gradient is carried back block by block — each block loaded again, recomputed from its stored
        input, backpropagated — accumulating Σ‖∂L/∂y‖² at every targeted layer's output: exactly
        :func:`lord_export.budget.fisher_sensitivities`, with one block in memory.
        Returns ``(curves, fixed ranks, parameters fixed groups remove, timings)``.
        """
        from . import factorize as fz
        from .allocate import GroupCurve
        from .planner import keep_factors, override_for, stacked_weight

        t0 = time.perf_counter()
        layers = select_targets(self.model, self.config.targets, self.config.exclude)
        inside = {i: [n for n in layers if n.startswith(blocks.name(i) + ".")] for i in range(len(blocks))}
        curves: list[GroupCurve] = []
        fixed: dict[str, int | None] = {}
        fixed_removed = 0
        members_of: dict[int, dict[str, list[str]]] = {}
        with torch.no_grad(), exact_matmuls():
            hiddens, calls = capture_block_inputs(self.model, blocks.modules[0], batches, self._embed_device())
            calls = [self._on_device(c) for c in calls]
            dense = [self._park(h) for h in hiddens]
            n_fisher = min(fisher_batches, len(dense)) if fisher else 0
            self.batches = len(calls)
            inputs: list[list[torch.Tensor]] = []
            for i in range(len(blocks)):
                t_block = time.perf_counter()
                block, prefix = blocks.modules[i], blocks.name(i)
                self.source.materialize(block, prefix, self.device)
                inputs.append(dense[:n_fisher])
                local = [n[len(prefix) + 1 :] for n in inside[i]]
                with Calibrator(block, local, batch_hooks=False, stats_device=self.stats_device) as cal:
                    for b, call in enumerate(calls):
                        cal.begin_batch(call.mask)
                        dense[b] = self._park(run_block(block, self._load(dense[b]), call))
                        cal.end_batch()
                members_of[i] = {}
                kept_groups: list[tuple[list[str], int, bool]] = []  # (names, tokens, factors kept)
                kept: dict[str, torch.Tensor] = {}
                if local:
                    calibration = cal.result()
                    if spill is not None:
                        warn_few_tokens(calibration)
                        self.warnings.extend(w for w in calibration.warnings if w not in self.warnings)
                    modules = dict(block.named_modules())
                    for names in build_groups(local, calibration.input_of, self.config.grouping):
                        stats = calibration.of(names[0])
                        group = describe_group(modules, names, self.config, ranks={}, prefix=prefix)
                        full = group.renamed(prefix)
                        curve = None
                        if override_for(full, self.config.overrides) is not None:
                            fixed[full.name] = group.rank if group.factorized else None
                            fixed_removed += group.dense_params - group.factor_params if group.factorized else 0
                            keep_rank = group.rank if group.factorized else None
                        else:
                            kind = ",".join(m.name.rsplit(".", 1)[-1] for m in group.members)
                            curve = GroupCurve(full.name, kind, group.d_in, group.d_out, torch.empty(0))
                            candidates = curve.ranks(self.config.rank_multiple)
                            keep_rank = candidates[0] if candidates else None  # the largest any allocation gives
                            curves.append(curve)
                            members_of[i][full.name] = names
                        factors = None
                        if spill is not None and keep_rank is not None:
                            factors = keep_factors(modules, group, stats, self.config.method, keep_rank)
                            j = len(kept_groups)
                            kept.update({f"{j}.{k}": v for k, v in factors.tensors().items()})
                        if spill is not None:
                            kept_groups.append((names, stats.tokens, factors is not None))
                        if curve is not None:
                            if factors is not None:
                                curve.spectrum = factors.spectrum.cpu()
                            else:
                                W = stacked_weight(modules, group).to(self.stats_device)
                                curve.spectrum = fz.output_eigenvalues(W, stats.C).cpu()
                if spill is not None:
                    spill.put(i, kept, {"groups": kept_groups, "seconds": time.perf_counter() - t_block})
                self.source.release(block)
                self.say(f"survey: block {i + 1}/{len(blocks)}")
            template = _output_structure_released(blocks, self, dense[0], calls[0]) if n_fisher else None
        t1 = time.perf_counter()
        if n_fisher:
            grads = self._head_gradients(dense[:n_fisher], calls, batches, blocks, template)
            tokens = sum(
                int(c.mask.sum()) if c.mask is not None else dense[b].shape[:2].numel()
                for b, c in enumerate(calls[:n_fisher])
            )
            sums: dict[str, float] = {}
            for i in reversed(range(len(blocks))):
                grads = self._block_gradients(blocks, i, inputs[i], grads, calls, members_of[i], sums)
            for c in curves:
                c.sensitivity = sums.get(c.name, 0.0) / (max(tokens, 1) * max(c.d_out, 1))
        t2 = time.perf_counter()
        timings = {"survey_s": round(t1 - t0, 3), "sensitivity_s": round(t2 - t1, 3)}
        return curves, fixed, fixed_removed, timings

    def write_kept(self, blocks: Blocks, spill: Any) -> EngineResult:
        """Finish a compression whose survey kept its factors (:meth:`survey` with ``spill``).

        Block by block: load the block, give every group its allocated rank (``self.ranks``) by
        truncating the kept factors (the same factors a calibration at that rank would compute:
        :class:`~lord_export.planner.KeptFactors`), swap, write, free. Nothing is calibrated or
        decomposed again.
        """
        from .planner import KeptFactors, truncated_group_tensors

        t0 = time.perf_counter()
        block_seconds = []
        for i in range(len(blocks)):
            t_block = time.perf_counter()
            block, prefix = blocks.modules[i], blocks.name(i)
            self.source.materialize(block, prefix, self.device)
            kept, meta = spill.take(i)
            modules = dict(block.named_modules())
            groups, tensors = [], {}
            for j, (names, tokens, has_factors) in enumerate(meta["groups"]):
                group = describe_group(modules, names, self.config, tokens=tokens, ranks=self.ranks, prefix=prefix)
                if group.factorized:
                    if not has_factors:
                        raise PlanError(f"{group.renamed(prefix).name}: no factors were kept for rank {group.rank}")
                    factors = KeptFactors(*(kept[f"{j}.{k}"].to(self.device) for k in ("A", "B", "errors", "spectrum")))
                    group_tensors = truncated_group_tensors(modules, group, factors)
                    apply_group(block, group, group_tensors)
                    tensors.update(group_tensors)
                groups.append(group)
            self._record(groups, tensors, prefix, block)
            self.source.release(block)
            block_seconds.append(round(meta["seconds"] + time.perf_counter() - t_block, 3))
            self.say(f"block {i + 1}/{len(blocks)}: {sum(g.factorized for g in groups)} group(s) factorized, written")
        timings = {"compress_s": round(time.perf_counter() - t0, 3), "blocks_s": block_seconds}
        return EngineResult(self.groups, self.tensors, self.warnings, timings, len(blocks), True, self.batches)

    def _head_gradients(self, finals, calls, batches, blocks, template) -> list[torch.Tensor]:
        """∂L/∂(final hidden states) per batch: the model run with its blocks replaced by a replay."""
        from .budget import lm_loss_sum

        leaves = [self._load(h).clone().requires_grad_(True) for h in finals]
        replay = _Replay(leaves, template, lambda h: h)
        saved = list(blocks.modules)
        requires = {n: p.requires_grad for n, p in self.model.named_parameters()}
        for i in range(len(blocks)):
            blocks.modules[i] = replay if i == 0 else _PassThrough(template)
        try:
            self.model.requires_grad_(False)
            with torch.enable_grad(), exact_matmuls():
                for b in range(len(leaves)):
                    replay.batch = b
                    batch = {k: v.to(self._embed_device()) for k, v in batches[b].items()}
                    logits = self.model(**batch, **_no_cache(self.model)).logits
                    lm_loss_sum(logits, batch).backward()
        finally:
            for i, m in enumerate(saved):
                blocks.modules[i] = m
            for n, p in self.model.named_parameters():
                p.requires_grad_(requires[n])
        return [self._park(leaf.grad) for leaf in leaves]

    def _block_gradients(self, blocks, i, inputs, grads, calls, members, sums) -> list[torch.Tensor]:
        """Backpropagate ``grads`` (∂L/∂ block i's output) through block i; add Σ‖∂L/∂y‖² per group."""
        block, prefix = blocks.modules[i], blocks.name(i)
        self.source.materialize(block, prefix, self.device)
        block.requires_grad_(False)
        modules = dict(block.named_modules())
        handles = []

        def add(group: str, g: torch.Tensor) -> None:
            sums[group] = sums.get(group, 0.0) + float(g.double().square().sum())

        def watch(group: str):
            def hook(module: nn.Module, args: Any, out: torch.Tensor) -> None:
                if out.requires_grad:
                    out.register_hook(lambda g: add(group, g))

            return hook

        for group, names in members.items():
            handles.extend(modules[n].register_forward_hook(watch(group)) for n in names)
        out_grads = []
        try:
            with torch.enable_grad(), exact_matmuls():
                for b, (h, g) in enumerate(zip(inputs, grads, strict=True)):
                    x = self._load(h).clone().requires_grad_(True)
                    y = run_block(block, x, calls[b])
                    torch.autograd.backward(y, self._load(g))
                    out_grads.append(self._park(x.grad))
        finally:
            for handle in handles:
                handle.remove()
            self.source.release(block)
        return out_grads

    # -- one block ----------------------------------------------------------------------------
    def _independent_block(self, block, local, dense, calls) -> tuple[list[Group], dict]:
        """Statistics from the dense stream (one pass that also advances it), then factors."""
        with Calibrator(block, local, batch_hooks=False, stats_device=self.stats_device) as cal:
            for b, call in enumerate(calls):
                cal.begin_batch(call.mask)
                dense[b] = self._park(run_block(block, self._load(dense[b]), call))
                cal.end_batch()
        if not local:
            return [], {}
        calibration = cal.result()
        warn_few_tokens(calibration)
        self.warnings.extend(w for w in calibration.warnings if w not in self.warnings)
        modules = dict(block.named_modules())
        groups, tensors = [], {}
        for names in build_groups(local, calibration.input_of, self.config.grouping):
            stats = calibration.of(names[0])
            group = describe_group(
                modules, names, self.config, tokens=stats.tokens, ranks=self.ranks, prefix=self.prefix
            )
            if group.factorized:
                group_tensors = factorize_group(modules, group, stats, self.config.method)
                apply_group(block, group, group_tensors)
                tensors.update(group_tensors)
            groups.append(group)
        return groups, tensors

    def _staged_block(self, block, local, dense, comp, calls) -> tuple[list[Group], dict]:
        """Sequential/compensating: stage by stage on the compressed stream, the dense block beside it."""
        dense_block = copy.deepcopy(block)
        groups, tensors = [], {}
        if local:
            with Calibrator(block, local, batch_hooks=False, stats_device=self.stats_device) as cal:
                cal.begin_batch(calls[0].mask)  # one batch finds which layers share an input, and the order
                run_block(block, self._load(comp[0]), calls[0])
                cal.end_batch()
            input_of, order = dict(cal.input_of), list(cal.order)
            modules = dict(dense_block.named_modules())
            stage_groups = build_groups(local, input_of, self.config.grouping)
            for key in order:
                for names in [g for g in stage_groups if input_of[g[0]] == key]:
                    group, group_tensors = self._staged_group(
                        block, dense_block, modules, names, key, dense, comp, calls
                    )
                    groups.append(group)
                    tensors.update(group_tensors)
        for b, call in enumerate(calls):
            dense[b] = self._park(run_block(dense_block, self._load(dense[b]), call))
            comp[b] = self._park(run_block(block, self._load(comp[b]), call))
        del dense_block
        return groups, tensors

    def _staged_group(self, block, dense_block, modules, names, key, dense, comp, calls):
        G = Cxx = H = None
        tokens = 0
        group = describe_group(modules, names, self.config, ranks=self.ranks, prefix=self.prefix)
        if not group.factorized:
            return group, {}
        for b, call in enumerate(calls):
            x_hat = capture_input(block, block.get_submodule(key), self._load(comp[b]), call)
            x = capture_input(dense_block, dense_block.get_submodule(key), self._load(dense[b]), call)
            d_in = x.shape[-1]
            if G is None:
                G, Cxx = InputStats.zeros(d_in, self.stats_device), InputStats.zeros(d_in, self.stats_device)
                H = torch.zeros(d_in, d_in, dtype=torch.float64, device=self.stats_device)
            G.add(x_hat, name=key)
            Cxx.add(x, name=key)
            H += (x.to(self.stats_device, torch.float32).T @ x_hat.to(self.stats_device, torch.float32)).double()
            tokens += x.shape[0]
        group.calibration_tokens = tokens
        compensate = self.config.calibration == "compensating"
        group_tensors = factorize_group_on_compressed(
            modules, group, G, Cxx, H, self.config.method, compensate=compensate
        )
        apply_group(block, group, group_tensors)
        return group, group_tensors

    # -- layers outside the blocks (e.g. BERT's pooler) -----------------------------------------
    def _outside_layers(self, outside, blocks, final, calls, batches, template) -> None:
        """Calibrate targets outside the blocks with the blocks replaced by a replay of their output."""
        replay = _Replay(final, template, self._load)
        saved = list(blocks.modules)
        for i in range(len(blocks)):
            blocks.modules[i] = replay if i == 0 else _PassThrough(template)
        try:
            with Calibrator(self.model, outside, stats_device=self.stats_device) as cal:
                for b, batch in enumerate(batches):
                    replay.batch = b
                    self.model(**{k: v.to(self._embed_device()) for k, v in batch.items()}, **_no_cache(self.model))
        finally:
            for i, m in enumerate(saved):
                blocks.modules[i] = m
        calibration = cal.result()
        modules = dict(self.model.named_modules())
        groups, tensors = [], {}
        for names in build_groups(outside, calibration.input_of, self.config.grouping):
            stats = calibration.of(names[0])
            group = describe_group(modules, names, self.config, tokens=stats.tokens, ranks=self.ranks)
            if group.factorized:
                group_tensors = factorize_group(modules, group, stats, self.config.method)
                apply_group(self.model, group, group_tensors)
                tensors.update(group_tensors)
            groups.append(group)
        self.groups.extend(groups)
        self.tensors.update(tensors)

    # -- helpers ------------------------------------------------------------------------------
    def _record(self, groups: list[Group], tensors: dict, prefix: str, block: nn.Module) -> None:
        self.groups.extend(g.renamed(prefix) for g in groups)
        full = {f"{prefix}.{k}": v for k, v in tensors.items()}
        if self.writer is not None:
            self.writer.add({f"{prefix}.{k}": v for k, v in block.state_dict().items()})
        else:
            self.tensors.update(full)

    def _embed_device(self) -> torch.device:
        from .hf import model_device

        return model_device(self.model)

    def _on_device(self, call: BlockCall) -> BlockCall:
        def move(v: Any) -> Any:
            if isinstance(v, torch.Tensor):
                return v.to(self.device)
            if isinstance(v, tuple):
                return tuple(move(x) for x in v)
            return v

        return BlockCall(move(call.args), {k: move(v) for k, v in call.kwargs.items()}, call.mask)

    def _park(self, h: torch.Tensor) -> torch.Tensor:
        """Where activations wait between blocks: the CPU when computing on an accelerator."""
        return h.detach().to("cpu") if self.device.type != "cpu" else h.detach()

    def _load(self, h: torch.Tensor) -> torch.Tensor:
        return h.to(self.device)

    def write_rest(self, blocks: Blocks) -> list[str]:
        """Write every tensor outside the blocks (tied ones once); returns the names stored tied."""
        from .io import unique_state_dict

        tensors, tied = unique_state_dict(self.model, skip_prefix=blocks.path + ".")
        for name, tensor in tensors.items():
            self.writer.add({name: tensor})
        return tied


def _output_structure(block: nn.Module, hidden: torch.Tensor, call: BlockCall) -> int | None:
    """What a block returns: None for a tensor, else the length of its tuple."""
    out = block(hidden, *call.args, **call.kwargs)
    return len(out) if isinstance(out, (tuple, list)) else None


def _output_structure_released(blocks: Blocks, engine: Engine, hidden: torch.Tensor, call: BlockCall) -> int | None:
    """:func:`_output_structure` of block 0, loading it for the call and releasing it after."""
    block = blocks.modules[0]
    engine.source.materialize(block, blocks.name(0), engine.device)
    try:
        return _output_structure(block, engine._load(hidden), call)
    finally:
        engine.source.release(block)


def _no_cache(model: nn.Module) -> dict:
    from .blocks import accepts_argument

    return {"use_cache": False} if accepts_argument(model.forward, "use_cache") else {}


class _Replay(nn.Module):
    """Stands in for block 0: returns the stored final hidden states of the current batch."""

    def __init__(self, outputs: list[torch.Tensor], template: Any, load: Callable) -> None:
        super().__init__()
        self.outputs, self.template, self.load, self.batch = outputs, template, load, 0

    def forward(self, hidden: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        return _shaped(self.load(self.outputs[self.batch]).to(hidden.device), self.template)


class _PassThrough(nn.Module):
    """Stands in for blocks 1…L−1 during the replay: returns its input unchanged."""

    def __init__(self, template: Any) -> None:
        super().__init__()
        self.template = template

    def forward(self, hidden: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        return _shaped(hidden, self.template)


def _shaped(hidden: torch.Tensor, template: Any) -> Any:
    return hidden if template is None else (hidden,) + (None,) * (template - 1)


def find_streamable_blocks(model: nn.Module) -> tuple[Blocks | None, str | None]:
    """The model's blocks, or None with the reason the engine cannot stream this model."""
    blocks = find_blocks(model)
    if blocks is None:
        return None, "no repeated blocks (an nn.ModuleList of one module class) were found"
    if mixed_layer_types(model):
        return None, "its layers use different attention kinds (config.layer_types), each with its own mask"
    return blocks, None
