"""The one writer of the defect log: a thread fed by a bounded queue.

One writer owns the database. The worker hands it records through a bounded queue and
moves on; the writer thread inserts them in batches, one transaction per batch. A defect
record is never dropped: when the database cannot be written (locked, disk full) the writer
keeps the records and retries with back-off; at shutdown whatever is still unwritten goes
to a JSONL spool file next to the database, which the next writer re-imports when it opens.
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import logging
import os
import queue
import socket
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from sqlalchemy import func, insert, select, update
from sqlalchemy.exc import DataError, IntegrityError

from edge.defect_log.engine import _begin_write, database_url, sqlite_path
from edge.defect_log.migrations import open_database
from edge.defect_log.records import (DefectRecord, LogRecord, RejectRecord, RunEndRecord,
                                     _read_spool, _record_to_json)
from edge.defect_log.tables import Base, DefectRow, RejectEventRow, RunRow

logger = logging.getLogger(__name__)

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

