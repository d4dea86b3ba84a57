"""The ``ckptmgr`` command: look after checkpoint directories without writing Python.

Usage::

    ckptmgr ls DIR [--json]
    ckptmgr show DIR [STEP|latest|best] [--json]
    ckptmgr verify DIR [STEP|latest|best ...] [--progress | --no-progress] [-q] [--json]
    ckptmgr prune DIR [--keep-last N] [--keep-best K] [--keep-every-steps S] [--dry-run] [--json]
    ckptmgr diff DIR A B [--all] [--json]

Also installed as ``python -m ckptmgr``. Everything goes through the library's public
API: a read-only :class:`~ckptmgr.CheckpointManager` for looking (it needs no lock, so
it is safe while a training job writes), a writing one for ``prune`` (it takes the
writer lock, so ``prune`` refuses while a training job holds it).

Exit status:

====  ===================================================================================
0     success
1     a checkpoint is corrupt or unreadable, or the operation failed (I/O error, the
      directory is locked by a running writer)
2     usage error: bad arguments, no such directory, not a ckptmgr directory, no such
      checkpoint
====  ===================================================================================

Errors are one line on stderr (``ckptmgr: error: ...``), never a traceback. ``--json``
output is strict JSON: metrics that are NaN or infinite are written as ``null``.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import TextIO

from ckptmgr import CheckpointError, CheckpointNotFoundError, CheckpointWarning, Which, __version__

from ._common import (
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_USAGE,
    CliError,
    _ArgumentParser,
    _one_line,
    _UsageError,
)
from ._diff import _cmd_diff
from ._ls import _cmd_ls
from ._prune import _cmd_prune
from ._show import _cmd_show
from ._verify import _cmd_verify

__all__ = ["EXIT_FAILURE", "EXIT_OK", "EXIT_USAGE", "CliError", "build_parser", "main"]


# ------------------------------------------------------------------------------ main


def _int_at_least(text: str, low: int, expected: str, too_low: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}; got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"expected {too_low}; got {text!r}")
    return value


def _which(text: str) -> Which:
    """An argparse type: a step number (int >= 0), "latest" or "best"."""
    if text in ("latest", "best"):
        return text  # type: ignore[return-value]
    return _int_at_least(text, 0, "a step number, 'latest' or 'best'", "a step number >= 0")


def _positive(text: str) -> int:
    """An argparse type: an int >= 1."""
    return _int_at_least(text, 1, "an integer >= 1", "an integer >= 1")


def build_parser() -> argparse.ArgumentParser:
    """The command line: ``ckptmgr {ls,show,verify,prune,diff} ...``."""
    parser = _ArgumentParser(
        prog="ckptmgr",
        description="Inspect, verify, prune and compare the checkpoints of a ckptmgr directory.",
        epilog="Exit status: 0 success; 1 a checkpoint is corrupt or the operation failed; 2 usage error.",
    )
    parser.add_argument("--version", action="version", version=f"ckptmgr {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, help_text: str, func: Callable[[argparse.Namespace], int]) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.set_defaults(func=func)
        sub.add_argument("directory", metavar="DIR", help="the checkpoint directory")
        sub.add_argument("--json", action="store_true", help="print JSON for scripts (NaN as null)")
        return sub

    ls = command("ls", "List the checkpoints: step, time, size, metrics, why each is kept.", _cmd_ls)
    ls.add_argument("--all", action="store_true",
                    help="also list the checkpoints rollback() set aside (under rolled-back/)")
    show = command("show", "Show one checkpoint's metadata and state tree.", _cmd_show)
    show.add_argument("which", metavar="STEP", nargs="?", type=_which, default="latest",
                      help="a step number, 'latest' (default) or 'best'")
    verify = command("verify", "Verify checksums (exit 1 if any checkpoint is corrupt).", _cmd_verify)
    verify.add_argument("which", metavar="STEP", nargs="*", type=_which,
                        help="step numbers, 'latest' or 'best' (default: every checkpoint)")
    verify.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="show progress on stderr (default: when stderr is a terminal)")
    verify.add_argument("-q", "--quiet", action="store_true", help="print only the failures and the summary")
    prune = command("prune", "Delete the checkpoints the retention policies drop "
                             "(never the latest or the best).", _cmd_prune)
    prune.add_argument("--keep-last", type=_positive, metavar="N", help="keep the N newest")
    prune.add_argument("--keep-best", type=_positive, metavar="K",
                       help="keep the K best by the metric the run monitored")
    prune.add_argument("--keep-every-steps", type=_positive, metavar="S",
                       help="keep one checkpoint per S steps")
    prune.add_argument("--dry-run", action="store_true", help="show what would be removed; remove nothing")
    diff = command("diff", "Compare two checkpoints' state trees array by array.", _cmd_diff)
    diff.add_argument("a", metavar="A", type=_which, help="a step number, 'latest' or 'best'")
    diff.add_argument("b", metavar="B", type=_which, help="a step number, 'latest' or 'best'")
    diff.add_argument("--all", action="store_true", help="also list the unchanged keys")
    return parser


def _parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse ``argv``, allowing options between the steps of ``verify``.

    argparse gives a ``nargs="*"`` positional only the first run of values, so
    ``verify DIR 100 --progress 200`` would reject ``200``; those go to the steps here.

    Raises:
        _UsageError: bad arguments.
    """
    args, extras = parser.parse_known_args(argv)
    if extras and args.command == "verify" and not any(e.startswith("-") and e != "-" for e in extras):
        try:
            args.which = [*args.which, *map(_which, extras)]
        except argparse.ArgumentTypeError as exc:
            raise _UsageError(f"{parser.prog} verify", f"argument STEP: {exc}") from None
        return args
    if extras:
        parser.error(f"unrecognized arguments: {' '.join(extras)}")
    return args


class _WarningPrinter:
    """Prints warnings as one line each (``ckptmgr: warning: ...``), each message once.

    A read-only manager re-lists the directory on every query, so the same problem
    (an unreadable sidecar, say) would otherwise be reported again and again.
    """

    def __init__(self) -> None:
        self._seen: set[str] = set()

    def __call__(
        self, message: Warning | str, category: type[Warning], filename: str, lineno: int,
        file: TextIO | None = None, line: str | None = None,
    ) -> None:
        """The ``warnings.showwarning`` hook."""
        text = _one_line(str(message)).removeprefix("ckptmgr: ")
        if text not in self._seen:
            self._seen.add(text)
            print(f"ckptmgr: warning: {text}", file=sys.stderr)


def _error(message: str) -> None:
    print(f"ckptmgr: error: {_one_line(message)}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``ckptmgr`` command; return its exit status.

    Args:
        argv: the arguments after the program name (default: ``sys.argv[1:]``).

    Returns:
        ``EXIT_OK`` (0), ``EXIT_FAILURE`` (1) or ``EXIT_USAGE`` (2). Errors are
        printed as one line on stderr, never as a traceback.
    """
    parser = build_parser()
    try:
        args = _parse(parser, argv)
    except _UsageError as exc:
        print(f"{exc.prog}: error: {_one_line(str(exc))}", file=sys.stderr)
        return exc.status
    except SystemExit as exc:  # --help, --version
        return exc.code if isinstance(exc.code, int) else EXIT_OK
    with warnings.catch_warnings():
        warnings.simplefilter("always", CheckpointWarning)  # deduplicated by the printer
        warnings.showwarning = _WarningPrinter()
        try:
            status = int(args.func(args))
            sys.stdout.flush()  # here, where a closed pipe is caught, not at exit
            return status
        except CliError as exc:
            _error(str(exc))
            return exc.status
        except CheckpointNotFoundError as exc:
            _error(str(exc))
            return EXIT_USAGE
        except (CheckpointError, OSError) as exc:
            if isinstance(exc, BrokenPipeError):
                return _broken_pipe()
            _error(str(exc) or type(exc).__name__)
            return EXIT_FAILURE
        except KeyboardInterrupt:
            _error("interrupted")
            return 130
        except Exception as exc:  # a bug or a hostile file: still one line, no traceback
            _error(f"unexpected {type(exc).__name__}: {exc}")
            return EXIT_FAILURE


def _broken_pipe() -> int:
    """The reader of stdout went away (``ckptmgr ls DIR | head``): stop quietly."""
    # Python would complain again when it flushes stdout at exit.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return EXIT_FAILURE
