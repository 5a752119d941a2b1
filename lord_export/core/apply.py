"""Apply a plan to an eager model by swapping modules (in place)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ..errors import PlanError
from .experts import unfuse_experts
from .modules import LordBottleneck, LordLinear
from .plan import BOTTLENECKS_ATTR, Group, Plan
from .targets import is_linear, linear_info


def apply_plan(model: nn.Module, plan: Plan, *, load_tensors: bool = True, allow_mismatch: bool = False) -> nn.Module:
    """Replace every factorized group of ``plan`` in ``model`` (in place) and return ``model``.

    Each group gets one ``LordBottleneck`` registered as ``<parent>.lord_bottlenecks.<key>`` and
    each member becomes a ``LordLinear``. With ``load_tensors`` the plan's factors are copied in;
    without, the new parameters are left uninitialized on the member's device (for loading a
    state dict afterwards). Raises PlanError, before changing anything, when the plan does not
    fit the model, or when ``model`` is not the dense model the plan was made from (its
    ``base_model`` fingerprint: structure, and with ``load_tensors`` the content of the planned
    layers' weights, which the factors replace — a fine-tuned model would silently lose its
    tuning); ``allow_mismatch=True`` skips that check. transformers 5's fused experts are unfused into
    per-expert linears first (:mod:`lord_export.core.experts`; no output changes), as compressing did.
    """
    unfuse_experts(model)  # compressing unfused them all: the plan and the weights name per-expert layers
    check_plan_fits(model, plan, need_tensors=load_tensors)
    if not allow_mismatch:
        check_base_model(model, plan, weights=load_tensors)
    for group in plan.factorized_groups:
        apply_group(model, group, plan.tensors if load_tensors else None)
    record_plan(model, plan)
    return model


def record_plan(model: nn.Module, plan: Plan) -> None:
    """Put the plan's structure in a transformers model's config (``quantization_config``), so that
    ``model.save_pretrained(d)`` writes a directory ``from_pretrained`` and ``lord_export.load`` read."""
    from .plan import quantization_config_from_plan

    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_json_string") or not plan.factorized_groups:
        return
    present = getattr(config, "quantization_config", None)
    if present is not None and not isinstance(present, dict):
        return  # transformers' own config object, from the directory this model was loaded from
    config.quantization_config = quantization_config_from_plan(plan)


def apply_group(root: nn.Module, group: Group, tensors: Mapping[str, torch.Tensor] | None) -> None:
    """Swap one factorized group into ``root`` (member names are relative to ``root``).

    ``tensors`` holds the group's factors under state-dict names relative to ``root``; None leaves
    the new parameters uninitialized.
    """
    parent = root.get_submodule(group.parent) if group.parent else root
    first = root.get_submodule(group.members[0].name)
    device, dtype = first.weight.device, first.weight.dtype
    bottleneck = LordBottleneck(group.d_in, group.rank, len(group.members), device=device, dtype=dtype)
    if not hasattr(parent, BOTTLENECKS_ATTR):
        parent.add_module(BOTTLENECKS_ATTR, nn.ModuleDict())
    getattr(parent, BOTTLENECKS_ATTR)[group.key] = bottleneck
    for m in group.members:  # a member's own parent: under ``group.parent``, or deeper (experts sharing a basis)
        layer = LordLinear(bottleneck, m.d_out, m.has_bias, device=device, dtype=dtype)
        owner, _, leaf = m.name.rpartition(".")
        (root.get_submodule(owner) if owner else root).add_module(leaf, layer)
    if tensors is None:
        return
    with torch.no_grad():
        bottleneck.weight.copy_(tensors[f"{group.bottleneck_name}.weight"])
        for m in group.members:
            layer = root.get_submodule(m.name)
            layer.weight.copy_(tensors[f"{m.name}.weight"])
            if m.has_bias:
                layer.bias.copy_(tensors[f"{m.name}.bias"])


def check_base_model(model: nn.Module, plan: Plan, *, weights: bool = True) -> None:
    """PlanError when ``model`` does not match the plan's ``base_model`` fingerprint (see :func:`apply_plan`)."""
    from .fingerprint import fingerprint_mismatch

    if not plan.base_model:
        return
    layers = [m.name for g in plan.factorized_groups for m in g.members] if weights else None
    why = fingerprint_mismatch(plan.base_model, model, layers=layers)
    if why:
        raise PlanError(f"the plan was made from another model: {why}; pass allow_mismatch=True to apply it anyway")


def check_plan_fits(model: nn.Module, plan: Plan, *, need_tensors: bool = True) -> None:
    """Raise PlanError naming every layer of ``plan`` that ``model`` lacks or has in another shape."""
    modules = dict(model.named_modules())
    problems: list[str] = []
    for group in plan.factorized_groups:
        for m in group.members:
            mod = modules.get(m.name)
            if mod is None:
                problems.append(f"{m.name}: no such module")
                continue
            if not is_linear(mod):
                problems.append(f"{m.name}: is {type(mod).__name__}, not a dense linear layer")
                continue
            info = linear_info(m.name, mod)
            if (info.d_out, info.d_in) != (m.d_out, m.d_in):
                problems.append(
                    f"{m.name}: model has (d_out, d_in)=({info.d_out}, {info.d_in}), plan ({m.d_out}, {m.d_in})"
                )
            if m.has_bias != info.has_bias:
                problems.append(f"{m.name}: bias {'expected' if m.has_bias else 'unexpected'}")
        if need_tensors:
            shapes = {f"{group.bottleneck_name}.weight": (group.rank, group.d_in)}
            shapes.update({f"{m.name}.weight": (m.d_out, group.rank) for m in group.members})
            for key, shape in shapes.items():
                t = plan.tensors.get(key)
                if t is None:
                    problems.append(f"{key}: factor missing from the plan")
                elif tuple(t.shape) != shape:
                    problems.append(f"{key}: factor has shape {tuple(t.shape)}, expected {shape}")
    if problems:
        shown = "; ".join(problems[:8]) + (f"; and {len(problems) - 8} more" if len(problems) > 8 else "")
        raise PlanError(f"the plan does not fit this model ({len(problems)} problem(s)): {shown}")
