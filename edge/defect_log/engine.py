"""Opening the database: URLs, the engine, the SQLite pragmas, and errors a person can act on.

Two databases are supported: SQLite (a file per line, the default) and PostgreSQL (one server
for the plant, `postgresql+psycopg://USER:PASSWORD@HOST:PORT/DB`). Everything else in the
package is written once for both; what differs is here (pragmas, write locks, connect
timeouts) and in the ids (ids.py) and the writer's local files (local_files.py).

A bad database path must not surface as an 80-line SQLAlchemy traceback: `check_database_path`
catches what can be seen before connecting (a directory, a folder that is a file), and
`explain` turns what SQLite or PostgreSQL says afterwards (not a database, read-only, disk
full, locked, server unreachable, unknown database, login refused) into a one-line
:class:`DefectLogError` that names the file or server and says how to fix it.
"""

from __future__ import annotations

import errno
import os
import zlib
from pathlib import Path

from sqlalchemy import Connection, Engine, create_engine, event, make_url, text
from sqlalchemy.exc import ArgumentError


class DefectLogError(RuntimeError):
    """The defect log cannot be used as asked; the message is one line naming the file and
    what to do. (`grad-edge` prints RuntimeErrors as one line and exits 2.)"""


# The forms of a URL this package knows, for error messages.
URL_FORMS = "sqlite:///PATH.db or postgresql+psycopg://USER:PASSWORD@HOST:PORT/DATABASE"
# PostgreSQL is reached through psycopg 3 (the `postgres` extra); the bare scheme would make
# SQLAlchemy look for psycopg2, which this project does not install.
_POSTGRES_SCHEMES = ("postgresql://", "postgres://")
# How long to wait for a PostgreSQL server that does not answer (a host that is down or cut
# off): long enough for a busy network, short enough that a line is not stuck at start.
CONNECT_TIMEOUT_S = 5


def database_url(target: str | os.PathLike) -> str:
    """A SQLAlchemy URL from a URL or a plain file path (SQLite); `postgresql://` (and
    `postgres://`) mean PostgreSQL through psycopg 3: `postgresql+psycopg://`."""
    text = str(target)
    for scheme in _POSTGRES_SCHEMES:
        if text.startswith(scheme):
            return "postgresql+psycopg://" + text[len(scheme):]
    if "://" in text:
        return text
    return f"sqlite:///{Path(text).expanduser().resolve()}"


def backend_name(url: str) -> str:
    """`sqlite` or `postgresql` (or whatever else the URL names, which open refuses)."""
    try:
        return make_url(url).get_backend_name()
    except (ArgumentError, ValueError):
        return "?"


def is_server(url: str) -> bool:
    """A database server shared by many writers (PostgreSQL), not a file of one line."""
    return backend_name(url) == "postgresql"


def sqlite_path(url: str) -> Path | None:
    """The database file of a SQLite URL; None for other databases and in-memory SQLite."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return Path(parsed.database)


def display_name(url: str) -> str:
    """The file for SQLite, the URL without its password otherwise."""
    try:
        path = sqlite_path(url)
        return str(path) if path is not None else \
            make_url(url).render_as_string(hide_password=True)
    except (ArgumentError, ValueError):
        return url.split("@")[-1]            # unparsable: at least never show a password


def check_database_path(path: Path) -> None:
    """Refuse, before connecting, a database path SQLite would only answer vaguely about."""
    if path.is_dir():
        raise DefectLogError(
            f"defect log {path} is a directory, not a database file; point the database "
            f"path (--db / defect_log.url) at a file, e.g. {path / 'defects.db'}")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise DefectLogError(
                    f"defect log {path}: {parent} is a file, not a folder; choose a database "
                    "path whose folders are folders")
            break


def create_db_engine(url: str, *, busy_timeout_ms: int = 5000) -> Engine:
    """An engine for `url`; for SQLite, with the pragmas the defect log relies on; for
    PostgreSQL, with a connect timeout and a liveness check of pooled connections."""
    backend = backend_name(url)
    if backend not in ("sqlite", "postgresql"):
        raise DefectLogError(
            f"defect log URL {display_name(url)!r}: unsupported database "
            f"{backend if backend != '?' else '(the URL cannot be parsed)'}; use {URL_FORMS}")
    path = sqlite_path(url)
    if path is not None:
        check_database_path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
    if backend == "postgresql":
        query = make_url(url).query
        return create_engine(
            url,
            # A server restarted under a running line leaves dead connections in the pool:
            # test each one as it is taken instead of failing one batch per dead connection.
            pool_pre_ping=True,
            connect_args={} if "connect_timeout" in query
            else {"connect_timeout": CONNECT_TIMEOUT_S})
    engine = create_engine(url)
    if engine.dialect.name == "sqlite":

        @event.listens_for(engine, "connect")
        def _set_sqlite_pragmas(dbapi_connection, _connection_record) -> None:
            cursor = dbapi_connection.cursor()
            # WAL: readers (operators, exports) see the last commit and never block the
            # writer, and the writer never blocks them.
            cursor.execute("PRAGMA journal_mode=WAL")
            # NORMAL is safe with WAL (a power cut can lose the newest commits, never corrupt
            # the file) and saves an fsync on every commit. The writer's own journal
            # (journal.py) is what makes a submitted record survive a crash.
            cursor.execute("PRAGMA synchronous=NORMAL")
            # Wait for a lock this long instead of failing at once with "database is locked"
            # when an operator's acknowledgement holds it for a few milliseconds.
            cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
            # SQLite ignores foreign keys unless asked: a reject must point at a real defect.
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

    return engine


def begin_write(conn: Connection) -> None:
    """Start a write transaction.

    On SQLite, take the write lock up front (BEGIN IMMEDIATE): a transaction that reads
    first and writes later fails at once, without waiting busy_timeout, when another
    connection committed in between.
    """
    if conn.dialect.name == "sqlite":
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def begin_exclusive(conn: Connection, purpose: str) -> None:
    """Start a transaction that no other writer runs at the same time (migrating, closing
    crashed runs).

    SQLite: the write lock (BEGIN IMMEDIATE), which is exclusive anyway. PostgreSQL: many
    writers share the database, so take a transaction-scoped advisory lock named after
    `purpose`; the next writer waits for the commit, then sees what this one did.
    """
    if conn.dialect.name == "sqlite":
        conn.exec_driver_sql("BEGIN IMMEDIATE")
    elif conn.dialect.name == "postgresql":
        key = zlib.crc32(f"grad-edge defect log: {purpose}".encode())
        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": key})


def is_disk_full(exc: BaseException, path: Path | None = None) -> bool:
    """Whether `exc` means the disk is full; given the file, also when SQLite only says "disk
    I/O error" (it does, opening a WAL database on a full disk) and the disk has no room."""
    text = str(getattr(exc, "orig", None) or exc).lower()
    if getattr(exc, "errno", None) == errno.ENOSPC or "disk is full" in text \
            or "no space left" in text:
        return True
    if path is not None and ("disk i/o error" in text or "unable to open" in text):
        return _free_bytes(path) < 64 * 1024
    return False


def _writable(path: Path) -> bool:
    """The file (if there) and its folder can be written (a read-only mount says no even to
    root)."""
    folder_ok = os.access(path.parent, os.W_OK) if path.parent.exists() else True
    return folder_ok and (not path.exists() or os.access(path, os.W_OK))


def _free_bytes(path: Path) -> float:
    for folder in (path.parent, *path.parent.parents):
        try:
            st = os.statvfs(folder)
        except OSError:
            continue
        return st.f_bavail * st.f_frsize
    return float("inf")


def explain(exc: BaseException, url: str) -> DefectLogError:
    """One line for a person: what is wrong with the defect log at `url`, and what to do."""
    if isinstance(exc, DefectLogError):
        return exc
    where = display_name(url)
    original = getattr(exc, "orig", None) or exc
    detail = (str(original).splitlines() or [type(original).__name__])[0]
    if backend_name(url) == "postgresql" or isinstance(exc, (ArgumentError, ImportError)):
        return _explain_server(exc, original, detail, url, where)
    text = detail.lower()
    code = getattr(original, "errno", None)
    if is_disk_full(exc, sqlite_path(url)):
        return DefectLogError(
            f"disk full: the disk holding the defect log {where} has no space left ({detail}); "
            "free space on it (old images, old runs) or move the defect log to another disk")
    if "file is not a database" in text or "file is encrypted" in text:
        return DefectLogError(
            f"{where} is not a defect log database (SQLite says: {detail}); check the path "
            "(--db / defect_log.url), or move the file away so the line can create a new one")
    path = sqlite_path(url)
    cannot_write = path is not None and ("unable to open" in text or "disk i/o" in text) \
        and not _writable(path)
    if cannot_write or "readonly" in text or "read-only" in text \
            or code in (errno.EROFS, errno.EACCES, errno.EPERM):
        return DefectLogError(
            f"defect log {where} is not writable ({detail}); check the permissions of the "
            "file and its folder, and that the disk is mounted read-write (SQLite writes -wal "
            "and -shm files beside it, even to read; to only read it, copy it somewhere "
            "writable)")
    if "unable to open database file" in text:
        return DefectLogError(
            f"cannot open the defect log {where} ({detail}); check that its folder exists and "
            "is writable (SQLite creates -wal and -shm files beside the database)")
    if "database is locked" in text:
        return DefectLogError(
            f"defect log {where} is locked by another connection ({detail}); wait and try "
            "again, or find the process holding it (fuser FILE)")
    return DefectLogError(f"defect log {where}: {detail}")


def _explain_server(exc: BaseException, original: BaseException, detail: str, url: str,
                    where: str) -> DefectLogError:
    """What PostgreSQL (or the driver, or the URL itself) said, as one line to act on."""
    text = detail.lower()
    if isinstance(exc, ImportError):
        return DefectLogError(
            f"defect log {where}: the database driver is not installed ({detail}); for "
            "PostgreSQL install grad-edge's postgres extra (pip install -e '.[postgres]', "
            "which brings psycopg)")
    if isinstance(exc, ArgumentError):
        return DefectLogError(f"defect log URL {where!r} is not a database URL ({detail}); "
                              f"use {URL_FORMS}")
    try:
        parsed = make_url(url)
        server = f"{parsed.host or 'localhost'}:{parsed.port or 5432}"
        user, database = parsed.username, parsed.database
    except (ArgumentError, ValueError):
        server, user, database = where, None, None
    if "does not exist" in text and "database" in text:
        return DefectLogError(
            f"PostgreSQL server {server} has no database {database!r} ({detail}); create it "
            f"(createdb -h HOST -p PORT -U USER {database}) or fix the database name in the "
            "URL (--db / defect_log.url)")
    if "password authentication failed" in text or "no password supplied" in text or (
            "role" in text and "does not exist" in text) or "pg_hba.conf" in text:
        return DefectLogError(
            f"PostgreSQL server {server} refused the login of user {user!r} ({detail}); check "
            "the user and password in the URL (--db / defect_log.url), and that pg_hba.conf "
            "lets this host in")
    if "permission denied" in text:
        return DefectLogError(
            f"PostgreSQL user {user!r} may not do this in database {database!r} ({detail}); "
            "grant it the rights on the defect log's tables (or CREATE on the schema, for the "
            "first migration)")
    if any(s in text for s in ("connection refused", "could not connect", "connection failed",
                               "timeout expired", "resolve host", "no route to host",
                               "server closed the connection", "terminating connection",
                               "the database system is", "network is unreachable",
                               "connection is closed", "consuming input failed")):
        return DefectLogError(
            f"cannot reach the PostgreSQL server {server} for the defect log ({detail}); check "
            "that it runs and that the host and port in the URL (--db / defect_log.url) are "
            "right and reachable from this host")
    return DefectLogError(f"defect log {where}: {detail}")
