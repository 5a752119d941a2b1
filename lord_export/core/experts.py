"""Mixture-of-experts layers: expert weights as ordinary linear layers, routers left alone.

transformers 4.x stores a layer's experts as an ``nn.ModuleList`` of small MLPs made of
``nn.Linear``; LoRD sees them as linears already. transformers 5 fuses them into one module holding
3-D parameters (``gate_up_proj`` (E, 2I, H), ``down_proj`` (E, H, I)) whose forward is dispatched
at run time (eager loop, ``grouped_mm``, ``batched_mm``). :func:`unfuse_experts` replaces each such
module by :class:`PerExpertMLPs`: the same weights as one MLP of three ``nn.Linear`` per expert, with
the fused module's call signature ``(hidden_states, top_k_index, top_k_weights)`` and its eager
semantics (the routing weight applied after ``down_proj``), so that the model's own router and
combination run unchanged and every later stage (targets, calibration on each expert's routed
tokens, factorization, LoRD modules, saving and loading) treats experts like any linear layer.
transformers does the same for quantizers that need per-expert linears (its ``Sequential*Experts``).

Only the standard fused layout is recognized (concatenated ``[gate; up]``, ``nn.Linear``
orientation, no biases, ``act(gate) * up``); other 3-D expert parameters (GPT-OSS's interleaved,
transposed, biased experts; Llama4; DBRX) are reported by :func:`unrecognized_expert_weights` and
left dense.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator

import torch
from torch import nn

log = logging.getLogger(__name__)

#: leaf names of the linears of one unfused expert (those of the 4.x per-expert layout of Qwen/DeepSeek/OLMoE)
GATE, UP, DOWN = "gate_proj", "up_proj", "down_proj"
#: the same roles in other per-expert checkpoints (Mixtral, PhiMoE: w1 = gate, w3 = up, w2 = down)
_ALIASES = {GATE: (GATE, "w1"), UP: (UP, "w3"), DOWN: (DOWN, "w2")}
#: MoE blocks renamed between the lines (Mixtral/PhiMoE 4.x ``block_sparse_moe`` is ``mlp`` in 5.x)
_BLOCK_ALIASES = (("mlp", "block_sparse_moe"), ("block_sparse_moe", "mlp"))
#: router layers: they choose the experts, so they stay dense (never a target of a preset)
ROUTER_NAMES = frozenset({"gate", "router", "shared_expert_gate"})

_EXPERT_LAYER = re.compile(r"(^|\.)experts\.\d+\.[^.]+$")
_EXPERT_PARAM = re.compile(r"^(?P<block>.*)\.experts\.(?P<e>\d+)\.(?P<leaf>[^.]+)\.weight$")


class ExpertMLP(nn.Module):
    """One expert: ``down(act(gate(x)) * up(x))`` with three bias-free ``nn.Linear``."""

    def __init__(self, hidden: int, intermediate: int, act_fn: nn.Module, *, device=None, dtype=None) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False, device=device, dtype=dtype)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False, device=device, dtype=dtype)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False, device=device, dtype=dtype)
        self.act_fn = act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class PerExpertMLPs(nn.ModuleList):
    """A layer's experts, one :class:`ExpertMLP` each, called like transformers 5's fused experts:
    ``forward(hidden_states (T, H), top_k_index (T, k), top_k_weights (T, k)) -> (T, H)``.

    Each expert runs on exactly the tokens routed to it; its output is scaled by the routing weight
    and summed per token, as the fused module's eager implementation does. Indices outside
    ``[0, num_experts)`` (the expert-parallel sentinel) are ignored.
    """

    def __init__(self, experts: list[ExpertMLP]) -> None:
        super().__init__(experts)
        self.num_experts = len(experts)

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        for e in top_k_index.unique().tolist():
            if not 0 <= e < self.num_experts:
                continue
            tokens, slot = torch.where(top_k_index == e)
            y = self[e](hidden_states[tokens]) * top_k_weights[tokens, slot, None]
            out.index_add_(0, tokens, y.to(out.dtype))
        return out


def is_fused_experts(module: nn.Module) -> bool:
    """Whether ``module`` is transformers 5's fused experts in the standard layout (see the module doc)."""
    down, gate_up = getattr(module, "down_proj", None), getattr(module, "gate_up_proj", None)
    if not (isinstance(down, nn.Parameter) and isinstance(gate_up, nn.Parameter)):
        return False
    if down.dim() != 3 or gate_up.dim() != 3:
        return False
    standard = (
        getattr(module, "has_gate", False)
        and getattr(module, "is_concatenated", True)
        and not getattr(module, "is_transposed", True)
        and not getattr(module, "has_bias", True)
        and not getattr(module, "has_post_expert_norm", False)
        and _default_gate(module)
    )
    e, two_i, h = gate_up.shape
    return bool(standard) and two_i % 2 == 0 and tuple(down.shape) == (e, h, two_i // 2)


def _default_gate(module: nn.Module) -> bool:
    try:
        from transformers.integrations.moe import _default_apply_gate
    except Exception:  # another transformers line: no fused experts there
        return False
    return getattr(type(module), "_apply_gate", None) is _default_apply_gate


def fused_experts(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(name, module) of every recognized fused experts module of ``model``."""
    for name, module in model.named_modules():
        if is_fused_experts(module):
            yield name, module


def unfuse_experts(model: nn.Module) -> list[str]:
    """Replace every recognized fused experts module of ``model`` by :class:`PerExpertMLPs` holding
    the same weights (in place; meta tensors stay on the meta device). Returns the replaced names."""
    replaced = []
    for name, fused in list(fused_experts(model)):
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        parent._modules[leaf] = per_expert_copy(fused)
        replaced.append(name)
    return replaced


def per_expert_copy(fused: nn.Module) -> PerExpertMLPs:
    """A :class:`PerExpertMLPs` with the weights of ``fused`` (copied; meta stays meta)."""
    gate_up, down = fused.gate_up_proj, fused.down_proj
    e, two_i, h = gate_up.shape
    i = two_i // 2
    kw = dict(device=gate_up.device, dtype=gate_up.dtype)
    experts = [ExpertMLP(h, i, fused.act_fn, **kw) for _ in range(e)]
    if not gate_up.is_meta:
        with torch.no_grad():
            for k, mlp in enumerate(experts):
                mlp.gate_proj.weight.copy_(gate_up[k, :i])
                mlp.up_proj.weight.copy_(gate_up[k, i:])
                mlp.down_proj.weight.copy_(down[k])
    for mlp in experts:
        for p in mlp.parameters():
            p.requires_grad_(gate_up.requires_grad)
    return PerExpertMLPs(experts)


def is_expert_layer(name: str) -> bool:
    """Whether linear layer ``name`` belongs to one expert (``….experts.<e>.<linear>``): it sees only
    the tokens routed to that expert."""
    return _EXPERT_LAYER.search(name) is not None


def is_router(name: str, model_modules: dict[str, nn.Module]) -> bool:
    """Whether linear ``name`` is a router: named like one and beside an ``experts`` module."""
    parent, _, leaf = name.rpartition(".")
    return leaf in ROUTER_NAMES and f"{parent}.experts" in model_modules if parent else False


def renamed_blocks(name: str) -> list[str]:
    """``name`` under the MoE block's other name (transformers 5 loads Mixtral/PhiMoE checkpoints'
    ``block_sparse_moe`` as ``mlp`` and writes them back under the old name)."""
    return [name.replace(f".{a}.", f".{b}.") for a, b in _BLOCK_ALIASES if f".{a}." in name]


def checkpoint_candidates(name: str) -> list[tuple[str, tuple[int, int] | None, int | None]]:
    """Where a checkpoint may hold the unfused expert weight ``name`` (``….experts.<e>.<leaf>.weight``):
    a list of (checkpoint key, row slice or None, expert index or None), best first.

    Per-expert keys (4.x layout, and transformers 5's default ``save_pretrained``) under the leaf's
    aliases and the block's other name; then the fused 3-D keys (``save_original_format=False``), sliced.
    """
    m = _EXPERT_PARAM.match(name)
    if m is None or m["leaf"] not in _ALIASES:
        return []
    block, e, leaf = m["block"], int(m["e"]), m["leaf"]
    blocks = [block] + [b[:-1] for b in renamed_blocks(block + ".")]
    out: list[tuple[str, tuple[int, int] | None, int | None]] = []
    for b in blocks:
        out += [(f"{b}.experts.{e}.{alias}.weight", None, None) for alias in _ALIASES[leaf]]
    for b in blocks:
        fused = f"{b}.experts.{'down_proj' if leaf == DOWN else 'gate_up_proj'}"
        half = {GATE: (0, 1), UP: (1, 2)}.get(leaf)
        out.append((fused, half, e))
    return out


def expert_slice(t: torch.Tensor, half: tuple[int, int] | None, e: int | None) -> torch.Tensor:
    """The part of checkpoint tensor ``t`` that a :func:`checkpoint_candidates` entry names."""
    if e is None:
        return t
    t = t[e]
    if half is not None:
        rows = t.shape[0] // 2
        t = t[half[0] * rows : half[1] * rows]
    return t


def unrecognized_expert_weights(model: nn.Module) -> dict[str, int]:
    """3-D (or higher) parameters of ``model`` outside any module lord_export can factorize: expert
    weights in a layout it does not recognize (GPT-OSS, Llama4, DBRX, …), by name, with their sizes."""
    out: dict[str, int] = {}
    for mname, module in model.named_modules():
        if isinstance(module, nn.Embedding | nn.Linear | PerExpertMLPs) or is_fused_experts(module):
            continue
        if "expert" not in mname.rsplit(".", 1)[-1].lower() and "expert" not in type(module).__name__.lower():
            continue  # e.g. a convolution's 4-D kernel: not an expert weight
        for pname, p in module.named_parameters(recurse=False):
            if p.dim() >= 3:
                out[f"{mname}.{pname}" if mname else pname] = p.numel()
    return out


def prepare_experts(model: nn.Module) -> tuple[list[str], str | None]:
    """Before compressing ``model``: unfuse its recognized fused experts (:func:`unfuse_experts`) and
    check for expert weights in a layout lord_export does not recognize. Returns the unfused module
    names and a warning (logged too) naming unrecognized expert parameters and their share of the
    model's parameters, or None."""
    replaced = unfuse_experts(model)
    unknown = unrecognized_expert_weights(model)
    if not unknown:
        return replaced, None
    total = sum(p.numel() for p in model.parameters())
    share = sum(unknown.values()) / max(total, 1)
    names = list(unknown)
    shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
    msg = (
        f"expert weights in a layout lord_export does not recognize stay dense: {shown} "
        f"({share:.1%} of the model's parameters); only transformers' standard fused experts "
        "(concatenated gate/up, no bias) and per-expert nn.Linear layers are compressed"
    )
    log.warning(msg)
    return replaced, msg
