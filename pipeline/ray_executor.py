"""`kiln compile --executor ray`: the same trace and compile tasks as the local pool, run as
Ray tasks. The only module that imports ray.

With RAY_ADDRESS set (e.g. `ray://head:10001` or `head:6379`) the driver joins that
cluster, whose nodes need the same kiln install and access to the store and index (tasks open
them from their URLs); otherwise a local Ray instance with `workers` CPUs is started and
stopped with the run. Each task takes one CPU; a task whose node died is retried once (tasks
are idempotent: content-addressed writes).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from typing import Any

from pipeline.errors import PipelineError

# Forwarded to the cluster's workers (never credentials: nodes bring their own, e.g. an IAM
# role). Workers of a local instance inherit the whole environment anyway.
FORWARDED_VARIABLES = (
    "PJRT_DEVICE",
    "TF_CPP_MIN_LOG_LEVEL",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
)
TASK_RETRIES = 1


def _import_ray() -> Any:
    try:
        import ray  # noqa: PLC0415
    except ImportError as exc:
        raise PipelineError(
            f"--executor ray needs Ray ({exc}): pip install 'kiln[ray]' (or use --executor local)"
        ) from None
    return ray


def forwarded_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The variables of FORWARDED_VARIABLES that are set, for the Ray runtime_env."""
    return {name: environ[name] for name in FORWARDED_VARIABLES if environ.get(name)}


class RayExecutor:
    """The Executor protocol over Ray tasks; futures come from ObjectRef.future()."""

    def __init__(self, workers: int, address: str | None = None) -> None:
        ray = _import_ray()
        self._ray = ray
        self._remotes: dict[Callable[..., Any], Any] = {}
        self._owns = False
        if ray.is_initialized():  # e.g. a caller that set Ray up itself
            return
        address = address or os.environ.get("RAY_ADDRESS") or None
        options: dict[str, Any] = {
            "include_dashboard": False,
            "log_to_driver": False,  # worker output must not mix into `--json` stdout
            "logging_level": logging.WARNING,
            "runtime_env": {"env_vars": forwarded_env(os.environ)},
        }
        try:
            if address:
                ray.init(address=address, **options)
            else:
                ray.init(num_cpus=max(1, workers), **options)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            where = f"the Ray cluster at {address}" if address else "a local Ray instance"
            raise PipelineError(f"cannot start or join {where}: {exc}") from None
        self._owns = True

    def _remote(self, fn: Callable[..., Any]) -> Any:
        remote = self._remotes.get(fn)
        if remote is None:
            remote = self._ray.remote(num_cpus=1, max_retries=TASK_RETRIES)(fn)
            self._remotes[fn] = remote
        return remote

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:  # type: ignore[type-arg]
        """Run `fn(*args)` as a Ray task; a task error is raised by the future's result()."""
        return self._remote(fn).remote(*args).future()

    def shutdown(self) -> None:
        """Disconnect (and stop a local instance this executor started)."""
        if self._owns:
            self._owns = False
            self._ray.shutdown()

    def terminate(self) -> None:
        """Stop now: a local instance's workers stop with it; a cluster keeps running."""
        self.shutdown()
