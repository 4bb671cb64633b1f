"""The store's exceptions: each names the digest, path, field or reference at fault."""

from __future__ import annotations


class KilnError(Exception):
    """Root of every error Kiln raises on purpose: the CLI prints these as one line.

    It lives here, at the bottom layer, because pipeline/ and runtime_loader/ both import
    artifacts/ already; each package's own root subclasses it."""


class ArtifactError(KilnError):
    """Root of every error raised by the artifact store."""


class InvalidDigest(ArtifactError, ValueError):
    """A string that is not a valid `sha256:<hex>` digest."""


class BlobNotFound(ArtifactError, KeyError):
    """The store has no blob with this digest."""

    def __init__(self, digest: object, where: str = "") -> None:
        self.digest = str(digest)
        suffix = f" in {where}" if where else ""
        super().__init__(f"blob {self.digest} not found{suffix}")

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class BlobCorrupted(ArtifactError):
    """Bytes read back do not hash to the digest they are stored under."""

    def __init__(self, digest: object, actual: object, path: str) -> None:
        self.digest = str(digest)
        self.actual = str(actual)
        self.path = path
        super().__init__(
            f"blob {self.digest} is corrupted: content at {path} hashes to {self.actual}"
            " (run `kiln verify`; re-push or restore the blob)"
        )


class SizeMismatch(ArtifactError):
    """A blob's bytes are not as long as declared."""


class InvalidManifest(ArtifactError, ValueError):
    """A release manifest failed validation; the message names the field."""


class InvalidReference(ArtifactError, ValueError):
    """A reference string that cannot be parsed."""


class ReferenceNotFound(ArtifactError, KeyError):
    """A well-formed reference that matches nothing in the store."""

    def __init__(self, message: str) -> None:
        super().__init__(message)

    def __str__(self) -> str:
        return str(self.args[0])


class AmbiguousReference(ArtifactError, ValueError):
    """A digest prefix that matches more than one manifest."""


class StoreConfigError(ArtifactError, ValueError):
    """A store URL or index URL that cannot be used."""


class StoreIndexError(ArtifactError):
    """The SQL index is unreadable, corrupt or from a newer Kiln."""


class ArchiveError(ArtifactError):
    """An export archive that is malformed or unsafe to import."""


class ReindexRefused(ArtifactError):
    """`kiln reindex` found documents it cannot read; it left the index as it was."""


class DiskFull(ArtifactError):
    """A write failed because a filesystem (or quota) is full; the message names it."""


class NoSpace(DiskFull):
    """A blob write ran out of disk space (or quota); the message names the folder."""


class IndexRequired(ArtifactError):
    """An operation that needs the SQL index (stats, gc, leases, writes) on a store opened
    without one: reads of releases and tags never need it."""

class NeffError(ArtifactError):
    """Bytes that are not a consistent NEFF (truncated, wrong header size, size mismatch)."""

class IndexLocked(StoreIndexError):
    """The index's write lock stayed held by another process for the whole lock timeout."""


class S3Error(ArtifactError):
    """An S3 request failed; the message names the bucket and key."""


class S3BucketNotFound(S3Error, StoreConfigError):
    """The store URL's bucket does not exist at the endpoint."""


class S3AccessDenied(S3Error, StoreConfigError):
    """The credentials are missing or not allowed to do this."""


class S3Unreachable(S3Error, ConnectionError):
    """The endpoint could not be reached, or dropped the connection, after retries."""
