"""What a frame source is: the contract every source keeps, the parts they share (the belt's
encoder stamp, pacing, the trigger on a moving belt), a fake, and how a source is built from
its spec. The producer that pushes a source's frames to the worker is camera_sources/producer.py.

A *source* turns something (a video file, a camera, a folder, the synthetic line) into
:class:`edge.protocol.Frame` objects.

This package imports only the wire format (``edge.protocol``) plus numpy, cv2 and zmq, so a
producer process never loads torch.
"""

from __future__ import annotations

import abc
import importlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Protocol, Sequence

import numpy as np

from edge.protocol import Frame

logger = logging.getLogger(__name__)


class StopEvent(Protocol):
    """``threading.Event`` or ``multiprocessing.Event``: all a source needs of either."""

    def is_set(self) -> bool: ...

    def wait(self, timeout: float | None = None) -> bool: ...


# --------------------------------------------------------------------------- the contract


class FrameSource(abc.ABC):
    """Something that yields frames until its stream ends or ``stop`` is set.

    ``frames(stop)`` is a generator; it returns (ends) at the end of the stream and sets
    ``end_reason`` to say why, and it must notice ``stop`` within a fraction of a second
    (sleep with ``stop.wait(...)``, never ``time.sleep``). ``close()`` releases devices and
    files; it is safe to call twice.
    """

    source_id: str
    end_reason: str = "end of stream"
    _lend: Callable[[tuple[int, ...]], np.ndarray | None] | None = None

    @abc.abstractmethod
    def frames(self, stop: StopEvent) -> Iterator[Frame]:
        """Yield frames in capture order until the stream ends or ``stop`` is set."""

    def buffer(self, shape: tuple[int, ...]) -> np.ndarray | None:
        """A uint8 array of ``shape`` to capture the next frame into, or None.

        A slot of the producer's shared-memory frame ring when it has one free (``transport:
        shm``): a source that captures into it (decodes, renders, copies) and yields it as the
        frame's image sends that frame without any further copy. None otherwise: capture
        into an array of your own, as always.
        """
        lend = self._lend
        return lend(shape) if lend is not None else None

    def lend_buffers(self, lend: Callable[[tuple[int, ...]], np.ndarray | None]) -> None:
        """The producer offers capture buffers (its frame ring's ``lend``); see buffer()."""
        self._lend = lend

    def close(self) -> None:
        """Release what the source holds. Default: nothing to release."""

    def __enter__(self) -> "FrameSource":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


@dataclass(frozen=True)
class ConveyorEncoder:
    """A simulated conveyor: the encoder advances ``counts_per_frame`` per frame and a new
    part arrives every ``frames_per_part`` frames. Real lines wire a real encoder instead."""

    counts_per_frame: int = 100
    frames_per_part: int = 1

    def __post_init__(self) -> None:
        if self.counts_per_frame < 0 or self.frames_per_part < 1:
            raise ValueError(
                f"ConveyorEncoder needs counts_per_frame >= 0 and frames_per_part >= 1, got "
                f"{self.counts_per_frame} and {self.frames_per_part}"
            )

    def encoder(self, seq: int) -> int:
        return seq * self.counts_per_frame

    def part_id(self, seq: int) -> int:
        return seq // self.frames_per_part


class Pacer:
    """Releases frames at a steady rate, or at once when ``fps`` is None.

    Deadlines are absolute (start + n / fps), so a slow frame does not slow every frame
    after it. When more than a second behind (the machine was busy) the schedule restarts
    from now instead of bursting to catch up.
    """

    def __init__(self, fps: float | None):
        if fps is not None and fps <= 0:
            raise ValueError(f"fps must be > 0 or None (as fast as possible), got {fps}")
        self.fps = fps
        self._start: float | None = None
        self._n = 0

    def wait(self, stop: StopEvent) -> bool:
        """Wait until the next frame is due; False when ``stop`` was set meanwhile."""
        if self.fps is None:
            return not stop.is_set()
        now = time.monotonic()
        if self._start is None:
            self._start = now
        due = self._start + self._n / self.fps
        if now - due > 1.0:
            logger.info("pacer %.1f fps is %.1f s behind; restarting its schedule",
                        self.fps, now - due)
            self._start, self._n, due = now, 0, now
        self._n += 1
        if due > now:
            return not stop.wait(due - now)
        return not stop.is_set()


class BeltTrigger:
    """Frames triggered by a moving belt: frame ``seq`` is taken when the belt reaches
    ``seq * counts_per_frame``, as an encoder-triggered camera does.

    The frame's stamps are that moment, even when the producer gets to it late (the worker
    was slow and every_frame held the producer back): the part was under the camera then,
    so the reject is due ``camera_to_ejector_counts`` after it, and a verdict that comes too
    late is a missed reject, never a reject of whatever part is at the ejector now.
    A producer that starts on a belt already moving (a restart after a crash) begins at the
    part under the camera now; the parts that passed meanwhile were never captured.
    """

    def __init__(self, belt, conveyor: ConveyorEncoder):
        if conveyor.counts_per_frame <= 0:
            raise ValueError("a belt-triggered source needs counts_per_frame > 0")
        self.belt = belt
        self.conveyor = conveyor

    def first_seq(self) -> int:
        """Start the belt unless it runs already; the seq of the next part to reach the camera."""
        self.belt.start()
        position = self.belt.read() or 0
        return -(-position // self.conveyor.counts_per_frame)      # ceil

    def wait(self, seq: int, stop: StopEvent) -> bool:
        """Wait until the belt reaches frame ``seq``; False when ``stop`` was set meanwhile."""
        due_ns = self.belt.time_at(self.conveyor.encoder(seq))
        delay = (due_ns - time.monotonic_ns()) / 1e9
        if delay > 0:
            return not stop.wait(delay)
        return not stop.is_set()

    def stamp(self, seq: int) -> tuple[float, int]:
        """(wall_time, mono_ns) of the moment frame ``seq`` was triggered."""
        mono_ns = self.belt.time_at(self.conveyor.encoder(seq))
        return time.time() - (time.monotonic_ns() - mono_ns) / 1e9, mono_ns


def make_frame(source_id: str, seq: int, image: np.ndarray, *, part_id: int | None = None,
               encoder: int | None = None, truth: int | None = None,
               stamp: tuple[float, int] | None = None) -> Frame:
    """A frame stamped with both clocks: now, or ``stamp`` = (wall_time, mono_ns) when the
    capture moment is known better (a belt trigger)."""
    wall_time, mono_ns = stamp if stamp is not None else (time.time(), time.monotonic_ns())
    return Frame(source_id=source_id, seq=seq, wall_time=wall_time, mono_ns=mono_ns,
                 image=image, part_id=part_id, encoder=encoder, truth=truth)


class FakeSource(FrameSource):
    """A real in-memory source over a list of arrays, for tests and examples.

    ``fps=None`` yields as fast as the consumer takes them. ``hold_open=True`` keeps the
    stream open (yielding nothing) after the last image until ``stop`` is set, like a
    camera with no parts passing.
    """

    def __init__(self, images: Sequence[np.ndarray], source_id: str = "fake",
                 fps: float | None = None, truths: Sequence[int] | None = None,
                 hold_open: bool = False):
        if truths is not None and len(truths) != len(images):
            raise ValueError(f"FakeSource got {len(images)} images but {len(truths)} truths")
        self.source_id = source_id
        self._images = list(images)
        self._truths = list(truths) if truths is not None else None
        self._fps = fps
        self._hold_open = hold_open

    def frames(self, stop: StopEvent) -> Iterator[Frame]:
        pacer = Pacer(self._fps)
        for seq, image in enumerate(self._images):
            if not pacer.wait(stop):
                self.end_reason = "stopped"
                return
            truth = None if self._truths is None else self._truths[seq]
            # A copy per frame: the producer sends without copying, so frames must not
            # share memory with arrays the caller may reuse. Into a ring slot when lent one.
            captured = self.buffer(image.shape)
            if captured is None:
                captured = np.empty(image.shape, np.uint8)
            np.copyto(captured, image)
            yield make_frame(self.source_id, seq, captured, truth=truth)
        if self._hold_open:
            stop.wait()
            self.end_reason = "stopped"
            return
        self.end_reason = "end of list"


# --------------------------------------------------------------------------- building a source from its spec


@dataclass(frozen=True)
class SourceSpec:
    """Which source to build, by name, with its constructor's keyword arguments.

    Plain data, so it pickles into a ``multiprocessing.Process`` and reads from YAML:
    ``SourceSpec("video", "cam1", {"path": "line.avi", "pace": "file"})``.
    """

    kind: str                    # "video" | "camera" | "folder" | "synthetic" | "fake"
    source_id: str
    options: dict[str, Any] = field(default_factory=dict)


# kind -> (module, class). Imported on demand: each source module imports this one.
SOURCE_KINDS = {
    "video": ("camera_sources.video", "VideoFileSource"),
    "camera": ("camera_sources.camera", "CameraSource"),
    "folder": ("camera_sources.folder", "ImageFolderSource"),
    "synthetic": ("camera_sources.synthetic", "SyntheticLine"),
    "fake": ("camera_sources.base", "FakeSource"),
}


def build_source(spec: SourceSpec) -> FrameSource:
    """Construct the source a spec names."""
    if spec.kind not in SOURCE_KINDS:
        raise ValueError(f"unknown source kind {spec.kind!r}; choose one of {sorted(SOURCE_KINDS)}")
    module_name, class_name = SOURCE_KINDS[spec.kind]
    source_class = getattr(importlib.import_module(module_name), class_name)
    return source_class(source_id=spec.source_id, **spec.options)
