"""lord_export: LoRD (activation-aware low-rank decomposition) for models you export and compile.

Phased API::

    layers = select_targets(model, ("all",))
    calibration = calibrate(model, batches, layers)             # heavy, once
    plan = make_plan(model, calibration, layers, LordConfig(rank_reduction=0.3))
    apply_plan(model, plan)                                      # cheap module swap, in place

or all three at once with :func:`compress`; save with :func:`save_compressed`, reload with
:func:`load`. Importing this package does not import transformers, onnx or CUDA.
"""

__version__ = "0.1.0"

from .apply import apply_plan, check_plan_fits  # noqa: E402
from .calibrate import Calibration, calibrate  # noqa: E402
from .compress import compress, compress_model_dir  # noqa: E402
from .config import LordConfig  # noqa: E402
from .errors import CalibrationError, LordError, PlanError, TargetError, UsageError  # noqa: E402
from .hf_quantizer import install_import_hook as _install_hf_hook  # noqa: E402
from .io import load, load_model_dir, read_plan, save_compressed  # noqa: E402
from .modules import LordBottleneck, LordLinear  # noqa: E402
from .peft_hook import install as _install_peft_hook  # noqa: E402
from .plan import Group, Member, Plan  # noqa: E402
from .planner import make_plan  # noqa: E402
from .targets import PRESETS, select_targets  # noqa: E402

# transformers' from_pretrained loads LoRD directories: the "lord" quantizer is registered when
# transformers imports its quantizer registry (this does not import transformers)
_install_hf_hook()
# PEFT's LoRA wraps LoRD layers with default configs (lord_export.peft_support): patched when PEFT loads
_install_peft_hook()

__all__ = [
    "__version__",
    "apply_plan",
    "check_plan_fits",
    "Calibration",
    "calibrate",
    "compress",
    "compress_model_dir",
    "LordConfig",
    "CalibrationError",
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
