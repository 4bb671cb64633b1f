"""The two cache keys (docs/architecture.md, "Keys"): pure functions over canonical JSON.

Both are pinned by fixed expected-value tests: changing what goes into a key must be a
deliberate act (bump KEY_SCHEMA or GRAPH_BUILDER_VERSION).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

from artifacts.digest import canonical_json

KEY_SCHEMA = 1
# Bumped whenever the code that wraps a model for tracing changes what is traced.
# 2: Linear weights stored and traced [in, out] (pipeline.layout).
# 3: Linear weights stored [out, in] as the model holds them, traced as a dot contracting
#    their input dimension (pipeline.layout).
# 4: float32 Linears over several rows traced with the weight as the dot's left operand,
#    behind an optimization barrier (pipeline.layout); the stored weights are unchanged.
GRAPH_BUILDER_VERSION = "4"
# The graph builder version at which the stored weights last changed: a weights key keeps
# it, so a builder change that leaves the weights alone does not make every model's weights
# read and stored again.
WEIGHTS_BUILDER_VERSION = "3"

# Config fields that do not change the computation of a graph.
NON_ARCHITECTURAL_FIELDS = frozenset(
    {
        "_name_or_path",
        "name_or_path",
        "torch_dtype",
        "dtype",
        "transformers_version",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
        "sep_token_id",
        "cls_token_id",
        "mask_token_id",
        "unk_token_id",
        "decoder_start_token_id",
        "_commit_hash",
        "_attn_implementation_autoset",
        "finetuning_task",
        "problem_type",
        "task_specific_params",
        "id2label",
        "label2id",
    }
)


def _sha256(value: Any) -> str:
    return "sha256:" + hashlib.sha256(canonical_json(value)).hexdigest()


def architecture_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The model config minus fields that do not change the computation."""
    return {k: v for k, v in config.items() if k not in NON_ARCHITECTURAL_FIELDS}


def architecture_digest(config: Mapping[str, Any]) -> str:
    return _sha256(architecture_config(config))


def direct_key(
    *,
    architecture: str,
    graph_kind: str,
    bucket: Mapping[str, int],
    dtype: str,
    tracer: Mapping[str, str],
    compiler: str,
    compiler_version: str,
    flags: Sequence[str],
    target: str,
    builder_version: str = GRAPH_BUILDER_VERSION,
) -> str:
    """The key that needs no tracing: everything that decides the HLO and its compile."""
    return _sha256(
        {
            "key_schema": KEY_SCHEMA,
            "kind": "direct",
            "architecture": architecture,
            "graph_kind": graph_kind,
            "bucket": dict(bucket),
            "dtype": dtype,
            "tracer": dict(tracer),
            "graph_builder": builder_version,
            "compiler": compiler,
            "compiler_version": compiler_version,
            "flags": list(flags),
            "target": target,
        }
    )


def hlo_key(
    *,
    hlo_digest: str,
    compiler: str,
    compiler_version: str,
    flags: Sequence[str],
    target: str,
) -> str:
    """The key of one compile: the HLO bytes (metadata stripped) + compiler + flags + target."""
    return _sha256(
        {
            "key_schema": KEY_SCHEMA,
            "kind": "hlo",
            "hlo": hlo_digest,
            "compiler": compiler,
            "compiler_version": compiler_version,
            "flags": list(flags),
            "target": target,
        }
    )


def weights_key(
    *, source: Mapping[str, Any], dtype: str, builder_version: str = WEIGHTS_BUILDER_VERSION
) -> str:
    """Identifies one set of weights as the graphs name them (file digests or config + seed)."""
    return _sha256(
        {
            "key_schema": KEY_SCHEMA,
            "kind": "weights",
            "source": dict(source),
            "dtype": dtype,
            "graph_builder": builder_version,
        }
    )
