"""Exceptions. ``UsageError`` (and subclasses) mean bad input: the CLI exits 2 with one line."""


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
