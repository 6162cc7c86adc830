"""A producer on a camera host, feeding a worker on another host over tcp and CURVE.

``grad-edge produce CONFIG --source ID`` is a thin shell over :class:`RemoteProducer`:

1. **Find the run.** It asks the worker's hello socket (:class:`WorkerLink`) until a worker
   answers that it runs this source: the answer gives the run token, the source's port and
   the worker's clock (``edge.protocol``, *the hello*). Until then it waits, saying so.
2. **Stream.** One :class:`~camera_sources.producer.Producer` for that run -- the same producer
   the line starts on its own host, with its heartbeats, end-of-stream and accounting --
   connected to the source's port as a CURVE client. It keeps asking the hello socket every
   second: the answers keep the clock offset fresh; ``stopping`` or a new run token stops
   it (end-of-stream "stopped"); no answer means the link or the worker is down, and the
   producer goes on, ZeroMQ reconnecting by itself once the link is back.
3. **The end.** A stream that ends on its own sends its end-of-stream again every 2 s until
   the worker says ``ended`` (a link that broke after the first could have eaten it), a new
   run starts, or the worker has not answered for ``gone_after_s`` (its run is over).
4. **Next run.** After its run (unless ``once``) it waits for the next one, with a fresh
   source and producer: a run never gets frames twice, and each run's counters start at 0.

A source that fails (``source error: ...``) ends the loop: the service manager that runs
``grad-edge produce`` restarts it, and the worker sees the new producer as a new life.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass

import zmq

from camera_sources.base import SourceSpec, StopEvent, build_source
from camera_sources.producer import Producer, ProducerStats
from edge import protocol
from edge.protocol import DropPolicy, Hello, ProtocolError, Welcome
from edge.security import ClientKeys, HandshakeWatch, apply_client

log = logging.getLogger(__name__)


class RemoteError(RuntimeError):
    """The worker does not serve this source (a config that differs between the hosts)."""


@dataclass(frozen=True)
class ClockSample:
    rtt_ns: int
    offset_ns: int        # worker clock - this host's clock


class WorkerLink:
    """A REQ socket to the worker's hello socket; :meth:`ask` returns a Welcome or None.

    Relaxed and correlated, so a request that got no answer (the link was down) does not
    wedge the socket: the next one is sent, and a late answer to the old one is dropped.
    The clock offset is taken from the answer with the shortest round trip of the last few.
    """

    def __init__(self, ctx: zmq.Context, endpoint: str, source_id: str,
                 keys: ClientKeys | None = None, samples: int = 8):
        self.endpoint = endpoint
        self.source_id = protocol.check_source_id(source_id)
        self._sock = ctx.socket(zmq.REQ)
        self._sock.setsockopt(zmq.REQ_RELAXED, 1)
        self._sock.setsockopt(zmq.REQ_CORRELATE, 1)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
        protocol.keep_alive(self._sock)
        if keys is not None:
            apply_client(self._sock, keys)
        self.watch = HandshakeWatch(self._sock, f"link to {endpoint}")
        self._sock.connect(endpoint)
        self._samples: deque[ClockSample] = deque(maxlen=samples)

    @property
    def offset_ns(self) -> int:
        if not self._samples:
            return 0
        return min(self._samples, key=lambda s: s.rtt_ns).offset_ns

    @property
    def key_refused(self) -> bool:
        """The worker refused this host's key (it is not listed for the source there)."""
        self.watch.read()
        return self.watch.counts.refused_key > 0

    def ask(self, timeout_s: float = 1.0) -> Welcome | None:
        sent = time.monotonic_ns()
        try:
            # Never blocks: with no connection up (link down, handshake refused) it is Again.
            self._sock.send_multipart(protocol.encode(Hello(self.source_id, sent)), zmq.NOBLOCK)
        except zmq.Again:
            time.sleep(timeout_s)
            return None
        if not self._sock.poll(int(timeout_s * 1000)):
            return None
        try:
            welcome = protocol.decode(self._sock.recv_multipart(copy=False),
                                      expect=protocol.WELCOME_KINDS)
        except (ProtocolError, zmq.Again) as exc:
            log.warning("hello: an answer that is not a welcome from %s: %s", self.endpoint, exc)
            return None
        received = time.monotonic_ns()
        if welcome.echo_ns == sent:
            self._samples.append(ClockSample(received - sent,
                                             welcome.mono_ns - (sent + received) // 2))
        return welcome

    def close(self) -> None:
        self.watch.close()
        self._sock.close(0)


class RemoteProducer:
    """Serves one source to the worker at ``worker_host``: each run it finds, one producer.

    ``run(stop)`` returns the stats of every run it served; it returns when ``stop`` is set,
    after one run with ``once``, or after a run whose source failed.

    ZeroMQ gives up on a peer whose handshake failed (a refused key, another worker's key):
    after ``relink_after_s`` without an answer the hello socket is made afresh, so a worker
    whose config was fixed meanwhile is found without restarting this side.
    """

    def __init__(self, spec: SourceSpec, worker_host: str, hello_port: int,
                 keys: ClientKeys | None, *, policy: DropPolicy | str = DropPolicy.EVERY_FRAME,
                 heartbeat_s: float = 1.0, hello_every_s: float = 1.0, once: bool = False,
                 relink_after_s: float = 5.0, gone_after_s: float = 15.0,
                 context: zmq.Context | None = None, **producer_kw):
        self.spec = spec
        self.worker_host = worker_host
        self.hello_endpoint = f"tcp://{worker_host}:{hello_port}"
        self.keys = keys
        self.policy = DropPolicy(policy)
        self.heartbeat_s = heartbeat_s
        self.hello_every_s = hello_every_s
        self.once = once
        self.relink_after_s = relink_after_s
        self.gone_after_s = gone_after_s
        # Until the worker says it has the end-of-stream (or is gone), send it again.
        self.producer_kw = {"eos_drain_s": 600.0, "eos_resend_s": 2.0, **producer_kw}
        self._link: WorkerLink | None = None
        self._unanswered_since: float | None = None
        self.key_refused = False             # the worker refused this host's key (so far)
        self._ctx = context or zmq.Context.instance()
        self.producer: Producer | None = None     # the current run's, for a watching caller
        self.runs: list[ProducerStats] = []

    def run(self, stop: StopEvent) -> list[ProducerStats]:
        self._link = WorkerLink(self._ctx, self.hello_endpoint, self.spec.source_id, self.keys)
        served: str | None = None
        try:
            while not stop.is_set():
                welcome = self._find_run(stop, not_run=served)
                if welcome is None:
                    break
                served = welcome.run_id
                stats = self._serve(welcome, stop)
                self.runs.append(stats)
                if self.once or stats.reason.startswith("source error"):
                    break
        finally:
            self._link.close()
        return self.runs

    def _ask(self) -> Welcome | None:
        """One hello; makes the link afresh after ``relink_after_s`` without an answer."""
        answer = self._link.ask(timeout_s=self.hello_every_s)
        now = time.monotonic()
        self.key_refused = self.key_refused or self._link.key_refused
        if answer is not None:
            self._unanswered_since = None
            self.key_refused = False
        elif self._unanswered_since is None:
            self._unanswered_since = now
        elif now - self._unanswered_since >= self.relink_after_s:
            self._link.close()
            self._link = WorkerLink(self._ctx, self.hello_endpoint, self.spec.source_id,
                                    self.keys)
            self._unanswered_since = now
        return answer

    def _find_run(self, stop: StopEvent, not_run: str | None) -> Welcome | None:
        waiting_since = time.monotonic()
        said = 0.0
        while not stop.is_set():
            welcome = self._ask()
            if welcome is not None and welcome.state in ("unknown_source", "not_allowed"):
                raise RemoteError(
                    f"the worker at {self.hello_endpoint} has no source "
                    f"{self.spec.source_id!r} in its run; run both hosts from the same line "
                    "config" if welcome.state == "unknown_source" else
                    f"the worker at {self.hello_endpoint} does not take this host's key for "
                    f"source {self.spec.source_id!r}: its sources[].key names another one")
            if welcome is not None and welcome.state == "running" and welcome.run_id != not_run:
                # The first answer's round trip includes the connection's set-up: a few
                # more give the clock offset to within a short round trip.
                for _ in range(4):
                    self._link.ask(timeout_s=0.2)
                log.info("source %s: worker at %s runs %s; streaming to port %d (clock offset "
                         "%.3f ms)", self.spec.source_id, self.worker_host, welcome.run_id,
                         welcome.port, self._link.offset_ns / 1e6)
                return welcome
            waited = time.monotonic() - waiting_since
            if waited - said >= 30.0 or (said == 0.0 and waited >= 2.0):
                said = waited
                why = ("it refuses this host's key: list it for the source in the worker's "
                       "config (sources[].key)" if self.key_refused else
                       "no answer: is `grad-edge run` up there, and the keys right?"
                       if welcome is None else f"its run is {welcome.state}")
                log.warning("source %s: waiting for a run at %s (%.0f s): %s",
                            self.spec.source_id, self.hello_endpoint, waited, why)
            if welcome is not None:
                stop.wait(self.hello_every_s)
        return None

    def _serve(self, welcome: Welcome, stop: StopEvent) -> ProducerStats:
        source = build_source(self.spec)
        producer = Producer(source, f"tcp://{self.worker_host}:{welcome.port}",
                            run_id=welcome.run_id, policy=self.policy,
                            heartbeat_s=self.heartbeat_s, curve=self.keys,
                            clock_offset_ns=self._link.offset_ns, **self.producer_kw)
        self.producer = producer
        done = threading.Event()
        watch = threading.Thread(target=self._follow, args=(producer, welcome, done),
                                 name=f"hello-{self.spec.source_id}", daemon=True)
        watch.start()
        try:
            return producer.run(stop)
        finally:
            done.set()
            watch.join(self.hello_every_s + 2.0)

    def _follow(self, producer: Producer, welcome: Welcome, done: threading.Event) -> None:
        """Ask the worker every second while the producer runs; stop it when the run ends."""
        silent_since: float | None = None
        while not done.wait(self.hello_every_s):
            answer = self._ask()
            if answer is None:
                if silent_since is None:
                    silent_since = time.monotonic()
                    log.warning("source %s: no answer from the worker at %s; streaming on, "
                                "ZeroMQ reconnects when the link is back",
                                self.spec.source_id, self.hello_endpoint)
                elif (producer.eos_sent
                      and time.monotonic() - silent_since > self.gone_after_s):
                    log.info("source %s: stream ended and the worker has not answered for "
                             "%.0f s: its run is over", self.spec.source_id, self.gone_after_s)
                    producer.request_stop()
                    return
                continue
            if silent_since is not None:
                log.warning("source %s: the worker answers again after %.1f s",
                            self.spec.source_id, time.monotonic() - silent_since)
                silent_since = None
            producer.clock_offset_ns = self._link.offset_ns
            if answer.run_id != welcome.run_id or answer.state != "running":
                why = ("the worker started another run" if answer.run_id != welcome.run_id
                       else "the worker has its end of stream" if answer.state == "ended"
                       else f"the run is {answer.state}")
                log.info("source %s: %s; stopping", self.spec.source_id, why)
                producer.request_stop()
                return
