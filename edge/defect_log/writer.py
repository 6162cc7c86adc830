"""The writer of the defect log: journal first, then a bounded queue to a writer thread.

One writer per SQLite database; on PostgreSQL, one writer per run, many at once (every run on
every host), each with its own journal on its own host (local_files.py).

What ``submit`` promises, and how:

1. The record gets its id (defects, rejects, alarms: handed out here, never by the database's
   insert; ids.py says how, for one writer and for many).
2. It is appended to the journal and fsynced (journal.py). From here on it survives SIGKILL
   or a power cut: the next writer replays the journal on open.
3. It is queued for the writer thread, which inserts batches, one transaction each, skipping
   ids already in the database (so a replay never duplicates a row).

When the database cannot be written (locked, disk full) the thread keeps the records and
retries with back-off; they are in the journal meanwhile. When the queue is full, the record
stays in the journal only and the thread reads it back from there once it has caught up
("catch-up"), so memory stays bounded and order is kept. At a clean stop everything committed
truncates the journal; whatever could not be written stays in it for the next start.

When the journal itself cannot be written (its disk is full, I/O error), ``submit`` logs an
ERROR that carries the whole record as JSON, counts it in ``journal_failures`` and keeps the
record in memory; it reaches the database as soon as that is writable. If it still has not
when the writer stops, it goes to the spool file (fsynced); if even that fails, a CRITICAL
log line carries it. A record never vanishes without a log line that holds it.

At open, after the replay, runs of this host left ``running`` by a process that is gone are
closed as ``crashed`` (runs.py). On PostgreSQL the replay also takes over the journals of this
host's writers that are gone (local_files.py): a crashed line's records land when the next
line on its host starts, whatever its run.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import insert
from sqlalchemy.exc import DataError, IntegrityError

from edge.defect_log.engine import (DefectLogError, begin_write, database_url, display_name,
                                    explain, is_disk_full, is_server, sqlite_path)
from edge.defect_log.ids import FileIds, SequenceIds
from edge.defect_log.inserts import ID_TABLES, insert_batch
from edge.defect_log.journal import Journal, WriterBusyError
from edge.defect_log.local_files import WriterFiles, default_folder
from edge.defect_log.migrations import open_database
from edge.defect_log.records import (AlarmRecord, DefectRecord, KeptFrameRecord, LogRecord,
                                     ProgressRecord, RejectRecord, RunEndRecord, record_to_json)
from edge.defect_log.runs import close_crashed_runs, process_start
from edge.defect_log.spool import SpoolFiles
from edge.defect_log.tables import RunRow

logger = logging.getLogger(__name__)


@dataclass
class _Entry:
    """A record on its way to the database, and where else it is safe meanwhile."""

    record: LogRecord
    journaled: bool             # in the journal: a crash cannot lose it
    from_spool: bool = False    # read from a spool file that stays on disk until it lands


class DefectLogWriter:
    """The writer of the defect log (see the module docstring for what ``submit`` keeps).

    SQLite: one writer per database. It hands out the ids, and it holds the journal's lock, so
    a second writer on the same database fails at open with a clear message.
    PostgreSQL: one writer per run, as many at once as there are runs; ids come from the
    database's sequences (`id_pool` of each kind drawn ahead, ids.py), and the journal and
    spool live in `journal_dir` (default: this host's state folder for the database,
    local_files.py), where the writers that open later take them over if this one dies.
    ``journal=False`` gives the old in-memory queue (records lost on SIGKILL): for the
    benchmark's comparison, and for throwaway databases. ``journal_fsync=False`` keeps the
    journal but skips its fsync: records survive SIGKILL, not a power cut (journal.Journal).
    """

    def __init__(
        self,
        url_or_path: str | os.PathLike,
        *,
        journal: bool = True,
        journal_fsync: bool = True,
        journal_path: str | os.PathLike | None = None,
        spool_path: str | os.PathLike | None = None,
        queue_size: int = 1000,
        batch_size: int = 64,
        busy_timeout_ms: int = 5000,
        retry_initial_s: float = 0.05,
        retry_max_s: float = 2.0,
        submit_timeout_s: float = 1.0,
        journal_rotate_bytes: int = 1 << 20,
        recover: bool = True,
        journal_dir: str | os.PathLike | None = None,
        id_pool: int = 256,
    ) -> None:
        self.url = database_url(url_or_path)
        self.name = display_name(self.url)       # for log lines: the file, or the URL
        self.engine = open_database(self.url, busy_timeout_ms=busy_timeout_ms)
        self.id_pool = id_pool
        # A server's writers each have their own files, in a folder of this host.
        self._files: WriterFiles | None = None
        if is_server(self.url):
            try:
                self._files = WriterFiles(journal_dir or default_folder(self.url))
            except OSError as exc:
                self.engine.dispose()
                raise DefectLogError(
                    f"defect log {self.name}: cannot use the folder for this writer's journal "
                    f"{journal_dir or default_folder(self.url)} ({exc}); give a writable "
                    "local folder (journal_dir, or set XDG_STATE_HOME)") from exc
            beside = self._files.path
        else:
            beside = _beside_database(self.url)
        self.journal_path = Path(journal_path) if journal_path else beside(".journal.jsonl")
        self.spool = SpoolFiles(Path(spool_path) if spool_path else beside(".spool.jsonl"))
        self.spool_path, self.failed_path = self.spool.path, self.spool.failed_path
        self.batch_size = batch_size
        self.busy_timeout_s = busy_timeout_ms / 1000.0
        self.retry_initial_s = retry_initial_s
        self.retry_max_s = retry_max_s
        self.submit_timeout_s = submit_timeout_s
        self.journal_rotate_bytes = journal_rotate_bytes

        self.written = 0            # records committed by this writer
        self.replayed = 0           # records read back from a journal or spool at open
        self.journal_failures = 0   # records the journal could not take (kept in memory)
        self.overflowed = 0         # records that found the queue full (kept in the journal)
        self._queue: queue.Queue[_Entry] = queue.Queue(maxsize=queue_size)
        self._lock = threading.Lock()      # id + journal append + enqueue as one step
        self._stopping = threading.Event()
        self._stopped = False
        self._deadline = float("inf")
        self._thread: threading.Thread | None = None
        self._catchup: int | None = None   # journal offset the thread must read back from

        self.journal_fsync = journal_fsync
        self._journal: Journal | None = self._open_journal() if journal else None
        try:
            self._load(recover)
        except BaseException as exc:
            if self._journal is not None:
                self._journal.close()
            if getattr(self, "_ids", None) is not None:
                self._ids.close()
            if self._files is not None:
                self._files.release(tidy=False)
            self.engine.dispose()
            if isinstance(exc, DefectLogError) or not isinstance(exc, Exception):
                raise
            raise explain(exc, self.url) from exc

    def _load(self, recover: bool) -> None:
        """Replay what an earlier writer left, set the id counters, recover."""
        replayed: list[LogRecord] = []
        if self._journal is not None:
            replayed, _ = self._journal.read()
        self._backlog: list[_Entry] = [_Entry(r, journaled=True) for r in replayed]
        if self._files is not None:
            if self._journal is not None:
                self._backlog += [_Entry(r, journaled=True)
                                  for r in self._files.take_over(self._journal)]
            else:
                logger.info("defect log %s: this writer has no journal, so it leaves the "
                            "files of writers that are gone to the next one that has",
                            self.name)
        self._backlog += self._take_spool()
        self.replayed = len(self._backlog)
        if self._backlog:
            logger.warning("defect log %s: replaying %d record(s) left by an earlier writer "
                           "(journal %s)", self.name, self.replayed, self.journal_path)
        self._spool_left = sum(e.from_spool for e in self._backlog)

        self._ids = (SequenceIds(self.engine, pool_size=self.id_pool,
                                 retry_max_s=self.retry_max_s)
                     if self._files is not None
                     else FileIds(self.engine, (e.record for e in self._backlog)))

        self.recovered_runs: list[int] = []     # runs this writer closed as crashed
        self._recovery_pending = recover
        self._recover()

    def _open_journal(self) -> Journal | None:
        try:
            return Journal(self.journal_path, fsync=self.journal_fsync)
        except WriterBusyError:
            if self._files is not None:
                self._files.release(tidy=True)
            self.engine.dispose()
            raise
        except OSError as exc:
            logger.error("defect log journal %s cannot be opened (%s): records are kept in "
                         "memory until they reach the database; a crash before then loses "
                         "them", self.journal_path, exc)
            return None

    def _take_spool(self) -> list[_Entry]:
        records, journaled = self.spool.take(self._journal)
        return [_Entry(r, journaled=journaled, from_spool=not journaled) for r in records]

    def _recover(self) -> None:
        """At open: land the replayed records, close crashed runs, empty the journal. If the
        database will not take them now, the thread keeps trying."""
        try:
            while self._backlog:
                batch = self._backlog[: self.batch_size]
                self._write_batch(batch)
                self._landed(batch)
            if self._recovery_pending:
                self.close_crashed_runs()
            self._maybe_rotate(force=True)
        except Exception as exc:
            logger.error("defect log %s: could not finish recovery at open (%s); the writer "
                         "thread keeps trying", self.name, explain(exc, self.url))

    # --- ids ----------------------------------------------------------------------------

    def reserve_defect_id(self) -> int:
        """A defect id for a record about to be submitted, e.g. to name its saved images."""
        return self._take_id(DefectRecord)

    def reserve_id(self, cls: type) -> int:
        """An id for a record of this kind about to be submitted (a kept frame's file)."""
        return self._take_id(cls)

    def _take_id(self, cls: type) -> int:
        return self._ids.take(cls)

    @property
    def offline_ids(self) -> int:
        """Ids handed out from this writer's offline range (PostgreSQL away too long; ids.py)."""
        return getattr(self._ids, "offline_taken", 0)

    def _with_id(self, record: LogRecord) -> LogRecord:
        cls = type(record)
        if cls in ID_TABLES and record.id is None:
            return dataclasses.replace(record, id=self._take_id(cls))
        return record

    # --- runs (begin_run is synchronous: the caller needs the id) -----------------------

    def begin_run(self, *, model_hash: str | None = None, config_hash: str | None = None,
                  config_path: str | None = None, host: str | None = None,
                  started_at: float | None = None, pid: int | None = None) -> int:
        """Open a run as `running`, owned by this process (pid and start token recorded)."""
        pid = os.getpid() if pid is None else pid
        try:
            with self.engine.connect() as conn:
                begin_write(conn)
                result = conn.execute(insert(RunRow).values(
                    started_at=time.time() if started_at is None else started_at,
                    model_hash=model_hash, config_hash=config_hash, config_path=config_path,
                    host=host or socket.gethostname(), pid=pid,
                    process_start=process_start(pid), status="running"))
                conn.commit()
        except Exception as exc:
            raise explain(exc, self.url) from exc
        run_id = result.inserted_primary_key[0]
        logger.info("defect log %s: run %d started", self.name, run_id)
        return run_id

    def note_progress(self, run_id: int, counters: dict[str, Any],
                      at: float | None = None) -> None:
        """Store `counters` as the run's latest snapshot (what a crashed run is closed with).

        A snapshot, not evidence: not journaled, and skipped when the queue is full.
        """
        record = ProgressRecord(run_id, time.time() if at is None else at, _plain(counters))
        with self._lock:
            if self._stopped:
                return
            try:
                self._queue.put_nowait(_Entry(record, journaled=False))
            except queue.Full:
                logger.debug("defect log queue full; progress snapshot of run %d skipped",
                             run_id)

    def end_run(self, run_id: int, summary: dict[str, Any] | None = None,
                stopped_at: float | None = None, *, status: str = "completed",
                exit_code: int | None = None) -> None:
        """Close a run: `status` is completed, failed or interrupted (crashed is set by
        recovery); journaled and queued like any record."""
        self.submit(RunEndRecord(run_id, time.time() if stopped_at is None else stopped_at,
                                 None if summary is None else _plain(summary), status,
                                 exit_code))

    def close_crashed_runs(self) -> list[int]:
        """Close, as crashed, this host's open runs whose process is gone (done at open)."""
        closed = close_crashed_runs(self.engine, lambda: self._take_id(RejectRecord))
        self.recovered_runs += closed
        self._recovery_pending = False
        return closed

    # --- submitting ---------------------------------------------------------------------

    def start(self) -> DefectLogWriter:
        if self._thread is not None:
            raise RuntimeError("DefectLogWriter.start() called twice; one thread per writer")
        # A daemon thread plus an exit hook: a forgotten stop() still flushes at interpreter
        # exit instead of hanging it.
        self._thread = threading.Thread(target=self._run, name="defect-log-writer", daemon=True)
        self._thread.start()
        atexit.register(self.stop)
        return self

    def submit(self, record: LogRecord) -> int | None:
        """Journal (fsynced) and queue a record; returns its id (defect, reject, alarm).

        When this returns, the record survives SIGKILL of the process (unless the journal
        could not be written: then an ERROR log line holds the record, see the module doc).
        """
        if isinstance(record, ProgressRecord):
            self.note_progress(record.run_id, record.counters, record.at)
            return None
        if not isinstance(record, (DefectRecord, RejectRecord, AlarmRecord, KeptFrameRecord,
                                   RunEndRecord)):
            raise TypeError(f"DefectLogWriter.submit takes a log record, not {record!r}")
        record = self._with_id(record)
        with self._lock:
            if self._stopped:
                logger.warning("defect log writer already stopped; spooling %s to %s",
                               type(record).__name__, self.spool_path)
                self.spool.spool([record])
                return getattr(record, "id", None)
            offset = self._journal_append(record)
            entry = _Entry(record, journaled=offset is not None)
            if self._catchup is not None and entry.journaled:
                self.overflowed += 1     # behind: stay in order, the thread reads it back
            else:
                try:
                    self._queue.put_nowait(entry)
                except queue.Full:
                    self._overflow(entry, offset)
        return getattr(record, "id", None)

    def _journal_append(self, record: LogRecord) -> int | None:
        if self._journal is None:
            return None
        try:
            return self._journal.append(record)
        except OSError as exc:
            self.journal_failures += 1
            logger.error("defect log journal %s cannot be written (%s): this record is kept "
                         "in memory only until it reaches the database (a crash before then "
                         "loses it; %d so far): %s", self.journal_path,
                         "disk full" if is_disk_full(exc) else exc, self.journal_failures,
                         record_to_json(record))
            return None

    def _overflow(self, entry: _Entry, offset: int | None) -> None:
        if offset is not None:
            self._catchup = offset
            self.overflowed += 1
            logger.warning("defect log queue full (%d records: the database is slow or "
                           "unwritable); records wait in the journal %s until the writer "
                           "catches up", self._queue.maxsize, self.journal_path)
            return
        if self._journal is None and not self._stopping.is_set():
            try:         # no journal: wait a little for room, as the line always did
                self._queue.put(entry, timeout=self.submit_timeout_s)
                return
            except queue.Full:
                pass
        logger.warning("defect log queue full and the record is in no journal; spooling %s "
                       "to %s", type(entry.record).__name__, self.spool_path)
        self.spool.spool([entry.record])

    @property
    def pending(self) -> int:
        """Records not yet committed (roughly: the thread may be mid-batch; records waiting
        in the journal after an overflow are not counted)."""
        return self._queue.qsize() + len(self._backlog)

    def stop(self, timeout: float = 10.0) -> None:
        """Write what is queued, trying for up to `timeout` s. What is still unwritten stays in
        the journal (or, when it is in none, goes to the spool file)."""
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
        with self._lock:
            self._stopped = True
            late: list[_Entry] = []
            while True:
                try:
                    late.append(self._queue.get_nowait())
                except queue.Empty:
                    break
        if self._thread is not None and self._thread.is_alive():
            logger.error("defect log writer thread did not finish within %.1f s; %d record(s) "
                         "may be unwritten (those in the journal %s are replayed at the next "
                         "start)", timeout, self.pending + len(late), self.journal_path)
            return                        # the thread still owns the backlog and journal
        left = [e for e in self._backlog + late if not isinstance(e.record, ProgressRecord)]
        self._backlog = []
        unsafe = [e.record for e in left if not e.journaled and not e.from_spool]
        if unsafe:
            logger.error("defect log %s still unwritable at shutdown: spooling %d record(s) "
                         "to %s; the next start imports them", self.name, len(unsafe),
                         self.spool_path)
            self.spool.spool(unsafe)
        kept = sum(e.journaled for e in left)
        if kept or self._catchup is not None:
            logger.warning("defect log %s: record(s) not yet in the database stay in the "
                           "journal %s; the next start replays them", self.name,
                           self.journal_path)
        elif not left:
            self._maybe_rotate(force=True)
        if self._journal is not None:
            self._journal.close()
        self._ids.close()
        if self._files is not None:
            # Nothing of ours left to land: no trace. Else the next writer takes it over.
            self._files.release(tidy=not left and self._catchup is None
                                and not self.spool_path.exists()
                                and (self._journal is None or self._journal.size == 0))
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
            if self._backlog:
                step = self._write_next_batch
                what = f"write {min(len(self._backlog), self.batch_size)} record(s)"
            elif self._catchup is not None:
                step, what = self._read_back, "read records back from the journal"
            elif self._recovery_pending:
                step, what = self.close_crashed_runs, "close crashed runs"
            else:
                self._maybe_rotate()
                if self._stopping.is_set():
                    break
                try:
                    self._backlog.append(self._queue.get(timeout=0.1))
                except queue.Empty:
                    pass
                continue

            try:
                step()
            except Exception as exc:
                failures += 1
                # First failure loudly; then quietly until it recovers.
                log = logger.error if failures == 1 else logger.debug
                log("defect log: could not %s: %s; keeping everything and retrying "
                    "(attempt %d, next in %.2f s)", what, explain(exc, self.url), failures,
                    delay)
                if self._stopping.is_set() and time.monotonic() + delay > self._deadline:
                    break
                time.sleep(delay)
                delay = min(delay * 2, self.retry_max_s)
                continue
            if failures:
                logger.warning("defect log %s writable again after %d failed attempt(s)",
                               self.name, failures)
            failures, delay = 0, self.retry_initial_s

    def _write_next_batch(self) -> None:
        batch = self._backlog[: self.batch_size]
        self._write_batch(batch)
        self._landed(batch)

    def _landed(self, batch: list[_Entry]) -> None:
        del self._backlog[: len(batch)]
        self.written += sum(not isinstance(e.record, ProgressRecord) for e in batch)
        if self._spool_left:
            self._spool_left -= sum(e.from_spool for e in batch)
            if self._spool_left == 0:
                self.spool.imported()

    def _fill_backlog(self) -> None:
        while len(self._backlog) < self.batch_size:
            try:
                self._backlog.append(self._queue.get_nowait())
            except queue.Empty:
                return

    def _read_back(self) -> None:
        """Catch up after an overflow: the next records from the journal, in order."""
        with self._lock:        # appends happen under it: no half-written line is read
            records, offset = self._journal.read(self._catchup, self.batch_size)
            if not records and offset >= self._journal.size:
                self._catchup = None
                logger.info("defect log %s caught up with its journal", self.name)
                return
            self._catchup = offset
        self._backlog.extend(_Entry(r, journaled=True) for r in records)

    def _maybe_rotate(self, force: bool = False) -> None:
        """Empty the journal once everything in it is committed (and it has grown)."""
        journal = self._journal
        if journal is None or journal.size == 0 or self._backlog or self._catchup is not None:
            return
        if not force and journal.size < self.journal_rotate_bytes:
            return
        with self._lock:
            if not self._queue.empty() or self._backlog or self._catchup is not None:
                return
            try:
                journal.truncate()
            except OSError as exc:
                logger.error("defect log journal %s could not be truncated (%s); it keeps "
                             "growing, and the next start replays what the database already "
                             "has (harmless, only slower)", self.journal_path, exc)

    def _write_batch(self, batch: list[_Entry]) -> None:
        try:
            insert_batch(self.engine, [e.record for e in batch])
        except (IntegrityError, DataError) as exc:
            # Not the database's state but a record it refuses (a bug upstream): find it,
            # set it aside, and keep the line's log flowing.
            if len(batch) == 1:
                self.spool.set_aside(batch[0].record, _short(exc))
                return
            for entry in batch:
                self._write_batch([entry])

    @property
    def spooled(self) -> int:
        """Records this writer had to put in the spool file."""
        return self.spool.spooled

    @property
    def set_aside(self) -> int:
        """Records the database refused (kept in failed_path)."""
        return self.spool.refused


def _beside_database(url: str):
    """Paths next to a SQLite file (defects.db -> defects.db<suffix>); in the cwd for an
    in-memory one."""
    path = sqlite_path(url)
    base = path if path is not None else Path("defect_log").resolve()
    return lambda suffix: base.with_name(base.name + suffix)


def _plain(obj: dict[str, Any]) -> dict[str, Any]:
    """A JSON-safe copy (numpy numbers and the like become plain values or strings), so one
    odd counter can never make a batch fail for ever."""
    return json.loads(json.dumps(obj, default=lambda v: v.item() if hasattr(v, "item")
                                 else str(v)))


def _short(exc: Exception) -> str:
    # SQLAlchemy's messages carry the whole SQL statement; the first line says what happened.
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
