"""Opening the index for a reader: never create, migrate into or write a file it should not.

A read command or the loader calls `open_for_reading`. It returns an engine, or None with the
reason when there is no usable index; the Store then reads from the blobs and ref objects
alone (artifacts/tagrefs.py). Rules:

- a SQLite file that does not exist, or is empty, is not created or initialised;
- a file that is not a SQLite database, or a SQLite database without Kiln's schema, is
  refused in one line and left untouched;
- a SQLite index the process cannot write (a read-only mount, a folder or file without
  write permission) is opened read-only (`mode=ro`; `immutable=1` when SQLite cannot even
  share its WAL index there), with writes refused by `PRAGMA query_only`;
- a writable index is opened as writers open it (a due migration runs);
- a server index (PostgreSQL) that cannot be reached is reported, not fatal.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from urllib.parse import quote

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.exc import DatabaseError, OperationalError, SQLAlchemyError

from artifacts.errors import StoreConfigError, StoreIndexError
from artifacts.index.db import (
    HEAD_REVISION,
    KNOWN_REVISIONS,
    SQLITE_BUSY_TIMEOUT_S,
    _short,
    current_revision,
    display_url,
    ensure_schema,
    make_engine,
    sqlite_path,
    unreadable_index,
)

SQLITE_MAGIC = b"SQLite format 3\x00"
log = logging.getLogger("kiln")


def is_sqlite_file(path: Path) -> bool:
    """Whether `path` starts with SQLite's file header."""
    try:
        with open(path, "rb") as f:
            return f.read(len(SQLITE_MAGIC)) == SQLITE_MAGIC
    except OSError:
        return False


def kiln_revision(path: Path) -> str | None:
    """The Kiln schema revision of a SQLite file, read without writing anything; None when it
    is an empty database. StoreIndexError when it is not a Kiln index."""
    if path.stat().st_size == 0:
        return None
    if not is_sqlite_file(path):
        raise StoreIndexError(f"index {path} is not a Kiln index (not a SQLite database)")
    engine = _readonly_engine(path, immutable=False)
    try:
        try:
            return _revision(engine, path)
        except OperationalError:
            engine.dispose()
            engine = _readonly_engine(path, immutable=True)
            return _revision(engine, path)
    finally:
        engine.dispose()


def refuse_foreign(path: Path) -> None:
    """StoreIndexError unless `path` is missing, empty, or a (possibly corrupt) SQLite file
    that is not someone else's database: `kiln reindex` replaces only what may be Kiln's."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    try:
        kiln_revision(path)
    except StoreIndexError as exc:
        if "is not a Kiln index" in str(exc):
            raise StoreIndexError(
                f"{exc}; refusing to replace it: pass --index with a Kiln index or a new path"
            ) from None


def _revision(engine: Engine, path: Path) -> str | None:
    try:
        with engine.connect() as conn:
            has_tables = _has_tables(conn)
            revision = current_revision(conn) if has_tables else None
            if revision is None and has_tables:
                raise StoreIndexError(
                    f"index {path} is not a Kiln index (a SQLite database without Kiln's schema)"
                )
            return revision
    except OperationalError:
        raise
    except DatabaseError as exc:
        raise unreadable_index(str(path), exc) from None


def _has_tables(conn: Connection) -> bool:
    return conn.exec_driver_sql("SELECT count(*) FROM sqlite_master").scalar_one() > 0


def writable(path: Path) -> bool:
    """Whether this process may write `path` and create files beside it (WAL needs both)."""
    return os.access(path, os.W_OK) and os.access(path.parent, os.W_OK | os.X_OK)


def open_for_reading(url: str) -> tuple[Engine | None, str]:
    """(engine, "") for a usable index, or (None, why not) when the reader goes without."""
    path = sqlite_path(url)
    if path is None:
        if url.startswith("sqlite"):
            return None, f"index {url} is not a file"
        return _open_server(url)
    path = path.absolute()
    if not path.exists():
        return None, f"there is no index at {path}"
    if not path.is_file():
        raise StoreConfigError(f"index {path} is not a file")
    revision = kiln_revision(path)
    if revision is None:
        return None, f"the index {path} is empty"
    if revision not in KNOWN_REVISIONS:
        raise StoreIndexError(
            f"index {path} has schema revision {revision}, newer than this Kiln supports"
            f" ({HEAD_REVISION}); upgrade kiln"
        )
    if writable(path):
        engine = make_engine(f"sqlite:///{path}")
        ensure_schema(engine, str(path))
        return engine, ""
    if revision != HEAD_REVISION:
        return None, f"the read-only index {path} is at an older schema ({revision})"
    engine = _readonly_engine(path, immutable=False)
    try:
        with engine.connect() as conn:
            _has_tables(conn)  # raises where SQLite cannot share the WAL index read-only
    except OperationalError:
        engine.dispose()
        engine = _readonly_engine(path, immutable=True)
    return engine, ""


def _readonly_engine(path: Path, immutable: bool) -> Engine:
    mode = "immutable=1" if immutable else "mode=ro"
    url = f"sqlite:///file:{quote(str(path))}?{mode}&uri=true"
    engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record) -> None:  # type: ignore[no-untyped-def]
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA query_only=1")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        conn.exec_driver_sql("BEGIN DEFERRED")

    return engine


def _open_server(url: str) -> tuple[Engine | None, str]:
    try:
        engine = make_engine(url)
        ensure_schema(engine, url)
    except StoreConfigError:
        raise
    except (StoreIndexError, SQLAlchemyError) as exc:
        if isinstance(exc, StoreIndexError) and "newer than this Kiln" in str(exc):
            raise
        why = f"index {display_url(url)} is unreachable ({_short(exc)})"
        log.warning("kiln: warning: %s; reading the store alone", why)
        return None, why
    return engine, ""
