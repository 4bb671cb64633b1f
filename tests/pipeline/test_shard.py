"""`kiln compile --shard I/N`: the split (properties over random job lists and random specs
planned for real), the index variables of Kubernetes and AWS Batch, and end to end: two
shards compiling concurrently into one store, then a final run that is all direct hits and
publishes the same release as one plain run."""

from __future__ import annotations

import dataclasses
import hashlib
import random
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from artifacts.store import Store
from pipeline.shard import (
    Shard,
    ShardError,
    assign,
    parse_shard,
    resolve_shard,
    select_shard,
    shard_from_environment,
    split_jobs,
)
from pipeline.spec import parse_spec
from tests.helpers.farm_helpers import (
    assert_same_release,
    check_shards_then_final,
    json_report,
    kiln_argv,
    run_parallel,
    single_run,
)
from tests.helpers.pipeline_helpers import compile_json, release

# --- options and index variables -----------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "want"),
    [("0/1", Shard(0, 1)), ("3/4", Shard(3, 4)), (" 1 / 2 ", Shard(1, 2))],
)
def test_parse_shard(text: str, want: Shard) -> None:
    assert parse_shard(text) == want
    assert str(want) == text.replace(" ", "")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("4/4", "out of range"),
        ("1/0", "at least 1"),
        ("-1/2", "I/N"),
        ("1", "I/N"),
        ("a/b", "I/N"),
        ("1/2/3", "I/N"),
    ],
)
def test_parse_shard_rejects(text: str, message: str) -> None:
    with pytest.raises(ShardError, match=message):
        parse_shard(text)


@pytest.mark.parametrize("variable", ["JOB_COMPLETION_INDEX", "AWS_BATCH_JOB_ARRAY_INDEX"])
def test_index_from_environment(variable: str) -> None:
    assert shard_from_environment(3, {variable: "2"}) == Shard(2, 3)
    assert resolve_shard(None, 3, {variable: "0"}) == Shard(0, 3)
    with pytest.raises(ShardError, match=f"{variable}.*out of range"):
        shard_from_environment(3, {variable: "3"})
    with pytest.raises(ShardError, match="not a shard index"):
        shard_from_environment(3, {variable: "x"})


def test_index_variables_and_options() -> None:
    both = {"JOB_COMPLETION_INDEX": "1", "AWS_BATCH_JOB_ARRAY_INDEX": "0"}
    assert shard_from_environment(2, both) == Shard(1, 2)  # Kubernetes' first
    with pytest.raises(ShardError, match="JOB_COMPLETION_INDEX or AWS_BATCH_JOB_ARRAY_INDEX"):
        resolve_shard(None, 2, {})
    with pytest.raises(ShardError, match="not both"):
        resolve_shard("0/2", 2, {})
    # an index variable alone (no --shard-count) does not shard: N is never guessed
    assert resolve_shard(None, None, {"JOB_COMPLETION_INDEX": "1"}) is None
    assert resolve_shard("1/2", None, {}) == Shard(1, 2)


def test_cli_rejects_bad_shards(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from kiln.cli import cli

    monkeypatch.delenv("JOB_COMPLETION_INDEX", raising=False)
    monkeypatch.delenv("AWS_BATCH_JOB_ARRAY_INDEX", raising=False)
    spec = str(tmp_path / "missing.yaml")
    runner = CliRunner()
    result = runner.invoke(cli, ["compile", spec, "--shard", "2/2"])
    assert result.exit_code == 2 and "out of range" in result.output
    result = runner.invoke(cli, ["compile", spec, "--shard-count", "2"])
    assert result.exit_code == 2 and "JOB_COMPLETION_INDEX" in result.output
    result = runner.invoke(cli, ["compile", spec, "--shard-count", "0"])
    assert result.exit_code == 2


# --- the split: properties -----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FakeJob:
    name: str
    direct_key: str


def _key(n: int) -> str:
    return "sha256:" + hashlib.sha256(str(n).encode()).hexdigest()


# Job lists with repeated keys (jobs of two models of one architecture share a direct key).
JOB_LISTS = st.lists(st.integers(0, 40), max_size=60).map(
    lambda ns: [FakeJob(f"job{i}", _key(n)) for i, n in enumerate(ns)]
)


@settings(max_examples=200, deadline=None)
@given(jobs=JOB_LISTS, count=st.integers(1, 9), seed=st.integers(0, 2**32 - 1))
def test_split_partitions_and_ignores_order(jobs: list[FakeJob], count: int, seed: int) -> None:
    shards = [split_jobs(jobs, Shard(i, count)) for i in range(count)]
    # disjoint, and together exactly the plan
    assert sorted(j.name for s in shards for j in s) == sorted(j.name for j in jobs)
    # a direct key is compiled by one shard only
    owners = {j.direct_key: i for i, s in enumerate(shards) for j in s}
    assert all(owners[j.direct_key] == i for i, s in enumerate(shards) for j in s)
    # balanced over distinct keys
    sizes = [len({j.direct_key for j in s}) for s in shards]
    assert max(sizes) - min(sizes) <= 1
    # the order of the plan does not matter
    shuffled = list(jobs)
    random.Random(seed).shuffle(shuffled)
    for i in range(count):
        again = split_jobs(shuffled, Shard(i, count))
        assert {j.name for j in again} == {j.name for j in shards[i]}


def test_assign_is_a_pure_function_of_the_keys() -> None:
    keys = [_key(n) for n in range(10)]
    assert assign(keys, 3) == assign(list(reversed(keys)) + keys, 3)
    assert set(assign(keys, 1).values()) == {0}
    assert sorted(assign(keys, 10).values()) == list(range(10))


# --- the split of real plans of random specs -----------------------------------------------

ARCHS = [
    {"model_type": "bert", "hidden_size": 16, "num_hidden_layers": 1},
    {"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 2},
    {"model_type": "llama", "hidden_size": 32, "num_hidden_layers": 1},
]
MODELS = st.fixed_dictionaries(
    {
        "arch": st.integers(0, len(ARCHS) - 1),
        "causal": st.booleans(),
        "batch": st.lists(st.sampled_from([1, 2, 4]), min_size=1, max_size=2, unique=True),
        "seq": st.lists(st.sampled_from([16, 32, 64, 128]), min_size=1, max_size=3, unique=True),
        "targets": st.lists(st.sampled_from(["cpu", "inf2"]), min_size=1, max_size=2, unique=True),
    }
)


def _spec_data(models: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "models": [
            {
                "name": f"m{i}",
                "task": "causal-lm" if m["causal"] else "encoder",
                "source": {"seed": i, "config": ARCHS[m["arch"]]},
                "buckets": {"batch": m["batch"], "seq": m["seq"]},
                "targets": m["targets"],
            }
            for i, m in enumerate(models)
        ]
    }


@pytest.fixture(scope="module")
def empty_store(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    with Store.open(str(tmp_path_factory.mktemp("shard-plans") / "store")) as store:
        yield store


def _labels(plans: list[Any]) -> set[tuple[str, str, str, str]]:
    return {(j.model, j.graph_kind, j.bucket.label, j.target) for p in plans for j in p.jobs}


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    models=st.lists(MODELS, min_size=1, max_size=4),
    count=st.integers(1, 5),
    seed=st.integers(0, 2**32 - 1),
)
def test_real_plans_split_stably(
    empty_store: Store, models: list[dict[str, Any]], count: int, seed: int
) -> None:
    from pipeline.jobs import plan_spec

    data = _spec_data(models)
    plans = plan_spec(parse_spec(data, "spec.yaml"), empty_store)
    every = _labels(plans)
    shards = [_labels(select_shard(plans, Shard(i, count))) for i in range(count)]
    assert set().union(*shards) == every
    assert sum(len(s) for s in shards) == len(every)
    for i in range(count):  # a shard's plans keep only its own jobs, hits and failures
        for plan in select_shard(plans, Shard(i, count)):
            assert plan.jobs and set(plan.unavailable) <= set(plan.jobs)
    # models (and buckets) in another order: every job stays in its shard
    shuffled = dict(data, models=list(data["models"]))
    rng = random.Random(seed)
    rng.shuffle(shuffled["models"])
    for model in shuffled["models"]:
        model["buckets"] = {k: list(reversed(v)) for k, v in model["buckets"].items()}
    again = plan_spec(parse_spec(shuffled, "spec.yaml"), empty_store)
    assert [_labels(select_shard(again, Shard(i, count))) for i in range(count)] == shards


# --- end to end ----------------------------------------------------------------------------


def test_two_shards_then_final_run_match_a_single_run(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    spec, single = single_run(tmp_path_factory)
    store = tmp_path / "store"
    procs = run_parallel(
        [
            kiln_argv("compile", spec, "--store", store, "--shard", f"{i}/2", "--workers", "1")
            + ["--json"]
            for i in range(2)
        ]
    )
    shards = [json_report(p) for p in procs]
    assert all(item["status"] == "compiled" for r in shards for item in r["items"])
    with pytest.raises(KeyError):  # shards tag nothing
        release(store, "tiny-bert:latest")
    final = compile_json(spec, store, workers=1)
    check_shards_then_final(shards, final)
    assert_same_release(store, single)
    # a shard run again later is all direct hits and still publishes nothing
    again = compile_json(spec, store, "--shard", "1/2", workers=1)
    assert {i["status"] for i in again["items"]} == {"direct-hit"} and not again["releases"]
    unsharded = compile_json(spec, store, "--no-publish", workers=1)
    assert unsharded["jobs"] == 2 and unsharded["releases"] == [] and "shard" not in unsharded
    # more shards than graphs: a shard with nothing to do succeeds
    empty = compile_json(spec, store, "--shard", "7/8", workers=1)
    assert empty["jobs"] == 0 and empty["shard"] == {"index": 7, "count": 8}
