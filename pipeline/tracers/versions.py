"""Versions read from package metadata (nothing is imported): the tracing libraries' are part
of every direct key, so a torch or transformers upgrade gives new keys; Kiln's own is in every
release's provenance and every no-op record's key."""

from __future__ import annotations

import importlib.metadata
from functools import lru_cache

TRACER_PACKAGES = ("torch", "torch-xla", "transformers")


@lru_cache(maxsize=1)
def tracer_versions() -> dict[str, str]:
    """Versions of the tracing libraries, read from package metadata (no import)."""
    out = {}
    for package in TRACER_PACKAGES:
        try:
            out[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            out[package] = "missing"
    return out


def kiln_version() -> str:
    return importlib.metadata.version("kiln")
