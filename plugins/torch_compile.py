"""The ``lord`` torch.compile backend, registered through the ``torch_dynamo_backends`` entry point.

``torch.compile(model, backend="lord", options={"plan": PATH})`` finds this function without
importing lord_export first; see :mod:`lord_export.export.dynamo` for the options. Loading it also
arms a one-time warning for the case that silently runs the dense model: a module compiled whole
whose ``generate()`` (the original model's) calls the uncompiled forward; compile the forward with
``lord_export.compile(model, plan)`` instead.
"""

from __future__ import annotations

from typing import Any

from lord_export.export.dynamo import lord_backend, watch_whole_module_compiles

watch_whole_module_compiles()


def lord(gm: Any, example_inputs: list, **kwargs: Any) -> Any:
    return lord_backend(gm, example_inputs, **kwargs)
