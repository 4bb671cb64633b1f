"""Digests, canonical JSON and reference parsing."""

from __future__ import annotations

import hashlib
import io
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from artifacts.digest import Digest, canonical_json, hash_stream
from artifacts.errors import InvalidDigest, InvalidReference
from artifacts.refs import parse_reference, parse_tag_name


def test_digest_round_trip_and_errors() -> None:
    d = Digest.of_bytes(b"abc")
    assert str(d) == "sha256:" + hashlib.sha256(b"abc").hexdigest()
    assert Digest.parse(str(d)) == d
    assert d.short == "sha256:ba7816bf8f01"
    for bad in ("abc", "md5:" + "0" * 64, "sha256:" + "0" * 63, "sha256:" + "G" * 64):
        with pytest.raises(InvalidDigest, match="invalid digest"):
            Digest.parse(bad)


@given(st.binary(max_size=20000))
def test_stream_hash_matches_hashlib(data: bytes) -> None:
    digest, size = hash_stream(io.BytesIO(data))
    assert digest.hex == hashlib.sha256(data).hexdigest()
    assert size == len(data)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(),
    lambda children: st.lists(children) | st.dictionaries(st.text(), children),
    max_leaves=20,
)


@given(json_values)
def test_canonical_json_is_stable_under_key_order(value: object) -> None:
    encoded = canonical_json(value)
    assert json.loads(encoded) == value
    if isinstance(value, dict):
        reordered = dict(reversed(list(value.items())))
        assert canonical_json(reordered) == encoded


def test_canonical_json_fixed_value() -> None:
    assert canonical_json({"b": [1, 2], "a": "é"}) == '{"a":"é","b":[1,2]}'.encode()


def test_reference_forms() -> None:
    hexd = "ab" * 32
    assert parse_reference("bert:prod").tag == "prod"
    assert parse_reference("bert").tag == "latest"
    r = parse_reference(f"bert@sha256:{hexd}")
    assert r.name == "bert" and str(r.digest) == f"sha256:{hexd}"
    assert parse_reference(f"sha256:{hexd}").digest is not None
    assert parse_reference("abab12").prefix == "abab12"
    assert parse_reference("sha256:abab").prefix == "abab"
    assert parse_reference("team/bert-base:v1.2").name == "team/bert-base"


@pytest.mark.parametrize("bad", ["", "Bert:prod", "bert:", ":prod", "bert@sha256:xyz", "a b:c"])
def test_bad_references_name_the_text(bad: str) -> None:
    with pytest.raises(InvalidReference):
        parse_reference(bad) if bad != "bert:" else parse_tag_name(bad)
