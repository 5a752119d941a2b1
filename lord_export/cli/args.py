"""What every subcommand shares: the parser and help classes, argument types, and ONE definition of each
option (its spelling, type, default and help), used by the subcommands and by the optimum-cli plugin.

One spelling per concept, in every subcommand:

* ``--calib PATH...``: the text/code the tool fits to (calibration; ``heal``'s training data), cut into
  ``--calib-samples`` blocks of ``--calib-seqlen`` tokens;
* ``--eval PATH...``: held-out text/code measured on, in windows of ``--eval-window`` tokens, at most
  ``--eval-tokens`` of them (evenly spaced over the files);
* ``--separator S``: splits every data file into documents;
* ``--dtype``, ``--device``, ``--trust-remote-code``, ``--overwrite``: as in ``compress``.

Older spellings (``eval --data``, ``--window``, ``--calib-separator``, ``heal --data``, ``eval --limit``)
still parse, hidden from ``--help``, with a deprecation warning; they go in lord_export 0.3.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from ..calibration.data import DEFAULT_SAMPLES, DEFAULT_SEQLEN, SAMPLINGS, TOKENS_PER_FEATURE, CalibrationOptions
from ..config import (
    CALIBRATION_MODES,
    DEFAULT_CALIBRATION,
    DEFAULT_GROUPING,
    DEFAULT_REFINE,
    EXPERT_BASES,
    GROUPINGS,
    OUTPUT_WEIGHTINGS,
    REFINE_MODES,
    LordConfig,
    check_param_ratio,
    check_ppl_increase,
    check_rank_reduction,
    parse_override,
)
from ..core.allocate import ALLOCATIONS, DEFAULT_ALLOCATION
from ..core.factorize import METHODS
from ..core.targets import PRESETS
from ..errors import UsageError

PROG = "lord-export"
DTYPES = ("auto", "float32", "bfloat16", "float16")


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``lord-export compress: error: ... (see lord-export compress --help)``."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class HelpFormatter(argparse.HelpFormatter):
    """Adds "(default: X)" to an option's help when it has a real default the help does not mention."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or not action.option_strings:
            return text
        if action.default in (None, False, argparse.SUPPRESS, []) or action.nargs == 0:
            return text
        return text + " (default: %(default)s)"


def warn_deprecated(old: str, new: str) -> None:
    print(
        f"{PROG}: warning: {old} is deprecated, use {new} (the old spelling goes in lord_export 0.3)", file=sys.stderr
    )


class _DeprecatedAlias(argparse.Action):
    """An old spelling: stores into the new option's destination, with a warning."""

    def __init__(self, option_strings, dest, new: str, store_const: Any = None, **kwargs: Any) -> None:
        self.new, self.store_const = new, store_const
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        warn_deprecated(option_string, self.new)
        setattr(namespace, self.dest, self.store_const if self.nargs == 0 else values)


# ------------------------------------------------------------------------------------- types
def _typed(check: Any):
    def parse(text: str) -> Any:
        try:
            return check(text)
        except UsageError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    parse.__name__ = check.__name__
    return parse


rank_reduction = _typed(check_rank_reduction)
ppl_increase = _typed(check_ppl_increase)
param_ratio = _typed(check_param_ratio)
override = _typed(parse_override)


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text}")
    return value


def holdout_share(text: str) -> float:
    """argparse type: a share in [0, 1)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1), got {text!r}") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a float > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


# --------------------------------------------------------------------------- option definitions
@dataclass(frozen=True)
class Option:
    """One option: its flag, argparse keywords, and the old spellings it still answers to."""

    flag: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()
    exclusive: str | None = None  # options sharing a name form a required mutually exclusive group

    @property
    def dest(self) -> str:
        return self.kwargs.get("dest") or self.flag.lstrip("-").replace("-", "_")


def config_help(name: str) -> str:
    """The help text of a ``LordConfig`` field, escaped for argparse (which formats help with ``%``)."""
    return next(f.metadata["help"] for f in fields(LordConfig) if f.name == name).replace("%", "%%")


COMPRESSION_OPTIONS = (
    Option("--rank-reduction", dict(type=rank_reduction, metavar="R", help=config_help("rank_reduction")), (), "size"),
    Option("--param-ratio", dict(type=param_ratio, metavar="P", help=config_help("param_ratio")), (), "size"),
    Option(
        "--max-ppl-increase", dict(type=ppl_increase, metavar="X", help=config_help("max_ppl_increase")), (), "size"
    ),
    Option("--allocation", dict(choices=ALLOCATIONS, default=DEFAULT_ALLOCATION, help=config_help("allocation"))),
    Option(
        "--override",
        dict(
            action="append",
            type=override,
            default=[],
            metavar="PATTERN=VALUE",
            help="per-layer setting that wins over --rank-reduction and the allocation, e.g. 're:.*o_proj$=0.6' or "
            "'down_proj=dense' (repeatable)",
        ),
    ),
    Option("--method", dict(choices=tuple(METHODS), default="lord", help=config_help("method"))),
    Option(
        "--targets",
        dict(nargs="+", default=["all"], metavar="T", help=f"{config_help('targets')}; presets: {', '.join(PRESETS)}"),
    ),
    Option("--exclude", dict(nargs="+", default=[], metavar="PATTERN", help=config_help("exclude"))),
    Option(
        "--grouping", dict(choices=GROUPINGS, default=DEFAULT_GROUPING, help=config_help("grouping")), (), "grouping"
    ),
    Option("--expert-basis", dict(choices=EXPERT_BASES, default="per-expert", help=config_help("expert_basis"))),
    Option(
        "--no-grouping",
        dict(action="store_const", const="separate", dest="grouping", help="the same as --grouping separate"),
        (),
        "grouping",
    ),
    Option("--rank-multiple", dict(type=positive_int, default=1, metavar="M", help=config_help("rank_multiple"))),
    Option("--force", dict(action="store_true", help=config_help("force"))),
    Option(
        "--calibration",
        dict(choices=CALIBRATION_MODES, default=DEFAULT_CALIBRATION, help=config_help("calibration")),
    ),
    Option(
        "--output-weighting", dict(choices=OUTPUT_WEIGHTINGS, default="fisher", help=config_help("output_weighting"))
    ),
    Option("--refine", dict(choices=REFINE_MODES, default=DEFAULT_REFINE, help=config_help("refine"))),
    Option("--refine-steps", dict(type=positive_int, default=64, metavar="N", help=config_help("refine_steps"))),
    Option("--refine-lr", dict(type=positive_float, default=1e-3, metavar="LR", help=config_help("refine_lr"))),
)

SEPARATOR = Option(
    "--separator",
    dict(default=None, metavar="S", help="split every data file into documents on this string, e.g. '<|endoftext|>'"),
    ("--calib-separator",),
)

CALIBRATION_OPTIONS = (
    Option(
        "--calib",
        dict(
            nargs="+",
            metavar="PATH",
            help="calibration text/code files or folders (folders are read recursively; binary files skipped)",
        ),
    ),
    Option(
        "--calib-samples",
        dict(
            type=positive_int,
            default=None,
            metavar="N",
            help=f"number of calibration blocks (default: {DEFAULT_SAMPLES}, or more for a model with wider layer "
            f"inputs: at least {TOKENS_PER_FEATURE} tokens per feature of the widest targeted input, so that its "
            "covariance is well estimated)",
        ),
    ),
    Option(
        "--calib-seqlen",
        dict(
            type=positive_int,
            default=None,
            metavar="L",
            help=f"tokens per calibration block (default: {DEFAULT_SEQLEN} or the model's maximum positions, "
            "whichever is smaller)",
        ),
    ),
    Option(
        "--calib-sampling",
        dict(
            choices=SAMPLINGS,
            default="spread",
            help="which text becomes the blocks: 'spread' (default) takes windows evenly spaced over all the "
            "files, so a few long files cannot fill the calibration set; 'sequential' takes the first tokens "
            "of the files in path order",
        ),
    ),
    SEPARATOR,
    Option("--batch-size", dict(type=positive_int, default=8, metavar="B", help="sequences per forward pass")),
)


def add_options(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    options: Sequence[Option],
    *,
    prefix: str = "",
    one_value: bool = False,
    required: Sequence[str] = (),
) -> None:
    """Add ``options`` to ``parser``. With ``prefix`` (e.g. "lord-") every flag and destination is
    prefixed; with ``one_value`` a list option takes one value per flag, repeated (``--lord-calib a
    --lord-calib b``), so it may stand anywhere on a host tool's command line. ``required``: the
    options (or exclusive groups) that must be given."""
    groups: dict[str, Any] = {}
    for o in options:
        kw = dict(o.kwargs)
        flag = "--" + prefix + o.flag[2:]
        if prefix:
            kw["dest"] = (prefix + kw.get("dest", o.flag[2:])).replace("-", "_")
        if one_value and kw.get("nargs") == "+":
            kw.pop("nargs")
            kw.update(action="append", default=None)
        target = parser
        if o.exclusive is not None:
            if o.exclusive not in groups:
                groups[o.exclusive] = parser.add_mutually_exclusive_group(required=o.exclusive in required)
            target = groups[o.exclusive]
        elif o.flag[2:] in required:
            kw["required"] = True
        action = target.add_argument(flag, **kw)
        for alias in o.aliases:
            old = "--" + prefix + alias[2:]
            nargs = 0 if kw.get("action") in ("store_true",) else kw.get("nargs")
            extra = {"type": kw["type"]} if "type" in kw else {}
            parser.add_argument(
                old,
                dest=action.dest,
                action=_DeprecatedAlias,
                new=flag,
                nargs=nargs,
                store_const=True if nargs == 0 else None,
                default=argparse.SUPPRESS,
                help=argparse.SUPPRESS,
                **extra,
            )


def add_alias(parser: argparse.ArgumentParser, old: str, new: str, dest: str, **kwargs: Any) -> None:
    """A hidden, deprecated spelling ``old`` of option ``new`` (stored into ``dest``)."""
    parser.add_argument(
        old, dest=dest, action=_DeprecatedAlias, new=new, default=argparse.SUPPRESS, help=argparse.SUPPRESS, **kwargs
    )


def common_parser() -> argparse.ArgumentParser:
    """Options every subcommand has."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", help="log debug details (and tracebacks)")
    common.add_argument("-q", "--quiet", action="store_true", help="no progress lines or bars, warnings only")
    return common


def add_calibration_args(parser: argparse.ArgumentParser, *, required: bool = True) -> None:
    """``--calib PATH...`` and the options that turn it into batches (see :mod:`lord_export.calibration.data`)."""
    g = parser.add_argument_group("calibration data")
    add_options(g, CALIBRATION_OPTIONS, required=("calib",) if required else ())


def calibration_options(args: argparse.Namespace, prefix: str = "") -> CalibrationOptions:
    p = prefix.replace("-", "_")
    return CalibrationOptions(
        samples=getattr(args, p + "calib_samples"),
        seqlen=getattr(args, p + "calib_seqlen"),
        separator=getattr(args, p + "separator"),
        batch_size=getattr(args, p + "batch_size"),
        holdout=getattr(args, p + "holdout", 0.0),
        sampling=getattr(args, p + "calib_sampling", "spread"),
    )


def add_eval_args(
    parser: argparse.ArgumentParser, *, required: bool = False, window: int | None = 512, separator: bool = False
) -> None:
    """``--eval PATH...`` (held-out data), ``--eval-window`` and ``--eval-tokens`` (and ``--separator``,
    for commands without calibration data)."""
    g = parser.add_argument_group("held-out evaluation")
    g.add_argument(
        "--eval",
        nargs="+",
        required=required,
        default=None,
        metavar="PATH",
        dest="eval_data",
        help="held-out text/code files or folders to measure perplexity on (never used for fitting)",
    )
    g.add_argument(
        "--eval-window",
        type=positive_int,
        default=window,
        metavar="L",
        help="tokens per evaluation window (each document is cut into non-overlapping windows; default: "
        f"{window or 512} or the model's maximum positions, whichever is smaller)",
    )
    g.add_argument(
        "--eval-tokens",
        type=positive_int,
        default=None,
        metavar="N",
        help="evaluate at most about N tokens: evenly spaced windows over all the files, the same ones every run "
        "(default: all)",
    )
    if separator:
        add_options(g, (SEPARATOR,))


def add_config_args(parser: argparse.ArgumentParser) -> None:
    """The ``LordConfig`` knobs: what to compress and how."""
    add_options(parser.add_argument_group("compression"), COMPRESSION_OPTIONS, required=("size",))


def add_device_args(parser: argparse.ArgumentParser, *, stats: bool = False) -> None:
    """``--device`` (and ``--stats-device``): where the work runs; checked before any work."""
    parser.add_argument(
        "--device", default=None, help="compute device, e.g. cpu, cuda, cuda:1 (default: cuda when present, else cpu)"
    )
    if stats:
        parser.add_argument(
            "--stats-device",
            default=None,
            help="where calibration statistics live and are factorized, in float64 (default: --device, or cpu when "
            "--device has no float64, e.g. mps; 'cpu' saves accelerator memory)",
        )


def add_dtype_args(parser: argparse.ArgumentParser, *, what: str, compute: bool = True, forced: bool = True) -> None:
    """``--dtype`` (forces one dtype for everything) and ``--compute-dtype`` (what the work runs in)."""
    if forced:
        parser.add_argument(
            "--dtype",
            choices=DTYPES,
            default="auto",
            help=f"{what} (default auto: each tensor in the dtype the checkpoint stores it in)",
        )
    if compute:
        parser.add_argument(
            "--compute-dtype",
            choices=DTYPES,
            default="auto",
            help="dtype the work runs in (default auto: float32 where the device has no native support for the "
            "checkpoint's bfloat16/float16 - e.g. an AVX2 CPU, where it is ~7x slower - else the checkpoint's "
            "dtype; the choice and its reason are printed and written to the report)",
        )


def add_loading_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow model code from the model directory (off by default: only transformers' own classes run)",
    )


def add_output_args(parser: argparse.ArgumentParser, what: str = "OUTPUT_DIR") -> None:
    """``--overwrite`` (replace an earlier lord_export output) and ``--overwrite-any``."""
    parser.add_argument(
        "--overwrite", action="store_true", help=f"replace {what} if an earlier lord_export run wrote it"
    )
    parser.add_argument(
        "--overwrite-any",
        action="store_true",
        help=f"replace {what} whatever it holds (its contents are deleted once the new output is complete)",
    )


def overwrite_mode(args: argparse.Namespace) -> bool | str:
    """The ``overwrite`` argument of the library's writers: False, True (lord_export outputs) or "any"."""
    return "any" if getattr(args, "overwrite_any", False) else bool(getattr(args, "overwrite", False))


def dtype_arg(name: str) -> Any:
    """A ``--dtype``/``--compute-dtype`` value as a torch dtype (None for auto)."""
    import torch

    return None if name in (None, "auto") else getattr(torch, name)


def config_from_args(args: argparse.Namespace, prefix: str = "") -> LordConfig:
    p = prefix.replace("-", "_")

    def get(name: str, default: Any = None) -> Any:
        return getattr(args, p + name, default)

    return LordConfig(
        rank_reduction=get("rank_reduction"),
        param_ratio=get("param_ratio"),
        max_ppl_increase=get("max_ppl_increase"),
        allocation=get("allocation"),
        overrides=dict(get("override") or []),
        method=get("method"),
        targets=tuple(get("targets") or ["all"]),
        exclude=tuple(get("exclude") or []),
        grouping=get("grouping") or DEFAULT_GROUPING,
        expert_basis=get("expert_basis", "per-expert"),
        rank_multiple=get("rank_multiple"),
        force=bool(get("force", False)),
        calibration=get("calibration"),
        output_weighting=get("output_weighting", "fisher"),
        refine=get("refine", DEFAULT_REFINE),
        refine_steps=get("refine_steps", 64),
        refine_lr=get("refine_lr", 1e-3),
    )
