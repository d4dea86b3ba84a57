"""``ckptmgr show DIR [STEP]``: one checkpoint's metadata and state tree."""

from __future__ import annotations

import argparse

from ckptmgr import CheckpointIOError, CheckpointNotFoundError

from . import _common as c


def _cmd_show(args: argparse.Namespace) -> int:
    """``ckptmgr show DIR [STEP|latest|best]``: metadata and the state tree."""
    mgr = c._open_reader(args.directory)
    info = c._resolve(mgr, args.which)
    latest, best = c._latest_and_best(mgr)
    record = c._describe(info, latest, best)
    try:
        description = mgr.describe(info.step)
    except CheckpointNotFoundError as exc:
        raise c.CliError(f"checkpoint {info.path} no longer exists") from exc
    except CheckpointIOError as exc:
        raise c.CliError(f"cannot read {exc.path}: {exc.strerror or exc}") from exc
    meta = dict(description.metadata)
    leaves = None if description.leaves is None else [
        {"key": c._key_text(leaf.key_path), "path": list(leaf.key_path), "kind": leaf.kind, "dtype": leaf.dtype,
         "shape": list(leaf.shape), "bytes": leaf.nbytes}
        for leaf in description.leaves
    ]
    if args.json:
        c._print_json({**record, "directory": str(mgr.directory), "meta": meta, "leaves": leaves})
        return c.EXIT_OK

    fields = [
        ("checkpoint", str(info.path) + ("" if leaves is not None else "  (payload: a framework-native file)")),
        ("step", str(info.step) + (f"  ({c._marks(info, latest, best)})" if c._marks(info, latest, best) else "")),
        ("saved", c._local_time(info.time)),
        ("size", f"{c._human_bytes(record['file_bytes'])} on disk"
                 + (f", {c._human_bytes(info.nbytes)} of arrays" if leaves is not None else "")),
        ("metrics", c._metrics_text(info.metrics)),
        ("keep", ", ".join(info.keep_reasons) or "-"),
    ]
    tracker = meta.get("tracker")
    if isinstance(tracker, dict):
        fields.append(("tracker", f"{tracker.get('monitor')} ({tracker.get('mode')}): best "
                                  f"{c._number(tracker.get('best'))} at step {tracker.get('best_step')}, "
                                  f"wait {tracker.get('wait')}"))
    if leaves is None:
        fields.append(("metadata", f"{info.metadata_path}  "
                                   f"({meta.get('size')} bytes, crc32 {meta.get('crc32')})"))
    if info.parts:
        fields.append(("parts", f"sharded across {len(info.parts)} ranks, one file each (restore(step, rank=k)): "
                                + ", ".join(p.name for p in info.parts)))
    fields.append(("format", f"{meta.get('format')}, checksums {meta.get('checksum')}"))
    width = max(len(name) for name, _ in fields)
    for name, value in fields:
        print(f"{name.ljust(width)}  {value}")
    if leaves is not None and not info.parts:
        print()
        assert description.leaves is not None
        rows = [[c._key_text(leaf.key_path), leaf.kind, leaf.dtype, c._shape_text(list(leaf.shape)), str(leaf.nbytes)]
                for leaf in description.leaves]
        for line in c._table(["KEY", "KIND", "DTYPE", "SHAPE", "BYTES"], rows, right={4}):
            print(line)
        total = sum(leaf.nbytes for leaf in description.leaves)
        print(f"{len(rows)} lea{'ves' if len(rows) != 1 else 'f'}, {c._human_bytes(total)}")
    return c.EXIT_OK
