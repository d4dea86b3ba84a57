"""Object storage (S3): the primitives an ``s3://bucket/prefix`` checkpoint location is built on.

An object store has no rename and no fsync; what it has instead, and what the commit protocol
uses, is a handful of primitives that :class:`ObjectStore` wraps, with nothing of fsspec or
botocore showing above it:

- ``put`` (large objects as a multipart upload, several parts in flight: invisible until it
  completes, aborted if it fails), ``put_if_absent`` (create-only: ``If-None-Match: *``),
  ``put_if_match`` (compare-and-swap on the ETag: ``If-Match``);
- ``get``, ``get_range``, ``get_file`` (ranged reads in flight), ``stat``, ``list``;
- ``delete`` (batches), ``delete_if_match``, ``abort_uploads`` (a dead writer's leftovers);
- ``server_time``: the server's clock (its ``Date`` header), so that lease expiry does not
  depend on the local clock; ``check``: the bucket exists and the credentials work.

:class:`Lease` builds one writer per location on them: a lease object created with a
create-only write, renewed with compare-and-swap writes, and taken over once expired.

Bounded failure: every request has a deadline (``timeout``, default 30 s, plus the time a
slow link needs for the bytes it carries) that includes botocore's own retries (3 attempts,
"standard" mode: exponential backoff with jitter and a client-side retry quota, so a dead
server sees no retry storm). A missing bucket, bad credentials, a refused, dropped or stalled
connection, throttling: each surfaces as an :class:`~ckptmgr.errors.ObjectStoreError` naming
the URL and the cause, within about ``timeout`` seconds.

Needs ``s3fs`` (``pip install ckptmgr[s3]``), imported when the first store is made. The
``storage_options`` go to ``s3fs.S3FileSystem`` (the pandas/xarray convention:
``endpoint_url``, ``key``, ``secret``, ``client_kwargs``, ``config_kwargs``, ...); without
them botocore finds credentials and the endpoint the standard way (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL``, ``AWS_REGION``, config files, ...).
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import dataclasses
import email.utils
import errno
import hashlib
import importlib
import json
import os
import secrets
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

from ..errors import CheckpointIOError, DirectoryLockedError, ObjectStoreError
from ._layout import io_error

__all__ = ["LEASE_NAME", "Lease", "ObjectInfo", "ObjectStore"]

Buffer = bytes | bytearray | memoryview

DEFAULT_TIMEOUT = 30.0
DEFAULT_PART_SIZE = 16 * 2**20
MIN_PART_SIZE = 5 * 2**20  # S3's minimum for every part but the last
MAX_PARTS = 10_000  # S3's maximum number of parts in one upload
DEFAULT_CONCURRENCY = 4
ATTEMPTS = 3  # botocore attempts per request (the first one included)
SLOW_LINK_RATE = 4 * 2**20  # bytes/s: a request carrying n bytes gets n / SLOW_LINK_RATE more time
LEASE_NAME = ".ckptmgr-lease.json"
_BODY_CHUNK = 2**20
_DELETE_BATCH = 1000  # S3's maximum keys per DeleteObjects

_ACCESS_CODES = frozenset({
    "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken",
    "AllAccessDisabled", "InvalidSecurity", "AccountProblem", "403", "Forbidden",
})
_THROTTLE_CODES = frozenset({
    "SlowDown", "Throttling", "ThrottlingException", "ThrottledException", "RequestLimitExceeded",
    "TooManyRequests", "TooManyRequestsException", "RequestThrottled", "RequestThrottledException",
    "ProvisionedThroughputExceededException", "ServiceUnavailable", "503", "429",
})
_MISSING_KEY_CODES = frozenset({"NoSuchKey", "404", "NotFound"})
_PRECONDITION_CODES = frozenset({"PreconditionFailed", "412"})
_CONFLICT_CODES = frozenset({"ConditionalRequestConflict", "409"})


def _import(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise ImportError(
            f"s3:// checkpoint locations need s3fs, which is not installed ({exc}): "
            "pip install ckptmgr[s3]"
        ) from exc


def _parse_url(url: str) -> tuple[str, str]:
    if not isinstance(url, str):
        raise ValueError(f"Expected an s3://bucket/prefix URL. Received: url={url!r}")
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise ValueError(f"Expected an s3://bucket/prefix URL. Received: url={url!r}")
    if scheme.lower() not in ("s3", "s3a"):
        raise ValueError(
            f"Expected an s3://bucket/prefix URL for a checkpoint location on object storage. "
            f"Received: url={url!r}. The commit protocol on object storage needs create-only "
            "writes (If-None-Match: *), compare-and-swap writes (If-Match: <etag>) and the "
            f"server's clock; ckptmgr implements them for S3 only so far, not for {scheme}://"
        )
    bucket, _, prefix = rest.partition("/")
    prefix = prefix.strip("/")
    segments = prefix.split("/") if prefix else []
    if not bucket or "?" in rest or "#" in rest or any(s in ("", ".", "..") for s in segments):
        raise ValueError(
            "Expected an s3://bucket/prefix URL (a bucket name, then an optional prefix of "
            f"'/'-separated names, no empty, '.' or '..' part). Received: url={url!r}"
        )
    return bucket, prefix


def _validate_name(name: str) -> str:
    if (
        not isinstance(name, str)
        or not name
        or name.startswith("/")
        or name.endswith("/")
        or any(part in ("", ".", "..") for part in name.split("/"))
    ):
        raise ValueError(
            "Expected an object name relative to the location ('/'-separated parts, none "
            f"empty, '.' or '..'). Received: name={name!r}"
        )
    return name


def _http_date(headers: Mapping[str, str]) -> float:
    """The ``Date`` header of a response, as POSIX seconds (1 s resolution)."""
    value = headers.get("date")
    if not value:
        raise ValueError("the server's response has no Date header")
    return email.utils.parsedate_to_datetime(value).timestamp()


def _multipart_etag(parts: Iterable[Mapping[str, Any]]) -> str:
    """The ETag S3 gives a completed multipart upload: MD5 of the parts' MD5s, then -N."""
    digests = [bytes.fromhex(str(p["ETag"]).strip('"')) for p in parts]
    return f"{hashlib.md5(b''.join(digests)).hexdigest()}-{len(digests)}"  # an ETag, not security


@dataclasses.dataclass(frozen=True)
class ObjectInfo:
    """One object of a location, as listed or stat'ed.

    ``name`` is relative to the store's prefix; ``etag`` is the server's (quotes included),
    for :meth:`ObjectStore.put_if_match`; ``last_modified`` is in POSIX seconds by the
    server's clock (1 s resolution on S3).
    """

    name: str
    size: int
    etag: str
    last_modified: float


@dataclasses.dataclass(frozen=True)
class _Fetched:
    data: bytes
    info: ObjectInfo
    server_time: float  # the Date of the response that carried it


class ObjectStore:
    """The S3 primitives of one location, ``s3://bucket/prefix``.

    Objects are named relative to the prefix (``key("ckpt-1/marker.json")`` is
    ``prefix/ckpt-1/marker.json``). Every method is thread-safe and blocking; the requests
    run on fsspec's I/O thread.

    Example (against any S3 server; here the standard AWS variables give the endpoint and
    credentials)::

        store = ObjectStore("s3://my-bucket/runs/exp1")
        store.check()
        etag = store.put_if_absent("marker.json", b"{}")   # None: it existed already

    Args:
        url: ``s3://bucket`` or ``s3://bucket/prefix`` (``s3a://`` too).
        storage_options: passed to ``s3fs.S3FileSystem`` (``endpoint_url``, ``key``,
            ``secret``, ``token``, ``client_kwargs``, ``config_kwargs``, ...). Given
            ``config_kwargs`` override the timeouts and retries set here.
        timeout: the longest one request may take, botocore's retries included (plus
            ``n / 4 MiB/s`` for a request that carries ``n`` bytes).
        part_size: the part size of multipart uploads and of ranged downloads; objects up to
            this size go in one request.
        max_concurrency: parts in flight at once per upload or download.

    Raises:
        ValueError: a URL that is not ``s3://``, naming the primitives other schemes lack; a
            bad argument.
        ImportError: s3fs is not installed (the message says ``pip install ckptmgr[s3]``).
    """

    def __init__(
        self,
        url: str,
        storage_options: Mapping[str, Any] | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        part_size: int = DEFAULT_PART_SIZE,
        max_concurrency: int = DEFAULT_CONCURRENCY,
    ) -> None:
        self.bucket, self.prefix = _parse_url(url)
        if not (isinstance(timeout, (int, float)) and timeout > 0):
            raise ValueError(f"Expected timeout > 0 (seconds). Received: timeout={timeout!r}")
        if not (isinstance(part_size, int) and part_size >= MIN_PART_SIZE):
            raise ValueError(f"Expected part_size >= {MIN_PART_SIZE} (S3's minimum). Received: part_size={part_size!r}")
        if not (isinstance(max_concurrency, int) and max_concurrency >= 1):
            raise ValueError(f"Expected max_concurrency >= 1. Received: max_concurrency={max_concurrency!r}")
        self.timeout = float(timeout)
        self.part_size = part_size
        self.max_concurrency = max_concurrency
        self.url = f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"
        self._key_prefix = f"{self.prefix}/" if self.prefix else ""

        s3fs = _import("s3fs")
        self._exc = _import("botocore.exceptions")
        self._asyn = _import("fsspec.asyn")
        options = dict(storage_options or {})
        config: dict[str, Any] = {
            "connect_timeout": min(5.0, self.timeout / 3),
            "read_timeout": self.timeout / 3,
            "retries": {"total_max_attempts": ATTEMPTS, "mode": "standard"},
        }
        config.update(options.pop("config_kwargs", None) or {})
        for reserved in ("asynchronous", "loop", "skip_instance_cache"):
            options.pop(reserved, None)
        client_kwargs = options.get("client_kwargs") or {}
        self.endpoint = str(
            options.get("endpoint_url")
            or client_kwargs.get("endpoint_url")
            or os.environ.get("AWS_ENDPOINT_URL_S3")
            or os.environ.get("AWS_ENDPOINT_URL")
            or "the S3 endpoint"
        )
        # Our own instance (not fsspec's cache, which others share), used only for its
        # session: every request below goes to its botocore client directly, so that errors
        # keep their S3 codes (s3fs turns a 412 into OSError(EINVAL)) and no s3fs retry loop
        # multiplies botocore's.
        self._fs = s3fs.S3FileSystem(skip_instance_cache=True, asynchronous=False, config_kwargs=config, **options)
        self._loop = self._fs.loop

    def __repr__(self) -> str:
        return f"ObjectStore({self.url!r}, endpoint={self.endpoint!r})"

    # --------------------------------------------------------------------- names

    def key(self, name: str) -> str:
        """The S3 key of the object ``name`` (relative to the prefix).

        Raises:
            ValueError: ``name`` is empty, absolute, or has an empty, ``.`` or ``..`` part.
        """
        return self._key_prefix + _validate_name(name)

    def url_of(self, name: str) -> str:
        """``s3://bucket/prefix/name``, for messages."""
        return f"s3://{self.bucket}/{self.key(name)}"

    # ----------------------------------------------------------------- machinery

    def _deadline(self, nbytes: int = 0) -> float:
        return self.timeout + nbytes / SLOW_LINK_RATE

    async def _call(self, method: str, nbytes: int = 0, **kwargs: Any) -> dict[str, Any]:
        """One S3 request (botocore's retries included) within its deadline."""

        async def call() -> dict[str, Any]:
            client = await self._fs.set_session()
            result: dict[str, Any] = await getattr(client, method)(Bucket=self.bucket, **kwargs)
            return result

        return await asyncio.wait_for(call(), self._deadline(nbytes))

    async def _read_body(self, response: Mapping[str, Any], sink: Callable[[bytes], Awaitable[None]] | None = None) -> bytes:
        """Read a response's body, each chunk within the deadline; to ``sink`` if given."""
        chunks: builtins.list[bytes] = []
        async with response["Body"] as body:
            while True:
                chunk = await asyncio.wait_for(body.read(_BODY_CHUNK), self.timeout)
                if not chunk:
                    break
                if sink is None:
                    chunks.append(chunk)
                else:
                    await sink(chunk)
        return b"".join(chunks)

    def _run(self, action: str, name: str | None, fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        try:
            return self._asyn.sync(self._loop, fn, *args)
        except (CheckpointIOError, _Changed):  # ours, already worded (a local file's error, ...)
            raise
        except Exception as exc:
            if isinstance(exc, self._asyn.FSTimeoutError) and exc.__cause__ is not None:
                exc = exc.__cause__  # fsspec wraps every asyncio.TimeoutError, botocore's too
            error = self._error(action, name, exc)
            raise error from error.__cause__

    def _code(self, exc: BaseException) -> str:
        if isinstance(exc, self._exc.ClientError):
            return str(exc.response.get("Error", {}).get("Code", ""))
        return ""

    def _describe(self, exc: BaseException) -> tuple[int, str]:
        """``(errno, cause in plain words)`` of a failed request."""
        e = self._exc
        if isinstance(exc, e.ClientError):
            error = exc.response.get("Error", {})
            meta = exc.response.get("ResponseMetadata", {})
            code = str(error.get("Code", "")) or str(meta.get("HTTPStatusCode", ""))
            message = str(error.get("Message", "")).rstrip(".")
            detail = f"{code}: {message}" if message and message != code else code
            attempts = int(meta.get("RetryAttempts", 0) or 0) + 1
            if code == "NoSuchBucket":
                return errno.ENOENT, f"the bucket {self.bucket!r} does not exist ({detail})"
            if code in _MISSING_KEY_CODES:
                return errno.ENOENT, f"no such object ({detail})"
            if code in _ACCESS_CODES:
                return errno.EACCES, f"access denied: wrong credentials or no permission ({detail})"
            if code in _THROTTLE_CODES:
                return errno.EAGAIN, f"throttled by the server after {attempts} attempts ({detail})"
            if code in _PRECONDITION_CODES:
                return errno.EEXIST, f"a precondition failed ({detail})"
            return errno.EIO, f"the server refused the request ({detail})"
        if isinstance(exc, (e.NoCredentialsError, e.PartialCredentialsError)):
            return errno.EACCES, (
                f"no credentials ({exc}): give key and secret in storage_options, or set "
                "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
            )
        if isinstance(exc, e.ConnectTimeoutError):
            return errno.ETIMEDOUT, f"timed out connecting to {self.endpoint}"
        if isinstance(exc, e.ReadTimeoutError):
            return errno.ETIMEDOUT, f"timed out waiting for {self.endpoint} to answer"
        if isinstance(exc, e.EndpointConnectionError):
            # aiobotocore raises it both for a connection that could not be made and for one
            # that broke while the request was being sent.
            os_error = _find_os_error(exc)
            if os_error is not None and os_error.errno == errno.ECONNREFUSED:
                return errno.ECONNREFUSED, f"connection refused by {self.endpoint} (is the server running?)"
            inner = exc.kwargs.get("error")
            names = {cls.__name__ for cls in type(inner).__mro__}
            if names & {"ClientConnectorError", "gaierror", "ConnectionTimeoutError"}:
                number = (os_error.errno if os_error is not None else None) or errno.EHOSTUNREACH
                return number, f"cannot connect to {self.endpoint} ({os_error or inner})"
            return errno.ECONNRESET, f"the connection to {self.endpoint} was dropped ({inner or exc})"
        if isinstance(exc, (e.ConnectionClosedError, e.ResponseStreamingError, e.IncompleteReadError)):
            return errno.ECONNRESET, f"the connection to {self.endpoint} was dropped ({exc})"
        if isinstance(exc, e.BotoCoreError):
            return errno.EIO, f"request to {self.endpoint} failed ({exc})"
        if isinstance(exc, (asyncio.TimeoutError, TimeoutError, self._asyn.FSTimeoutError)):
            return errno.ETIMEDOUT, f"no answer from {self.endpoint} within {self.timeout:g} s (timed out)"
        if isinstance(exc, OSError):
            return exc.errno or errno.EIO, f"{exc.strerror or exc} ({self.endpoint})"
        return errno.EIO, f"{type(exc).__name__}: {exc}"

    def _cause(self, exc: BaseException) -> OSError:
        code, text = self._describe(exc)
        cause = OSError(code, text)
        cause.__context__ = exc  # the client library's exception, for debugging ...
        cause.__suppress_context__ = True  # ... not for the user's traceback
        return cause

    def _error(self, action: str, name: str | None, exc: BaseException) -> ObjectStoreError:
        target = self.url_of(name) if name is not None else self.url
        cause = self._cause(exc)
        error = ObjectStoreError(f"{action} {target}: {cause.strerror}", target, cause)
        error.__cause__ = cause
        return error

    # ------------------------------------------------------------------ location

    def check(self) -> None:
        """Make sure the bucket exists and the credentials may list it.

        Raises:
            ObjectStoreError: the bucket does not exist, access is denied, the server cannot
                be reached or does not answer (the message says which, and the URL).
        """

        async def check() -> None:
            await self._call("list_objects_v2", Prefix=self._key_prefix, MaxKeys=1)

        self._run("Cannot use checkpoint location", None, check)

    def server_time(self) -> float:
        """The server's clock, POSIX seconds (from its ``Date`` header: 1 s resolution).

        Raises:
            ObjectStoreError: the request failed.
        """

        async def server_time() -> float:
            # A listing, not HEAD: an error then has a body that says what went wrong.
            response = await self._call("list_objects_v2", Prefix=self._key_prefix, MaxKeys=1)
            return _http_date(response["ResponseMetadata"]["HTTPHeaders"])

        return float(self._run("Cannot read the clock of", None, server_time))

    # ------------------------------------------------------------------- writing

    def put(self, name: str, data: Buffer) -> str:
        """Write ``data`` as ``name``, replacing any object of that name; return its ETag.

        Data larger than ``part_size`` goes as a multipart upload, ``max_concurrency`` parts in
        flight: readers see nothing under ``name`` (or the old object) until it completes,
        and an upload that fails is aborted.

        Raises:
            ObjectStoreError: the write failed (nothing new is visible).
        """
        return str(self._run("Cannot write", name, self._put, self.key(name), data, {}))

    def put_if_absent(self, name: str, data: Buffer) -> str | None:
        """Create ``name`` only if no object has that name (``If-None-Match: *``): its ETag, or
        None when it exists. Atomic: of racing writers exactly one gets an ETag.

        If the key exists and holds exactly ``data``, that is reported as success, not None: it
        is how an earlier attempt of this very request looks when its response was lost and the
        request was retried (and writing the same bytes again would change nothing). Writers
        that must tell each other apart write different bytes (a token).

        Raises:
            ObjectStoreError: the write failed for another reason (nothing new is visible).
        """
        result = self._run("Cannot create", name, self._put, self.key(name), data, {"IfNoneMatch": "*"})
        return None if result is None else str(result)

    def put_if_match(self, name: str, data: Buffer, etag: str) -> str | None:
        """Replace ``name`` only if its ETag is still ``etag`` (``If-Match``): the new ETag, or
        None when it changed or is gone. Atomic: of writers racing from the same ETag exactly
        one succeeds. If the object already holds exactly ``data``, that counts as success (see
        :meth:`put_if_absent`).

        Raises:
            ObjectStoreError: the write failed for another reason (nothing changed).
        """
        result = self._run("Cannot update", name, self._put, self.key(name), data, {"IfMatch": etag})
        return None if result is None else str(result)

    def put_file(self, name: str, local_path: str | os.PathLike[str]) -> str:
        """Upload a local file as ``name`` (multipart above ``part_size``, like :meth:`put`);
        return its ETag. Reads the file in parts: memory stays bounded.

        Raises:
            CheckpointIOError: the local file cannot be read.
            ObjectStoreError: the upload failed (nothing new is visible).
        """
        key = self.key(name)
        try:
            fd = os.open(local_path, os.O_RDONLY)
        except OSError as exc:
            raise io_error("Cannot read", local_path, exc) from exc
        try:
            size = os.fstat(fd).st_size

            async def read(offset: int, length: int) -> bytes:
                try:
                    return await asyncio.to_thread(os.pread, fd, length, offset)
                except OSError as exc:
                    raise io_error("Cannot read", local_path, exc) from exc

            return str(self._run("Cannot write", name, self._upload, key, size, read, {}))
        finally:
            os.close(fd)

    async def _put(self, key: str, data: Buffer, condition: dict[str, Any]) -> str | None:
        view = memoryview(data).cast("B")
        size = view.nbytes

        async def read(offset: int, length: int) -> bytes:
            return bytes(view[offset : offset + length])

        return await self._upload(key, size, read, condition, data)

    async def _upload(
        self,
        key: str,
        size: int,
        read: Callable[[int, int], Awaitable[bytes]],
        condition: dict[str, Any],
        data: Buffer | None = None,
    ) -> str | None:
        if size > self.part_size:
            return await self._multipart(key, size, read, condition)
        body = await read(0, size)
        for conflict in range(ATTEMPTS):
            try:
                response = await self._call("put_object", len(body), Key=key, Body=body, **condition)
                return str(response["ETag"])
            except self._exc.ClientError as exc:
                code = self._code(exc)
                if condition and code in _CONFLICT_CODES and conflict + 1 < ATTEMPTS:
                    # AWS: another conditional write of this key was in flight; try again.
                    await asyncio.sleep(0.1 * 2**conflict)
                    continue
                if not condition or code not in _PRECONDITION_CODES | _MISSING_KEY_CODES | _CONFLICT_CODES:
                    raise
                # An earlier attempt of this request may have landed before its connection
                # dropped, and been retried, by botocore or by aiohttp (which resends an
                # idempotent PUT without telling botocore): the object then holds our bytes.
                current = await self._fetch(key)
                if current is not None and current.data == body:
                    return current.info.etag
                return None
        raise AssertionError("unreachable")  # pragma: no cover

    async def _multipart(
        self, key: str, size: int, read: Callable[[int, int], Awaitable[bytes]], condition: dict[str, Any]
    ) -> str | None:
        part_size = max(self.part_size, -(-size // MAX_PARTS))
        upload = await self._call("create_multipart_upload", Key=key)
        upload_id = upload["UploadId"]
        done = False
        try:
            limit = asyncio.Semaphore(self.max_concurrency)

            async def send(number: int, offset: int) -> dict[str, Any]:
                async with limit:
                    body = await read(offset, min(part_size, size - offset))
                    response = await self._call(
                        "upload_part", len(body), Key=key, UploadId=upload_id, PartNumber=number, Body=body
                    )
                    return {"ETag": response["ETag"], "PartNumber": number}

            parts = await _gather_or_cancel([send(i + 1, offset) for i, offset in enumerate(range(0, size, part_size))])
            try:
                response = await self._call(
                    "complete_multipart_upload", Key=key, UploadId=upload_id,
                    MultipartUpload={"Parts": parts}, **condition,
                )
                done = True
                return str(response["ETag"])
            except self._exc.ClientError as exc:
                code = self._code(exc)
                if code in _PRECONDITION_CODES | {"NoSuchUpload"}:
                    # An earlier attempt completed it before its connection dropped?
                    info = await self._stat(key)
                    if info is not None and info.etag.strip('"') == _multipart_etag(parts):
                        done = True
                        return info.etag
                if condition and code in _PRECONDITION_CODES | _MISSING_KEY_CODES:
                    return None
                raise
        finally:
            if not done:
                # Best effort and short: a dead server leaves the upload behind, invisible;
                # abort_uploads() cleans it later.
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(
                        self._call("abort_multipart_upload", Key=key, UploadId=upload_id), min(5.0, self.timeout)
                    )

    # ------------------------------------------------------------------- reading

    async def _fetch(self, key: str) -> _Fetched | None:
        try:
            response = await self._call("get_object", Key=key)
        except self._exc.ClientError as exc:
            if self._code(exc) in _MISSING_KEY_CODES:
                return None
            raise
        data = await self._read_body(response)
        info = ObjectInfo(
            name=key[len(self._key_prefix) :],
            size=len(data),
            etag=str(response["ETag"]),
            last_modified=response["LastModified"].timestamp(),
        )
        return _Fetched(data, info, _http_date(response["ResponseMetadata"]["HTTPHeaders"]))

    def get(self, name: str) -> tuple[bytes, str] | None:
        """``(data, etag)`` of ``name``, or None if there is no such object. For objects that
        fit in memory; see :meth:`get_file` for large ones.

        Raises:
            ObjectStoreError: the read failed (the bucket does not exist, ...).
        """
        fetched = self._run("Cannot read", name, self._fetch, self.key(name))
        return None if fetched is None else (fetched.data, fetched.info.etag)

    def _get_with_time(self, name: str) -> _Fetched | None:
        result: _Fetched | None = self._run("Cannot read", name, self._fetch, self.key(name))
        return result

    def get_range(self, name: str, start: int, stop: int) -> bytes:
        """Bytes ``[start, stop)`` of ``name``, like ``data[start:stop]`` (shorter at the end).

        Raises:
            ValueError: ``start`` or ``stop`` negative, or ``stop < start``.
            ObjectStoreError: no such object (``errno`` ENOENT), or the read failed.
        """
        if not (0 <= start <= stop):
            raise ValueError(f"Expected 0 <= start <= stop. Received: start={start!r}, stop={stop!r}")
        key = self.key(name)

        async def get_range() -> bytes:
            if start == stop:
                return b""
            try:
                response = await self._call("get_object", Key=key, Range=f"bytes={start}-{stop - 1}")
            except self._exc.ClientError as exc:
                if self._code(exc) in ("InvalidRange", "416"):
                    return b""  # start at or past the end (an empty object too)
                raise
            return await self._read_body(response)

        return bytes(self._run("Cannot read", name, get_range))

    def get_file(self, name: str, local_path: str | os.PathLike[str]) -> ObjectInfo:
        """Download ``name`` into a local file (created or truncated); return what was read.
        Large objects come as ranged reads, ``max_concurrency`` in flight, all of the same
        version (``If-Match``). Not atomic nor fsynced locally: that is the caller's choice.

        Raises:
            CheckpointIOError: the local file cannot be written.
            ObjectStoreError: no such object (``errno`` ENOENT), it changed while being read
                (ESTALE), or the read failed.
        """
        key = self.key(name)
        try:
            fd = os.open(local_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        except OSError as exc:
            raise io_error("Cannot write", local_path, exc) from exc

        async def write_at(offset: int, chunk: bytes) -> None:
            try:
                await asyncio.to_thread(os.pwrite, fd, chunk, offset)
            except OSError as exc:
                raise io_error("Cannot write", local_path, exc) from exc

        async def get_file() -> ObjectInfo:
            info = await self._stat(key)
            if info is None:
                raise self._exc.ClientError(
                    {"Error": {"Code": "NoSuchKey", "Message": "The specified key does not exist"}}, "HeadObject"
                )
            limit = asyncio.Semaphore(self.max_concurrency)

            async def fetch(start: int, stop: int) -> None:
                async with limit:
                    response = await self._call(
                        "get_object", Key=key, Range=f"bytes={start}-{stop - 1}", IfMatch=info.etag
                    )
                    position = start

                    async def sink(chunk: bytes) -> None:
                        nonlocal position
                        await write_at(position, chunk)
                        position += len(chunk)

                    await self._read_body(response, sink)
                    if position != stop:
                        raise self._exc.IncompleteReadError(actual_bytes=position - start, expected_bytes=stop - start)

            try:
                bounds = range(0, info.size, self.part_size)
                await _gather_or_cancel([fetch(a, min(a + self.part_size, info.size)) for a in bounds])
            except self._exc.ClientError as exc:
                if self._code(exc) in _PRECONDITION_CODES:
                    raise _Changed() from exc
                raise
            return info

        try:
            result: ObjectInfo = self._run("Cannot read", name, get_file)
            return result
        except _Changed:
            cause = OSError(errno.ESTALE, "it was replaced while being read")
            url = self.url_of(name)
            raise ObjectStoreError(f"Cannot read {url}: {cause.strerror}", url, cause) from cause
        finally:
            os.close(fd)

    async def _stat(self, key: str) -> ObjectInfo | None:
        try:
            response = await self._call("head_object", Key=key)
        except self._exc.ClientError as exc:
            if self._code(exc) in _MISSING_KEY_CODES:
                return None
            raise
        return ObjectInfo(
            name=key[len(self._key_prefix) :],
            size=int(response["ContentLength"]),
            etag=str(response["ETag"]),
            last_modified=response["LastModified"].timestamp(),
        )

    def stat(self, name: str) -> ObjectInfo | None:
        """What ``name`` is (size, ETag, last modified), or None if there is no such object.
        (A HEAD request has no error body: a missing bucket looks like a missing object;
        :meth:`check` tells them apart.)

        Raises:
            ObjectStoreError: the request failed.
        """
        result: ObjectInfo | None = self._run("Cannot stat", name, self._stat, self.key(name))
        return result

    def list(self, sub_prefix: str = "") -> builtins.list[ObjectInfo]:
        """Every object whose name starts with ``sub_prefix`` (all of them by default), at any
        depth, sorted by name. Unfinished multipart uploads are not objects: never listed.

        Raises:
            ObjectStoreError: the listing failed.
        """
        prefix = self._key_prefix + sub_prefix

        async def list_all() -> builtins.list[ObjectInfo]:
            found: builtins.list[ObjectInfo] = []
            token: dict[str, Any] = {}
            while True:
                response = await self._call("list_objects_v2", Prefix=prefix, **token)
                for item in response.get("Contents", []) or []:
                    key = str(item["Key"])
                    if key.endswith("/"):
                        continue  # a folder placeholder, not an object ckptmgr wrote
                    found.append(
                        ObjectInfo(
                            name=key[len(self._key_prefix) :],
                            size=int(item["Size"]),
                            etag=str(item.get("ETag", "")),
                            last_modified=item["LastModified"].timestamp(),
                        )
                    )
                if not response.get("IsTruncated") or not response.get("NextContinuationToken"):
                    return sorted(found, key=lambda info: info.name)
                token = {"ContinuationToken": str(response["NextContinuationToken"])}

        result: builtins.list[ObjectInfo] = self._run("Cannot list", None, list_all)
        return result

    # ------------------------------------------------------------------ deleting

    def delete(self, names: Iterable[str]) -> None:
        """Delete these objects, in batches; names that do not exist are fine.

        Raises:
            ObjectStoreError: a batch failed, or the server refused to delete one of them
                (naming it); the others may be gone.
        """
        keys = [self.key(name) for name in names]

        async def delete() -> None:
            for start in range(0, len(keys), _DELETE_BATCH):
                batch = keys[start : start + _DELETE_BATCH]
                response = await self._call(
                    "delete_objects", Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True}
                )
                for failure in response.get("Errors", []) or []:
                    if failure.get("Code") in _MISSING_KEY_CODES:
                        continue
                    raise self._exc.ClientError(
                        {"Error": {"Code": failure.get("Code", ""), "Message": failure.get("Message", ""),
                                   "Key": failure.get("Key", "")}},
                        f"DeleteObjects ({failure.get('Key')})",
                    )

        self._run("Cannot delete from", None, delete)

    def delete_if_match(self, name: str, etag: str) -> bool:
        """Delete ``name`` only if its ETag is still ``etag`` (``If-Match`` on DELETE): True if
        deleted, False if it changed or is gone (a resent request whose first attempt deleted
        it also reads False).

        Raises:
            ObjectStoreError: the request failed, or the server does not support conditional
                deletes (errno EIO).
        """
        key = self.key(name)

        async def delete() -> bool:
            try:
                await self._call("delete_object", Key=key, IfMatch=etag)
            except self._exc.ClientError as exc:
                if self._code(exc) in _PRECONDITION_CODES | _MISSING_KEY_CODES:
                    return False
                raise
            return True

        return bool(self._run("Cannot delete", name, delete))

    def abort_uploads(
        self, sub_prefix: str = "", *, older_than: float, ours: Callable[[str], Any] | None = None,
    ) -> int:
        """Abort the unfinished multipart uploads under ``sub_prefix`` begun more than
        ``older_than`` seconds ago by the server's clock (a dead writer's leftovers: they are
        invisible, but hold storage); return how many. Call it only as the location's writer
        (holding its :class:`Lease`), with ``older_than`` longer than any upload of a live one.
        ``ours(name)`` (a name relative to the location), where given, must be true of an
        upload for it to be aborted: another program's uploads under the prefix are left alone.

        Raises:
            ObjectStoreError: a request failed.
        """
        prefix = self._key_prefix + sub_prefix

        async def abort() -> int:
            response = await self._call("list_multipart_uploads", Prefix=prefix)
            now = _http_date(response["ResponseMetadata"]["HTTPHeaders"])
            uploads = builtins.list(response.get("Uploads", []) or [])
            while response.get("IsTruncated"):
                response = await self._call(
                    "list_multipart_uploads", Prefix=prefix,
                    KeyMarker=response.get("NextKeyMarker", ""), UploadIdMarker=response.get("NextUploadIdMarker", ""),
                )
                uploads.extend(response.get("Uploads", []) or [])
            count = 0
            for upload in uploads:
                if ours is not None and not ours(upload["Key"][len(self._key_prefix):]):
                    continue
                if now - upload["Initiated"].timestamp() > older_than:
                    with contextlib.suppress(self._exc.ClientError):  # finished or aborted meanwhile
                        await self._call("abort_multipart_upload", Key=upload["Key"], UploadId=upload["UploadId"])
                        count += 1
            return count

        return int(self._run("Cannot clean unfinished uploads of", None, abort))


class _Changed(Exception):
    """An object changed between the reads of one get_file()."""


def _find_os_error(exc: BaseException) -> OSError | None:
    """The innermost OSError with an errno behind a botocore connection error."""
    seen: set[int] = set()
    todo: builtins.list[BaseException | None] = [exc]
    found: OSError | None = None
    while todo:
        current = todo.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno:
            found = current
        inner = getattr(current, "kwargs", {}).get("error") if isinstance(getattr(current, "kwargs", None), dict) else None
        todo.extend([current.__cause__, current.__context__, inner, getattr(current, "os_error", None)])
    return found


async def _gather_or_cancel(aws: Iterable[Awaitable[Any]]) -> builtins.list[Any]:
    """Run these together; on the first failure cancel the rest, wait for them, and raise it."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    if not tasks:
        return []
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    finally:
        for task in tasks:
            if not task.done():
                task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    for task in tasks:
        error = None if task.cancelled() else task.exception()
        if error is not None:
            raise error
    return [task.result() for task in tasks]


# ----------------------------------------------------------------------------- lease


class Lease:
    """One writer per location: a lease object, renewed while its holder lives.

    :meth:`acquire` creates the lease object (``.ckptmgr-lease.json`` under the location)
    with a create-only write; a daemon thread then renews it every ``ttl / 3`` with
    compare-and-swap writes on its ETag. A second writer finds it held and gets
    :class:`~ckptmgr.errors.DirectoryLockedError` naming the holder (host, pid, since).

    Expiry is judged by the server's clock alone: a lease is expired once the server's time
    (its ``Date`` header) minus the lease object's ``LastModified`` exceeds the lease's ``ttl``.
    Both have 1 s resolution, so a taker waits for a difference of ``ttl + 1`` s to be sure:
    a holder that dies (SIGKILL, power loss) is taken over at most ``ttl + 2`` s after its
    last renewal, and never before ``ttl`` s. Of two racing takers exactly one wins (both
    write with ``If-Match`` on the ETag they saw).

    The holder's own view is by its monotonic clock: the lease is valid until ``ttl`` after
    the *start* of its last successful renewal, which is no later than the server stamped
    it, so the holder stops trusting its lease before any taker can take it over.
    :meth:`check` raises once a renewal found another holder, or when less than ``ttl / 6``
    of validity is left (renewals failing: server down, network cut); the writer calls it
    before each commit. A renewal that succeeds again later (nobody took it meanwhile: the
    ``If-Match`` proves it) makes :meth:`check` pass again.

    Example::

        lease = Lease(store, ttl=30.0, owner={"manager": "exp1"})
        lease.acquire()           # DirectoryLockedError if a live writer holds it
        ...; lease.check(); ...   # before each commit
        lease.release()

    Args:
        store: the location.
        name: the lease object's name under it.
        ttl: seconds without renewal after which the lease may be taken over. Keep the store's
            ``timeout`` under ``ttl / 3``, so that a renewal gives up before the next is due.
        owner: extra JSON-able facts about the holder, stored in the lease (shown in errors).
        clock: the holder's monotonic clock (tests may pass their own).
    """

    def __init__(
        self,
        store: ObjectStore,
        name: str = LEASE_NAME,
        *,
        ttl: float = 30.0,
        owner: Mapping[str, Any] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not (isinstance(ttl, (int, float)) and ttl > 0):
            raise ValueError(f"Expected ttl > 0 (seconds). Received: ttl={ttl!r}")
        self.store = store
        self.name = name
        self.url = store.url_of(name)
        self.ttl = float(ttl)
        self.owner = dict(owner or {})
        self._clock = clock
        self.token = ""
        self.since = 0.0
        self._etag: str | None = None
        self._valid_until = 0.0
        self._lost: str | None = None  # why, once another holder was seen
        self._last_error: BaseException | None = None
        self._mutex = threading.Lock()
        self._renewing = threading.Lock()  # one renewal at a time: two from one ETag would see each other as a taker
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ holding

    @property
    def held(self) -> bool:
        """Whether this lease was acquired and not released (it may have been lost since)."""
        return self._etag is not None

    def _body(self) -> bytes:
        return json.dumps(
            {
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "since": self.since,
                "renewed": time.time(),
                "ttl": self.ttl,
                "token": self.token,
                "owner": self.owner,
            },
            sort_keys=True,
        ).encode()

    def acquire(self) -> None:
        """Take the lease: create it, or take it over if its holder let it expire.

        Raises:
            DirectoryLockedError: a live holder has it (naming host, pid, since, the lease URL).
            ObjectStoreError: a request failed.
            RuntimeError: this lease is already held.
        """
        if self._etag is not None:
            raise RuntimeError(f"the lease {self.url} is already held by this object")
        self.token = secrets.token_hex(16)
        self.since = time.time()
        for _attempt in range(3):
            started = self._clock()
            etag = self.store.put_if_absent(self.name, self._body())
            if etag is None:
                current = self.store._get_with_time(self.name)
                if current is None:
                    continue  # released meanwhile: try to create it again
                holder = _parse_holder(current.data)
                holder_ttl = _holder_ttl(holder, self.ttl)
                age = current.server_time - current.info.last_modified
                if age < holder_ttl + 1.0:
                    raise DirectoryLockedError(
                        _locked_message(self.store.url, self.url, holder, age, holder_ttl), lock_path=self.url
                    )
                started = self._clock()
                etag = self.store.put_if_match(self.name, self._body(), current.info.etag)
                if etag is None:
                    continue  # renewed or taken by someone else meanwhile: look again
            with self._mutex:
                self._etag = etag
                self._valid_until = started + self.ttl
                self._lost = None
                self._last_error = None
            self._stop.clear()
            self._thread = threading.Thread(target=self._renew_loop, name=f"ckptmgr-lease {self.url}", daemon=True)
            self._thread.start()
            return
        raise DirectoryLockedError(
            f"Cannot take the lease {self.url}: other writers keep changing it. Only one process "
            "may save to a location; pass read_only=True to restore from it while it is in use",
            lock_path=self.url,
        )

    def renew(self) -> None:
        """Renew now (the thread does it every ``ttl / 3``); records the outcome for :meth:`check`."""
        with self._renewing:
            self._renew()

    def _renew(self) -> None:
        with self._mutex:
            etag, lost = self._etag, self._lost
        if etag is None or lost is not None:
            return
        started = self._clock()
        try:
            new = self.store.put_if_match(self.name, self._body(), etag)
        except ObjectStoreError as exc:
            with self._mutex:
                self._last_error = exc
            return
        if new is None:
            holder = "another writer"
            with contextlib.suppress(ObjectStoreError):
                current = self.store._get_with_time(self.name)
                holder = "nobody (it was deleted)" if current is None else _describe_holder(_parse_holder(current.data))
            with self._mutex:
                self._lost = f"it is now held by {holder}"
            return
        with self._mutex:
            if self._etag == etag:
                self._etag = new
                self._valid_until = started + self.ttl
                self._last_error = None

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            self.renew()
            if self._lost is not None:
                return

    def check(self) -> None:
        """Raise unless this process still holds the lease with some margin left.

        Raises:
            DirectoryLockedError: it was never acquired or was released, another writer took
                it, or it could not be renewed and may be taken over soon (with the last
                error as ``__cause__``).
        """
        with self._mutex:
            etag, lost, error = self._etag, self._lost, self._last_error
            remaining = self._valid_until - self._clock()
        if etag is None:
            raise DirectoryLockedError(f"The lease {self.url} is not held by this writer", lock_path=self.url)
        if lost is not None:
            raise DirectoryLockedError(
                f"Lost the lease {self.url}: {lost}. This writer stops: another one may be writing to the location",
                lock_path=self.url,
            )
        if remaining < self.ttl / 6:
            why = f": {error}" if error is not None else ": the renewal in flight has not been answered"
            raise DirectoryLockedError(
                f"Cannot renew the lease {self.url} (valid for {max(remaining, 0.0):.1f} s more, of "
                f"{self.ttl:g} s){why}. Another writer may take it over, so this one does not commit",
                lock_path=self.url,
            ) from error

    def release(self) -> None:
        """Stop renewing, and give the lease up if it is still ours: a conditional delete (or,
        where the server has no conditional deletes, a conditional write that marks it
        released), so a writer that took it over meanwhile keeps it. Never raises for a lease
        that cannot be released (lost, server down): it then expires by itself.
        """
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=self.store.timeout + 5)
        with self._mutex:
            etag, lost = self._etag, self._lost
            self._etag = None
        if etag is None or lost is not None:
            return
        try:
            self.store.delete_if_match(self.name, etag)
        except ObjectStoreError:
            released = json.dumps({"released": True, "ttl": 0, "token": self.token}).encode()
            with contextlib.suppress(ObjectStoreError):
                self.store.put_if_match(self.name, released, etag)

    def __enter__(self) -> Lease:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _parse_holder(data: bytes) -> dict[str, Any]:
    try:
        holder = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _holder_ttl(holder: Mapping[str, Any], default: float) -> float:
    if holder.get("released") is True:
        return -1.0  # given up: free at once
    ttl = holder.get("ttl")
    return float(ttl) if isinstance(ttl, (int, float)) and not isinstance(ttl, bool) and ttl >= 0 else default


def _describe_holder(holder: Mapping[str, Any]) -> str:
    host = holder.get("host", "an unknown host")
    pid = holder.get("pid", "?")
    since = holder.get("since")
    when = (
        time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since))
        if isinstance(since, (int, float)) and not isinstance(since, bool)
        else "an unknown time"
    )
    return f"pid {pid} on {host} (since {when})"


def _locked_message(location: str, url: str, holder: Mapping[str, Any], age: float, ttl: float) -> str:
    return (
        f"Checkpoint location {location} is held by another writer: "
        f"{_describe_holder(holder)}; lease {url}, renewed {max(age, 0.0):.0f} s ago. If that writer "
        f"died, its lease expires {ttl:g} s after its last renewal. Only one process may save to a "
        "location; pass read_only=True to restore from it while it is in use"
    )
