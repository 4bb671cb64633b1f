"""The two cache keys (and the weights key) are pinned: a change to what goes into a key must
be a deliberate act (bump KEY_SCHEMA or GRAPH_BUILDER_VERSION, then update these literals)."""

from __future__ import annotations

import hashlib
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.keys import (
    GRAPH_BUILDER_VERSION,
    KEY_SCHEMA,
    WEIGHTS_BUILDER_VERSION,
    architecture_config,
    architecture_digest,
    direct_key,
    hlo_key,
    weights_key,
)

CONFIG: dict[str, Any] = {
    "model_type": "bert",
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "_name_or_path": "x",
    "torch_dtype": "float32",
    "pad_token_id": 0,
}
TRACER = {"torch": "2.8.0", "torch-xla": "2.8.0", "transformers": "4.56.0"}
ARCH = "sha256:9aa25da5587c640a48b15203643f788421294520032f02d2dbf74d98eda52418"


def _direct(**overrides: Any) -> str:
    kwargs: dict[str, Any] = dict(
        architecture=ARCH,
        graph_kind="encode",
        bucket={"batch": 1, "seq": 32},
        dtype="float32",
        tracer=TRACER,
        compiler="xla-cpu",
        compiler_version="jaxlib-0.7.0",
        flags=["-O2"],
        target="cpu",
    )
    kwargs.update(overrides)
    return direct_key(**kwargs)


def _hlo(**overrides: Any) -> str:
    kwargs: dict[str, Any] = dict(
        hlo_digest="sha256:" + "ab" * 32,
        compiler="neuronx-cc",
        compiler_version="2.10.0.34+6c8792c6f",
        flags=["--model-type", "transformer"],
        target="inf2",
    )
    kwargs.update(overrides)
    return hlo_key(**kwargs)


# --- fixed expected values -----------------------------------------------------------------


def test_schema_versions_are_pinned() -> None:
    assert KEY_SCHEMA == 1
    assert GRAPH_BUILDER_VERSION == "4"  # 4: multi-row float32 Linears fenced, weight on the left
    assert WEIGHTS_BUILDER_VERSION == "3"  # 3: Linears read [out, in] weights in place


def test_architecture_digest_is_pinned() -> None:
    assert architecture_digest(CONFIG) == ARCH
    assert architecture_digest({}) == (
        "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"
    )
    # sha256 over canonical JSON (sorted keys, no spaces) of the architectural fields only
    canonical = b'{"hidden_size":32,"model_type":"bert","num_hidden_layers":2}'
    assert ARCH == "sha256:" + hashlib.sha256(canonical).hexdigest()


def test_direct_key_is_pinned() -> None:
    assert _direct() == ("sha256:c64112409c7fdede6839b86eab08054022172c53e640d067ff780f9d2df3d3c1")


def test_hlo_key_is_pinned() -> None:
    expected = "sha256:f5db41dcb9272713406dba07cc5937b056161d653f4ce739e6797072a31fcce4"
    assert _hlo() == expected
    canonical = (
        '{"compiler":"neuronx-cc","compiler_version":"2.10.0.34+6c8792c6f",'
        '"flags":["--model-type","transformer"],"hlo":"sha256:' + "ab" * 32 + '",'
        '"key_schema":1,"kind":"hlo","target":"inf2"}'
    )
    assert expected == "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()


def test_weights_key_is_pinned() -> None:
    key = weights_key(
        source={"task": "encoder", "files": {"model.safetensors": "sha256:" + "cd" * 32}},
        dtype="float32",
    )
    assert key == "sha256:bb068aabae969877b4598321f849c912b691f3d7e273c748a8bcc7538877421f"


# --- what changes a key, and what does not -------------------------------------------------


def test_non_architectural_fields_do_not_change_the_architecture() -> None:
    base = architecture_digest(CONFIG)
    for field, value in [
        ("_name_or_path", "someone/fine-tune"),
        ("name_or_path", "elsewhere"),
        ("torch_dtype", "bfloat16"),
        ("transformers_version", "4.99.0"),
        ("pad_token_id", 3),
        ("bos_token_id", 1),
        ("eos_token_id", [2, 3]),
        ("id2label", {"0": "NEG", "1": "POS"}),
    ]:
        assert architecture_digest({**CONFIG, field: value}) == base, field
    without = {k: v for k, v in CONFIG.items() if k not in ("_name_or_path", "torch_dtype")}
    assert architecture_digest(without) == base
    assert "_name_or_path" not in architecture_config(CONFIG)


def test_architectural_fields_change_the_architecture() -> None:
    base = architecture_digest(CONFIG)
    assert architecture_digest({**CONFIG, "hidden_size": 64}) != base
    assert architecture_digest({**CONFIG, "num_hidden_layers": 3}) != base
    assert architecture_digest({**CONFIG, "model_type": "roberta"}) != base
    assert architecture_digest({**CONFIG, "hidden_act": "gelu"}) != base


def test_every_direct_key_input_counts() -> None:
    base = _direct()
    variants = [
        _direct(architecture="sha256:" + "00" * 32),
        _direct(graph_kind="context_encoding"),
        _direct(bucket={"batch": 1, "seq": 64}),
        _direct(bucket={"batch": 4, "seq": 32}),
        _direct(dtype="bfloat16"),
        _direct(tracer={**TRACER, "torch": "2.9.0"}),
        _direct(tracer={**TRACER, "transformers": "4.57.0"}),
        _direct(compiler="neuronx-cc"),
        _direct(compiler_version="jaxlib-0.7.1"),
        _direct(target="inf2"),
        _direct(builder_version="5"),
        _direct(flags=[]),
        _direct(flags=["-O3"]),
        _direct(flags=["-O2", "--foo"]),
    ]
    assert base not in variants
    assert len(set(variants)) == len(variants)


def test_flag_order_and_content_change_the_keys() -> None:
    a, b = ["--model-type", "transformer", "-O2"], ["-O2", "--model-type", "transformer"]
    assert _direct(flags=a) != _direct(flags=b)
    assert _hlo(flags=a) != _hlo(flags=b)
    assert _hlo(flags=["--lnc", "1"]) != _hlo(flags=["--lnc", "2"])
    assert _hlo(flags=("-O2",)) == _hlo(flags=["-O2"])  # tuple or list: same tokens, same key


def test_every_hlo_key_input_counts() -> None:
    keys = {
        _hlo(),
        _hlo(hlo_digest="sha256:" + "ac" * 32),
        _hlo(compiler="xla-cpu"),
        _hlo(compiler_version="2.10.1.0"),
        _hlo(flags=[]),
        _hlo(target="trn1"),
    }
    assert len(keys) == 6


def test_weights_key_inputs_count() -> None:
    source = {"task": "causal-lm", "config": {"model_type": "llama"}, "seed": 0}
    base = weights_key(source=source, dtype="float32")
    assert weights_key(source={**source, "seed": 1}, dtype="float32") != base
    assert weights_key(source=source, dtype="bfloat16") != base
    assert weights_key(source=source, dtype="float32", builder_version="4") != base


# --- insertion order never matters ---------------------------------------------------------

_json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**40), 2**40), st.text(max_size=8)
)
_configs = st.dictionaries(st.text(min_size=1, max_size=12), _json_scalars, max_size=12)
_buckets = st.dictionaries(
    st.sampled_from(["batch", "seq", "kv", "beams"]), st.integers(1, 4096), min_size=1
)


def _reordered(d: dict[str, Any], order: list[int]) -> dict[str, Any]:
    items = list(d.items())
    return {items[i][0]: items[i][1] for i in order}


@settings(max_examples=80, deadline=None)
@given(config=_configs, bucket=_buckets, data=st.data())
def test_keys_ignore_dict_insertion_order(
    config: dict[str, Any], bucket: dict[str, int], data: st.DataObject
) -> None:
    config_order = data.draw(st.permutations(range(len(config))))
    bucket_order = data.draw(st.permutations(range(len(bucket))))
    config2, bucket2 = _reordered(config, config_order), _reordered(bucket, bucket_order)
    assert config2 == config and bucket2 == bucket
    arch = architecture_digest(config)
    assert architecture_digest(config2) == arch
    tracer2 = dict(reversed(list(TRACER.items())))
    assert _direct(architecture=arch, bucket=bucket) == _direct(
        architecture=architecture_digest(config2), bucket=bucket2, tracer=tracer2
    )
    source = {"task": "causal-lm", "config": config, "seed": 0}
    source2 = {"seed": 0, "config": config2, "task": "causal-lm"}
    assert weights_key(source=source, dtype="float32") == weights_key(
        source=source2, dtype="float32"
    )
