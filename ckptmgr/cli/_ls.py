"""``ckptmgr ls DIR``: one row per checkpoint."""

from __future__ import annotations

import argparse
from typing import Any

from ckptmgr import CheckpointManager

from ._common import (
    EXIT_OK,
    _describe,
    _disk_size,
    _human_bytes,
    _latest_and_best,
    _local_time,
    _marks,
    _metrics_text,
    _open_reader,
    _print_json,
    _table,
    _tracker_json,
)

# -------------------------------------------------------------------------------- ls


def _cmd_ls(args: argparse.Namespace) -> int:
    """``ckptmgr ls DIR``: one row per checkpoint (``--all``: and those rollbacks set aside)."""
    mgr = _open_reader(args.directory)
    aside = [CheckpointManager(folder, read_only=True) for folder in mgr.rolled_back] if args.all else []
    if args.json:
        listing = _ls_json(mgr)
        if args.all:
            listing["rolled_back"] = [_ls_json(m) for m in aside]
        _print_json(listing)
        return EXIT_OK
    _ls_print(mgr)
    for m in aside:
        print()
        print(f"rolled back (set aside by rollback, not used by the run): {m.directory}")
        _ls_print(m)
    return EXIT_OK


def _ls_json(mgr: CheckpointManager) -> dict[str, Any]:
    infos = mgr.checkpoints
    latest, best = _latest_and_best(mgr)
    return {
        "directory": str(mgr.directory),
        "tracker": _tracker_json(mgr.tracker),
        "latest": latest,
        "best": best,
        "checkpoints": [_describe(c, latest, best) for c in infos],
    }


def _ls_print(mgr: CheckpointManager) -> None:
    infos = mgr.checkpoints
    if not infos:
        print(f"no checkpoints in {mgr.directory}")
        return
    latest, best = _latest_and_best(mgr)
    rows = [
        [str(c.step), _marks(c, latest, best), _local_time(c.time), _human_bytes(_disk_size(c)),
         _metrics_text(c.metrics), ", ".join(r for r in c.keep_reasons if r.kind != "corrupt")
         + (f" (corrupt: {c.corrupt})" if c.corrupt is not None else "")]
        for c in infos
    ]
    for line in _table(["STEP", "MARK", "SAVED", "SIZE", "METRICS", "KEEP"], rows, right={0, 3}):
        print(line)
    sizes = [_disk_size(c) for c in infos]
    # Sizes of objects in a store are not listed: no total then, rather than a wrong one.
    total = "" if None in sizes else f", {_human_bytes(sum(s or 0 for s in sizes))}"
    tracker = mgr.tracker
    monitored = f"; best by {tracker.monitor} ({tracker.mode})" if tracker else ""
    print(f"{len(infos)} checkpoint{'s' * (len(infos) != 1)}{total}{monitored}")
