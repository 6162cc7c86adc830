"""The wire format between frame producers and the model worker, defined once.

Every producer (``camera_sources``) and the worker (``edge.worker``) speak through this
module and nothing else, so this docstring is the whole specification.

Transport
---------
ZeroMQ PUSH (producer) -> PULL (worker). Each message is one ZeroMQ *multipart* message.
Endpoints bind to loopback only by default: ``ipc://<run_dir>/<name>.sock``
(see :func:`default_endpoint`) or ``tcp://127.0.0.1:<port>``. Nothing on the wire is
pickled, so a producer cannot make the worker run code.

A socket belongs to one run. ``grad-edge run`` binds each source's socket in a private
folder made for that run (``ipc://<tmp>/grad-edge-XXXX/src-<source_id>.sock``, mode 0700);
:func:`run_endpoint` gives the same guarantee inside a fixed folder,
``ipc://<run_dir>/src-<source_id>-<run token>.sock``. A producer left running by a killed run
keeps reconnecting to its own run's path, which nobody binds again, so it cannot feed the
next run; and were it to reach a worker anyway, its messages carry the other run's token and
are refused (below). :func:`bind` replaces a stale socket file (nobody answers on it) and
refuses a path that a live process still listens on.

Three ways in, chosen per source (``sources[].transport``):

- ``ipc`` (the default): the above; pixels travel in the message.
- ``shm``: a producer on the worker's host keeps the pixels in a *frame ring* of shared
  memory and sends only the header over the ipc socket (``ring_frame``, below).
- ``tcp``: a producer on another host (``grad-edge produce``) connects over the network. The
  worker binds tcp only for such sources, and every tcp socket it binds requires ZeroMQ
  CURVE (below); nothing else listens on the network.

Remote producers (tcp, CURVE, the hello)
----------------------------------------
Every tcp socket is a CURVE server with the worker's key pair; a connecting producer must be
a CURVE client that knows the worker's public key *and* whose own public key the worker's
config lists for that source (``sources[].key``; the socket's ZAP domain is
``grad-edge/<source_id>``). Anything else -- an unlisted key, a key listed for another
source, a plain (NULL) client, a client that expects another worker key -- fails the
ZeroMQ handshake: no message of it ever reaches the worker, and the worker counts the
refusal (a socket monitor's handshake-failure events). ZeroMQ heartbeats (ZMTP PING/PONG,
every 1 s, 5 s timeout) run on every tcp connection, so a link that dies silently is noticed
and reconnected without waiting for TCP's own timeout.

Beside the sources' sockets the worker binds one REP socket, the *hello* socket
(``network.hello_port``, CURVE too, ZAP domain ``grad-edge/hello``, every listed key
accepted). A remote producer cannot know the run token (each run makes a fresh one) nor,
when ports are left to the system, its source's port, so it asks:

- it sends ``hello`` (its ``source_id`` and its own ``mono_ns`` clock); the worker answers
  ``welcome``: the run token, the port of that source's socket, the run's ``state``, its own
  ``mono_ns`` at the answer and the hello's ``mono_ns`` echoed back. A request that does not
  decode as a hello gets an empty one-part answer (a REP socket must answer).
- ``state`` is ``running``, ``stopping`` (the line is draining: stop capturing, send
  end-of-stream), ``ended`` (the worker has this source's end-of-stream), ``unknown_source``
  (no source of that id on this line; port 0) or ``not_allowed`` (the asking key is not the
  one listed for that source; port 0).
- PUSH has no acknowledgement, and over a network an end-of-stream can die in a link that
  breaks after it was sent. So a remote producer whose stream ended sends its end-of-stream
  again every 2 s (the worker takes the first and no more) until the answer says ``ended``,
  a new run starts, or the worker has not answered for 15 s (its run is over).
- The producer asks again every second while it streams. A new run token means its run is
  over (it stops, and starts afresh in the new run); no answer means the link or the worker
  is down (it keeps streaming into ZeroMQ's queue, which reconnects by itself).
- *Clocks*: ``mono_ns`` in frames and heartbeats is on the **worker's** monotonic clock. A
  producer on another host adds ``offset = welcome.mono_ns - (sent + received) / 2`` (its
  own send and receive times of the hello; the estimate of the round trip with the shortest
  time among recent ones) to its own clock; on the worker's host the offset is 0. So a
  frame's capture-to-verdict latency and a delay-timed reject mean the same across hosts.

Messages
--------
Part 0 of every message is a small msgpack map, the *header* (at most
``MAX_HEADER_BYTES`` = 4096 bytes). Every kind carries ``v`` and ``kind``; the kinds that
travel from a producer to a worker's data socket (``frame``, ``ring_frame``, ``eos``,
``heartbeat``) carry these too:

=============  =====  ======================================================================
key            type   meaning
=============  =====  ======================================================================
``v``          int    protocol version; this module speaks ``PROTOCOL_VERSION`` (3)
``kind``       str    ``"frame"``, ``"ring_frame"``, ``"eos"``, ``"heartbeat"``; on other
                      channels ``"hello"``, ``"welcome"``, ``"ring"``, ``"ring_reply"``
``run``        str    the run token: which run of the line the sender belongs to. 1-64 of
                      ``A-Z a-z 0-9 _ -`` (:func:`new_run_id` makes one: 16 hex digits).
                      A worker started with a run token takes only its own run's messages.
``source_id``  str    which source sent it (unique per line). It ends up in file names and
                      SQL, so it is a *safe name*: 1-64 of ``A-Z a-z 0-9 _ . -``, and not
                      ``.`` or ``..``
=============  =====  ======================================================================

``kind == "frame"`` -- one captured image; exactly two parts.

=============  ===========  ===========================================================
key            type         meaning
=============  ===========  ===========================================================
``seq``        int          the source's frame number, >= 0; strictly increasing, gaps
                            mean frames the source could not read (corrupt, skipped)
``wall_time``  float        ``time.time()`` at capture: seconds since the epoch, finite,
                            0 <= t < 253402300800 (year 10000; later dates cannot be
                            named in a file path). An int is accepted and read as a float.
``mono_ns``    int          ``time.monotonic_ns()`` at capture, on the worker's clock
                            (see *Clocks* above), >= 0
``part_id``    int | nil    the part on the conveyor, when the source knows it
``encoder``    int | nil    conveyor encoder count at capture, when known
``truth``      int | nil    ground truth 0 (good) / 1 (defect) when the source knows it
``dtype``      str          always ``"uint8"``
``shape``      [int, ...]   ``[H, W]`` (gray) or ``[H, W, 3]`` (BGR, as OpenCV gives it);
                            every dimension 1 <= n < 2**31
=============  ===========  ===========================================================

Part 1 is the raw pixel buffer: ``H * W * C`` bytes, C-contiguous (row-major, channels
last). It is sent without copying (``copy=False``) and received without copying, so a
decoded image is a *read-only* view on the received message: copy it before drawing on it.

``kind == "ring_frame"`` -- a frame whose pixels wait in shared memory; one part. The
``frame`` keys, plus ``ring`` (str, the ring's token, as ``run``) and ``slot`` (int >= 0):
the pixels are the first ``H * W * C`` bytes of slot ``slot`` of that ring (see *Frame
ring*). Decoded as a :class:`RingFrame`; the worker's inbox maps it to a :class:`Frame`
whose image is a read-only view on the slot.

``kind == "eos"`` -- end of stream; one part. Nothing follows it from that producer.

===================  =====  ================================================================
key                  type   meaning
===================  =====  ================================================================
``last_seq``         int    the last frame ``seq`` sent, >= -1 (-1 when none)
``reason``           str    why the stream ended (``"end of file"``, ``"stopped"``,
                            ``"source error: ..."``): at most ``MAX_REASON_CHARS`` (256)
                            printable characters (no newlines, no control characters)
``producer``         str    this producer's *life* token (as ``run``; a fresh one each time
                     | nil  a producer starts), or nil when the sender does not say
``frames_captured``  int    frames the source produced, whether sent or not
``frames_sent``      int    frames handed to ZeroMQ
``frames_dropped``   int    frames captured but dropped while running: by the ``latest``
                            policy's queue, or refused by :func:`encode` (a source bug)
``frames_unsent``    int    frames captured but not sent because the stream stopped
===================  =====  ================================================================

``kind == "heartbeat"`` -- the producer is alive; one part. Sent every ``heartbeat_s``
(default 1 s) even while the source has nothing to send. ``seq`` (int >= -1: the last frame
``seq`` sent, -1 when none), ``mono_ns`` (int >= 0: when the heartbeat was sent, on the
worker's clock), ``producer`` (as in ``eos``), and the same four counters as ``eos``, so far.

The counters are ints >= 0 and count one producer life. In an ``eos``, ``frames_captured ==
frames_sent + frames_dropped + frames_unsent``: every frame the source produced is accounted
for. In a heartbeat the difference is the frames still in the producer's queue. A worker can
then account for every captured frame: sent = received + lost in transit, and received =
judged + dropped by its own queue + unjudged at stop. A new ``producer`` token from the same
source (a remote producer restarted within the run) starts a new life: the worker keeps the
last counters of the old one, and frames it sent that never came are lost.

``kind == "hello"`` (producer -> the worker's hello socket; one part): ``source_id``,
``mono_ns`` (int >= 0, the *producer's* clock when sent). No ``run``: that is what it asks.

``kind == "welcome"`` (the answer; one part): ``run``, ``source_id``, ``state`` (str, one of
``WELCOME_STATES``), ``port`` (int 0-65535: the port of that source's tcp socket, 0 when it
has none), ``mono_ns`` (int >= 0, the worker's clock when answering), ``echo_ns`` (int >= 0,
the hello's ``mono_ns``).

Frame ring (``shm``)
--------------------
A producer on the worker's host makes a ring of ``slots`` slots of ``slot_bytes`` each: an
anonymous memory file (``memfd_create``, never a name in ``/dev/shm``), sealed against
shrinking and growing (``F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL``, so the worker can
never meet a SIGBUS from a ring that shrank under it). It offers the ring to the worker on a
``SOCK_SEQPACKET`` unix socket beside the source's ipc socket (:func:`ring_path`:
``<...>/src-<id>.ring``, in the same private folder), one packet: the ``ring`` header and
the file descriptor (``SCM_RIGHTS``). ``kind == "ring"``: ``run``, ``source_id``, ``ring``
(the ring's token), ``slots`` (1-``MAX_RING_SLOTS``), ``slot_bytes`` (>= 1; slots *
slot_bytes at most ``MAX_RING_BYTES``). The worker checks the seals and the file's size,
maps it read-only and answers one ``ring_reply`` packet: ``ring``, ``error`` (str; ``""``
when accepted, else why not -- the producer then sends its pixels in the messages).

Then, per frame, the producer sends a ``ring_frame`` for pixels already in a slot -- the
source captured into a slot it was lent -- or copies them into a free one first; with no
slot free it sends a plain ``frame`` (it never waits for a slot).
When the worker no longer needs a slot's pixels -- the frame was judged, dropped by a
``latest`` queue or left at stop, and nothing holds a view on it -- it writes the slot's
number on the same unix connection: packets of ``RING_RELEASE`` records (uint32, little
endian), each freeing one slot. A slot is never written while the worker may still read it.
The memory lives as long as one of the two processes maps it: a killed producer or worker
leaves nothing behind. A frame too large for a slot, or sent while no slot is offered, goes
as a plain ``frame``.

Every int on the wire is a plain int (never a bool, never a float) in the signed 64-bit range
(it is stored in SQLite). A header has exactly the keys its kind lists: a missing key, an
unknown extra key or a key given twice is an error, not ignored -- the version is compared
exactly, so an extra key can only come from a sender that is not following this document.

Errors
------
:func:`decode` raises :class:`ProtocolError`, and nothing else, for anything that does not
follow this document: too few or too many parts, a part that is not a buffer, a header that
is not msgpack or not a map, a wrong version, a kind that does not belong on that channel
(``expect``), any field of the wrong type or out of range, a pixel buffer whose size
disagrees with ``shape``. :func:`encode` applies the same checks, so a sender can never put
on the wire what a receiver refuses.

Versions
--------
1 -- ``v``, ``kind``, ``source_id``; frames as above; ``eos`` with ``last_seq``, ``reason``;
heartbeats with ``seq``, ``mono_ns``, ``frames_sent``, ``frames_dropped`` (which then also
counted frames unsent at stop). Field types were not checked.

2 -- the ``run`` token in every header; ``frames_captured`` and ``frames_unsent`` in
heartbeats, and all four counters in ``eos``; ``frames_dropped`` no longer counts frames
unsent at stop; every field's type and range checked; unknown and duplicate keys refused;
the header bounded to 4096 bytes.

3 -- this document: ``producer`` (life token) in ``eos`` and heartbeats; ``mono_ns`` on the
worker's clock; the kinds ``ring_frame`` (and the ``ring`` / ``ring_reply`` packets of the
frame ring), ``hello`` and ``welcome`` (remote producers over CURVE).

A receiver rejects any other ``v`` with :class:`ProtocolError`; a change to the layout above
must bump ``PROTOCOL_VERSION`` and add a line here.

Backpressure
------------
Named by :class:`DropPolicy` (``edge.backpressure``, re-exported here). ``every_frame``:
nothing is dropped; the worker's bounded queue fills, the worker stops reading, ZeroMQ's
high-water marks fill and the producer's ``send`` blocks (over a ring, frames for which no
slot is free go as plain frames, held back the same way). ``latest``: the worker keeps reading into a
:class:`LatestQueue`, which drops the *oldest* frame when full and counts every drop.
"""

from __future__ import annotations

import math
import re
import socket as _socket
import struct
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Union

import msgpack
import numpy as np
import zmq

# Re-exported: the drop policies are part of what producer and worker agree on.
from edge.backpressure import DropPolicy, LatestQueue, make_queue  # noqa: F401

PROTOCOL_VERSION = 3

# The only pixel type the protocol carries; a model worker never has to guess.
_DTYPE = "uint8"

MAX_HEADER_BYTES = 4096        # a real header is ~250 bytes; more is garbage or an attack
MAX_REASON_CHARS = 256
_INT64_MIN, _INT64_MAX = -(2 ** 63), 2 ** 63 - 1
_MAX_DIM = 2 ** 31 - 1
_WALL_TIME_END = 253402300800.0   # 10000-01-01: datetime (and so a dated folder) ends there

# The frame ring's bounds: a ring is a few frames (a copy in flight each), never a video.
MAX_RING_SLOTS = 1024
MAX_RING_BYTES = 2 ** 34            # 16 GiB mapped at most, whatever an offer says
# One released slot, written by the worker on the ring's unix connection.
RING_RELEASE = struct.Struct("<I")
WELCOME_STATES = ("running", "stopping", "ended", "unknown_source", "not_allowed")

_RUN_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_SOURCE_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")


class ProtocolError(ValueError):
    """A message that does not follow this module's wire format."""


# --------------------------------------------------------------------------- names


def new_run_id() -> str:
    """A fresh run token: 16 hex digits (64 random bits), short enough for socket paths."""
    return uuid.uuid4().hex[:16]


def check_run_id(value: Any) -> str:
    """``value`` if it is a valid run token, else :class:`ProtocolError` saying why."""
    if type(value) is not str or not _RUN_ID.fullmatch(value):
        raise ProtocolError(f"run token {_short(value)} must be 1-64 characters of "
                            "A-Z a-z 0-9 _ - (protocol.new_run_id() makes one)")
    return value


def check_source_id(value: Any) -> str:
    """``value`` if it is a safe source name, else :class:`ProtocolError` saying why."""
    if type(value) is not str or not _SOURCE_ID.fullmatch(value) or value in (".", ".."):
        raise ProtocolError(f"source_id {_short(value)} must be 1-64 characters of "
                            "A-Z a-z 0-9 _ . - and not '.' or '..' (it names files)")
    return value


def _short(value: Any) -> str:
    # Error messages quote what was received, but never more than a line of it.
    try:
        text = repr(value)
    except Exception:  # a repr can fail on anything; the message must not
        text = f"<{type(value).__name__}>"
    return (text if len(text) <= 60 else text[:57] + "...") + f" ({type(value).__name__})"


# --------------------------------------------------------------------------- messages


@dataclass(frozen=True)
class Frame:
    """One captured image and where/when it was captured.

    ``run_id`` is the sender's run token: None on a frame a source builds (the producer
    stamps its own when sending), always set on a decoded frame.
    """

    source_id: str
    seq: int
    wall_time: float            # time.time() at capture
    mono_ns: int                # time.monotonic_ns() at capture, producer host
    image: np.ndarray           # uint8, (H, W, 3) BGR or (H, W) gray
    part_id: int | None = None
    encoder: int | None = None  # conveyor encoder count at capture
    truth: int | None = None    # 0 good / 1 defect when the source knows it
    run_id: str | None = None

    def __post_init__(self) -> None:
        # Checked here so a bad source fails where it builds the frame, not in the worker.
        _check_image(self.image, where=f"Frame from source {self.source_id!r}")


@dataclass(frozen=True)
class EndOfStream:
    """The producer has sent its last frame, and what became of every frame it captured."""

    source_id: str
    last_seq: int               # -1 when no frame was sent
    reason: str                 # "end of file", "stopped", ...
    frames_captured: int
    frames_sent: int
    frames_dropped: int         # by the latest policy, or refused by encode
    frames_unsent: int          # still queued (or refused by the consumer) at stop
    run_id: str | None = None
    producer: str | None = None  # the producer's life token (None: not said)


@dataclass(frozen=True)
class Heartbeat:
    """The producer is alive, and how it is doing (the same counters as EndOfStream)."""

    source_id: str
    seq: int                    # last frame seq sent, -1 when none
    mono_ns: int                # time.monotonic_ns() when the heartbeat was sent
    frames_captured: int
    frames_sent: int
    frames_dropped: int
    frames_unsent: int
    run_id: str | None = None
    producer: str | None = None  # the producer's life token (None: not said)


@dataclass(frozen=True)
class RingFrame:
    """A frame's header whose pixels wait in slot ``slot`` of the shared-memory ring
    ``ring`` (see *Frame ring*); the worker's inbox turns it into a :class:`Frame`."""

    source_id: str
    seq: int
    wall_time: float
    mono_ns: int
    shape: tuple[int, ...]      # (H, W) or (H, W, 3), uint8
    ring: str                   # the ring's token
    slot: int
    part_id: int | None = None
    encoder: int | None = None
    truth: int | None = None
    run_id: str | None = None

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Hello:
    """A remote producer asks the worker's hello socket for its run (see *the hello*)."""

    source_id: str
    mono_ns: int                # the producer's own monotonic clock when sent


@dataclass(frozen=True)
class Welcome:
    """The worker's answer to a Hello: its run, the source's port, the run's state."""

    source_id: str
    state: str                  # one of WELCOME_STATES
    port: int                   # the source's tcp port; 0 when it has none
    mono_ns: int                # the worker's monotonic clock when answering
    echo_ns: int                # the Hello's mono_ns
    run_id: str | None = None


@dataclass(frozen=True)
class RingOffer:
    """A producer offers its frame ring (the fd travels beside it, SCM_RIGHTS)."""

    source_id: str
    ring: str                   # the ring's token
    slots: int
    slot_bytes: int
    run_id: str | None = None


@dataclass(frozen=True)
class RingReply:
    """The worker's answer to a RingOffer: "" when it mapped the ring, else why not."""

    ring: str
    error: str


MESSAGE_TYPES = ", ".join(t.__name__ for t in (Frame, RingFrame, EndOfStream, Heartbeat, Hello,
                                                Welcome, RingOffer, RingReply))
Message = Union[Frame, RingFrame, EndOfStream, Heartbeat, Hello, Welcome, RingOffer,
                RingReply]


def _check_image(image: Any, where: str) -> None:
    if not isinstance(image, np.ndarray):
        raise ProtocolError(f"{where}: image must be a numpy array, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise ProtocolError(
            f"{where}: image dtype is {image.dtype}, protocol v{PROTOCOL_VERSION} carries only "
            "uint8; convert with cv2.convertScaleAbs or np.clip(...).astype(np.uint8)"
        )
    if not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)):
        raise ProtocolError(
            f"{where}: image shape is {image.shape}, expected (H, W) gray or (H, W, 3) BGR; "
            "convert with cv2.cvtColor (e.g. COLOR_BGRA2BGR)"
        )


def clean_reason(text: str) -> str:
    """An end-of-stream reason the wire accepts: one line, printable, at most 256 chars."""
    line = " ".join("".join(ch if ch.isprintable() else " " for ch in str(text)).split())
    return line if len(line) <= MAX_REASON_CHARS else line[:MAX_REASON_CHARS - 3] + "..."


# --------------------------------------------------------------------------- field checks
#
# One checker per header key, shared by encode and decode. Each takes the value and returns
# it (wall_time as a float) or raises ProtocolError naming the key. `type(x) is int` and not
# isinstance: True is an int to Python, but not a frame number.


def _int(lo: int, hi: int = _INT64_MAX, nil: bool = False) -> Callable[[str, Any], Any]:
    def check(key: str, value: Any) -> Any:
        if value is None and nil:
            return None
        if type(value) is not int or not lo <= value <= hi:
            bounds = f">= {lo}" if hi == _INT64_MAX else f"in [{lo}, {hi}]"
            raise ProtocolError(f"{key} must be an int {bounds}{' or nil' if nil else ''}, "
                                f"got {_short(value)}")
        return value
    return check


def _truth(key: str, value: Any) -> Any:
    if value is not None and (type(value) is not int or value not in (0, 1)):
        raise ProtocolError(f"{key} must be 0, 1 or nil, got {_short(value)}")
    return value


def _wall_time(key: str, value: Any) -> float:
    if type(value) not in (float, int) or not (math.isfinite(value)
                                                and 0 <= value < _WALL_TIME_END):
        raise ProtocolError(f"{key} must be a finite number of seconds since the epoch in "
                            f"[0, {_WALL_TIME_END:.0f}), got {_short(value)}")
    return float(value)


def _dtype(key: str, value: Any) -> str:
    if value != _DTYPE or type(value) is not str:
        raise ProtocolError(f"frame dtype {_short(value)} is not supported; protocol "
                            f"v{PROTOCOL_VERSION} carries only {_DTYPE!r}")
    return value


def _shape(key: str, value: Any) -> list:
    if (type(value) is not list or len(value) not in (2, 3)
            or not all(type(n) is int and 1 <= n <= _MAX_DIM for n in value)
            or (len(value) == 3 and value[2] != 3)):
        raise ProtocolError(f"frame shape {_short(value)} is not [H, W] or [H, W, 3] of "
                            f"ints in [1, {_MAX_DIM}]")
    return value


def _reason(key: str, value: Any) -> str:
    if type(value) is not str or len(value) > MAX_REASON_CHARS or not value.isprintable():
        raise ProtocolError(f"{key} must be a printable str of at most {MAX_REASON_CHARS} "
                            f"chars (protocol.clean_reason makes one), got {_short(value)}")
    return value


def _named(check: Callable[[Any], str]) -> Callable[[str, Any], str]:
    return lambda key, value: check(value)


def _token(key: str, value: Any) -> str:
    # A ring or producer-life token: the run token's alphabet, named by its own key.
    if type(value) is not str or not _RUN_ID.fullmatch(value):
        raise ProtocolError(f"{key} {_short(value)} must be 1-64 characters of A-Z a-z 0-9 _ -")
    return value


def _nil_or(check: Callable[[str, Any], Any]) -> Callable[[str, Any], Any]:
    return lambda key, value: None if value is None else check(key, value)


def _one_of(choices: tuple[str, ...]) -> Callable[[str, Any], str]:
    def check(key: str, value: Any) -> str:
        if type(value) is not str or value not in choices:
            raise ProtocolError(f"{key} must be one of {list(choices)}, got {_short(value)}")
        return value
    return check


_COUNTERS = {key: _int(0) for key in
             ("frames_captured", "frames_sent", "frames_dropped", "frames_unsent")}
_COMMON = {"run": _named(check_run_id), "source_id": _named(check_source_id)}
_FRAME = {**_COMMON, "seq": _int(0), "wall_time": _wall_time, "mono_ns": _int(0),
          "part_id": _int(_INT64_MIN, nil=True), "encoder": _int(_INT64_MIN, nil=True),
          "truth": _truth, "dtype": _dtype, "shape": _shape}

# Every header key a kind carries besides "v" and "kind", with its checker; and its parts.
_FIELDS: dict[str, dict[str, Callable[[str, Any], Any]]] = {
    "frame": _FRAME,
    "ring_frame": {**_FRAME, "ring": _token, "slot": _int(0, MAX_RING_SLOTS - 1)},
    "eos": {**_COMMON, "last_seq": _int(-1), "reason": _reason, "producer": _nil_or(_token),
            **_COUNTERS},
    "heartbeat": {**_COMMON, "seq": _int(-1), "mono_ns": _int(0),
                  "producer": _nil_or(_token), **_COUNTERS},
    "hello": {"source_id": _named(check_source_id), "mono_ns": _int(0)},
    "welcome": {**_COMMON, "state": _one_of(WELCOME_STATES), "port": _int(0, 65535),
                "mono_ns": _int(0), "echo_ns": _int(0)},
    "ring": {**_COMMON, "ring": _token, "slots": _int(1, MAX_RING_SLOTS),
             "slot_bytes": _int(1, MAX_RING_BYTES)},
    "ring_reply": {"ring": _token, "error": _reason},
}
_PARTS = {kind: 1 for kind in _FIELDS}
_PARTS["frame"] = 2

# Which kinds each channel carries; decode(expect=...) refuses the others.
DATA_KINDS = frozenset({"frame", "ring_frame", "eos", "heartbeat"})   # a source's socket
HELLO_KINDS = frozenset({"hello"})                                    # the hello socket
WELCOME_KINDS = frozenset({"welcome"})                                # its answers
RING_OFFER_KINDS = frozenset({"ring"})                                # the ring's unix socket
RING_REPLY_KINDS = frozenset({"ring_reply"})


def _checked(kind: str, header: dict) -> dict:
    """The header's fields (all but v and kind), each checked; wall_time as a float."""
    fields = _FIELDS[kind]
    keys = set(header) - {"v", "kind"}
    missing = [key for key in fields if key not in keys]
    if missing:
        raise ProtocolError(f"{kind} header is missing {missing}")
    if len(keys) != len(fields):
        extra = sorted(repr(key) for key in keys if key not in fields)
        raise ProtocolError(f"{kind} header has unknown key(s) {', '.join(extra)}; protocol "
                            f"v{PROTOCOL_VERSION} allows exactly {['v', 'kind', *fields]}")
    return {key: check(f"{kind} {key}", header[key]) for key, check in fields.items()}


def _check_ring_size(kind: str, f: dict) -> None:
    if f["slots"] * f["slot_bytes"] > MAX_RING_BYTES:
        raise ProtocolError(f"{kind}: {f['slots']} slots of {f['slot_bytes']} bytes are over "
                            f"the {MAX_RING_BYTES}-byte limit of a frame ring")


# --------------------------------------------------------------------------- encode / decode


def encode(msg: Message, run_id: str | None = None) -> list:
    """Turn a message into multipart parts: [msgpack header] or [header, pixel buffer].

    ``run_id`` stamps the sender's run token (it wins over ``msg.run_id``; one of the two is
    required on the kinds that carry ``run``). Raises :class:`ProtocolError` for a field the
    receiver would refuse.

    The pixel buffer is a memoryview on the image itself (no copy) when the image is
    C-contiguous; only a non-contiguous image (a crop, a channel flip) is copied first.
    The caller must not write into the image until ZeroMQ has sent it; frames are frozen
    and sources hand out a fresh array per frame, so in practice nobody does.
    """
    image = None
    if isinstance(msg, (Frame, RingFrame)):
        if isinstance(msg, Frame):
            image = msg.image if msg.image.flags.c_contiguous else np.ascontiguousarray(msg.image)
            kind, shape, extra = "frame", list(image.shape), {}
        else:
            kind, shape = "ring_frame", [_plain(n) for n in msg.shape]
            extra = {"ring": msg.ring, "slot": _plain(msg.slot)}
        fields = {"seq": msg.seq, "wall_time": msg.wall_time, "mono_ns": msg.mono_ns,
                  "part_id": msg.part_id, "encoder": msg.encoder, "truth": msg.truth,
                  "dtype": _DTYPE, "shape": shape}
        # Sources hand numpy scalars and floats for times; the wire carries plain types.
        fields = {k: (_plain(v) if k != "wall_time" else _plain_float(v))
                  for k, v in fields.items()}
        fields.update(extra)
    elif isinstance(msg, EndOfStream):
        kind = "eos"
        fields = {"last_seq": _plain(msg.last_seq), "reason": msg.reason,
                  "producer": msg.producer}
    elif isinstance(msg, Heartbeat):
        kind = "heartbeat"
        fields = {"seq": _plain(msg.seq), "mono_ns": _plain(msg.mono_ns),
                  "producer": msg.producer}
    elif isinstance(msg, Hello):
        kind, fields = "hello", {"mono_ns": _plain(msg.mono_ns)}
    elif isinstance(msg, Welcome):
        kind = "welcome"
        fields = {"state": msg.state, "port": _plain(msg.port), "mono_ns": _plain(msg.mono_ns),
                  "echo_ns": _plain(msg.echo_ns)}
    elif isinstance(msg, RingOffer):
        kind = "ring"
        fields = {"ring": msg.ring, "slots": _plain(msg.slots),
                  "slot_bytes": _plain(msg.slot_bytes)}
    elif isinstance(msg, RingReply):
        kind, fields = "ring_reply", {"ring": msg.ring, "error": msg.error}
    else:
        raise TypeError(f"cannot encode {type(msg).__name__}; send one of {MESSAGE_TYPES}")
    if kind in ("eos", "heartbeat"):
        fields.update({key: _plain(getattr(msg, key)) for key in _COUNTERS})
    header = {"v": PROTOCOL_VERSION, "kind": kind}
    if "run" in _FIELDS[kind]:
        run = run_id if run_id is not None else getattr(msg, "run_id", None)
        if run is None:
            raise ProtocolError(f"{type(msg).__name__} from source {msg.source_id!r} has no "
                                "run token; pass run_id= to encode/send (protocol.new_run_id())")
        header["run"] = run
    if "source_id" in _FIELDS[kind]:
        header["source_id"] = msg.source_id
    header.update(fields)
    checked = _checked(kind, header)
    if kind == "ring":
        _check_ring_size(kind, checked)
    packed = msgpack.packb(header)
    if image is None:
        return [packed]
    return [packed, memoryview(image).cast("B")]


def _plain(value: Any) -> Any:
    # numpy integers -> int (bools and floats stay as they are, for the check to refuse).
    return int(value) if isinstance(value, np.integer) else value


def _plain_float(value: Any) -> Any:
    # An int time (or a numpy number) goes out as a float; a bool stays, for the check.
    if type(value) is int or isinstance(value, (np.floating, np.integer)):
        return float(value)
    return value


def _no_duplicate_keys(pairs: list) -> dict:
    # msgpack would keep the last of two equal keys; a header that says two things is refused.
    header = dict(pairs)
    if len(header) != len(pairs):
        raise ValueError("a key appears twice in one map")
    return header


def _as_buffer(part: Any, what: str) -> memoryview:
    # A zmq.Frame (recv with copy=False) exposes its memory as .buffer; bytes and
    # memoryviews are buffers already. Either way no bytes are copied here.
    try:
        view = part.buffer if isinstance(part, zmq.Frame) else memoryview(part)
        return view if view.ndim == 1 and view.format in ("B", "b", "c") else view.cast("B")
    except (TypeError, ValueError) as exc:
        raise ProtocolError(f"{what} is not a byte buffer ({_short(part)}): {exc}") from exc


def decode(parts: Any, expect: frozenset[str] = DATA_KINDS) -> Message:
    """Parse multipart parts back into a message of one of the ``expect`` kinds.

    By default the kinds a source's data socket carries: a Frame, RingFrame, EndOfStream or
    Heartbeat. A frame's image is ``np.frombuffer`` on part 1: zero-copy when the parts are
    ``zmq.Frame`` objects from ``recv_multipart(copy=False)``, and read-only.
    Raises :class:`ProtocolError`, and nothing else, saying what is wrong with the message.
    """
    if type(parts) not in (list, tuple) or not parts:
        raise ProtocolError(f"expected a non-empty list of message parts, got {_short(parts)}")
    raw = _as_buffer(parts[0], "the header part")
    if raw.nbytes > MAX_HEADER_BYTES:
        raise ProtocolError(f"header part is {raw.nbytes} bytes, over the {MAX_HEADER_BYTES}"
                            "-byte limit; is the sender speaking grad-edge protocol "
                            f"v{PROTOCOL_VERSION}?")
    try:
        header = msgpack.unpackb(raw, raw=False, strict_map_key=True, use_list=True,
                                 object_pairs_hook=_no_duplicate_keys)
    except Exception as exc:  # msgpack raises several unrelated types
        raise ProtocolError(f"header is not valid msgpack ({type(exc).__name__}: {exc}); is "
                            f"the sender speaking grad-edge protocol v{PROTOCOL_VERSION}?"
                            ) from exc
    if type(header) is not dict:
        raise ProtocolError(f"header must be a msgpack map, got {type(header).__name__}")

    version = header.get("v")
    if type(version) is not int or version != PROTOCOL_VERSION:
        raise ProtocolError(
            f"received protocol version {_short(version)}, this side supports version "
            f"{PROTOCOL_VERSION}; run producer and worker from the same grad-edge release"
        )
    kind = header.get("kind")
    if type(kind) is not str or kind not in _FIELDS:
        raise ProtocolError(f"unknown message kind {_short(kind)}; expected one of "
                            f"{sorted(_FIELDS)}")
    if kind not in expect:
        raise ProtocolError(f"a {kind} message does not belong on this channel, which carries "
                            f"{sorted(expect)}")
    if len(parts) != _PARTS[kind]:
        raise ProtocolError(f"{kind} message must have {_PARTS[kind]} part(s), got {len(parts)}")
    f = _checked(kind, header)

    if kind == "eos":
        return EndOfStream(last_seq=f["last_seq"], reason=f["reason"], producer=f["producer"],
                           **{key: f[key] for key in _COUNTERS}, source_id=f["source_id"],
                           run_id=f["run"])
    if kind == "heartbeat":
        return Heartbeat(seq=f["seq"], mono_ns=f["mono_ns"], producer=f["producer"],
                         **{key: f[key] for key in _COUNTERS}, source_id=f["source_id"],
                         run_id=f["run"])
    if kind == "hello":
        return Hello(source_id=f["source_id"], mono_ns=f["mono_ns"])
    if kind == "welcome":
        return Welcome(source_id=f["source_id"], state=f["state"], port=f["port"],
                       mono_ns=f["mono_ns"], echo_ns=f["echo_ns"], run_id=f["run"])
    if kind == "ring":
        _check_ring_size(kind, f)
        return RingOffer(source_id=f["source_id"], ring=f["ring"], slots=f["slots"],
                         slot_bytes=f["slot_bytes"], run_id=f["run"])
    if kind == "ring_reply":
        return RingReply(ring=f["ring"], error=f["error"])
    common = dict(seq=f["seq"], wall_time=f["wall_time"], mono_ns=f["mono_ns"],
                  part_id=f["part_id"], encoder=f["encoder"], truth=f["truth"],
                  source_id=f["source_id"], run_id=f["run"])
    if kind == "ring_frame":
        return RingFrame(shape=tuple(f["shape"]), ring=f["ring"], slot=f["slot"], **common)
    return Frame(image=_decode_image(f["shape"], parts[1]), **common)


def _decode_image(shape: list, part: Any) -> np.ndarray:
    buffer = _as_buffer(part, "the pixel part")
    expected = math.prod(shape)        # Python ints: no overflow, whatever the header says
    if buffer.nbytes != expected:
        raise ProtocolError(
            f"frame shape {shape} needs {expected} bytes but the pixel part has "
            f"{buffer.nbytes}; the sender's header and buffer disagree"
        )
    image = np.frombuffer(buffer, dtype=np.uint8).reshape(shape)
    # The memory belongs to the received message and may be shared by everyone downstream
    # (model, defect log); nobody may draw on it. zmq.Frame buffers are writable, so say so.
    image.flags.writeable = False
    return image


# --------------------------------------------------------------------------- socket helpers


def send(socket: zmq.Socket, msg: Message, flags: int = 0, run_id: str | None = None) -> None:
    """Send one message stamped with ``run_id``; the pixel buffer goes out without a copy."""
    socket.send_multipart(encode(msg, run_id), flags=flags, copy=False)


def recv(socket: zmq.Socket, flags: int = 0, expect: frozenset[str] = DATA_KINDS) -> Message:
    """Receive one message; a frame's image is a zero-copy view on the received bytes."""
    return decode(socket.recv_multipart(flags=flags, copy=False), expect)


def default_endpoint(name: str, run_dir: str | Path) -> str:
    """``ipc://<run_dir>/<name>.sock``: a local-only endpoint, nothing listens on the network."""
    if not name or "/" in name:
        raise ValueError(f"endpoint name {name!r} must be a non-empty file name without '/'")
    path = Path(run_dir) / f"{name}.sock"
    # Unix socket paths are limited to 107 bytes on Linux; past that bind fails obscurely.
    if len(str(path).encode()) > 107:
        raise ValueError(
            f"ipc socket path {str(path)!r} is {len(str(path).encode())} bytes, over the "
            "107-byte limit of unix sockets; use a shorter run_dir (e.g. under /tmp)"
        )
    return f"ipc://{path}"


def run_endpoint(source_id: str, run_id: str, run_dir: str | Path) -> str:
    """``ipc://<run_dir>/src-<source_id>-<run_id>.sock``: one source's socket in one run.

    A name no other run uses, so a producer orphaned by a killed run never reaches the next
    run's worker (see the module docstring).
    """
    return default_endpoint(f"src-{check_source_id(source_id)}-{check_run_id(run_id)}", run_dir)


def ring_path(endpoint: str) -> str:
    """The unix socket path where a source's frame ring is offered: its ipc socket's path
    with ``.ring`` for ``.sock`` (the same private folder, the same length)."""
    if not endpoint.startswith("ipc://"):
        raise ValueError(f"a frame ring needs the source on an ipc:// endpoint, got {endpoint!r}")
    path = endpoint[len("ipc://"):]
    path = (path[:-len(".sock")] if path.endswith(".sock") else path) + ".ring"
    if len(path.encode()) > 107:
        raise ValueError(f"frame ring socket path {path!r} is over the 107-byte limit of unix "
                         "sockets; use a shorter run_dir (e.g. under /tmp)")
    return path


# ZMTP heartbeats on every tcp connection: a link that dies without a FIN (a cable pulled, a
# router down) is dropped and reconnected after this long, not after TCP's ~15 minutes.
TCP_HEARTBEAT_IVL_MS = 1000
TCP_HEARTBEAT_TIMEOUT_MS = 5000


def keep_alive(socket: zmq.Socket) -> None:
    """Set the tcp heartbeats above (before bind/connect); harmless on ipc."""
    socket.setsockopt(zmq.HEARTBEAT_IVL, TCP_HEARTBEAT_IVL_MS)
    socket.setsockopt(zmq.HEARTBEAT_TIMEOUT, TCP_HEARTBEAT_TIMEOUT_MS)
    socket.setsockopt(zmq.HEARTBEAT_TTL, TCP_HEARTBEAT_TIMEOUT_MS)


def bind(socket: zmq.Socket, endpoint: str) -> str:
    """Bind ``socket`` to ``endpoint`` and return the endpoint bound (a real port for ``:*``).

    An ipc path left behind by a killed process (nobody accepts on it) is replaced -- libzmq
    unlinks it. A path that a live process still listens on is refused: binding over it
    would silently steal that process's producers. Errors name the endpoint and the fix.
    """
    if endpoint.startswith("ipc://"):
        path = endpoint[len("ipc://"):]
        if _someone_listens(path):
            raise ValueError(
                f"cannot bind {endpoint}: another live process listens on that socket "
                "(a second run in the same run_dir?); stop it or use another run_dir")
    try:
        socket.bind(endpoint)
    except zmq.ZMQError as exc:
        raise ValueError(f"cannot bind {endpoint}: {exc}; for ipc:// the path must be a "
                         "writable location that is not a directory, for tcp:// a free port "
                         "on an address of this host") from exc
    return socket.getsockopt_string(zmq.LAST_ENDPOINT)


def _someone_listens(path: str) -> bool:
    probe = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
        return True
    except OSError:
        # ECONNREFUSED: a stale socket file; ENOENT: nothing there; anything else (not a
        # socket, no permission) is left for bind to report.
        return False
    finally:
        probe.close()
