"""Frames from a live camera: a USB/V4L2 device, an RTSP/HTTP stream or a GStreamer pipeline.

Cameras drop out (cable, switch, PoE restart, stream server restart). The source does not
die with them: it releases the capture and reconnects with exponential back-off until the
stop event, logging and counting every attempt, so the line resumes on its own.
"""

from __future__ import annotations

import logging
from typing import Iterator

import cv2

from camera_sources.base import ConveyorEncoder, FrameSource, StopEvent, make_frame
from camera_sources.encoder import EncoderSpec
from edge.protocol import Frame

logger = logging.getLogger(__name__)


def backoff_delays(first_s: float, max_s: float) -> Iterator[float]:
    """first_s, 2*first_s, 4*first_s, ... capped at max_s, forever."""
    # Checked here, not in the generator, so a bad setting fails when it is configured.
    if not 0 < first_s <= max_s:
        raise ValueError(f"reconnect back-off needs 0 < first <= max seconds, got "
                         f"({first_s}, {max_s}); e.g. reconnect_backoff=(0.5, 8.0)")
    return _doubling(first_s, max_s)


def _doubling(delay: float, max_s: float) -> Iterator[float]:
    while True:
        yield delay
        delay = min(delay * 2, max_s)


class CameraSource(FrameSource):
    """Yields frames from a camera, reconnecting whenever it fails.

    ``device``: an int (``/dev/video<N>``), an RTSP/HTTP URL, a GStreamer pipeline string,
    or anything else ``cv2.VideoCapture`` opens (a file path works too, which is how the
    reconnect logic is tested). ``reconnect_backoff=(first_s, max_s)``: the wait before each
    reconnect doubles from ``first_s`` up to ``max_s`` and resets once a frame is read.

    Counters: ``connects`` (successful opens), ``reconnects`` (failed opens or dropped
    streams that led to a wait), ``read_failures``. Frames carry an encoder count when the
    line has a real encoder (``encoder``: an :class:`~camera_sources.encoder.EncoderSpec` or
    input, read at capture; ``part_id`` = count // ``counts_per_part``), or a simulated one
    from ``counts_per_frame``; otherwise none, and rejects are timed from the capture time.
    ``start_seq`` continues the numbering of a restarted producer.
    """

    def __init__(self, device: int | str, source_id: str | None = None,
                 reconnect_backoff: tuple[float, float] = (0.5, 8.0),
                 api_preference: int = cv2.CAP_ANY, counts_per_frame: int | None = None,
                 frames_per_part: int = 1, stream_timeout_ms: int = 5000,
                 encoder=None, counts_per_part: int | None = None, start_seq: int = 0):
        self.device = device
        self.source_id = source_id or (f"camera{device}" if isinstance(device, int) else "camera")
        self.reconnect_backoff = tuple(reconnect_backoff)
        backoff_delays(*self.reconnect_backoff)  # validate now, not at the first dropout
        self.api_preference = api_preference
        self.conveyor = (ConveyorEncoder(counts_per_frame, frames_per_part)
                         if counts_per_frame is not None else None)
        self.stream_timeout_ms = stream_timeout_ms
        # A real encoder read at capture (an EncoderSpec travels into the producer process).
        self.encoder = encoder.build() if isinstance(encoder, EncoderSpec) else encoder
        if self.encoder is not None and not counts_per_part:
            raise ValueError("a camera with an encoder needs counts_per_part (encoder counts "
                             "from one part to the next) to number its parts")
        self.counts_per_part = counts_per_part
        self.start_seq = start_seq
        self.connects = 0
        self.reconnects = 0
        self.read_failures = 0
        self._capture: cv2.VideoCapture | None = None

    def _describe(self) -> str:
        # Never log a URL's credentials (rtsp://user:password@host/...).
        text = str(self.device)
        if "://" in text and "@" in text:
            scheme, rest = text.split("://", 1)
            text = f"{scheme}://***@{rest.rsplit('@', 1)[1]}"
        return text

    def _open(self) -> cv2.VideoCapture | None:
        device = self.device
        scheme = device.split("://", 1)[0].lower() if isinstance(device, str) else ""
        if scheme in ("rtsp", "http", "https"):
            # Network streams can hang forever in open/read; bound both.
            capture = cv2.VideoCapture(device, self.api_preference,
                                       [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, self.stream_timeout_ms,
                                        cv2.CAP_PROP_READ_TIMEOUT_MSEC, self.stream_timeout_ms])
        else:
            capture = cv2.VideoCapture(device, self.api_preference)
        if not capture.isOpened():
            capture.release()
            return None
        # Keep the driver's buffer short: a stale buffered frame is a frame of the wrong part.
        capture.set(cv2.CAP_PROP_BUFFERSIZE, 1)
        return capture

    def frames(self, stop: StopEvent) -> Iterator[Frame]:
        seq = self.start_seq
        delays = backoff_delays(*self.reconnect_backoff)
        while not stop.is_set():
            self._capture = self._open()
            if self._capture is None:
                delay = next(delays)
                self.reconnects += 1
                logger.warning("camera %s (%s) cannot be opened; retry %d in %.2f s",
                               self.source_id, self._describe(), self.reconnects, delay)
                stop.wait(delay)   # back-off that still notices the stop at once
                continue
            self.connects += 1
            logger.info("camera %s (%s) connected", self.source_id, self._describe())
            shape = None
            while not stop.is_set():
                # Into a frame-ring slot when the producer lends one: no copy after capture.
                lent = self.buffer(shape) if shape else None
                ok, image = self._capture.read(lent) if lent is not None else \
                    self._capture.read()
                if not ok or image is None:
                    break
                shape = image.shape
                delays = backoff_delays(*self.reconnect_backoff)  # healthy again: reset
                yield make_frame(self.source_id, seq, image, **self._position(seq))
                seq += 1
            self._release()
            if stop.is_set():
                break
            self.read_failures += 1
            self.reconnects += 1
            delay = next(delays)
            logger.warning("camera %s (%s) stopped delivering frames; reconnect %d in %.2f s",
                           self.source_id, self._describe(), self.reconnects, delay)
            stop.wait(delay)
        self._release()
        self.end_reason = "stopped"

    def _position(self, seq: int) -> dict:
        """Where the part in frame ``seq`` is: the real encoder now, else the simulated one."""
        if self.encoder is not None:
            count = self.encoder.read()
            if count is None:              # encoder down: the frame says so, the reject waits
                return {"part_id": None, "encoder": None}
            return {"part_id": count // self.counts_per_part, "encoder": count}
        if self.conveyor is not None:
            return {"part_id": self.conveyor.part_id(seq), "encoder": self.conveyor.encoder(seq)}
        return {}

    def _release(self) -> None:
        if self._capture is not None:
            self._capture.release()
            self._capture = None

    def close(self) -> None:
        self._release()
