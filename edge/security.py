"""Who may push frames into a worker over the network: CURVE keys, the gate that checks them,
and the count of those it turned away.

A worker that binds tcp (a source with ``transport: tcp``) makes every tcp socket a ZeroMQ
CURVE server (encrypted, and the client proves it holds a secret key). Which client keys are
accepted is decided by ZeroMQ's ZAP handler for the socket's context -- pyzmq's
``ThreadAuthenticator`` -- asked through :class:`CurveGate`, which answers yes only for the
public keys the config lists for that socket's *domain* (one per source,
``grad-edge/<source_id>``, and ``grad-edge/hello`` for the hello socket). A refused client
never gets a message through; :class:`HandshakeWatch` counts the refusals from the socket's
monitor events, and the gate logs which key it refused.

Key files are pyzmq's certificates (``zmq.auth.create_certificates``): ``NAME.key`` holds the
public key (copy it to whoever must know it), ``NAME.key_secret`` the key pair (it never leaves
its host; written with mode 0600). ``grad-edge keys DIR NAME...`` makes them.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils.monitor import recv_monitor_message

log = logging.getLogger(__name__)

HELLO_DOMAIN = "grad-edge/hello"


def zap_domain(source_id: str) -> str:
    """The ZAP domain of a source's socket: only that source's keys are accepted on it."""
    return f"grad-edge/{source_id}"


class KeyFileError(ValueError):
    """A key file that is missing or not a CURVE certificate; the message names the file."""


# --- key files ---------------------------------------------------------------------------------

def make_keys(folder: str | Path, names: list[str], *, force: bool = False) -> list[Path]:
    """Write a key pair per name into ``folder``: NAME.key (public), NAME.key_secret (0600).

    Refuses to overwrite an existing pair unless ``force``: a replaced key locks its host out
    of every worker that lists the old one.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name in names:
        if not name or "/" in name or name.startswith("."):
            raise KeyFileError(f"key name {name!r} must be a plain file name (e.g. cam1, worker)")
        public, secret = folder / f"{name}.key", folder / f"{name}.key_secret"
        if not force and (public.exists() or secret.exists()):
            raise KeyFileError(f"{public}: a key pair named {name!r} exists already; keep it, or "
                               "pass --force to replace it (hosts holding the old key are then "
                               "refused)")
        # create_certificates writes with the process umask; the secret must not be readable
        # by others even for the moment before the chmod.
        old = os.umask(0o077)
        try:
            zmq.auth.create_certificates(str(folder), name)
        finally:
            os.umask(old)
        os.chmod(secret, 0o600)
        os.chmod(public, 0o644)
        written += [public, secret]
    return written


def load_public(path: str | Path) -> bytes:
    """The z85 public key in a certificate file (NAME.key or NAME.key_secret)."""
    public, _ = _load(path)
    return public


def load_secret(path: str | Path) -> tuple[bytes, bytes]:
    """(public, secret) from NAME.key_secret, or from the NAME.key_secret beside NAME.key."""
    path = Path(path)
    if path.suffix == ".key":
        path = path.with_suffix(".key_secret")
    public, secret = _load(path)
    if secret is None:
        raise KeyFileError(f"{path}: holds no secret key; give the NAME.key_secret that "
                           "`grad-edge keys` wrote beside NAME.key")
    return public, secret


def _load(path: str | Path) -> tuple[bytes, bytes | None]:
    path = Path(path)
    if not path.is_file():
        raise KeyFileError(f"{path}: no such key file (make key pairs with `grad-edge keys DIR "
                           "NAME...`)")
    try:
        public, secret = zmq.auth.load_certificate(str(path))
    except (ValueError, OSError) as exc:
        raise KeyFileError(f"{path}: not a CURVE certificate ({exc}); make one with "
                           "`grad-edge keys`") from None
    if public is None or len(public) != 40:
        raise KeyFileError(f"{path}: not a CURVE certificate (no 40-character public-key line)")
    return public, secret


@dataclass(frozen=True)
class ServerKeys:
    """A worker socket's CURVE side: its key pair and the client keys it accepts."""

    public: bytes
    secret: bytes
    allowed: frozenset[bytes]     # z85 public keys


@dataclass(frozen=True)
class ClientKeys:
    """A producer's CURVE side: its own key pair and the worker's public key."""

    public: bytes
    secret: bytes
    server_public: bytes


def apply_client(socket: zmq.Socket, keys: ClientKeys) -> None:
    """Make ``socket`` a CURVE client (before connect)."""
    socket.curve_publickey = keys.public
    socket.curve_secretkey = keys.secret
    socket.curve_serverkey = keys.server_public


# --- the gate: one ZAP authenticator per context -----------------------------------------------

class CurveGate:
    """The ZAP authenticator of one ZeroMQ context and the keys each domain accepts.

    ZeroMQ allows one ZAP handler per context, so the gate is shared: :meth:`acquire` returns
    the context's gate (starting its authenticator on first use) and :meth:`release` stops it
    when its last user is done -- before the context is terminated, which a running
    authenticator would block. Sockets must be made CURVE servers with :meth:`serve`, which
    registers their domain *before* they bind: a CURVE socket in a context with no ZAP
    handler would accept any key.
    """

    _gates: dict[int, "CurveGate"] = {}
    _lock = threading.Lock()

    def __init__(self, ctx: zmq.Context):
        self._ctx = ctx
        self._users = 0
        self._allowed: dict[str, frozenset[bytes]] = {}
        self.refused: dict[str, int] = {}
        self._logged_at: dict[str, float] = {}
        self._auth = ThreadAuthenticator(ctx, log=logging.getLogger("edge.security.zap"))

    @classmethod
    def acquire(cls, ctx: zmq.Context) -> "CurveGate":
        with cls._lock:
            gate = cls._gates.get(id(ctx))
            if gate is None or gate._ctx is not ctx:
                gate = cls._gates[id(ctx)] = CurveGate(ctx)
                gate._auth.start()
            gate._users += 1
            return gate

    def release(self) -> None:
        with CurveGate._lock:
            self._users -= 1
            if self._users > 0:
                return
            CurveGate._gates.pop(id(self._ctx), None)
        self._auth.stop()

    def serve(self, socket: zmq.Socket, keys: ServerKeys, domain: str) -> None:
        """Make ``socket`` a CURVE server accepting ``keys.allowed`` on ``domain``."""
        self._allowed[domain] = keys.allowed
        self._auth.configure_curve_callback(domain=domain, credentials_provider=self)
        socket.zap_domain = domain.encode()
        socket.curve_server = True
        socket.curve_publickey = keys.public
        socket.curve_secretkey = keys.secret

    def callback(self, domain: str, client_key: bytes) -> bool:
        """ZAP's question, from the authenticator's thread: may this key in?"""
        if client_key in self._allowed.get(domain, frozenset()):
            return True
        self.refused[domain] = self.refused.get(domain, 0) + 1
        now = time.monotonic()
        if now - self._logged_at.get(domain, float("-inf")) >= 5.0:
            self._logged_at[domain] = now
            log.warning("%s: refused a producer whose public key %s... is not listed for it "
                        "(%d refused so far); list its NAME.key in the config to let it in",
                        domain, client_key[:8].decode(errors="replace"), self.refused[domain])
        return False


# --- counting what the handshake turned away ----------------------------------------------------

_WATCHED = (zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH
            | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
            | zmq.EVENT_DISCONNECTED)


@dataclass
class HandshakeCounts:
    """What a tcp socket's connections came to. Written by the thread that reads the watch."""

    connected: int = 0           # handshakes that succeeded (a producer got in)
    disconnected: int = 0        # connections that ended (a producer left, or the link broke)
    refused_key: int = 0         # CURVE handshakes whose client key the gate refused
    refused_handshake: int = 0   # handshakes that failed: no CURVE, the wrong worker key,
                                 # not ZeroMQ at all
    aborted: int = 0             # the peer went away mid-handshake

    @property
    def refused(self) -> int:
        return self.refused_key + self.refused_handshake


class HandshakeWatch:
    """A socket's monitor, read into :class:`HandshakeCounts` by whoever polls ``monitor``."""

    def __init__(self, socket: zmq.Socket, name: str):
        self.name = name
        self.counts = HandshakeCounts()
        self.monitor = socket.get_monitor_socket(_WATCHED)
        self._socket = socket
        self._live = 0

    def read(self) -> None:
        """Take every pending event (non-blocking)."""
        while self.monitor.poll(0):
            try:
                event = recv_monitor_message(self.monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            kind = event["event"]
            c = self.counts
            if kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                c.connected += 1
                self._live += 1
                log.info("%s: connected (%d so far)", self.name, c.connected)
            elif kind == zmq.EVENT_DISCONNECTED:
                c.disconnected += 1
                if self._live:        # an established connection, not a failed attempt
                    self._live -= 1
                    log.info("%s: a connection ended (%d connected so far)", self.name,
                             c.connected)
            elif kind == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                c.refused_key += 1
            elif kind == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
                c.refused_handshake += 1
                if c.refused_handshake == 1 or c.refused_handshake % 100 == 0:
                    log.warning("%s: refused a connection that is not a CURVE client with this "
                                "worker's key (%d so far): a producer without keys, or with "
                                "another worker's public key?", self.name, c.refused_handshake)
            elif kind == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:
                c.aborted += 1

    def close(self) -> None:
        try:
            self._socket.disable_monitor()
        except zmq.ZMQError:
            pass
        self.monitor.close(0)
