"""Run a callback right after a third-party module is imported, without importing it here.

lord_export teaches transformers (a quantizer for ``from_pretrained``) and PEFT (LoRA on LoRD
layers) about its modules, but ``import lord_export`` must import neither. :func:`after_import`
calls the callback at once when the module is already loaded, and otherwise the moment it is: a
``sys.meta_path`` finder that answers only for the watched names asks the other finders for the
spec and wraps its loader so the callback runs after the module's code. A callback that raises
is logged, never propagated into the user's import.
"""

from __future__ import annotations

import importlib.abc
import logging
import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any

log = logging.getLogger(__name__)

Callback = Callable[[ModuleType], None]


def _run(name: str, module: ModuleType, callbacks: list[Callback]) -> None:
    for callback in callbacks:
        try:
            callback(module)
        except Exception as e:  # never break the import of the user's library
            log.warning("lord_export could not extend %s: %s", name, e)


class _Loader(importlib.abc.Loader):
    """The real loader, then the callbacks."""

    def __init__(self, loader: Any, name: str, callbacks: list[Callback]) -> None:
        self._loader, self._name, self._callbacks = loader, name, callbacks

    def create_module(self, spec: Any) -> Any:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        _run(self._name, module, self._callbacks)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)


class _Watcher(importlib.abc.MetaPathFinder):
    def __init__(self) -> None:
        self.callbacks: dict[str, list[Callback]] = {}

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        callbacks = self.callbacks.pop(fullname, None)
        if callbacks is None:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _Loader(spec.loader, fullname, callbacks)
                return spec
        return None


_watcher = _Watcher()


def after_import(name: str, callback: Callback) -> None:
    """Call ``callback(module)`` once module ``name`` is imported (now, if it already is)."""
    module = sys.modules.get(name)
    if module is not None:
        _run(name, module, [callback])
        return
    _watcher.callbacks.setdefault(name, []).append(callback)
    if _watcher not in sys.meta_path:
        sys.meta_path.insert(0, _watcher)
