"""torch.compile integration: rewrite each dynamo graph with a plan, then hand it to inductor.

``torch.compile(dense_model, backend="lord", options={"plan": PATH})`` works without importing
lord_export (the backend is registered through the ``torch_dynamo_backends`` entry point). Each
graph dynamo produces (one per graph break) gets the planned linears it contains rewritten, and
repeated bottleneck GEMMs of an eager LoRD model merged. The rewrite works on a copy of dynamo's
graph (dynamo keeps its own for guards); the factors become buffers of that copy, which inductor
treats like module parameters (static shapes), so dynamic batch/sequence dims stay dynamic.

Options (all optional except where noted):

* ``plan``: a compressed-model directory, a ``lord_plan.json`` path, or a :class:`Plan` with
  tensors. Without a plan the backend only merges repeated bottlenecks (for eager LoRD models).
* ``backend``: the compiler to hand the rewritten graph to: ``"inductor"`` (default), ``"eager"``
  or any registered dynamo backend name.
* ``inductor_options``: a dict of inductor config patches (what ``options=`` would be for
  ``backend="inductor"``).
* ``up``: ``"separate"`` (default) or ``"concat"`` up-projections.
* ``allow_base_mismatch``: apply the plan even when the compiled model's planned weights are not
  those of the plan's base model (by default a PlanError: e.g. a plan made from the dense model,
  compiled into a fine-tuned copy, would silently replace the tuned weights).

Each graph logs (INFO) how many planned layers it matched. A graph without planned layers is
normal (graph breaks); one whose linears have the planned shapes but none of the planned names
raises PlanError (the plan's layer names do not fit the compiled module, e.g. it was made for the
outer model and an inner one is compiled). Factors are cast to the graph weights' dtype and device.

Pipelines that already call ``torch.compile(..., backend="inductor", options={...})`` switch to
``backend="lord", options={"plan": PATH, "inductor_options": {...}}``, or build the backend
with :func:`make_backend` and pass the callable.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import fx

from ..core.experts import is_expert_layer
from ..core.plan import Plan
from ..errors import PlanError, UsageError
from ..passes.factorize_linears import factorize_linears, find_sites
from ..passes.graph_utils import copy_graph_module, fake_mode_of
from ..passes.share_bottlenecks import share_bottlenecks

log = logging.getLogger(__name__)

_OPTION_KEYS = {"plan", "backend", "inductor_options", "up", "allow_base_mismatch"}
_SOURCE_PART = re.compile(r"\._(?:modules|parameters|buffers)\['([^']+)'\]")


def placeholder_suffix(param_name: str) -> str:
    """How dynamo names the placeholder of ``self.<param_name>``: ``..._modules_a_modules_b_parameters_weight_``."""
    *mods, leaf = param_name.split(".")
    return "".join(f"_modules_{m}" for m in mods) + f"_parameters_{leaf}_"


def parameter_name(node: fx.Node) -> str | None:
    """The dotted parameter name (``layers.0.q_proj.weight``) of a dynamo placeholder, read from
    the source dynamo records for it (``L['self']._modules['layers']…._parameters['weight']``);
    None for inputs that are not module parameters."""
    arg = node.meta.get("grapharg")
    source = getattr(arg, "source", None)
    name = getattr(source, "name", None)
    if callable(name):
        name = name()
    if not isinstance(name, str) or "._parameters[" not in name:
        return None
    return ".".join(_SOURCE_PART.findall(name)) or None


def _match_planned(placeholders: list[fx.Node], plan: Plan) -> dict[fx.Node, str]:
    """Placeholder → planned ``<layer>.weight``: by the parameter name dynamo records (exact, or the
    plan's name as a dotted suffix when an outer module was compiled), else by the placeholder's
    naming scheme (the fallback for sources without a parameter path)."""
    members = {f"{m.name}.weight": m for g in plan.factorized_groups for m in g.members}
    suffixes = {placeholder_suffix(k): k for k in members}
    names: dict[fx.Node, str] = {}
    for node in placeholders:
        param = parameter_name(node)
        if param is not None:
            hit = param if param in members else next((k for k in members if param.endswith("." + k)), None)
        else:
            hit = next((k for suf, k in suffixes.items() if str(node.target).endswith(suf)), None)
        if hit is not None:
            names[node] = hit
    return names


def rewrite_dynamo_graph(
    gm: fx.GraphModule,
    example_inputs: Sequence[Any],
    plan: Plan | None,
    *,
    up: str = "separate",
    allow_base_mismatch: bool = False,
) -> tuple[fx.GraphModule, list[torch.Tensor]]:
    """Rewrite a copy of a dynamo graph (dynamo keeps using its own); return the copy and the
    factor tensors, which are buffers of the copy (``get_attr`` nodes with static fake values:
    AOT autograd lifts them like module parameters, with static shapes)."""
    from .graph import check_graph_base

    gm = copy_graph_module(gm)
    share_bottlenecks(gm.graph)
    extra: list[torch.Tensor] = []
    if plan is None or not plan.factorized_groups:
        gm.recompile()
        return gm, extra
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    real = dict(zip(placeholders, example_inputs, strict=False))
    _refuse_fused_experts(placeholders, real, plan)
    names = _match_planned(placeholders, plan)
    members = {f"{m.name}.weight": m for g in plan.factorized_groups for m in g.members}
    for node, key in names.items():
        _check_real_weight(members[key], real.get(node))
    sites = find_sites(gm.graph, names.get)
    log.info(
        "lord backend: %d of %d planned layer(s) found in this graph (%d call(s))",
        len(sites),
        len(members),
        sum(len(v) for v in sites.values()),
    )
    if not sites:
        _check_naming(gm, placeholders, real, plan)
        gm.recompile()
        return gm, extra
    weights = {key[: -len(".weight")]: real.get(node) for node, key in names.items()}
    if not allow_base_mismatch:
        check_graph_base(plan, {k: v for k, v in weights.items() if k in sites}, sites)
    dense = [w for w in weights.values() if isinstance(w, torch.Tensor)]
    dtype = dense[0].dtype if dense else None
    device = dense[0].device if dense else _device_of(real)
    fake_mode = fake_mode_of([n.meta["example_value"] for n in placeholders if "example_value" in n.meta])

    def bind(key: str, tensor: torch.Tensor) -> fx.Node:
        name = f"lord_factor_{len(extra)}"
        t = tensor.detach().to(device=device, dtype=dtype if tensor.is_floating_point() else None)
        gm.register_buffer(name, t)
        node = gm.graph.get_attr(name)
        if fake_mode is not None:
            node.meta["example_value"] = fake_mode.from_tensor(t, static_shapes=True)
        extra.append(t)
        return node

    # no eliminate_dead_code here: dynamo graphs hold side-effecting ops (e.g. functorch's vmap
    # nesting calls) whose results are unused; the dense weights stay as (now unused) inputs.
    n = factorize_linears(gm.graph, plan, sites, bind, require_all=False, up=up)
    share_bottlenecks(gm.graph)
    gm.graph.lint()
    gm.recompile()
    log.debug("dynamo graph: %d group(s) factorized, %d factor tensor(s) added", n, len(extra))
    return gm, extra


def _refuse_fused_experts(placeholders: list[fx.Node], real: dict, plan: Plan) -> None:
    """PlanError when the plan factorizes MoE experts that this graph holds as transformers 5's fused 3-D
    weights: the pass rewrites linear layers, and those experts are not (:mod:`lord_export.core.experts`)."""
    planned = [m.name for g in plan.factorized_groups for m in g.members if is_expert_layer(m.name)]
    if not planned:
        return
    for node in placeholders:
        name, t = parameter_name(node), real.get(node)
        if name and name.endswith((".gate_up_proj", ".down_proj")) and isinstance(t, torch.Tensor) and t.dim() == 3:
            raise PlanError(
                f"the plan factorizes MoE experts ({planned[0]}, …) that the compiled model holds fused "
                f"({name} {tuple(t.shape)}): the graph pass rewrites linear layers only. Compile the LoRD model "
                "itself instead (model = lord_export.load(DIR); torch.compile(model)), or unfuse the dense "
                "model's experts first (lord_export.core.experts.unfuse_experts(model))"
            )


def _check_naming(gm: fx.GraphModule, placeholders: list[fx.Node], real: dict, plan: Plan) -> None:
    """PlanError when no planned layer was found but the graph has linears of planned shapes whose
    names the plan's base model does not know: the names do not fit. Subgraphs of a graph break
    hold no planned layer, or only layers the base model has and the plan left dense: no error."""
    weight_of = {n: name for n in placeholders if (name := parameter_name(n)) is not None}
    linears = find_sites(gm.graph, lambda n: _as_weight(weight_of[n]) if n in weight_of else None)
    known = set(plan.base_model.get("linears") or {})
    planned: dict[tuple[int, ...], str] = {}
    for g in plan.factorized_groups:
        for m in g.members:
            planned.setdefault((m.d_in, m.d_out) if m.transposed else (m.d_out, m.d_in), m.name)
    same = []
    for name, calls in linears.items():
        w = calls[0].node.args[2] if calls[0].kind == "addmm" else calls[0].node.args[1]
        t = real.get(w)
        if isinstance(t, torch.Tensor) and tuple(t.shape) in planned and name not in known:
            same.append((name, tuple(t.shape)))
    if same:
        graph_name, shape = same[0]
        raise PlanError(
            f"none of the plan's {sum(len(g.members) for g in plan.factorized_groups)} layers is in this graph, "
            f"but it has {len(same)} linear(s) of planned shapes with names the plan does not know (e.g. "
            f"{graph_name} {shape}, like the plan's {planned[shape]}): the plan's layer names do not fit the "
            "compiled module (made for another model, or for an outer/inner module of this one?)"
        )


def _as_weight(name: str) -> str:
    return name if name.endswith(".weight") else f"{name}.weight"


def _device_of(real: dict) -> torch.device:
    for t in real.values():
        if isinstance(t, torch.Tensor) and t.dim() >= 2:
            return t.device
    return torch.device("cpu")


def _check_real_weight(member, tensor: Any) -> None:
    from ..errors import PlanError

    if not isinstance(tensor, torch.Tensor):
        return
    shape = tuple(tensor.shape)
    expected = (member.d_in, member.d_out) if member.transposed else (member.d_out, member.d_in)
    if shape != expected:
        raise PlanError(f"{member.name}: the compiled model's weight is {shape}, the plan expects {expected}")


@functools.lru_cache(maxsize=8)
def _read_plan_cached(path: str) -> Plan:
    from ..persist.io import read_plan

    return read_plan(path)


def resolve_plan(plan: Any) -> Plan | None:
    if plan is None or isinstance(plan, Plan):
        return plan
    if isinstance(plan, (str, Path)):
        return _read_plan_cached(str(Path(plan).absolute()))
    raise UsageError(f"option 'plan' must be a path or a Plan, got {type(plan).__name__}")


def compile_inner(gm: fx.GraphModule, inputs: list, backend: Any, inductor_options: dict | None) -> Callable:
    """Hand the rewritten graph to inductor or another dynamo backend."""
    if backend in (None, "inductor"):
        from torch._inductor.compile_fx import compile_fx

        return compile_fx(gm, inputs, config_patches=inductor_options or {})
    if backend == "eager":
        return gm.forward
    fn = torch._dynamo.lookup_backend(backend) if isinstance(backend, str) else backend
    return fn(gm, inputs)


def lord_backend(gm: fx.GraphModule, example_inputs: list, *, options: dict | None = None, mode: Any = None):
    """The ``lord`` dynamo backend (see the module docstring for options)."""
    options = dict(options or {})
    unknown = set(options) - _OPTION_KEYS
    if unknown:
        raise UsageError(f"unknown option(s) {sorted(unknown)} for backend 'lord'; known: {sorted(_OPTION_KEYS)}")
    plan = resolve_plan(options.get("plan"))
    gm, _ = rewrite_dynamo_graph(
        gm,
        example_inputs,
        plan,
        up=options.get("up", "separate"),
        allow_base_mismatch=bool(options.get("allow_base_mismatch", False)),
    )
    return compile_inner(gm, list(example_inputs), options.get("backend"), options.get("inductor_options"))


def make_backend(**options: Any) -> Callable:
    """A backend callable with ``options`` bound: ``torch.compile(model, backend=make_backend(plan=PATH))``."""
    watch_whole_module_compiles()
    return functools.partial(lord_backend, options=options)


def compile_model(
    model: torch.nn.Module,
    plan: Any = None,
    *,
    allow_base_mismatch: bool = False,
    up: str = "separate",
    backend: Any = None,
    inductor_options: dict | None = None,
    **compile_kwargs: Any,
) -> torch.nn.Module:
    """Compile ``model``'s forward with the LoRD graph pass, so ``model(...)``, ``model.generate(...)`` and
    pipelines all run the factorized graph; returns ``model`` (changed in place: its ``forward`` is the
    compiled one).

    ``plan``: a LoRD directory, a ``lord_plan.json`` or a :class:`Plan` (None: an eager LoRD model's
    repeated bottlenecks are merged). ``compile_kwargs`` go to ``torch.compile`` (``dynamic=True``,
    ``mode=...``). The plan is checked against the model at once (a fine-tuned copy of the base model
    is refused unless ``allow_base_mismatch``), not at the first call.

    Why not ``torch.compile(model, backend="lord")``: that returns a wrapper whose ``generate`` is the
    original model's, which calls the UNcompiled forward - the dense model. lord_export warns once when
    that happens (:func:`watch_whole_module_compiles`).
    """
    from ..core.apply import check_base_model

    resolved = resolve_plan(plan)
    if resolved is not None and not allow_base_mismatch:
        layers = [m.name for g in resolved.factorized_groups for m in g.members]
        modules = dict(model.named_modules())
        if all(n in modules for n in layers):  # a plan for this module (else the backend says what does not fit)
            check_base_model(model, resolved, weights=True)
    options = {"plan": resolved, "up": up, "allow_base_mismatch": allow_base_mismatch}
    if backend is not None:
        options["backend"] = backend
    if inductor_options:
        options["inductor_options"] = inductor_options
    model.forward = torch.compile(model.forward, backend=make_backend(**options), **compile_kwargs)
    return model


_WARNED: set[str] = set()


def watch_whole_module_compiles() -> None:
    """Warn once when a module compiled whole with the lord backend runs its uncompiled forward.

    ``torch.compile(model, backend="lord")`` returns torch's ``OptimizedModule``; its ``generate`` (and
    any other method but ``__call__``/``forward``) is the original model's, which calls the original,
    uncompiled forward: the dense model runs, silently. A module-registration hook (a public torch
    hook, called for every submodule registered anywhere) notices each ``OptimizedModule`` taking its
    ``_orig_mod`` and gives that module a forward pre-hook; the hook warns (once per process) when
    the module runs outside compiled code while its wrapper was compiled with the lord backend.
    """
    if "installed" in _WARNED:
        return
    _WARNED.add("installed")
    import weakref

    def on_register(module: Any, name: str, submodule: Any) -> None:
        if name != "_orig_mod" or type(module).__name__ != "OptimizedModule" or submodule is None:
            return
        wrapper = weakref.ref(module)

        def pre_hook(mod: Any, args: Any) -> None:
            if "generate" in _WARNED or torch.compiler.is_compiling():
                return
            outer = wrapper()
            if outer is not None and _compiled_with_lord(outer):
                _WARNED.add("generate")
                log.warning(
                    "a model compiled whole with torch.compile(model, backend='lord') is running its UNcompiled "
                    "forward (model.generate() and other methods of the compiled wrapper call the original model): "
                    "this runs the dense model, not LoRD. Compile the forward instead: lord_export.compile(model, "
                    "plan) (or model.forward = torch.compile(model.forward, backend='lord', options=...))"
                )

        submodule.register_forward_pre_hook(pre_hook)

    torch.nn.modules.module.register_module_module_registration_hook(on_register)


def _compiled_with_lord(wrapper: Any) -> bool:
    """Whether torch's ``OptimizedModule`` ``wrapper`` compiles with the lord backend (read from the
    backend chain dynamo keeps: ``_torchdynamo_orig_backend`` / ``compiler_fn``)."""
    fn = getattr(getattr(wrapper, "dynamo_ctx", None), "callback", None)
    for _ in range(8):
        if fn is None:
            return False
        if getattr(fn, "compiler_name", None) == "lord" or fn is lord_backend:
            return True
        if isinstance(fn, functools.partial) and fn.func is lord_backend:
            return True
        fn = getattr(fn, "_torchdynamo_orig_backend", None) or getattr(fn, "compiler_fn", None)
    return False
