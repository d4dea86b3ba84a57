"""CheckpointManager on an ``s3://`` location, against a real S3 server (SeaweedFS).

The same manager as on a local disk (policies, metrics, async saving, read_only, restore
fallback, CLI) through ``ckptmgr._object_directory``: checkpoints uploaded under unique
names and committed by a marker written last; a lease for one writer; a SIGKILLed writer
taken over, its every returned save restorable and its leftovers cleaned; a corrupt or
missing data object skipped by restore; the server killed mid-save. Tests needing the
server skip (through the ``s3_server`` fixture) where SeaweedFS or s3fs is not installed.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import ckptmgr
from ckptmgr import (
    CheckpointError,
    CheckpointNotFoundError,
    CheckpointWarning,
    CorruptCheckpointError,
    DirectoryLockedError,
    ObjectStoreError,
)

MiB = 2**20
REPO = Path(__file__).resolve().parents[1]
CHILD_TIMEOUT = 120.0

# The state a test saves at a step: nested, many small arrays of several dtypes, one big
# array (``big`` float64 elements), scalars, str, bytes, None. Shared with the child
# process of the kill test, which builds the same states from the same source.
STATE_SOURCE = r'''
import numpy as np

def make_state(step, big=1000):
    rng = np.random.default_rng(step)
    return {
        "params": {f"layer{i}": {"w": rng.standard_normal((8, 4)).astype(np.float32),
                                 "b": rng.integers(-5, 5, 4, dtype=np.int16)} for i in range(60)},
        "opt": [rng.standard_normal(big), (np.bool_(step % 2 == 0), np.uint8(step % 256))],
        "meta": {"step": step, "name": f"run-{step}", "blob": bytes([step % 256]) * 3, "none": None,
                 "lr": 1e-3 / (step + 1)},
    }
'''
_namespace: dict[str, Any] = {}
exec(STATE_SOURCE, _namespace)  # our own constant source, shared with the child process
make_state = _namespace["make_state"]


@pytest.fixture
def s3(s3_server: Any, s3_bucket: str) -> Any:
    """``s3.url`` (a fresh prefix), ``s3.options`` (storage_options), ``s3.client`` (botocore,
    for looking behind ckptmgr's back), ``s3.names()`` (every object under the prefix)."""

    class Location:
        bucket = s3_bucket
        prefix = "runs/exp1"
        url = f"s3://{s3_bucket}/runs/exp1"
        options = s3_server.storage_options()
        client = s3_server.client(attempts=3)

        def names(self) -> list[str]:
            response = self.client.list_objects_v2(Bucket=self.bucket, Prefix=self.prefix + "/")
            return sorted(o["Key"][len(self.prefix) + 1:] for o in response.get("Contents", []))

        def uploads(self) -> list[str]:
            response = self.client.list_multipart_uploads(Bucket=self.bucket, Prefix=self.prefix + "/")
            return [u["Key"] for u in response.get("Uploads", []) or []]

        def key(self, url: str) -> str:
            return url.removeprefix(f"s3://{self.bucket}/")

    return Location()


def _markers(names: list[str]) -> list[str]:
    return [n for n in names if n.startswith("ckpt-")]


def _data(names: list[str]) -> list[str]:
    return [n for n in names if n.startswith("data/")]


# ------------------------------------------------------------------- round trips


def test_save_and_restore_are_exact_and_the_layout_is_as_documented(s3: Any, tree_equal: Any) -> None:
    big = make_state(7, big=5 * MiB)  # 40 MiB of float64: a multipart upload, parts in flight
    with ckptmgr.CheckpointManager(s3.url, storage_options=s3.options) as mgr:
        assert mgr.directory == s3.url and isinstance(mgr.directory, str)
        assert ".ckptmgr-lease.json" in s3.names()  # held while open
        info = mgr.save(7, big, metrics={"loss": 0.5})
        small = make_state(8)
        mgr.save(8, small)
        assert info is not None and info.path.name.startswith("ckpt-000000007-") and info.path.name.endswith(".h5")
        assert str(info.path).startswith(s3.url + "/data/") and str(info.metadata_path) == s3.url + "/ckpt-000000007.json"
        tree_equal(mgr.restore(7), big)
        tree_equal(mgr.restore(), small)
        tree_equal(mgr.restore(7, select="params/layer3"), {"params": {"layer3": big["params"]["layer3"]}})
        mapped = mgr.restore(7, mmap=True)
        tree_equal(mapped, big)
        assert mgr.verify(7).step == 7
        assert [leaf.key_path for leaf in mgr.describe(8).leaves or ()][:2] == [("params", "layer0", "w"),
                                                                              ("params", "layer0", "b")]
    names = s3.names()
    assert _markers(names) == ["ckpt-000000007.json", "ckpt-000000008.json"]
    assert len(_data(names)) == 2 and ".ckptmgr-index.json" in names
    assert ".ckptmgr-lease.json" not in names  # released at close
    assert s3.uploads() == []
    marker = json.loads(s3.client.get_object(Bucket=s3.bucket, Key=f"{s3.prefix}/ckpt-000000007.json")["Body"].read())
    body = json.loads(marker["ckptmgr_marker"])
    assert body["step"] == 7 and body["metrics"] == {"loss": 0.5} and body["data"] == f"data/{info.path.name}"
    assert {"size", "data_etag", "token", "nbytes", "time"} <= body.keys()
    with ckptmgr.CheckpointManager(s3.url, storage_options=s3.options, read_only=True) as reader:
        assert [c.step for c in reader.checkpoints] == [7, 8]
        tree_equal(reader.restore(7), big)
    del mapped


def test_saving_a_step_again_replaces_it_and_removes_its_old_data(s3: Any, tree_equal: Any) -> None:
    with ckptmgr.CheckpointManager(s3.url, storage_options=s3.options) as mgr:
        first = mgr.save(3, make_state(1))
        second = mgr.save(3, make_state(2))
        assert first is not None and second is not None and first.path != second.path
        tree_equal(mgr.restore(3), make_state(2))
        assert _data(s3.names()) == [f"data/{second.path.name}"]
    with ckptmgr.CheckpointManager(s3.url, storage_options=s3.options) as mgr:
        tree_equal(mgr.restore(3), make_state(2))


def test_retention_deletes_a_steps_marker_and_data_and_nothing_else(s3: Any) -> None:
    s3.client.put_object(Bucket=s3.bucket, Key=f"{s3.prefix}/notes.txt", Body=b"not ours")
    s3.client.put_object(Bucket=s3.bucket, Key=f"{s3.prefix}2/ckpt-000000001.json", Body=b"a neighbour")
    losses = {1: 0.9, 2: 0.2, 3: 0.5, 4: 0.6, 5: 0.7, 6: 0.8}
    with ckptmgr.CheckpointManager(s3.url, storage_options=s3.options, keep=ckptmgr.KeepLast(2) | ckptmgr.KeepBest(1),
                                   monitor="loss") as mgr:
        saved = {}
        for step, loss in losses.items():
            info = mgr.save(step, make_state(step), metrics={"loss": loss})
            assert info is not None
            saved[step] = info.path.name
        assert [c.step for c in mgr.checkpoints] == [2, 5, 6]
    names = s3.names()
    assert _markers(names) == ["ckpt-000000002.json", "ckpt-000000005.json", "ckpt-000000006.json"]
    assert _data(names) == sorted(f"data/{saved[s]}" for s in (2, 5, 6))
    assert "notes.txt" in names
    neighbour = s3.client.list_objects_v2(Bucket=s3.bucket, Prefix=f"{s3.prefix}2/")["Contents"]
    assert [o["Key"] for o in neighbour] == [f"{s3.prefix}2/ckpt-000000001.json"]
    # prune and delete_all go through the same path; delete_all leaves only what is not ours.
    with ckptmgr.CheckpointManager(s3.url, storage_options=s3.options, monitor="loss") as mgr:
        assert [c.step for c in mgr.prune(ckptmgr.KeepLast(1))] == [5]
        assert _markers(s3.names()) == ["ckpt-000000002.json", "ckpt-000000006.json"]
        mgr.delete_all()
    assert s3.names() == ["notes.txt"]


def test_best_and_patience_survive_a_reopen(s3: Any, tree_equal: Any) -> None:
    with ckptmgr.CheckpointManager(s3.url, storage_options=s3.options, monitor="val_loss") as mgr:
        for step, loss in ((1, 0.5), (2, 0.3), (3, 0.4), (4, 0.45)):
            mgr.save(step, make_state(step), metrics={"val_loss": loss})
    with ckptmgr.CheckpointManager(s3.url, storage_options=s3.options, monitor="val_loss") as mgr:
        assert mgr.best is not None and mgr.best.step == 2
        assert mgr.tracker is not None and (mgr.tracker.best, mgr.tracker.best_step, mgr.tracker.wait) == (0.3, 2, 2)
        tree_equal(mgr.restore("best"), make_state(2))
        assert mgr.latest is not None and mgr.latest.step == 4
    reader = ckptmgr.CheckpointManager(s3.url, storage_options=s3.options, read_only=True)
    assert reader.best is not None and reader.best.step == 2 and reader.restore("best")["meta"]["step"] == 2


# ------------------------------------------------------------------ async saving


def test_async_save_returns_before_the_upload_and_wait_commits(s3: Any, s3_server: Any, s3_proxy: Any,
                                                               tree_equal: Any) -> None:
    options = s3_server.storage_options(endpoint_url=s3_proxy.endpoint_url)
    state = make_state(5, big=3 * MiB)
    with ckptmgr.CheckpointManager(s3.url, storage_options=options, async_save=True) as mgr:
        mgr.save(4, make_state(4))
        mgr.wait()
        s3_proxy.stall()  # no upload can make progress now
        try:
            started = time.monotonic()
            info = mgr.save(5, state)
            blocked = time.monotonic() - started
            assert info is not None and info.step == 5
            state["opt"][0][:] = 0  # the snapshot was taken: changing the state changes nothing
            # The marker is not there: the upload is held by the proxy (looked at directly).
            assert _markers(s3.names()) == ["ckpt-000000004.json"], blocked
        finally:
            s3_proxy.pass_through()
        mgr.wait()
        assert _markers(s3.names()) == ["ckpt-000000004.json", "ckpt-000000005.json"]
        assert [c.step for c in mgr.checkpoints] == [4, 5]
    with ckptmgr.CheckpointManager(s3.url, storage_options=s3.options) as mgr:
        tree_equal(mgr.restore(), make_state(5, big=3 * MiB))


# ------------------------------------------------------- readers and writers


def test_a_reader_polling_during_saves_sees_only_whole_checkpoints(s3: Any, tree_equal: Any) -> None:
    writer = ckptmgr.CheckpointManager(s3.url, storage_options=s3.options, keep=ckptmgr.KeepLast(2))
    writer.save(0, make_state(0))
    reader = ckptmgr.CheckpointManager(s3.url, storage_options=s3.options, read_only=True)
    failures: list[BaseException] = []

    def write() -> None:
        try:
            for step in range(1, 13):
                writer.save(step, make_state(step, big=64 * 1024))
        except BaseException as exc:  # reported by the main thread
            failures.append(exc)

    thread = threading.Thread(target=write)
    thread.start()
    restored = gone = 0
    try:
        deadline = time.monotonic() + 60
        while thread.is_alive() and time.monotonic() < deadline:
            for info in reader.checkpoints:
                assert info.corrupt is None, info
                try:
                    value = reader.restore(info.step)
                except CheckpointNotFoundError:
                    gone += 1  # deleted by the writer's retention since the listing
                    continue
                tree_equal(value, make_state(info.step) if info.step == 0 else make_state(info.step, big=64 * 1024))
                restored += 1
    finally:
        thread.join(timeout=60)
        writer.close()
    assert not failures, failures
    assert restored >= 3, (restored, gone)
    assert [c.step for c in reader.checkpoints] == [11, 12]


def test_a_second_live_writer_is_refused_naming_the_holder(s3: Any) -> None:
    with ckptmgr.CheckpointManager(s3.url, storage_options=s3.options) as mgr:
        mgr.save(1, make_state(1))
        with pytest.raises(DirectoryLockedError) as caught:
            ckptmgr.CheckpointManager(s3.url, storage_options=s3.options)
        message = str(caught.value)
        assert f"pid {os.getpid()}" in message and s3.url in message and "read_only=True" in message
        with ckptmgr.CheckpointManager(s3.url, storage_options=s3.options, read_only=True) as reader:
            assert [c.step for c in reader.checkpoints] == [1]
        mgr.save(2, make_state(2))  # the refused writer changed nothing
    with ckptmgr.CheckpointManager(s3.url, storage_options=s3.options) as mgr:  # released at close
        assert [c.step for c in mgr.checkpoints] == [1, 2]


def test_staging_directories_are_removed_only_once_their_process_is_gone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Told by the lock a live process holds on its directory's owner file, not by a pid
    (another PID namespace or host may share $TMPDIR)."""
    from ckptmgr import _object_directory

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    held = tmp_path / "ckptmgr-staging-held"
    held.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys\nfd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\n"
         "fcntl.flock(fd, fcntl.LOCK_EX)\nprint('locked', flush=True)\nsys.stdin.readline()\n",
         str(held / "owner.lock")], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
        old = time.time() - 3600
        os.utime(held / "owner.lock", (old, old))
        _object_directory._remove_dead_staging()
        assert held.is_dir(), "removed while its process held it"
    finally:
        holder.kill()
        holder.communicate(timeout=30)  # reaped, its pipes closed
    _object_directory._remove_dead_staging()
    assert not held.exists()


def test_a_writer_exiting_without_close_gives_its_lease_up(s3: Any, s3_server: Any) -> None:
    """As the OS does a local directory's lock: the next writer need not wait out the ttl."""
    child = STATE_SOURCE + "\nimport sys, ckptmgr\nmgr = ckptmgr.CheckpointManager(sys.argv[1], async_save=True)\n" \
        "mgr.save(1, make_state(1))\n"  # no close(), no wait(): exit flushes the write, then gives the lease up
    env = {**s3_server.client_env(), "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", child, s3.url], env=env, capture_output=True, text=True,
                          timeout=CHILD_TIMEOUT)
    assert done.returncode == 0, done.stderr
    assert ".ckptmgr-lease.json" not in s3.names()
    with ckptmgr.CheckpointManager(s3.url, storage_options=s3.options) as mgr:  # at once
        assert [c.step for c in mgr.checkpoints] == [1]


def test_a_writer_that_lost_its_lease_deletes_nothing(s3: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another writer took the lease over (this one was paused past its ttl, say): this
    one's saves, and its delete_all(), raise, and everything stays for the new holder."""
    monkeypatch.setenv("CKPTMGR_LEASE_TTL", "3")
    mgr = ckptmgr.CheckpointManager(s3.url, storage_options=s3.options)
    try:
        for step in (1, 2):
            mgr.save(step, make_state(step))
        intruder = {"host": "elsewhere", "pid": 4242, "since": time.time(), "ttl": 30, "token": "x"}
        s3.client.put_object(Bucket=s3.bucket, Key=f"{s3.prefix}/.ckptmgr-lease.json", Body=json.dumps(intruder))
        deadline = time.monotonic() + 20
        step = 2
        while True:  # the next renewal (within ttl / 3) finds the intruder
            step += 1
            try:
                mgr.save(step, make_state(step))
            except DirectoryLockedError as exc:
                assert "Lost the lease" in str(exc) or "Cannot renew" in str(exc), exc
                break
            assert time.monotonic() < deadline, "the lost lease went unnoticed"
        before = s3.names()
        with pytest.raises(DirectoryLockedError):
            mgr.delete_all()
        assert s3.names() == before and _markers(before)
    finally:
        with contextlib.suppress(ckptmgr.CheckpointError):
            mgr.close()
    assert s3.names() == before  # close() released nothing of the new holder's


def test_a_lease_lost_between_commit_and_retention_keeps_the_commit_and_deletes_nothing(s3: Any) -> None:
    """The commit checked the lease and wrote its marker; retention then finds the lease
    lost (injected there): save() returns the committed checkpoint, warns, deletes nothing."""
    with ckptmgr.CheckpointManager(s3.url, storage_options=s3.options, monitor="loss",
                                   keep=ckptmgr.KeepLast(1)) as mgr:
        for step, loss in [(1, 0.5), (2, 0.6)]:
            mgr.save(step, make_state(step), metrics={"loss": loss})
        before = s3.names()

        def lost() -> None:
            raise DirectoryLockedError("Lost the lease (injected)", lock_path=s3.url)

        with pytest.MonkeyPatch.context() as patch, pytest.warns(CheckpointWarning, match="not deleting"):
            patch.setattr(mgr._dir, "_check_lease", lost)
            info = mgr.save(3, make_state(3), metrics={"loss": 0.1})
        assert info is not None and info.step == 3
        assert mgr.tracker is not None and (mgr.tracker.best, mgr.tracker.best_step) == (0.1, 3)
        assert set(before) < set(s3.names())  # step 3 added, nothing of 1 and 2 deleted
        with ckptmgr.CheckpointManager(s3.url, storage_options=s3.options, read_only=True) as reader:
            assert 3 in [c.step for c in reader.checkpoints]


CHILD = STATE_SOURCE + r'''
import sys, ckptmgr
mgr = ckptmgr.CheckpointManager(sys.argv[1])
step = 0
while True:
    step += 1
    state = make_state(step, big=int(sys.argv[2]))
    print(f"saving {step}", flush=True)
    mgr.save(step, state)
    print(f"saved {step}", flush=True)
'''


def _read_line(proc: subprocess.Popen[str], deadline: float) -> str:
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
        if ready:
            line = proc.stdout.readline()
            if not line:
                raise AssertionError(f"child exited with {proc.wait(timeout=10)}: {proc.stderr.read() if proc.stderr else ''}")
            return line.strip()
    raise AssertionError("child did not report in time")


def test_a_sigkilled_writer_is_taken_over_and_every_returned_save_restores(
    s3: Any, s3_server: Any, monkeypatch: pytest.MonkeyPatch, tree_equal: Any
) -> None:
    ttl = 3.0
    big = 3 * MiB  # 24 MiB: two parts; the kill lands while a save is being written or uploaded
    # Another program's files under data/, and its upload in progress: never ckptmgr's to clean.
    s3.client.put_object(Bucket=s3.bucket, Key=f"{s3.prefix}/data/train.csv", Body=b"x,y\n1,2\n")
    foreign = s3.client.create_multipart_upload(Bucket=s3.bucket, Key=f"{s3.prefix}/data/big.parquet")["UploadId"]
    env = {**s3_server.client_env(), "CKPTMGR_LEASE_TTL": str(ttl), "PYTHONPATH": str(REPO)}
    staged_before = set(Path(tempfile.gettempdir()).glob("ckptmgr-staging-*"))
    proc = subprocess.Popen([sys.executable, "-c", CHILD, s3.url, str(big)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    returned: list[int] = []
    try:
        deadline = time.monotonic() + CHILD_TIMEOUT
        while _read_line(proc, deadline) != "saved 3":
            pass
        # Kill it mid-upload: once a multipart upload is in flight (polled, with a deadline).
        while len(s3.uploads()) < 2:
            assert time.monotonic() < deadline and proc.poll() is None, "no upload seen in flight"
        os.kill(proc.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        staging = set(Path(tempfile.gettempdir()).glob("ckptmgr-staging-*")) - staged_before  # the child's
        assert proc.stdout is not None
        for line in proc.stdout.read().split("\n"):  # what it reported before it died
            kind, _, step = line.partition(" ")
            if kind == "saved":
                returned.append(int(step))
        returned = [1, 2, 3, *returned]
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()
    assert returned == list(range(1, len(returned) + 1)), returned

    assert len(s3.uploads()) > 1, "the kill did not land mid-upload"
    monkeypatch.setenv("CKPTMGR_LEASE_TTL", str(ttl))
    with pytest.raises(DirectoryLockedError, match=f"pid {proc.pid}"):
        ckptmgr.CheckpointManager(s3.url, storage_options=s3.options)  # not expired yet
    deadline = time.monotonic() + 30
    while True:  # polling with a deadline: the lease expires by the server's clock
        try:
            mgr = ckptmgr.CheckpointManager(s3.url, storage_options=s3.options)
            break
        except DirectoryLockedError:
            assert time.monotonic() < deadline, "the dead writer's lease was never taken over"
            time.sleep(0.25)
    waited = time.monotonic() - killed_at
    assert waited <= ttl + 2 + 3, waited  # ttl + 2 s by the lease's contract (+ slack for a busy machine)
    try:
        steps = [c.step for c in mgr.checkpoints]
        # Every step save() returned for is there; the one killed mid-save only if it was complete.
        assert steps[: len(returned)] == returned and steps[len(returned):] in ([], [len(returned) + 1]), steps
        for step in steps:
            tree_equal(mgr.restore(step), make_state(step, big=big))
        # The dead writer's leftovers are gone: no unreferenced data object, no unfinished
        # upload; the other program's file and upload are still there.
        names = s3.names()
        assert _markers(names) == [f"ckpt-{s:09d}.json" for s in steps]
        assert sorted(_data(names)) == sorted([*(s3.key(str(c.path)).removeprefix(s3.prefix + "/")
                                                 for c in mgr.checkpoints), "data/train.csv"])
        assert s3.uploads() == [f"{s3.prefix}/data/big.parquet"]
        # And its local staging copy (a whole checkpoint) is gone too, once a new one is made.
        assert staging and not any(p.exists() for p in staging), staging
        s3.client.abort_multipart_upload(Bucket=s3.bucket, Key=f"{s3.prefix}/data/big.parquet", UploadId=foreign)
        mgr.save(steps[-1] + 1, make_state(99))
    finally:
        mgr.close()


# -------------------------------------------------------------------- damage


def test_a_corrupt_or_missing_data_object_is_skipped_by_restore(s3: Any, tree_equal: Any) -> None:
    with ckptmgr.CheckpointManager(s3.url, storage_options=s3.options) as mgr:
        for step in (1, 2, 3):
            mgr.save(step, make_state(step, big=64 * 1024))
        paths = {c.step: str(c.path) for c in mgr.checkpoints}
    key3, key2 = s3.key(paths[3]), s3.key(paths[2])
    data = bytearray(s3.client.get_object(Bucket=s3.bucket, Key=key3)["Body"].read())
    data[len(data) // 2] ^= 0x40
    s3.client.put_object(Bucket=s3.bucket, Key=key3, Body=bytes(data))
    with ckptmgr.CheckpointManager(s3.url, storage_options=s3.options, read_only=True) as reader:
        with pytest.warns(CheckpointWarning, match="skipping corrupt checkpoint"):
            tree_equal(reader.restore(), make_state(2, big=64 * 1024))
        assert reader.restored is not None and reader.restored.step == 2
        with pytest.raises(CorruptCheckpointError, match=paths[3]):
            reader.restore(3)
        with pytest.raises(CorruptCheckpointError):
            reader.verify(3)
    s3.client.delete_object(Bucket=s3.bucket, Key=key2)
    with ckptmgr.CheckpointManager(s3.url, storage_options=s3.options) as mgr:
        # The writer's open found step 2's data missing: listed as corrupt.
        assert mgr.checkpoints[1].corrupt is not None and "missing" in mgr.checkpoints[1].corrupt
        with pytest.warns(CheckpointWarning) as caught:
            tree_equal(mgr.restore(), make_state(1, big=64 * 1024))
        assert len(caught) == 2 and paths[2] in str(caught[1].message)
        with pytest.raises(CorruptCheckpointError, match="missing"):
            mgr.restore(2)
    with (ckptmgr.CheckpointManager(s3.url, storage_options=s3.options, read_only=True) as reader,
          pytest.raises(CorruptCheckpointError, match=f"{paths[2]}: its data object is missing")):
        reader.restore(2)


# -------------------------------------------------------------------- errors


def test_a_missing_bucket_and_bad_credentials_are_named_at_construction(s3: Any, s3_server: Any) -> None:
    url = "s3://no-such-bucket-ckptmgr/run"
    with pytest.raises(ObjectStoreError) as caught:
        ckptmgr.CheckpointManager(url, storage_options=s3.options)
    assert caught.value.errno == errno.ENOENT and url in str(caught.value) and "does not exist" in str(caught.value)
    for read_only in (False, True):
        bad = s3_server.storage_options(secret="wrong-secret")
        with pytest.raises(ObjectStoreError) as caught:
            ckptmgr.CheckpointManager(s3.url, storage_options=bad, read_only=read_only)
        assert caught.value.errno == errno.EACCES and s3.url in str(caught.value), caught.value
    with pytest.raises(CheckpointNotFoundError, match="nothing of ckptmgr's"):
        ckptmgr.CheckpointManager(s3.url, storage_options=s3.options, read_only=True)


def test_the_server_killed_mid_save_raises_and_the_manager_recovers(s3: Any, s3_server: Any, s3_proxy: Any,
                                                                    tree_equal: Any) -> None:
    options = s3_server.storage_options(endpoint_url=s3_proxy.endpoint_url)
    mgr = ckptmgr.CheckpointManager(s3.url, storage_options=options, async_save=True)
    try:
        mgr.save(1, make_state(1))
        mgr.wait()
        s3_proxy.stall()  # the next upload is in flight, held by the proxy ...
        mgr.save(2, make_state(2, big=3 * MiB))
        s3_server.stop()  # ... when the server is SIGKILLed
        s3_proxy.pass_through()
        started = time.monotonic()
        with pytest.raises(ObjectStoreError) as caught:
            mgr.wait()
        assert time.monotonic() - started < 40
        assert isinstance(caught.value, CheckpointError) and s3.url in str(caught.value)
        s3_server.start()
        with ckptmgr.CheckpointManager(s3.url, storage_options=s3.options, read_only=True) as reader:
            assert [c.step for c in reader.checkpoints] == [1]  # nothing partial
            tree_equal(reader.restore(1), make_state(1))
        mgr.save(2, make_state(2))  # usable again: the same step, retried
        mgr.wait()
        tree_equal(mgr.restore(), make_state(2))
        assert [c.step for c in mgr.checkpoints] == [1, 2]
    finally:
        if s3_server.proc is None:
            s3_server.start()
        mgr.close()


# ------------------------------------------------------------- what s3 lacks


@pytest.mark.parametrize("url", ["gs://bucket/run", "az://container/run", "file:///tmp/run", "memory://x"])
def test_urls_other_than_s3_are_refused_at_construction(url: str) -> None:
    with pytest.raises(ValueError, match="Only s3:// is supported") as caught:
        ckptmgr.CheckpointManager(url)
    assert repr(url) in str(caught.value)


def test_storage_options_need_a_url(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="storage_options only with an s3:// URL"):
        ckptmgr.CheckpointManager(tmp_path / "run", storage_options={"key": "k"})
    with pytest.raises(ValueError, match="Expected storage_options to be a mapping"):
        ckptmgr.CheckpointManager("s3://bucket/run", storage_options=["key"])  # type: ignore[arg-type]


def test_a_bad_lease_ttl_variable_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CKPTMGR_LEASE_TTL", "soon")
    with pytest.raises(ValueError, match="CKPTMGR_LEASE_TTL"):
        ckptmgr.CheckpointManager("s3://bucket/run")


def test_payloads_and_rollback_are_refused_on_s3(s3: Any, tmp_path: Path) -> None:
    with ckptmgr.CheckpointManager(s3.url, storage_options=s3.options) as mgr:
        mgr.save(1, {"w": 1.0})
        payload = ckptmgr.FilePayload("model.bin", lambda path: path.write_bytes(b"x"))
        with pytest.raises(CheckpointError, match=f"not supported on object storage yet \\({s3.url}\\)"):
            mgr.save(2, payload)
        with pytest.raises(CheckpointError, match="rollback\\(\\) is not supported on object storage"):
            mgr.rollback(1)
        assert mgr.rolled_back == []
        assert [c.step for c in mgr.checkpoints] == [1]


# ------------------------------------------------------------------------- CLI


def _cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ckptmgr", *args], env={**env, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=120, cwd=REPO)


def test_the_cli_works_on_an_s3_url_with_the_standard_aws_variables(s3: Any, s3_server: Any) -> None:
    with ckptmgr.CheckpointManager(s3.url, storage_options=s3.options, monitor="loss") as mgr:
        for step, loss in ((1, 0.5), (2, 0.25), (3, 0.4)):
            mgr.save(step, make_state(step), metrics={"loss": loss})
    env = s3_server.client_env()
    listed = _cli(["ls", s3.url, "--json"], env)
    assert listed.returncode == 0, listed.stderr
    listing = json.loads(listed.stdout)
    assert listing["directory"] == s3.url and [c["step"] for c in listing["checkpoints"]] == [1, 2, 3]
    assert listing["best"] == 2 and listing["checkpoints"][0]["path"].startswith(s3.url + "/data/")
    table = _cli(["ls", s3.url], env)
    assert table.returncode == 0 and "3 checkpoints" in table.stdout, table.stderr
    verified = _cli(["verify", s3.url], env)
    assert verified.returncode == 0 and "3 ok" in verified.stdout, verified.stdout + verified.stderr
    assert " 0 B" not in table.stdout + verified.stdout  # sizes not listed there: no total claimed
    shown = _cli(["show", s3.url, "best"], env)
    assert shown.returncode == 0 and "params/layer59/w" in shown.stdout and "loss=0.25" in shown.stdout, shown.stderr
    diffed = _cli(["diff", s3.url, "1", "2", "--json"], env)
    assert diffed.returncode in (0, 1) and json.loads(diffed.stdout)["a"]["step"] == 1, diffed.stderr
    pruned = _cli(["prune", s3.url, "--keep-last", "1"], env)
    assert pruned.returncode == 0, pruned.stderr
    assert _markers(s3.names()) == ["ckpt-000000002.json", "ckpt-000000003.json"]  # the best stays
    missing = _cli(["ls", f"s3://{s3.bucket}/nothing-here"], env)
    assert missing.returncode == 2 and "nothing of ckptmgr's" in missing.stderr


def test_retention_deletes_each_markers_before_its_data(s3: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A crash between the two deletions must leave an unreferenced object (cleaned up by
    the next writer), never a marker without its data: the marker's batch goes first.
    (The real server's deletions, recorded on the way.)"""
    from ckptmgr.storage._object import ObjectStore

    batches: list[list[str]] = []
    real_delete = ObjectStore.delete

    def recording(self: ObjectStore, names: Any) -> None:
        names = list(names)
        batches.append(names)
        real_delete(self, names)

    monkeypatch.setattr(ObjectStore, "delete", recording)
    with ckptmgr.CheckpointManager(s3.url, storage_options=s3.options, keep=ckptmgr.KeepLast(1)) as mgr:
        for step in (1, 2, 3):
            mgr.save(step, make_state(step))
    deleted_data = [(i, name) for i, batch in enumerate(batches) for name in batch if name.startswith("data/")]
    assert sorted(int(name[len("data/ckpt-"):][:9]) for _i, name in deleted_data) == [1, 2]
    for i, name in deleted_data:
        marker = f"ckpt-{int(name[len('data/ckpt-'):][:9]):09d}.json"
        assert any(marker in batch for batch in batches[:i]), (name, batches)
    assert _markers(s3.names()) == ["ckpt-000000003.json"]


# ----------------------------------------------------------------- many processes


def test_ranks_of_a_job_save_one_replicated_copy_and_restore_it(s3: Any, tree_equal: Any) -> None:
    """Rank 0 uploads and commits; every rank gets the same info and restores the copy."""
    import threading

    from ckptmgr.coordinator import ThreadCoordinator

    out: list[Any] = [None, None]

    def rank(c: ThreadCoordinator) -> None:
        try:
            with ckptmgr.CheckpointManager(s3.url, storage_options=s3.options, coordinator=c,
                                           keep=ckptmgr.KeepLast(1)) as mgr:
                infos = [mgr.save(s, {"w": np.full(4, float(s)), "rank": c.rank}) for s in (1, 2)]
                out[c.rank] = (infos, mgr.restore(), [i.step for i in mgr.checkpoints])
        except BaseException as exc:  # the test inspects it
            out[c.rank] = exc

    threads = [threading.Thread(target=rank, args=(c,)) for c in ThreadCoordinator.group(2, timeout=60)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads)
    for result in out:
        assert not isinstance(result, BaseException), result
        infos, state, steps = result
        assert infos == out[0][0] and isinstance(infos[1].path, ckptmgr.ObjectURL)
        tree_equal(state, {"w": np.full(4, 2.0), "rank": 0})  # rank 0's copy
        assert steps == [2]
    assert _markers(s3.names()) == ["ckpt-000000002.json"] and len(_data(s3.names())) == 1
    with pytest.raises(ValueError, match="sharded=True"):
        ckptmgr.CheckpointManager(s3.url, storage_options=s3.options,
                                  coordinator=ThreadCoordinator.group(1)[0], sharded=True)
