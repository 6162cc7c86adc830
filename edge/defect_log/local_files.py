"""Where a writer of a database server keeps its journal and spool, and who takes them over
when it is gone.

A SQLite database has one writer and a folder: its journal lies beside the file. A PostgreSQL
database has many writers at once (every run on every host) and no folder here. So each
writer keeps its files on its own host, in one folder per database::

    $XDG_STATE_HOME/grad-edge/defect-log/<host>_<port>_<database>/   (~/.local/state/...)
        w<pid>-<random>.lock              held (flock) while that writer is open
        w<pid>-<random>.journal.jsonl     its journal (journal.py)
        w<pid>-<random>.spool.jsonl       its spool, and .spool.jsonl.importing (spool.py)
        w<pid>-<random>.failed.jsonl      records the database refused, for a person

(or in the `journal_dir` given to the writer). The ``w<pid>-<random>`` token names one writer.

A writer that opens takes over the files of every other writer in the folder whose lock is
free: its process died (SIGKILL, power cut), or it stopped while the database was away and
left records behind. Their records go into the new writer's journal (one fsync) and their
files are deleted, so whatever a crashed or cut-off line had journaled lands once the
database answers, whichever line starts next on this host. ``.failed.jsonl`` files stay.

The folder must be on a local disk (flock over NFS is not to be trusted).
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import secrets
from pathlib import Path

from sqlalchemy import make_url

from edge.defect_log.journal import Journal, _fsync_dir, read_journal
from edge.defect_log.records import LogRecord
from edge.defect_log.spool import locked_file, read_spool

logger = logging.getLogger(__name__)

LOCK = ".lock"
JOURNAL = ".journal.jsonl"
SPOOL = ".spool.jsonl"
IMPORTING = ".spool.jsonl.importing"
# The files a writer that takes over moves into its journal; longest suffix first.
_TAKEN = (IMPORTING, JOURNAL, SPOOL, LOCK)


def default_folder(url: str) -> Path:
    """This host's folder for the writers of the database at `url`."""
    state = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    parsed = make_url(url)
    name = f"{parsed.host or 'localhost'}_{parsed.port or 5432}_{parsed.database or ''}"
    return Path(state) / "grad-edge" / "defect-log" / re.sub(r"[^A-Za-z0-9_.-]", "_", name)


class WriterFiles:
    """One writer's file set in `folder`: its lock (held from here to `release`) and the
    paths of its journal and spool."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.token = f"w{os.getpid()}-{secrets.token_hex(4)}"
        # Made under a name no one looks for, locked, then renamed: the lock file is never
        # seen unlocked while this writer lives, so no one takes its files over.
        making = self.path(".locking")
        self._lock_fd = os.open(making, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.replace(making, self.path(LOCK))
        _fsync_dir(self.folder)

    def path(self, suffix: str) -> Path:
        return self.folder / f"{self.token}{suffix}"

    @property
    def journal_path(self) -> Path:
        return self.path(JOURNAL)

    @property
    def spool_path(self) -> Path:
        return self.path(SPOOL)

    def take_over(self, journal: Journal) -> list[LogRecord]:
        """The records of every writer in the folder that is gone, now in `journal` (their
        files deleted). A writer still open, or files that cannot be moved, are left."""
        records: list[LogRecord] = []
        for token in sorted(self._other_tokens()):
            try:
                taken = self._take_over(token, journal)
            except OSError as exc:
                logger.error("defect log: could not take over the records of writer %s in %s "
                             "(%s); they stay there for the next writer", token, self.folder,
                             exc)
                continue
            if taken:
                logger.warning("defect log: took over %d record(s) of writer %s, which is "
                               "gone (%s)", len(taken), token, self.folder)
            records += taken
        return records

    def _other_tokens(self) -> set[str]:
        tokens = set()
        for entry in os.scandir(self.folder):
            for suffix in _TAKEN:
                if entry.name.endswith(suffix):
                    tokens.add(entry.name[: -len(suffix)])
                    break
        tokens.discard(self.token)
        return tokens

    def _take_over(self, token: str, journal: Journal) -> list[LogRecord]:
        lock_path = self.folder / f"{token}{LOCK}"
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return []                           # its writer is open
            try:
                if os.stat(lock_path).st_ino != os.fstat(fd).st_ino:
                    return []                       # another writer took it just now
            except FileNotFoundError:
                return []
            journal_path = self.folder / f"{token}{JOURNAL}"
            spool_path = self.folder / f"{token}{SPOOL}"
            importing_path = self.folder / f"{token}{IMPORTING}"
            with locked_file(importing_path) as importing, locked_file(spool_path) as spool:
                records: list[LogRecord] = []
                if journal_path.exists():
                    records += read_journal(journal_path)[0]
                if importing is not None:
                    records += read_spool(importing_path)
                if spool is not None:
                    records += read_spool(spool_path)
                journal.extend(records)             # here first, then gone from there
                for path in (journal_path, importing_path, spool_path):
                    path.unlink(missing_ok=True)
            lock_path.unlink(missing_ok=True)
            _fsync_dir(self.folder)
            return records
        finally:
            os.close(fd)

    def release(self, *, tidy: bool) -> None:
        """Let go of the lock; `tidy` (nothing of this writer is left to land): delete its
        journal and lock file too. Otherwise the next writer here takes its files over."""
        if self._lock_fd < 0:
            return
        if tidy:
            for suffix in (JOURNAL, LOCK):
                self.path(suffix).unlink(missing_ok=True)
        os.close(self._lock_fd)
        self._lock_fd = -1
