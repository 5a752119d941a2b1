"""The ``lord`` torch.compile backend, registered through the ``torch_dynamo_backends`` entry point.

``torch.compile(model, backend="lord", options={"plan": PATH})`` finds this function without
importing lord_export first; see :mod:`lord_export.export.dynamo` for the options.
"""

from __future__ import annotations

from typing import Any


def lord(gm: Any, example_inputs: list, **kwargs: Any) -> Any:
    from lord_export.export.dynamo import lord_backend

    return lord_backend(gm, example_inputs, **kwargs)
