"""What a release must hold before the loader builds a model from it.

A manifest can be valid JSON of the right schema and still not be runnable (imported from
elsewhere, or written by hand): no weights blob, a graph whose signature is empty. These checks
name the release and the manifest field at fault, at load time, instead of a KeyError later.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from artifacts.digest import Digest
from artifacts.manifest import Release
from runtime_loader.errors import BadRelease

PARAMETER_KINDS = ("input", "weight")
# As pipeline/spec.py's GRAPH_KINDS (the loader never imports build-side code).
GRAPH_KINDS = {"encoder": ("encode",), "causal-lm": ("context_encoding", "token_generation")}


def _label(release: Release, digest: Digest) -> str:
    return f"release {release.name}@{digest.short}"


def check_release(release: Release, digest: Digest) -> None:
    """Graphs of the kinds the task needs, a weights blob, and a usable signature per graph."""
    label = _label(release, digest)
    if not release.graphs:
        raise BadRelease(f"{label}: graphs is empty: the release has no compiled graph")
    needed = GRAPH_KINDS.get(release.source.task, GRAPH_KINDS["encoder"])
    kinds = {g.kind for g in release.graphs}
    missing = [k for k in needed if k not in kinds]
    if missing:
        raise BadRelease(
            f"{label}: a {release.source.task} release needs graphs of kind"
            f" {', '.join(missing)}; it has {', '.join(sorted(kinds))}"
        )
    if release.source.task == "causal-lm":
        _check_context_buckets(release, label)
    if not release.source.weights:
        raise BadRelease(
            f"{label}: source.weights is empty: the manifest names no weights blob"
            " (export it again from the store that compiled it)"
        )
    for i, graph in enumerate(release.graphs):
        _check_signature(
            graph.signature, f"{label}: graphs[{i}].signature ({graph.kind} {graph.bucket_label})"
        )


def _check_context_buckets(release: Release, label: str) -> None:
    """Each token_generation bucket needs a context_encoding graph of its batch and at most
    its length to start from."""
    context = {(g.bucket["batch"], g.bucket["seq"]) for g in release.graphs
               if g.kind == "context_encoding"}
    for graph in release.graphs:
        if graph.kind != "token_generation":
            continue
        batch, seq = graph.bucket["batch"], graph.bucket["seq"]
        if not any(b == batch and s <= seq for b, s in context):
            raise BadRelease(
                f"{label}: the token_generation graph {graph.bucket_label} has no"
                f" context_encoding graph of batch {batch} and at most {seq} positions"
            )


def _check_signature(signature: dict[str, Any], where: str) -> None:
    if not signature:
        raise BadRelease(f"{where} is empty: the manifest does not say how to call the graph")
    for key in ("parameters", "inputs", "outputs"):
        value = signature.get(key)
        if not isinstance(value, list) or not value:
            raise BadRelease(f"{where}.{key} is missing or empty")
        for j, entry in enumerate(value):
            if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
                raise BadRelease(f"{where}.{key}[{j}] has no name")
    for j, param in enumerate(signature["parameters"]):
        if param.get("kind") not in PARAMETER_KINDS:
            raise BadRelease(
                f"{where}.parameters[{j}].kind is {param.get('kind')!r}:"
                f" expected one of {', '.join(PARAMETER_KINDS)}"
            )


def check_weights(release: Release, digest: Digest, names: Iterable[str]) -> None:
    """Every weight parameter of every graph is in the loaded weights."""
    have = set(names)
    for i, graph in enumerate(release.graphs):
        for param in graph.signature["parameters"]:
            if param["kind"] == "weight" and param["name"] not in have:
                weights = ", ".join(str(w.digest) for w in release.source.weights)
                raise BadRelease(
                    f"{_label(release, digest)}: graphs[{i}] ({graph.kind}"
                    f" {graph.bucket_label}) takes weight {param['name']!r}, which the"
                    f" weights blob {weights} does not hold"
                )
