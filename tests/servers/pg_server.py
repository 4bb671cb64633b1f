"""A real PostgreSQL server for tests: a throwaway cluster on 127.0.0.1 and a free port.

`PostgresServer` runs `initdb` and then the server itself as the `postgres` user when the
tests run as root (PostgreSQL refuses to run as root), with fsync off. The server is a child
of the test process that dies with it, so no cluster outlives a killed run. The session
fixture `pg_server` yields a `PgFixture` whose `new_url()` creates a fresh database and
returns its `postgresql+psycopg://` URL. Missing server binaries or psycopg FAIL the tests
that need them (CI installs both): only missing hardware is a reason to skip.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

SERVER_USER = "postgres"
SUPERUSER = "postgres"
BINARIES = ("initdb", "postgres")
INSTALL_HINT = (
    "install the PostgreSQL server (Debian: `apt-get install -y postgresql`; .ci/run does)"
)


def server_bin_dir() -> Path | None:
    """The folder holding `initdb` and `postgres`: on PATH, else Debian's versioned folder."""
    found = shutil.which("initdb")
    if found:
        folder = Path(os.path.realpath(found)).parent
        if all((folder / b).is_file() for b in BINARIES):
            return folder
    for candidate in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        folder = Path(candidate)
        if all((folder / b).is_file() for b in BINARIES):
            return folder
    return None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _die_with_parent() -> None:
    # Linux: the server gets SIGQUIT (immediate shutdown) if the test process dies.
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGQUIT)  # PR_SET_PDEATHSIG


@dataclass
class PostgresServer:
    """One throwaway PostgreSQL cluster serving 127.0.0.1:`port` (trust authentication)."""

    root: Path | None = None
    port: int = 0
    process: subprocess.Popen[bytes] | None = None
    _owns_root: bool = field(default=False, repr=False)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def _run_as(self) -> dict[str, Any]:
        """Popen arguments that drop root to the `postgres` user (no-op for other users)."""
        if os.geteuid() != 0:
            return {}
        try:
            entry = pwd.getpwnam(SERVER_USER)
        except KeyError:
            raise RuntimeError(
                f"running as root but there is no `{SERVER_USER}` user to run PostgreSQL as;"
                f" {INSTALL_HINT}"
            ) from None
        return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}

    def start(self, timeout: float = 60.0) -> PostgresServer:
        """initdb (once), then start the server; retries on a port taken meanwhile."""
        bindir = server_bin_dir()
        if bindir is None:
            raise RuntimeError(
                f"PostgreSQL server binaries (initdb, postgres) not found: {INSTALL_HINT}"
            )
        if self.root is None:
            # Under /tmp, not pytest's tmp (mode 0700 for root): postgres must reach it.
            self.root = Path(tempfile.mkdtemp(prefix="kiln-pg-"))
            self._owns_root = True
        run_as = self._run_as()
        if run_as:
            os.chown(self.root, run_as["user"], run_as["group"])
        data = self.root / "data"
        if not (data / "PG_VERSION").exists():
            subprocess.run(
                [
                    str(bindir / "initdb"),
                    "-D",
                    str(data),
                    "-U",
                    SUPERUSER,
                    "--auth=trust",
                    "--encoding=UTF8",
                    "--locale=C",
                    "--no-sync",
                ],
                cwd=self.root,
                check=True,
                capture_output=True,
                **run_as,
            )
        for attempt in range(3):
            if not self.port or attempt:
                self.port = free_port()
            if self._launch(bindir, data, run_as, timeout):
                return self
            self.stop()
        raise RuntimeError(f"PostgreSQL did not start; see {self.root / 'postgres.log'}")

    def _launch(self, bindir: Path, data: Path, run_as: dict[str, Any], timeout: float) -> bool:
        assert self.root is not None
        settings = {
            "listen_addresses": "127.0.0.1",
            "port": str(self.port),
            "unix_socket_directories": str(self.root),
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "max_connections": "300",
            "shared_buffers": "64MB",
        }
        command = [str(bindir / "postgres"), "-D", str(data)]
        for key, value in settings.items():
            command += ["-c", f"{key}={value}"]
        log = open(self.root / "postgres.log", "ab")  # noqa: SIM115 - the child keeps it
        try:
            self.process = subprocess.Popen(
                command,
                cwd=self.root,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent,
                **run_as,
            )
        finally:
            log.close()
        return self._wait_ready(timeout)

    def _wait_ready(self, timeout: float) -> bool:
        import psycopg

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                return False
            try:
                with psycopg.connect(self._dsn("postgres"), connect_timeout=2) as conn:
                    conn.execute("SELECT 1")
                return True
            except psycopg.Error:
                time.sleep(0.05)
        return False

    def _dsn(self, database: str) -> str:
        return f"host=127.0.0.1 port={self.port} user={SUPERUSER} dbname={database}"

    def create_database(self, name: str | None = None) -> str:
        """Create an empty database; returns its name."""
        import psycopg

        name = name or f"kiln_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self._dsn("postgres"), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}" TEMPLATE template0')
        return name

    def stop(self) -> None:
        """Immediate shutdown (the data is throwaway)."""
        if self.process is not None:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGQUIT)
                try:
                    self.process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait(timeout=10)
            self.process = None

    def remove(self) -> None:
        self.stop()
        if self._owns_root and self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> PostgresServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.remove()


@dataclass(frozen=True)
class PgFixture:
    """The session's server and fresh databases on it."""

    server: PostgresServer

    def new_url(self) -> str:
        """The URL of a new, empty database."""
        return self.server.url(self.server.create_database())


def require_postgres() -> None:
    """Fail (not skip) when psycopg or the server binaries are missing."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        pytest.fail("psycopg is not installed: pip install -e '.[dev]' (psycopg[binary])")
    if server_bin_dir() is None:
        pytest.fail(f"PostgreSQL server binaries (initdb, postgres) not found: {INSTALL_HINT}")


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgFixture]:
    """One PostgreSQL cluster for the session; stopped and removed at its end."""
    require_postgres()
    try:
        server = PostgresServer().start()
    except (RuntimeError, subprocess.CalledProcessError) as exc:
        detail = getattr(exc, "stderr", None) or b""
        pytest.fail(f"cannot start PostgreSQL: {exc} {detail.decode(errors='replace')[-2000:]}")
    try:
        yield PgFixture(server)
    finally:
        server.remove()


@pytest.fixture
def pg_url(pg_server: PgFixture) -> str:
    """A fresh, empty PostgreSQL database for one test."""
    return pg_server.new_url()


INDEX_KINDS = ("sqlite", "postgres")
# Runs a test once per index engine: the conftest `store` fixture follows `index_kind`.
both_indexes = pytest.mark.parametrize("index_kind", INDEX_KINDS, indirect=True)
