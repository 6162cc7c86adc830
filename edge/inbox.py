"""The worker's intake: one inbox per source, and the batcher that takes from all of them.

  Inbox       one PULL socket per source, read by its own thread into a bounded queue whose
              kind is the source's drop policy (every_frame blocks -> backpressure to the
              producer; latest drops the oldest and counts it). Heartbeats and end-of-stream
              are noted here; corrupt messages and other runs' messages are counted and
              dropped, and nothing a message does stops the thread. A tcp source's socket
              is a CURVE server (edge.security) whose refused handshakes are counted; a
              shm source's frames come through a frame ring (edge.ring).
  Batcher     takes frames from all inboxes into micro-batches (max batch, max wait),
              round-robin so a busy source cannot starve the rest.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field

import zmq

from edge import protocol
from edge.protocol import DropPolicy, EndOfStream, Frame, Heartbeat, ProtocolError, RingFrame
from edge.ring import RingReceiver
from edge.security import CurveGate, HandshakeCounts, HandshakeWatch, ServerKeys, zap_domain

log = logging.getLogger(__name__)


# --- Inbox: one source's socket, reader thread and queue ---------------------------------------

@dataclass
class InboxStats:
    """What one source's inbox has seen. Written by the inbox thread only."""

    received: int = 0            # frames of this run and source, offered to the queue
    corrupt: int = 0             # messages that failed to decode (ProtocolError)
    foreign: int = 0             # well-formed messages of another run (another run token)
    misrouted: int = 0           # well-formed messages of this run naming another source
    errors: int = 0              # anything else that went wrong in the inbox thread
    heartbeats: int = 0
    # The producer's own accounting, from its latest heartbeat or its end-of-stream:
    producer_captured: int = 0   # frames the source produced
    producer_sent: int = 0       # frames it handed to ZeroMQ
    producer_dropped: int = 0    # frames it dropped (latest policy) or could not encode
    producer_unsent: int = 0     # frames still in its queue when it stopped
    # When the source was last known alive: its last message of this run, or the inbox was
    # still waiting to queue its frame (every_frame backpressure: we were not listening).
    last_seen: float = field(default_factory=time.monotonic)
    last_frame_at: float = field(default_factory=time.monotonic)  # when a frame last came
    last_seq: int = -1
    held_at_stop: int = 0        # a frame received but still waiting for queue room at stop
    seq_gaps: int = 0            # seqs that never arrived: parts the camera did not deliver
                                 # (a stall, a restart on a moving belt, an unreadable frame,
                                 # a frame the producer dropped)
    ended: bool = False
    eos_reason: str = ""
    # A remote producer restarted within the run starts its counters afresh (a new `producer`
    # life token): the last counters of each earlier life are kept here.
    producer: str | None = None  # the current life's token, when the producer says
    lives: int = 0               # producer lives seen (0 when it never said)
    earlier_captured: int = 0
    earlier_sent: int = 0
    earlier_dropped: int = 0
    earlier_unsent: int = 0


class _LogEvery:
    """Lets a repeated warning through at most once per `every_s`, with the count since the
    last line: one bad producer must not flood the log."""

    def __init__(self, every_s: float):
        self.every_s = every_s
        self._last = float("-inf")
        self._since = 0

    def due(self) -> int:
        """Count one occurrence; returns how many to report now, or 0 to stay quiet."""
        self._since += 1
        now = time.monotonic()
        if now - self._last < self.every_s:
            return 0
        n, self._since, self._last = self._since, 0, now
        return n


class Inbox:
    """Receives one source's messages. The worker binds; the producer connects to `endpoint`.

    With a `run_id` (the run token, `protocol.new_run_id()`) it takes only that run's
    messages: any other run's are counted in `stats.foreign` and dropped, so a producer left
    over from a killed run cannot feed this one. With None it takes any run's.

    Nothing a message does stops the thread: a message that fails to decode is counted in
    `corrupt`, a well-formed one for another run or source in `foreign` / `misrouted`, and
    anything else that goes wrong in here in `errors` (its traceback logged the first time
    for each kind of error); the thread keeps reading. Warnings are rate-limited to one line
    per `log_every_s` per kind, with counts.

    tcp: with `curve` (the worker's key pair and the producer keys this source accepts) the
    socket is a CURVE server; `handshakes` counts who got in and who was refused. Without
    keys it binds loopback only. `ring`: frames may come through a shared-memory frame ring
    offered on the unix socket beside the (ipc) endpoint.
    """

    def __init__(self, ctx: zmq.Context, source_id: str, endpoint: str, policy: DropPolicy,
                 maxsize: int, arrived: threading.Event, *, run_id: str | None = None,
                 log_every_s: float = 5.0, curve: ServerKeys | None = None,
                 ring: bool = False):
        self.source_id = source_id
        self.policy = policy
        self.run_id = None if run_id is None else protocol.check_run_id(run_id)
        self.queue = protocol.make_queue(policy, maxsize, name=source_id)
        self.stats = InboxStats()
        # The source's EndOfStream is kept beside the queue, not in it: in a full `latest`
        # queue it would push out the newest frame, the one that policy exists to keep.
        self.end: EndOfStream | None = None
        self.end_taken = False
        self._arrived = arrived
        self._throttles = {k: _LogEvery(log_every_s) for k in
                           ("corrupt", "foreign", "misrouted", "errors")}
        self._errors_seen: set[type] = set()
        self._sock = ctx.socket(zmq.PULL)
        # A small receive high-water mark keeps every_frame backpressure tight: once our queue
        # is full we stop reading, and the producer blocks after a few more frames.
        self._sock.setsockopt(zmq.RCVHWM, 2)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._gate: CurveGate | None = None
        self.watch: HandshakeWatch | None = None
        self.ring: RingReceiver | None = None
        try:
            if endpoint.startswith("tcp://"):
                self._network(ctx, endpoint, curve)
            # Replaces a stale ipc socket file of a killed run; refuses a live one.
            self.endpoint = protocol.bind(self._sock, endpoint)
            if ring:
                self.ring = RingReceiver(protocol.ring_path(self.endpoint), source_id, run_id)
        except ValueError as exc:
            self._close()
            raise ValueError(f"source {source_id}: {exc}") from None
        self._thread = threading.Thread(target=self._run, name=f"inbox-{source_id}", daemon=True)

    def _network(self, ctx: zmq.Context, endpoint: str, curve: ServerKeys | None) -> None:
        protocol.keep_alive(self._sock)
        if curve is not None:
            # The gate is in place before the bind: no handshake can come before it.
            self._gate = CurveGate.acquire(ctx)
            self._gate.serve(self._sock, curve, zap_domain(self.source_id))
        elif not _loopback(endpoint):
            raise ValueError(f"binding {endpoint} beyond this host needs CURVE keys (network "
                             "keys in the config); only 127.0.0.1 may go without")
        self.watch = HandshakeWatch(self._sock, f"source {self.source_id}")

    @property
    def handshakes(self) -> HandshakeCounts:
        """Connections made, ended and refused (tcp sources; all 0 on ipc)."""
        return self.watch.counts if self.watch is not None else HandshakeCounts()

    def _close(self) -> None:
        if self.watch is not None:
            self.watch.close()
        self._sock.close(0)
        if self._gate is not None:
            self._gate.release()
            self._gate = None
        if self.ring is not None:
            self.ring.close()

    def start(self, stop: threading.Event) -> None:
        self._stop = stop
        self._thread.start()

    def join(self, timeout: float = 2.0) -> None:
        """Wait for the thread to finish (after stop), so its counters are final."""
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def dropped(self) -> int:
        return getattr(self.queue, "dropped", 0)

    def _put(self, item) -> bool:
        """Blocking put that still notices stop (every_frame queues block when full)."""
        while not self._stop.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                self._arrived.set()
                return True
            except queue.Full:
                # We hold the source's frame and cannot hear it while we wait: the model is
                # the bottleneck, not the source, which must not be reported silent for it.
                self.stats.last_seen = time.monotonic()
        self.stats.held_at_stop += 1     # received, never queued: unjudged at stop
        return False

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        if self.watch is not None:
            poller.register(self.watch.monitor, zmq.POLLIN)
        polled: set[int] = set()
        try:
            while not self._stop.is_set():
                try:
                    if self.ring is not None:
                        self.ring.sweep()
                        polled = _repoll(poller, polled, self.ring.fds())
                    events = dict(poller.poll(100))
                    if not events:
                        continue
                    if self.watch is not None and self.watch.monitor in events:
                        self.watch.read()
                    for fd in polled & set(events):
                        self.ring.ready(fd)
                    if self._sock in events:
                        if not self._take(self._sock.recv_multipart(copy=False)):
                            return
                except zmq.ContextTerminated:
                    return
                except Exception as exc:  # noqa: BLE001 - one message never stops a camera
                    if self._sock.closed:
                        return
                    self._unexpected(exc)
                    self._stop.wait(0.01)   # a fault that repeats must not spin a core
        finally:
            if self.watch is not None:
                self.watch.read()
            self._close()

    def _take(self, parts: list) -> bool:
        """One received message; False when this inbox is done (its end-of-stream, or stop)."""
        try:
            msg = protocol.decode(parts)
        except ProtocolError as exc:
            self.stats.corrupt += 1
            self._warn("corrupt", "dropped %d corrupt message(s) (%d in total), latest: %s",
                       exc)
            return True
        if self.run_id is not None and msg.run_id != self.run_id:
            self.stats.foreign += 1
            self._warn("foreign", "refused %d message(s) of another run (%d in total), latest "
                       "from run %s, this run is %s: is a producer of an earlier run still "
                       "running?", msg.run_id, self.run_id)
            return True
        if msg.source_id != self.source_id:
            self.stats.misrouted += 1
            self._warn("misrouted", "refused %d message(s) naming another source (%d in "
                       "total), latest from %r: two sources share one endpoint?",
                       msg.source_id)
            return True
        if isinstance(msg, RingFrame):
            try:
                if self.ring is None:
                    raise ProtocolError("a ring_frame on a source with no frame ring")
                msg = self.ring.frame(msg)
            except ProtocolError as exc:
                self.stats.corrupt += 1
                self._warn("corrupt", "dropped %d corrupt message(s) (%d in total), latest: %s",
                           exc)
                return True
        self.stats.last_seen = time.monotonic()
        if isinstance(msg, Frame):
            self.stats.received += 1
            self.stats.last_frame_at = self.stats.last_seen
            self.stats.seq_gaps += max(0, msg.seq - self.stats.last_seq - 1)
            self.stats.last_seq = max(self.stats.last_seq, msg.seq)
            return self._put(msg)
        self._new_life(msg.producer)
        self.stats.producer_captured = msg.frames_captured
        self.stats.producer_sent = msg.frames_sent
        self.stats.producer_dropped = msg.frames_dropped
        self.stats.producer_unsent = msg.frames_unsent
        if isinstance(msg, Heartbeat):
            self.stats.heartbeats += 1
            return True
        self.stats.eos_reason = msg.reason
        self.end = msg
        self._arrived.set()
        return False

    def _new_life(self, producer: str | None) -> None:
        st = self.stats
        if producer is None or producer == st.producer:
            return
        if st.producer is not None:
            # A new producer for this source within the run (a remote one restarted): keep
            # what the last one reported; its counters start again from 0.
            st.earlier_captured += st.producer_captured
            st.earlier_sent += st.producer_sent
            st.earlier_dropped += st.producer_dropped
            st.earlier_unsent += st.producer_unsent
            log.warning("source %s: a new producer (life %d) took over; the last one had "
                        "reported %d frame(s) captured", self.source_id, st.lives + 1,
                        st.producer_captured)
        st.producer = producer
        st.lives += 1

    def _warn(self, kind: str, fmt: str, *args) -> None:
        n = self._throttles[kind].due()
        if n:
            log.warning("source %s: " + fmt, self.source_id, n, getattr(self.stats, kind), *args)

    def _unexpected(self, exc: Exception) -> None:
        self.stats.errors += 1
        if type(exc) not in self._errors_seen:
            self._errors_seen.add(type(exc))
            log.exception("source %s: unexpected error in the inbox thread (%d so far); the "
                          "message is dropped and the inbox keeps reading", self.source_id,
                          self.stats.errors)
        else:
            self._warn("errors", "%d more unexpected error(s) in the inbox thread (%d in "
                       "total), latest: %r", exc)


def _loopback(endpoint: str) -> bool:
    host = endpoint[len("tcp://"):].rsplit(":", 1)[0]
    return host in ("127.0.0.1", "localhost", "[::1]", "::1")


def _repoll(poller: zmq.Poller, polled: set[int], fds: list[int]) -> set[int]:
    """Keep the poller's raw file descriptors in step with the frame ring's sockets."""
    now = set(fds)
    for fd in polled - now:
        poller.unregister(fd)
    for fd in now - polled:
        poller.register(fd, zmq.POLLIN)
    return now


# --- Batcher -----------------------------------------------------------------------------------

class Batcher:
    """Micro-batches across sources: up to `max_batch` frames, waiting at most `max_wait_s`
    after the first one. Sources are visited round-robin so a busy one can't starve the rest."""

    def __init__(self, inboxes: list[Inbox], max_batch: int, max_wait_s: float,
                 arrived: threading.Event):
        self.inboxes = inboxes
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self._arrived = arrived
        self._next = 0

    def _take(self, batch: list, ends: list[EndOfStream]) -> None:
        n = len(self.inboxes)
        for i in range(n):
            inbox = self.inboxes[(self._next + i) % n]
            while len(batch) < self.max_batch:
                # Read `end` before the queue: every frame is queued before `end` is set, so
                # an empty queue after a set `end` means the source is done.
                end = inbox.end
                try:
                    item = inbox.queue.get(block=False)
                except queue.Empty:
                    if end is not None and not inbox.end_taken:
                        inbox.end_taken = True
                        ends.append(end)
                    break
                batch.append(item)
        self._next = (self._next + 1) % max(n, 1)

    def next_batch(self, timeout: float) -> tuple[list[Frame], list[EndOfStream]]:
        """Frames for one model call and any end-of-stream markers met on the way."""
        batch: list[Frame] = []
        ends: list[EndOfStream] = []
        deadline = time.monotonic() + timeout
        while not batch and not ends:
            self._arrived.clear()
            self._take(batch, ends)
            if batch or ends:
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._arrived.wait(min(remaining, 0.05)):
                if time.monotonic() >= deadline:
                    return batch, ends
        fill_until = time.monotonic() + self.max_wait_s
        while len(batch) < self.max_batch and not ends:
            remaining = fill_until - time.monotonic()
            if remaining <= 0:
                break
            self._arrived.clear()
            self._take(batch, ends)
            if len(batch) < self.max_batch and not ends:
                self._arrived.wait(min(remaining, 0.002))
        return batch, ends
