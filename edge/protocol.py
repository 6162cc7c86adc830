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

Messages
--------
Part 0 of every message is a small msgpack map, the *header* (at most
``MAX_HEADER_BYTES`` = 4096 bytes). Every kind carries these four keys:

=============  =====  ======================================================================
key            type   meaning
=============  =====  ======================================================================
``v``          int    protocol version; this module speaks ``PROTOCOL_VERSION`` (2)
``kind``       str    ``"frame"``, ``"eos"`` or ``"heartbeat"``
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
``mono_ns``    int          ``time.monotonic_ns()`` at capture on the producer's host, >= 0
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

``kind == "eos"`` -- end of stream; one part. Nothing follows it from that producer.

===================  =====  ================================================================
key                  type   meaning
===================  =====  ================================================================
``last_seq``         int    the last frame ``seq`` sent, >= -1 (-1 when none)
``reason``           str    why the stream ended (``"end of file"``, ``"stopped"``,
                            ``"source error: ..."``): at most ``MAX_REASON_CHARS`` (256)
                            printable characters (no newlines, no control characters)
``frames_captured``  int    frames the source produced, whether sent or not
``frames_sent``      int    frames handed to ZeroMQ
``frames_dropped``   int    frames captured but dropped while running: by the ``latest``
                            policy's queue, or refused by :func:`encode` (a source bug)
``frames_unsent``    int    frames captured but not sent because the stream stopped
===================  =====  ================================================================

``kind == "heartbeat"`` -- the producer is alive; one part. Sent every ``heartbeat_s``
(default 1 s) even while the source has nothing to send. ``seq`` (int >= -1: the last frame
``seq`` sent, -1 when none), ``mono_ns`` (int >= 0: when the heartbeat was sent), and the
same four counters as ``eos``, so far.

The counters are ints >= 0. In an ``eos``, ``frames_captured == frames_sent +
frames_dropped + frames_unsent``: every frame the source produced is accounted for. In a
heartbeat the difference is the frames still in the producer's queue. A worker can then
account for every captured frame: sent = received + lost in transit, and received =
judged + dropped by its own queue + unjudged at stop.

Every int on the wire is a plain int (never a bool, never a float) in the signed 64-bit range
(it is stored in SQLite). A header has exactly the keys its kind lists: a missing key, an
unknown extra key or a key given twice is an error, not ignored -- the version is compared
exactly, so an extra key can only come from a sender that is not following this document.

Errors
------
:func:`decode` raises :class:`ProtocolError`, and nothing else, for anything that does not
follow this document: too few or too many parts, a part that is not a buffer, a header that
is not msgpack or not a map, a wrong version, any field of the wrong type or out of range, a
pixel buffer whose size disagrees with ``shape``. :func:`encode` applies the same checks, so
a sender can never put on the wire what a receiver refuses.

Versions
--------
1 -- ``v``, ``kind``, ``source_id``; frames as above; ``eos`` with ``last_seq``, ``reason``;
heartbeats with ``seq``, ``mono_ns``, ``frames_sent``, ``frames_dropped`` (which then also
counted frames unsent at stop). Field types were not checked.

2 -- this document: the ``run`` token in every header; ``frames_captured`` and
``frames_unsent`` in heartbeats, and all four counters in ``eos``; ``frames_dropped`` no
longer counts frames unsent at stop; every field's type and range checked; unknown and
duplicate keys refused; the header bounded to 4096 bytes.

A receiver rejects any other ``v`` with :class:`ProtocolError`; a change to the layout above
must bump ``PROTOCOL_VERSION`` and add a line here.

Backpressure
------------
Named by :class:`DropPolicy` (``edge.backpressure``, re-exported here). ``every_frame``:
nothing is dropped; the worker's bounded queue fills, the worker stops reading, ZeroMQ's
high-water marks fill and the producer's ``send`` blocks. ``latest``: the worker keeps
reading into a :class:`LatestQueue`, which drops the *oldest* frame when full and counts
every drop.
"""

from __future__ import annotations

import math
import re
import socket as _socket
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Union

import msgpack
import numpy as np
import zmq

# Re-exported: the drop policies are part of what producer and worker agree on.
from edge.backpressure import DropPolicy, LatestQueue, make_queue  # noqa: F401

PROTOCOL_VERSION = 2

# The only pixel type the protocol carries; a model worker never has to guess.
_DTYPE = "uint8"

MAX_HEADER_BYTES = 4096        # a real header is ~250 bytes; more is garbage or an attack
MAX_REASON_CHARS = 256
_INT64_MIN, _INT64_MAX = -(2 ** 63), 2 ** 63 - 1
_MAX_DIM = 2 ** 31 - 1
_WALL_TIME_END = 253402300800.0   # 10000-01-01: datetime (and so a dated folder) ends there

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


Message = Union[Frame, EndOfStream, Heartbeat]


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


_COUNTERS = {key: _int(0) for key in
             ("frames_captured", "frames_sent", "frames_dropped", "frames_unsent")}
_COMMON = {"run": _named(check_run_id), "source_id": _named(check_source_id)}

# Every header key a kind carries besides "v" and "kind", with its checker; and its parts.
_FIELDS: dict[str, dict[str, Callable[[str, Any], Any]]] = {
    "frame": {**_COMMON, "seq": _int(0), "wall_time": _wall_time, "mono_ns": _int(0),
              "part_id": _int(_INT64_MIN, nil=True), "encoder": _int(_INT64_MIN, nil=True),
              "truth": _truth, "dtype": _dtype, "shape": _shape},
    "eos": {**_COMMON, "last_seq": _int(-1), "reason": _reason, **_COUNTERS},
    "heartbeat": {**_COMMON, "seq": _int(-1), "mono_ns": _int(0), **_COUNTERS},
}
_PARTS = {"frame": 2, "eos": 1, "heartbeat": 1}


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


# --------------------------------------------------------------------------- encode / decode


def encode(msg: Message, run_id: str | None = None) -> list:
    """Turn a message into multipart parts: [msgpack header] or [header, pixel buffer].

    ``run_id`` stamps the sender's run token (it wins over ``msg.run_id``; one of the two is
    required). Raises :class:`ProtocolError` for a field the receiver would refuse.

    The pixel buffer is a memoryview on the image itself (no copy) when the image is
    C-contiguous; only a non-contiguous image (a crop, a channel flip) is copied first.
    The caller must not write into the image until ZeroMQ has sent it; frames are frozen
    and sources hand out a fresh array per frame, so in practice nobody does.
    """
    run = run_id if run_id is not None else getattr(msg, "run_id", None)
    if run is None:
        raise ProtocolError(f"{type(msg).__name__} from source {msg.source_id!r} has no run "
                            "token; pass run_id= to encode/send (protocol.new_run_id())")
    image = None
    if isinstance(msg, Frame):
        image = msg.image if msg.image.flags.c_contiguous else np.ascontiguousarray(msg.image)
        kind = "frame"
        fields = {"seq": msg.seq, "wall_time": msg.wall_time, "mono_ns": msg.mono_ns,
                  "part_id": msg.part_id, "encoder": msg.encoder, "truth": msg.truth,
                  "dtype": _DTYPE, "shape": list(image.shape)}
        # Sources hand numpy scalars and floats for times; the wire carries plain types.
        fields = {k: (_plain(v) if k != "wall_time" else _plain_float(v))
                  for k, v in fields.items()}
    elif isinstance(msg, EndOfStream):
        kind = "eos"
        fields = {"last_seq": _plain(msg.last_seq), "reason": msg.reason}
    elif isinstance(msg, Heartbeat):
        kind = "heartbeat"
        fields = {"seq": _plain(msg.seq), "mono_ns": _plain(msg.mono_ns)}
    else:
        raise TypeError(
            f"cannot encode {type(msg).__name__}; send a Frame, EndOfStream or Heartbeat")
    if kind != "frame":
        fields.update({key: _plain(getattr(msg, key)) for key in _COUNTERS})
    header = {"v": PROTOCOL_VERSION, "kind": kind, "run": run, "source_id": msg.source_id,
              **fields}
    _checked(kind, header)
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


def decode(parts: Any) -> Message:
    """Parse multipart parts back into a Frame, EndOfStream or Heartbeat.

    A frame's image is ``np.frombuffer`` on part 1: zero-copy when the parts are
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
    if len(parts) != _PARTS[kind]:
        raise ProtocolError(f"{kind} message must have {_PARTS[kind]} part(s), got {len(parts)}")
    f = _checked(kind, header)
    common = {"source_id": f["source_id"], "run_id": f["run"]}

    if kind == "eos":
        return EndOfStream(last_seq=f["last_seq"], reason=f["reason"],
                           **{key: f[key] for key in _COUNTERS}, **common)
    if kind == "heartbeat":
        return Heartbeat(seq=f["seq"], mono_ns=f["mono_ns"],
                         **{key: f[key] for key in _COUNTERS}, **common)
    return Frame(seq=f["seq"], wall_time=f["wall_time"], mono_ns=f["mono_ns"],
                 image=_decode_image(f["shape"], parts[1]), part_id=f["part_id"],
                 encoder=f["encoder"], truth=f["truth"], **common)


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


def recv(socket: zmq.Socket, flags: int = 0) -> Message:
    """Receive one message; a frame's image is a zero-copy view on the received bytes."""
    return decode(socket.recv_multipart(flags=flags, copy=False))


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
                         "writable location that is not a directory, for tcp:// a free "
                         "127.0.0.1 port") from exc
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
