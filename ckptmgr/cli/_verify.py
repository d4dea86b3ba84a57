"""``ckptmgr verify DIR [STEP ...]``: check every checksum."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any, TextIO

from ckptmgr import (
    CheckpointError,
    CheckpointInfo,
    CheckpointManager,
    CheckpointNotFoundError,
    CorruptCheckpointError,
)

from ._common import (
    EXIT_FAILURE,
    EXIT_OK,
    _disk_size,
    _human_bytes,
    _one_line,
    _open_reader,
    _print_json,
    _resolve,
)

# ---------------------------------------------------------------------------- verify


class _Progress:
    """``[3/120] ckpt-000000300.h5`` on stderr: one redrawn line on a terminal, lines otherwise."""

    def __init__(self, total: int, *, enabled: bool, stream: TextIO) -> None:
        self.total = total
        self.enabled = enabled
        self.stream = stream
        self.tty = enabled and stream.isatty()
        self._drawn = False

    def update(self, done: int, label: str) -> None:
        """Show that item ``done`` (1-based) of ``total``, ``label``, is being worked on."""
        if not self.enabled:
            return
        text = f"verifying [{done}/{self.total}] {label}"
        if self.tty:
            self.stream.write("\r\x1b[K" + text)
            self._drawn = True
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def clear(self) -> None:
        """Erase the progress line (before printing a result on the same terminal)."""
        if self._drawn:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._drawn = False


def _cmd_verify(args: argparse.Namespace) -> int:
    """``ckptmgr verify DIR [STEP ...]``: check every checksum; exit 1 if any is corrupt."""
    mgr = _open_reader(args.directory)
    explicit = bool(args.which)
    if explicit:
        # Resolve everything first: a typo is a usage error, before any slow work.
        infos = list({info.step: info for info in (_resolve(mgr, w) for w in args.which)}.values())
    else:
        infos = mgr.checkpoints
    progress = _Progress(
        len(infos),
        enabled=args.progress if args.progress is not None else sys.stderr.isatty(),
        stream=sys.stderr,
    )
    started = time.monotonic()
    results: list[dict[str, Any]] = []
    for done, info in enumerate(infos, 1):
        progress.update(done, info.path.name)
        status, error = _verify_one(mgr, info)
        results.append({"step": info.step, "path": str(info.path), "status": status, "error": error,
                        "file_bytes": _disk_size(info)})
        if not args.json and (status != "ok" or not args.quiet):
            progress.clear()
            label = {"ok": "ok", "corrupt": "CORRUPT", "error": "ERROR", "gone": "gone"}[status]
            print(f"{label:<8} {info.step:>9}  {error if error else info.path}", flush=True)
    progress.clear()
    failed = [r for r in results if r["status"] in ("corrupt", "error") or (r["status"] == "gone" and explicit)]
    if args.json:
        _print_json({"directory": str(mgr.directory), "ok": not failed, "checkpoints": results})
    else:
        counts = {s: sum(r["status"] == s for r in results) for s in ("ok", "corrupt", "error", "gone")}
        parts = [f"{n} {s}" for s, n in counts.items() if n or s == "ok"]
        sizes = [r["file_bytes"] for r in results]
        total = "" if None in sizes else f" ({_human_bytes(sum(s or 0 for s in sizes))})"
        print(f"verified {len(results)} checkpoint{'s' * (len(results) != 1)}{total} "
              f"in {time.monotonic() - started:.1f} s: {', '.join(parts)}")
    return EXIT_FAILURE if failed else EXIT_OK


def _verify_one(mgr: CheckpointManager, info: CheckpointInfo) -> tuple[str, str | None]:
    """``(status, error)``: status is "ok", "corrupt", "error" (unreadable) or "gone"."""
    try:
        mgr.verify(info.step)
    except CheckpointNotFoundError:
        # Deleted since the listing, typically by a running writer's retention.
        return "gone", f"{info.path}: deleted while verifying"
    except CorruptCheckpointError as exc:
        return "corrupt", _one_line(str(exc))
    except (CheckpointError, OSError) as exc:
        return "error", _one_line(str(exc))
    return "ok", None
