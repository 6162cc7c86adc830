"""The producer: pushes one source's frames to the worker, and its process entry point.

A :class:`Producer` owns one ZeroMQ PUSH socket and sends one source's frames over it, with
heartbeats while the source is idle and an :class:`~edge.protocol.EndOfStream` at the end.
:func:`run_producer` is the thin entry point for running one producer as its own process;
:func:`die_with_parent` makes sure it never outlives the line that started it.

Like the sources, it imports only the wire format plus numpy and zmq: no torch.
"""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import os
import queue
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Iterator

import zmq

from camera_sources.base import FrameSource, SourceSpec, StopEvent, build_source
from edge import protocol
from edge.protocol import DropPolicy, EndOfStream, Frame, Heartbeat
from edge.ring import RingWriter
from edge.security import ClientKeys, apply_client

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------- the producer


@dataclass(frozen=True)
class ProducerStats:
    """What a producer did, returned by :meth:`Producer.run`."""

    source_id: str
    run_id: str                  # the run token every message carried
    frames_captured: int         # = frames_sent + frames_dropped + frames_unsent
    frames_sent: int
    frames_dropped: int          # by the latest policy's queue, or refused by the encoder
    frames_unsent: int           # captured but still queued (or refused) when stopped
    heartbeats_sent: int
    last_seq: int
    reason: str                  # the EndOfStream reason
    eos_delivered: bool          # False when the consumer never took the EndOfStream
    frames_in_ring: int = 0      # of frames_sent, those whose pixels went through the ring
    frames_captured_in_ring: int = 0   # of those, captured straight into their slot (no copy)


@dataclass(frozen=True)
class _SourceEnded:
    """Reader thread -> send loop: the source's generator has returned (or raised)."""

    reason: str


class Producer:
    """Pushes one source's frames over a ZeroMQ PUSH socket.

    Two threads, one socket: a reader thread pulls frames from the source into a small
    queue (``make_queue(policy, queue_size)``); the calling thread owns the socket and sends
    frames, a :class:`Heartbeat` every ``heartbeat_s`` (also while the source is idle: it
    waits on the queue with a timeout) and an :class:`EndOfStream` at the end. Every message
    carries ``run_id``, the run token (a fresh :func:`~edge.protocol.new_run_id` when None):
    a worker started for one run refuses the messages of another.

    Accounting: every frame the source yields is counted in ``frames_captured`` and ends in
    exactly one of ``frames_sent``, ``frames_dropped`` (the ``latest`` queue dropped it, or
    the encoder refused it -- a source bug, logged) or ``frames_unsent`` (stop came first);
    heartbeats and the EndOfStream carry all four.

    Backpressure: ``policy=every_frame`` -- the reader blocks on the full queue, the send
    blocks on ZeroMQ's small ``SNDHWM``, and nothing is lost. ``policy=latest`` -- the reader
    never blocks (a live camera must keep being read); the producer's queue drops the
    oldest frame, counted in ``frames_dropped``.

    Shutdown: set ``stop`` (or call :meth:`request_stop`). The producer stops reading, sends
    the EndOfStream ("stopped") and closes with ``LINGER`` so the EndOfStream leaves;
    a consumer that takes nothing for ``stop_timeout_s`` after stop is given up on.

    Transport (see ``edge.protocol``): ``curve`` makes the socket a CURVE client (a remote
    producer over tcp); ``ring_slots`` sends the pixels through a shared-memory frame ring
    of that many slots (a producer on the worker's host, ``transport: shm``), falling back
    to plain messages when the worker does not take the ring. ``clock_offset_ns`` is added
    to every ``mono_ns`` sent (a remote producer keeps it up to date from its hellos), so
    the worker reads capture times on its own clock. Each producer has a fresh ``life``
    token, sent in heartbeats and end-of-stream.

    PUSH/PULL has no acknowledgement: messages already in the kernel's socket buffer are
    discarded by the worker's ZeroMQ when the producer disconnects while the worker's receive
    pipe is full (libzmq #160). So after the stream ends on its own the producer keeps the
    connection open until ``stop`` is set (the supervisor does so once the worker has the
    EndOfStream) or ``eos_drain_s`` passes. After a stop there is no such wait; a worker must
    also treat a source whose heartbeats stop as ended.
    """

    def __init__(self, source: FrameSource, endpoint: str, *, bind: bool = False,
                 policy: DropPolicy | str = DropPolicy.EVERY_FRAME, heartbeat_s: float = 1.0,
                 sndhwm: int = 4, queue_size: int = 2, linger_ms: int = 2000,
                 stop_timeout_s: float = 2.0, eos_drain_s: float = 10.0,
                 context: zmq.Context | None = None, run_id: str | None = None,
                 curve: ClientKeys | None = None, ring_slots: int | None = None,
                 clock_offset_ns: int = 0, eos_resend_s: float | None = None):
        if heartbeat_s <= 0:
            raise ValueError(f"heartbeat_s must be > 0, got {heartbeat_s}")
        try:
            protocol.check_source_id(source.source_id)
            self.run_id = protocol.check_run_id(
                protocol.new_run_id() if run_id is None else run_id)
        except protocol.ProtocolError as exc:
            raise ValueError(f"producer for source {source.source_id!r}: {exc}") from None
        self.source = source
        self.endpoint = endpoint
        self.policy = DropPolicy(policy)
        self.heartbeat_s = heartbeat_s
        self.linger_ms = linger_ms
        self.stop_timeout_s = stop_timeout_s
        self.eos_drain_s = eos_drain_s
        self.eos_resend_s = eos_resend_s
        self.eos_sent = False                     # the EndOfStream went to ZeroMQ
        # A context of its own unless given one: closing it is what waits (up to LINGER) for
        # queued messages to leave. A process that exits without that loses its EndOfStream.
        self._owns_context = context is None
        self._context = context or zmq.Context()
        self._socket = self._context.socket(zmq.PUSH)
        self._socket.setsockopt(zmq.SNDHWM, sndhwm)
        self._socket.setsockopt(zmq.LINGER, linger_ms)
        if endpoint.startswith("tcp://"):
            protocol.keep_alive(self._socket)
            # Reconnect at once after a cut, then back off to 2 s while the worker is away.
            self._socket.setsockopt(zmq.RECONNECT_IVL, 100)
            self._socket.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
        if curve is not None:
            apply_client(self._socket, curve)
        self.clock_offset_ns = clock_offset_ns
        self.life = protocol.new_run_id()        # this producer's life, in heartbeats and eos
        try:
            if bind:
                protocol.bind(self._socket, endpoint)
            else:
                self._socket.connect(endpoint)
        except (zmq.ZMQError, ValueError) as exc:
            self._socket.close(linger=0)
            if self._owns_context:
                self._context.term()
            raise ValueError(
                f"cannot {'bind' if bind else 'connect'} the PUSH socket of source "
                f"{source.source_id!r} to {endpoint!r}: {exc}; use ipc://<path> or "
                "tcp://127.0.0.1:<port>") from exc
        self._queue = protocol.make_queue(self.policy, queue_size,
                                          name=f"producer {source.source_id}")
        self._ring = (RingWriter(protocol.ring_path(endpoint), source.source_id, self.run_id,
                                 ring_slots) if ring_slots else None)
        if self._ring is not None:
            # Capture straight into shared memory. Under every_frame the source may wait a
            # moment for a slot (it would wait for the queue anyway); a live camera under
            # latest never waits.
            wait_s = 1.0 if self.policy is DropPolicy.EVERY_FRAME else 0.0
            source.lend_buffers(lambda shape: self._ring.lend(shape, wait_s))
        self._halt = threading.Event()            # tells the reader thread and the source to stop
        self._stop_requested = threading.Event()  # request_stop(), e.g. from a SIGTERM handler
        # Each counter has one writer thread: the reader counts captures and frames it could
        # not queue at stop; the sending thread counts the rest.
        self.frames_captured = 0
        self._unqueued_at_stop = 0
        self.frames_sent = 0
        self._refused = 0
        self._refused_logged_at = float("-inf")
        self._unsent_at_stop = 0
        self.heartbeats_sent = 0
        self.last_seq = -1
        self._outer_stop: StopEvent | None = None

    @property
    def frames_dropped(self) -> int:
        return getattr(self._queue, "dropped", 0) + self._refused

    @property
    def frames_unsent(self) -> int:
        return self._unsent_at_stop + self._unqueued_at_stop

    def request_stop(self) -> None:
        """Ask :meth:`run` to finish (safe from a signal handler)."""
        self._stop_requested.set()

    # -- reader thread: source -> queue

    def _read_source(self) -> None:
        reason = "end of stream"
        try:
            for frame in self.source.frames(self._halt):
                self.frames_captured += 1
                if not self._put(frame):
                    self._unqueued_at_stop += 1
                    return
            reason = getattr(self.source, "end_reason", reason)
        except Exception as exc:
            logger.exception("source %r failed", self.source.source_id)
            reason = f"source error: {type(exc).__name__}: {exc}"
        self._put(_SourceEnded(reason))

    def _put(self, item: Any) -> bool:
        # A blocking put that still notices the halt (every_frame queue full, sender gone).
        while not self._halt.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    # -- calling thread: queue -> socket

    def _send(self, msg: Any, patient: bool = False) -> bool:
        """Send, blocking while ZeroMQ's queue is full (that is the backpressure).

        Gives up when stop is requested; a ``patient`` send (the EndOfStream) keeps trying
        for ``stop_timeout_s`` after the stop request first.
        """
        deadline: float | None = None
        parts = protocol.encode(msg, self.run_id)   # ProtocolError for a field out of spec
        while True:
            try:
                self._socket.send_multipart(parts, flags=zmq.NOBLOCK, copy=False)
                return True
            except zmq.Again:
                if self._stopped():
                    if not patient:
                        return False
                    if deadline is None:
                        deadline = time.monotonic() + self.stop_timeout_s
                    if time.monotonic() > deadline:
                        return False
                self._socket.poll(100, zmq.POLLOUT)

    def _stopped(self) -> bool:
        outer = self._outer_stop
        return self._stop_requested.is_set() or (outer is not None and outer.is_set())

    def _counters(self) -> dict[str, int]:
        # Captured read last: it only grows, so the other three never add up to more.
        counts = {"frames_sent": self.frames_sent, "frames_dropped": self.frames_dropped,
                  "frames_unsent": self.frames_unsent}
        return {"frames_captured": self.frames_captured, **counts}

    def _heartbeat(self) -> Heartbeat:
        return Heartbeat(source_id=self.source.source_id, seq=self.last_seq,
                         mono_ns=time.monotonic_ns() + self.clock_offset_ns, run_id=self.run_id,
                         producer=self.life, **self._counters())

    def _send_frame(self, frame: Frame) -> bool:
        """A frame on the worker's clock, through the frame ring when there is one."""
        if self.clock_offset_ns:
            frame = dataclasses.replace(frame, mono_ns=frame.mono_ns + self.clock_offset_ns)
        if self._ring is not None and self._ring.usable:
            header = self._ring.put(frame)
            if header is not None:
                try:
                    sent = self._send(header)
                except protocol.ProtocolError:
                    self._ring.unused(header)
                    raise
                if not sent:
                    self._ring.unused(header)
                return sent
        return self._send(frame)

    def run(self, stop: StopEvent | None = None) -> ProducerStats:
        """Send until the source ends or ``stop`` is set; then EndOfStream, close, return stats."""
        self._outer_stop = stop
        source_id = self.source.source_id
        reader = threading.Thread(target=self._read_source, name=f"read-{source_id}", daemon=True)
        reader.start()
        logger.info("producer %r -> %s (%s, run %s) started", source_id, self.endpoint,
                    self.policy.value, self.run_id)

        reason = "stopped"
        # A first heartbeat at once, so the worker learns about the source before any frame.
        next_heartbeat = time.monotonic()
        while not self._stopped():
            now = time.monotonic()
            if now >= next_heartbeat:
                if self._send(self._heartbeat()):
                    self.heartbeats_sent += 1
                next_heartbeat = now + self.heartbeat_s
            # Wake at least every 0.1 s to notice stop; sooner when a heartbeat is due.
            wait_s = min(0.1, max(0.0, next_heartbeat - time.monotonic()))
            try:
                item = self._queue.get(timeout=wait_s)
            except queue.Empty:
                continue
            if isinstance(item, _SourceEnded):
                reason = item.reason
                break
            try:
                sent = self._send_frame(item)
            except protocol.ProtocolError as exc:
                # A frame the wire cannot carry (bad seq, truth 2, ...) is the source's bug;
                # the camera keeps running and the frame is counted, never lost silently.
                self._refused += 1
                self._refused_log(exc)
                continue
            if sent:
                self.frames_sent += 1
                self.last_seq = item.seq
            else:
                self._unsent_at_stop += 1   # stop came while the consumer was not reading

        # Shutdown: stop the reader and the source, then tell the worker we are done.
        self._halt.set()
        reader.join(timeout=5.0)
        if reader.is_alive():
            logger.warning("source %r did not stop within 5 s of the stop request", source_id)
        self._count_unsent()
        eos = EndOfStream(source_id=source_id, last_seq=self.last_seq,
                          reason=protocol.clean_reason(reason), run_id=self.run_id,
                          producer=self.life, **self._counters())
        delivered = self._send(eos, patient=True)
        self.eos_sent = delivered
        if delivered:
            logger.info("producer %r: end of stream sent after %d frame(s) (%s)", source_id,
                        self.frames_sent, eos.reason)
        if not delivered:
            logger.warning("producer %r: consumer took nothing for %.1f s after stop; "
                           "EndOfStream not delivered", source_id, self.stop_timeout_s)
        elif not self._stopped():
            self._drain(eos)
        self.close(linger_ms=self.linger_ms if delivered else 0)
        stats = ProducerStats(source_id=source_id, run_id=self.run_id,
                              heartbeats_sent=self.heartbeats_sent, last_seq=self.last_seq,
                              reason=eos.reason, eos_delivered=delivered,
                              frames_in_ring=self._ring.sent_in_ring if self._ring else 0,
                              frames_captured_in_ring=self._ring.lent_sent if self._ring else 0,
                              **self._counters())
        logger.info("producer %r finished: %s", source_id, stats)
        return stats

    def _refused_log(self, exc: Exception) -> None:
        # First refusal with its reason, then one line per 5 s: a source that builds every
        # frame wrong must not flood the log.
        now = time.monotonic()
        if self._refused == 1 or now - self._refused_logged_at >= 5.0:
            logger.error("source %r built a frame the wire refuses (%d so far, counted as "
                         "dropped): %s", self.source.source_id, self._refused, exc)
            self._refused_logged_at = now

    def _drain(self, eos: EndOfStream) -> None:
        # Keep the connection up so a worker that is behind can still read the tail and the
        # EndOfStream (see the class docstring); the stop event ends the wait early. Over a
        # network the EndOfStream can die in a broken link: with `eos_resend_s` it goes again
        # now and then (the worker takes the first it gets), until someone says stop.
        deadline = time.monotonic() + self.eos_drain_s
        resend_at = None if self.eos_resend_s is None else time.monotonic() + self.eos_resend_s
        while not self._stopped() and time.monotonic() < deadline:
            self._stop_requested.wait(0.05)
            if resend_at is not None and time.monotonic() >= resend_at:
                try:
                    self._socket.send_multipart(protocol.encode(eos, self.run_id),
                                                flags=zmq.NOBLOCK)
                except zmq.Again:
                    pass
                resend_at = time.monotonic() + self.eos_resend_s

    def _count_unsent(self) -> None:
        # Frames captured but still in the producer's queue at stop were never sent.
        while True:
            try:
                item = self._queue.get(block=False)
            except queue.Empty:
                return
            if isinstance(item, Frame):
                self._unsent_at_stop += 1

    def close(self, linger_ms: int | None = None) -> None:
        """Close the socket (waiting up to ``linger_ms`` for queued messages) and the source."""
        if not self._socket.closed:
            self._socket.close(linger=self.linger_ms if linger_ms is None else linger_ms)
            if self._owns_context:
                self._context.term()   # returns once queued messages are out or LINGER ran out
        if self._ring is not None:
            self._ring.close()         # the worker's own mapping keeps what it still judges
        self.source.close()


def die_with_parent(parent_pid: int) -> None:
    """Make this process die when ``parent_pid`` does, however it dies (even SIGKILL).

    Linux: ``prctl(PR_SET_PDEATHSIG, SIGKILL)``, then a check that the parent is not already
    gone (it may have died before the prctl). Elsewhere, and as a second line everywhere, a
    daemon thread that exits the process once it is re-parented. A producer left behind by
    a crashed line would keep pushing stale frames at the next run's sockets.
    """
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL)          # 1 = PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            logger.warning("prctl(PR_SET_PDEATHSIG) unavailable; relying on the parent watch")
    if os.getppid() != parent_pid:
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


class _Counted(FrameSource):
    """A source whose captured frames are counted in shared memory, so the line can account
    for every frame even when this process is killed before it reports."""

    def __init__(self, source: FrameSource, counter):
        self.source = source
        self.source_id = source.source_id
        self._counter = counter

    def lend_buffers(self, lend) -> None:
        self.source.lend_buffers(lend)

    def frames(self, stop: StopEvent) -> Iterator[Frame]:
        for frame in self.source.frames(stop):
            self._counter.value += 1
            yield frame

    @property
    def end_reason(self) -> str:
        return getattr(self.source, "end_reason", FrameSource.end_reason)

    def close(self) -> None:
        self.source.close()


def run_producer(spec: SourceSpec, endpoint: str, stop_event: StopEvent | None = None, *,
                 bind: bool = False, policy: DropPolicy | str = DropPolicy.EVERY_FRAME,
                 heartbeat_s: float = 1.0, sndhwm: int = 4, eos_drain_s: float = 10.0,
                 parent_pid: int | None = None, captured=None, **producer_kw) -> None:
    """Process entry point: build the source, push its frames until it ends or stop is set.

    ``multiprocessing.Process(target=run_producer, args=(spec, endpoint, stop_event))``.
    SIGTERM and SIGINT ask for a clean stop too, so a terminated producer still sends its
    EndOfStream. After a natural end the process stays up (idle) until ``stop_event`` is set
    or ``eos_drain_s`` passes, so a worker that is behind still gets every frame.
    ``parent_pid``: die with that process (see :func:`die_with_parent`). ``captured``: a
    shared integer (``multiprocessing.Value``) counting every frame the source produced.
    Other keywords go to :class:`Producer`.
    """
    if parent_pid is not None:
        die_with_parent(parent_pid)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO,
                            format="%(asctime)s %(processName)s %(name)s %(levelname)s %(message)s")
    source = build_source(spec)
    if captured is not None:
        source = _Counted(source, captured)
    producer = Producer(source, endpoint, bind=bind, policy=policy,
                        heartbeat_s=heartbeat_s, sndhwm=sndhwm, eos_drain_s=eos_drain_s,
                        **producer_kw)
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: producer.request_stop())
    producer.run(stop_event)
