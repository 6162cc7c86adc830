"""Opening the database: URLs, the engine, the SQLite pragmas, and errors a person can act on.

A bad database path must not surface as an 80-line SQLAlchemy traceback: `check_database_path`
catches what can be seen before connecting (a directory, a folder that is a file), and
`explain` turns what SQLite says afterwards (not a database, read-only, disk full, locked)
into a one-line :class:`DefectLogError` that names the file and says how to fix it.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from sqlalchemy import Connection, Engine, create_engine, event, make_url


class DefectLogError(RuntimeError):
    """The defect log cannot be used as asked; the message is one line naming the file and
    what to do. (`grad-edge` prints RuntimeErrors as one line and exits 2.)"""


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


def display_name(url: str) -> str:
    """The file for SQLite, the URL without its password otherwise."""
    path = sqlite_path(url)
    return str(path) if path is not None else make_url(url).render_as_string(hide_password=True)


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
    """An engine for `url`; for SQLite, with the pragmas the defect log relies on."""
    path = sqlite_path(url)
    if path is not None:
        check_database_path(path)
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
