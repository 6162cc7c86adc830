"""The worker's hello socket: how a producer on another host learns which run it feeds, where
its source's socket is, and when the run is stopping (``edge.protocol``, *the hello*).

:class:`HelloService` answers on its own thread. The line starts it once the sources' sockets
are bound (their ports are what it tells) and sets ``state = "stopping"`` when it drains, so
remote producers stop capturing and send their end-of-stream like local ones.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

import zmq

from edge import protocol
from edge.protocol import Hello, ProtocolError, Welcome
from edge.security import HELLO_DOMAIN, CurveGate, HandshakeWatch, ServerKeys

log = logging.getLogger(__name__)


class HelloService:
    """A REP socket at ``endpoint`` answering every hello with a :class:`Welcome`.

    ``ports``: source id -> the tcp port of its socket. With ``curve`` the socket is a CURVE
    server accepting ``curve.allowed`` (every remote source's key); without, it binds
    loopback only (tests, benchmarks). ``keys``: source id -> the keys its socket accepts;
    a producer asking about a source its key would be refused on is told ``not_allowed``.
    ``ended(source_id)``: whether the worker has that source's end-of-stream (``ended``).
    """

    def __init__(self, ctx: zmq.Context, endpoint: str, run_id: str, ports: dict[str, int],
                 curve: ServerKeys | None = None, keys: dict[str, frozenset[bytes]] | None = None,
                 ended: Callable[[str], bool] | None = None):
        self.run_id = protocol.check_run_id(run_id)
        self.ports = dict(ports)
        self.keys = keys
        self.ended = ended
        self.state = "running"
        self.answered = 0
        self.bad_requests = 0
        self._sock = ctx.socket(zmq.REP)
        self._sock.setsockopt(zmq.LINGER, 0)
        protocol.keep_alive(self._sock)
        self._gate: CurveGate | None = None
        try:
            if curve is not None:
                self._gate = CurveGate.acquire(ctx)
                self._gate.serve(self._sock, curve, HELLO_DOMAIN)
            elif not endpoint.startswith(("tcp://127.0.0.1:", "ipc://")):
                raise ValueError(f"the hello socket {endpoint} binds beyond this host and needs "
                                 "CURVE keys (network.worker_key)")
            self.watch = HandshakeWatch(self._sock, "hello socket")
            self.endpoint = protocol.bind(self._sock, endpoint)
        except (ValueError, zmq.ZMQError) as exc:
            self._close()
            raise ValueError(f"hello socket: {exc}") from None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="hello", daemon=True)

    @property
    def port(self) -> int:
        return int(self.endpoint.rsplit(":", 1)[1])

    def start(self) -> "HelloService":
        self._thread.start()
        log.info("hello socket %s: remote producers ask here for run %s", self.endpoint,
                 self.run_id)
        return self

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        poller.register(self.watch.monitor, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                events = dict(poller.poll(100))
                if self.watch.monitor in events:
                    self.watch.read()
                if self._sock in events:
                    parts = self._sock.recv_multipart(copy=False)
                    self._sock.send_multipart(self._answer(parts))
        except zmq.ContextTerminated:
            pass
        finally:
            self._close()

    def _answer(self, parts: list) -> list:
        try:
            hello = protocol.decode(parts, expect=protocol.HELLO_KINDS)
        except ProtocolError as exc:
            self.bad_requests += 1
            if self.bad_requests == 1 or self.bad_requests % 100 == 0:
                log.warning("hello socket: %d request(s) that are not a hello, latest: %s",
                            self.bad_requests, exc)
            return [b""]      # a REP socket must answer something
        assert isinstance(hello, Hello)
        sid = hello.source_id
        if sid not in self.ports:
            state = "unknown_source"
        elif self.keys is not None and _user(parts[0]) not in self.keys.get(sid, ()):
            state = "not_allowed"
        elif self.ended is not None and self.ended(sid):
            state = "ended"
        else:
            state = self.state
        self.answered += 1
        welcome = Welcome(sid, state, self.ports[sid] if sid in self.ports and state !=
                          "not_allowed" else 0,
                          time.monotonic_ns(), hello.mono_ns, run_id=self.run_id)
        return protocol.encode(welcome)

    def _close(self) -> None:
        if getattr(self, "watch", None) is not None:
            self.watch.close()
            self.watch = None
        self._sock.close(0)
        if self._gate is not None:
            self._gate.release()
            self._gate = None

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(2.0)
        elif self.watch is not None:      # never started
            self._close()


def _user(part) -> bytes | None:
    """The CURVE public key (z85) the ZAP handler let in, from a received message part."""
    try:
        return part.get("User-Id").encode()
    except (zmq.ZMQError, AttributeError, UnicodeError):
        return None
