"""The defect log: every DEFECT / UNKNOWN, every reject fired, every operator action.

One writer owns the database. The worker hands it records through a bounded queue and
moves on; the writer thread inserts them in batches, one transaction per batch. A defect
record is never dropped: when the database cannot be written (locked, disk full) the writer
keeps the records and retries with back-off; at shutdown whatever is still unwritten goes
to a JSONL spool file next to the database, which the next writer re-imports when it opens.

Operators read (and acknowledge) through :class:`DefectLogReader`, in short sessions of
their own. SQLite runs in WAL mode so those readers never block the writer.

Read in this order: tables → engine and pragmas → migrations → records → writer → saved
images → reader side.
"""

from __future__ import annotations

import atexit
import csv
import dataclasses
import datetime as dt
import json
import logging
import os
import queue
import re
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np
from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    Connection,
    Engine,
    ForeignKey,
    String,
    Text,
    create_engine,
    event,
    func,
    insert,
    inspect,
    make_url,
    select,
    update,
)
from sqlalchemy.exc import DataError, IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from edge.results import Decision

if TYPE_CHECKING:
    from edge.reject import RejectEvent

logger = logging.getLogger(__name__)


# --- tables -------------------------------------------------------------------------------
# Times are float seconds since the epoch, the clock of FrameResult.wall_time: no time
# zones to get wrong, and they sort.


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[str]: JSON}


class RunRow(Base):
    """One start-to-stop of the line software, with what it ran."""

    __tablename__ = "runs"

    id: Mapped[int] = mapped_column(primary_key=True)
    started_at: Mapped[float]
    stopped_at: Mapped[float | None]
    model_hash: Mapped[str | None] = mapped_column(String(128))
    config_hash: Mapped[str | None] = mapped_column(String(128))
    config_path: Mapped[str | None] = mapped_column(Text)
    host: Mapped[str | None] = mapped_column(String(255))
    summary: Mapped[dict[str, Any] | None]


class DefectRow(Base):
    """A frame judged DEFECT or UNKNOWN."""

    __tablename__ = "defects"

    # Handed out by the writer at submit time (not by the database), so a reject can name
    # its defect before the row has landed, and re-importing a spool is idempotent.
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    run_id: Mapped[int | None] = mapped_column(ForeignKey("runs.id"), index=True)
    time: Mapped[float] = mapped_column(index=True)
    source_id: Mapped[str] = mapped_column(String(128), index=True)
    seq: Mapped[int] = mapped_column(BigInteger)
    part_id: Mapped[int | None] = mapped_column(BigInteger)
    encoder: Mapped[int | None] = mapped_column(BigInteger)
    raw_score: Mapped[float | None]
    calibrated_score: Mapped[float | None]
    threshold: Mapped[float | None]
    verdict: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str] = mapped_column(Text)
    x0: Mapped[int | None]
    y0: Mapped[int | None]
    x1: Mapped[int | None]
    y1: Mapped[int | None]
    area_px: Mapped[int] = mapped_column(default=0)
    frame_path: Mapped[str | None] = mapped_column(Text)
    heatmap_path: Mapped[str | None] = mapped_column(Text)
    acknowledged: Mapped[bool] = mapped_column(default=False, index=True)


class RejectEventRow(Base):
    """A reject signal that was fired, and which sinks took it."""

    __tablename__ = "reject_events"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)  # writer-assigned
    run_id: Mapped[int | None] = mapped_column(ForeignKey("runs.id"))
    defect_id: Mapped[int | None] = mapped_column(ForeignKey("defects.id"), index=True)
    source_id: Mapped[str] = mapped_column(String(128))
    part_id: Mapped[int | None] = mapped_column(BigInteger)
    issued_at: Mapped[float]
    due_encoder: Mapped[int | None] = mapped_column(BigInteger)
    due_time: Mapped[float | None]
    fired_at: Mapped[float | None]
    sinks_ok: Mapped[list[str]]
    sinks_failed: Mapped[list[str]]
    acknowledged_at: Mapped[float | None]


OPERATOR_ACTIONS = ("ack", "false_positive", "comment")


class OperatorActionRow(Base):
    __tablename__ = "operator_actions"
    __table_args__ = (
        CheckConstraint("action IN ('ack', 'false_positive', 'comment')", name="known_action"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    defect_id: Mapped[int] = mapped_column(ForeignKey("defects.id"), index=True)
    time: Mapped[float]
    operator: Mapped[str] = mapped_column(String(128))
    action: Mapped[str] = mapped_column(String(16))
    comment: Mapped[str | None] = mapped_column(Text)


class SchemaMigrationRow(Base):
    __tablename__ = "schema_migrations"

    version: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    applied_at: Mapped[float]
    description: Mapped[str | None] = mapped_column(Text)


# --- engine and pragmas -------------------------------------------------------------------


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


# --- migrations ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Migration:
    version: int
    description: str
    apply: Callable[[Connection], None]


def _create_tables_v1(conn: Connection) -> None:
    # Migration 1 builds the tables from the models. When a later migration changes a
    # table, first freeze the version-1 DDL here, or a new database would get the new
    # column twice (once here, once in the later migration).
    tables = [RunRow.__table__, DefectRow.__table__, RejectEventRow.__table__,
              OperatorActionRow.__table__]
    Base.metadata.create_all(conn, tables=tables)


MIGRATIONS: list[Migration] = [
    Migration(1, "create runs, defects, reject_events, operator_actions", _create_tables_v1),
]
LATEST_SCHEMA = MIGRATIONS[-1].version


class SchemaTooNewError(RuntimeError):
    """The database was written by a newer grad-edge than this one."""


def schema_version(conn: Connection) -> int:
    if not inspect(conn).has_table(SchemaMigrationRow.__tablename__):
        return 0
    return conn.execute(select(func.max(SchemaMigrationRow.version))).scalar() or 0


def migrate(engine: Engine) -> int:
    """Bring the database up to LATEST_SCHEMA; returns the version it is at."""
    with engine.connect() as conn:
        current = schema_version(conn)
        _check_not_too_new(current, engine)
        if current == LATEST_SCHEMA:
            return current          # nothing to do: no write lock, so read-only DBs open

    with engine.connect() as conn:
        _begin_write(conn)          # one opener migrates; the others wait, then see it done
        SchemaMigrationRow.__table__.create(conn, checkfirst=True)
        current = schema_version(conn)
        _check_not_too_new(current, engine)
        for migration in MIGRATIONS:
            if migration.version <= current:
                continue
            migration.apply(conn)
            conn.execute(insert(SchemaMigrationRow).values(
                version=migration.version, applied_at=time.time(),
                description=migration.description))
            logger.info("defect log %s: applied migration %d (%s)", engine.url,
                        migration.version, migration.description)
        conn.commit()
    return LATEST_SCHEMA


def _check_not_too_new(current: int, engine: Engine) -> None:
    if current > LATEST_SCHEMA:
        raise SchemaTooNewError(
            f"defect log {engine.url.render_as_string(hide_password=True)} is at schema "
            f"version {current}, but this grad-edge only knows up to {LATEST_SCHEMA}; "
            "upgrade grad-edge, or point the defect log at another database file"
        )


def open_database(url: str, *, busy_timeout_ms: int = 5000) -> Engine:
    """Engine for `url`, migrated to the latest schema."""
    engine = create_db_engine(url, busy_timeout_ms=busy_timeout_ms)
    migrate(engine)
    return engine


# --- records the writer takes ---------------------------------------------------------------


@dataclass(frozen=True)
class DefectRecord:
    """A defect (or UNKNOWN) to log; ``id`` is handed out by :meth:`DefectLogWriter.submit`."""

    source_id: str
    seq: int
    time: float                     # capture time, seconds since the epoch
    verdict: str                    # "DEFECT" or "UNKNOWN"
    reason: str
    part_id: int | None = None
    encoder: int | None = None
    raw_score: float | None = None
    calibrated_score: float | None = None
    threshold: float | None = None
    box: tuple[int, int, int, int] | None = None
    area_px: int = 0
    frame_path: str | None = None
    heatmap_path: str | None = None
    run_id: int | None = None
    id: int | None = None

    @classmethod
    def from_decision(cls, decision: Decision, *, run_id: int | None = None,
                      threshold: float | None = None, frame_path: str | None = None,
                      heatmap_path: str | None = None) -> DefectRecord:
        """`threshold`: the one the rules used (RuleEngine.threshold_for), if not the worker's."""
        r = decision.result
        return cls(
            source_id=r.source_id, seq=r.seq, time=r.wall_time, verdict=decision.verdict.value,
            reason=decision.reason, part_id=r.part_id, encoder=r.encoder,
            raw_score=r.raw_score, calibrated_score=r.calibrated_score,
            threshold=r.threshold if threshold is None else threshold,
            box=tuple(r.box) if r.box is not None else None, area_px=r.area_px,
            frame_path=frame_path, heatmap_path=heatmap_path, run_id=run_id,
        )


@dataclass(frozen=True)
class RejectRecord:
    """A fired reject; ``id`` is handed out by :meth:`DefectLogWriter.submit`."""

    source_id: str
    issued_at: float
    part_id: int | None = None
    defect_id: int | None = None
    due_encoder: int | None = None
    due_time: float | None = None
    fired_at: float | None = None
    sinks_ok: tuple[str, ...] = ()
    sinks_failed: tuple[str, ...] = ()
    acknowledged_at: float | None = None
    run_id: int | None = None
    id: int | None = None

    @classmethod
    def from_fired(cls, event: RejectEvent, sinks_ok: Sequence[str],
                   sinks_failed: Sequence[str], *, fired_at: float | None = None,
                   run_id: int | None = None) -> RejectRecord:
        """From the scheduler's ``on_fired(event, ok, failed)`` callback."""
        return cls(
            source_id=event.source_id, issued_at=event.issued_at, part_id=event.part_id,
            defect_id=event.defect_id, due_encoder=event.due_encoder, due_time=event.due_time,
            fired_at=time.time() if fired_at is None else fired_at,
            sinks_ok=tuple(sinks_ok), sinks_failed=tuple(sinks_failed), run_id=run_id,
        )


@dataclass(frozen=True)
class RunEndRecord:
    """Closes a run: goes through the queue so it is retried and spooled like the rest."""

    run_id: int
    stopped_at: float
    summary: dict[str, Any] | None = None


LogRecord = DefectRecord | RejectRecord | RunEndRecord
_RECORD_KINDS: dict[str, type] = {"defect": DefectRecord, "reject": RejectRecord,
                                  "run_end": RunEndRecord}


def _record_to_json(record: LogRecord) -> str:
    kind = next(k for k, cls in _RECORD_KINDS.items() if isinstance(record, cls))
    return json.dumps({"kind": kind, "record": dataclasses.asdict(record)}, sort_keys=True)


def _record_from_json(line: str) -> LogRecord:
    obj = json.loads(line)
    fields = dict(obj["record"])
    # JSON has no tuples; the frozen records want them back.
    for name in ("box", "sinks_ok", "sinks_failed"):
        if isinstance(fields.get(name), list):
            fields[name] = tuple(fields[name])
    return _RECORD_KINDS[obj["kind"]](**fields)


def _read_spool(path: Path) -> list[LogRecord]:
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(_record_from_json(line))
        except (ValueError, KeyError, TypeError) as exc:
            # Most likely the last line of a spool cut off by a crash.
            logger.error("defect log spool %s line %d is not a record (%s); skipping: %r",
                         path, number, exc, line[:200])
    return records


# --- the writer -------------------------------------------------------------------------------


class DefectLogWriter:
    """The one writer of the defect log: a thread fed by a bounded queue.

    Use one writer per database: it hands out the defect and reject ids. ``submit`` never
    blocks the line for long and never drops a record: when the queue stays full (the
    database is far behind) the record goes straight to the spool file.
    """

    def __init__(
        self,
        url_or_path: str | os.PathLike,
        *,
        spool_path: str | os.PathLike | None = None,
        queue_size: int = 1000,
        batch_size: int = 64,
        busy_timeout_ms: int = 5000,
        retry_initial_s: float = 0.05,
        retry_max_s: float = 2.0,
        submit_timeout_s: float = 1.0,
    ) -> None:
        self.url = database_url(url_or_path)
        self.engine = open_database(self.url, busy_timeout_ms=busy_timeout_ms)
        self.spool_path = Path(spool_path) if spool_path else _default_spool_path(self.url)
        # Records the database refuses outright (not retried) go here, for a person.
        failed_name = self.spool_path.name.replace(".spool", ".failed")
        if failed_name == self.spool_path.name:
            failed_name += ".failed.jsonl"
        self.failed_path = self.spool_path.with_name(failed_name)
        self.batch_size = batch_size
        self.busy_timeout_s = busy_timeout_ms / 1000.0
        self.retry_initial_s = retry_initial_s
        self.retry_max_s = retry_max_s
        self.submit_timeout_s = submit_timeout_s

        self.written = 0        # records committed by this writer
        self.spooled = 0        # records this writer had to put in the spool file
        self._queue: queue.Queue[LogRecord] = queue.Queue(maxsize=queue_size)
        self._spool_lock = threading.Lock()
        self._submit_lock = threading.Lock()   # a submit racing stop() must not be lost
        self._stopping = threading.Event()
        self._stopped = False
        self._deadline = float("inf")
        self._thread: threading.Thread | None = None

        # Records an earlier writer spooled go first; the file that holds them is deleted
        # once they have all landed (or been re-spooled).
        self._backlog: list[LogRecord] = self._take_spool()
        self._imported_left = len(self._backlog)

        self._id_lock = threading.Lock()
        self._next_defect_id = 1 + max(
            self._max_id(DefectRow),
            *(r.id or 0 for r in self._backlog if isinstance(r, DefectRecord)), 0)
        self._next_reject_id = 1 + max(
            self._max_id(RejectEventRow),
            *(r.id or 0 for r in self._backlog if isinstance(r, RejectRecord)), 0)

    def _max_id(self, table: type[Base]) -> int:
        with self.engine.connect() as conn:
            return conn.execute(select(func.max(table.id))).scalar() or 0

    # --- runs (synchronous: the caller needs the id) ------------------------------------

    def begin_run(self, *, model_hash: str | None = None, config_hash: str | None = None,
                  config_path: str | None = None, host: str | None = None,
                  started_at: float | None = None) -> int:
        with self.engine.connect() as conn:
            _begin_write(conn)
            result = conn.execute(insert(RunRow).values(
                started_at=time.time() if started_at is None else started_at,
                model_hash=model_hash, config_hash=config_hash, config_path=config_path,
                host=host or socket.gethostname()))
            conn.commit()
        run_id = result.inserted_primary_key[0]
        logger.info("defect log %s: run %d started", self.url, run_id)
        return run_id

    def end_run(self, run_id: int, summary: dict[str, Any] | None = None,
                stopped_at: float | None = None) -> None:
        self.submit(RunEndRecord(run_id, time.time() if stopped_at is None else stopped_at,
                                 summary))

    # --- the queue ----------------------------------------------------------------------

    def start(self) -> DefectLogWriter:
        if self._thread is not None:
            raise RuntimeError("DefectLogWriter.start() called twice; one thread per writer")
        # A daemon thread plus an exit hook: a forgotten stop() still flushes (or spools)
        # at interpreter exit instead of hanging it.
        self._thread = threading.Thread(target=self._run, name="defect-log-writer", daemon=True)
        self._thread.start()
        atexit.register(self.stop)
        return self

    def submit(self, record: LogRecord) -> int | None:
        """Queue a record; returns the defect or reject id it will have in the database."""
        with self._id_lock:
            if isinstance(record, DefectRecord) and record.id is None:
                record = dataclasses.replace(record, id=self._next_defect_id)
                self._next_defect_id += 1
            elif isinstance(record, RejectRecord) and record.id is None:
                record = dataclasses.replace(record, id=self._next_reject_id)
                self._next_reject_id += 1
        record_id = getattr(record, "id", None)

        with self._submit_lock:
            if self._stopped:
                logger.warning("defect log writer already stopped; spooling %s to %s",
                               type(record).__name__, self.spool_path)
                self._spool([record])
                return record_id
            try:
                self._queue.put(record, timeout=self.submit_timeout_s)
            except queue.Full:
                logger.warning("defect log queue full (%d records: the database is slow or "
                               "unwritable); spooling %s to %s for the next start to "
                               "re-import", self._queue.maxsize, type(record).__name__,
                               self.spool_path)
                self._spool([record])
        return record_id

    @property
    def pending(self) -> int:
        """Records not yet committed (roughly: the thread may be mid-batch)."""
        return self._queue.qsize() + len(self._backlog)

    def stop(self, timeout: float = 10.0) -> None:
        """Write what is queued, trying for up to `timeout` s; spool whatever is left."""
        if self._stopped:
            return
        atexit.unregister(self.stop)
        self._deadline = time.monotonic() + timeout
        self._stopping.set()
        if self._thread is None:
            self._run()                  # never started: drain here
        else:
            # One insert attempt may still be waiting out busy_timeout past the deadline.
            self._thread.join(timeout + self.busy_timeout_s + 5.0)
            if self._thread.is_alive():
                logger.error("defect log writer thread did not finish within %.1f s; "
                             "%d records may be unwritten", timeout, self.pending)
        with self._submit_lock:
            self._stopped = True
            # Anything submitted while the thread was finishing: spool it.
            late: list[LogRecord] = []
            while True:
                try:
                    late.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            if late:
                self._spool(late)
        self.engine.dispose()

    def __enter__(self) -> DefectLogWriter:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- the thread ---------------------------------------------------------------------

    def _run(self) -> None:
        delay = self.retry_initial_s
        failures = 0
        while True:
            self._fill_backlog()
            if not self._backlog:
                if self._stopping.is_set():
                    break
                try:
                    self._backlog.append(self._queue.get(timeout=0.1))
                except queue.Empty:
                    pass
                continue

            batch = self._backlog[: self.batch_size]
            try:
                self._write_batch(batch)
            except Exception as exc:
                failures += 1
                # First failure loudly; then quietly until it recovers.
                log = logger.error if failures == 1 else logger.debug
                log("defect log %s: could not write %d record(s): %s; keeping them and "
                    "retrying (attempt %d, next in %.2f s)", self.url, len(batch),
                    _short(exc), failures, delay)
                if self._stopping.is_set() and time.monotonic() + delay > self._deadline:
                    break
                time.sleep(delay)
                delay = min(delay * 2, self.retry_max_s)
                continue

            if failures:
                logger.warning("defect log %s writable again after %d failed attempt(s)",
                               self.url, failures)
            failures, delay = 0, self.retry_initial_s
            del self._backlog[: len(batch)]
            self.written += len(batch)
            self._note_imported(len(batch))

        self._fill_backlog(everything=True)
        if self._backlog:
            logger.error("defect log %s still unwritable at shutdown: spooling %d record(s) "
                         "to %s; the next start re-imports them", self.url,
                         len(self._backlog), self.spool_path)
            self._spool(self._backlog)
            self._backlog = []
        # Re-imported records have now landed or are in the new spool.
        self._note_imported(self._imported_left)

    def _fill_backlog(self, everything: bool = False) -> None:
        while everything or len(self._backlog) < self.batch_size:
            try:
                self._backlog.append(self._queue.get_nowait())
            except queue.Empty:
                return

    def _write_batch(self, batch: list[LogRecord]) -> None:
        try:
            self._insert(batch)
        except (IntegrityError, DataError) as exc:
            # Not the database's state but a record it refuses (a bug upstream): find it,
            # set it aside, and keep the line's log flowing.
            if len(batch) == 1:
                self._set_aside(batch[0], exc)
                return
            for record in batch:
                self._write_batch([record])

    def _insert(self, batch: list[LogRecord]) -> None:
        defects = [r for r in batch if isinstance(r, DefectRecord)]
        rejects = [r for r in batch if isinstance(r, RejectRecord)]
        run_ends = [r for r in batch if isinstance(r, RunEndRecord)]
        with self.engine.connect() as conn:
            _begin_write(conn)
            # Skip rows already there: a spool re-imported after a crash may repeat some.
            if defects:
                have = set(conn.scalars(select(DefectRow.id).where(
                    DefectRow.id.in_([r.id for r in defects]))))
                rows = [_defect_row(r) for r in defects if r.id not in have]
                if rows:
                    conn.execute(insert(DefectRow), rows)
            if rejects:
                have = set(conn.scalars(select(RejectEventRow.id).where(
                    RejectEventRow.id.in_([r.id for r in rejects]))))
                rows = [_reject_row(r) for r in rejects if r.id not in have]
                if rows:
                    conn.execute(insert(RejectEventRow), rows)
            for end in run_ends:
                conn.execute(update(RunRow).where(RunRow.id == end.run_id).values(
                    stopped_at=end.stopped_at, summary=end.summary))
            conn.commit()

    # --- spool files --------------------------------------------------------------------

    def _spool(self, records: Iterable[LogRecord]) -> None:
        lines = [_record_to_json(r) + "\n" for r in records]
        with self._spool_lock:
            try:
                self.spool_path.parent.mkdir(parents=True, exist_ok=True)
                with open(self.spool_path, "a", encoding="utf-8") as spool:
                    spool.writelines(lines)
                    spool.flush()
                    os.fsync(spool.fileno())
                self.spooled += len(lines)
            except OSError:
                # Last resort: the log stream is the only place left.
                logger.critical("could not write the defect log spool %s; the records "
                                "follow, one per line:\n%s", self.spool_path, "".join(lines),
                                exc_info=True)

    def _set_aside(self, record: LogRecord, exc: Exception) -> None:
        logger.error("defect log %s refused a %s (%s); kept in %s for a person to look at",
                     self.url, type(record).__name__, _short(exc), self.failed_path)
        with self._spool_lock, open(self.failed_path, "a", encoding="utf-8") as failed:
            failed.write(json.dumps({"error": _short(exc), **json.loads(_record_to_json(record))})
                         + "\n")

    @property
    def _importing_path(self) -> Path:
        return self.spool_path.with_name(self.spool_path.name + ".importing")

    def _take_spool(self) -> list[LogRecord]:
        """Load spooled records; move them to `.importing` until they have landed."""
        importing = self._importing_path
        records: list[LogRecord] = []
        if importing.exists():          # a writer died while importing: take those too
            records += _read_spool(importing)
        if self.spool_path.exists():
            records += _read_spool(self.spool_path)
            tmp = importing.with_name(importing.name + ".tmp")
            with open(tmp, "w", encoding="utf-8") as out:
                out.writelines(_record_to_json(r) + "\n" for r in records)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, importing)
            self.spool_path.unlink()
        if records:
            logger.warning("defect log %s: re-importing %d record(s) spooled by an earlier "
                           "run", self.url, len(records))
        return records

    def _note_imported(self, count: int) -> None:
        if self._imported_left <= 0:
            return
        self._imported_left = max(0, self._imported_left - count)
        if self._imported_left == 0:
            self._importing_path.unlink(missing_ok=True)


def _default_spool_path(url: str) -> Path:
    path = sqlite_path(url)
    if path is not None:
        return path.with_name(path.name + ".spool.jsonl")
    return Path("defect_log.spool.jsonl").resolve()


def _short(exc: Exception) -> str:
    # SQLAlchemy's messages carry the whole SQL statement; the first line says what happened.
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def _defect_row(r: DefectRecord) -> dict[str, Any]:
    x0, y0, x1, y1 = r.box if r.box is not None else (None, None, None, None)
    return dict(
        id=r.id, run_id=r.run_id, time=r.time, source_id=r.source_id, seq=r.seq,
        part_id=r.part_id, encoder=r.encoder, raw_score=r.raw_score,
        calibrated_score=r.calibrated_score, threshold=r.threshold, verdict=r.verdict,
        reason=r.reason, x0=x0, y0=y0, x1=x1, y1=y1, area_px=r.area_px,
        frame_path=r.frame_path, heatmap_path=r.heatmap_path, acknowledged=False,
    )


def _reject_row(r: RejectRecord) -> dict[str, Any]:
    return dict(
        id=r.id, run_id=r.run_id, defect_id=r.defect_id, source_id=r.source_id,
        part_id=r.part_id, issued_at=r.issued_at, due_encoder=r.due_encoder,
        due_time=r.due_time, fired_at=r.fired_at, sinks_ok=list(r.sinks_ok),
        sinks_failed=list(r.sinks_failed), acknowledged_at=r.acknowledged_at,
    )


# --- saved images -----------------------------------------------------------------------------


@dataclass(frozen=True)
class SavedImages:
    """Where a defect's images went; None where writing failed."""

    frame_path: str | None
    heatmap_path: str | None


_DAY_FOLDER = re.compile(r"^\d{4}-\d{2}-\d{2}$")


class ImageStore:
    """Frames and heatmap overlays of defects, in one folder per day, with retention.

    A failed write (full disk, bad folder) is logged and gives a None path: the defect row
    matters more than its picture.
    """

    def __init__(self, root: str | os.PathLike, retention_days: float | None = None,
                 retention_gb: float | None = None, *, image_format: str = "jpg",
                 jpeg_quality: int = 90, heatmap_alpha: float = 0.5) -> None:
        if image_format not in ("jpg", "png"):
            raise ValueError(f"ImageStore: image_format {image_format!r}; use 'jpg' or 'png'")
        self.root = Path(root)
        self.retention_days = retention_days
        self.retention_gb = retention_gb
        self.image_format = image_format
        self.jpeg_quality = jpeg_quality
        self.heatmap_alpha = heatmap_alpha

    def save(self, source_id: str, seq: int, frame: np.ndarray,
             anomaly_map: np.ndarray | None = None, *, when: float | None = None,
             vmax: float | None = None) -> SavedImages:
        """Write the frame and (given a map) its heatmap overlay.

        The heatmap colours run from the map's minimum to `vmax` (default: the map's
        maximum); pass the threshold × 2, say, to compare heatmaps across frames.
        """
        day = dt.date.fromtimestamp(time.time() if when is None else when).isoformat()
        stem = f"{re.sub(r'[^A-Za-z0-9_.-]', '_', source_id)}_{seq}"
        folder = self.root / day
        bgr = _to_bgr(frame)
        frame_path = self._write(folder / f"{stem}_frame.{self.image_format}", bgr)
        heatmap_path = None
        if anomaly_map is not None:
            overlay = heatmap_overlay(bgr, anomaly_map, vmax=vmax, alpha=self.heatmap_alpha)
            heatmap_path = self._write(folder / f"{stem}_heatmap.{self.image_format}", overlay)
        return SavedImages(frame_path, heatmap_path)

    def _write(self, path: Path, image: np.ndarray) -> str | None:
        params = [cv2.IMWRITE_JPEG_QUALITY, self.jpeg_quality] if self.image_format == "jpg" else []
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            if not cv2.imwrite(str(path), image, params):
                raise OSError("cv2.imwrite returned False")
        except (OSError, cv2.error) as exc:
            logger.error("could not save %s (%s); the defect is logged without it — is the "
                         "disk full or the folder not writable?", path, exc)
            try:
                path.unlink(missing_ok=True)         # no half-written picture
            except OSError:
                pass
            return None
        return str(path)

    def enforce_retention(self, now: float | None = None) -> int:
        """Delete the oldest images beyond retention_days / retention_gb; returns files deleted."""
        if not self.root.is_dir():
            return 0
        now = time.time() if now is None else now
        deleted = 0
        days = sorted(d for d in self.root.iterdir() if d.is_dir() and _DAY_FOLDER.match(d.name))

        if self.retention_days is not None:
            cutoff = dt.date.fromtimestamp(now - self.retention_days * 86400).isoformat()
            for folder in [d for d in days if d.name < cutoff]:
                deleted += sum(1 for f in folder.rglob("*") if f.is_file())
                shutil.rmtree(folder, ignore_errors=True)
                days.remove(folder)
                logger.info("image retention: removed %s (older than %g days)", folder,
                            self.retention_days)

        if self.retention_gb is not None:
            limit = self.retention_gb * 1024**3
            # Oldest first: by day folder, then by modification time within the day.
            files = [(d.name, f.stat().st_mtime, f.stat().st_size, f)
                     for d in days for f in d.iterdir() if f.is_file()]
            files.sort(key=lambda item: (item[0], item[1]))
            total = sum(size for _, _, size, _ in files)
            for _, _, size, path in files:
                if total <= limit:
                    break
                path.unlink(missing_ok=True)
                total -= size
                deleted += 1
            for folder in days:
                if folder.is_dir() and not any(folder.iterdir()):
                    folder.rmdir()
            if deleted:
                logger.info("image retention: %d file(s) deleted to stay under %g GB",
                            deleted, self.retention_gb)
        return deleted


def _to_bgr(frame: np.ndarray) -> np.ndarray:
    image = np.asarray(frame)
    if image.dtype != np.uint8:
        # Float frames are taken as 0..1.
        scale = 255.0 if np.issubdtype(image.dtype, np.floating) else 1.0
        image = np.clip(image * scale, 0, 255).astype(np.uint8)
    if image.ndim == 2:
        image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    return image


def heatmap_overlay(frame_bgr: np.ndarray, anomaly_map: np.ndarray, *,
                    vmax: float | None = None, alpha: float = 0.5) -> np.ndarray:
    """JET colours of the anomaly map, resized to the frame and blended over it."""
    h, w = frame_bgr.shape[:2]
    amap = cv2.resize(np.asarray(anomaly_map, np.float32), (w, h),
                      interpolation=cv2.INTER_LINEAR)
    lo = float(amap.min())
    hi = float(amap.max()) if vmax is None else float(vmax)
    scaled = np.clip((amap - lo) / max(hi - lo, 1e-12), 0.0, 1.0)
    colours = cv2.applyColorMap((scaled * 255).astype(np.uint8), cv2.COLORMAP_JET)
    return cv2.addWeighted(colours, alpha, frame_bgr, 1.0 - alpha, 0.0)


# --- reader / operator side -------------------------------------------------------------------


@dataclass(frozen=True)
class DefectView:
    id: int
    run_id: int | None
    time: float
    source_id: str
    seq: int
    part_id: int | None
    encoder: int | None
    raw_score: float | None
    calibrated_score: float | None
    threshold: float | None
    verdict: str
    reason: str
    box: tuple[int, int, int, int] | None
    area_px: int
    frame_path: str | None
    heatmap_path: str | None
    acknowledged: bool

    @classmethod
    def from_row(cls, row: DefectRow) -> DefectView:
        box = (row.x0, row.y0, row.x1, row.y1) if row.x0 is not None else None
        return cls(row.id, row.run_id, row.time, row.source_id, row.seq, row.part_id,
                   row.encoder, row.raw_score, row.calibrated_score, row.threshold,
                   row.verdict, row.reason, box, row.area_px, row.frame_path,
                   row.heatmap_path, bool(row.acknowledged))


@dataclass(frozen=True)
class RejectEventView:
    id: int
    defect_id: int | None
    source_id: str
    part_id: int | None
    issued_at: float
    due_encoder: int | None
    due_time: float | None
    fired_at: float | None
    sinks_ok: tuple[str, ...]
    sinks_failed: tuple[str, ...]
    acknowledged_at: float | None


@dataclass(frozen=True)
class OperatorActionView:
    id: int
    defect_id: int
    time: float
    operator: str
    action: str
    comment: str | None


@dataclass(frozen=True)
class DefectDetail:
    defect: DefectView
    reject_events: tuple[RejectEventView, ...]
    actions: tuple[OperatorActionView, ...]


class DefectNotFoundError(LookupError):
    pass


EXPORT_COLUMNS = ("id", "run_id", "time", "time_iso", "source_id", "seq", "part_id", "encoder",
                  "raw_score", "calibrated_score", "threshold", "verdict", "reason", "x0", "y0",
                  "x1", "y1", "area_px", "frame_path", "heatmap_path", "acknowledged")


class DefectLogReader:
    """Operators' side: short sessions of its own, never the writer's.

    Acknowledgements and comments are small single-row transactions; WAL and busy_timeout
    make them safe next to the running writer.
    """

    def __init__(self, url_or_path: str | os.PathLike, *, busy_timeout_ms: int = 5000) -> None:
        self.url = database_url(url_or_path)
        path = sqlite_path(self.url)
        if path is not None and not path.exists():
            raise FileNotFoundError(
                f"no defect log at {path}; start the line first (it creates the database), "
                "or check the database path / URL"
            )
        self.engine = open_database(self.url, busy_timeout_ms=busy_timeout_ms)

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> DefectLogReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- reading ------------------------------------------------------------------------

    def _query(self, since: float | None, until: float | None, source: str | None,
               unacked_only: bool, limit: int | None, newest_first: bool):
        query = select(DefectRow)
        if since is not None:
            query = query.where(DefectRow.time >= since)
        if until is not None:
            query = query.where(DefectRow.time < until)
        if source is not None:
            query = query.where(DefectRow.source_id == source)
        if unacked_only:
            query = query.where(DefectRow.acknowledged.is_(False))
        order = (DefectRow.time.desc(), DefectRow.id.desc()) if newest_first else (
            DefectRow.time, DefectRow.id)
        query = query.order_by(*order)
        return query.limit(limit) if limit is not None else query

    def list_defects(self, since: float | None = None, source: str | None = None,
                     unacked_only: bool = False, limit: int | None = 100, *,
                     until: float | None = None) -> list[DefectView]:
        """Newest first."""
        with self.engine.connect() as conn:
            rows = conn.execute(self._query(since, until, source, unacked_only, limit, True))
            return [DefectView.from_row(row) for row in rows]

    def get_defect(self, defect_id: int) -> DefectDetail:
        with self.engine.connect() as conn:
            row = conn.execute(select(DefectRow).where(DefectRow.id == defect_id)).first()
            if row is None:
                raise DefectNotFoundError(self._not_found(defect_id))
            rejects = conn.execute(select(RejectEventRow).where(
                RejectEventRow.defect_id == defect_id).order_by(RejectEventRow.id))
            actions = conn.execute(select(OperatorActionRow).where(
                OperatorActionRow.defect_id == defect_id).order_by(OperatorActionRow.id))
            return DefectDetail(
                defect=DefectView.from_row(row),
                reject_events=tuple(
                    RejectEventView(r.id, r.defect_id, r.source_id, r.part_id, r.issued_at,
                                    r.due_encoder, r.due_time, r.fired_at, tuple(r.sinks_ok),
                                    tuple(r.sinks_failed), r.acknowledged_at)
                    for r in rejects),
                actions=tuple(OperatorActionView(a.id, a.defect_id, a.time, a.operator,
                                                 a.action, a.comment) for a in actions),
            )

    def _not_found(self, defect_id: int) -> str:
        return (f"no defect with id {defect_id} in {self.url}; list recent ones with "
                "list_defects() (grad-edge defects list)")

    # --- operator actions ---------------------------------------------------------------

    def acknowledge(self, defect_id: int, operator: str, comment: str | None = None) -> None:
        self._act(defect_id, operator, "ack", comment, acknowledges=True)

    def mark_false_positive(self, defect_id: int, operator: str,
                            comment: str | None = None) -> None:
        # Judging it a false positive is also looking at it: it counts as acknowledged.
        self._act(defect_id, operator, "false_positive", comment, acknowledges=True)

    def comment(self, defect_id: int, operator: str, comment: str) -> None:
        if not comment or not comment.strip():
            raise ValueError("comment is empty; write what you want recorded")
        self._act(defect_id, operator, "comment", comment, acknowledges=False)

    def _act(self, defect_id: int, operator: str, action: str, comment: str | None,
             acknowledges: bool) -> None:
        if not operator or not operator.strip():
            raise ValueError("operator name is empty; actions are recorded with who took them")
        now = time.time()
        with self.engine.connect() as conn:
            _begin_write(conn)
            if conn.execute(select(DefectRow.id).where(DefectRow.id == defect_id)).first() is None:
                raise DefectNotFoundError(self._not_found(defect_id))
            if acknowledges:
                conn.execute(update(DefectRow).where(DefectRow.id == defect_id)
                             .values(acknowledged=True))
                conn.execute(update(RejectEventRow)
                             .where(RejectEventRow.defect_id == defect_id,
                                    RejectEventRow.acknowledged_at.is_(None))
                             .values(acknowledged_at=now))
            conn.execute(insert(OperatorActionRow).values(
                defect_id=defect_id, time=now, operator=operator.strip(), action=action,
                comment=comment))
            conn.commit()
        logger.info("defect %d: %s by %s", defect_id, action, operator)

    # --- exports ------------------------------------------------------------------------

    def _export_rows(self, since, until, source, unacked_only, limit) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            rows = conn.execute(self._query(since, until, source, unacked_only, limit, False))
            out = []
            for row in rows:
                record = {name: getattr(row, name) for name in EXPORT_COLUMNS if name != "time_iso"}
                record["time_iso"] = dt.datetime.fromtimestamp(
                    row.time, dt.timezone.utc).isoformat()
                record["acknowledged"] = bool(row.acknowledged)
                out.append({name: record[name] for name in EXPORT_COLUMNS})
            return out

    def export_csv(self, path: str | os.PathLike, *, since: float | None = None,
                   until: float | None = None, source: str | None = None,
                   unacked_only: bool = False, limit: int | None = None) -> int:
        """Write the matching defects, oldest first, to a CSV file; returns the row count."""
        rows = self._export_rows(since, until, source, unacked_only, limit)
        with open(path, "w", newline="", encoding="utf-8") as out:
            writer = csv.DictWriter(out, fieldnames=EXPORT_COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
        return len(rows)

    def export_jsonl(self, path: str | os.PathLike, *, since: float | None = None,
                     until: float | None = None, source: str | None = None,
                     unacked_only: bool = False, limit: int | None = None) -> int:
        """Write the matching defects, oldest first, one JSON object a line; returns the count."""
        rows = self._export_rows(since, until, source, unacked_only, limit)
        with open(path, "w", encoding="utf-8") as out:
            out.writelines(json.dumps(row) + "\n" for row in rows)
        return len(rows)


def format_defect_table(rows: Sequence[DefectView]) -> str:
    """A plain-text table for the terminal."""
    if not rows:
        return "(no defects)"
    header = ("id", "time", "source", "seq", "part", "verdict", "score", "thr", "area", "ack",
              "reason")
    lines = [header]
    for r in rows:
        lines.append((
            str(r.id),
            dt.datetime.fromtimestamp(r.time).strftime("%Y-%m-%d %H:%M:%S"),
            r.source_id,
            str(r.seq),
            "-" if r.part_id is None else str(r.part_id),
            r.verdict,
            "-" if r.raw_score is None else f"{r.raw_score:.3g}",
            "-" if r.threshold is None else f"{r.threshold:.3g}",
            str(r.area_px),
            "yes" if r.acknowledged else "no",
            r.reason if len(r.reason) <= 60 else r.reason[:57] + "...",
        ))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    rendered = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip()
                for line in lines]
    rendered.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(rendered)
