"""Backpressure: what happens when frames come faster than the next stage takes them.

Named by :class:`DropPolicy` and built by :func:`make_queue`, for the producer's queue and
the worker's inbox alike. ``every_frame``: nothing is dropped; a bounded ``queue.Queue``
fills, its reader stops, ZeroMQ's high-water marks fill and the producer's ``send`` blocks.
``latest``: a :class:`LatestQueue`, which drops the *oldest* item when full and counts every
drop. (``edge.protocol`` re-exports these names: the wire format refers to them.)
"""

from __future__ import annotations

import collections
import enum
import logging
import queue
import threading
import time
from typing import Any

logger = logging.getLogger(__name__)


class DropPolicy(enum.Enum):
    """What happens when frames come faster than the model can take them."""

    EVERY_FRAME = "every_frame"   # nothing dropped: the producer waits (backpressure)
    LATEST = "latest"             # bounded queue, the oldest frame dropped, every drop counted


class LatestQueue:
    """A thread-safe bounded queue that drops the OLDEST item when full.

    ``put`` never blocks: a live line wants the newest frame, not a backlog. Every drop is
    counted in ``dropped``; drops are logged at most once per ``log_every_s`` with the
    count since the last line, so an overloaded line does not also flood the log.
    """

    def __init__(self, maxsize: int, name: str = "", log_every_s: float = 5.0):
        if maxsize < 1:
            raise ValueError(f"LatestQueue maxsize must be >= 1, got {maxsize}")
        self.maxsize = maxsize
        self.name = name
        self.dropped = 0
        self._items: collections.deque = collections.deque()
        self._cond = threading.Condition()
        self._log_every_s = log_every_s
        self._last_log = float("-inf")
        self._dropped_at_last_log = 0

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        """Append ``item``; when full, drop the oldest first. Never blocks (``block`` and
        ``timeout`` exist only so this matches ``queue.Queue.put``)."""
        with self._cond:
            if len(self._items) >= self.maxsize:
                self._items.popleft()
                self.dropped += 1
                self._maybe_log_drops()
            self._items.append(item)
            self._cond.notify()

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        """The oldest item kept; raises ``queue.Empty`` after ``timeout`` seconds (at once
        when ``block`` is False). Same signature as ``queue.Queue.get``."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._items, timeout=timeout if block else 0):
                raise queue.Empty
            return self._items.popleft()

    def qsize(self) -> int:
        with self._cond:
            return len(self._items)

    def _maybe_log_drops(self) -> None:
        now = time.monotonic()
        if now - self._last_log >= self._log_every_s:
            logger.warning(
                "queue %r full (maxsize %d): dropped %d oldest item(s) since last report, "
                "%d in total; the consumer is slower than the source",
                self.name, self.maxsize, self.dropped - self._dropped_at_last_log, self.dropped,
            )
            self._last_log = now
            self._dropped_at_last_log = self.dropped


def make_queue(policy: DropPolicy | str, maxsize: int, name: str = "") -> queue.Queue | LatestQueue:
    """The queue a policy calls for.

    ``every_frame``: a blocking ``queue.Queue(maxsize)``; when it is full the reader stops,
    and backpressure travels upstream. ``latest``: a :class:`LatestQueue`.
    Both offer ``put(item)`` and ``get(timeout=...)`` raising ``queue.Empty`` (pass the
    timeout by keyword: ``queue.Queue.get``'s first parameter is ``block``).
    """
    policy = DropPolicy(policy)
    if maxsize < 1:
        raise ValueError(f"queue maxsize must be >= 1, got {maxsize} (0 would mean unbounded)")
    if policy is DropPolicy.LATEST:
        return LatestQueue(maxsize, name=name)
    return queue.Queue(maxsize)
