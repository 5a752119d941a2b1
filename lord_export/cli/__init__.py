"""The ``lord-export`` command line. Exit codes: 0 success, 1 failure, 2 bad usage.

One module per subcommand, each with ``add_parser(sub, parents)`` and ``run(args)``; shared
argument types and option groups live in :mod:`.args`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from ..errors import LordError, OutputExistsError, RemoteCodeError, UsageError
from . import bench, compress, demo, evaluate, export, heal, sweep
from .args import common_parser

PROG = "lord-export"
SUBCOMMANDS = (compress, heal, export, evaluate, sweep, bench, demo)

#: Library errors whose fix is a flag: the CLI names the flag (the library only says what is wrong).
FLAG_HINTS = {
    OutputExistsError: "pass --overwrite to replace it",
    RemoteCodeError: "pass --trust-remote-code if you trust it",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Compress transformer models with LoRD (activation-aware low-rank decomposition) "
        "and hand them to the backends you deploy on.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    parents = [common_parser()]
    for command in SUBCOMMANDS:
        command.add_parser(sub, parents)
    return parser


def usage_message(err: UsageError) -> str:
    """The one line printed for a usage error, with the flag that fixes it when there is one."""
    hint = next((h for cls, h in FLAG_HINTS.items() if isinstance(err, cls)), None)
    return f"{err}; {hint}" if hint else str(err)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format=f"{PROG}: %(levelname)s: %(message)s",
    )
    try:
        return args.func(args)
    except UsageError as e:
        print(f"{PROG}: error: {usage_message(e)}", file=sys.stderr)
        return 2
    except LordError as e:
        print(f"{PROG}: failed: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # a full disk, a file-size limit, a permission: the output was not written
        print(f"{PROG}: failed: {e}; nothing was written", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; nothing was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
