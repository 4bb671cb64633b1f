"""`kiln compile --executor ray`: the same results as the local pool, from work done in Ray
workers; joining a running cluster through RAY_ADDRESS; a clear error without Ray.

Ray listens on every interface, so each test that starts Ray runs it in a network namespace
of its own (`unshare -n`, loopback only) through a subprocess."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from artifacts.index.models import CompilationRow
from artifacts.store import Store
from pipeline.errors import PipelineError
from pipeline.executors import make_executor
from pipeline.ray_executor import forwarded_env
from tests.helpers.farm_helpers import REF, assert_same_release, kiln_argv, single_run
from tests.helpers.pipeline_helpers import REPO, kiln_env, release


def test_missing_ray_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    with pytest.raises(PipelineError, match=r"pip install 'kiln\[ray\]'"):
        make_executor("ray", 1)


def test_unknown_executor() -> None:
    with pytest.raises(PipelineError, match="choose local or ray"):
        make_executor("dask", 1)


def test_forwarded_env_never_holds_credentials() -> None:
    env = {
        "PJRT_DEVICE": "CPU",
        "AWS_ENDPOINT_URL": "http://127.0.0.1:9000",
        "AWS_SECRET_ACCESS_KEY": "s",
        "KILN_INDEX_URL": "postgresql+psycopg://u:p@h/db",
        "AWS_REGION": "",
    }
    assert forwarded_env(env) == {"PJRT_DEVICE": "CPU", "AWS_ENDPOINT_URL": "http://127.0.0.1:9000"}


# --- Ray for real, in a network namespace --------------------------------------------------


# A network namespace with loopback only, and a PID namespace (with its own /proc) so that
# every Ray process dies with the namespace's first process: nothing outlives a test, and
# nothing outside the namespace is ever signalled.
UNSHARE = ["unshare", "--net", "--pid", "--fork", "--mount", "--mount-proc"]


def _namespaces_work() -> bool:
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return False
    probe = subprocess.run([*UNSHARE, "sh", "-c", "ip link set lo up"], capture_output=True)
    return probe.returncode == 0


needs_ray = pytest.mark.skipif(
    not _namespaces_work(), reason="needs `unshare` (root) to keep Ray off the network"
)


@pytest.fixture
def ray_env() -> Iterator[dict[str, str]]:
    """kiln's test environment for Ray, with a short private RAY_TMPDIR (Ray's socket paths
    must stay under 108 bytes)."""
    tmp = tempfile.mkdtemp(prefix="kr", dir="/tmp")
    env = kiln_env()
    env.pop("RAY_ADDRESS", None)
    env.update(RAY_AUTH_MODE="disabled", RAY_TMPDIR=tmp, RAY_USAGE_STATS_ENABLED="0")
    yield env
    shutil.rmtree(tmp, ignore_errors=True)


def in_namespace(
    argv: list[str], env: dict[str, str], timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """Run argv in new network and PID namespaces (loopback only; see UNSHARE)."""
    return subprocess.run(
        [*UNSHARE, "sh", "-c", 'ip link set lo up && "$@"', "sh", *argv],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _ray_worker_pids(ray_tmp: str) -> set[int]:
    logs = Path(ray_tmp).glob("ray/session_*/logs/python-core-worker-*_*.log")
    return {int(re.search(r"_(\d+)\.log$", p.name)[1]) for p in logs}  # type: ignore[index]


def _compile_pids(store: Path) -> set[int]:
    with Store.open(str(store)) as s, s.engine.connect() as conn:
        rows = conn.execute(select(CompilationRow.provenance)).scalars().all()
    return {json.loads(r)["pid"] for r in rows}


@needs_ray
def test_ray_run_matches_local_run(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, ray_env: dict[str, str]
) -> None:
    spec, single = single_run(tmp_path_factory)
    store = tmp_path / "store"
    proc = in_namespace(
        kiln_argv("compile", spec, "--store", store, "--executor", "ray", "--workers", "2")
        + ["--json"],
        ray_env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)  # Ray's own output stays out of stdout
    assert report["compiled"] == 2 and report["failed"] == 0
    assert [r["ref"] for r in report["releases"]] == [REF]
    # the compiles ran in Ray workers of that run
    pids = _compile_pids(store)
    assert pids and pids <= _ray_worker_pids(ray_env["RAY_TMPDIR"])
    assert_same_release(store, single)
    # and the same spec compiled by the local pool now finds everything Ray compiled
    _, before = release(store, REF)
    again = subprocess.run(
        kiln_argv("compile", spec, "--store", store, "--workers", "1", "--json"),
        cwd=REPO,
        env=kiln_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert {i["status"] for i in json.loads(again.stdout)["items"]} == {"direct-hit"}


CLUSTER_CLIENT = textwrap.dedent(
    """
    import json, os, sys
    from pipeline.executors import make_executor

    def where():
        return os.getpid(), os.environ.get("PJRT_DEVICE")

    def fail():
        raise ValueError("boom in a task")

    ex = make_executor("ray", 1)
    pid, device = ex.submit(where).result(timeout=120)
    try:
        ex.submit(fail).result(timeout=120)
        error = None
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
    ex.shutdown()
    print(json.dumps({"pid": pid, "me": os.getpid(), "device": device, "error": error}))
    """
)


@needs_ray
def test_ray_address_joins_a_running_cluster(ray_env: dict[str, str]) -> None:
    """A head started by `ray start` (without PJRT_DEVICE in its environment); the driver
    joins it through RAY_ADDRESS and forwards PJRT_DEVICE to the workers."""
    ray = str(Path(sys.executable).parent / "ray")
    head_env = {k: v for k, v in ray_env.items() if k != "PJRT_DEVICE"}
    script = (
        f"{ray} start --head --port=6391 --num-cpus=1 --include-dashboard=false"
        " --disable-usage-stats > /dev/null"
        f' && RAY_ADDRESS=127.0.0.1:6391 PJRT_DEVICE=forwarded {sys.executable} -c "$1"'
    )  # the head dies with the namespace
    proc = in_namespace(["sh", "-c", script, "sh", CLUSTER_CLIENT], head_env, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["pid"] != result["me"]
    assert result["device"] == "forwarded"
    assert "boom in a task" in result["error"]


def test_ray_never_imported_by_the_local_path() -> None:
    code = (
        "import sys; from pipeline.executors import make_executor;"
        " make_executor('local', 1).shutdown(); assert 'ray' not in sys.modules"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=kiln_env(), capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
