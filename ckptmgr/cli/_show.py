"""``ckptmgr show DIR [STEP]``: one checkpoint's metadata and state tree."""

from __future__ import annotations

import argparse

from ckptmgr import CheckpointIOError, CheckpointNotFoundError

from ._common import (
    EXIT_OK,
    CliError,
    _describe,
    _human_bytes,
    _key_text,
    _local_time,
    _marks,
    _metrics_text,
    _number,
    _open_reader,
    _print_json,
    _resolve,
    _shape_text,
    _table,
)


def _cmd_show(args: argparse.Namespace) -> int:
    """``ckptmgr show DIR [STEP|latest|best]``: metadata and the state tree."""
    mgr = _open_reader(args.directory)
    info = _resolve(mgr, args.which)
    latest_info, best_info = mgr.latest, mgr.best
    latest = latest_info.step if latest_info else None
    best = best_info.step if best_info else None
    record = _describe(info, latest, best)
    try:
        description = mgr.describe(info.step)
    except CheckpointNotFoundError as exc:
        raise CliError(f"checkpoint {info.path} no longer exists") from exc
    except CheckpointIOError as exc:
        raise CliError(f"cannot read {exc.path}: {exc.strerror or exc}") from exc
    meta = dict(description.metadata)
    leaves = None if description.leaves is None else [
        {"key": _key_text(leaf.key_path), "path": list(leaf.key_path), "kind": leaf.kind, "dtype": leaf.dtype,
         "shape": list(leaf.shape), "bytes": leaf.nbytes}
        for leaf in description.leaves
    ]
    if args.json:
        _print_json({**record, "directory": str(mgr.directory), "meta": meta, "leaves": leaves})
        return EXIT_OK

    fields = [
        ("checkpoint", str(info.path) + ("" if leaves is not None else "  (payload: a framework-native file)")),
        ("step", str(info.step) + (f"  ({_marks(info, latest, best)})" if _marks(info, latest, best) else "")),
        ("saved", _local_time(info.time)),
        ("size", f"{_human_bytes(record['file_bytes'])} on disk"
                 + (f", {_human_bytes(info.nbytes)} of arrays" if leaves is not None else "")),
        ("metrics", _metrics_text(info.metrics)),
        ("keep", ", ".join(info.keep_reasons) or "-"),
    ]
    tracker = meta.get("tracker")
    if isinstance(tracker, dict):
        fields.append(("tracker", f"{tracker.get('monitor')} ({tracker.get('mode')}): best "
                                  f"{_number(tracker.get('best'))} at step {tracker.get('best_step')}, "
                                  f"wait {tracker.get('wait')}"))
    if leaves is None:
        fields.append(("metadata", f"{info.metadata_path}  "
                                   f"({meta.get('size')} bytes, crc32 {meta.get('crc32')})"))
    fields.append(("format", f"{meta.get('format')}, checksums {meta.get('checksum')}"))
    width = max(len(name) for name, _ in fields)
    for name, value in fields:
        print(f"{name.ljust(width)}  {value}")
    if leaves is not None:
        print()
        assert description.leaves is not None
        rows = [[_key_text(leaf.key_path), leaf.kind, leaf.dtype, _shape_text(list(leaf.shape)), str(leaf.nbytes)]
                for leaf in description.leaves]
        for line in _table(["KEY", "KIND", "DTYPE", "SHAPE", "BYTES"], rows, right={4}):
            print(line)
        total = sum(leaf.nbytes for leaf in description.leaves)
        print(f"{len(rows)} lea{'ves' if len(rows) != 1 else 'f'}, {_human_bytes(total)}")
    return EXIT_OK
