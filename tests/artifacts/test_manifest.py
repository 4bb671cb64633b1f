"""Release manifests: canonical bytes, validation errors naming the field."""

from __future__ import annotations

import json

import pytest

from artifacts.errors import InvalidManifest
from artifacts.manifest import RELEASE_MEDIA_TYPE, Release
from tests.conftest import build_release


def test_round_trip_is_canonical(store) -> None:  # type: ignore[no-untyped-def]
    release = build_release(store)
    data = release.to_bytes()
    assert Release.from_bytes(data) == release
    value = json.loads(data)
    assert value["mediaType"] == RELEASE_MEDIA_TYPE and value["schemaVersion"] == 1
    assert data == json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda v: v.pop("name"), "name: required field is missing"),
        (lambda v: v.update(schemaVersion=2), "schemaVersion: version 2 is newer"),
        (lambda v: v.update(mediaType="x"), "mediaType: expected"),
        (
            lambda v: v["graphs"][1]["executable"].update(digest="sha256:zz"),
            "graphs[1].executable.digest: invalid digest",
        ),
        (lambda v: v["graphs"][0]["bucket"].update(seq=0), "graphs[0].bucket.seq: must be >= 1"),
        (lambda v: v["graphs"][0].update(format="onnx"), "graphs[0].format: must be one of"),
        (lambda v: v["source"].update(weights="x"), "source.weights: must be a list"),
        (lambda v: v["graphs"].append(v["graphs"][0]), "graphs[2]: duplicate graph"),
    ],
)
def test_validation_names_the_field(store, mutate, message: str) -> None:  # type: ignore[no-untyped-def]
    value = build_release(store).to_json()
    mutate(value)
    with pytest.raises(InvalidManifest, match=message.replace("[", r"\[").replace("]", r"\]")):
        Release.from_json(value, "m.json")


def test_not_json() -> None:
    with pytest.raises(InvalidManifest, match="x.json: not valid JSON"):
        Release.from_bytes(b"{nope", "x.json")
