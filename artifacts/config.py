"""Where the store and its index live: flags, then environment, then defaults."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

STORE_ENV = "KILN_STORE"
INDEX_ENV = "KILN_INDEX_URL"
CACHE_ENV = "KILN_CACHE_DIR"
INDEX_FILENAME = "index.db"


def user_cache_dir() -> Path:
    """Kiln's folder under the user's cache directory (XDG_CACHE_HOME or ~/.cache)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "kiln"


def resolve_store_url(flag: str | None = None) -> str:
    return flag or os.environ.get(STORE_ENV) or str(user_cache_dir() / "store")


def is_local_url(store_url: str) -> bool:
    return "://" not in store_url or store_url.startswith("file://")


def local_path(store_url: str) -> Path:
    return Path(store_url.removeprefix("file://")).expanduser().absolute()


def resolve_index_url(store_url: str, flag: str | None = None) -> str:
    """SQLite next to a local store; for a remote store, a local SQLite keyed by its URL."""
    explicit = flag or os.environ.get(INDEX_ENV)
    if explicit:
        return explicit
    return default_index_url(store_url)


def default_index_url(store_url: str) -> str:
    """Where a store's index lives when no flag or environment names one."""
    if is_local_url(store_url):
        return f"sqlite:///{local_path(store_url) / INDEX_FILENAME}"
    key = hashlib.sha256(store_url.encode()).hexdigest()[:16]
    return f"sqlite:///{user_cache_dir() / 'indexes' / key / INDEX_FILENAME}"


def env_seconds(
    name: str, default: float, *, positive: bool = False, error: type[Exception] = ValueError
) -> float:
    """A duration in seconds from environment variable `name` (unset or empty: `default`).
    Not a number, negative, or (with `positive`) zero raises `error` naming the variable."""
    raw = os.environ.get(name)
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise error(f"{name}={raw!r} is not a number of seconds") from None
    if value < 0 or (positive and value == 0):
        rule = "must be positive" if positive else "must not be negative"
        raise error(f"{name}={raw!r} {rule}")
    return value
