"""`kiln compile` refuses what cannot work, in one line, before any work starts: negative
--workers or --timeout, and a bucket too big for this machine's memory (issue 9)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline.memory import MemoryEstimateError, check_model, estimate_graph, host_memory_bytes
from pipeline.spec import Bucket, load_spec
from tests.helpers.model_helpers import TINY_BERT
from tests.helpers.pipeline_helpers import (
    EXAMPLES,
    example_spec,
    kiln,
    micro_model,
    runs,
    write_spec,
)

TINY_LLAMA = yaml.safe_load((EXAMPLES / "tiny-llama.yaml").read_text())["models"][0]["source"][
    "config"
]


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--workers", "-2", "x>=1"),
        ("--workers", "0", "x>=1"),
        ("--timeout", "-1", "x>0"),
        ("--timeout", "0", "x>0"),
    ],
)
def test_compile_refuses_non_positive_workers_and_timeout(
    tmp_path: Path, option: str, value: str, message: str
) -> None:
    spec = write_spec(tmp_path / "s.yaml", micro_model(), targets=["cpu"])
    proc = kiln("compile", spec, option, value, store=tmp_path / "store", timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert option in proc.stderr and message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "store").exists()  # refused before the store was opened


def test_a_bucket_too_big_for_memory_is_refused_at_plan_time(tmp_path: Path) -> None:
    spec = example_spec("tiny-llama.yaml", tmp_path, buckets={"batch": [1048576], "seq": [128]})
    for command in ("plan", "compile"):
        proc = kiln(command, spec, store=tmp_path / "store", timeout=120)
        assert proc.returncode == 1, proc.stdout + proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1, proc.stderr
        assert lines[0].startswith(
            "kiln: error: model tiny-llama, graph context_encoding, bucket b1048576xs128:"
            " needs at least "
        )
        assert "of memory (inputs " in lines[0] and "use a smaller bucket" in lines[0]
    assert runs(tmp_path / "store") == []  # no run was started


def test_estimate_counts_kv_cache_attention_and_weights() -> None:
    small = estimate_graph(TINY_LLAMA, "causal-lm", "token_generation", Bucket(1, 64), "float32")
    kv = 2 * 2 * 1 * 2 * 64 * 16 * 4  # K and V x layers x batch x kv heads x seq x head dim
    assert small.inputs == 2 * 8 + kv and small.outputs == 256 * 4 + kv
    assert small.weights == 2 * (2 * 64 * 64 + 2 * 64 * 32 + 2 * 64 * 128) * 4 + 2 * 256 * 64 * 4
    context = estimate_graph(TINY_LLAMA, "causal-lm", "context_encoding", Bucket(2, 128), "float32")
    scores = 2 * 4 * 128 * 128 * 4  # batch x heads x seq x seq
    assert context.activations == 2 * 128 * 64 * 4 + max(scores, 2 * 2 * 128 * 128 * 4)
    half = estimate_graph(TINY_LLAMA, "causal-lm", "context_encoding", Bucket(2, 128), "bfloat16")
    assert half.total < context.total
    bigger = estimate_graph(TINY_LLAMA, "causal-lm", "context_encoding", Bucket(4, 128), "float32")
    assert bigger.total > context.total and bigger.weights == context.weights
    encoder = estimate_graph(TINY_BERT, "encoder", "encode", Bucket(2, 32), "float32")
    assert encoder.outputs == 2 * 32 * TINY_BERT["hidden_size"] * 4


def test_check_model_uses_the_limit_and_names_the_graph(tmp_path: Path) -> None:
    spec_path = example_spec("tiny-llama.yaml", tmp_path, buckets={"batch": [1], "seq": [64]})
    (model,) = load_spec(spec_path).models
    need = estimate_graph(TINY_LLAMA, "causal-lm", "context_encoding", Bucket(1, 64), "float32")
    check_model(model, TINY_LLAMA, need.total)  # exactly enough: accepted
    check_model(model, TINY_LLAMA, None)
    with pytest.raises(MemoryEstimateError, match="model tiny-llama, graph context_encoding,"):
        check_model(model, TINY_LLAMA, need.total - 1)
    assert (host_memory_bytes() or 0) > 1 << 30
