"""Opening the index: engine set-up, schema check and migrations, write transactions."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.exc import DatabaseError, OperationalError, SQLAlchemyError

from artifacts.errors import StoreConfigError, StoreIndexError
from artifacts.index.lockwait import begin_immediate
from artifacts.redact import redact_text, redact_url

HEAD_REVISION = "0004"
KNOWN_REVISIONS = ("0001", "0002", "0003", "0004")
# PostgreSQL advisory lock (two-key form, apart from the one-key locks of `ops.lock_key`)
# that stands in for SQLite's single writer: writers share it, gc's sweep and reindex
# take it alone.
STORE_LOCK = (7312, 0)
SQLITE_BUSY_TIMEOUT_S = 120


def sqlite_path(url: str) -> Path | None:
    """The file of a SQLite index URL; None for a server or an in-memory index."""
    if not url.startswith("sqlite:///"):
        return None
    rest = url.removeprefix("sqlite:///")
    return None if rest in ("", ":memory:") else Path(rest)


def make_engine(url: str) -> Engine:
    """An engine for `url`; SQLite gets WAL, a busy timeout and BEGIN IMMEDIATE for writes."""
    try:
        if url.startswith("sqlite"):
            path = sqlite_path(url)
            if path is not None:
                try:
                    path.parent.mkdir(parents=True, exist_ok=True)
                except OSError as exc:
                    raise StoreConfigError(
                        f"index {path}: cannot create folder: {exc.strerror}"
                    ) from None
            engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S})
            _configure_sqlite(engine, path)
            return engine
        return create_engine(url, pool_pre_ping=True)
    except (ImportError, SQLAlchemyError, ValueError) as exc:
        if isinstance(exc, StoreConfigError):
            raise
        raise StoreConfigError(
            f"cannot use index URL {redact_url(url)!r}: {redact_text(str(exc))}"
        ) from None


def _configure_sqlite(engine: Engine, path: Path | None) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record) -> None:  # type: ignore[no-untyped-def]
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        _enable_wal(cursor)
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        if not conn.get_execution_options().get("kiln_write"):
            conn.exec_driver_sql("BEGIN DEFERRED")
        elif path is None:
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        else:
            begin_immediate(conn, path, SQLITE_BUSY_TIMEOUT_S)


def _enable_wal(cursor) -> None:  # type: ignore[no-untyped-def]
    """WAL persists in the file; switching needs a moment alone with a new file, and SQLite
    answers "locked" at once (no busy wait) when other processes open it at the same time."""
    if str(cursor.execute("PRAGMA journal_mode").fetchone()[0]).lower() == "wal":
        return
    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_S
    while True:
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except Exception as exc:  # sqlite3.OperationalError; the driver is not imported here
            if not _is_locked(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _is_locked(exc: BaseException) -> bool:
    text_ = str(getattr(exc, "orig", None) or exc).lower()
    return "database is locked" in text_ or "database table is locked" in text_


def current_revision(conn: Connection) -> str | None:
    try:
        row = conn.execute(text("SELECT version_num FROM alembic_version")).first()
    except (OperationalError, DatabaseError) as exc:
        if "alembic_version" in str(exc) or "does not exist" in str(exc):
            conn.rollback()
            return None
        raise
    return row[0] if row else None


def ensure_schema(engine: Engine, url: str) -> None:
    """Create or migrate the schema; refuse a corrupt index or one from a newer Kiln."""
    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_S
    while True:
        try:
            return _ensure_schema(engine, url)
        except OperationalError as exc:
            # SQLite skips its busy wait in some lock upgrades: wait here instead.
            if not _is_locked(exc) or time.monotonic() > deadline:
                raise StoreIndexError(f"index {display_url(url)}: {_short(exc)}") from None
            time.sleep(0.1)


def _ensure_schema(engine: Engine, url: str) -> None:
    try:
        with engine.connect() as conn:
            revision = current_revision(conn)
            conn.rollback()
        if revision == HEAD_REVISION:
            return
        if revision is not None and revision not in KNOWN_REVISIONS:
            raise StoreIndexError(
                f"index {display_url(url)} has schema revision {revision}, newer than this Kiln"
                f" supports ({HEAD_REVISION}); upgrade kiln"
            )
        upgrade(engine)
    except (StoreIndexError, OperationalError):
        raise
    except DatabaseError as exc:
        raise unreadable_index(display_url(url), exc) from None


def unreadable_index(where: str, exc: BaseException) -> StoreIndexError:
    return StoreIndexError(
        f"index {where} is unreadable or corrupt ({_short(exc)}); rebuild it with `kiln reindex`"
    )


def upgrade(engine: Engine) -> None:
    from alembic import command  # noqa: PLC0415 - alembic only when a migration is due
    from alembic.config import Config  # noqa: PLC0415

    config = Config()
    config.set_main_option("script_location", str(Path(__file__).parent.parent / "migrations"))
    with engine.connect().execution_options(kiln_write=True) as conn:
        # Take the write lock before alembic reads the current revision, and keep every
        # migration in this one transaction: concurrent first opens then run them once.
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(7311)"))
        else:
            conn.execute(text("SELECT 1"))  # BEGIN IMMEDIATE on SQLite
        config.attributes["connection"] = conn
        command.upgrade(config, "head")
        conn.commit()


@contextlib.contextmanager
def write_transaction(engine: Engine, exclusive: bool = False) -> Iterator[Connection]:
    """A transaction that holds the write lock from its start (serialises tag moves).

    SQLite has one writer at a time (BEGIN IMMEDIATE). On PostgreSQL every writer holds the
    store lock shared and an `exclusive` one (gc's sweep, reindex) holds it alone, so both
    index kinds give the same barrier: a writer's transaction is wholly before or after it.
    """
    with engine.connect().execution_options(kiln_write=True) as conn:
        with conn.begin():
            if conn.dialect.name == "postgresql":
                function = "pg_advisory_xact_lock" if exclusive else "pg_advisory_xact_lock_shared"
                key, sub = STORE_LOCK
                conn.execute(text(f"SELECT {function}(:key, :sub)"), {"key": key, "sub": sub})
            yield conn


def sqlite_sound(engine: Engine) -> bool:
    """False for a SQLite file whose pages are garbled (it opens, but a rebuild in place
    would fail half-way); True for a sound one and for a server index."""
    if engine.dialect.name != "sqlite":
        return True
    try:
        with engine.connect() as conn:
            return conn.exec_driver_sql("PRAGMA quick_check(1)").scalar() == "ok"
    except DatabaseError:
        return False


def display_url(url: str) -> str:
    path = sqlite_path(url)
    if path is not None:
        return str(path)
    return redact_url(url)


def _short(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None)
    return redact_text(str(orig or exc).splitlines()[0])
