"""Files for records that reach neither the journal nor the database, and for refused ones.

**Spool** (``<database>.spool.jsonl``): plain JSONL, one ``record_to_json`` a line, fsynced,
for records that are in no journal and could not reach the database before the writer
stopped (the journal could not be written, or the writer runs without one), or that were
submitted after it stopped. The next writer takes them: into its journal when it has one (and
the file goes), else into ``.spool.jsonl.importing``, deleted once they have all landed.

**Failed** (``<database>.failed.jsonl``): records the database refused outright (a foreign
key to nothing: a bug upstream), each with the error, for a person to look at.

A spool file is appended and taken under an ``flock`` of its own (`locked_file`): a writer
that stopped may still spool a late record while another process takes its files over
(local_files.py), and neither may lose the other's lines.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from edge.defect_log.journal import Journal
from edge.defect_log.records import LogRecord, record_from_json, record_to_json

logger = logging.getLogger(__name__)


class SpoolFiles:
    """The spool, its `.importing` twin and the failed file of one defect log."""

    def __init__(self, spool_path: Path) -> None:
        self.path = spool_path
        self.importing_path = spool_path.with_name(spool_path.name + ".importing")
        failed_name = spool_path.name.replace(".spool", ".failed")
        if failed_name == spool_path.name:
            failed_name += ".failed.jsonl"
        self.failed_path = spool_path.with_name(failed_name)
        self.spooled = 0            # records put in the spool by this writer
        self.refused = 0            # records put in the failed file by this writer

    def take(self, journal: Journal | None) -> tuple[list[LogRecord], bool]:
        """Records an earlier writer spooled, and whether they are now in `journal`."""
        with locked_file(self.importing_path) as importing, locked_file(self.path) as spool:
            return self._take(journal, importing is not None, spool is not None)

    def _take(self, journal: Journal | None, importing: bool,
              spool: bool) -> tuple[list[LogRecord], bool]:
        records: list[LogRecord] = []
        for path, there in ((self.importing_path, importing), (self.path, spool)):
            if there:
                records += read_spool(path)
        if not records:
            return [], False
        if journal is not None:
            try:
                journal.extend(records)
            except OSError as exc:
                logger.error("defect log journal %s cannot take the spooled records (%s); "
                             "keeping them in %s until they land", journal.path, exc,
                             self.importing_path)
            else:
                self.path.unlink(missing_ok=True)
                self.importing_path.unlink(missing_ok=True)
                return records, True
        if self.path.exists():
            write_spool_atomically(self.importing_path, records)
            self.path.unlink()
        return records, False

    def imported(self) -> None:
        """Every record `take` kept in `.importing` has landed."""
        self.importing_path.unlink(missing_ok=True)

    def spool(self, records: list[LogRecord]) -> None:
        try:
            self.spooled += append_spool(self.path, records)
        except OSError:
            # Last resort: the log stream is the only place left.
            logger.critical("could not write the defect log spool %s; the records follow, "
                            "one per line:\n%s", self.path,
                            "\n".join(record_to_json(r) for r in records), exc_info=True)

    def set_aside(self, record: LogRecord, error: str) -> None:
        self.refused += 1
        line = json.dumps({"error": error, **json.loads(record_to_json(record))})
        logger.error("the defect log refused a %s (%s); kept in %s for a person to look at",
                     type(record).__name__, error, self.failed_path)
        try:
            with open(self.failed_path, "a", encoding="utf-8") as failed:
                failed.write(line + "\n")
                failed.flush()
                os.fsync(failed.fileno())
        except OSError:
            logger.critical("could not write %s; the refused record: %s", self.failed_path,
                            line, exc_info=True)


def read_spool(path: Path) -> list[LogRecord]:
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(record_from_json(line))
        except (ValueError, KeyError, TypeError) as exc:
            # Most likely the last line of a spool cut off by a crash.
            logger.error("defect log spool %s line %d is not a record (%s); skipping: %r",
                         path, number, exc, line[:200])
    return records


def append_spool(path: Path, records: Iterable[LogRecord]) -> int:
    """Append records to a spool file and fsync; returns how many. Raises OSError."""
    lines = [record_to_json(r) + "\n" for r in records]
    data = "".join(lines).encode("utf-8")
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)
        if _still_at(path, fd):
            break
        os.close(fd)            # taken (and deleted) while we waited: append to a new one
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    return len(lines)


@contextmanager
def locked_file(path: Path) -> Iterator[int | None]:
    """The file at `path`, opened and flocked (its fd), or None when there is none. Delete it
    inside the block to take it: an appender waiting for the lock then starts a new file."""
    while True:
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            yield None
            return
        fcntl.flock(fd, fcntl.LOCK_EX)
        if _still_at(path, fd):
            break
        os.close(fd)
    try:
        yield fd
    finally:
        os.close(fd)


def _still_at(path: Path, fd: int) -> bool:
    """Whether `fd` is still the file named `path` (not deleted or replaced meanwhile)."""
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def write_spool_atomically(path: Path, records: Iterable[LogRecord]) -> None:
    """Replace `path` with exactly these records (write beside it, fsync, rename)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as out:
        out.writelines(record_to_json(r) + "\n" for r in records)
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path)
