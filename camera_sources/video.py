"""Frames from a video file: replaying a recorded line as if it were live.

The recording stands in for a camera, so the source also simulates the conveyor encoder
(:class:`~camera_sources.base.ConveyorEncoder`): ``encoder = seq * counts_per_frame`` and
``part_id = seq // frames_per_part``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterator

import cv2

from camera_sources.base import (BeltTrigger, ConveyorEncoder, FrameSource, Pacer, StopEvent,
                                 make_frame)
from edge.protocol import Frame

logger = logging.getLogger(__name__)

PACES = ("file", "fixed", "fast")


class VideoReadError(RuntimeError):
    """A video that stops being readable before its last frame."""


class VideoFileSource(FrameSource):
    """Yields the frames of a video file, paced like the camera that recorded it.

    ``pace``: ``"file"`` at the file's own fps (or ``fps`` when the file does not say),
    ``"fixed"`` at ``fps``, ``"fast"`` as fast as the consumer takes them (replay).
    ``loop=True`` starts over at the end; ``seq`` keeps counting across loops.

    A frame that cannot be decoded mid-file is counted in ``corrupt_frames``, logged and
    skipped (its ``seq`` is left as a gap, the conveyor moved on). The stream ends when a
    read fails past the file's frame count or ``max_consecutive_failures`` reads in a row fail.

    With a ``belt`` (paced video as a stand-in for a live line) frame ``seq`` is triggered
    when the belt reaches ``seq * counts_per_frame``, whatever the pace says.
    """

    def __init__(self, path: str | Path, source_id: str | None = None, pace: str = "file",
                 fps: float | None = None, loop: bool = False, counts_per_frame: int = 100,
                 frames_per_part: int = 1, max_consecutive_failures: int = 10, belt=None):
        if pace not in PACES:
            raise ValueError(f"pace {pace!r} is not one of {PACES}")
        if pace == "fixed" and not fps:
            raise ValueError("pace='fixed' needs fps (frames per second), e.g. fps=10")
        self.path = Path(path)
        self.source_id = source_id or self.path.stem
        self.loop = loop
        self.conveyor = ConveyorEncoder(counts_per_frame, frames_per_part)
        self.trigger = BeltTrigger(belt, self.conveyor) if belt is not None else None
        self.max_consecutive_failures = max_consecutive_failures
        self.corrupt_frames = 0
        self._started = False
        self._shape: tuple[int, ...] | None = None   # of the last frame read
        # Open now, so a wrong path fails where the line is configured, not mid-run.
        self._capture = self._open()
        self.frame_count = int(self._capture.get(cv2.CAP_PROP_FRAME_COUNT))  # <= 0: unknown
        self.fps = self._pick_fps(pace, fps)

    def _open(self) -> cv2.VideoCapture:
        if not self.path.is_file():
            raise FileNotFoundError(f"video file {str(self.path)!r} does not exist; check the "
                                    "source's path in the line config")
        capture = cv2.VideoCapture(str(self.path))
        if not capture.isOpened():
            raise ValueError(f"OpenCV cannot open video {str(self.path)!r}: unsupported codec "
                             "or container, or not a video; try re-encoding it as MJPG .avi "
                             "or H.264 .mp4")
        return capture

    def _pick_fps(self, pace: str, fps: float | None) -> float | None:
        if pace == "fast":
            return None
        if pace == "fixed":
            return fps
        file_fps = self._capture.get(cv2.CAP_PROP_FPS)
        if file_fps and file_fps > 0:
            return file_fps
        fallback = fps or 25.0
        logger.warning("video %s does not state its fps; pacing at %.1f fps", self.path, fallback)
        return fallback

    def frames(self, stop: StopEvent) -> Iterator[Frame]:
        if self._started:          # a second pass starts from the first frame again
            self._capture.release()
            self._capture = self._open()
        self._started = True
        pacer = Pacer(self.fps)
        if self.trigger:
            self.trigger.first_seq()     # starts the belt; a video always starts at frame 0
        seq = 0
        while True:
            # Each attempt is one position on the conveyor, read or not.
            for image in self._read_file_once(stop):
                if image is not None:
                    waited = self.trigger.wait(seq, stop) if self.trigger else pacer.wait(stop)
                    if not waited:
                        self.end_reason = "stopped"
                        return
                    yield make_frame(self.source_id, seq, image,
                                     part_id=self.conveyor.part_id(seq),
                                     encoder=self.conveyor.encoder(seq),
                                     stamp=self.trigger.stamp(seq) if self.trigger else None)
                seq += 1
            if stop.is_set():
                self.end_reason = "stopped"
                return
            if not self.loop:
                self.end_reason = "end of file"
                return
            logger.info("video %s: end of file, looping", self.path)
            self._capture.release()
            self._capture = self._open()

    def _read_file_once(self, stop: StopEvent) -> Iterator:
        """One pass over the file: an image per readable frame, None per corrupt one."""
        position = 0           # frames attempted in this pass
        failures = 0           # consecutive failed reads, not yet known to be corrupt frames
        while not stop.is_set():
            # grab() fails both for a corrupt frame and at the end of the file; only a
            # later successful grab proves the failures were corrupt frames. The container's
            # frame count (an estimate for some formats) only makes the end come sooner.
            if not self._capture.grab():
                if 0 < self.frame_count <= position:
                    return
                failures += 1
                if failures > self.max_consecutive_failures:
                    if 0 < self.frame_count and position - failures + 1 < self.frame_count:
                        # Not the end: the file breaks off mid-way. The source has failed
                        # (the producer reports it), rather than pretend the footage ended.
                        raise VideoReadError(
                            f"video {str(self.path)!r} unreadable from frame "
                            f"{position - failures + 1} of {self.frame_count} "
                            f"({failures} reads in a row failed); the file is truncated or "
                            "corrupt")
                    return
                position += 1
                continue
            # Decoded straight into a frame-ring slot when the producer lends one (the frame
            # then travels with no copy); OpenCV allocates anew when the size differs.
            lent = self.buffer(self._shape) if self._shape else None
            ok, image = self._capture.retrieve(lent) if lent is not None else \
                self._capture.retrieve()
            if ok and image is not None:
                self._shape = image.shape
            if failures:
                self._count_corrupt(failures, position)
                yield from [None] * failures
                failures = 0
            position += 1
            if not ok or image is None:
                self._count_corrupt(1, position)
                yield None
                continue
            yield image

    def _count_corrupt(self, n: int, position: int) -> None:
        self.corrupt_frames += n
        logger.warning("video %s: %d unreadable frame(s) before frame %d skipped (%d in total)",
                       self.path, n, position, self.corrupt_frames)

    def close(self) -> None:
        self._capture.release()
