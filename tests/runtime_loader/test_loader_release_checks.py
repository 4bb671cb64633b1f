"""Releases that parse but cannot run (no weights, an empty signature, an executable digest that
points at the weights or at a manifest): the loader refuses them with one line naming the
release and the manifest field or digest, from the library and from `kiln generate`."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import runtime_loader
from artifacts.digest import Digest
from artifacts.manifest import BlobRef, Release
from artifacts.store import Store
from runtime_loader.errors import BadExecutable, BadRelease
from tests.helpers.cli_helpers import assert_one_line_error_here, kiln_here
from tests.helpers.loader_helpers import LLAMA_REF, compiled_store, copy_store, kiln, kiln_ok
from tests.runtime_loader.test_loader_cli import assert_one_line_error


def _graphs(release: Release, change: Callable[[int, Any], Any]) -> Release:
    return dataclasses.replace(
        release, graphs=tuple(change(i, g) for i, g in enumerate(release.graphs))
    )


def no_weights(release: Release, digest: Digest) -> Release:
    return dataclasses.replace(release, source=dataclasses.replace(release.source, weights=()))


def empty_signature(release: Release, digest: Digest) -> Release:
    return _graphs(release, lambda i, g: dataclasses.replace(g, signature={}) if i == 3 else g)


def no_parameters(release: Release, digest: Digest) -> Release:
    def drop(i: int, g: Any) -> Any:
        signature = {k: v for k, v in g.signature.items() if k != "parameters"}
        return dataclasses.replace(g, signature=signature) if i == 0 else g

    return _graphs(release, drop)


def unknown_weight(release: Release, digest: Digest) -> Release:
    def rename(i: int, g: Any) -> Any:
        if i != 1:
            return g
        params = [dict(p) for p in g.signature["parameters"]]
        first = next(p for p in params if p["kind"] == "weight")
        first["name"] = "model.no_such.weight"
        return dataclasses.replace(g, signature={**g.signature, "parameters": params})

    return _graphs(release, rename)


def only_context_encoding(release: Release, digest: Digest) -> Release:
    graphs = tuple(g for g in release.graphs if g.kind == "context_encoding")
    return dataclasses.replace(release, graphs=graphs)


def no_short_context_encoding(release: Release, digest: Digest) -> Release:
    """Batch 1 keeps only its 128-position context_encoding graph: nothing starts 1x64."""
    graphs = tuple(
        g
        for g in release.graphs
        if not (g.kind == "context_encoding" and g.bucket == {"batch": 1, "seq": 16})
        and not (g.kind == "context_encoding" and g.bucket == {"batch": 1, "seq": 64})
    )
    return dataclasses.replace(release, graphs=graphs)


def executable_is_weights(release: Release, digest: Digest) -> Release:
    weights = release.source.weights[0]
    return _graphs(release, lambda i, g: dataclasses.replace(g, executable=weights))


def executable_is_manifest(release: Release, digest: Digest) -> Release:
    size = len(release.to_bytes())
    return _graphs(release, lambda i, g: dataclasses.replace(g, executable=BlobRef(digest, size)))


REFUSED_AT_LOAD = {
    "no-weights": (no_weights, ("source.weights is empty", "no weights blob")),
    "empty-signature": (empty_signature, ("graphs[3].signature", "is empty")),
    "no-parameters": (no_parameters, ("graphs[0].signature", ".parameters is missing")),
    "unknown-weight": (unknown_weight, ("graphs[1]", "'model.no_such.weight'")),
    "missing-kind": (only_context_encoding, ("needs graphs of kind token_generation",)),
    "no-short-context": (
        no_short_context_encoding,
        ("token_generation graph", "no context_encoding graph of batch 1 and at most 64"),
    ),
}
REFUSED_AT_RUN = {
    "executable-is-weights": (executable_is_weights, "the blob holds safetensors weights"),
    "executable-is-manifest": (executable_is_manifest, "the blob holds JSON (a release manifest)"),
}


@pytest.fixture(scope="module")
def broken_store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """A copy of the tiny-llama store holding one doctored release per case, tagged
    `broken:<case>`; the values are the blobs each case's executables point at."""
    source = compiled_store("tiny-llama", tmp_path_factory)
    store_path = copy_store(source, tmp_path_factory.mktemp("broken") / "store")
    targets = {}
    with Store.open(str(store_path), create=False) as store:
        digest = Digest.parse(str(store.resolve(LLAMA_REF).digest))
        release = store.load_release(digest)
        cases = {**REFUSED_AT_LOAD, **REFUSED_AT_RUN}
        for case, (make, _) in cases.items():
            doctored = make(release, digest)
            store.tag(str(store.put_release(doctored)), f"broken:{case}")
            targets[case] = str(doctored.graphs[0].executable.digest)
    return store_path, targets


@pytest.mark.parametrize("case", sorted(REFUSED_AT_LOAD))
def test_load_refuses_a_release_it_cannot_run(
    case: str,
    broken_store: tuple[Path, dict[str, str]],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    store, _ = broken_store
    expected = REFUSED_AT_LOAD[case][1]
    with pytest.raises(BadRelease) as caught:
        runtime_loader.load(f"broken:{case}", store=store, cache_dir=tmp_path / "cache")
    message = str(caught.value)
    assert message.startswith("release tiny-llama@"), message
    for text in expected:
        assert text in message
    result = kiln_here(
        capsys, "generate", f"broken:{case}", "--prompt-ids", "1,2", "--max-new-tokens", "2",
        "--store", store, "--cache-dir", tmp_path / "cache",
    )  # fmt: skip
    assert_one_line_error_here(result, "release tiny-llama@", *expected)


@pytest.mark.parametrize("case", sorted(REFUSED_AT_RUN))
def test_an_executable_digest_at_the_wrong_blob_is_named(
    case: str,
    broken_store: tuple[Path, dict[str, str]],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    store, targets = broken_store
    expected = REFUSED_AT_RUN[case][1]
    model = runtime_loader.load(f"broken:{case}", store=store, cache_dir=tmp_path / "cache")
    with pytest.raises(BadExecutable) as caught:
        model.generate([[1, 2, 3]], max_new_tokens=2)
    message = str(caught.value)
    assert targets[case] in message and expected in message, message
    assert "jaxlib" not in message
    result = kiln_here(
        capsys, "generate", f"broken:{case}", "--prompt-ids", "1,2", "--max-new-tokens", "2",
        "--store", store, "--cache-dir", tmp_path / "cache",
    )  # fmt: skip
    assert_one_line_error_here(result, targets[case], expected, "context_encoding")
    assert "jaxlib" not in result.stderr


def test_an_imported_release_without_weights_is_refused_by_name(
    broken_store: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    """Through `kiln export` and `kiln import` into a fresh store, as a release arrives on a
    host from elsewhere."""
    store, _ = broken_store
    archive = tmp_path / "release.tar"
    # An archive carries only tags of its release's own name (the release is tiny-llama's).
    kiln_ok("tag", "broken:no-weights", "tiny-llama:no-weights", "--store", store)
    kiln_ok("export", "tiny-llama:no-weights", "--store", store, "-o", archive)
    imported = tmp_path / "imported"
    kiln_ok("import", archive, "--store", imported)
    proc = kiln(
        "generate", "tiny-llama:no-weights", "--prompt-ids", "1", "--store", imported,
        "--cache-dir", tmp_path / "cache",
    )  # fmt: skip
    assert_one_line_error(proc, "release tiny-llama@", "source.weights is empty")
