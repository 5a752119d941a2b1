"""lord_export: LoRD (activation-aware low-rank decomposition) for models you export and compile.

Phased API::

    layers = select_targets(model, ("all",))
    calibration = calibrate(model, batches, layers)             # heavy, once
    plan = make_plan(model, calibration, layers, LordConfig(rank_reduction=0.3))
    apply_plan(model, plan)                                      # cheap module swap, in place

or all three at once with :func:`compress`; save with :func:`save_compressed`, reload with
:func:`load`. Importing this package does not import transformers, onnx or CUDA.
"""

from . import _compat
from ._version import __version__
from .calibration.statistics import Calibration, calibrate
from .config import LordConfig
from .core.apply import apply_plan, check_plan_fits
from .core.modules import LordBottleneck, LordLinear
from .core.plan import Group, Member, Plan
from .core.targets import PRESETS, select_targets
from .errors import CalibrationError, InputError, LordError, PlanError, TargetError, UsageError
from .export.dynamo import compile_model as compile
from .integrations import peft_hook as _peft_hook
from .integrations import transformers as _transformers
from .persist.io import load, load_model_dir, read_plan, save_compressed
from .pipeline.compress import compress
from .pipeline.model_dir import compress_model_dir
from .pipeline.planner import make_plan

# lord_export 0.1's flat module paths (lord_export.io, lord_export.hf, ...) still import, with a warning
_compat.install()
# transformers' from_pretrained loads LoRD directories: the "lord" quantizer is registered when
# transformers imports its quantizer registry (this does not import transformers)
_transformers.install_import_hook()
# PEFT's LoRA wraps LoRD layers with default configs (lord_export.integrations.peft): patched when PEFT loads
_peft_hook.install()

__all__ = [
    "__version__",
    "compile",
    "apply_plan",
    "check_plan_fits",
    "Calibration",
    "calibrate",
    "compress",
    "compress_model_dir",
    "LordConfig",
    "CalibrationError",
    "InputError",
    "LordError",
    "PlanError",
    "TargetError",
    "UsageError",
    "load",
    "load_model_dir",
    "read_plan",
    "save_compressed",
    "LordBottleneck",
    "LordLinear",
    "Group",
    "Member",
    "Plan",
    "make_plan",
    "PRESETS",
    "select_targets",
]
