"""`kiln compile` end to end: real tracing (torch-xla), real compiles (xla-cpu), real stores.

Expensive compiles are shared through module-scoped fixtures; tests that change a store work
on a private copy of it. The only test double is a `neuronx-cc` stand-in (the real Neuron
compiler cannot be installed here), see pipeline_helpers.FAKE_NEURONX_CC.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.helpers.pipeline_helpers import (
    EXAMPLES,
    REPO,
    blob_count,
    compile_json,
    copy_store,
    example_spec,
    graph_of,
    install_failing_neuronx_cc,
    kiln,
    kiln_env,
    load_weights,
    micro_model,
    plan_statuses,
    read_blob,
    release,
    run_graph,
    runs,
    write_spec,
)

MINILM = EXAMPLES / "minilm.yaml"
TINY_LLAMA = EXAMPLES / "tiny-llama.yaml"
HEAVY = ("torch", "torch_xla", "transformers", "jax")

# Runs `kiln` in this process, then fails if tracing libraries were ever imported.
NO_TRACE_WRAPPER = f"""
import sys
from kiln.cli import main
try:
    main(sys.argv[1:])
    code = 0
except SystemExit as exc:
    code = exc.code
heavy = [m for m in {HEAVY!r} if m in sys.modules]
assert not heavy, f"imported {{heavy}}"
sys.exit(code)
"""


def _statuses(report: dict[str, Any]) -> list[str]:
    return [item["status"] for item in report["items"]]


# --- shared compiles -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """minilm.yaml compiled into a fresh store, then compiled again with --recheck (the full
    path, in a process that must never import torch), then once more (the no-op shortcut, in
    a process that must not import SQLAlchemy either)."""
    store = tmp_path_factory.mktemp("minilm") / "store"
    first = compile_json(MINILM, store)
    first_release = release(store, "minilm:latest")

    def rerun(*extra: str, heavy: tuple[str, ...]) -> subprocess.CompletedProcess[str]:
        wrapper = NO_TRACE_WRAPPER.replace(repr(HEAVY), repr(heavy))
        command = [sys.executable, "-c", wrapper, "compile", str(MINILM), "--store", str(store)]
        return subprocess.run(
            [*command, "--json", *extra],
            cwd=REPO,
            env=kiln_env(),
            capture_output=True,
            text=True,
            timeout=120,
        )

    second = rerun("--recheck", heavy=HEAVY)
    second_release = release(store, "minilm:latest")
    third = rerun(heavy=(*HEAVY, "sqlalchemy"))
    return {
        "store": store,
        "first": first,
        "first_release": first_release,
        "second_proc": second,
        "second_release": second_release,
        "third_proc": third,
        "third_release": release(store, "minilm:latest"),
    }


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    store = tmp_path_factory.mktemp("tiny-llama") / "store"
    report = compile_json(TINY_LLAMA, store)
    return {"store": store, "report": report, "release": release(store, "tiny-llama:latest")}


@pytest.fixture(scope="module")
def micro(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A one-layer Llama (4 graphs): `kiln plan` on the fresh store, then compiled."""
    root = tmp_path_factory.mktemp("micro")
    spec = write_spec(root / "micro.yaml", micro_model())
    store = root / "store"
    fresh_plan = plan_statuses(spec, store)
    report = compile_json(spec, store, workers=1)
    return {
        "root": root,
        "spec": spec,
        "store": store,
        "fresh_plan": fresh_plan,
        "report": report,
        "release": release(store, "micro:latest"),
    }


# --- MiniLM: every bucket matches eager transformers ---------------------------------------


def test_minilm_compiles_end_to_end(minilm: dict[str, Any]) -> None:
    first = minilm["first"]
    assert (first["jobs"], first["compiled"], first["failed"]) == (6, 6, 0)
    assert (first["direct_hits"], first["hlo_hits"]) == (0, 0)
    assert [r["ref"] for r in first["releases"]] == ["minilm:latest"]
    assert first["releases"][0]["unchanged"] is False
    digest, rel = minilm["first_release"]
    assert digest == first["releases"][0]["digest"]
    assert rel.name == "minilm" and rel.target == "cpu" and rel.source.task == "encoder"
    buckets = sorted((g.bucket["batch"], g.bucket["seq"]) for g in rel.graphs)
    assert buckets == [(b, s) for b in (1, 4) for s in (32, 64, 128)]
    assert {g.format for g in rel.graphs} == {"xla-cpu"}
    assert {f.name for f in rel.source.files} >= {"tokenizer.json", "vocab.txt"}


def test_minilm_every_bucket_matches_eager_transformers(minilm: dict[str, Any]) -> None:
    import torch

    from tests.helpers.model_helpers import load_minilm, minilm_inputs

    store = minilm["store"]
    _, rel = minilm["first_release"]
    weights = load_weights(store, rel)
    eager_model = load_minilm()
    for graph in rel.graphs:
        batch, seq = graph.bucket["batch"], graph.bucket["seq"]
        inputs = minilm_inputs(batch, seq)  # real sentences, tokenized and padded
        assert 0 < inputs["attention_mask"].sum() < batch * seq  # padding is exercised
        # every weight the graph names is stored, with the signature's shape and dtype
        for param in graph.signature["parameters"]:
            if param["kind"] == "weight":
                assert list(weights[param["name"]].shape) == param["shape"]
        got = run_graph(store, graph, weights, inputs)["last_hidden_state"]
        with torch.no_grad():
            want = eager_model(
                input_ids=torch.from_numpy(inputs["input_ids"]),
                attention_mask=torch.from_numpy(inputs["attention_mask"]),
            ).last_hidden_state.numpy()
        assert got.shape == want.shape == (batch, seq, 384)
        error = np.abs(got - want).max()
        assert error < 1e-4, (graph.bucket, error)


# --- tiny Llama: context encoding and one token-generation step match eager --------------


def _eager_llama(spec_path: Path) -> Any:
    """The eager model as pipeline/sources.load_model builds it: config, seed, from_config."""
    import torch
    import transformers
    import yaml

    source = yaml.safe_load(spec_path.read_text())["models"][0]["source"]
    config = transformers.AutoConfig.for_model(**source["config"])
    config._attn_implementation = "eager"
    torch.manual_seed(source.get("seed", 0))
    model = transformers.AutoModelForCausalLM.from_config(
        config, dtype=torch.float32, attn_implementation="eager"
    )
    return model.eval()


def test_tiny_llama_compiles_end_to_end(tiny_llama: dict[str, Any]) -> None:
    report = tiny_llama["report"]
    assert (report["jobs"], report["compiled"], report["failed"]) == (10, 10, 0)
    _, rel = tiny_llama["release"]
    kinds = sorted((g.kind, g.bucket["batch"], g.bucket["seq"]) for g in rel.graphs)
    # buckets.context: [16] adds context_encoding graphs only
    assert kinds == [("context_encoding", b, s) for b in (1, 2) for s in (16, 64, 128)] + [
        ("token_generation", b, s) for b in (1, 2) for s in (64, 128)
    ]


def test_tiny_llama_graphs_match_eager(tiny_llama: dict[str, Any]) -> None:
    import torch

    store = tiny_llama["store"]
    _, rel = tiny_llama["release"]
    weights = load_weights(store, rel)
    model = _eager_llama(TINY_LLAMA)
    rng = np.random.default_rng(0)
    buckets = sorted(
        {(g.bucket["batch"], g.bucket["seq"]) for g in rel.graphs if g.kind == "token_generation"}
    )
    for batch, seq in buckets:
        lengths = [5 + 7 * row for row in range(batch)]  # rows of different lengths
        prompts = [rng.integers(1, 256, size=n).tolist() for n in lengths]
        input_ids = np.zeros((batch, seq), dtype=np.int64)
        mask = np.zeros((batch, seq), dtype=np.int64)
        for row, prompt in enumerate(prompts):
            input_ids[row, : len(prompt)] = prompt
            mask[row, : len(prompt)] = 1

        context = graph_of(rel, "context_encoding", batch, seq)
        ctx = run_graph(store, context, weights, {"input_ids": input_ids, "attention_mask": mask})
        with torch.no_grad():
            want = [model(input_ids=torch.tensor([p])).logits[0, -1].numpy() for p in prompts]
        assert ctx["logits"].shape == (batch, 256)
        error = np.abs(ctx["logits"] - np.stack(want)).max()
        assert error < 1e-4, ("context_encoding", batch, seq, error)

        next_tokens = [int(np.argmax(w)) for w in want]
        step = graph_of(rel, "token_generation", batch, seq)
        inputs = {k: v for k, v in ctx.items() if k != "logits"}  # the KV cache
        inputs["input_ids"] = np.array(next_tokens, dtype=np.int64)[:, None]
        inputs["position"] = np.array(lengths, dtype=np.int64)
        gen = run_graph(store, step, weights, inputs)
        with torch.no_grad():
            want = [
                model(input_ids=torch.tensor([p + [t]])).logits[0, -1].numpy()
                for p, t in zip(prompts, next_tokens, strict=True)
            ]
        error = np.abs(gen["logits"] - np.stack(want)).max()
        assert error < 1e-4, ("token_generation", batch, seq, error)


# --- determinism and the cache -------------------------------------------------------------


def test_same_model_in_two_processes_gives_the_same_hlo(
    micro: dict[str, Any], tmp_path: Path
) -> None:
    other = tmp_path / "other-store"
    report = compile_json(micro["spec"], other, workers=1)
    assert report["compiled"] == 4
    _, a = micro["release"]
    _, b = release(other, "micro:latest")
    hlo_a = {g.identity: str(g.hlo.digest) for g in a.graphs}
    hlo_b = {g.identity: str(g.hlo.digest) for g in b.graphs}
    assert hlo_a == hlo_b and len(hlo_a) == 4
    assert {g.identity: g.hlo_key for g in a.graphs} == {g.identity: g.hlo_key for g in b.graphs}
    assert a.source.weights == b.source.weights  # same seed -> byte-identical weights blob


def test_second_compile_is_all_direct_hits_without_tracing(minilm: dict[str, Any]) -> None:
    proc = minilm["second_proc"]
    assert proc.returncode == 0, proc.stderr[-3000:]  # also: torch was never imported
    second = json.loads(proc.stdout)
    assert second["jobs"] == 6 and second["direct_hits"] == 6
    assert (second["compiled"], second["hlo_hits"], second["failed"]) == (0, 0, 0)
    assert all(item["trace_seconds"] == 0 for item in second["items"])
    assert all(item["hit_kind"] == "direct-hit" for item in second["items"])
    assert second["releases"] == [
        {
            "ref": "minilm:latest",
            "digest": minilm["first"]["releases"][0]["digest"],
            "target": "cpu",
            "unchanged": True,
        }
    ]
    assert minilm["second_release"][0] == minilm["first_release"][0]


def test_changed_compiler_flags_recompile_every_graph(
    micro: dict[str, Any], tmp_path: Path
) -> None:
    store = copy_store(micro["store"], tmp_path / "store")
    report = compile_json(micro["spec"], store, "--flags=--foo", workers=1)
    assert (report["jobs"], report["compiled"]) == (4, 4)
    assert report["direct_hits"] == report["hlo_hits"] == 0
    _, rel = release(store, "micro:latest")
    assert {g.compiler.flags for g in rel.graphs} == {("--foo",)}
    _, before = micro["release"]
    old = {g.identity: g for g in before.graphs}
    for graph in rel.graphs:  # same HLO, new compile keys and executables
        assert graph.hlo.digest == old[graph.identity].hlo.digest
        assert graph.hlo_key != old[graph.identity].hlo_key

    # the same flags given in the spec: every job misses the direct key too (no tracing here)
    from artifacts.store import Store
    from pipeline.jobs import plan_spec
    from pipeline.spec import load_spec

    flagged = write_spec(tmp_path / "flags.yaml", {**micro_model(), "compiler_flags": ["-O3"]})
    with Store.open(str(micro["store"])) as s:
        (plan,) = plan_spec(load_spec(flagged), s)
        (unchanged,) = plan_spec(load_spec(micro["spec"]), s)
    assert len(plan.jobs) == 4 and not plan.direct_hits
    assert {j.flags for j in plan.jobs} == {("-O3",)}
    assert len(unchanged.direct_hits) == 4


def test_changed_weights_compile_nothing(tiny_llama: dict[str, Any], tmp_path: Path) -> None:
    store = copy_store(tiny_llama["store"], tmp_path / "store")
    weights_before = blob_count(store, "weights")
    spec = example_spec("tiny-llama.yaml", tmp_path, seed=1)  # same name, other weights
    report = compile_json(spec, store)
    assert (report["jobs"], report["direct_hits"]) == (10, 10)
    assert report["compiled"] == report["hlo_hits"] == report["failed"] == 0
    assert blob_count(store, "weights") == weights_before + 1
    old_digest, old = tiny_llama["release"]
    new_digest, new = release(store, "tiny-llama:latest")
    assert report["releases"][0]["digest"] == new_digest != old_digest
    assert report["releases"][0]["unchanged"] is False
    assert new.source.weights != old.source.weights
    assert new.source.architecture_digest == old.source.architecture_digest
    old_exes = {g.identity: g.executable.digest for g in old.graphs}
    assert {g.identity: g.executable.digest for g in new.graphs} == old_exes


def test_same_architecture_under_two_names_shares_compiled_graphs(tmp_path: Path) -> None:
    spec = write_spec(
        tmp_path / "two.yaml", micro_model("micro-a", seed=0), micro_model("micro-b", seed=1)
    )
    store = tmp_path / "store"
    report = compile_json(spec, store, workers=1)
    assert (report["jobs"], report["compiled"], report["hlo_hits"]) == (8, 4, 4)
    by_graph: dict[tuple[str, str], set[str]] = {}
    for item in report["items"]:
        by_graph.setdefault((item["graph_kind"], item["bucket"]), set()).add(item["status"])
    assert set(map(frozenset, by_graph.values())) == {frozenset({"compiled", "hlo-hit"})}
    _, a = release(store, "micro-a:latest")
    _, b = release(store, "micro-b:latest")
    assert {g.identity: g.executable.digest for g in a.graphs} == {
        g.identity: g.executable.digest for g in b.graphs
    }
    assert a.source.weights != b.source.weights


def test_hlo_neutral_config_change_gives_hlo_hits(micro: dict[str, Any], tmp_path: Path) -> None:
    store = copy_store(micro["store"], tmp_path / "store")
    spec = write_spec(
        tmp_path / "init.yaml", micro_model("micro-init", initializer_range=0.5, seed=0)
    )
    assert plan_statuses(spec, store) == ["hlo-hit"] * 4
    report = compile_json(spec, store, workers=1)
    assert (report["jobs"], report["hlo_hits"]) == (4, 4)
    assert report["compiled"] == report["direct_hits"] == report["failed"] == 0
    _, rel = release(store, "micro-init:latest")
    _, base = micro["release"]
    assert rel.source.architecture_digest != base.source.architecture_digest
    assert {g.identity: g.executable.digest for g in rel.graphs} == {
        g.identity: g.executable.digest for g in base.graphs
    }
    # the run and its hit kinds are in the index
    last = runs(store)[-1]
    assert last["id"] == report["run_id"] and last["status"] == "ok"
    assert len(last["items"]) == 4
    assert {(i["status"], i["hit_kind"]) for i in last["items"]} == {("hlo-hit", "hlo-hit")}
    assert all(i["trace_seconds"] > 0 and i["hlo_key"] for i in last["items"])
    # the recipe is now known: the next plan needs no tracing
    assert plan_statuses(spec, store) == ["direct-hit"] * 4


# --- failures stay with their graphs -------------------------------------------------------


def test_failing_neuron_target_does_not_block_cpu(tmp_path: Path) -> None:
    bin_dir = install_failing_neuronx_cc(tmp_path / "bin")
    env = kiln_env(extra_path=bin_dir)
    spec = write_spec(tmp_path / "both.yaml", {**micro_model(), "targets": ["cpu", "inf2"]})
    store = tmp_path / "store"
    proc = kiln("compile", spec, "--json", "--workers", "1", store=store, env=env)
    assert proc.returncode != 0
    report = json.loads(proc.stdout)
    assert (report["jobs"], report["compiled"], report["failed"]) == (8, 4, 4)
    assert [r["ref"] for r in report["releases"]] == ["micro:latest-cpu"]
    assert report["not_released"] and "micro:latest-inf2" in report["not_released"][0]
    digest, rel = release(store, "micro:latest-cpu")
    assert len(rel.graphs) == 4 and rel.target == "cpu"
    for item in report["items"]:
        if item["target"] == "cpu":
            assert item["status"] == "compiled"
            continue
        assert item["status"] == "failed" and "exit 1" in item["error"]
        log = read_blob(store, item["log_digest"]).decode()
        assert "unsupported operator" in log
    with pytest.raises(Exception, match="latest-inf2"):
        release(store, "micro:latest-inf2")

    (run,) = runs(store)
    assert run["status"] == "failed" and len(run["items"]) == 8
    assert sorted(i["status"] for i in run["items"]) == ["compiled"] * 4 + ["failed"] * 4

    # a failure never poisons the key: the next run retries the inf2 graphs
    proc = kiln("compile", spec, "--json", "--workers", "1", store=store, env=env)
    again = json.loads(proc.stdout)
    assert proc.returncode != 0
    assert (again["direct_hits"], again["failed"], again["compiled"]) == (4, 4, 0)
    retried = [i for i in again["items"] if i["target"] == "inf2"]
    assert all(i["compile_seconds"] > 0 and i["log_digest"] for i in retried)
    assert release(store, "micro:latest-cpu")[0] == digest


def test_neuron_target_without_neuronx_cc_fails_clearly(tmp_path: Path) -> None:
    env = kiln_env()
    assert shutil.which("neuronx-cc", path=env["PATH"]) is None
    spec = write_spec(tmp_path / "inf2.yaml", {**micro_model(), "targets": ["inf2"]})
    store = tmp_path / "store"
    proc = kiln("compile", spec, "--json", "--workers", "1", store=store, env=env)
    assert proc.returncode != 0
    report = json.loads(proc.stdout)
    assert (report["jobs"], report["failed"], report["compiled"]) == (4, 4, 0)
    assert report["releases"] == []
    for item in report["items"]:
        assert "install the Neuron SDK" in item["error"]
        assert "compile for target cpu" in item["error"]
    assert blob_count(store, "executable") == 0  # never compiled by xla-cpu instead
    text = kiln("compile", spec, store=store, env=env)
    assert text.returncode != 0 and "install the Neuron SDK" in text.stderr
    # an explicit CPU backend for a Neuron target is refused, in one line
    forced = kiln("compile", spec, "--backend", "xla-cpu", store=store, env=env)
    assert forced.returncode != 0 and "Traceback" not in forced.stderr
    assert "cannot compile for target 'inf2'" in forced.stderr.strip().splitlines()[-1]


# --- the index and `kiln plan` -------------------------------------------------------------


def test_every_run_and_item_is_recorded(minilm: dict[str, Any]) -> None:
    recorded = runs(minilm["store"])
    assert [r["id"] for r in recorded] == [
        minilm["first"]["run_id"],
        json.loads(minilm["second_proc"].stdout)["run_id"],
    ]
    first, second = recorded
    for run in recorded:
        assert run["status"] == "ok" and run["finished_at"] >= run["started_at"]
        assert run["record_digest"] and run["spec_digest"].startswith("sha256:")
        assert len(run["items"]) == 6
        assert json.loads(run["summary"])["jobs"] == 6
    assert {i["status"] for i in first["items"]} == {"compiled"}
    assert {i["hit_kind"] for i in first["items"]} == {None}
    assert all(i["compile_seconds"] > 0 and i["log_digest"] for i in first["items"])
    assert {(i["status"], i["hit_kind"]) for i in second["items"]} == {("direct-hit", "direct-hit")}
    direct_keys = {i["direct_key"] for i in first["items"]}
    assert direct_keys == {i["direct_key"] for i in second["items"]} and len(direct_keys) == 6


def test_an_unchanged_rerun_is_a_noop_without_the_index(minilm: dict[str, Any]) -> None:
    """The third compile changes nothing: it reports what the full path reported, as no run
    of its own, without importing SQLAlchemy (the wrapper asserts it) or recording a run."""
    proc = minilm["third_proc"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    third = json.loads(proc.stdout)
    second = json.loads(minilm["second_proc"].stdout)
    assert third["run_id"] is None and third["noop"] == {"same_as_run": second["run_id"]}
    for field in ("jobs", "compiled", "direct_hits", "hlo_hits", "failed", "not_released"):
        assert third[field] == second[field], field

    def by_key(report: dict[str, Any]) -> list[dict[str, Any]]:
        return sorted(report["items"], key=lambda i: i["direct_key"])

    assert by_key(third) == by_key(second)
    assert third["releases"] == second["releases"]
    assert minilm["third_release"] == minilm["second_release"]
    assert len(runs(minilm["store"])) == 2


def test_a_changed_spec_or_recheck_takes_the_full_path(
    minilm: dict[str, Any], tmp_path: Path
) -> None:
    store = copy_store(minilm["store"], tmp_path / "store")
    assert compile_json(MINILM, store)["run_id"] is not None  # another store: not the record
    assert compile_json(MINILM, store)["run_id"] is None  # ... until it has one
    assert compile_json(MINILM, store, "--recheck")["run_id"] is not None
    edited = tmp_path / "minilm.yaml"
    edited.write_text(MINILM.read_text() + "\n# a comment changes the spec's bytes\n")
    report = compile_json(edited, store)
    assert report["run_id"] is not None and report["direct_hits"] == report["jobs"] == 6
    assert compile_json(edited, store)["run_id"] is None
    assert len(runs(store)) == 2 + 3


def test_kiln_plan_before_and_after_compile(minilm: dict[str, Any], micro: dict[str, Any]) -> None:
    assert micro["fresh_plan"] == ["compile"] * 4
    assert micro["report"]["compiled"] == 4
    assert plan_statuses(micro["spec"], micro["store"]) == ["direct-hit"] * 4
    assert plan_statuses(MINILM, minilm["store"]) == ["direct-hit"] * 6
    table = kiln("plan", MINILM, store=minilm["store"])
    assert table.returncode == 0
    assert table.stdout.count("direct-hit") == 7  # six rows and the summary line
    assert "6 graphs: 6 direct-hit" in table.stdout
