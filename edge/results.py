"""What the worker says about one frame, and what the rule engine decides from it.

Both are frozen dataclasses: a result travels from the worker to the rule engine, the
defect log and the reject sinks, and nobody downstream may change what the model saw.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class FrameResult:
    """The model's reading of one frame (or why there is none).

    Coordinates (``peak_xy``, ``box``) and ``area_px`` are in the *frame's* pixels, after
    undoing the ROI crop and resize, so an operator can draw them on the saved image.
    """

    source_id: str
    seq: int                       # the source's frame sequence number
    part_id: int | None            # the part on the conveyor, when the source knows it
    encoder: int | None            # conveyor encoder count at capture, when known
    wall_time: float               # capture time, seconds since the epoch
    capture_mono_ns: int           # capture time, time.monotonic_ns() on the producer host
    frame_shape: tuple[int, int]   # (H, W) of the frame as captured
    raw_score: float | None        # image score in the model's units; None when failed
    calibrated_score: float | None  # (raw - normal mean) / normal std from the checkpoint
    threshold: float               # raw-score threshold in force for this frame
    peak_xy: tuple[int, int] | None = None          # (x, y) of the anomaly map's maximum
    box: tuple[int, int, int, int] | None = None    # (x0, y0, x1, y1) of the region above threshold
    area_px: int = 0                                # frame pixels above threshold
    anomaly_map: np.ndarray | None = field(default=None, repr=False, compare=False)  # (h, w) float32
    timings_ms: dict[str, float] = field(default_factory=dict, compare=False)
    error: str | None = None       # why there is no score (model failed, frame corrupt, ...)
    late: bool = False             # the result came after the source's latency budget

    @property
    def failed(self) -> bool:
        return self.raw_score is None or self.error is not None


class Verdict(enum.Enum):
    OK = "OK"
    DEFECT = "DEFECT"
    UNKNOWN = "UNKNOWN"            # late or failed result: fail-safe rejects by default


@dataclass(frozen=True)
class Decision:
    """The rule engine's verdict on one result, with the reason a person can read."""

    result: FrameResult
    verdict: Verdict
    reject: bool                   # whether a reject signal must be issued for this part
    reason: str                    # e.g. "score 3.2 >= 2.5 in 2 of 3 frames"


@dataclass(frozen=True)
class Alarm:
    """Something a person must look at now: the line could not do its job.

    ``kind`` names what happened (``missed_reject``, ``source_down``, ``source_failed``,
    ...); ``message`` is the one line an operator reads. Alarms go to the log at ERROR, to
    every reject sink (``RejectSink.alarm``) and to the defect log.
    """

    kind: str
    message: str
    source_id: str | None = None
    time: float = field(default_factory=lambda: __import__("time").time())

    def to_dict(self) -> dict:
        return {"kind": self.kind, "message": self.message, "source_id": self.source_id,
                "time": self.time}
