"""Apply a plan at graph level: fx GraphModules and torch.export programs.

The dense model code stays as it is; the plan's factors enter the graph. Use
:func:`export_lord` for "dense model + plan → rewritten ExportedProgram", or the two rewrite
functions on graphs you already have. The torch.compile backend lives in :mod:`lord_export.export.dynamo`.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import fx, nn
from torch.export import ExportedProgram
from torch.export.graph_signature import ExportGraphSignature, InputKind, InputSpec, TensorArgument

from ..core.plan import Plan
from ..errors import PlanError
from ..passes.factorize_linears import factorize_linears, find_sites
from ..passes.graph_utils import copy_graph_module, fake_mode_of
from ..passes.share_bottlenecks import share_bottlenecks

log = logging.getLogger(__name__)


def _attr_name(key: str) -> str:
    return "lord_" + re.sub(r"[^0-9a-zA-Z_]", "_", key)


def rewrite_graph_module(
    gm: fx.GraphModule, plan: Plan, *, up: str = "separate", allow_mismatch: bool = False
) -> fx.GraphModule:
    """Rewrite a ``torch.fx.symbolic_trace`` GraphModule in place (nn.Linear leaves or
    ``F.linear`` on ``get_attr`` weights); factors become buffers of ``gm``; unused submodules
    and weights are dropped. Returns ``gm``. Raises PlanError when the graph's planned weights are
    not those of the plan's base model (see :func:`check_graph_base`) unless ``allow_mismatch``."""
    modules = dict(gm.named_modules())

    def weight_name(node: fx.Node) -> str | None:
        return node.target if node.op == "get_attr" else None

    def bind(key: str, tensor: torch.Tensor) -> fx.Node:
        name = _attr_name(key)
        gm.register_buffer(name, tensor.detach().clone())
        return gm.graph.get_attr(name)

    sites = find_sites(gm.graph, weight_name, modules)
    _check_shapes(plan, {k: _site_weight_shape(gm, s[0]) for k, s in sites.items()})
    if not allow_mismatch:
        check_graph_base(plan, {k: _site_weight(gm, s[0]) for k, s in sites.items()}, sites)
    factorize_linears(gm.graph, plan, sites, bind, up=up)
    share_bottlenecks(gm.graph)
    for node in list(gm.graph.nodes):  # only the weights made dead; other unused nodes may matter
        if node.op == "get_attr" and not node.users:
            gm.graph.erase_node(node)
    gm.delete_all_unused_submodules()
    _drop_unused_attrs(gm)
    gm.graph.lint()
    gm.recompile()
    return gm


def _site_weight(gm: fx.GraphModule, site) -> torch.Tensor:
    if site.kind == "module":
        return gm.get_submodule(site.node.target).weight
    w = site.node.args[1] if site.kind == "linear" else site.node.args[2]
    return _get_attr(gm, w.target)


def _site_weight_shape(gm: fx.GraphModule, site) -> tuple[int, ...]:
    shape = tuple(_site_weight(gm, site).shape)
    return shape[::-1] if site.kind == "addmm" else shape


def check_graph_base(plan: Plan, weights: Mapping[str, Any], sites: Mapping[str, Any]) -> None:
    """PlanError when the planned layers' weights a graph holds are not the plan's base model's.

    A graph shows only its own linear weights, so this compares what it can: their shapes with the
    base model's linear shapes, and their contents with the plan's weight fingerprints (the key
    case: a plan made from a dense model applied to a fine-tuned copy, whose tuned weights the
    factors would silently replace). Pass ``allow_mismatch=True`` (``allow_base_mismatch`` for
    the dynamo backend) to apply it anyway.
    """
    from ..core.fingerprint import weights_mismatch

    if not plan.base_model:
        return
    transposed = {k: s[0].kind == "addmm" for k, s in sites.items()}
    why = weights_mismatch(plan.base_model, weights, transposed=transposed)
    if why:
        raise PlanError(
            f"the plan was made from another model: {why}; pass allow_mismatch=True "
            "(torch.compile: options={'allow_base_mismatch': True}) to apply it anyway"
        )


def _get_attr(gm: nn.Module, target: str) -> torch.Tensor:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _drop_unused_attrs(gm: fx.GraphModule) -> None:
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for name, _ in list(gm.named_parameters()) + list(gm.named_buffers()):
        if name in used:
            continue
        owner_name, _, leaf = name.rpartition(".")
        owner = gm.get_submodule(owner_name) if owner_name else gm
        if leaf in owner._parameters:
            del owner._parameters[leaf]
        elif leaf in owner._buffers:
            del owner._buffers[leaf]


def _check_shapes(plan: Plan, shapes: Mapping[str, tuple[int, ...]]) -> None:
    """PlanError naming every planned layer whose weight in the graph has another (d_out, d_in)."""
    bad = []
    for g in plan.factorized_groups:
        for m in g.members:
            shape = shapes.get(m.name)
            if shape is not None and tuple(shape) != (m.d_out, m.d_in):
                bad.append(f"{m.name}: graph weight {tuple(shape)}, plan ({m.d_out}, {m.d_in})")
    if bad:
        raise PlanError(f"the plan does not fit this graph's weights: {'; '.join(bad[:6])}")


def rewrite_exported_program(
    ep: ExportedProgram, plan: Plan, *, up: str = "separate", allow_mismatch: bool = False
) -> ExportedProgram:
    """Return a new ExportedProgram whose planned ``aten.linear`` (and Conv1D ``aten.addmm``)
    nodes are replaced by grouped low-rank pairs. Factors are added as PARAMETER inputs (graph
    signature, state dict and fake ``val`` meta); dense weights that become unused are dropped.
    The input program is not modified. Raises PlanError when the program's planned weights are
    not those of the plan's base model (see :func:`check_graph_base`) unless ``allow_mismatch``."""
    gm = copy_graph_module(ep.graph_module)
    graph = gm.graph
    sig = ep.graph_signature
    param_of = dict(sig.inputs_to_parameters)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    fake_mode = fake_mode_of([n.meta["val"] for n in placeholders if "val" in n.meta])
    state_dict = dict(ep.state_dict)
    new_specs: list[InputSpec] = []

    def weight_name(node: fx.Node) -> str | None:
        return param_of.get(node.name) if node.op == "placeholder" else None

    last_param = max((i for i, s in enumerate(sig.input_specs) if s.kind == InputKind.PARAMETER), default=-1)
    anchor = placeholders[last_param + 1] if last_param + 1 < len(placeholders) else None

    def bind(key: str, tensor: torch.Tensor) -> fx.Node:
        target = f"lord.{key}"
        if target in state_dict:
            raise PlanError(f"the program already has a parameter named {target!r}")
        state_dict[target] = nn.Parameter(tensor.detach().clone(), requires_grad=False)
        ctx = graph.inserting_before(anchor) if anchor is not None else graph.inserting_after(placeholders[-1])
        with ctx:
            node = graph.placeholder(_attr_name(key))
        node.meta["val"] = fake_mode.from_tensor(state_dict[target], static_shapes=True)
        new_specs.append(InputSpec(InputKind.PARAMETER, TensorArgument(name=node.name), target=target))
        return node

    sites = find_sites(graph, weight_name)
    shapes, weights = {}, {}
    for layer, site in sites.items():
        t = state_dict.get(f"{layer}.weight")
        if t is not None:
            shapes[layer] = tuple(t.shape)[::-1] if site[0].kind == "addmm" else tuple(t.shape)
            weights[layer] = t
    _check_shapes(plan, shapes)
    if not allow_mismatch:
        check_graph_base(plan, weights, sites)
    used_before = {n for n in placeholders if n.users}
    factorize_linears(graph, plan, sites, bind, up=up)
    share_bottlenecks(graph)
    for node in used_before:  # dense weights the rewrite made dead
        if not node.users and node.name in param_of:
            graph.erase_node(node)

    # Signature: old specs whose placeholder survived, the new parameters after the last old one.
    alive = {n.name for n in graph.nodes if n.op == "placeholder"}
    old_specs = [s for s in sig.input_specs if not isinstance(s.arg, TensorArgument) or s.arg.name in alive]
    cut = next((i for i, s in enumerate(old_specs) if s.kind != InputKind.PARAMETER), len(old_specs))
    input_specs = old_specs[:cut] + new_specs + old_specs[cut:]
    dropped = [s.target for s in sig.input_specs if s not in old_specs]
    for target in dropped:
        if target is not None and not any(s.target == target for s in input_specs):
            state_dict.pop(target, None)
    _reorder_placeholders(graph, input_specs)
    graph.lint()
    gm.recompile()
    new_sig = ExportGraphSignature(input_specs=input_specs, output_specs=_output_specs(graph, sig.output_specs))
    out = ExportedProgram(
        root=gm,
        graph=graph,
        graph_signature=new_sig,
        state_dict=state_dict,
        range_constraints=ep.range_constraints,
        module_call_graph=ep.module_call_graph,
        example_inputs=ep.example_inputs,
        constants=ep.constants,
        verifiers=[ep.verifier],
    )
    log.debug("exported program: %d dense parameter(s) dropped", len(dropped))
    return out


def _output_specs(graph: fx.Graph, specs: list) -> list:
    """Output specs naming the graph's current output nodes (a rewritten linear may be an output)."""
    outs = torch.utils._pytree.tree_leaves(graph.output_node().args[0])
    if len(outs) != len(specs):
        return list(specs)
    fixed = []
    for spec, node in zip(specs, outs, strict=True):
        if isinstance(spec.arg, TensorArgument) and isinstance(node, fx.Node) and spec.arg.name != node.name:
            spec = dataclasses.replace(spec, arg=TensorArgument(name=node.name))
        fixed.append(spec)
    return fixed


def _reorder_placeholders(graph: fx.Graph, input_specs: list[InputSpec]) -> None:
    """Placeholders must appear in the order of the signature's input specs."""
    by_name = {n.name: n for n in graph.nodes if n.op == "placeholder"}
    order = [by_name[s.arg.name] for s in input_specs if s.arg.name in by_name]
    first_other = next(n for n in graph.nodes if n.op != "placeholder")
    for node in order:
        first_other.prepend(node)


def export_lord(
    model: nn.Module,
    plan: Plan,
    args: tuple = (),
    kwargs: dict[str, Any] | None = None,
    *,
    dynamic_shapes: Any = None,
    up: str = "separate",
    allow_mismatch: bool = False,
) -> ExportedProgram:
    """``torch.export`` a DENSE model (non-strict) and rewrite it with ``plan``.

    ``dynamic_shapes`` follows ``torch.export.export``. For transformers models, pass
    ``use_cache=False`` in ``kwargs`` (or set it in the config) to export logits only; HF's
    vmap-based causal mask is swapped for its export-friendly form (see DESIGN.md) so the
    program can be saved with ``torch.export.save``. ``allow_mismatch``: see
    :func:`rewrite_exported_program`.
    """
    with export_friendly_masks():
        ep = torch.export.export(model, args, kwargs or {}, dynamic_shapes=dynamic_shapes, strict=False)
    return rewrite_exported_program(ep, plan, up=up, allow_mismatch=allow_mismatch)


class export_friendly_masks:
    """Use transformers' non-vmap sdpa mask while exporting (the vmap one cannot be serialized)."""

    def __enter__(self) -> None:
        self._restore = None
        try:
            from transformers import masking_utils
            from transformers.integrations.executorch import sdpa_mask_without_vmap
        except ImportError:
            return
        registry = masking_utils.ALL_MASK_ATTENTION_FUNCTIONS
        self._restore = registry._global_mapping.get("sdpa")
        registry._global_mapping["sdpa"] = sdpa_mask_without_vmap
        self._registry = registry

    def __exit__(self, *exc: object) -> None:
        if self._restore is not None:
            self._registry._global_mapping["sdpa"] = self._restore
