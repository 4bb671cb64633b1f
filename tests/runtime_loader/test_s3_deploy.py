"""Deploy hosts need nothing but read access to the blobs: on a real SeaweedFS server, host A
compiles into `s3://` with its own index; host B (its own cache dir, no index, KILN_INDEX_URL
unset, and S3 credentials of an identity that may only Read and List) pulls, loads, generates
and lists from `name:tag`, and follows host A's tag moves. S3 errors name what is missing."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import yaml

from artifacts.config import resolve_index_url
from artifacts.errors import S3AccessDenied
from artifacts.store import Store
from runtime_loader.api import load
from tests.artifacts.test_store_refs import run_kiln
from tests.helpers.loader_helpers import LLAMA_REF, SPECS, kiln_env, kiln_ok
from tests.servers.s3_server import (
    ACCESS_KEY,
    BUCKET,
    SECRET_KEY,
    SeaweedServer,
    aws_environment,
    free_ports,
    require_s3_tools,
)

READER_KEY, READER_SECRET = "kiln-reader-key", "kiln-reader-secret"
PROMPT = [[3, 17, 42, 5]]


@dataclasses.dataclass(frozen=True)
class Deploy:
    server: SeaweedServer
    url: str
    host_a: Path  # XDG_CACHE_HOME of the compiling host: its default index lives there
    root: Path

    def env(self, who: str) -> dict[str, str]:
        env = dict(self.server.env)
        if who == "reader":
            env.update(AWS_ACCESS_KEY_ID=READER_KEY, AWS_SECRET_ACCESS_KEY=READER_SECRET)
        return env

    def host_a_index(self) -> str:
        with _environ(XDG_CACHE_HOME=str(self.host_a)):
            return resolve_index_url(self.url)


@contextlib.contextmanager
def _environ(**values: str) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def deploy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deploy]:
    """A SeaweedFS with an admin and a read-only identity; tiny-llama (the example spec, one
    bucket) compiled into it by host A with its own default index."""
    require_s3_tools()
    root = tmp_path_factory.mktemp("s3-deploy")
    config = root / "identities.json"
    config.write_text(json.dumps({"identities": [
        {"name": "admin", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
         "actions": ["Admin", "Read", "List", "Tagging", "Write"]},
        {"name": "reader",
         "credentials": [{"accessKey": READER_KEY, "secretKey": READER_SECRET}],
         "actions": ["Read", "List"]},
    ]}))
    server = SeaweedServer(root / "server", extra_args=(f"-s3.config={config}",)).start()
    try:
        host_a = root / "host-a"
        url = f"s3://{BUCKET}/deploy/store"
        spec = yaml.safe_load(SPECS["tiny-llama"].read_text())
        spec["models"][0]["buckets"] = {"batch": [1], "seq": [64]}  # two graphs: quicker
        small = root / "tiny-llama.yaml"
        small.write_text(yaml.safe_dump(spec))
        kiln_ok("--store", url, "compile", small, "--json",
                env=kiln_env(**server.env, XDG_CACHE_HOME=str(host_a)), timeout=900)
        yield Deploy(server, url, host_a, root)
    finally:
        server.stop()


def _host_b(deploy: Deploy, name: str) -> tuple[Path, dict[str, str]]:
    home = deploy.root / name
    home.mkdir()
    return home, kiln_env(**deploy.env("reader"), XDG_CACHE_HOME=str(home / "xdg"))


def test_a_fresh_host_pulls_loads_generates_and_lists_with_read_only_credentials(
    deploy: Deploy, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    home, env = _host_b(deploy, "host-b")
    assert "KILN_INDEX_URL" not in env
    cache = home / "cache"
    pulled = json.loads(kiln_ok("--store", deploy.url, "pull", LLAMA_REF, "--cache-dir", cache,
                                "--json", env=env).stdout)
    with aws_environment(deploy.env("admin")), Store.open(deploy.url, deploy.host_a_index(),
                                                          create=False) as host_a:
        assert host_a.has_index
        expected = str(host_a.resolve(LLAMA_REF).digest)
        reference = load(LLAMA_REF, store=host_a, cache_dir=deploy.root / "host-a-cache")
        tokens_a = reference.generate(PROMPT, max_new_tokens=8)
    assert pulled["digest"] == expected and pulled["fetched"] > 0

    monkeypatch.setenv("XDG_CACHE_HOME", str(home / "xdg"))
    with aws_environment(deploy.env("reader")):
        model = load(LLAMA_REF, store=deploy.url, cache_dir=cache)
        assert str(model.digest) == expected
        assert np.array_equal(model.generate(PROMPT, max_new_tokens=8), tokens_a)
        code, out, err = run_kiln(monkeypatch, capsys, "--store", deploy.url, "generate",
                                  LLAMA_REF, "--prompt-ids", "3,17,42,5", "--max-new-tokens",
                                  "8", "--cache-dir", cache, "--json")
        assert code == 0, err
        assert json.loads(out)["tokens"] == tokens_a.tolist()
        code, out, err = run_kiln(monkeypatch, capsys, "--store", deploy.url, "ls", "--json")
        assert code == 0, err
        listed = json.loads(out)
        assert [(r["name"], r["digest"], r["tags"]) for r in listed] == [
            ("tiny-llama", expected, ["tiny-llama:latest"])
        ]
        code, out, err = run_kiln(monkeypatch, capsys, "--store", deploy.url, "history",
                                  LLAMA_REF, "--json")
        assert code == 0 and [m["digest"] for m in json.loads(out)] == [expected], err
        code, out, err = run_kiln(monkeypatch, capsys, "--store", deploy.url, "show", LLAMA_REF)
        assert code == 0 and "tags:      tiny-llama:latest" in out, err
        code, out, err = run_kiln(monkeypatch, capsys, "--store", deploy.url, "stats")
        assert code == 1 and len(err.strip().splitlines()) == 1
        assert "kiln stats needs the store's SQL index" in err
    assert not (home / "xdg" / "kiln" / "indexes").exists()  # host B created no index


def test_host_b_follows_host_a_moving_the_tag(deploy: Deploy) -> None:
    home, _ = _host_b(deploy, "host-b-follow")
    cache = home / "cache"
    with aws_environment(deploy.env("admin")), Store.open(deploy.url, deploy.host_a_index()) as a:
        first = a.resolve(LLAMA_REF).digest
        release = a.load_release(first)
        rebuilt = dataclasses.replace(
            release,
            provenance=dataclasses.replace(release.provenance, created="2030-01-01T00:00:00+00:00"),
        )
        second = a.put_release(rebuilt)
        a.tag(str(first), "tiny-llama:prod")
    with aws_environment(deploy.env("reader")):
        assert load("tiny-llama:prod", store=deploy.url, cache_dir=cache).digest == first
    with aws_environment(deploy.env("admin")), Store.open(deploy.url, deploy.host_a_index()) as a:
        a.tag(str(second), "tiny-llama:prod", reason="new build")
    with aws_environment(deploy.env("reader")):
        model = load("tiny-llama:prod", store=deploy.url, cache_dir=cache)
        assert model.digest == second
        with Store.open(deploy.url, create=False) as b:
            assert not b.has_index
            moves = b.history("tiny-llama:prod")
        assert [(m.digest, m.previous, m.reason) for m in moves] == [
            (str(second), str(first), "new build"), (str(first), None, "")
        ]


def test_read_only_credentials_and_s3_errors_name_what_is_missing(
    deploy: Deploy, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def kiln_line(env: dict[str, str], *args: str) -> str:
        with aws_environment(env):
            code, out, err = run_kiln(monkeypatch, capsys, *args)
        assert code == 1, out
        lines = err.strip().splitlines()
        assert len(lines) == 1, err
        return lines[0]

    monkeypatch.setenv("XDG_CACHE_HOME", str(deploy.root / "errors-xdg"))
    reader = deploy.env("reader")
    line = kiln_line(reader, "--store", "s3://no-such-bucket-kiln/p", "pull", LLAMA_REF,
                     "--cache-dir", str(deploy.root / "c1"))
    assert "S3 bucket 'no-such-bucket-kiln' does not exist at http://127.0.0.1:" in line
    line = kiln_line(reader, "--store", f"s3://{BUCKET}/deploy/empty", "show", LLAMA_REF)
    assert f"the store s3://{BUCKET}/deploy/empty has no tags yet" in line
    no_credentials = {k: v for k, v in reader.items() if "ACCESS_KEY" not in k}
    line = kiln_line(no_credentials, "--store", deploy.url, "ls")
    assert "no usable AWS credentials" in line and "AWS_ACCESS_KEY_ID" in line
    (port,) = free_ports(1)
    unreachable = {**reader, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
                   "AWS_MAX_ATTEMPTS": "1"}
    line = kiln_line(unreachable, "--store", deploy.url, "ls")
    assert f"cannot reach the S3 endpoint http://127.0.0.1:{port}" in line
    # The read-only identity cannot write: a write fails naming the denial, nothing is stored.
    with aws_environment(reader), Store.open(
        deploy.url, f"sqlite:///{deploy.root / 'reader-index.db'}"
    ) as b:
        with pytest.raises(S3AccessDenied, match="access denied: S3 PUT"):
            b.put_bytes(b"a blob the reader may not write")
