"""Run the reliability and security harness with counting and regenerate RELIABILITY.md.

Usage (from the repository root)::

    .venv/bin/python tools/reliability_report.py           # the default suite (a few minutes)
    .venv/bin/python tools/reliability_report.py --full    # and the slow variants (-m slow), 10-13 minutes
    .venv/bin/python tools/reliability_report.py --results DIR   # keep the raw counts
    .venv/bin/python tools/reliability_report.py --from DIR      # only re-render kept counts

It runs ``pytest tests/test_reliability_*.py`` with ``CKPTMGR_RELIABILITY_RESULTS`` set:
every harness test appends what it tried and what it saw (JSON lines, see
``tests/_reliability.py:record``), pytest writes a JUnit report, and this script turns
both into RELIABILITY.md: counts per category, where the random kills landed, the
faults injected by call and errno, the fuzz cases by damage and outcome, the findings
(fixed, and the manager bugs still open as strict xfails, read from the run itself),
and what was noticed and left alone. The exit status is pytest's.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
FILES = [
    "tests/test_reliability_crash.py",
    "tests/test_reliability_faults.py",
    "tests/test_reliability_corruption.py",
    "tests/test_reliability_hostile.py",
    "tests/test_reliability_concurrency.py",
]

# What the harness found and what was done about it. Each entry is a real finding of
# this harness; "found by" names the test that fails without the fix.
FIXED: list[dict[str, str]] = [
    {
        "id": "F1", "where": "storage.write_atomic", "found by": "test_every_call_of_a_save_failing (fsync dir, open dir)",
        "what": "A directory fsync failing after the rename raised, but left the checkpoint under its final "
                "name: the manager did not list it, retention never deleted it, and it reappeared at the next "
                "open although save() had raised.",
        "fix": "Undo the rename (unlink the file) before raising; a crash before the undo leaves a complete "
               "checkpoint, as any crash after a rename does.",
    },
    {
        "id": "F2", "where": "storage.commit_payload", "found by": "test_every_call_of_a_save_failing (rename commit>sidecar, fsync dir)",
        "what": "After the payload's rename, a failing sidecar rename or directory fsync left the payload and a "
                "pending commit record: the save raised, yet the next writer finished the commit and the "
                "checkpoint appeared; a payload replacing an earlier one of the same name read as corrupt meanwhile.",
        "fix": "Undo (payload first, then commit record or sidecar); only if the undo fails too does the record "
               "stay for the next writer, as after a crash.",
    },
    {
        "id": "F3", "where": "storage.remove_files", "found by": "test_every_call_of_a_save_failing (unlink payload)",
        "what": "Retention deleting a payload checkpoint whose payload could not be unlinked still deleted its "
                "sidecar: the payload became an untracked file that nothing would ever delete (a leak of a whole "
                "model file), and the manager's list disagreed with the disk.",
        "fix": "Keep the sidecar of a payload that could not be deleted: the checkpoint stays whole and is retried.",
    },
    {
        "id": "F4", "where": "codec.decode_sidecar", "found by": "test_sidecar_naming_a_path_outside_is_refused, fuzz (tampered sidecar)",
        "what": "A well-formed, checksummed sidecar could name its payload \"../x\" or \"/etc/passwd\": readers "
                "verified and returned a path outside the checkpoint directory (escape); a name with NUL raised "
                "a foreign ValueError while listing.",
        "fix": "Validate the payload name (storage.check_payload_name) when decoding; such a sidecar is corrupt "
               "(a CheckpointWarning names it, the checkpoint is not listed).",
    },
    {
        "id": "F5", "where": "storage.load_index / save_index", "found by": "fuzz (tampered index), test_index_entries_that_cannot_describe_their_file_are_not_trusted",
        "what": "The index cache had no integrity check and its entries were trusted: a flipped digit in a cached "
                "metric silently changed which checkpoint was best; an edited entry could point a payload outside "
                "the directory, give a checkpoint the step of another, or make the writer delete a real sidecar "
                "as an orphan.",
        "fix": "A CRC over the entries (a damaged index is rebuilt from the files); entries that cannot describe "
               "their file (step contradicting the file name, invalid payload name, name not hashing to the "
               "sidecar) are dropped, so the file itself is read.",
    },
    {
        "id": "F6", "where": "storage.load_index, recover_commits, read_small", "found by": "test_fifo_planted_in_the_directory_blocks_nobody, test_symlink_at_a_metadata_name_is_not_followed[index]",
        "what": "The index and commit records were opened following symbolic links and blocking: a FIFO planted as "
                ".ckptmgr-index.json hung every reader and writer at open; a FIFO planted as a .commit record hung "
                "the writer; a symlinked index was read from outside the directory.",
        "fix": "Read them with O_NOFOLLOW | O_NONBLOCK and refuse anything but a regular file.",
    },
    {
        "id": "F7", "where": "codec.read_file / verify_file", "found by": "test_hostile_file_is_refused[hard-links-multiplying-a-dataset], test_the_hostile_files_in_a_child_under_an_address_space_limit",
        "what": "One stored dataset under many HDF5 hard links passed every per-leaf check: a 1 MB file made the "
                "reader allocate 200 MB (and N times more with N links).",
        "fix": "Refuse a tree whose arrays add up to more bytes than the file has: before allocating anything "
               "(format 1), and in format 2 before each array is allocated (the running total; one pass fewer).",
    },
    {
        "id": "F8", "where": "codec.iter_leaves", "found by": "test_hostile_file_is_refused[many-items-and-a-repeated-key]",
        "what": "verify_file (CheckpointManager.verify) accepted a manifest with a dict key repeated 1,000 times "
                "(reading the same leaf 1,000 times) that read_file refuses.",
        "fix": "Duplicate dict keys are refused while the tree is validated, before any read.",
    },
    {
        "id": "F9", "where": "codec format 2 (packed leaves)", "found by": "test_fuzzed_damage_is_always_detected[packed] (tampered manifest: safe key, dtype)",
        "what": "A packed leaf is raw bytes at an offset: a re-signed manifest that renamed a key, or read an <f8 "
                "leaf as <c8, restored wrong data without an error (with a dataset per leaf, HDF5's name, type "
                "and shape had caught both).",
        "fix": "A packed leaf's checksum starts from the checksum of its path, dtype and shape (codec packed_seed).",
    },
    {
        "id": "F10", "where": "codec._write (format 2)", "found by": "test_truncated_newest_falls_back[unpacked-*] and the other corruption tests on the unpacked layout",
        "what": "HDF5 does not allocate a scalar dataset early; the writer took its missing offset as 0 and "
                "pwrote the value over the file's superblock (every such file unreadable).",
        "fix": "A 0-d leaf of its own is written by HDF5; a dataset whose allocation is missing or of the wrong "
               "size raises instead of being written at a guessed offset.",
    },
    {
        "id": "F11", "where": "codec._write (headers first)", "found by": "test_codec.py's round trips (a checksum mismatch in every big leaf), while the datasets were being moved to be created before any is allocated",
        "what": "A dataset's space was allocated by writing one element through HDF5, which keeps small writes "
                "in its sieve buffer and writes them out later: at close, over the array's first bytes.",
        "fix": "One flush of HDF5's buffers after the allocating writes, before the arrays are written over them "
               "(test_small_leaves_are_packed_and_big_ones_are_page_aligned_datasets checks the layout).",
    },
    {
        "id": "F12", "where": "storage.write_atomic, storage.commit_payload", "found by": "test_every_call_of_a_save_failing[*-again] (fsync dir; rename commit>sidecar), after a review found it by reading",
        "what": "Saving a step again (documented: it replaces the checkpoint; Keras' ModelCheckpoint saves one "
                "file name over and over) when the directory fsync failed after the rename: F1's undo unlinked "
                "the final name, which by then held the new file, so the earlier checkpoint was lost too.",
        "fix": "The file a rename replaces is kept under a second name (a hard link, named as a temp file) "
               "until the rename is durable, and put back if the commit fails; where there are no hard "
               "links, the new, complete file stays rather than none.",
    },
    {
        "id": "F13", "where": "_writer.SaveWriter.wait", "found by": "test_an_interrupted_wait_loses_no_error (a review found it by reading)",
        "what": "wait() forgot the background write before blocking on it: interrupted there (Ctrl-C), the "
                "write went on, and when it failed nothing ever raised its error; the step stayed pending.",
        "fix": "The write is forgotten only once its outcome is known.",
    },
    {
        "id": "F14", "where": "manager.save", "found by": "test_a_save_failing_before_its_write_does_not_count_as_best_or_as_saved, test_the_previous_background_write_failing_during_a_save_undoes_both (a review found them by reading)",
        "what": "A save that failed after deciding to save but before its write (a bad tree with async_save, a "
                "payload writer raising, the previous background write's error surfacing there) left its step "
                "the best, so best_only never saved that model again, and restarted the EverySeconds clock.",
        "fix": "Any failure after the decision undoes it (best, last save time), in either order with the save "
               "before it.",
    },
    {
        "id": "F15", "where": "_writer (interpreter exit)", "found by": "test_a_background_write_failing_at_interpreter_exit_is_reported_on_stderr, test_a_writer_exiting_without_close_gives_its_lease_up (a review found the first by reading)",
        "what": "A background write that failed at interpreter exit (no close()) vanished without a word; on "
                "s3:// every such write failed, its upload refused by thread pools already stopped.",
        "fix": "The flush runs from threading's exit hooks, before concurrent.futures stops its pools, and a "
               "failure is printed on stderr.",
    },
]

# manager.py bugs (the lead's module): each is pinned by a test, strict-xfail while open.
# The status printed is read from the run: xfailed = open, passed = fixed.
MANAGER: list[dict[str, str]] = [
    {
        "id": "M1", "where": "manager._apply_retention", "test": "test_reliability_faults::test_every_call_of_a_save_failing",
        "what": "A payload deleted by retention whose sidecar could not be unlinked stayed listed as 'not deleted' "
                "although readers and the next writer no longer saw it (the manager's view and the disk disagreed).",
        "fix": "Judge a deletion by the checkpoint's own file; the sidecar left behind is an orphan the next open removes.",
    },
    {
        "id": "M2", "where": "manager._refresh", "test": "test_reliability_corruption::test_a_sidecar_under_another_payloads_name",
        "what": "A sidecar whose payload name does not hash to its own file name (two sidecars swapped, one copied "
                "over another) was taken for an orphan: a reader skipped it and a writer deleted it, both without "
                "a word; the payload checkpoints were lost silently.",
        "fix": "Only a sidecar whose payload is missing is an orphan; on a name mismatch warn and keep the file.",
    },
    {
        "id": "M3", "where": "manager._best_locked / restore('best')", "test": "test_reliability_corruption::test_restore_best_when_the_best_is_damaged",
        "what": "restore('best') silently returned the runner-up when the best checkpoint's metadata was damaged, "
                "although the tracker said which step was best (restore(step) raises, restore() warns).",
        "fix": "A damaged best stays the best, so restore('best') raises CorruptCheckpointError naming its file "
               "(readers and writers alike; no fallback, no warning instead).",
    },
    {
        "id": "M4", "where": "manager._committed", "test": "test_reliability_corruption::test_resuming_below_a_damaged_newest_checkpoint",
        "what": "Saving a step below the newest one that no policy keeps (resuming after a fallback past a damaged "
                "newest checkpoint, or rolling back to the best) wrote the file, let retention delete it at once, "
                "and raised KeyError (async: CheckpointError wrapping KeyError).",
        "fix": "Retention never deletes the checkpoint just saved.",
    },
    {
        "id": "M5", "where": "manager._restore('best')", "test": "test_reliability_concurrency::test_restore_racing_retention[best]",
        "what": "A reader's restore('best') racing the writer's retention (a new best saved and the old one deleted "
                "between the reader's listing and its read) raised CheckpointNotFoundError; only 'latest' retried.",
        "fix": "List again and resolve the best anew on a deletion race.",
    },
    {
        "id": "M6", "where": "manager._load (payloads)", "test": "test_reliability_concurrency::test_a_reader_between_the_two_renames_of_a_replaced_payload",
        "what": "A reader restoring a payload while the writer replaced it under the same name (a fixed Keras "
                "filepath), between the two renames of the commit, read the old metadata with the new file: "
                "restore() warned of corruption and fell back (or raised when it was the only checkpoint).",
        "fix": "On a payload checksum mismatch, consult the pending commit record / the current sidecar and retry.",
    },
    {
        "id": "M7", "where": "manager._restore('latest')", "test": "test_reliability_concurrency::test_restore_racing_retention_while_listing",
        "what": "A reader whose listing itself raced retention (the only checkpoint listed was deleted before its "
                "metadata was read, the new one renamed in after the scan) found no candidate and raised "
                "CheckpointNotFoundError('No checkpoint in ...') without retrying; likewise a reader's `checkpoints` "
                "could come back empty. Seen by reader processes beside KeepLast(1) and payload writers.",
        "fix": "Treat an entry that vanished during the listing as a race: list again.",
    },
    {
        "id": "M8", "where": "manager._being_replaced / _load (payloads)", "test": "test_reliability_crash::test_a_reader_after_a_crash_between_the_two_renames",
        "what": "A regression of the fix for M6: a payload whose listed checksum fails is accepted when a pending "
                "commit record describes the file, and returned under the listed record. After a crash between "
                "the two renames of a payload replaced under its own name (the commit stays pending until a "
                "writer opens), readers get step 6's file as step 3, with step 3's metadata: wrong data, "
                "silently. Found by the random SIGKILLs (payload workload) and the deterministic crash points.",
        "fix": "A file that a pending commit describes belongs to that commit's step: treat the listed record as "
               "replaced (restore(step): not found; restore(): the next candidate), or serve it as the commit's "
               "step.",
    },
]

NOTICED: list[str] = [
    "**A payload replaced under its own name has a window.** Between the two renames of its commit the old "
    "metadata sits next to the new file, and after a crash there it stays so until the next writer opens "
    "and finishes the commit. Readers then reported that checkpoint as corrupt, with a warning, never "
    "returning it. 5344d13 handed them the new file under the old step instead (M8, above); since 091983f "
    "the old step is not found and restore() serves the file as the step its pending commit describes.",
    "**restore() of a payload returns a path.** Retention or a same-name save may delete or replace the file "
    "after restore() returned. This is inherent to returning a path. The concurrency readers count it as "
    "\"stale\".",
    "**A real read-only remount is impossible under a live writer.** Linux refuses `remount,ro` while a file "
    "is open for writing, and the writer holds its lock file open. So the remount is tested with writers "
    "closed, beside a live writer through a read-only bind mount, and under a live writer with injected EROFS "
    "(test_reliability_faults.py).",
    "**A payload writer is user code and follows symbolic links.** A link planted at the payload's temporary "
    "name would be written through before the commit refuses the non-regular result. The names carry 64 "
    "random bits, so nobody can plant one in advance. Native checkpoints, commit records and the index create "
    "their files exclusively and refuse (tested with predicted names).",
    "**The manifest is capped at MAX_MANIFEST_BYTES = 256 MiB.** JSON turns into Python objects at about "
    "17 bytes of objects per byte (a 14 MB manifest of one million `{\"t\": \"none\"}` items takes 248 MB). A "
    "hostile manifest at the cap could therefore take about 4 GiB. That is bounded, but large: lowering the "
    "cap or capping the number of tree nodes would tighten it. Left alone, because real manifests are about "
    "100 bytes per leaf.",
    "**codec.verify_file checks checksums and structure, not leaf kinds.** A re-signed manifest that calls a "
    "uint8 leaf \"str\" when it is not UTF-8 passes verify() but fails restore().",
    "**`restore(mmap=True)` does not check the arrays' checksums.** It checks the manifest's checksum, the "
    "layout and every offset and size against the file, then maps the file; checking the arrays would read "
    "every byte, which is what mapping avoids. A flipped bit in an array is returned as it is "
    "(test_mmap_restore_checks_the_metadata_and_verify_checks_the_arrays); `verify()` finds it. A file "
    "truncated while mapped would raise SIGBUS on access; ckptmgr never truncates a committed file, it only "
    "unlinks it, which leaves mapped arrays valid.",
    "**A consistent, re-signed edit is undetectable without a secret key.** This covers a manifest with its "
    "CRC recomputed that changes a metric, a dict key stored as `~N`, a container type or key order, and a "
    "sidecar with its step or metrics changed. The fuzz does not generate such edits. Every edit that "
    "contradicts the data, the file name or the layout is generated, with and without the CRC recomputed.",
    "**The index cache key is (size, mtime_ns).** A checkpoint replaced behind the writer's back by one of "
    "the same size within the same timestamp tick would keep its stale cached metadata (metrics, time). Its "
    "data is still verified on restore. Adding st_ino (or ctime) to the key would close this. Noticed in "
    "review, not tested.",
]

DURABILITY_RULE = """\
## The durability rule for directory entries

A file's data is durable once the file is fsynced, but its *name* is durable only once the directory that holds the name is fsynced: that is all POSIX promises, and ext4 with `data=writeback`, XFS and some network and FUSE file systems do lose an un-fsynced entry in a power cut. So ckptmgr follows one rule for every entry it makes:

- **A name made in directory D (a file created and renamed into place, a `mkdir`, a rename) is followed by an fsync of D before anything that depends on it is reported done.** A checkpoint is written under a temporary name, fsynced, renamed to its final name, and D is fsynced before `save()` (or, for `async_save=True`, `wait()`) returns. A payload's two renames (the file, then its commit record over the sidecar) are followed by one fsync of D.
- **A directory ckptmgr creates is made durable in its parent.** `CheckpointManager` creates the checkpoint directory and each missing parent one level at a time (`storage.ensure_directory`), fsyncing each new directory's parent, before the lock is taken and so before any save. A directory that appeared concurrently (made by another process) gets the same fsync: its maker may not have done it yet. Before this rule, a power cut after the first `save()` returned lost the whole new directory and every checkpoint in it (20 of 20 trials of a power-cut simulator); an existing, durable directory lost nothing in over 1,000 trials.
- **Deletions are made durable with one fsync of D** after the batch (retention, clean-up of leftovers); a deletion lost to a power cut only brings back a checkpoint retention had removed, which the next writer removes again.
- **The index (`.ckptmgr-index.json`) is the one exception:** it is a cache, rebuilt from the checkpoints when missing or stale, and is never fsynced.

Checked by `tests/test_durability.py`, which records the order of `mkdir`, `rename`/`replace` and directory `fsync` calls of a real manager (sync, async and payload saves, nested missing parents, relative paths) and asserts that every entry made is followed by an fsync of its parent before `save()`/`wait()` returns, and that a failing fsync of a new directory's parent is a `CheckpointError` naming the path; and by `tests/test_powercut.py`, a power-cut simulator (an `LD_PRELOAD` shim that logs every entry operation and fsync of a real child process; each cut point is replayed into the state a POSIX-minimum file system would keep, then restored).
"""

OBJECT_STORE_PROTOCOL = """\
## The commit protocol on object storage (`s3://`)

An object store has no rename and no fsync; a PUT that returned is durable and visible, and a multipart upload is invisible until it completes. The same promises are kept with its conditional writes instead (`ckptmgr/_object_directory.py`, `ckptmgr/storage/_object.py`):

- **Data first, under a unique name.** A save uploads its file as `data/ckpt-<step>-<16 hex>.h5` (multipart above 16 MiB, up to 4 parts in flight; a failed upload is aborted). No other save ever uses that name, so a crash mid-upload leaves at most an unreferenced object or an unfinished upload.
- **The commit marker last, create-only.** `ckpt-<step>.json` (metadata, the data object's name, size and ETag, a random token, a CRC) is written with `If-None-Match: *`, or with `If-Match: <etag>` on the marker it replaces when a step is saved again. Only steps with a marker exist for readers and writers; `save()` (or `wait()`) returns after it. A marker whose data object is missing or does not verify (size, ETag, every checksum) is a corrupt checkpoint: `restore()` falls back past it with a warning.
- **One writer per prefix: a lease.** `.ckptmgr-lease.json` is created with a create-only write, renewed every ttl/3 with compare-and-swap writes, and checked before each marker is written (a writer that lost it commits nothing). Expiry is judged on the server's clock only (its `Date` header minus the lease's `Last-Modified`): a SIGKILLed writer's lease is taken over between ttl and ttl + 2 s (ttl 30 s) after its last renewal; of two racing takers exactly one wins. A second live writer gets `DirectoryLockedError` naming the holder's host, pid and start time.
- **Clean-up is the new writer's.** Holding the lease, it deletes data objects no marker references and unfinished uploads older than half a ttl: a dead writer's, never a live one's (a live writer holds the lease).
- **Retention deletes a step's marker before its data.** A crash between the two leaves an unreferenced object, cleaned up later, never a marker without data.
- **The index is a cache** (`.ckptmgr-index.json`, markers by name and ETag), written with compare-and-swap and never trusted over the markers.
- **Failures are bounded.** Every request has a deadline (30 s plus the time the bytes need at 4 MiB/s) covering botocore's 3 attempts with backoff; a dead server, refused credentials, a missing bucket, a dropped or stalled connection or throttling raise `ObjectStoreError` (a `CheckpointIOError`, with an errno naming the cause) naming the URL. Nothing partial is visible, earlier steps are intact, and the manager works again once the server is back.

Checked against a real SeaweedFS server started by the tests (`tests/test_s3_server.py`: the server's own conditional-write behaviour, so an upgrade that drops it fails loudly; `tests/test_s3_store.py`: the primitives through a fault-injecting TCP proxy; `tests/test_s3_manager.py`: the manager, including a writer SIGKILLed during a multipart upload, whose every returned `save()` restores exactly after the takeover, and the server SIGKILLed mid-save).
"""

MULTI_PROCESS_PROTOCOL = """\
## The commit protocol across processes (`coordinator=`)

Several processes of one job (torchrun, JAX multi-process, TensorFlow multi-worker) save one checkpoint per step into one directory that every rank sees. They talk only through a `ckptmgr.Coordinator` (rank, world size, barrier, broadcast, all-gather of small JSON values, each with a timeout); the core imports no framework (`ckptmgr/coordinator.py`, `manager.py` `_save_coordinated`, `_reader.py` `_restore_coordinated`):

- **One decision.** A `save()` starts with one all-gather: every rank's step and `force`, and rank 0's decision (its save policy, its clock, its metrics, the tracker's state, a fresh 8-hex token). Ranks that called with different steps all raise `CoordinatorError`; a `force` at any rank (a pre-empted rank) saves the step on every rank; `EverySeconds` cannot diverge, since only rank 0's clock counts.
- **Parts first, durable.** `sharded=True`: each rank writes `ckpt-<step>.rank-<k>-of-<n>.<token>.h5` with the local commit protocol above (temporary file, fsync, rename, directory fsync) and reports its name, size and bytes (or its error) in a second all-gather. `sharded=False`: rank 0 writes the one copy as a plain `ckpt-<step>.h5`.
- **The commit record last.** Once every part is reported durable, rank 0 writes `ckpt-<step>.h5` holding the metadata and the list of parts (name, size, the token; each part's own manifest carries its step, rank, world size and token), with the same atomic protocol, then broadcasts the outcome: every rank returns the same `CheckpointInfo` or raises. A step exists only through its commit record: a crash at any instant leaves either the record with every part durable before it, or parts no record names, which rank 0 removes the next time it opens (it is the only writer: it holds the directory lock; the others write only their parts, and only between the two all-gathers). The token makes a step saved again use new part names, so a record never names a file being replaced.
- **Failures are bounded.** A rank that dies, stalls past the timeout or fails its part (disk full, a bad tree) makes the others raise within the coordinator's timeout (`CoordinatorError`; the failing rank raises its own error); rank 0 then deletes the parts of that save and commits nothing; the job can save again. The timeout must exceed a save's duration (the waits span the writes).
- **Restore together.** Rank 0 names the candidates (newest first for `"latest"`); for each, every rank reads and verifies its part (or the one copy), checking the part against the commit record (size, step, rank, world size, token, then every checksum), and an all-gather decides: the first step every rank could read is restored everywhere; a corrupt or missing part at one rank makes every rank fall back together, with a warning naming the part. A sharded checkpoint on another number of ranks raises, naming both numbers; `restore(step, rank=k)` reads one part without a coordinator.
- **Async saves** (`async_save=True`): each rank writes its share from a private copy on its background thread; the reports travel in the next collective call (the next `save`'s first all-gather, or `wait`, `restore`, `close`), where rank 0 writes the commit record and broadcasts the outcome, raising on every rank if any share failed. Until then the step is not listed anywhere.
- **Retention and the index are rank 0's**, after the commit: the commit record goes before the parts (a cut leaves orphan parts, never a listed step missing one), and the deletions run after the outcome is broadcast, so the other ranks do not wait for them.
- **Nothing is unpickled.** Messages are JSON text (TorchCoordinator sends it as uint8 tensors on a gloo group of its own, also in NCCL jobs; JaxCoordinator through `jax.distributed`'s key-value store; MultiWorkerCoordinator through the strategy's collectives, with `CommunicationOptions` timeouts).

**Cost as the world grows** (measured by `benchmarks/distributed.py` up to 1,024 ranks simulated as threads with `ThreadCoordinator`; see benchmarks/README.md, "Many processes"): per save, every rank takes part in 3 collectives (2 all-gathers, 1 broadcast) and sends about 105 bytes (rank 0 about 380 bytes: its decision and the outcome); a restore is 2 collectives. What grows with n: the bytes each rank receives (the all-gathers: about 105 KiB per rank at 1,024 ranks, twice that with TorchCoordinator's padding; gloo's all-gather is a ring of n - 1 hops), and at rank 0 the n + 1 files per step, the commit record (about 82 bytes per part: 86 KiB at 1,024 ranks) and retention's n unlinks per deleted step. Per-rank CPU stays small (about 11 ms per save and 17 ms per restore at 1,024 simulated ranks, rank 0 112 ms per save); nothing is O(n^2) per rank. On a real cluster at 1,024 ranks the save is bounded by the slowest rank's part write, then rank 0's commit (one small file, fsynced) and 3 ring collectives; on a network file system, the n unlinks of retention are the largest term, which is why they run after the outcome broadcast. Not done: a gather for the part reports (only rank 0 needs them; the protocol has no gather, so each rank receives all n), and a two-level (per-node) commit for world sizes beyond that.

Checked with real processes: `tests/test_distributed_torch.py` (torchrun, 2 ranks: sharded and replicated round trips, a rank SIGKILLed while writing a 32 MiB part then a new job resuming from the last step both ranks committed, `examples/torch_ddp.py` with rank 1 SIGKILLed from outside and `--max-restarts=1` ending bit-identical to an uninterrupted run, ranks at different speeds under `EverySeconds`, a corrupt part at one rank, a rank that exits or stalls), `tests/test_jax_coordinator.py` (2 JAX processes), `tests/test_keras_multiworker.py` (2 TensorFlow workers killed and resumed bit-identical), the coordinators' own tests (a dead or stalled peer raises within the timeout), and `tests/test_coordinated.py` (the manager's side with ranks as threads: failed parts, orphans, world sizes, hostile part lists).
"""

INVARIANTS = [
    ("1. final name only when complete and durable", "crash points before/after write, fsync, rename, dir fsync; random kills; "
     "order of mkdir/rename/directory fsync (test_durability.py); power-cut replay (test_powercut.py)"),
    ("2. killed at any instant: every promised checkpoint survives, leftovers ignored and cleaned", "crash points; random kills (reader view before recovery, writer view after; "
     "a KeepLast | KeepEvery training loop checked exactly after each kill)"),
    ("3. metadata in every checkpoint; index is a rebuildable cache", "crash points at the index update; fuzz (tampered/garbled index); index faults"),
    ("4. restore verifies; fallback with a warning; restore(step) raises", "fuzz (1,000+ damages); hand-made damages (bit flips, truncation, swapped and empty files); "
     "hostile files in a directory"),
    ("5. retention only after commit, never the latest or best", "crash points inside retention; random kills (model of what must remain)"),
    ("6. best, its step and patience survive restarts", "every crash check compares the tracker with an uninterrupted run"),
    ("7. one writer; readers need no lock", "contending writers; take-over after kills mid-save; reader processes"),
    ("8. nothing unpickled; no escape; bounded memory", "hostile files, names, links, FIFOs, pickles; tracemalloc and RLIMIT_AS"),
    ("9. OS errors surface as CheckpointError naming path and cause; nothing earlier touched; usable after", "every call of a save failing with EIO/EACCES/ENOSPC, sync and async; EROFS; ENOSPC"),
]


# ------------------------------------------------------------------------ running


def run_harness(full: bool, results: Path, extra: list[str]) -> tuple[int, float, Path]:
    junit = results / "junit.xml"
    env = dict(os.environ, CKPTMGR_RELIABILITY_RESULTS=str(results))
    if full:
        env["CKPTMGR_SLOW"] = "1"
    else:
        env.pop("CKPTMGR_SLOW", None)
    command = [sys.executable, "-m", "pytest", *FILES, "-q", "-rfEX", "-p", "no:cacheprovider",
               f"--junitxml={junit}", "-o", "junit_family=xunit2", *extra]
    print("$", " ".join(command), flush=True)
    started = time.monotonic()
    code = subprocess.call(command, cwd=ROOT, env=env)
    return code, time.monotonic() - started, junit


def load_counts(results: Path) -> list[dict[str, Any]]:
    rows = []
    for path in sorted(results.glob("results-*.jsonl")):
        rows += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return rows


def load_junit(junit: Path) -> dict[str, Any]:
    out: dict[str, Any] = {"outcomes": Counter(), "xfails": {}, "failures": [], "time": Counter(), "by_test": {}}
    if not junit.exists():
        return out
    for case in ET.parse(junit).getroot().iter("testcase"):
        name = f"{case.get('classname', '').split('.')[-1]}::{case.get('name')}"
        out["time"][case.get("classname", "").split(".")[-1]] += float(case.get("time") or 0)
        skipped = case.find("skipped")
        if case.find("failure") is not None or case.find("error") is not None:
            outcome = "failed"
            out["failures"].append(name)
        elif skipped is not None and skipped.get("type") == "pytest.xfail":
            outcome = "xfailed"
            out["xfails"][name] = skipped.get("message", "")
        elif skipped is not None:
            outcome = "skipped"
        else:
            outcome = "passed"
        out["outcomes"][outcome] += 1
        out["by_test"][name] = outcome
    return out


# ---------------------------------------------------------------------- reporting


def _slow(test: str) -> bool:
    return "long" in test


def _sum(rows: list[dict[str, Any]], area: str, key: str | None = None, *, prefix: str | None = None,
         slow: bool | None = None) -> int:
    total = 0
    for row in rows:
        if row["area"] != area or (slow is not None and _slow(row["test"]) != slow):
            continue
        for k, v in row["counts"].items():
            if isinstance(v, (int, float)) and ((key is not None and k == key) or (prefix and k.startswith(prefix))):
                total += int(v)
    return total


def _both(rows: list[dict[str, Any]], area: str, key: str | None = None, *, prefix: str | None = None) -> tuple[int, int]:
    return _sum(rows, area, key, prefix=prefix, slow=False), _sum(rows, area, key, prefix=prefix)


def _fmt(pair: tuple[int, int], full: bool) -> tuple[str, str]:
    default, everything = pair
    return f"{default:,}", (f"{everything:,}" if full else "(run with --full)")


def _table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _merged(rows: list[dict[str, Any]], area: str, *, slow: bool | None = None) -> Counter[str]:
    merged: Counter[str] = Counter()
    for row in rows:
        if row["area"] == area and (slow is None or _slow(row["test"]) == slow):
            for k, v in row["counts"].items():
                if isinstance(v, (int, float)):
                    merged[k] += int(v)
    return merged


def _commit() -> str:
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "ckptmgr", "tests"],
                           cwd=ROOT, capture_output=True, text=True)
    return head.stdout.strip() + (" with local changes" if dirty.stdout.strip() else "")


def render(rows: list[dict[str, Any]], junit: dict[str, Any], *, full: bool, seconds: float, code: int,
           when: str, commit: str) -> str:
    outcomes = junit["outcomes"]
    outcome_text = ", ".join(f"{n} {k}" for k, n in sorted(outcomes.items())) or "no JUnit report"
    now = when
    mode = "default suite and slow variants (--full)" if full else "default suite"
    out: list[str] = []
    out.append("# Reliability and security harness\n")
    out.append(
        "This is the proof, with numbers, that the invariants of DESIGN.md hold under crashes, OS errors, "
        "damaged and hostile files and concurrent processes. It also lists what the harness found and fixed. "
        "**Generated. Do not edit.** To regenerate:\n\n"
        "```\n"
        ".venv/bin/python tools/reliability_report.py          # default suite, about 3 minutes on 2 cores\n"
        ".venv/bin/python tools/reliability_report.py --full   # and the slow variants (-m slow), 10-13 minutes\n"
        "```\n"
    )
    out.append(f"Last run: {now}, at `{commit}`, {mode}, {seconds / 60:.1f} minutes; pytest: {outcome_text}"
               f"{'' if code == 0 else f' (exit status {code})'}.\n")
    if junit["failures"]:
        out.append("**Failing in this run:** " + ", ".join(f"`{f}`" for f in junit["failures"]) + "\n")
    out.append(DURABILITY_RULE)
    out.append(OBJECT_STORE_PROTOCOL)
    out.append(MULTI_PROCESS_PROTOCOL)

    # ---------------------------------------------------------------- summary
    crash_points = _both(rows, "crash-points", "crash points")
    kills = _both(rows, "random-kills", "kills")
    faults = _both(rows, "faults", "faults injected")
    real_fs = len([r for r in rows if r["area"] == "faults" and r["test"].startswith(("read-only", "disk-full"))])
    corrupt = _both(rows, "corruption", "cases")
    hostile = _both(rows, "hostile", "cases")
    restores = _both(rows, "concurrency", prefix="restores of ")
    contended = _both(rows, "concurrency", prefix="acquired")[0] + _both(rows, "concurrency", prefix="refused")[0]
    take_overs = _both(rows, "concurrency", "writers killed mid-save")
    summary = [
        ["Crash, deterministic", "`os._exit` right before and right after every hooked call of the commit "
         "protocol (write, fsync, rename, directory fsync, index update, delete; payload phases; the async "
         "writer's thread; recovery at open), then reader, writer and next-save checks", *_fmt(crash_points, full)],
        ["Crash, random", "SIGKILL at random instants of five workloads (save, retention, index update, payload "
         "commits, async writer), with start-up and recovery; reader view, then writer view of a copy",
         *_fmt(kills, full)],
        ["Faults, injected", "EIO / EACCES / ENOSPC at every open, write, fsync, rename, link and unlink of a "
         "save of a new step and of a step saved again (native and payload, sync and async), also with the "
         "clean-up failing, and in the index update",
         *_fmt(faults, full)],
        ["Faults, real file systems", "read-only tmpfs remount (EROFS), read-only bind mount beside a live "
         "writer, full tmpfs (ENOSPC) under payload saves, sync and async", *_fmt((real_fs, real_fs), full)],
        ["Corruption fuzz", "bit flips, truncation, deleted files, swapped and copied files, tampered manifests, "
         "HDF5 structure, sidecars and index; every step, restore() and restore('best') checked against what "
         "was saved", *_fmt(corrupt, full)],
        ["Hostile input", "crafted HDF5 files (links, virtual and external storage, object/vlen types, absurd "
         "sizes, hard-link amplification, deep nesting, hostile dtype strings) and directory entries (names "
         "outside, links, FIFOs, pickles, huge metadata)", *_fmt(hostile, full)],
        ["Concurrency: readers", "restores by reader processes (latest, best, by step) while a writer saves "
         "and deletes (retention, async, payloads under their own and under a shared name, index updates)",
         *_fmt(restores, full)],
        ["Concurrency: writers", "lock attempts by three contending writer processes; writers killed inside "
         "their save loop and taken over at the first try", f"{contended:,} attempts, {take_overs[0]:,} take-overs",
         "same"],
    ]
    out.append("## Counts per category\n")
    out.append(_table(["Category", "What was tried", "Default run", "With slow variants"], summary) + "\n")
    out.append("Every case passed its checks unless listed under *Failing in this run* above. The open manager "
               "bugs are strict xfails: they are listed below and are not counted as passes.\n")

    # ---------------------------------------------------------------- findings
    out.append("## What was found and fixed\n")
    for f in FIXED:
        out.append(f"- **{f['id']} `{f['where']}`**: {f['what']} *Fix:* {f['fix']} *Found by:* {f['found by']}.")
    out.append("")
    out.append("## Bugs found in manager.py\n")
    out.append("manager.py belongs to the lead, so these were reported rather than fixed here. Each one is pinned "
               "by a test that is marked `xfail(strict=True)` while the bug is open: the test starts to fail "
               "once the bug is fixed, and the lead then removes the marker. The status below is read from this "
               "run.\n")
    rows_m = []
    for m in MANAGER:
        outcomes = {o for name, o in junit["by_test"].items() if name == m["test"] or name.startswith(m["test"] + "[")}
        if "failed" in outcomes:
            status = "**failing**"
        elif "xfailed" in outcomes:
            status = "open (strict xfail)"
        elif outcomes == {"passed"}:
            status = "fixed (the test passes)"
        else:
            status = "not run"
        rows_m.append([m["id"], f"`{m['where']}`", m["what"], m["fix"], f"`{m['test']}`", status])
    out.append(_table(["", "Where", "What", "Fix", "Pinned by", "Status"], rows_m) + "\n")
    unlisted = sorted(n for n in junit["xfails"] if not any(n.startswith(m["test"]) for m in MANAGER))
    if unlisted:
        out.append("Other strict xfails in this run: " + ", ".join(f"`{n}`" for n in unlisted) + "\n")
    out.append("## Noticed and left alone\n")
    out += [f"- {n}" for n in NOTICED]
    out.append("")

    # ---------------------------------------------------------------- details
    out.append("## Details\n")
    out.append("### Crash points (deterministic)\n")
    det = [r for r in rows if r["area"] == "crash-points"]
    table = []
    for r in det:
        c = r["counts"]
        calls = Counter({k.split(": ", 1)[1].split(" ", 1)[1]: v for k, v in c.items() if k.startswith("point: before")})
        table.append([r["test"], str(c.get("calls", 0)), str(c.get("crash points", 0)),
                      ", ".join(f"{k} x{v}" for k, v in sorted(calls.items())),
                      str(c.get("reader: replaced payload is no longer the old step (commit window)", 0))])
    out.append(_table(["Workload", "Calls", "Crash points", "Calls crashed before and after",
                       "Reader after a crash between a replaced payload's renames: old step not found"],
                      table) + "\n")

    out.append("### Random SIGKILLs\n")
    kill_rows = []
    landed_all: Counter[str] = Counter()
    for r in [r for r in rows if r["area"] == "random-kills"]:
        c = r["counts"]
        landed = Counter({k[len("landed: "):]: v for k, v in c.items() if k.startswith("landed: ")})
        landed_all += landed
        kill_rows.append([r["test"], str(c.get("kills", 0)), str(c.get("kills during start-up", 0)),
                          str(c.get("steps promised", 0)), str(c.get("writer: checkpoints verified", 0))])
    out.append(_table(["Workload", "Kills", "During start-up", "Steps promised", "Checkpoints verified after kills"],
                      kill_rows) + "\n")
    out.append("Where the kills landed (the innermost hooked call or phase in progress; \"write tmp\" is the HDF5 "
               "write of a native checkpoint):\n")
    out.append(_table(["Landed in", "Kills"], [[k, str(v)] for k, v in landed_all.most_common()]) + "\n")

    out.append("### Faults\n")
    fault_rows = []
    for r in [r for r in rows if r["area"] == "faults"]:
        c = r["counts"]
        injected = {k[len("injected: "):]: v for k, v in c.items() if k.startswith("injected: ")}
        ops = ", ".join(f"{k} {v}" for k, v in sorted(injected.items()) if k in ("open", "write", "fsync", "rename", "unlink"))
        other = ", ".join(f"{k} {v}" for k, v in sorted(c.items()) if not k.startswith("injected: ") and isinstance(v, int))
        fault_rows.append([r["test"], ops or "-", other])
    out.append(_table(["Test", "Injected at", "Outcome counts"], fault_rows) + "\n")

    out.append("### Corruption fuzz\n")
    for label, slow in (("default run", False), ("slow variant", True)):
        merged = _merged(rows, "corruption", slow=slow)
        if not merged:
            continue
        cases = sorted((k[len("case: "):], v) for k, v in merged.items() if k.startswith("case: "))
        results = sorted((k, v) for k, v in merged.items() if not k.startswith("case: ") and k not in ("cases", "failures"))
        out.append(f"{label}: {merged['cases']:,} cases, {merged['failures']} failures.\n")
        out.append(_table(["Damage", "Cases"], [[k, f"{v:,}"] for k, v in cases]) + "\n")
        out.append(_table(["Outcome", "Count"], [[k, f"{v:,}"] for k, v in results]) + "\n")

    out.append("### Hostile input\n")
    hostile_merged: Counter[str] = Counter()
    for r in [r for r in rows if r["area"] == "hostile"]:
        for k, v in r["counts"].items():
            if isinstance(v, int):
                hostile_merged[f"{r['test']}: {k}"] += v
    out.append(_table(["Case", "Count"], [[k, f"{v:,}"] for k, v in sorted(hostile_merged.items())]) + "\n")

    out.append("### Concurrency\n")
    conc = []
    for r in [r for r in rows if r["area"] == "concurrency"]:
        conc.append([r["test"], ", ".join(f"{k} {v}" for k, v in sorted(r["counts"].items()))])
    out.append(_table(["Test", "Counts"], conc) + "\n")

    out.append("## Invariants and where they are exercised\n")
    out.append(_table(["DESIGN.md invariant", "Exercised by"], [[a, b] for a, b in INVARIANTS]) + "\n")
    out.append("## Time per file (this run)\n")
    out.append(_table(["File", "Seconds"], [[k, f"{v:.0f}"] for k, v in sorted(junit["time"].items())]) + "\n")
    out.append("Other harnesses that this one builds on, and does not repeat: tests/test_lock.py, "
               "test_manager.py, test_codec.py, test_durability.py, test_powercut.py.\n")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="also run the slow variants (-m slow)")
    parser.add_argument("--results", type=Path, help="keep the raw counts (JSON lines) and JUnit XML here")
    parser.add_argument("--from", dest="source", type=Path, help="re-render the counts kept by an earlier --results")
    parser.add_argument("--output", type=Path, default=ROOT / "RELIABILITY.md")
    parser.add_argument("pytest_args", nargs="*", help="passed to pytest (e.g. -x)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="ckptmgr-reliability-") as scratch:
        if args.source is not None:
            results = args.source
            run = json.loads((results / "run.json").read_text())
            code, seconds, full = int(run["code"]), float(run["seconds"]), bool(run["full"])
            when, commit, junit = str(run["when"]), str(run["commit"]), results / "junit.xml"
        else:
            results = args.results or Path(scratch)
            results.mkdir(parents=True, exist_ok=True)
            for stale in results.glob("results-*.jsonl"):
                stale.unlink()
            full = args.full
            when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
            commit = _commit()
            code, seconds, junit = run_harness(full, results, args.pytest_args)
            (results / "run.json").write_text(json.dumps(
                {"code": code, "seconds": seconds, "full": full, "when": when, "commit": commit}))
        rows = load_counts(results)
        text = render(rows, load_junit(junit), full=full, seconds=seconds, code=code, when=when, commit=commit)
    args.output.write_text(re.sub(r"\n{3,}", "\n\n", text).rstrip() + "\n")
    print(f"wrote {args.output} ({len(rows)} result records, pytest exit {code})")
    return code


if __name__ == "__main__":
    sys.exit(main())
