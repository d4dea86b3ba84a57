"""The only package that touches the file system: naming, atomic commit, scan, lock, index.

Modules: ``_layout`` (names, listing, safe small reads), ``_local`` (commit, delete,
lock, index), ``_writeback`` (early writeback of a file being written), ``_rollback``
(setting checkpoints aside). The functions below are the primitives the directory
layer (``ckptmgr._directory``) builds on; an object-store backend provides the same.

Directory layout::

    runs/exp1/
      ckpt-000001000.h5        committed checkpoints (step zero-padded to 9+ digits)
      model-03-0.31.keras      a payload checkpoint: a framework-native file ...
      .ckptmgr-<hash>.json     ... and its metadata (step, metrics, size, checksum);
                               <hash> is derived from the payload's file name
      ckpt-000001000.rank-00001-of-00002.<token>.h5
                               rank 1's part of a sharded checkpoint of several
                               processes; ckpt-000001000.h5 is then its commit record,
                               written last, naming every part (and the token)
      .ckpt-<random>.tmp[-NAME] a save in progress; removed by the next writer that opens
      .ckpt-<random>.commit    a payload commit in progress (see below)
      .ckptmgr.lock            the writer lock (filelock; released by the OS on death)
      .ckptmgr-index.json      a cache of the checkpoints' metadata; rebuilt when stale
      anything else            not ours: ignored, never deleted

Commit protocol (invariant 1): write to ``.ckpt-<random>.tmp`` in the same directory,
flush and fsync it, rename it to its final name, fsync the directory. A crash before
the rename leaves only a temporary file; after it, a complete, durable checkpoint.

A payload's file and its metadata are two files, and the payload may replace an
earlier file of the same name, so its commit has two phases: write the payload to a
temporary name and fsync it; write its metadata as ``.ckpt-<random>.commit`` and fsync
it; rename the payload; rename the commit record over the sidecar; fsync the directory.
The next writer that opens finishes an interrupted commit whose payload is in place and
matches the record's checksum, and discards one whose payload is not.
"""

from __future__ import annotations

from ._layout import (
    INDEX_NAME,
    INDEX_VERSION,
    LOCK_NAME,
    MAX_PAYLOAD_NAME,
    Entry,
    check_payload_name,
    checkpoint_name,
    io_error,
    is_regular_file,
    parse_name,
    parse_part_name,
    part_files,
    part_name,
    read_small,
    scan,
    sidecar_name,
)
from ._local import (
    DirectoryLock,
    commit_payload,
    ensure_directory,
    file_checksum,
    fsync_directory,
    fsync_file,
    load_index,
    pending_commits,
    recover_commits,
    remove_files,
    remove_leftovers,
    save_index,
    write_atomic,
    write_payload,
)
from ._rollback import (
    ROLLBACK_MARKER,
    ROLLED_BACK_DIR,
    finish_rollback,
    read_rollback_marker,
    rollback_folder,
    rolled_back_folders,
    write_rollback_marker,
)
from ._writeback import (
    Writeback,
)

__all__ = [
    "INDEX_NAME",
    "INDEX_VERSION",
    "LOCK_NAME",
    "MAX_PAYLOAD_NAME",
    "ROLLBACK_MARKER",
    "ROLLED_BACK_DIR",
    "DirectoryLock",
    "Entry",
    "Writeback",
    "check_payload_name",
    "checkpoint_name",
    "commit_payload",
    "ensure_directory",
    "file_checksum",
    "finish_rollback",
    "fsync_directory",
    "fsync_file",
    "io_error",
    "is_regular_file",
    "load_index",
    "parse_name",
    "parse_part_name",
    "part_files",
    "part_name",
    "pending_commits",
    "read_rollback_marker",
    "read_small",
    "recover_commits",
    "remove_files",
    "remove_leftovers",
    "rollback_folder",
    "rolled_back_folders",
    "save_index",
    "scan",
    "sidecar_name",
    "write_atomic",
    "write_payload",
    "write_rollback_marker",
]
