"""Teach PEFT's LoRA about LoRD layers once PEFT is imported, without importing PEFT here.

``install()`` runs when :mod:`lord_export` is imported. If ``peft.tuners.lora.model`` is
already loaded it is patched at once; otherwise a one-shot import hook (a ``sys.meta_path`` finder
that answers for that single module name and nothing else) patches it right after PEFT loads it.
The patch wraps ``LoraModel._create_new_module`` so that a target whose base layer is a
``LordLinear`` becomes a :class:`lord_export.peft_support.LordLoraLinear`; every other target, and
every config that maps ``LordLinear`` itself through ``LoraConfig._register_custom_module``, goes
to PEFT's own dispatchers unchanged. It also wraps ``LoraModel._check_target_module_exists`` so
that the shared bottlenecks never match a target: a single-member group's bottleneck is named
``<parent>.lord_bottlenecks.down_proj`` (a saved-model name that must not change), which PEFT's
suffix rule would otherwise match for ``target_modules=["down_proj"]``. The LoRA layer module is
imported only at the first LoRD target, so this file costs nothing for users who never touch PEFT.

Set ``LORD_EXPORT_PEFT_HOOK=0`` to opt out; then register per config with
:func:`lord_export.peft_support.register_lora`.
"""

from __future__ import annotations

import os
import sys
from types import ModuleType

TARGET_MODULE = "peft.tuners.lora.model"
_MARK = "_lord_export_dispatch"


def install() -> None:
    """Patch PEFT now if it is loaded, else arrange to patch it when it is (idempotent)."""
    if os.environ.get("LORD_EXPORT_PEFT_HOOK", "1") == "0":
        return
    from .import_hooks import after_import

    after_import(TARGET_MODULE, patch)


def is_patched() -> bool:
    loaded = sys.modules.get(TARGET_MODULE)
    cls = getattr(loaded, "LoraModel", None)
    return getattr(getattr(cls, "_create_new_module", None), _MARK, False)


def patch(module: ModuleType) -> bool:
    """Wrap ``module.LoraModel._create_new_module``; False where this PEFT has no such static method."""
    cls = getattr(module, "LoraModel", None)
    current = cls.__dict__.get("_create_new_module") if cls is not None else None
    if not isinstance(current, staticmethod) or not callable(getattr(cls, "_check_target_module_exists", None)):
        return False  # an unknown PEFT: leave it alone (PEFT then says "not supported"; see register_lora)
    original = current.__func__
    if getattr(original, _MARK, False):
        return True

    def _create_new_module(lora_config, adapter_name, target, **kwargs):
        from .peft import dispatch_lord  # imports peft; PEFT is fully loaded by now

        new_module = dispatch_lord(target, adapter_name, config=lora_config, **kwargs)
        if new_module is not None:
            return new_module
        return original(lora_config, adapter_name, target, **kwargs)

    check_exists = cls._check_target_module_exists  # a static method in PEFT 0.21 (inherited from BaseTuner)

    def _check_target_module_exists(peft_config, key):
        from ..core.plan import BOTTLENECKS_ATTR

        if key.rpartition(".")[0].rpartition(".")[2] == BOTTLENECKS_ATTR:
            return False  # a LoRD bottleneck: adapters go on the members that read it (see peft_support)
        return check_exists(peft_config, key)

    for new, old in ((_create_new_module, original), (_check_target_module_exists, check_exists)):
        setattr(new, _MARK, True)
        new.__wrapped__ = old  # type: ignore[attr-defined]
        new.__doc__ = old.__doc__
    cls._check_target_module_exists = staticmethod(_check_target_module_exists)
    cls._create_new_module = staticmethod(_create_new_module)
    return True
