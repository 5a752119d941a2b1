"""PEFT LoRA on LoRD models: the target names users already write, one bottleneck, exact merges.

What works (PEFT ≥ 0.21, no extra call beyond ``import lord_export``)::

    model = lord_export.load(d)                       # or compress(...) in memory
    peft_model = get_peft_model(model, LoraConfig(target_modules=["q_proj", "gate_proj", "down_proj"]))
    ...train...
    merged = peft_model.merge_and_unload()            # a LoRD model of the SAME ranks and structure
    lord_export.save_compressed(merged, plan, out)    # load / FX pass / ONNX export as before

Design. A member ``q_proj`` is a ``LordLinear``: y = h Aᵀ + b with h = x Bᵀ shared by the group.
LoRA belongs on the up-projection A, whose INPUT is h (rank r), so the adapter is
ΔA = lora_B · lora_A · scaling (d_out × r) and merges into A exactly, with no change of rank and
without touching the shared B. :class:`LordLoraLinear` (a subclass of PEFT's ``lora.Linear``, so it
inherits PEFT's adapter bookkeeping, merge/unmerge, delta-weight, scaling, dropout, saving) does
exactly that: its ``in_features`` is r, its forward takes the group's bottleneck once through the
shared cache, h = B.shared(x), and returns ``A.project(h) + lora_B(lora_A(dropout(h))) · scaling``.

Why not the alternatives (read in PEFT 0.21.2's source):

* (a) factors as plain ``nn.Linear`` modules that PEFT wraps natively: PEFT's ``lora.Linear``
  feeds the wrapped module's INPUT to ``lora_A``; the module users target, ``q_proj``, is called by
  the transformers attention code with x (d_in), never with h. Wrapping it natively gives a
  d_out × d_in delta that cannot merge into rank-r factors (only by raising the rank to r + lora_r
  and un-sharing B). Making h the input of ``q_proj`` would need rewriting every architecture's
  attention/MLP forward, and renames state-dict entries the saved models and graph passes use.
* (b) PEFT's custom-module mechanism, ``LoraConfig._register_custom_module({LordLinear: ...})``
  (experimental), is PER CONFIG and not serialized: every user config needs the extra call, and
  ``PeftModel.from_pretrained(model, adapter_dir)`` rebuilds the config from JSON without it, so a
  saved adapter does not reload unless the user also passes a registered ``config=``. PEFT has no
  global registry for LoRA layer types (``dispatch_default`` is a fixed isinstance chain).
  :func:`register_lora` still does this per-config registration for those who opt out of the hook.
* (c) chosen: the class of (b), applied globally. :mod:`lord_export.integrations.peft_hook` wraps PEFT's
  ``LoraModel._create_new_module`` (a static method; the one place every LoRA target passes
  through, including ``PeftModel.from_pretrained``) so that LoRD targets go to
  :func:`dispatch_lord` and everything else to PEFT unchanged. ``import lord_export`` does not
  import PEFT: the wrap happens when PEFT's LoRA model module loads (one-shot import hook) or at
  once if PEFT is already loaded. Cost: it relies on a private PEFT name; if a future PEFT renames
  it, :func:`dispatch_lord` is not reached, PEFT raises its usual "not supported" error, and
  :func:`register_lora` (public-ish, documented as experimental) still works.

Limits: plain LoRA only (DoRA and the other variants are refused by PEFT's variant resolution on
this layer); ``target_modules="all-linear"`` selects only dense ``nn.Linear``/``Conv1D`` layers
(PEFT's own rule), so name LoRD members explicitly; ``target_parameters`` on LoRD weights is left
to PEFT's ``ParamWrapper``. The shared bottlenecks B are frozen by LoRA (train them with
``mode="factors"`` healing instead).
"""

from __future__ import annotations

from typing import Any

import torch
from peft import LoraConfig
from peft.tuners.lora import layer as lora_layer
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ..core.modules import LordLinear
from ..core.plan import BOTTLENECKS_ATTR

__all__ = ["LordLoraLinear", "LORA_CUSTOM_MODULES", "dispatch_lord", "register_lora"]


class LordLoraLinear(lora_layer.Linear):
    """LoRA on the up-projection of a ``LordLinear``: the adapter reads the shared bottleneck h (rank r)."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LoraConfig, **kwargs: Any) -> None:
        kwargs.pop("is_target_conv_1d_layer", None)
        super().__init__(base_layer, adapter_name, config, **kwargs)
        # The factor A is (d_out, r) even where the dense layer was a transposed Conv1D (GPT-2): never
        # transpose. A config's fan_in_fan_out=True still applies to the dense Conv1D layers it targets.
        self.fan_in_fan_out = False

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        return module.rank, module.out_features

    @property
    def lora_variants(self):
        return {(): None}  # plain LoRA; PEFT refuses DoRA & co. on this layer with its own message

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self._check_forward_args(x, *args, **kwargs)
        adapter_names = kwargs.pop("adapter_names", None)
        for key in lora_layer.VARIANT_KWARG_KEYS:
            kwargs.pop(key, None)
        if args or kwargs:
            raise TypeError(f"LoRD layers take one input tensor, got extra arguments {list(kwargs) or len(args)}")
        base: LordLinear = self.get_base_layer()
        if self.disable_adapters and self.merged:
            self.unmerge()
        h = base.bottleneck.shared(x)  # once per group and forward, through the group's cache
        result = base.project(h)
        if self.disable_adapters or self.merged:
            return result
        out_dtype = result.dtype
        if adapter_names is not None:
            for adapter in set(adapter_names):
                if adapter == "__base__" or adapter not in self.lora_A:
                    continue
                rows = [i for i, name in enumerate(adapter_names) if name == adapter]
                delta = self._lora(adapter, h[rows])
                result[rows] += delta.to(out_dtype)
            return result
        for adapter in self.active_adapters:
            if adapter in self.lora_A:
                result = result + self._lora(adapter, h)
        return result.to(out_dtype)

    def _lora(self, adapter: str, h: torch.Tensor) -> torch.Tensor:
        lora_A, lora_B = self.lora_A[adapter], self.lora_B[adapter]
        h = self._cast_input_dtype(h, lora_A.weight.dtype)
        return lora_B(lora_A(self.lora_dropout[adapter](h))) * self.scaling[adapter]


LORA_CUSTOM_MODULES: dict[type[nn.Module], type[nn.Module]] = {LordLinear: LordLoraLinear}


def dispatch_lord(target: nn.Module, adapter_name: str, config: LoraConfig, **kwargs: Any) -> nn.Module | None:
    """A PEFT LoRA dispatcher: a :class:`LordLoraLinear` for a ``LordLinear`` target, else None."""
    base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
    if not isinstance(base, LordLinear) or kwargs.get("parameter_name") is not None:
        return None  # not ours, or target_parameters (PEFT's ParamWrapper handles any parameter)
    custom = getattr(config, "_custom_modules", None) or {}
    if any(cls is not LordLinear and isinstance(base, cls) for cls in custom) or custom.get(LordLinear) not in (
        None,
        LordLoraLinear,
    ):
        return None  # the user mapped LoRD layers to a LoRA layer of their own: PEFT's custom dispatch uses it
    return LordLoraLinear(target, adapter_name, config=config, **kwargs)


def register_lora(config: LoraConfig) -> LoraConfig:
    """Register the LoRD LoRA layer on one ``config`` (PEFT's per-config custom-module API); returns it.

    Needed only with ``LORD_EXPORT_PEFT_HOOK=0`` or a PEFT whose LoRA model the hook cannot patch.
    Also excludes the shared bottlenecks, whose names (``….lord_bottlenecks.down_proj`` for a
    single-member group) would otherwise match a member's target name.
    """
    config._register_custom_module(LORA_CUSTOM_MODULES)
    exclude, targets = config.exclude_modules, config.target_modules
    if isinstance(exclude, str) or (exclude is None and isinstance(targets, str)):
        ours = rf".*\.{BOTTLENECKS_ATTR}\.[^.]+"
        config.exclude_modules = f"(?:{exclude})|(?:{ours})" if exclude else ours
    elif targets is not None and not isinstance(targets, str):
        config.exclude_modules = set(exclude or ()) | {f"{BOTTLENECKS_ATTR}.{t}" for t in targets}
    return config
