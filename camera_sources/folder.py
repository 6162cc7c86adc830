"""Frames from a folder of images: a dataset (MVTec layout) replayed as a line.

One image is one frame, in sorted path order. With ``label_from_path=True`` an image under a
folder named ``good`` is truth 0 and any other image truth 1, which is how MVTec-style
``test/good`` and ``test/<defect>`` folders carry their labels.
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

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")


class ImageFolderSource(FrameSource):
    """Yields each image under ``root`` matching ``pattern`` (recursive by default).

    ``fps=None`` yields as fast as the consumer takes them; a number paces at that rate.
    An unreadable file is counted in ``unreadable_files``, logged and skipped (its ``seq``
    is a gap). ``gray=True`` reads single-channel frames; otherwise BGR. With a ``belt``,
    image ``seq`` is triggered when the belt reaches ``seq * counts_per_frame``.
    """

    def __init__(self, root: str | Path, source_id: str | None = None, pattern: str = "**/*",
                 fps: float | None = None, loop: bool = False, label_from_path: bool = False,
                 gray: bool = False, counts_per_frame: int = 100, frames_per_part: int = 1,
                 belt=None):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {str(self.root)!r} does not exist or is not "
                                    "a folder; check the source's root in the line config")
        self.paths = sorted(p for p in self.root.glob(pattern)
                            if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.paths:
            raise FileNotFoundError(f"no {'/'.join(IMAGE_SUFFIXES)} images match {pattern!r} "
                                    f"under {str(self.root)!r}")
        self.source_id = source_id or self.root.name
        self.fps = fps
        self.loop = loop
        self.label_from_path = label_from_path
        self.read_flag = cv2.IMREAD_GRAYSCALE if gray else cv2.IMREAD_COLOR
        self.conveyor = ConveyorEncoder(counts_per_frame, frames_per_part)
        self.trigger = BeltTrigger(belt, self.conveyor) if belt is not None else None
        self.unreadable_files = 0

    def truth_of(self, path: Path) -> int:
        """0 when the image sits in a folder named ``good`` (below root), else 1."""
        return 0 if "good" in path.relative_to(self.root).parts[:-1] else 1

    def frames(self, stop: StopEvent) -> Iterator[Frame]:
        pacer = Pacer(self.fps)
        if self.trigger:
            self.trigger.first_seq()     # starts the belt; a folder always starts at its first image
        seq = 0
        while True:
            for path in self.paths:
                if stop.is_set():
                    self.end_reason = "stopped"
                    return
                image = cv2.imread(str(path), self.read_flag)
                if image is None:
                    self.unreadable_files += 1
                    logger.warning("image %s cannot be read (corrupt or not an image); skipped "
                                   "(%d unreadable so far)", path, self.unreadable_files)
                    seq += 1
                    continue
                waited = self.trigger.wait(seq, stop) if self.trigger else pacer.wait(stop)
                if not waited:
                    self.end_reason = "stopped"
                    return
                yield make_frame(self.source_id, seq, image,
                                 part_id=self.conveyor.part_id(seq),
                                 encoder=self.conveyor.encoder(seq),
                                 truth=self.truth_of(path) if self.label_from_path else None,
                                 stamp=self.trigger.stamp(seq) if self.trigger else None)
                seq += 1
            if not self.loop:
                self.end_reason = "end of folder"
                return
