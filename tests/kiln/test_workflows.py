"""The scheduled compile-farm definitions: each file is checked by a real validator (no
network: schemas ship inside installed packages), then the exact commands it runs are taken
from it and run against a local store, 2 shards at once and then the final run:

- .github/workflows/kiln-compile.yml: check-jsonschema's vendored GitHub workflow schema;
  the plan, shard and release steps' scripts run with bash, their `${{ }}` expressions
  filled in as GitHub would for a 2-shard dispatch.
- workflows/kubernetes/cronjob.yaml: kubernetes-validate (strict); the containers' commands
  run with the environment Kubernetes gives them (JOB_COMPLETION_INDEX for the Indexed Job).
- workflows/aws-batch/: botocore's parameter validator with the Batch service model, and
  submit.sh run through the real AWS CLI with only the HTTP call answered locally
  (tests/servers/aws_capture.py); the submitted jobs' commands then run with
  AWS_BATCH_JOB_ARRAY_INDEX.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline.spec import load_spec
from tests.helpers.farm_helpers import (
    assert_same_release,
    check_shards_then_final,
    json_report,
    run_parallel,
    single_run,
)
from tests.helpers.pipeline_helpers import REPO, kiln_env

GITHUB = REPO / ".github" / "workflows" / "kiln-compile.yml"
KUBERNETES = REPO / "workflows" / "kubernetes" / "cronjob.yaml"
BATCH_DEFINITION = REPO / "workflows" / "aws-batch" / "job-definition.json"
BATCH_SUBMIT = REPO / "workflows" / "aws-batch" / "submit.sh"
BIN = Path(sys.executable).parent  # where `kiln` (the console script) is installed
SHARDS = 2


def farm_env(store: Path, **extra: str) -> dict[str, str]:
    """A machine of the farm: kiln on PATH, the store from KILN_STORE."""
    env = kiln_env()
    for name in ("JOB_COMPLETION_INDEX", "AWS_BATCH_JOB_ARRAY_INDEX", "KILN_INDEX_URL"):
        env.pop(name, None)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["KILN_STORE"] = str(store)
    env.update(extra)
    return env


def container_argv(command: list[str]) -> list[str]:
    """A container's command as run here: `kiln` is this environment's console script."""
    assert command[0] == "kiln", command
    assert (BIN / "kiln").exists(), "the kiln console script is not installed (pip install -e .)"
    return [str(BIN / "kiln"), *command[1:]]


def replace_value(argv: list[str], option: str, value: str) -> list[str]:
    """argv with the value after `option` replaced (the option must be there)."""
    i = argv.index(option)
    return [*argv[: i + 1], value, *argv[i + 2 :]]


# --- GitHub Actions ------------------------------------------------------------------------


def github_workflow() -> dict[str, Any]:
    data = yaml.safe_load(GITHUB.read_text())
    data["on"] = data.pop(True, data.get("on"))  # YAML 1.1 reads the key `on` as true
    return data


def github_step(workflow: dict[str, Any], job: str, name: str) -> dict[str, Any]:
    (step,) = [s for s in workflow["jobs"][job]["steps"] if s.get("name") == name]
    return step


EXPRESSION = re.compile(r"\$\{\{\s*(.*?)\s*\}\}")


def github_expand(text: str, context: dict[str, str]) -> str:
    """Fill `${{ a || b || 'literal' }}` expressions from `context` (a missing name is empty,
    as in GitHub); any other kind of expression fails the test."""

    def value(match: re.Match[str]) -> str:
        for term in match[1].split("||"):
            term = term.strip()
            if re.fullmatch(r"'[^']*'", term):
                got = term[1:-1]
            else:
                assert re.fullmatch(r"[A-Za-z_][\w.-]*", term), f"unexpected expression {term}"
                got = context.get(term, "")
            if got:
                return got
        return ""

    return EXPRESSION.sub(value, text)


def github_run(
    step: dict[str, Any], context: dict[str, str], env: dict[str, str], cwd: Path
) -> subprocess.CompletedProcess[str]:
    """Run a `run:` step as the runner does (`bash -e`), with its expressions filled in."""
    script = github_expand(step["run"], context)
    step_env = {k: github_expand(str(v), context) for k, v in step.get("env", {}).items()}
    cwd.mkdir(parents=True, exist_ok=True)
    return subprocess.run(
        ["bash", "-e", "-c", script],
        cwd=cwd,
        env={**env, **step_env},
        capture_output=True,
        text=True,
        timeout=300,
    )


def check_jsonschema(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.github-workflows"]
        + [str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_github_workflow_is_valid_and_scheduled_only(tmp_path: Path) -> None:
    proc = check_jsonschema(GITHUB)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    broken = tmp_path / "broken.yml"  # the validator does reject a bad workflow
    broken.write_text(GITHUB.read_text().replace("timeout-minutes: 340", "timeout-minutes: soon"))
    assert check_jsonschema(broken).returncode == 1
    workflow = github_workflow()
    # never on push or pull requests: it cannot get in the way of this repository's CI
    assert set(workflow["on"]) == {"schedule", "workflow_dispatch"}
    jobs = workflow["jobs"]
    assert jobs["shard"]["needs"] == "plan"
    assert (
        jobs["shard"]["strategy"]["matrix"]["shard"] == "${{ fromJSON(needs.plan.outputs.shards) }}"
    )
    assert set(jobs["release"]["needs"]) == {"plan", "shard"}
    for job in ("shard", "release"):
        assert jobs[job]["if"] == "needs.plan.outputs.enabled == 'true'"
    env = workflow["env"]
    for name in ("KILN_STORE", "KILN_INDEX_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert env[name] == f"${{{{ secrets.{name} }}}}"


def test_github_workflow_without_store_secret_does_nothing(tmp_path: Path) -> None:
    plan = github_step(github_workflow(), "plan", "Shards")
    out = tmp_path / "output"
    proc = github_run(plan, {}, farm_env(tmp_path, KILN_STORE="", GITHUB_OUTPUT=str(out)), tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert out.read_text().split() == ["enabled=false"]
    # a store without a shared index would leave each shard's records on its own runner
    proc = github_run(plan, {}, farm_env(tmp_path, KILN_INDEX_URL=""), tmp_path)
    assert proc.returncode == 1 and "KILN_INDEX_URL" in proc.stdout


def test_github_workflow_runs(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    spec, single = single_run(tmp_path_factory)
    store = tmp_path / "store"
    workflow = github_workflow()
    context = {"inputs.spec": str(spec), "inputs.shards": str(SHARDS)}
    context["secrets.KILN_STORE"] = str(store)
    context["secrets.KILN_INDEX_URL"] = f"sqlite:///{store}/index.db"
    env = farm_env(store, **{k: github_expand(v, context) for k, v in workflow["env"].items()})
    assert env["SPEC"] == str(spec) and env["KILN_STORE"] == str(store)

    # plan: the shard list for the matrix
    out = tmp_path / "plan-output"
    proc = github_run(
        github_step(workflow, "plan", "Shards"),
        context,
        {**env, "GITHUB_OUTPUT": str(out)},
        tmp_path / "plan",
    )
    assert proc.returncode == 0, proc.stderr
    outputs = dict(line.split("=", 1) for line in out.read_text().split())
    assert outputs["enabled"] == "true" and outputs["count"] == str(SHARDS)
    matrix = json.loads(outputs["shards"])
    assert matrix == list(range(SHARDS))
    context.update({f"needs.plan.outputs.{k}": v for k, v in outputs.items()})

    # one job per matrix entry, all at once
    step = github_step(workflow, "shard", "Compile shard ${{ matrix.shard }}")
    assert "--no-publish" in step["run"] and "--shard" in step["run"]
    scripts = [github_expand(step["run"], {**context, "matrix.shard": str(i)}) for i in matrix]
    dirs = [tmp_path / f"shard-{i}" for i in matrix]
    for d in dirs:
        d.mkdir()
    procs = [
        subprocess.Popen(["bash", "-e", "-c", s], cwd=d, env=env, stderr=subprocess.PIPE)
        for s, d in zip(scripts, dirs, strict=True)
    ]
    for proc_ in procs:
        _, err = proc_.communicate(timeout=300)
        assert proc_.returncode == 0, err[-3000:]
    shards = [json.loads((d / "shard.json").read_text()) for d in dirs]

    # the release job
    step = github_step(workflow, "release", "Tag releases")
    assert "--shard" not in step["run"]
    proc = github_run(step, context, env, tmp_path / "release")
    assert proc.returncode == 0, proc.stderr[-3000:]
    final = json.loads((tmp_path / "release" / "release.json").read_text())
    check_shards_then_final(shards, final)
    assert_same_release(store, single)


# --- Kubernetes ----------------------------------------------------------------------------


def kubernetes_docs() -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in yaml.safe_load_all(KUBERNETES.read_text())}


def container(doc: dict[str, Any]) -> dict[str, Any]:
    (only,) = doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    return only


def test_kubernetes_manifests_are_valid(tmp_path: Path) -> None:
    import kubernetes_validate

    docs = kubernetes_docs()
    assert set(docs) == {"kiln-spec", "kiln-compile-shards", "kiln-compile-release"}
    for doc in docs.values():
        for version in ("1.33.0", kubernetes_validate.latest_version()):
            kubernetes_validate.validate(doc, version, strict=True)
    broken = json.loads(json.dumps(docs["kiln-compile-shards"]))
    broken["spec"]["jobTemplate"]["spec"]["completions"] = "four"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, "1.33.0", strict=True)

    job = docs["kiln-compile-shards"]["spec"]["jobTemplate"]["spec"]
    command = container(docs["kiln-compile-shards"])["command"]
    assert job["completionMode"] == "Indexed"
    count = int(command[command.index("--shard-count") + 1])
    assert job["completions"] == job["parallelism"] == count
    assert "--no-publish" in command
    release = container(docs["kiln-compile-release"])["command"]
    assert not {"--shard", "--shard-count", "--no-publish"} & set(release)
    # the release runs after the shards' deadline
    start = int(docs["kiln-compile-shards"]["spec"]["schedule"].split()[1])
    end = start + job["activeDeadlineSeconds"] / 3600
    assert int(docs["kiln-compile-release"]["spec"]["schedule"].split()[1]) >= end
    # the spec in the ConfigMap is a valid Kiln spec, mounted where the commands read it
    (tmp_path / "spec.yaml").write_text(docs["kiln-spec"]["data"]["spec.yaml"])
    assert load_spec(tmp_path / "spec.yaml").models
    for name in ("kiln-compile-shards", "kiln-compile-release"):
        (mount,) = container(docs[name])["volumeMounts"]
        assert container(docs[name])["command"][2] == f"{mount['mountPath']}/spec.yaml"


def test_kubernetes_jobs_run(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    spec, single = single_run(tmp_path_factory)
    store = tmp_path / "store"
    docs = kubernetes_docs()

    def pod(name: str, **env: str) -> tuple[list[str], dict[str, str]]:
        spec_container = container(docs[name])
        argv = container_argv(spec_container["command"])
        argv[2] = str(spec)  # the mounted ConfigMap
        values = {e["name"]: e["value"] for e in spec_container.get("env", [])}
        return argv, farm_env(store, **values, **env)  # envFrom the Secret: KILN_STORE

    pods = [pod("kiln-compile-shards", JOB_COMPLETION_INDEX=str(i)) for i in range(SHARDS)]
    procs = run_parallel(
        [replace_value(argv, "--shard-count", str(SHARDS)) for argv, _ in pods],
        [env for _, env in pods],
    )
    shards = [json_report(p) for p in procs]
    argv, env = pod("kiln-compile-release")
    final = json_report(subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300))
    check_shards_then_final(shards, final)
    assert_same_release(store, single)


# --- AWS Batch -----------------------------------------------------------------------------


def batch_model() -> Any:
    import botocore.session

    return botocore.session.get_session().get_service_model("batch")


def validate_batch(operation: str, params: dict[str, Any]) -> None:
    from botocore.validate import validate_parameters

    validate_parameters(params, batch_model().operation_model(operation).input_shape)


def test_batch_job_definition_is_valid() -> None:
    from botocore.exceptions import ParamValidationError

    definition = json.loads(BATCH_DEFINITION.read_text())
    validate_batch("RegisterJobDefinition", definition)
    broken = json.loads(BATCH_DEFINITION.read_text())
    broken["containerProperties"]["command"] = "kiln compile"
    with pytest.raises(ParamValidationError):
        validate_batch("RegisterJobDefinition", broken)
    command = definition["containerProperties"]["command"]
    refs = {c.removeprefix("Ref::") for c in command if c.startswith("Ref::")}
    assert refs == set(definition["parameters"])  # every placeholder has a default
    assert command[command.index("--shard-count") + 1] == "Ref::shards"
    assert "--no-publish" in command


def submit(
    tmp_path: Path, store: Path, *args: str
) -> tuple[subprocess.CompletedProcess[str], list[dict[str, Any]]]:
    """Run submit.sh with the real AWS CLI, answered locally (tests/servers/aws_capture.py)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    aws = bin_dir / "aws"
    capture = REPO / "tests" / "servers" / "aws_capture.py"
    aws.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{capture}" "$@"\n')
    aws.chmod(0o755)
    capture = tmp_path / "calls.jsonl"
    capture.unlink(missing_ok=True)
    env = {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        "HOME": str(tmp_path),
        "PYTHONPATH": str(REPO),
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CONFIG_FILE": str(tmp_path / "no-aws-config"),
        "KILN_AWS_CAPTURE": str(capture),
        "KILN_JOB_QUEUE": "kiln-compile-queue",
        "KILN_STORE": str(store),
    }
    proc = subprocess.run(
        ["bash", str(BATCH_SUBMIT), *args], env=env, capture_output=True, text=True, timeout=120
    )
    calls = (
        [json.loads(line) for line in capture.read_text().splitlines()] if capture.exists() else []
    )
    return proc, calls


def test_batch_submit_rejects_bad_arguments(tmp_path: Path) -> None:
    proc, calls = submit(tmp_path, tmp_path / "store", "/spec.yaml", "1")
    assert proc.returncode == 2 and "2 to 10000" in proc.stderr and not calls
    proc, calls = submit(tmp_path, tmp_path / "store", "/spec.yaml")
    assert proc.returncode != 0 and "usage" in proc.stderr and not calls


def test_batch_jobs_run(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    spec, single = single_run(tmp_path_factory)
    store = tmp_path / "store"
    proc, calls = submit(tmp_path, store, str(spec), str(SHARDS))
    assert proc.returncode == 0, proc.stderr
    assert [c["operation"] for c in calls] == ["RegisterJobDefinition", "SubmitJob", "SubmitJob"]
    for call in calls:
        validate_batch(call["operation"], call["params"])
    definition, array, release_job = (c["params"] for c in calls)
    assert definition == json.loads(BATCH_DEFINITION.read_text())
    assert array["arrayProperties"] == {"size": SHARDS} and "dependsOn" not in array
    array_id = re.search(r"array job (\S+):", proc.stdout)[1]  # type: ignore[index]
    assert release_job["dependsOn"] == [{"jobId": array_id}]
    assert "arrayProperties" not in release_job

    def job(params: dict[str, Any], **env: str) -> tuple[list[str], dict[str, str]]:
        """What a Batch container of this submitted job runs: overrides over the definition,
        Ref::NAME placeholders from the parameters."""
        props = definition["containerProperties"]
        overrides = params.get("containerOverrides", {})
        values = {**definition["parameters"], **params.get("parameters", {})}
        command = [
            values[c.removeprefix("Ref::")] if c.startswith("Ref::") else c
            for c in overrides.get("command", props["command"])
        ]
        variables = {e["name"]: e["value"] for e in props["environment"]}
        variables.update({e["name"]: e["value"] for e in overrides.get("environment", [])})
        return container_argv(command), farm_env(store, **variables, **env)

    children = [job(array, AWS_BATCH_JOB_ARRAY_INDEX=str(i)) for i in range(SHARDS)]
    assert all(env["KILN_STORE"] == str(store) for _, env in children)
    shards = [json_report(p) for p in run_parallel(*zip(*children, strict=True))]
    argv, env = job(release_job)
    final = json_report(subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300))
    check_shards_then_final(shards, final)
    assert_same_release(store, single)
