"""Opening the database: URLs, the engine and the SQLite pragmas the defect log relies on."""

from __future__ import annotations

import os
from pathlib import Path

from sqlalchemy import Connection, Engine, create_engine, event, make_url

def database_url(target: str | os.PathLike) -> str:
    """A SQLAlchemy URL from either a URL (passed through) or a plain file path (SQLite)."""
    text = str(target)
    if "://" in text:
        return text
    return f"sqlite:///{Path(text).expanduser().resolve()}"


def sqlite_path(url: str) -> Path | None:
    """The database file of a SQLite URL; None for other databases and in-memory SQLite."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return Path(parsed.database)


def create_db_engine(url: str, *, busy_timeout_ms: int = 5000) -> Engine:
    """An engine for `url`; for SQLite, with the pragmas the defect log relies on."""
    path = sqlite_path(url)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url)
    if engine.dialect.name == "sqlite":

        @event.listens_for(engine, "connect")
        def _set_sqlite_pragmas(dbapi_connection, _connection_record) -> None:
            cursor = dbapi_connection.cursor()
            # WAL: readers (operators, exports) see the last commit and never block the
            # writer, and the writer never blocks them.
            cursor.execute("PRAGMA journal_mode=WAL")
            # NORMAL is safe with WAL (a power cut can lose the newest commits, never corrupt
            # the file) and saves an fsync on every commit.
            cursor.execute("PRAGMA synchronous=NORMAL")
            # Wait for a lock this long instead of failing at once with "database is locked"
            # when an operator's acknowledgement holds it for a few milliseconds.
            cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
            # SQLite ignores foreign keys unless asked: a reject must point at a real defect.
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

    return engine


def _begin_write(conn: Connection) -> None:
    """Start a write transaction.

    On SQLite, take the write lock up front (BEGIN IMMEDIATE): a transaction that reads
    first and writes later fails at once, without waiting busy_timeout, when another
    connection committed in between.
    """
    if conn.dialect.name == "sqlite":
        conn.exec_driver_sql("BEGIN IMMEDIATE")

