"""ckptmgr.storage._object against a real S3 server (SeaweedFS), with faults from a TCP proxy.

The primitives (round trips, create-only and compare-and-swap writes, multipart uploads with
parts in flight), their failures (missing bucket, bad credentials, server killed, connection
cut mid-upload, stalled, throttled: an ObjectStoreError naming the URL and the cause, within
the bound, nothing partial visible), and the lease (one live writer, a SIGKILLed holder taken
over after expiry and not before, one winner among racing takers, a lost lease noticed).
Tests that need the server skip (through the ``s3_server`` fixture) where SeaweedFS or s3fs is
not installed; the others run everywhere.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from ckptmgr.errors import CheckpointIOError, DirectoryLockedError, ObjectStoreError
from ckptmgr.storage._object import LEASE_NAME, Lease, ObjectStore  # imports s3fs only when used

MiB = 2**20
BOUND = 30.0  # every failure must surface within about this long (issue 14)
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def make_store(s3_server: Any, s3_bucket: str) -> Any:
    """``make_store(prefix="run", endpoint_url=None, **kwargs)``: an ObjectStore on the test's
    bucket, directly or through a proxy's endpoint."""

    def make(prefix: str = "run", *, endpoint_url: str | None = None, key: str | None = None,
             secret: str | None = None, bucket: str | None = None, **kwargs: Any) -> ObjectStore:
        options = s3_server.storage_options(endpoint_url=endpoint_url, key=key, secret=secret)
        url = f"s3://{bucket or s3_bucket}/{prefix}" if prefix else f"s3://{bucket or s3_bucket}"
        return ObjectStore(url, options, **kwargs)

    return make


def _raises_within(seconds: float, call: Any) -> ObjectStoreError:
    started = time.monotonic()
    with pytest.raises(ObjectStoreError) as caught:
        call()
    elapsed = time.monotonic() - started
    assert elapsed < seconds, f"took {elapsed:.1f} s: {caught.value}"
    return caught.value


# ------------------------------------------------------------------- round trips


def test_round_trip_of_every_primitive(make_store: Any) -> None:
    store = make_store("runs/exp1")
    neighbour = make_store("runs/exp10")  # a prefix that extends ours: never listed as ours
    neighbour.put("a", b"not ours")
    store.check()
    etags = {name: store.put(name, data) for name, data in
             [("b/2", b"two"), ("a", b"one"), ("b/1/deep", b"deep"), ("empty", b"")]}
    assert store.get("a") == (b"one", etags["a"])
    assert store.get("empty") == (b"", etags["empty"])
    assert store.get("missing") is None
    info = store.stat("b/2")
    assert info is not None and (info.name, info.size, info.etag) == ("b/2", 3, etags["b/2"])
    assert abs(info.last_modified - store.server_time()) < 5
    assert store.stat("missing") is None
    assert [(i.name, i.size, i.etag) for i in store.list()] == [
        ("a", 3, etags["a"]), ("b/1/deep", 4, etags["b/1/deep"]), ("b/2", 3, etags["b/2"]), ("empty", 0, etags["empty"]),
    ]
    assert [i.name for i in store.list("b/")] == ["b/1/deep", "b/2"]
    assert store.list("zzz") == []
    assert store.key("b/2") == "runs/exp1/b/2"
    assert store.url_of("b/2") == f"s3://{store.bucket}/runs/exp1/b/2"

    store.delete(["a", "b/2", "never-existed"])
    assert [i.name for i in store.list()] == ["b/1/deep", "empty"]
    store.delete([])
    assert neighbour.get("a") is not None


def test_store_at_the_bucket_root(make_store: Any) -> None:
    store = make_store("")
    store.put("top", b"x")
    assert store.url == f"s3://{store.bucket}" and store.key("top") == "top"
    assert [i.name for i in store.list()] == ["top"]


def test_get_range_is_like_slicing(make_store: Any) -> None:
    store = make_store()
    data = b"0123456789"
    store.put("k", data)
    store.put("empty", b"")
    for start, stop in [(0, 10), (2, 5), (0, 0), (5, 5), (8, 100), (10, 20), (50, 60)]:
        assert store.get_range("k", start, stop) == data[start:stop], (start, stop)
    assert store.get_range("empty", 0, 10) == b""


def test_get_range_of_a_missing_object_says_so(make_store: Any) -> None:
    store = make_store()
    with pytest.raises(ObjectStoreError) as caught:
        store.get_range("missing", 0, 10)
    assert caught.value.errno == errno.ENOENT and store.url_of("missing") in str(caught.value)
    with pytest.raises(ValueError, match="start"):
        store.get_range("missing", 5, 2)


def test_server_time_is_the_servers_clock(make_store: Any) -> None:
    store = make_store()
    assert abs(store.server_time() - time.time()) < 5  # same machine here; 1 s resolution


# -------------------------------------------------------------- conditional writes


def test_put_if_absent(make_store: Any) -> None:
    store = make_store()
    etag = store.put_if_absent("marker", b"mine")
    assert etag is not None
    assert store.put_if_absent("marker", b"theirs") is None
    assert store.get("marker") == (b"mine", etag)


def test_put_if_absent_has_one_winner_among_racing_writers(make_store: Any) -> None:
    store = make_store()
    barrier = threading.Barrier(8)
    results: list[str | None] = [None] * 8

    def race(i: int) -> None:
        barrier.wait(timeout=30)
        results[i] = store.put_if_absent("marker", f"writer {i}".encode())

    threads = [threading.Thread(target=race, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    winners = [i for i, etag in enumerate(results) if etag is not None]
    assert len(winners) == 1, results
    assert store.get("marker") == (f"writer {winners[0]}".encode(), results[winners[0]])


def test_put_if_match(make_store: Any) -> None:
    store = make_store()
    first = store.put("index", b"v1")
    second = store.put_if_match("index", b"v2", first)
    assert second is not None and second != first
    assert store.put_if_match("index", b"v3", first) is None  # stale
    assert store.get("index") == (b"v2", second)
    assert store.put_if_match("absent", b"v", first) is None


def test_delete_if_match(make_store: Any) -> None:
    store = make_store()
    first = store.put("lease", b"v1")
    second = store.put("lease", b"v2")
    assert store.delete_if_match("lease", first) is False  # stale
    assert store.get("lease") == (b"v2", second)
    assert store.delete_if_match("lease", second) is True
    assert store.get("lease") is None
    assert store.delete_if_match("lease", second) is False  # gone


@pytest.mark.parametrize("kind", ["absent", "match"])
def test_a_retried_conditional_write_that_had_landed_is_a_success(make_store: Any, s3_proxy: Any, kind: str) -> None:
    """The response is lost after the server stored the object; the request is resent (by
    aiohttp, silently, or by botocore) and gets 412. The object holds exactly our bytes: that
    412 is our own first attempt, a success."""
    direct = make_store()
    store = make_store(endpoint_url=s3_proxy.endpoint_url)
    etag = direct.put("k", b"before") if kind == "match" else None
    s3_proxy.drop_responses(1)
    body = b"ours, with a unique token 7f3a"
    new = store.put_if_absent("k", body) if kind == "absent" else store.put_if_match("k", body, str(etag))
    assert s3_proxy.dropped == 1
    assert new is not None and direct.get("k") == (body, new)
    # And one that is really someone else's is still refused.
    assert store.put_if_absent("k", b"another writer") is None


# ---------------------------------------------------------------------- multipart


def test_multipart_upload_with_parts_in_flight(make_store: Any, s3_server: Any, s3_proxy: Any, tmp_path: Path) -> None:
    store = make_store(endpoint_url=s3_proxy.endpoint_url, part_size=5 * MiB, max_concurrency=4)
    data = os.urandom(20 * MiB + 123)
    source = tmp_path / "state.bin"
    source.write_bytes(data)
    etag = store.put_file("big", source)
    assert etag.strip('"').endswith("-5")  # five parts
    assert s3_proxy.peak >= 2, "parts were not in flight at once"
    back = tmp_path / "back.bin"
    info = store.get_file("big", back)
    assert (info.size, info.etag) == (len(data), etag)
    assert hashlib.sha256(back.read_bytes()).digest() == hashlib.sha256(data).digest()
    # put() of bytes takes the same path; get() reads it whole.
    etag2 = store.put("big2", memoryview(data))
    assert etag2 == etag  # same parts, same ETag
    assert store.get("big2") == (data, etag2)
    # Create-only, multipart: If-None-Match on the completion.
    assert store.put_if_absent("big", data[: 6 * MiB]) is None
    assert store.get_range("big", 0, 16) == data[:16]
    created = store.put_if_absent("big3", data[: 6 * MiB])
    assert created is not None and created.strip('"').endswith("-2")
    assert s3_server.client().list_multipart_uploads(Bucket=store.bucket).get("Uploads", []) == []


def test_multipart_upload_cut_mid_body_leaves_nothing_visible(make_store: Any, s3_server: Any, s3_proxy: Any,
                                                               tmp_path: Path) -> None:
    direct = make_store()
    direct.put("earlier", b"committed before")
    store = make_store(endpoint_url=s3_proxy.endpoint_url, part_size=5 * MiB, max_concurrency=4)
    source = tmp_path / "state.bin"
    source.write_bytes(os.urandom(20 * MiB))
    s3_proxy.cut_after(3 * MiB)  # every connection dies mid-part
    error = _raises_within(BOUND, lambda: store.put_file("big", source))
    assert store.url_of("big") in str(error) and error.errno == errno.ECONNRESET, error
    assert "dropped" in str(error)
    assert s3_proxy.cuts >= 1
    assert [i.name for i in direct.list()] == ["earlier"]
    assert direct.get("earlier") == (b"committed before", direct.stat("earlier").etag)  # type: ignore[union-attr]
    # The failed upload was aborted, not left behind (its abort is small: it got through).
    client = s3_server.client()
    assert client.list_multipart_uploads(Bucket=store.bucket).get("Uploads", []) == []
    s3_proxy.pass_through()
    assert store.put_file("big", source)  # usable again


def test_local_file_errors_name_the_local_path(make_store: Any, tmp_path: Path) -> None:
    store = make_store()
    with pytest.raises(CheckpointIOError) as caught:
        store.put_file("x", tmp_path / "missing.bin")
    assert not isinstance(caught.value, ObjectStoreError) and "missing.bin" in str(caught.value)
    store.put("x", b"data")
    with pytest.raises(CheckpointIOError) as caught:
        store.get_file("x", tmp_path / "no-such-dir" / "x.bin")
    assert "no-such-dir" in str(caught.value)
    with pytest.raises(ObjectStoreError) as caught:
        store.get_file("missing", tmp_path / "x.bin")
    assert caught.value.errno == errno.ENOENT


def test_abort_uploads_cleans_a_dead_writers_leftovers(make_store: Any, s3_server: Any) -> None:
    store = make_store()
    client = s3_server.client()
    client.create_multipart_upload(Bucket=store.bucket, Key=store.key("orphan"))
    client.create_multipart_upload(Bucket=store.bucket, Key="elsewhere/orphan")  # not under the prefix
    assert store.abort_uploads(older_than=3600) == 0  # too recent
    assert store.abort_uploads(older_than=-1) == 1
    assert [u["Key"] for u in client.list_multipart_uploads(Bucket=store.bucket).get("Uploads", [])] == ["elsewhere/orphan"]


# ------------------------------------------------------------------------ failures


def test_missing_bucket_is_named(make_store: Any) -> None:
    store = make_store(bucket="no-such-bucket-zz")
    for call in (store.check, lambda: store.put("x", b"1"), lambda: store.get("x"), store.list, store.server_time):
        error = _raises_within(BOUND, call)
        assert error.errno == errno.ENOENT
        assert "s3://no-such-bucket-zz/run" in str(error) and "bucket 'no-such-bucket-zz' does not exist" in str(error)
        assert error.path.startswith("s3://no-such-bucket-zz/run")


@pytest.mark.parametrize(("key", "secret"), [(None, "wrong"), ("unknown", "wrong")], ids=["wrong-secret", "unknown-key"])
def test_bad_credentials_are_named(make_store: Any, key: str | None, secret: str) -> None:
    store = make_store(key=key, secret=secret)
    for call in (store.check, lambda: store.put("x", b"1"), store.list):
        error = _raises_within(BOUND, call)
        assert error.errno == errno.EACCES and "access denied" in str(error) and store.url in str(error)


def test_a_killed_server_is_named_and_the_store_works_after_restart(make_store: Any, s3_server: Any) -> None:
    store = make_store()  # default timeout and retries
    etag = store.put("before", b"durable")
    s3_server.stop()  # SIGKILL
    try:
        for call in (lambda: store.put("during", b"x"), store.list):
            error = _raises_within(BOUND, call)
            assert error.errno == errno.ECONNREFUSED and "connection refused" in str(error), error
            assert store.url in str(error) and s3_server.endpoint_url in str(error)
    finally:
        s3_server.start()
    assert store.get("before") == (b"durable", etag)
    store.put("after", b"x")
    assert [i.name for i in store.list()] == ["after", "before"]


def test_a_stalled_server_times_out_within_the_bound(make_store: Any, s3_proxy: Any) -> None:
    store = make_store(endpoint_url=s3_proxy.endpoint_url, timeout=2.0)
    store.put("k", b"v")
    s3_proxy.stall()
    for call in (lambda: store.put("k2", b"v" * 100_000), lambda: store.get("k")):
        error = _raises_within(store.timeout + 3, call)
        assert error.errno == errno.ETIMEDOUT and "timed out" in str(error), error
    s3_proxy.pass_through()
    assert store.get("k") is not None


def test_refused_connections_are_named(make_store: Any, s3_proxy: Any) -> None:
    store = make_store(endpoint_url=s3_proxy.endpoint_url)
    s3_proxy.refuse()
    error = _raises_within(BOUND, lambda: store.put("k", b"v"))
    assert error.errno == errno.ECONNRESET and store.url_of("k") in str(error)
    # Bounded: botocore's 3 attempts, each of which aiohttp may resend once on a fresh
    # connection (it does so for idempotent methods such as PUT when a connection drops).
    assert 3 <= s3_proxy.refused <= 6


def test_throttling_is_named_after_bounded_retries(make_store: Any, s3_proxy: Any) -> None:
    store = make_store(endpoint_url=s3_proxy.endpoint_url)
    s3_proxy.throttle()
    error = _raises_within(BOUND, lambda: store.put("k", b"v"))
    assert error.errno == errno.EAGAIN and "throttled" in str(error) and "SlowDown" in str(error), error
    assert s3_proxy.throttled == 3  # bounded: no retry storm


def test_errors_carry_an_os_error_cause_not_a_botocore_traceback(make_store: Any) -> None:
    store = make_store(bucket="no-such-bucket-zz")
    with pytest.raises(ObjectStoreError) as caught:
        store.check()
    cause = caught.value.__cause__
    assert isinstance(cause, OSError) and cause.errno == errno.ENOENT and cause.__suppress_context__
    assert "botocore" in type(cause.__context__).__module__  # kept for debugging, not shown
    assert isinstance(caught.value, CheckpointIOError) and isinstance(caught.value, OSError)


# ---------------------------------------------------------------- configuration


def test_standard_aws_environment_variables_are_enough(s3_server: Any, s3_bucket: str,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in s3_server.client_env().items():
        if name.startswith("AWS_"):
            monkeypatch.setenv(name, value)
    store = ObjectStore(f"s3://{s3_bucket}/env")
    store.check()
    store.put("k", b"v")
    assert store.get("k") is not None and s3_server.endpoint_url in store.endpoint


@pytest.mark.parametrize(
    "url",
    ["gs://bucket/prefix", "az://container/prefix", "file:///tmp/x", "/tmp/local", "s3://", "s3:///prefix",
     "s3://bucket/a//b", "s3://bucket/../x", "s3://bucket/p?versionId=1"],
)
def test_urls_other_than_s3_are_refused_clearly(url: str) -> None:
    with pytest.raises(ValueError, match="Expected an s3://bucket/prefix URL") as caught:
        ObjectStore(url)
    assert repr(url) in str(caught.value)
    if url.startswith(("gs:", "az:")):
        assert "If-None-Match" in str(caught.value) and "If-Match" in str(caught.value)


def test_bad_object_names_are_refused(make_store: Any) -> None:
    store = make_store()
    for name in ["", "/abs", "a/", "a//b", "./a", "a/../b"]:
        with pytest.raises(ValueError, match="Expected an object name"):
            store.put(name, b"x")
    assert store.list() == []


@pytest.mark.parametrize(
    ("kwargs", "match"), [({"timeout": 0}, "timeout"), ({"part_size": MiB}, "part_size"), ({"max_concurrency": 0}, "max_concurrency")]
)
def test_bad_arguments_are_refused(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ObjectStore("s3://bucket/prefix", **kwargs)


def test_without_s3fs_the_error_says_what_to_install() -> None:
    code = (
        "import sys; sys.modules['s3fs'] = None\n"
        "from ckptmgr.storage._object import ObjectStore\n"
        "try:\n    ObjectStore('s3://bucket/prefix')\n"
        "except ImportError as exc:\n    print(exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO, check=True)
    assert "pip install ckptmgr[s3]" in out.stdout, out


# ---------------------------------------------------------------------------- lease

_HOLDER = """
import sys
from ckptmgr.storage._object import Lease, ObjectStore
lease = Lease(ObjectStore(sys.argv[1]), ttl=float(sys.argv[2]), owner={"role": "child"})
lease.acquire()
print("held", flush=True)
sys.stdin.read()  # hold (renewing) until killed
"""


def test_a_second_live_writer_is_refused_naming_the_holder(make_store: Any) -> None:
    first = Lease(make_store(), ttl=5.0, owner={"manager": "first"})
    first.acquire()
    try:
        second = Lease(make_store(), ttl=5.0)
        with pytest.raises(DirectoryLockedError) as caught:
            second.acquire()
        message = str(caught.value)
        assert f"pid {os.getpid()}" in message and os.uname().nodename in message and "since" in message
        assert first.url in message and caught.value.lock_path == first.url
        first.check()
        with pytest.raises(RuntimeError):
            first.acquire()
    finally:
        first.release()
    second.acquire()  # released: free at once, no expiry to wait for
    second.check()
    second.release()
    with pytest.raises(DirectoryLockedError, match="not held"):
        second.check()


def _hold_then_kill(child: subprocess.Popen[bytes], store: ObjectStore) -> None:
    """Wait for the child to hold the lease (it prints a line; bounded), then SIGKILL it."""
    assert child.stdout is not None and child.stderr is not None
    stdout, lines = child.stdout, []
    try:
        reader = threading.Thread(target=lambda: lines.append(stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout=60)
        assert lines == [b"held\n"], (lines, child.stderr.read() if child.poll() is not None else "(still running)")
        held = store.get(LEASE_NAME)
        assert held is not None and json.loads(held[0])["pid"] == child.pid
    finally:
        if child.poll() is None:
            os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)


def test_a_killed_holder_is_taken_over_after_expiry_and_not_before(make_store: Any, s3_server: Any) -> None:
    ttl = 2.0
    store = make_store()
    with subprocess.Popen(
        [sys.executable, "-c", _HOLDER, store.url, str(ttl)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env=s3_server.client_env(), cwd=REPO,
    ) as child:
        _hold_then_kill(child, store)

    taker = Lease(store, ttl=ttl)
    refusals = 0
    deadline = time.monotonic() + ttl + 15
    while True:
        last_renewal = store.stat(LEASE_NAME)
        assert last_renewal is not None
        try:
            taker.acquire()
            break
        except DirectoryLockedError as exc:
            refusals += 1
            assert f"pid {child.pid}" in str(exc)
            assert time.monotonic() < deadline, "the dead holder's lease was never taken over"
            time.sleep(0.2)  # polling interval; the deadline bounds the wait
    try:
        taken_at = store.server_time()
        assert refusals >= 1, "taken over at once: the holder's lease was still live"
        assert taken_at - last_renewal.last_modified >= ttl  # not before expiry
        assert taken_at - last_renewal.last_modified <= ttl + 2 + 2  # bound: ttl + 2 s, + polling
        taker.check()
        assert json.loads(store.get(LEASE_NAME)[0])["pid"] == os.getpid()  # type: ignore[index]
    finally:
        taker.release()


@pytest.mark.parametrize("round_", range(2))
def test_one_of_two_racing_takers_wins(make_store: Any, round_: int) -> None:
    store = make_store()
    # A dead holder's lease, with ttl 0: expired once the server's clock has moved 1 s on.
    store.put(LEASE_NAME, json.dumps({"host": "gone", "pid": 1, "since": 0, "ttl": 0}).encode())
    written = store.stat(LEASE_NAME).last_modified  # type: ignore[union-attr]
    deadline = time.monotonic() + 10
    while store.server_time() - written < 1.0:
        assert time.monotonic() < deadline
        time.sleep(0.1)  # polling interval; the deadline bounds the wait
    takers = [Lease(make_store(), ttl=5.0, owner={"taker": i}) for i in range(2)]
    barrier = threading.Barrier(2)
    outcomes: list[Any] = [None, None]

    def take(i: int) -> None:
        barrier.wait(timeout=30)
        try:
            takers[i].acquire()
            outcomes[i] = "won"
        except DirectoryLockedError as exc:
            outcomes[i] = exc

    threads = [threading.Thread(target=take, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    try:
        assert sorted(map(str, outcomes)).count("won") == 1, outcomes
        winner = outcomes.index("won")
        assert json.loads(store.get(LEASE_NAME)[0])["owner"] == {"taker": winner}  # type: ignore[index]
        takers[winner].check()
    finally:
        for taker in takers:
            taker.release()


def test_a_lease_taken_by_another_writer_is_noticed_by_check(make_store: Any) -> None:
    store = make_store()
    lease = Lease(store, ttl=3.0)
    lease.acquire()
    try:
        lease.check()
        intruder = {"host": "elsewhere", "pid": 4242, "since": time.time(), "ttl": 30, "token": "x"}
        store.put(LEASE_NAME, json.dumps(intruder).encode())  # e.g. a takeover after a long pause
        deadline = time.monotonic() + 10
        while True:  # the next renewal (within ttl / 3) finds the intruder
            try:
                lease.check()
            except DirectoryLockedError as exc:
                if "Lost the lease" in str(exc):
                    assert "pid 4242 on elsewhere" in str(exc)
                    break
                assert "Cannot renew" in str(exc)  # a slow machine: the margin ran out first
            assert time.monotonic() < deadline, "the lost lease went unnoticed"
            time.sleep(0.05)  # polling interval; the deadline bounds the wait
    finally:
        lease.release()
    assert json.loads(store.get(LEASE_NAME)[0])["pid"] == 4242  # type: ignore[index]  # release left it alone


def test_a_lease_that_cannot_be_renewed_fails_check_then_recovers(make_store: Any, s3_proxy: Any) -> None:
    ttl = 3.0
    # A bucket's first write can take SeaweedFS over a second (it grows a volume): made
    # here without the short timeout, so that the one below only meets the refusals.
    first = Lease(make_store(), ttl=ttl)
    first.acquire()
    first.release()
    lease = Lease(make_store(endpoint_url=s3_proxy.endpoint_url, timeout=1.0), ttl=ttl)
    lease.acquire()
    try:
        s3_proxy.refuse()  # renewals fail from now on
        cut = time.monotonic()
        deadline = cut + ttl + 5
        while True:
            called = time.monotonic()
            try:
                lease.check()
            except DirectoryLockedError as exc:
                assert "Cannot renew the lease" in str(exc) and lease.url in str(exc)
                # The failed renewal's error, or none yet (botocore still backing off).
                assert exc.__cause__ is None or isinstance(exc.__cause__, ObjectStoreError)
                break
            # No check passes once anyone could take the lease over (measured from the
            # call, not its return: a stall of this thread after it proves nothing).
            assert called - cut <= ttl, "check() passed after the lease could have expired"
            assert time.monotonic() < deadline, "check() kept passing without renewals"
            time.sleep(0.05)  # polling interval; the deadline bounds the wait
        s3_proxy.pass_through()
        deadline = time.monotonic() + ttl + 5
        while True:  # the next renewal gets through (nobody took it: If-Match proves it)
            try:
                lease.check()
                break
            except DirectoryLockedError:
                assert time.monotonic() < deadline, "the lease never recovered"
                time.sleep(0.05)  # polling interval; the deadline bounds the wait
    finally:
        lease.release()
