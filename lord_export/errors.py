"""Exceptions, and the exit code the command line gives each kind.

=====  ===================  ==============================================================
code   exception            meaning
=====  ===================  ==============================================================
0                           success
1      ``LordError``        the work ran and failed (calibration saw NaN, an export failed
                            its validation, the disk filled up)
2      ``UsageError``       bad usage: a bad argument, a pattern that matches nothing, an
                            existing output, a dense directory where a LoRD one is needed
3      ``InputError``       an input file is corrupt or does not fit (a broken plan or
                            checkpoint, a plan made for another model)
4                           an internal error (a bug in lord_export: please report it)
130                         interrupted (Ctrl-C)
=====  ===================  ==============================================================

Library messages say what is wrong; the command-line layer adds which flag fixes it (see
``OutputExistsError`` and ``RemoteCodeError``, which the CLI and the optimum plugin translate).
"""

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_BAD_INPUT = 3
EXIT_INTERNAL = 4
EXIT_INTERRUPTED = 130


class LordError(Exception):
    """Base class of every error lord_export raises on purpose; the run failed (exit 1)."""

    exit_code = EXIT_FAILED


class UsageError(LordError, ValueError):
    """The user asked for something impossible (bad argument, missing file, bad pattern): exit 2."""

    exit_code = EXIT_USAGE


class TargetError(UsageError):
    """A target or exclude pattern matched no layer, or nothing is left to compress."""


class OutputExistsError(UsageError):
    """An output path exists and replacing it was not asked for (``overwrite=True``)."""

    def __init__(self, path: object, detail: str = "") -> None:
        super().__init__(f"output {str(path)!r} already exists{detail}")
        self.path = path


class ForeignOutputError(OutputExistsError):
    """An output path exists, replacing lord_export's own outputs was asked for, and lord_export did not
    write this one (``overwrite="any"`` replaces it anyway)."""

    def __init__(self, path: object) -> None:
        super().__init__(path, ", and lord_export did not write it")


class RemoteCodeError(UsageError):
    """A model needs code from its own directory and ``trust_remote_code`` is off."""


class InputError(LordError, ValueError):
    """An input file or model is corrupt, or does not fit what it is used with: exit 3."""

    exit_code = EXIT_BAD_INPUT


class PlanError(InputError):
    """A plan is corrupt, or does not fit the model it is applied to."""


class CalibrationError(LordError):
    """Calibration could not produce usable statistics (NaN/Inf activations, no tokens)."""
