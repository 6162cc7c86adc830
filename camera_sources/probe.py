"""Start-up checks: can this source deliver a frame at all?

A line that cannot see must not start: a video that does not exist or that OpenCV cannot
decode, an empty image folder, a camera that does not answer. :func:`probe_source` opens the
source as its producer would, reads one frame, and says what it found (frame rate, frame
count, frame size) or raises :class:`SourceUnavailable` with one line saying what is wrong.
The line turns that into an error naming the config key and file, and opens no run.

A camera is given its retry policy here too (``attempts`` opens with doubling waits): a
camera that is still booting is not a dead one.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import cv2

from camera_sources.base import SourceSpec, build_source

logger = logging.getLogger(__name__)


class SourceUnavailable(RuntimeError):
    """The source cannot deliver frames; the message says why and what to check."""


@dataclass(frozen=True)
class SourceInfo:
    """What a probe found."""

    fps: float | None                  # frames per second the source runs at, when it says
    frame_count: int | None            # frames in a file, when known
    frame_shape: tuple[int, ...] | None  # (H, W) or (H, W, 3) of the first frame


def probe_source(spec: SourceSpec, *, attempts: int = 3, first_wait_s: float = 0.5) -> SourceInfo:
    """Open ``spec``'s source and read one frame; raise SourceUnavailable if it cannot."""
    if spec.kind == "camera":
        return _probe_camera(spec, attempts, first_wait_s)
    options = {k: v for k, v in spec.options.items() if k != "belt"}
    try:
        source = build_source(SourceSpec(spec.kind, spec.source_id, options))
    except (OSError, ValueError) as exc:      # missing file/folder, not a video, bad options
        raise SourceUnavailable(str(exc)) from None
    try:
        if spec.kind == "video":
            capture = source._capture          # opened by the constructor
            ok, image = capture.read()
            if not ok or image is None:
                raise SourceUnavailable(
                    f"video {str(source.path)!r} opens but its first frame cannot be decoded; "
                    "the file is corrupt or truncated: re-record or re-encode it")
            count = source.frame_count if source.frame_count > 0 else None
            return SourceInfo(source.fps, count, image.shape)
        if spec.kind == "folder":
            for path in source.paths:
                image = cv2.imread(str(path), source.read_flag)
                if image is not None:
                    return SourceInfo(source.fps, len(source.paths), image.shape)
            raise SourceUnavailable(f"none of the {len(source.paths)} images under "
                                    f"{str(source.root)!r} can be read")
        return SourceInfo(getattr(source, "fps", None), getattr(source, "n_frames", None),
                          None)
    finally:
        source.close()


def _probe_camera(spec: SourceSpec, attempts: int, first_wait_s: float) -> SourceInfo:
    from camera_sources.camera import CameraSource

    options = {k: v for k, v in spec.options.items() if k not in ("encoder", "start_seq")}
    camera = CameraSource(source_id=spec.source_id, **options)
    wait = first_wait_s
    try:
        for attempt in range(1, attempts + 1):
            capture = camera._open()
            if capture is not None:
                try:
                    ok, image = capture.read()
                    fps = capture.get(cv2.CAP_PROP_FPS)
                finally:
                    capture.release()
                if ok and image is not None:
                    return SourceInfo(fps if fps and fps > 0 else None, None, image.shape)
            if attempt < attempts:
                logger.warning("camera %s (%s) did not deliver a frame (attempt %d of %d); "
                               "retrying in %.1f s", spec.source_id, camera._describe(),
                               attempt, attempts, wait)
                time.sleep(wait)
                wait *= 2
    finally:
        camera.close()
    raise SourceUnavailable(
        f"camera {camera._describe()!r} did not deliver a frame after {attempts} attempt(s): "
        "check the cable/network, the address and that no other program holds the camera")
