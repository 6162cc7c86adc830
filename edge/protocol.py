"""The wire format between frame producers and the model worker, defined once.

Every producer (``camera_sources``) and the worker (``edge.worker``) speak through this
module and nothing else, so this docstring is the whole specification.

Transport
---------
ZeroMQ PUSH (producer) -> PULL (worker). Each message is one ZeroMQ *multipart* message.
Endpoints bind to loopback only by default: ``ipc://<run_dir>/<name>.sock``
(see :func:`default_endpoint`) or ``tcp://127.0.0.1:<port>``. Nothing on the wire is
pickled, so a producer cannot make the worker run code.

Messages
--------
Part 0 of every message is a small msgpack map, the *header*. Two keys are always there:

=========  =======  ===============================================================
key        type     meaning
=========  =======  ===============================================================
``v``      int      protocol version; this module speaks ``PROTOCOL_VERSION`` (1)
``kind``   str      ``"frame"``, ``"eos"`` or ``"heartbeat"``
=========  =======  ===============================================================

``kind == "frame"`` -- one captured image; exactly two parts.

=============  ===========  ===========================================================
key            type         meaning
=============  ===========  ===========================================================
``source_id``  str          which producer sent it (unique per line)
``seq``        int          the source's frame number; strictly increasing, gaps mean
                            frames the source could not read (corrupt, skipped)
``wall_time``  float        ``time.time()`` at capture (seconds since the epoch)
``mono_ns``    int          ``time.monotonic_ns()`` at capture, on the producer's host
``part_id``    int | nil    the part on the conveyor, when the source knows it
``encoder``    int | nil    conveyor encoder count at capture, when known
``truth``      int | nil    ground truth 0 (good) / 1 (defect) when the source knows it
``dtype``      str          always ``"uint8"`` in version 1
``shape``      [int, ...]   ``[H, W]`` (gray) or ``[H, W, 3]`` (BGR, as OpenCV gives it)
=============  ===========  ===========================================================

Part 1 is the raw pixel buffer: ``H * W * C`` bytes, C-contiguous (row-major, channels
last). It is sent without copying (``copy=False``) and received without copying, so a
decoded image is a *read-only* view on the received message: copy it before drawing on it.

``kind == "eos"`` -- end of stream; one part. ``source_id``, ``last_seq`` (the last frame
``seq`` sent, -1 when none), ``reason`` (``"end of file"``, ``"stopped"``, ...). Nothing
follows it from that producer.

``kind == "heartbeat"`` -- the producer is alive; one part. Sent every ``heartbeat_s``
(default 1 s) even while the source has nothing to send. ``source_id``, ``seq`` (last frame
``seq`` sent, -1 when none), ``mono_ns`` (when the heartbeat was sent), ``frames_sent``,
``frames_dropped`` (frames the producer captured but never sent).

Versions
--------
1 -- this document. A receiver rejects any other ``v`` with :class:`ProtocolError`; a
change to the layout above must bump ``PROTOCOL_VERSION``.

Backpressure
------------
Named by :class:`DropPolicy` (``edge.backpressure``, re-exported here). ``every_frame``: nothing is dropped; the worker's bounded
queue fills, the worker stops reading, ZeroMQ's high-water marks fill and the producer's
``send`` blocks. ``latest``: the worker keeps reading into a :class:`LatestQueue`, which
drops the *oldest* frame when full and counts every drop.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import msgpack
import numpy as np
import zmq

# Re-exported: the drop policies are part of what producer and worker agree on.
from edge.backpressure import DropPolicy, LatestQueue, make_queue  # noqa: F401


PROTOCOL_VERSION = 1

# The only pixel type version 1 carries; a model worker never has to guess.
_DTYPE = "uint8"


class ProtocolError(ValueError):
    """A message that does not follow this module's wire format."""


# --------------------------------------------------------------------------- messages


@dataclass(frozen=True)
class Frame:
    """One captured image and where/when it was captured."""

    source_id: str
    seq: int
    wall_time: float            # time.time() at capture
    mono_ns: int                # time.monotonic_ns() at capture, producer host
    image: np.ndarray           # uint8, (H, W, 3) BGR or (H, W) gray
    part_id: int | None = None
    encoder: int | None = None  # conveyor encoder count at capture
    truth: int | None = None    # 0 good / 1 defect when the source knows it

    def __post_init__(self) -> None:
        # Checked here so a bad source fails where it builds the frame, not in the worker.
        _check_image(self.image, where=f"Frame from source {self.source_id!r}")


@dataclass(frozen=True)
class EndOfStream:
    """The producer has sent its last frame."""

    source_id: str
    last_seq: int               # -1 when no frame was sent
    reason: str                 # "end of file", "stopped", ...


@dataclass(frozen=True)
class Heartbeat:
    """The producer is alive, and how it is doing."""

    source_id: str
    seq: int                    # last frame seq sent, -1 when none
    mono_ns: int                # time.monotonic_ns() when the heartbeat was sent
    frames_sent: int
    frames_dropped: int


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


# --------------------------------------------------------------------------- encode / decode


def encode(msg: Message) -> list:
    """Turn a message into multipart parts: [msgpack header] or [header, pixel buffer].

    The pixel buffer is a memoryview on the image itself (no copy) when the image is
    C-contiguous; only a non-contiguous image (a crop, a channel flip) is copied first.
    The caller must not write into the image until ZeroMQ has sent it; frames are frozen
    and sources hand out a fresh array per frame, so in practice nobody does.
    """
    if isinstance(msg, Frame):
        image = msg.image if msg.image.flags.c_contiguous else np.ascontiguousarray(msg.image)
        header = {
            "v": PROTOCOL_VERSION,
            "kind": "frame",
            "source_id": msg.source_id,
            "seq": int(msg.seq),
            "wall_time": float(msg.wall_time),
            "mono_ns": int(msg.mono_ns),
            "part_id": None if msg.part_id is None else int(msg.part_id),
            "encoder": None if msg.encoder is None else int(msg.encoder),
            "truth": None if msg.truth is None else int(msg.truth),
            "dtype": _DTYPE,
            "shape": list(image.shape),
        }
        return [msgpack.packb(header), memoryview(image).cast("B")]
    if isinstance(msg, EndOfStream):
        header = {
            "v": PROTOCOL_VERSION,
            "kind": "eos",
            "source_id": msg.source_id,
            "last_seq": int(msg.last_seq),
            "reason": str(msg.reason),
        }
        return [msgpack.packb(header)]
    if isinstance(msg, Heartbeat):
        header = {
            "v": PROTOCOL_VERSION,
            "kind": "heartbeat",
            "source_id": msg.source_id,
            "seq": int(msg.seq),
            "mono_ns": int(msg.mono_ns),
            "frames_sent": int(msg.frames_sent),
            "frames_dropped": int(msg.frames_dropped),
        }
        return [msgpack.packb(header)]
    raise TypeError(
        f"cannot encode {type(msg).__name__}; send a Frame, EndOfStream or Heartbeat"
    )


# Header keys each kind must carry (besides "v" and "kind"), and how many parts it has.
_FIELDS = {
    "frame": ("source_id", "seq", "wall_time", "mono_ns", "part_id", "encoder", "truth",
              "dtype", "shape"),
    "eos": ("source_id", "last_seq", "reason"),
    "heartbeat": ("source_id", "seq", "mono_ns", "frames_sent", "frames_dropped"),
}
_PARTS = {"frame": 2, "eos": 1, "heartbeat": 1}


def _as_buffer(part: Any) -> memoryview:
    # A zmq.Frame (recv with copy=False) exposes its memory as .buffer; bytes and
    # memoryviews are buffers already. Either way no bytes are copied here.
    if isinstance(part, zmq.Frame):
        return part.buffer
    return memoryview(part)


def decode(parts: list) -> Message:
    """Parse multipart parts back into a Frame, EndOfStream or Heartbeat.

    A frame's image is ``np.frombuffer`` on part 1: zero-copy when the parts are
    ``zmq.Frame`` objects from ``recv_multipart(copy=False)``, and read-only.
    Raises :class:`ProtocolError` saying what is wrong with the message.
    """
    if not parts:
        raise ProtocolError("empty message: expected at least a header part")
    try:
        header = msgpack.unpackb(_as_buffer(parts[0]))
    except Exception as exc:  # msgpack raises several unrelated types
        raise ProtocolError(f"header is not valid msgpack ({exc}); is the sender speaking "
                            f"grad-edge protocol v{PROTOCOL_VERSION}?") from exc
    if not isinstance(header, dict):
        raise ProtocolError(f"header must be a msgpack map, got {type(header).__name__}")

    version = header.get("v")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(
            f"received protocol version {version!r}, this side supports version "
            f"{PROTOCOL_VERSION}; run producer and worker from the same grad-edge release"
        )
    kind = header.get("kind")
    if kind not in _FIELDS:
        raise ProtocolError(f"unknown message kind {kind!r}; expected one of {sorted(_FIELDS)}")
    missing = [key for key in _FIELDS[kind] if key not in header]
    if missing:
        raise ProtocolError(f"{kind} header is missing {missing}")
    if len(parts) != _PARTS[kind]:
        raise ProtocolError(f"{kind} message must have {_PARTS[kind]} part(s), got {len(parts)}")

    if kind == "eos":
        return EndOfStream(source_id=header["source_id"], last_seq=header["last_seq"],
                           reason=header["reason"])
    if kind == "heartbeat":
        return Heartbeat(source_id=header["source_id"], seq=header["seq"],
                         mono_ns=header["mono_ns"], frames_sent=header["frames_sent"],
                         frames_dropped=header["frames_dropped"])
    return Frame(
        source_id=header["source_id"],
        seq=header["seq"],
        wall_time=header["wall_time"],
        mono_ns=header["mono_ns"],
        image=_decode_image(header, parts[1]),
        part_id=header["part_id"],
        encoder=header["encoder"],
        truth=header["truth"],
    )


def _decode_image(header: dict, part: Any) -> np.ndarray:
    if header["dtype"] != _DTYPE:
        raise ProtocolError(f"frame dtype {header['dtype']!r} is not supported; "
                            f"protocol v{PROTOCOL_VERSION} carries only {_DTYPE!r}")
    shape = header["shape"]
    if (not isinstance(shape, list) or len(shape) not in (2, 3)
            or not all(isinstance(n, int) and n > 0 for n in shape)
            or (len(shape) == 3 and shape[2] != 3)):
        raise ProtocolError(f"frame shape {shape!r} is not [H, W] or [H, W, 3] of positive ints")
    buffer = _as_buffer(part)
    expected = int(np.prod(shape))
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


def send(socket: zmq.Socket, msg: Message, flags: int = 0) -> None:
    """Send one message; the pixel buffer goes out without a copy."""
    socket.send_multipart(encode(msg), flags=flags, copy=False)


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
