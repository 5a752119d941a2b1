"""Module paths of lord_export 0.1 (flat modules), kept importable for a release.

``import lord_export.io`` (or ``from lord_export.hf import load_dense``) still works: a
``sys.meta_path`` finder answers for the old names only and hands out the module that now holds the
code (the same module object, so classes and functions are identical), with a DeprecationWarning
naming the new path.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from types import ModuleType
from typing import Any

#: old module → the module that holds its code now
MOVED = {
    "lord_export.allocate": "lord_export.core.allocate",
    "lord_export.apply": "lord_export.core.apply",
    "lord_export.factorize": "lord_export.core.factorize",
    "lord_export.fingerprint": "lord_export.core.fingerprint",
    "lord_export.modules": "lord_export.core.modules",
    "lord_export.plan": "lord_export.core.plan",
    "lord_export.targets": "lord_export.core.targets",
    "lord_export.blocks": "lord_export.calibration.blocks",
    "lord_export.calibrate": "lord_export.calibration.statistics",
    "lord_export.data": "lord_export.calibration.data",
    "lord_export.budget": "lord_export.pipeline.survey",
    "lord_export.compress": "lord_export.pipeline.compress",
    "lord_export.engine": "lord_export.pipeline.engine",
    "lord_export.heal": "lord_export.pipeline.heal",
    "lord_export.planner": "lord_export.pipeline.planner",
    "lord_export.checkpoint": "lord_export.persist.checkpoint",
    "lord_export.hf": "lord_export.persist.hf",
    "lord_export.io": "lord_export.persist.io",
    "lord_export.hf_quantizer": "lord_export.integrations.transformers",
    "lord_export.import_hooks": "lord_export.integrations.import_hooks",
    "lord_export.peft_hook": "lord_export.integrations.peft_hook",
    "lord_export.peft_support": "lord_export.integrations.peft",
    "lord_export.reference": "lord_export.measure.reference",
    "lord_export.measure.evaluate": "lord_export.pipeline.evaluate",
}


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec: Any) -> ModuleType:
        new = MOVED[spec.name]
        warnings.warn(
            f"{spec.name} moved to {new}; the old path works in lord_export 0.2 only",
            DeprecationWarning,
            stacklevel=2,
        )
        return importlib.import_module(new)

    def exec_module(self, module: ModuleType) -> None:
        pass  # the module was imported under its new name already


def install() -> None:
    """Make the old module paths importable (idempotent)."""
    if not any(isinstance(f, _MovedModules) for f in sys.meta_path):
        sys.meta_path.append(_MovedModules())
