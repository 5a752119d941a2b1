"""The ``lord-export`` command line.

Exit codes (:mod:`lord_export.errors`): 0 success; 1 the run failed (calibration saw NaN, a
validation failed, the disk filled up); 2 bad usage (a bad argument, an existing output, the wrong
kind of directory); 3 a corrupt input or one that does not fit (a broken plan or checkpoint, a plan
made for another model); 4 an internal error (a bug: rerun with -v for the traceback and report
it); 130 interrupted. Errors are one line on stderr.

One module per subcommand, each with ``add_parser(sub, parents)`` and ``run(args)``; shared option
definitions live in :mod:`.args`.
"""

from __future__ import annotations

import logging
import sys
import traceback
from collections.abc import Sequence

from ..errors import (
    EXIT_FAILED,
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    LordError,
    OutputExistsError,
    RemoteCodeError,
)
from . import bench, compress, demo, evaluate, export, heal, sweep
from .args import PROG, HelpFormatter, Parser, common_parser

SUBCOMMANDS = (compress, heal, export, evaluate, sweep, bench, demo)

#: Library errors whose fix is a flag: the CLI names the flag (the library only says what is wrong).
FLAG_HINTS = {
    OutputExistsError: "pass --overwrite to replace an earlier lord_export output (--overwrite-any: any directory)",
    RemoteCodeError: "pass --trust-remote-code if you trust it",
}

EPILOG = (
    "exit codes: 0 success, 1 the run failed, 2 bad usage, 3 a corrupt input or one that does not fit, "
    "4 internal error (a bug: rerun with -v and report it), 130 interrupted"
)


def build_parser() -> Parser:
    parser = Parser(
        prog=PROG,
        description="Compress transformer models with LoRD (activation-aware low-rank decomposition) "
        "and hand them to the backends you deploy on.",
        epilog=EPILOG,
        formatter_class=HelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True
    parents = [common_parser()]
    for command in SUBCOMMANDS:
        command.add_parser(sub, parents)
    for p in sub.choices.values():
        p.epilog = p.epilog or EPILOG
    return parser


def error_message(err: LordError) -> str:
    """The one line printed for a library error, with the flag that fixes it when there is one."""
    hint = next((h for cls, h in FLAG_HINTS.items() if isinstance(err, cls)), None)
    return f"{err}; {hint}" if hint else str(err)


usage_message = error_message  # the name plugins used in lord_export 0.1


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format=f"{PROG}: %(levelname)s: %(message)s",
    )
    try:
        return args.func(args)
    except LordError as e:
        kind = "error" if e.exit_code == EXIT_USAGE else "failed"
        print(f"{PROG}: {kind}: {error_message(e)}", file=sys.stderr)
        return e.exit_code
    except OSError as e:  # a full disk, a file-size limit, a permission: the output was not written
        print(f"{PROG}: failed: {e}; the output was not written", file=sys.stderr)
        return EXIT_FAILED
    except MemoryError:
        print(f"{PROG}: failed: out of memory; lower --batch-size or --calib-samples", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; the output was not written", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:  # noqa: BLE001 - anything else is a bug: one line, the traceback with -v
        if "out of memory" in str(e).lower():
            print(
                f"{PROG}: failed: out of memory ({type(e).__name__}); lower --batch-size or --calib-samples",
                file=sys.stderr,
            )
            return EXIT_FAILED
        if args.verbose:
            traceback.print_exc()
        first = str(e).splitlines()[0] if str(e) else ""
        print(
            f"{PROG}: internal error: {type(e).__name__}: {first} (a bug in lord_export; rerun with -v for the "
            "traceback and report it)",
            file=sys.stderr,
        )
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
