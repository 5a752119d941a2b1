"""Export stage: a plan applied to graphs and handed to backends.

* :mod:`.graph` — fx GraphModules and torch.export programs (``export_lord``);
* :mod:`.dynamo` — the ``lord`` torch.compile backend;
* :mod:`.onnx` — ONNX export validated in ONNX Runtime (int8 included);
* :mod:`.tensorrt` — TensorRT engines from the ONNX (imported lazily, needs NVIDIA's packages).
"""

from .dynamo import lord_backend, make_backend
from .graph import export_lord, rewrite_exported_program, rewrite_graph_module

__all__ = ["export_lord", "lord_backend", "make_backend", "rewrite_exported_program", "rewrite_graph_module"]
