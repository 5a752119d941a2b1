"""Exceptions. ``UsageError`` (and subclasses) mean bad input: the CLI exits 2 with one line.

Library messages say what is wrong; the command-line layer adds which flag fixes it (see
``OutputExistsError`` and ``RemoteCodeError``, which the CLI and the optimum plugin translate).
"""


class LordError(Exception):
    """Base class of every error lord_export raises on purpose."""


class UsageError(LordError, ValueError):
    """The user asked for something impossible (bad argument, missing file, bad pattern)."""


class TargetError(UsageError):
    """A target or exclude pattern matched no layer, or nothing is left to compress."""


class CalibrationError(LordError):
    """Calibration could not produce usable statistics (NaN/Inf activations, no tokens)."""


class PlanError(UsageError):
    """A plan does not fit the model it is applied to."""


class OutputExistsError(UsageError):
    """An output path exists and replacing it was not asked for (``overwrite=True``)."""

    def __init__(self, path: object) -> None:
        super().__init__(f"output {str(path)!r} already exists")
        self.path = path


class RemoteCodeError(UsageError):
    """A model needs code from its own directory and ``trust_remote_code`` is off."""
