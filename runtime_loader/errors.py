"""The loader's exception hierarchy; every message says what is missing or wrong and where."""

from __future__ import annotations

from artifacts.errors import KilnError


class LoaderError(KilnError):
    """Root of every error the runtime loader raises on purpose."""


class MissingFromCache(LoaderError):
    """Offline, and the local cache lacks what the release needs."""

    def __init__(self, ref: str, missing: list[str]) -> None:
        self.missing = missing
        listed = ", ".join(missing[:8]) + (
            f" and {len(missing) - 8} more" if len(missing) > 8 else ""
        )
        super().__init__(
            f"offline: the cache lacks {len(missing)} blob(s) that {ref} needs: {listed}"
            " (pull it while online: kiln pull REF)"
        )


class CorruptCachedBlob(LoaderError):
    """Offline, and a cached blob does not match its digest."""


class InputTooLarge(LoaderError, ValueError):
    """An input longer than every compiled bucket."""


class WrongTarget(LoaderError, ValueError):
    """The release was compiled for another target."""


class BadInput(LoaderError, ValueError):
    """Inputs that do not fit the model's signature."""


class BadRelease(LoaderError, ValueError):
    """A release manifest the loader cannot build a model from; names the field at fault."""


class BadExecutable(LoaderError, ValueError):
    """An executable blob that cannot be loaded here; names its digest and graph."""


class CacheFull(LoaderError):
    """The local cache's file system ran out of space while a blob was written."""


class NeffRuntimeError(LoaderError):
    """A libnrt call returned a status other than ``NRT_SUCCESS``."""

    def __init__(self, function: str, status: int, status_name: str, detail: str = "") -> None:
        self.function = function
        self.status = status
        self.status_name = status_name
        where = f" ({detail})" if detail else ""
        super().__init__(f"{function} failed{where}: NRT_STATUS {status} ({status_name})")
