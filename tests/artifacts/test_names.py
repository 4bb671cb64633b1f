"""One name and tag grammar (OCI's reference rules) at every place a name enters Kiln:
the parser, `kiln tag`, specs, manifests, tag events, import archives, the Neuron-cache
import and the loader's cache of refs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path, PurePosixPath

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from artifacts.digest import Digest, canonical_json
from artifacts.errors import ArchiveError, InvalidManifest, InvalidReference
from artifacts.manifest import Release
from artifacts.records import TagEvent
from artifacts.refs import parse_reference, parse_tag_name
from artifacts.store import Store
from artifacts.transfer import REF_NAME_ANNOTATION, export_release, import_archive
from pipeline.errors import SpecError
from pipeline.neuron_cache import INVALID, import_neuron_cache
from pipeline.spec import load_spec
from runtime_loader.cache import LocalCache
from tests.artifacts.test_transfer import make_release, registered, rewrite, swap_manifest
from tests.helpers.cli_helpers import assert_one_line_error

KILN = [sys.executable, "-m", "kiln"]
TRAVERSAL = "a/../../../../../../tmp/x"

GOOD_NAMES = ["minilm", "team/bert-base", "a.b_c__d---e", "x/y/z", "0", "a" * 255]
BAD_NAMES = [
    "",
    "..",
    ".",
    TRAVERSAL,
    "a/./b",
    "a//b",
    "/a",
    "a/",
    "-a",
    "a-",
    "a_",
    "a___b",
    "a._b",
    "minilm\n",
    "mini\nlm",
    "m\x1b[31mred",
    "Minilm",
    "a b",
    "a\\b",
    "\uff41",  # fullwidth a
    "\u0661",  # an Arabic-Indic digit, which \d would take
    "a" * 256,
]
GOOD_TAGS = ["latest", "v1.2.3", "_x", "A-b_c.d", "a" * 128]
BAD_TAGS = ["", ".", "..", ".hidden", "-x", "latest\n", "a/b", "x\x1b[0m", "a b", "a" * 129]


def kiln(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, **(env or {})}
    full_env.pop("KILN_INDEX_URL", None)
    return subprocess.run(KILN + list(args), capture_output=True, text=True, env=full_env)


# -- the grammar -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", GOOD_NAMES)
def test_oci_names_are_accepted(name: str) -> None:
    assert parse_tag_name(f"{name}:latest").name == name
    assert parse_reference(name).name == name


@pytest.mark.parametrize("name", BAD_NAMES)
def test_unsafe_names_are_refused(name: str) -> None:
    with pytest.raises(InvalidReference) as caught:
        parse_tag_name(f"{name}:latest")
    assert "\n" not in str(caught.value) and "\x1b" not in str(caught.value)
    with pytest.raises(InvalidReference):
        parse_reference(f"{name}:latest")


@pytest.mark.parametrize("tag", GOOD_TAGS)
def test_oci_tags_are_accepted(tag: str) -> None:
    assert parse_tag_name(f"minilm:{tag}").tag == tag


@pytest.mark.parametrize("tag", BAD_TAGS)
def test_unsafe_tags_are_refused(tag: str) -> None:
    with pytest.raises(InvalidReference):
        parse_tag_name(f"minilm:{tag}")


@pytest.mark.parametrize("text", [" minilm:latest", "minilm:latest\n", "\tminilm"])
def test_references_are_not_trimmed_into_another_name(text: str) -> None:
    with pytest.raises(InvalidReference):
        parse_reference(text)


def _path_safe_and_printable(name: str, tag: str) -> None:
    for text in (name, tag):
        assert text.isascii() and text.isprintable(), repr(text)
    parts = PurePosixPath(name, tag).parts
    assert not PurePosixPath(name).is_absolute()
    assert all(part not in ("", ".", "..") for part in parts)
    assert "\\" not in name and ":" not in name


# Characters that make names interesting: the grammar's own, path syntax, control characters,
# look-alikes and case.
_ALPHABET = st.sampled_from(list("ab0Z._-/:@\\ \n\t\x1b\x00\u0661\uff41") + ["..", "__", "./"])


@settings(max_examples=600, deadline=None)
@given(st.lists(_ALPHABET, max_size=24).map("".join))
def test_every_accepted_reference_is_path_safe_and_printable(text: str) -> None:
    try:
        parsed = parse_reference(text)
    except InvalidReference:
        return
    if parsed.name is not None:
        _path_safe_and_printable(parsed.name, parsed.tag or "latest")


# Names built the way the grammar describes them: alphanumeric runs joined by separators.
_ALNUM = st.text(alphabet="az09", min_size=1, max_size=3)
_COMPONENT = st.builds(
    lambda first, rest: first + "".join(sep + run for sep, run in rest),
    _ALNUM,
    st.lists(st.tuples(st.sampled_from([".", "_", "__", "-", "---"]), _ALNUM), max_size=3),
)
_NAMES = st.lists(_COMPONENT, min_size=1, max_size=4).map("/".join)
_TAGS = st.builds(
    str.__add__,
    st.sampled_from(list("aZ9_")),
    st.text(alphabet="aZ9_.-", max_size=6),
)


@settings(max_examples=200, deadline=None)
@given(_NAMES, _TAGS)
def test_grammar_round_trips_and_stays_inside_a_folder(name: str, tag: str) -> None:
    parsed = parse_tag_name(f"{name}:{tag}")
    assert (parsed.name, parsed.tag) == (name, tag)
    _path_safe_and_printable(name, tag)
    joined = os.path.normpath(os.path.join("/cache/refs", name, tag))
    assert joined == f"/cache/refs/{name}/{tag}"  # nothing for normpath to collapse


# -- entry points ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "destination", [f"{TRAVERSAL}:latest", "minilm:latest\n", "m\x1b[31m:latest"]
)
def test_kiln_tag_refuses_unsafe_names(tmp_path: Path, destination: str) -> None:
    with Store.open(str(tmp_path / "store")) as store:
        make_release(store, tag="latest")
    result = kiln("tag", "minilm:latest", destination, "--store", str(tmp_path / "store"))
    line = assert_one_line_error(result, "invalid")
    assert "\x1b" not in line
    with Store.open(str(tmp_path / "store")) as store:
        assert registered(store) == (1, 1)


def test_kiln_pull_refuses_an_unsafe_ref(tmp_path: Path) -> None:
    with Store.open(str(tmp_path / "store")) as store:
        make_release(store, tag="latest")
    cache = tmp_path / "cache"
    result = kiln(
        "pull", f"{TRAVERSAL}:latest", "--store", str(tmp_path / "store"), "--cache-dir", str(cache)
    )
    assert_one_line_error(result, "invalid reference")


@pytest.mark.parametrize("ref", [f"{TRAVERSAL}:latest", "../x", "minilm:..", "minilm:latest\n"])
def test_the_loader_cache_never_maps_a_ref_outside_itself(tmp_path: Path, ref: str) -> None:
    """Defence in depth: even a caller that skips parsing cannot write outside `refs/`."""
    cache = LocalCache(tmp_path / "cache")
    digest = "sha256:" + "ab" * 32
    with pytest.raises(InvalidReference):
        cache.record_ref(ref, Digest.parse(digest), "store")
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert written == []
    assert cache.lookup_ref(ref) is None


@pytest.mark.parametrize("name", [TRAVERSAL, "minilm\n", "m\x1b[31m"])
def test_spec_model_names_use_the_grammar(tmp_path: Path, name: str) -> None:
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        json.dumps({"models": [{"name": name, "source": "m", "buckets": {"seq": [8]}}]})
    )
    with pytest.raises(SpecError) as caught:
        load_spec(spec)
    assert "models[0].name: must be lowercase" in str(caught.value)


def test_spec_tags_use_the_grammar(tmp_path: Path) -> None:
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        json.dumps(
            {"models": [{"name": "m", "source": "m", "buckets": {"seq": [8]}, "tag": "x\n"}]}
        )
    )
    with pytest.raises(SpecError, match=r"models\[0\]\.tag"):
        load_spec(spec)


@pytest.mark.parametrize("name", ["../evil", "minilm\n", "Evil"])
def test_a_manifest_with_an_unsafe_name_is_invalid(tmp_path: Path, name: str) -> None:
    with Store.open(str(tmp_path / "store")) as store:
        digest = make_release(store)
        value = json.loads(store.read_bytes(digest))
    value["name"] = name
    with pytest.raises(InvalidManifest, match="name: must be lowercase"):
        Release.from_json(value, "m.json")


def test_a_tag_event_with_an_unsafe_name_is_invalid() -> None:
    event = {
        "mediaType": "application/vnd.kiln.tag-event.v1+json",
        "name": TRAVERSAL,
        "tag": "latest",
        "digest": "sha256:" + "ab" * 32,
        "at": 1.0,
    }
    with pytest.raises(InvalidManifest, match="name"):
        TagEvent.from_json(event, "event")
    with pytest.raises(InvalidManifest, match="tag"):
        TagEvent.from_json({**event, "name": "m", "tag": "latest\n"}, "event")


def _exported(tmp_path: Path) -> tuple[Digest, bytes, Path]:
    """(digest, manifest bytes, archive) of a release exported as minilm:prod."""
    with Store.open(str(tmp_path / "source")) as store:
        digest = make_release(store)
        export_release(store, "minilm:prod", tmp_path / "minilm.tar")
        return digest, store.read_bytes(digest), tmp_path / "minilm.tar"


@pytest.mark.parametrize("ref", [f"{TRAVERSAL}:latest", "minilm:latest\n", "minilm:\x1b[2J"])
def test_an_archive_tag_annotation_uses_the_grammar(tmp_path: Path, ref: str) -> None:
    def retag(info: tarfile.TarInfo, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
        if info.name != "index.json":
            return info, data
        index = json.loads(data)
        index["manifests"][0]["annotations"][REF_NAME_ANNOTATION] = ref
        payload = json.dumps(index).encode()
        info.size = len(payload)
        return info, payload

    archive = rewrite(_exported(tmp_path)[2], tmp_path / "evil.tar", retag)
    with Store.open(str(tmp_path / "target")) as target:
        with pytest.raises(ArchiveError, match="invalid"):
            import_archive(target, archive)
        assert registered(target) == (0, 0)


def test_an_archive_manifest_with_an_unsafe_name_is_refused(tmp_path: Path) -> None:
    """The manifest is rewritten under its new digest, index and all, so only its name is
    wrong."""
    digest, data, source = _exported(tmp_path)
    value = json.loads(data)
    value["name"] = "../../evil"
    archive = swap_manifest(source, tmp_path / "evil.tar", digest, canonical_json(value), {})
    with Store.open(str(tmp_path / "target")) as target:
        with pytest.raises(ArchiveError, match="name: must be lowercase"):
            import_archive(target, archive)
        assert registered(target) == (0, 0)


def test_neuron_cache_folders_with_unsafe_names_are_skipped(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    for module in ("MODULE_1+ab\x1b[31m", "MODULE_2\n+ab"):
        folder = cache / "neuronxcc-2.14.227.0+2d4f85be" / module
        folder.mkdir(parents=True)
        for name in ("model.hlo_module.pb", "model.neff", "model.done"):
            (folder / name).write_bytes(b"x")
        (folder / "compile_flags.json").write_text('["--target=inf2"]')
    with Store.open(str(tmp_path / "store")) as store:
        report = import_neuron_cache(store, str(cache))
    assert [e.status for e in report.entries] == [INVALID, INVALID]
    for entry in report.entries:
        assert entry.folder.isascii() and entry.folder.isprintable(), repr(entry.folder)
        assert "folder name" in entry.detail
