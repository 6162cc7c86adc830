"""Who hands out the ids of defects, rejects and alarms: the writer, before the row lands.

The id is known when ``submit`` returns (a reject names its defect, the journal replays
idempotently by it) and even before (``reserve_defect_id`` names the saved images). So the
writer cannot wait for the database's insert to number a record; and it must keep numbering
while the database is away, since the records then wait in its journal.

**SQLite** (:class:`FileIds`): one writer owns the file (its journal lock says so), so each
table's next id is max(id) + 1 of what the database and the replayed journal hold, counted on
in memory. Dense ids, no round trip.

**PostgreSQL** (:class:`SequenceIds`): many writers (runs, hosts) share the database, so
max + 1 would hand two of them the same id. Each table has a sequence (migrations 1, 3, 4);
every writer keeps a pool of ids drawn from it (`pool_size`, drawn in one query), and a thread
of its own tops a pool up as soon as it falls to half, so ``take`` does not wait on the
network. A sequence never gives a number twice, whoever asks, so ids cannot collide across
writers, runs or hosts; they stay small and nearly dense (a writer's unused pool is a gap).

A pool that runs dry while the server answers (a burst of records faster than a refill) was
too small for this line: it is doubled (up to `MAX_POOL`) and ``take`` waits for the refill,
at most `DRY_WAIT_S`. If the server does not deliver in that time (it is away), the writer does
not stop numbering, nor wait again until a refill works: it goes on in its **offline range**,
``2**62 + writer * 2**32 + n``, where ``writer`` is the number this writer drew from the
``defect_log_writers`` sequence at open (so no other writer, anywhere, has the same range)
and n counts from 0. These ids are large and ugly but unique, and pool ids come back as soon
as the pool is refilled.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Iterable, Mapping

from sqlalchemy import Engine, func, select, text

from edge.defect_log.inserts import ID_TABLES
from edge.defect_log.records import LogRecord

logger = logging.getLogger(__name__)

OFFLINE_BASE = 1 << 62          # above any sequence a plant will reach; below 2**63
OFFLINE_SPAN = 1 << 32          # offline ids per writer
MAX_POOL = 4096                 # a pool's ceiling when it grows
DRY_WAIT_S = 0.1                # how long `take` waits for a refill when its pool is dry


class FileIds:
    """SQLite: per table, max(id) + 1 over the database and the records being replayed."""

    def __init__(self, engine: Engine, replayed: Iterable[LogRecord]) -> None:
        replayed = list(replayed)
        with engine.connect() as conn:
            self._next = {cls: 1 + max(
                conn.execute(select(func.max(table.id))).scalar() or 0,
                *(r.id or 0 for r in replayed if isinstance(r, cls)), 0)
                for cls, table in ID_TABLES.items()}
        self._lock = threading.Lock()

    def take(self, cls: type) -> int:
        with self._lock:
            record_id = self._next[cls]
            self._next[cls] += 1
            return record_id

    def close(self) -> None:
        pass


class SequenceIds:
    """PostgreSQL: a pool per table drawn from its sequence; an offline range when dry.

    Built at open (the server must answer then: it also numbers this writer, and fills the
    pools). ``take`` never touches the database (when its pool is dry it may wait up to
    DRY_WAIT_S for the refill thread); the refill thread does, retrying with back-off while
    the server is away. ``close`` stops that thread.
    """

    def __init__(self, engine: Engine, *, pool_size: int = 256, retry_max_s: float = 2.0
                 ) -> None:
        if pool_size < 1:
            raise ValueError(f"id pool_size {pool_size}: must be at least 1")
        self.engine = engine
        self.pool_size = pool_size
        self.retry_max_s = retry_max_s
        self._pools: Mapping[type, deque[int]] = {cls: deque() for cls in ID_TABLES}
        self._lock = threading.Lock()
        self._refilled = threading.Condition(self._lock)
        self._low = threading.Event()           # a pool is at or below half: refill
        self._closed = threading.Event()
        self._reachable = True                  # the last refill worked
        with engine.connect() as conn:
            self.writer_number = conn.execute(text("SELECT nextval('defect_log_writers')")
                                              ).scalar_one()
            conn.commit()
        if self.writer_number >= OFFLINE_BASE // OFFLINE_SPAN:
            raise RuntimeError("defect_log_writers sequence exhausted (2**30 writers)")
        self._offline_next = OFFLINE_BASE + self.writer_number * OFFLINE_SPAN
        self.offline_taken = 0      # ids handed out from the offline range
        self.refill()
        self._thread = threading.Thread(target=self._refill_loop, name="defect-log-ids",
                                        daemon=True)
        self._thread.start()

    def take(self, cls: type) -> int:
        grown = None
        with self._lock:
            pool = self._pools[cls]
            if len(pool) <= self.pool_size // 2 + 1:
                self._low.set()
            if not pool and self._reachable:
                if self.pool_size < MAX_POOL:
                    self.pool_size = grown = min(2 * self.pool_size, MAX_POOL)
                if not self._refilled.wait_for(lambda: pool, timeout=DRY_WAIT_S):
                    self._reachable = False     # away: no more waiting until a refill works
            if pool:
                record_id = pool.popleft()
                if grown:
                    logger.info("defect log: the %s id pool ran dry while the database "
                                "answered; drawing %d at a time from now on",
                                ID_TABLES[cls].__tablename__, grown)
                return record_id
            record_id = self._offline_next
            self._offline_next += 1
            self.offline_taken += 1
        if self.offline_taken == 1 or self.offline_taken % 1000 == 0:
            logger.warning("defect log: no %s ids left in the pool (the database is "
                           "unreachable, or slower than the records come); numbering from "
                           "this writer's offline range (%d taken so far, e.g. %d)",
                           ID_TABLES[cls].__tablename__, self.offline_taken, record_id)
        return record_id

    def wants_refill(self) -> bool:
        with self._lock:
            return any(len(pool) <= self.pool_size // 2 for pool in self._pools.values())

    def _refill_loop(self) -> None:
        delay = 0.05
        while not self._closed.is_set():
            self._low.wait(timeout=1.0)
            if self._closed.is_set():
                return
            self._low.clear()
            if not self.wants_refill():
                continue
            try:
                self.refill()
            except Exception as exc:            # the server is away: try again later
                self._reachable = False
                logger.debug("defect log: could not draw ids (%s); retrying in %.2f s",
                             str(exc).splitlines()[0] if str(exc) else exc, delay)
                self._closed.wait(delay)
                delay = min(2 * delay, self.retry_max_s)
                self._low.set()
                continue
            self._reachable, delay = True, 0.05

    def close(self) -> None:
        self._closed.set()
        self._low.set()
        self._thread.join(5.0)

    def refill(self) -> None:
        """Top every pool at or below half up to pool_size, one query per table."""
        for cls, pool in self._pools.items():
            with self._lock:
                missing = self.pool_size - len(pool)
            if missing < max(1, self.pool_size // 2):
                continue
            table = ID_TABLES[cls].__tablename__
            with self.engine.connect() as conn:
                drawn = sorted(conn.execute(
                    text(f"SELECT nextval('{table}_id_seq') FROM generate_series(1, :n)"),
                    {"n": missing}).scalars())
                conn.commit()
            with self._lock:
                pool.extend(drawn)
                self._refilled.notify_all()
