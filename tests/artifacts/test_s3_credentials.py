"""S3 without (usable) credentials: `kiln import ARCHIVE --store s3://...` and
`kiln import-neuron-cache s3://...` fail with one line naming the URL and what to set, and
nothing is written. Against a real SeaweedFS on loopback; botocore refuses to sign before a
request is sent, so the server only proves that nothing reached it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from artifacts.errors import S3AccessDenied
from artifacts.store import Store
from artifacts.transfer import export_release
from pipeline.neuron_cache import S3CacheSource, import_neuron_cache
from tests.conftest import build_release
from tests.helpers.loader_helpers import kiln, kiln_env
from tests.runtime_loader.test_loader_cli import assert_one_line_error
from tests.servers.s3_server import aws_environment

MISSING = {
    "none": ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"),
    "no-secret": ("AWS_SECRET_ACCESS_KEY",),
}


def without(env: dict[str, str], names: tuple[str, ...]) -> dict[str, str]:
    return {k: v for k, v in env.items() if k not in names}


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("s3-creds")
    with Store.open(str(folder / "store")) as store:
        digest = store.put_release(build_release(store, name="creds"))
        store.tag(str(digest), "creds:v1")
        export_release(store, "creds:v1", folder / "creds.tar")
    return folder / "creds.tar"


def objects_under(s3_server: Any, url: str) -> list[str]:
    bucket, _, prefix = url.removeprefix("s3://").partition("/")
    listed = s3_server.client().list_objects_v2(Bucket=bucket, Prefix=prefix)
    return [o["Key"] for o in listed.get("Contents", [])]


@pytest.mark.parametrize("missing", sorted(MISSING))
def test_import_archive_to_s3_without_credentials(
    missing: str, archive: Path, s3_server: Any, tmp_path: Path
) -> None:
    url = s3_server.new_url()
    env = kiln_env(**without(s3_server.server.env, MISSING[missing]))
    for name in MISSING[missing]:
        env.pop(name, None)
    index = f"sqlite:///{tmp_path / 'index.db'}"
    proc = kiln("import", archive, "--store", url, "--index", index, env=env)
    assert_one_line_error(proc, "no usable AWS credentials", url, "AWS_SECRET_ACCESS_KEY")
    assert objects_under(s3_server, url) == []


@pytest.mark.parametrize("missing", sorted(MISSING))
def test_import_neuron_cache_from_s3_without_credentials(
    missing: str, s3_server: Any, tmp_path: Path
) -> None:
    url = s3_server.new_url("neuron-cache")
    bucket, _, prefix = url.removeprefix("s3://").partition("/")
    s3_server.client().put_object(Bucket=bucket, Key=f"{prefix}/neuronxcc-2.0/x", Body=b"x")
    env = kiln_env(**without(s3_server.server.env, MISSING[missing]))
    for name in MISSING[missing]:
        env.pop(name, None)
    store = tmp_path / "store"
    proc = kiln("import-neuron-cache", url, "--store", store, env=env)
    assert_one_line_error(proc, "no usable AWS credentials", url)


def test_the_library_raises_the_store_error(archive: Path, s3_server: Any, tmp_path: Path) -> None:
    """The same S3AccessDenied from the store backend and from a Neuron cache on S3."""
    url = s3_server.new_url()
    bucket, _, prefix = url.removeprefix("s3://").partition("/")
    index = f"sqlite:///{tmp_path / 'index.db'}"
    with aws_environment(without(s3_server.server.env, MISSING["none"])):
        with Store.open(url, index) as store:
            with pytest.raises(S3AccessDenied, match=f"no usable AWS credentials for {url}"):
                store.put_bytes(b"blob")
            with pytest.raises(S3AccessDenied, match="no usable AWS credentials"):
                import_neuron_cache(store, url)
        with pytest.raises(S3AccessDenied, match="no usable AWS credentials"):
            S3CacheSource(bucket, prefix).read("neuronxcc-2.0/x")
    with aws_environment(without(s3_server.server.env, MISSING["no-secret"])):
        with pytest.raises(S3AccessDenied, match="missing: AWS_SECRET_ACCESS_KEY"):
            Store.open(url, index)
    assert objects_under(s3_server, url) == []
