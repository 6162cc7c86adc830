"""The writer's journal: every record on disk, fsynced, before ``submit`` returns.

**Journal** (``<database>.journal.jsonl`` beside a SQLite file): every record ``submit``
takes is appended here and fsynced *before* ``submit`` returns, so a record survives SIGKILL
(and a power cut) at any point after that. The next writer replays it on open; records whose
id is already in the database are skipped, so replaying twice is harmless. Once everything in
the journal is committed (and it has grown past a size, or the writer stops cleanly), it is
truncated to nothing.

Format, one record a line::

    <crc32 of the JSON, 8 hex digits> <record_to_json(record)>\n

A line whose CRC does not match (the tail of a write cut by a crash, or damage) is skipped
with an ERROR naming the file and line; the record it held had not been acknowledged
(``submit`` had not returned), so nothing acknowledged is lost.

The journal also holds the one-writer rule: the writer takes an exclusive ``flock`` on it, so
a second writer on the same database (which would hand out the same ids) fails at once with
a clear message. The lock dies with its process, so a crash never leaves it stuck.

(The spool, for records in no journal, is in spool.py.)
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import zlib
from pathlib import Path

from edge.defect_log.engine import DefectLogError
from edge.defect_log.records import LogRecord, record_from_json, record_to_json

logger = logging.getLogger(__name__)


class WriterBusyError(DefectLogError):
    """Another writer holds this defect log's journal."""


def _fsync_dir(path: Path) -> None:
    """Make a file's creation (its directory entry) durable too."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def encode_line(record: LogRecord) -> bytes:
    body = record_to_json(record).encode("utf-8")
    return b"%08x " % zlib.crc32(body) + body + b"\n"


def decode_line(line: bytes) -> LogRecord:
    """The record of one journal line; ValueError when its CRC or JSON is wrong."""
    crc, sep, body = line.rstrip(b"\n").partition(b" ")
    if not sep or len(crc) != 8 or int(crc, 16) != zlib.crc32(body):
        raise ValueError("checksum does not match (a torn or damaged line)")
    return record_from_json(body.decode("utf-8"))


class Journal:
    """An fsynced append-only record file, locked by its one writer.

    ``append`` raises OSError when the file cannot be written (disk full, I/O error); the
    writer then keeps the record in memory and logs it (see DefectLogWriter.submit).

    ``fsync=False`` skips the fdatasync after each append: the record then survives the
    process being killed (the kernel still writes its page cache to disk) but not a power cut
    or a kernel crash. benchmarks/defect_log.py measures what the fsync costs.
    """

    def __init__(self, path: str | os.PathLike, *, fsync: bool = True) -> None:
        self.path = Path(path)
        self.fsync = fsync
        self.path.parent.mkdir(parents=True, exist_ok=True)
        created = not self.path.exists()
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(self._fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise WriterBusyError(
                    f"another grad-edge writer is using this defect log (it holds {self.path}); "
                    "stop that line first, or give this one its own database") from exc
            raise
        if created:
            _fsync_dir(self.path.parent)
        self.size = os.fstat(self._fd).st_size
        self._end_torn_tail()

    def _end_torn_tail(self) -> None:
        """A crash mid-write can leave a last line without its newline: end it, so the next
        append starts a line of its own (the torn one fails its checksum on replay)."""
        if self.size == 0:
            return
        with open(self.path, "rb") as f:
            f.seek(self.size - 1)
            if f.read(1) == b"\n":
                return
        logger.error("defect log journal %s ends in a partial line (a write cut by a crash; "
                     "its record had not been acknowledged)", self.path)
        os.write(self._fd, b"\n")
        os.fdatasync(self._fd)
        self.size += 1

    def append(self, record: LogRecord) -> int:
        """Write one record and fsync; returns the offset its line starts at."""
        line = encode_line(record)
        offset = self.size
        view = memoryview(line)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]
        if self.fsync:
            # fdatasync: the data and the file size, which is all a reader needs.
            os.fdatasync(self._fd)
        self.size += len(line)
        return offset

    def read(self, offset: int = 0, limit: int | None = None) -> tuple[list[LogRecord], int]:
        """Records from byte `offset` (at most `limit`); returns them and the offset after."""
        return read_journal(self.path, offset, limit)

    def extend(self, records: list[LogRecord]) -> None:
        """Append many records with one fsync (taking over another writer's records): all of
        them, or (OSError) none, so their other copy stays the only one."""
        if not records:
            return
        data = b"".join(encode_line(r) for r in records)
        start = self.size
        try:
            view = memoryview(data)
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
            os.fdatasync(self._fd)       # always: their other copy is deleted once here
        except OSError:
            try:
                os.ftruncate(self._fd, start)
            except OSError:
                pass                      # a torn tail: its checksum fails on replay
            raise
        self.size = start + len(data)

    def truncate(self) -> None:
        """Everything in it is committed: start it again from nothing."""
        os.ftruncate(self._fd, 0)
        os.fsync(self._fd)
        self.size = 0

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)           # releases the flock
            self._fd = -1


def read_journal(path: Path, offset: int = 0,
                 limit: int | None = None) -> tuple[list[LogRecord], int]:
    """Records of a journal file from byte `offset` (at most `limit`); returns them and the
    offset after. Torn or damaged lines are skipped with an ERROR naming the file and byte."""
    records: list[LogRecord] = []
    with open(path, "rb") as f:
        f.seek(offset)
        while limit is None or len(records) < limit:
            line = f.readline()
            if not line:
                break
            if not line.endswith(b"\n"):
                break                            # being appended right now: not yet
            try:
                records.append(decode_line(line))
            except (ValueError, KeyError, TypeError) as exc:
                logger.error("defect log journal %s byte %d is not a record (%s); "
                             "skipping: %r", path, offset, exc, line[:200])
            offset += len(line)
    return records, offset
