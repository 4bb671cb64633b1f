"""neuronx-cc flags checked against the target at plan time, and failed compiles triaged from
their logs (recorded log texts, and a compile through the neuronx-cc stand-in)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from artifacts.store import Store
from kiln.cli import cli
from pipeline.errors import PipelineError, SpecError
from pipeline.jobs import GraphJob, plan_spec
from pipeline.neuron_flags import (
    NeuronFlagError,
    canonical_flags,
    split_target,
    validate_flags,
)
from pipeline.spec import Bucket, parse_spec
from pipeline.triage import triage
from tests.helpers.model_helpers import TINY_BERT  # noqa: E402
from tests.helpers.neuron_helpers import (
    ABNORMAL_LOG,
    EXIT_70_LOG,
    INSTRUCTION_LIMIT_LOG,
    LNC_LOG,
    OOM_LOG,
    UNKNOWN_CODE_LOG,
    install_neuronx_cc,
)

# --- flags -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "canonical"),
    [
        (["--model-type", "transformer", "-O2"], ("--model-type=transformer", "-O2")),
        (["--model-type=transformer", "--optlevel", "3"], ("--model-type=transformer", "-O3")),
        (["--optlevel=1", "-O", "2"], ("-O1", "-O2")),
        (["--logical-nc-config", "2", "-lnc", "1"], ("--lnc=2", "--lnc=1")),
        (
            ["--auto-cast", "none", "--auto-cast-type=bf16"],
            ("--auto-cast=none", "--auto-cast-type=bf16"),
        ),
        (
            ["--tensorizer-options", "--enable-ccop-compute-overlap --cc-pipeline-tiling-factor=2"],
            ("--tensorizer-options=--enable-ccop-compute-overlap --cc-pipeline-tiling-factor=2",),
        ),
        (
            ["--enable-fast-loading-neuron-binaries", "-O1"],
            ("--enable-fast-loading-neuron-binaries", "-O1"),
        ),
        (["--internal-flag=3", "--flag-x", "value"], ("--internal-flag=3", "--flag-x", "value")),
    ],
)
def test_canonical_flags(flags: list[str], canonical: tuple[str, ...]) -> None:
    assert canonical_flags(flags) == canonical


def test_split_target_drops_what_kiln_or_the_cache_wrapper_sets() -> None:
    flags = ["--target", "trn1", "--framework=XLA", "--model-type=transformer", "--logfile=x.txt"]
    assert split_target(flags) == ("trn1", ("--model-type=transformer",))
    assert split_target(["--retry_failed_compilation", "-O1"]) == (None, ("-O1",))


@pytest.mark.parametrize(
    ("target", "flags", "message"),
    [
        ("inf2", ["--lnc", "2"], r"'--lnc=2': LNC 2 needs target trn2; inf2 supports only --lnc=1"),
        ("trn1", ["--logical-nc-config=2"], r"'--lnc=2'.*NCC_EARG001"),
        ("trn2", ["--lnc=4"], r"unknown LNC size '4'"),
        ("inf2", ["--auto-cast=fp32"], r"'--auto-cast=fp32': unknown auto-cast mode 'fp32'"),
        ("inf2", ["--auto-cast-type", "int8"], r"unknown auto-cast type 'int8'"),
        ("trn1", ["--model-type=cnn"], r"'--model-type=cnn': unknown model type 'cnn'"),
        ("inf2", ["-O4"], r"'-O4': unknown optimization level '4'"),
        ("inf2", ["--optlevel", "0"], r"'-O0'"),
        ("tpu", [], r"unknown Neuron target 'tpu'"),
        ("inf2", ["--target=trn1"], r"Kiln sets --target itself"),
        ("inf2", ["--cache_dir=/tmp/x"], r"torch-neuronx cache option"),
    ],
)
def test_invalid_flags_name_the_flag(target: str, flags: list[str], message: str) -> None:
    with pytest.raises(NeuronFlagError, match=message):
        validate_flags(target, flags)


def test_valid_flags_pass_canonical() -> None:
    assert validate_flags("trn2", ["--lnc", "2", "-O3", "--model-type", "unet-inference"]) == (
        "--lnc=2",
        "-O3",
        "--model-type=unet-inference",
    )
    assert validate_flags("inf2", ["--lnc=1", "--auto-cast", "matmult", "--verbose", "info"]) == (
        "--lnc=1",
        "--auto-cast=matmult",
        "--verbose=info",
    )


def _model(**changes: object) -> dict[str, object]:
    return {
        "name": "bert",
        "task": "encoder",
        "source": {"config": TINY_BERT},
        "buckets": {"batch": [1], "seq": [16]},
        **changes,
    }


def test_spec_rejects_flags_that_cannot_work_for_the_target() -> None:
    data = {"models": [_model(targets=["cpu", "inf2"], compiler_flags={"inf2": ["--lnc 2"]})]}
    with pytest.raises(SpecError, match=r"spec.yaml: models\[0\].compiler_flags.inf2: .*'--lnc=2'"):
        parse_spec(data, "spec.yaml")
    shared = {"models": [_model(targets=["trn1", "trn2"], compiler_flags=["--lnc=2"])]}
    with pytest.raises(SpecError, match=r"compiler_flags: for target trn1: .*LNC 2"):
        parse_spec(shared, "spec.yaml")
    # flags for the CPU target are not neuronx-cc's business
    parse_spec({"models": [_model(compiler_flags=["--lnc=2"])]}, "spec.yaml")


def test_plan_rejects_command_line_flags_before_compiling(store: Store) -> None:
    spec = parse_spec({"models": [_model(targets=["inf2"])]}, "spec.yaml")
    with pytest.raises(NeuronFlagError, match=r"model bert, target inf2: .*'--auto-cast=most'"):
        plan_spec(spec, store, flags_override=("--auto-cast", "most"))
    (plan,) = plan_spec(spec, store, flags_override=("--model-type", "transformer"))
    assert {job.flags for job in plan.jobs} == {("--model-type=transformer",)}


# --- triage ------------------------------------------------------------------------------


def test_oom_kill() -> None:
    found = triage(OOM_LOG, -9)
    assert (found.cause, found.code) == ("oom", "F137")
    assert "[F137]" in (found.line or "") and "--workers 1" in found.suggestion
    assert triage("", -9).cause == "oom"  # the kill alone says enough


def test_abnormal_termination() -> None:
    found = triage(ABNORMAL_LOG, 1)
    assert (found.cause, found.code) == ("abnormal-termination", "F134")
    assert "-O1" in found.suggestion


def test_ncc_error_codes_with_their_line() -> None:
    found = triage(INSTRUCTION_LIMIT_LOG, 1)
    assert (found.cause, found.code) == ("compiler-error", "NCC_EVRF007")
    assert found.line is not None and "6,412,113" in found.line
    assert "split the bucket list" in found.suggestion
    lnc = triage(LNC_LOG, 1)
    assert lnc.code == "NCC_EARG001" and "--lnc=1" in lnc.suggestion
    unknown = triage(UNKNOWN_CODE_LOG, 1)
    assert unknown.code == "NCC_EZZZ123" and "error-codes/EZZZ123.html" in unknown.suggestion


def test_timeout_and_plain_exits() -> None:
    timed_out = triage("....", -9, reason="timeout")  # Kiln's kill is not the OOM killer
    assert timed_out.cause == "timeout" and "--timeout" in timed_out.suggestion
    plain = triage(EXIT_70_LOG, 70)
    assert plain.cause == "exit" and "status 70" in plain.summary
    assert plain.line is not None and "rng-get-and-update-state" in plain.line
    assert triage("", None).cause == "unknown"


def test_failed_compile_records_and_shows_its_cause(
    store: Store, store_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipeline.keys import hlo_key
    from pipeline.tasks import TracedJob, compile_graph

    bin_dir = install_neuronx_cc(tmp_path / "bin", mode="oom")
    monkeypatch.setenv("PATH", f"{bin_dir}:{__import__('os').environ['PATH']}")
    hlo = store.put_bytes(b"an HLO module", kind="hlo")
    key = hlo_key(
        hlo_digest=str(hlo.digest),
        compiler="neuronx-cc",
        compiler_version="2.15.141.0+d3cfc8ca",
        flags=("-O2",),
        target="inf2",
    )
    job = GraphJob(
        "bert", "encode", Bucket(1, 16), "inf2", ("-O2",), "neuronx-cc", "x", "float32", "d"
    )
    traced = TracedJob(job, str(hlo.digest), hlo.size, key, {}, 0.0)
    outcome = compile_graph(str(store_dir), store.index_url, traced, 60.0)
    assert outcome.compiled is None and outcome.log_digest is not None

    runner = CliRunner()
    shown = runner.invoke(cli, ["show", outcome.log_digest, "--store", str(store_dir)])
    assert shown.exit_code == 0, shown.output
    assert "status:      failed (oom)" in shown.output
    assert "cause:       neuronx-cc was killed, most likely by the OOM killer" in shown.output
    assert "[F137]" in shown.output and "next step:   run fewer compiles" in shown.output
    assert "log (last lines):" in shown.output

    by_key = runner.invoke(cli, ["show", "--compilation", key, "--store", str(store_dir)])
    assert by_key.exit_code == 0 and "cause:" in by_key.output
    as_json = runner.invoke(
        cli, ["show", "--compilation", key, "--store", str(store_dir), "--json"]
    )
    (record,) = json.loads(as_json.output)
    assert record["triage"]["cause"] == "oom" and record["status"] == "failed"

    missing = runner.invoke(
        cli, ["show", "--compilation", "sha256:" + "0" * 64, "--store", str(store_dir)]
    )
    assert missing.exit_code != 0


def test_unknown_tracer_is_a_spec_error() -> None:
    with pytest.raises(SpecError, match=r"models\[0\].tracer: must be one of"):
        parse_spec({"models": [_model(tracer="jax")]}, "spec.yaml")
    assert isinstance(SpecError("x"), PipelineError)
