"""Read-only stores and caches serve every read command and the loader, and nothing is
written: a store on a read-only bind mount (`mount --bind` + `mount -o remount,bind,ro`, so
even root cannot write), a store read by an unprivileged user (`setpriv` to nobody: as root,
chmod alone would not stop a write), and a complete loader cache on a read-only mount."""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from runtime_loader.api import load
from tests.artifacts.test_store_refs import _tree, run_kiln
from tests.helpers.loader_helpers import (
    LLAMA_REF,
    REPO,
    compiled_store,
    copy_store,
    kiln,
    kiln_env,
    kiln_ok,
    release_of,
)

PROMPT = "3,17,42,5"
NOBODY = 65534


@contextlib.contextmanager
def readonly_mount(source: Path, target: Path) -> Iterator[Path]:
    """`source` bind-mounted read-only at `target` (skips where mounts are not allowed)."""
    target.mkdir()
    bind = subprocess.run(["mount", "--bind", str(source), str(target)], capture_output=True)
    if bind.returncode != 0:
        pytest.skip(f"cannot bind-mount here: {bind.stderr.decode().strip()}")
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(target)], check=True)
        probe = target / ".probe"
        with pytest.raises(OSError, match="Read-only file system"):
            probe.touch()
        yield target
    finally:
        gc.collect()  # drop any file a finished load still holds open
        if subprocess.run(["umount", str(target)]).returncode != 0:
            subprocess.run(["umount", "-l", str(target)])
            raise AssertionError(f"{target} was still in use after the test")


@pytest.fixture(scope="module")
def llama_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return compiled_store("tiny-llama", tmp_path_factory)


def _read_commands(store: Path, digest: str, cache: Path) -> list[tuple[str, list[str]]]:
    common = ["--store", str(store)]
    return [
        ("ls", [*common, "ls"]),
        ("show", [*common, "show", LLAMA_REF]),
        ("stats", [*common, "stats", "--json"]),
        ("verify", [*common, "verify"]),
        ("history", [*common, "history", LLAMA_REF, "--json"]),
        ("diff", [*common, "diff", LLAMA_REF, f"tiny-llama@{digest}"]),
        ("pull", [*common, "pull", LLAMA_REF, "--cache-dir", str(cache), "--json"]),
        ("generate", [*common, "generate", LLAMA_REF, "--prompt-ids", PROMPT,
                      "--max-new-tokens", "6", "--cache-dir", str(cache), "--json"]),
    ]


def _expected_tokens(store: Path, cache: Path) -> list[list[int]]:
    model = load(LLAMA_REF, store=store, cache_dir=cache)
    return model.generate([[int(t) for t in PROMPT.split(",")]], max_new_tokens=6).tolist()


def test_a_store_on_a_read_only_mount_serves_every_read_command_and_the_loader(
    llama_store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    digest, _ = release_of(llama_store, LLAMA_REF)
    expected = _expected_tokens(llama_store, tmp_path / "reference-cache")
    source = copy_store(llama_store, tmp_path / "store")
    before = _tree(source)
    with readonly_mount(source, tmp_path / "ro") as ro:
        for name, args in _read_commands(ro, str(digest), tmp_path / f"cache-{0}"):
            code, out, err = run_kiln(monkeypatch, capsys, *args)
            assert code == 0, (name, err)
            if name == "stats":
                assert json.loads(out)["releases"] == 1
            if name == "generate":
                assert json.loads(out)["tokens"] == expected
        model = load(LLAMA_REF, store=ro, cache_dir=tmp_path / "cache-1")
        assert model.digest == digest
        proc = kiln("--store", ro, "show", LLAMA_REF)  # and once as a real process
        assert proc.returncode == 0, proc.stderr
    assert _tree(source) == before


_AS_NOBODY = """
import contextlib, io, json, sys
from kiln.cli import main
from runtime_loader.api import load
commands, store, cache = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
results = {}
for name, args in commands:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(args)
            code = 0
        except SystemExit as exc:
            code = int(exc.code or 0)
    results[name] = [code, out.getvalue(), err.getvalue()]
results["load"] = str(load("tiny-llama:latest", store=store, cache_dir=cache).digest)
print(json.dumps(results))
"""


def test_a_store_the_user_cannot_write_serves_every_read_command(
    llama_store: Path, tmp_path: Path
) -> None:
    if shutil.which("setpriv") is None or os.geteuid() != 0:
        pytest.skip("needs root and setpriv to run the reader as an unprivileged user")
    top = Path(tempfile.mkdtemp(prefix="kiln-ro-", dir="/tmp"))  # pytest's tmp is root-only
    try:
        os.chmod(top, 0o755)
        digest, _ = release_of(llama_store, LLAMA_REF)
        expected = _expected_tokens(llama_store, tmp_path / "reference-cache")
        store = copy_store(llama_store, top / "store")
        for folder, _dirs, files in os.walk(store):
            for name in files:
                os.chmod(Path(folder, name), 0o444)
            os.chmod(folder, 0o555)
        home = top / "home"
        home.mkdir()
        os.chown(home, NOBODY, NOBODY)
        before = _tree(store)
        cache = home / "cache"
        commands = _read_commands(store, str(digest), cache)
        proc = subprocess.run(
            ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
             sys.executable, "-c", _AS_NOBODY, json.dumps(commands), str(store), str(cache)],
            cwd=home, capture_output=True, text=True, timeout=600,
            env=kiln_env(HOME=str(home), XDG_CACHE_HOME=str(home / "xdg")),
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        results = json.loads(proc.stdout.strip().splitlines()[-1])
        for name, _ in commands:
            code, out, err = results[name]
            assert code == 0, (name, err)
        assert json.loads(results["generate"][1])["tokens"] == expected
        assert json.loads(results["stats"][1])["releases"] == 1
        assert results["load"] == str(digest)
        assert _tree(store) == before
    finally:
        for folder, _dirs, _files in os.walk(top):
            os.chmod(folder, stat.S_IRWXU)
        shutil.rmtree(top)


def test_a_complete_read_only_cache_serves_loads_online_and_offline(
    llama_store: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cache = tmp_path / "cache"
    kiln_ok("pull", LLAMA_REF, "--store", llama_store, "--cache-dir", cache)
    digest, _ = release_of(llama_store, LLAMA_REF)
    expected = _expected_tokens(llama_store, cache)
    before = _tree(cache)
    with readonly_mount(cache, tmp_path / "ro-cache") as ro:
        with caplog.at_level(logging.WARNING, logger="kiln"):
            online = load(LLAMA_REF, store=llama_store, cache_dir=ro, offline=False)
            again = load(LLAMA_REF, store=llama_store, cache_dir=ro, offline=False)
        assert online.digest == again.digest == digest
        warnings = [r.getMessage() for r in caplog.records if r.name == "kiln"]
        assert len(warnings) == 2  # one per cache object: each load opens the cache anew
        assert f"cannot record {LLAMA_REF} in the cache {ro}" in warnings[0]
        assert "Read-only file system" in warnings[0]
        offline = load(LLAMA_REF, cache_dir=ro, offline=True)
        prompt = [[int(t) for t in PROMPT.split(",")]]
        for model in (online, offline):
            assert np.array_equal(model.generate(prompt, max_new_tokens=6), expected)
        proc = kiln("generate", LLAMA_REF, "--store", llama_store, "--cache-dir", ro,
                    "--prompt-ids", PROMPT, "--max-new-tokens", "6", "--json",
                    env=kiln_env(PYTHONPATH=str(REPO)))
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)["tokens"] == expected
        warned = [line for line in proc.stderr.splitlines() if "warning" in line]
        assert len(warned) == 1 and warned[0].startswith("kiln: warning: cannot record")
        del online, again, offline, model  # loaded models map their cached weights
    assert _tree(cache) == before
