"""Calibration: text → batches (``data``), a model's repeated blocks and their calls (``blocks``),
and forward hooks that turn activations into input statistics (``statistics``)."""
