"""Loading LoRD directories through transformers' ``from_pretrained`` (a registered "quantizer").

A LoRD directory's ``config.json`` carries ``"quantization_config": {"quant_method": "lord_export", ...}``
holding the compact structure of the plan (per factorized group: parent module, rank, input
size, members). transformers looks ``quant_method`` up in its registry of quantization configs
and quantizers; ``register()`` adds ours, so that after ``import lord_export``::

    AutoModelForCausalLM.from_pretrained(lord_dir)      # or AutoModel, pipeline(...)

builds the dense skeleton on the meta device, lets :class:`LordHfQuantizer` swap in the LoRD
modules (``apply_plan(..., load_tensors=False)``) before the weights load, and loads the factors
like any other weights. The structure lives in the config itself (not only in ``lord_plan.json``)
because a quantizer never learns the directory it loads from, and because ``save_pretrained``
rewrites ``config.json`` (keeping the structure) but writes no ``lord_plan.json``.

This module imports transformers only inside :func:`register` (and the classes are built then):
``import lord_export`` must stay light. :func:`install_import_hook` (called by
``lord_export/__init__.py``) registers at once when transformers' quantizer registry is already
imported, and otherwise the moment it is imported (a ``sys.meta_path`` finder that only watches
``transformers.quantizers.auto``), so the import order of ``lord_export`` and ``transformers``
does not matter.

The conversions between a plan and its ``quantization_config`` live beside the plan's data model
(:mod:`lord_export.core.plan`); they need neither transformers nor a model.

Run with transformers 4.57.6 and 5.24.0 (see ``tests/test_from_pretrained.py``); 4.45-4.49 read
from their sources only (no ``register_*`` functions before 4.50: :func:`register` then fills
the same two mappings those functions fill; ``check_quantized_param`` instead of
``param_needs_quantization``; ``is_serializable``/``is_trainable`` read as properties). The
HfQuantizer API differs between them (4.x: both ``_process_model_*`` hooks abstract,
``is_serializable(safe_serialization)``, ``modules_to_not_convert`` kwarg; 5.x: only
``is_serializable()`` and ``is_trainable`` abstract, ``preprocess_model(dtype=, checkpoint_files=)``);
the class below defines every method either version requires, with signatures both accept.
"""

from __future__ import annotations

import json
import logging
import threading
from typing import Any

from ..core.plan import FORMAT_VERSION, QUANT_METHOD, QUANT_METHODS, plan_from_quantization_config
from ..errors import LordError

log = logging.getLogger(__name__)
_HOOK_TARGET = "transformers.quantizers.auto"
_CLASS_NAMES = ("LordQuantizationConfig", "LordHfQuantizer")
_lock = threading.RLock()
_classes: dict[str, type] = {}


class QuantMethod(str):
    """The method name as transformers reads it: a string that also has the ``.value`` of the enum
    members transformers' own configs use (transformers < 4.50 reads ``quant_method.value``)."""

    @property
    def value(self) -> str:
        return str(self)


# --------------------------------------------------------------------------- transformers classes
def _build_classes() -> dict[str, type]:
    """The config and quantizer classes, defined here because their bases are transformers classes
    (imported only on registration); one function holds both class bodies, hence its length."""

    from transformers.quantizers.base import HfQuantizer
    from transformers.utils.quantization_config import QuantizationConfigMixin

    class LordQuantizationConfig(QuantizationConfigMixin):
        """transformers' view of a LoRD plan: the compact structure stored in config.json."""

        def __init__(
            self,
            groups: list[dict[str, Any]] | None = None,
            format_version: int = FORMAT_VERSION,
            lord_export_version: str | None = None,
            lord_config: dict[str, Any] | None = None,
            **kwargs: Any,
        ) -> None:
            kwargs.pop("quant_method", None)
            self.quant_method = QuantMethod(QUANT_METHOD)
            self.format_version = format_version
            self.lord_export_version = lord_export_version
            self.lord_config = dict(lord_config or {})
            self.groups = list(groups or [])
            self.post_init()

        def post_init(self) -> None:
            plan_from_quantization_config(self.to_dict())  # validate early, with lord_export's message

        def to_dict(self) -> dict[str, Any]:
            return {
                "quant_method": QUANT_METHOD,
                "format_version": self.format_version,
                "lord_export_version": self.lord_export_version,
                "lord_config": dict(self.lord_config),
                "groups": json.loads(json.dumps(self.groups)),
            }

        def to_diff_dict(self) -> dict[str, Any]:  # 4.x to_json_string(use_diff=True) calls it
            return self.to_dict()

        def get_loading_attributes(self) -> dict[str, Any]:
            return {}

    class LordHfQuantizer(HfQuantizer):
        """Swaps in the LoRD modules of the plan on the meta skeleton; weights then load as usual.

        Nothing is quantized: LoRD factors are ordinary floating-point weights in the model's
        dtype. After loading, ``model.is_quantized`` is set back to False so that ``.half()``,
        ``.float()`` and ``Trainer`` treat the model like any dense model (transformers refuses
        those for quantized models); ``model.hf_quantizer`` stays, so ``save_pretrained`` keeps
        the quantization_config.
        """

        requires_calibration = True  # a LoRD model can only be loaded pre-compressed
        requires_parameters_quantization = False  # 4.x: weights load as plain tensors
        required_packages = ["lord_export"]

        def __init__(self, quantization_config: Any, **kwargs: Any) -> None:
            super().__init__(quantization_config, **kwargs)
            self.plan = plan_from_quantization_config(quantization_config)

        def validate_environment(self, *args: Any, **kwargs: Any) -> None:
            if kwargs.get("from_tf") or kwargs.get("from_flax"):
                raise ValueError("LoRD models load from PyTorch (safetensors) weights only")

        def update_dtype(self, dtype: Any) -> Any:
            return dtype

        def param_needs_quantization(self, model: Any, param_name: str, **kwargs: Any) -> bool:
            return False

        def check_quantized_param(self, *args: Any, **kwargs: Any) -> bool:  # 4.4x name of the above
            return False

        def _process_model_before_weight_loading(self, model: Any, **kwargs: Any) -> Any:
            from ..core.apply import apply_plan

            apply_plan(model, self.plan, load_tensors=False, allow_mismatch=True)  # built from the LoRD config
            return model

        def _process_model_after_weight_loading(self, model: Any, **kwargs: Any) -> Any:
            model.is_quantized = False
            return model

        def is_serializable(self, safe_serialization: Any = None) -> bool:
            return True

        @property
        def is_trainable(self) -> bool:
            return True

        @property
        def is_qat_trainable(self) -> bool:
            return True

    out = {"LordQuantizationConfig": LordQuantizationConfig, "LordHfQuantizer": LordHfQuantizer}
    for name, cls in out.items():  # picklable: found again as lord_export.hf_quantizer.<name>
        cls.__module__, cls.__qualname__ = __name__, name
    return out


def __getattr__(name: str) -> Any:
    if name in _CLASS_NAMES:
        with _lock:
            if not _classes:
                _classes.update(_build_classes())
        return _classes[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def register() -> None:
    """Register the LoRD quantization config and quantizer with transformers under every name lord_export
    reads (:data:`~lord_export.core.plan.QUANT_METHODS`; idempotent)."""
    from transformers.quantizers import auto

    with _lock:
        config_cls = __getattr__("LordQuantizationConfig")
        quantizer_cls = __getattr__("LordHfQuantizer")
        registries = (
            (auto.AUTO_QUANTIZATION_CONFIG_MAPPING, config_cls, getattr(auto, "register_quantization_config", None)),
            (auto.AUTO_QUANTIZER_MAPPING, quantizer_cls, getattr(auto, "register_quantizer", None)),
        )
        for method in QUANT_METHODS:
            for mapping, cls, decorator in registries:
                present = mapping.get(method)
                if present is cls:
                    continue
                if present is not None and getattr(present, "__module__", None) != __name__:
                    raise LordError(
                        f"transformers already has a quantization method {method!r} ({present!r}) "
                        "that is not lord_export's"
                    )
                mapping.pop(method, None)  # ours from an earlier build (e.g. a reloaded module)
                if decorator is not None:
                    decorator(method)(cls)
                else:  # transformers < 4.50 has no register_* functions; they only add to these mappings
                    mapping[method] = cls


def install_import_hook() -> None:
    """Register now if transformers' quantizer registry is imported, else as soon as it is."""
    from .import_hooks import after_import

    after_import(_HOOK_TARGET, lambda module: register())
