"""`kiln export -o PATH` for every kind of PATH: a link is written through, a FIFO or device
is fed in place, `-o -` is stdout, and a full disk is one line with nothing left behind.

The full-disk tests mount a 1 MiB tmpfs in a private mount namespace (`unshare --mount`,
with `--map-root-user` when not root), so nothing outside the test process sees it."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from artifacts.digest import Digest
from artifacts.errors import ArchiveError
from artifacts.store import Store
from artifacts.transfer import export_release, import_archive
from tests.artifacts.test_transfer import make_release

KILN = [sys.executable, "-m", "kiln"]


@pytest.fixture
def source(tmp_path: Path) -> tuple[Store, Digest]:
    with Store.open(str(tmp_path / "source")) as store:
        yield store, make_release(store)


def imports_cleanly(archive: Path, tmp_path: Path, digest: Digest) -> None:
    with Store.open(str(tmp_path / "check")) as target:
        assert import_archive(target, archive).releases == (("minilm:prod", digest),)


def kiln(*args: str, cwd: Path, **kwargs: object) -> subprocess.CompletedProcess:  # type: ignore[type-arg]
    """The kiln CLI run in `cwd` (where an export that took `-` for a file name would write)."""
    env = {k: v for k, v in os.environ.items() if k != "KILN_INDEX_URL"}
    return subprocess.run(
        KILN + list(args), env=env, cwd=cwd, capture_output=True, timeout=120, **kwargs
    )


def one_line_error(result: subprocess.CompletedProcess, *needles: str) -> str:  # type: ignore[type-arg]
    stderr = result.stderr.decode() if isinstance(result.stderr, bytes) else result.stderr
    assert result.returncode == 1, stderr
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def test_a_symlink_is_written_through(source: tuple[Store, Digest], tmp_path: Path) -> None:
    store, digest = source
    target = tmp_path / "real" / "minilm.tar"
    target.parent.mkdir()
    target.write_bytes(b"previous export")
    link = tmp_path / "link.tar"
    link.symlink_to(target)

    report = export_release(store, "minilm:prod", link)

    assert link.is_symlink() and os.readlink(link) == str(target)
    assert target.stat().st_size == report.bytes > len(b"previous export")
    assert [p.name for p in target.parent.iterdir()] == ["minilm.tar"]  # no temp left
    imports_cleanly(link, tmp_path, digest)


def test_a_dangling_symlink_creates_its_target(
    source: tuple[Store, Digest], tmp_path: Path
) -> None:
    store, digest = source
    link = tmp_path / "link.tar"
    link.symlink_to("made-by-export.tar")
    export_release(store, "minilm:prod", link)
    assert link.is_symlink()
    assert (tmp_path / "made-by-export.tar").is_file()
    imports_cleanly(tmp_path / "made-by-export.tar", tmp_path, digest)


def test_a_fifo_is_fed_not_replaced(source: tuple[Store, Digest], tmp_path: Path) -> None:
    store, digest = source
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    received = bytearray()

    def read() -> None:
        with open(fifo, "rb") as reader:
            while chunk := reader.read(65536):
                received.extend(chunk)

    reader = threading.Thread(target=read)
    reader.start()
    report = export_release(store, "minilm:prod", fifo)
    reader.join(timeout=60)

    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert len(received) == report.bytes > 0
    (tmp_path / "got.tar").write_bytes(bytes(received))
    imports_cleanly(tmp_path / "got.tar", tmp_path, digest)


def device(tmp_path: Path, name: str, minor: int) -> Path:
    """A private copy of /dev/null (minor 3) or /dev/full (minor 7) when root can make one.

    Never the real node as root: an export that renamed over it (the bug these tests catch)
    would replace the machine's /dev/null. Without root the real node is safe (/dev is not
    writable) and still tells the behaviours apart."""
    if os.geteuid() != 0:
        return Path("/dev") / name
    path = tmp_path / name
    os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(1, minor))
    return path


def test_dev_null_stays_a_device(source: tuple[Store, Digest], tmp_path: Path) -> None:
    store, _ = source
    null = device(tmp_path, "null", 3)
    before = os.lstat(null)
    report = export_release(store, "minilm:prod", null)
    after = os.lstat(null)
    assert stat.S_ISCHR(after.st_mode) and after.st_rdev == before.st_rdev
    assert after.st_ino == before.st_ino
    assert report.bytes > 3 * 1024 * 1024


def test_dev_full_is_one_line_and_stays_a_device(
    source: tuple[Store, Digest], tmp_path: Path
) -> None:
    full = device(tmp_path, "full", 7)
    before = os.lstat(full)
    result = kiln(
        "export", "minilm:prod", "-o", str(full), "--store", str(tmp_path / "source"), cwd=tmp_path
    )
    one_line_error(result, str(full), "no space left on device")
    after = os.lstat(full)
    assert stat.S_ISCHR(after.st_mode) and after.st_ino == before.st_ino


def test_a_directory_or_socket_is_refused(source: tuple[Store, Digest], tmp_path: Path) -> None:
    import socket  # noqa: PLC0415

    store, _ = source
    with pytest.raises(ArchiveError, match="is a directory"):
        export_release(store, "minilm:prod", tmp_path)
    path = tmp_path / "s.sock"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(path))
        with pytest.raises(ArchiveError, match="not a file, a FIFO or a device"):
            export_release(store, "minilm:prod", path)
        assert stat.S_ISSOCK(os.lstat(path).st_mode)


def test_dash_writes_the_archive_to_stdout(source: tuple[Store, Digest], tmp_path: Path) -> None:
    _, digest = source
    result = kiln(
        "export", "minilm:prod", "-o", "-", "--store", str(tmp_path / "source"), cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert b"exported minilm:prod" in result.stderr  # the summary stays off the archive
    (tmp_path / "stdout.tar").write_bytes(result.stdout)
    imports_cleanly(tmp_path / "stdout.tar", tmp_path, digest)
    assert not (tmp_path / "-").exists()


def test_dev_stdout_on_a_pipe_gets_only_the_archive(
    source: tuple[Store, Digest], tmp_path: Path
) -> None:
    """Through a link of our own to /proc/self/fd/1, which is what /dev/stdout is: an export
    that renamed over the link must not be able to replace the machine's /dev/stdout."""
    _, digest = source
    stdout = tmp_path / "stdout"
    stdout.symlink_to("/proc/self/fd/1")
    result = kiln(
        "export", "minilm:prod", "-o", str(stdout), "--store", str(tmp_path / "source"),
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    (tmp_path / "stdout.tar").write_bytes(result.stdout)
    imports_cleanly(tmp_path / "stdout.tar", tmp_path, digest)


# -- a full disk -------------------------------------------------------------------------------


def on_tiny_tmpfs(mount: Path, command: str) -> subprocess.CompletedProcess[str]:
    """Run `command` (sh) with a 1 MiB tmpfs mounted on `mount`, in a private namespace; its
    last output line is `find` of the tmpfs afterwards."""
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare(1) to mount a tmpfs")
    mount.mkdir()
    userns = [] if os.geteuid() == 0 else ["--map-root-user"]
    script = (
        f"mount -t tmpfs -o size=1m tmpfs {mount} || exit 99\n{command}\nrc=$?\n"
        f"echo FILES: $(cd {mount} && find . -type f | sort)\nexit $rc"
    )
    env = {k: v for k, v in os.environ.items() if k != "KILN_INDEX_URL"}
    result = subprocess.run(
        ["unshare", "--mount", *userns, "sh", "-c", script],
        capture_output=True,
        text=True,
        env=env,
        timeout=180,
    )
    if result.returncode == 99 or "unshare failed" in result.stderr:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()[:200]}")
    return result


def files_left(result: subprocess.CompletedProcess[str]) -> list[str]:
    line = [x for x in result.stdout.splitlines() if x.startswith("FILES:")][-1]
    return line.removeprefix("FILES:").split()


def test_export_to_a_full_disk_is_one_line_and_leaves_nothing(
    source: tuple[Store, Digest], tmp_path: Path
) -> None:
    full = tmp_path / "full"
    kiln_cmd = " ".join([*KILN, "export", "minilm:prod", "--store", str(tmp_path / "source")])
    result = on_tiny_tmpfs(full, f"{kiln_cmd} -o {full}/minilm.tar")
    one_line_error(result, f"{full}/minilm.tar", "no space left on device", "nothing was written")
    assert files_left(result) == []
