"""What ckptmgr relies on from the S3 server itself (SeaweedFS here), checked with plain botocore.

The object-store commit protocol stands on these: create-only writes (``If-None-Match: *``)
and compare-and-swap writes (``If-Match``) that are atomic, unfinished multipart uploads that
nobody sees, refused credentials, no bucket made behind our back, data that survives a
SIGKILL, and a clock in every response. An upgrade of the server that drops one of them must
fail here, loudly, before it fails in the manager's tests in some roundabout way.
"""

from __future__ import annotations

import email.utils
import threading
import time
from collections import Counter
from typing import Any

import pytest

pytestmark = pytest.mark.usefixtures("s3_server")

RACERS = 16


def _code(exc: BaseException) -> str:
    return str(exc.response["Error"]["Code"])  # type: ignore[attr-defined]


def _status(exc: BaseException) -> int:
    return int(exc.response["ResponseMetadata"]["HTTPStatusCode"])  # type: ignore[attr-defined]


def _race(calls: list[Any]) -> list[Any]:
    """Run the calls at once (a barrier), one thread each; return each one's result or exception."""
    barrier = threading.Barrier(len(calls))
    results: list[Any] = [None] * len(calls)

    def run(i: int) -> None:
        barrier.wait(timeout=30)
        try:
            results[i] = calls[i]()
        except Exception as exc:
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads), "a racing request hung"
    return results


def test_create_only_put_refuses_an_existing_key(s3_server: Any, s3_bucket: str) -> None:
    import botocore.exceptions

    client = s3_server.client()
    client.put_object(Bucket=s3_bucket, Key="k", Body=b"first", IfNoneMatch="*")
    with pytest.raises(botocore.exceptions.ClientError) as caught:
        client.put_object(Bucket=s3_bucket, Key="k", Body=b"second", IfNoneMatch="*")
    assert (_code(caught.value), _status(caught.value)) == ("PreconditionFailed", 412)
    assert client.get_object(Bucket=s3_bucket, Key="k")["Body"].read() == b"first"


def test_create_only_put_is_atomic_among_racing_writers(s3_server: Any, s3_bucket: str) -> None:
    """(SeaweedFS serialises racing conditional writes of one key: the losers' 412s come
    back over a few seconds, not at once.)"""
    import botocore.exceptions

    client = s3_server.client()
    key = "race"
    calls = [
        (lambda i=i: client.put_object(Bucket=s3_bucket, Key=key, Body=f"writer {i}".encode(), IfNoneMatch="*"))
        for i in range(RACERS)
    ]
    results = _race(calls)
    winners = [i for i, r in enumerate(results) if isinstance(r, dict)]
    losers = [r for r in results if isinstance(r, botocore.exceptions.ClientError)]
    assert len(winners) == 1, results
    assert len(losers) == RACERS - 1, results
    assert Counter(_code(e) for e in losers) == {"PreconditionFailed": RACERS - 1}
    body = client.get_object(Bucket=s3_bucket, Key=key)["Body"].read()
    assert body == f"writer {winners[0]}".encode()


def test_if_match_put_is_honoured(s3_server: Any, s3_bucket: str) -> None:
    import botocore.exceptions

    client = s3_server.client()
    first = client.put_object(Bucket=s3_bucket, Key="k", Body=b"v1")["ETag"]
    second = client.put_object(Bucket=s3_bucket, Key="k", Body=b"v2", IfMatch=first)["ETag"]
    assert second != first
    with pytest.raises(botocore.exceptions.ClientError) as caught:
        client.put_object(Bucket=s3_bucket, Key="k", Body=b"v3", IfMatch=first)  # stale
    assert _code(caught.value) == "PreconditionFailed"
    assert client.get_object(Bucket=s3_bucket, Key="k")["Body"].read() == b"v2"
    # On a key that does not exist: refused too (412 here; AWS says 404 NoSuchKey).
    with pytest.raises(botocore.exceptions.ClientError) as caught:
        client.put_object(Bucket=s3_bucket, Key="absent", Body=b"v", IfMatch=first)
    assert _code(caught.value) in ("PreconditionFailed", "NoSuchKey")


def test_if_match_put_is_atomic_among_racing_writers(s3_server: Any, s3_bucket: str) -> None:
    """A lease takeover: every taker writes with If-Match on the ETag it saw; one wins."""
    import botocore.exceptions

    client = s3_server.client()
    seen = client.put_object(Bucket=s3_bucket, Key="lease", Body=b"old holder")["ETag"]
    calls = [
        (lambda i=i: client.put_object(Bucket=s3_bucket, Key="lease", Body=f"taker {i}".encode(), IfMatch=seen))
        for i in range(RACERS)
    ]
    results = _race(calls)
    winners = [i for i, r in enumerate(results) if isinstance(r, dict)]
    assert len(winners) == 1, results
    assert all(
        isinstance(r, botocore.exceptions.ClientError) and _code(r) == "PreconditionFailed"
        for i, r in enumerate(results) if i != winners[0]
    ), results
    assert client.get_object(Bucket=s3_bucket, Key="lease")["Body"].read() == f"taker {winners[0]}".encode()


def test_unfinished_multipart_upload_is_invisible(s3_server: Any, s3_bucket: str) -> None:
    import botocore.exceptions

    client = s3_server.client()
    upload = client.create_multipart_upload(Bucket=s3_bucket, Key="big")["UploadId"]
    part = client.upload_part(Bucket=s3_bucket, Key="big", UploadId=upload, PartNumber=1, Body=b"a" * (5 << 20))
    assert client.list_objects_v2(Bucket=s3_bucket).get("Contents", []) == []
    with pytest.raises(botocore.exceptions.ClientError) as caught:
        client.get_object(Bucket=s3_bucket, Key="big")
    assert _code(caught.value) == "NoSuchKey"
    with pytest.raises(botocore.exceptions.ClientError) as caught:
        client.head_object(Bucket=s3_bucket, Key="big")
    assert _status(caught.value) == 404
    assert [u["Key"] for u in client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", [])] == ["big"]

    client.complete_multipart_upload(
        Bucket=s3_bucket, Key="big", UploadId=upload,
        MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": part["ETag"]}]},
    )
    assert [o["Key"] for o in client.list_objects_v2(Bucket=s3_bucket)["Contents"]] == ["big"]
    assert client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []


def test_aborted_multipart_upload_leaves_nothing(s3_server: Any, s3_bucket: str) -> None:
    client = s3_server.client()
    upload = client.create_multipart_upload(Bucket=s3_bucket, Key="big")["UploadId"]
    client.upload_part(Bucket=s3_bucket, Key="big", UploadId=upload, PartNumber=1, Body=b"a" * (5 << 20))
    client.abort_multipart_upload(Bucket=s3_bucket, Key="big", UploadId=upload)
    assert client.list_objects_v2(Bucket=s3_bucket).get("Contents", []) == []
    assert client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []


def test_create_only_complete_of_a_multipart_upload(s3_server: Any, s3_bucket: str) -> None:
    """``If-None-Match: *`` on CompleteMultipartUpload: create-only for large objects too."""
    import botocore.exceptions

    client = s3_server.client()
    client.put_object(Bucket=s3_bucket, Key="big", Body=b"there first")
    upload = client.create_multipart_upload(Bucket=s3_bucket, Key="big")["UploadId"]
    part = client.upload_part(Bucket=s3_bucket, Key="big", UploadId=upload, PartNumber=1, Body=b"b" * (5 << 20))
    with pytest.raises(botocore.exceptions.ClientError) as caught:
        client.complete_multipart_upload(
            Bucket=s3_bucket, Key="big", UploadId=upload,
            MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": part["ETag"]}]}, IfNoneMatch="*",
        )
    assert _code(caught.value) == "PreconditionFailed"
    assert client.get_object(Bucket=s3_bucket, Key="big")["Body"].read() == b"there first"
    client.abort_multipart_upload(Bucket=s3_bucket, Key="big", UploadId=upload)


def test_ranged_get_with_if_match(s3_server: Any, s3_bucket: str) -> None:
    """What a parallel download of one version needs: Range, and If-Match refusing a newer one."""
    import botocore.exceptions

    client = s3_server.client()
    etag = client.put_object(Bucket=s3_bucket, Key="k", Body=b"0123456789")["ETag"]
    assert client.get_object(Bucket=s3_bucket, Key="k", Range="bytes=2-4", IfMatch=etag)["Body"].read() == b"234"
    client.put_object(Bucket=s3_bucket, Key="k", Body=b"replaced")
    with pytest.raises(botocore.exceptions.ClientError) as caught:
        client.get_object(Bucket=s3_bucket, Key="k", Range="bytes=2-4", IfMatch=etag)
    assert _code(caught.value) == "PreconditionFailed"


@pytest.mark.parametrize(
    ("key", "secret", "codes"),
    [
        pytest.param(None, "wrong-secret", {"SignatureDoesNotMatch"}, id="wrong-secret"),
        pytest.param("unknown-key", "wrong-secret", {"InvalidAccessKeyId"}, id="unknown-key"),
    ],
)
def test_wrong_credentials_are_refused(s3_server: Any, s3_bucket: str, key: str | None, secret: str,
                                       codes: set[str]) -> None:
    import botocore.exceptions

    bad = s3_server.client(key=key, secret=secret)
    for call in (
        lambda: bad.list_objects_v2(Bucket=s3_bucket),
        lambda: bad.put_object(Bucket=s3_bucket, Key="intruder", Body=b"x"),
        lambda: bad.get_object(Bucket=s3_bucket, Key="intruder"),
    ):
        with pytest.raises(botocore.exceptions.ClientError) as caught:
            call()
        assert _code(caught.value) in codes
        assert _status(caught.value) == 403
    assert s3_server.client().list_objects_v2(Bucket=s3_bucket).get("Contents", []) == []


def test_missing_bucket_is_not_created_behind_our_back(s3_server: Any) -> None:
    import botocore.exceptions

    client = s3_server.client()
    for call in (
        lambda: client.put_object(Bucket="no-such-bucket-here", Key="k", Body=b"x"),
        lambda: client.list_objects_v2(Bucket="no-such-bucket-here"),
        lambda: client.get_object(Bucket="no-such-bucket-here", Key="k"),
    ):
        with pytest.raises(botocore.exceptions.ClientError) as caught:
            call()
        assert _code(caught.value) == "NoSuchBucket"
    assert "no-such-bucket-here" not in [b["Name"] for b in client.list_buckets()["Buckets"]]


def test_every_response_carries_the_server_clock(s3_server: Any, s3_bucket: str) -> None:
    """Lease expiry compares the server's Date header with an object's LastModified."""
    client = s3_server.client()
    before = time.time()
    response = client.put_object(Bucket=s3_bucket, Key="k", Body=b"x")
    after = time.time()
    date = email.utils.parsedate_to_datetime(response["ResponseMetadata"]["HTTPHeaders"]["date"]).timestamp()
    assert before - 2 <= date <= after + 1  # same machine, 1 s resolution
    head = client.head_object(Bucket=s3_bucket, Key="k")
    modified = head["LastModified"].timestamp()
    assert before - 2 <= modified <= after + 1
    listed = client.list_objects_v2(Bucket=s3_bucket)["Contents"][0]["LastModified"].timestamp()
    assert listed == modified


def test_data_survives_sigkill_and_restart(s3_server: Any, s3_bucket: str) -> None:
    client = s3_server.client()
    etag = client.put_object(Bucket=s3_bucket, Key="keep/me", Body=b"durable")["ETag"]
    s3_server.restart()  # SIGKILL, then the same ports and directory
    client = s3_server.client()
    got = client.get_object(Bucket=s3_bucket, Key="keep/me")
    assert (got["Body"].read(), got["ETag"]) == (b"durable", etag)
    assert [o["Key"] for o in client.list_objects_v2(Bucket=s3_bucket)["Contents"]] == ["keep/me"]
