"""Near-threshold good frames, kept at run time as training material (config ``keep``).

A frame the rules passed (OK) whose score came within ``band`` below the threshold is one
the model nearly rejected: the kind of good part a retrained model most needs to see.
:class:`NearThresholdKeeper` is one of the worker's observers: at most ``max_per_minute`` a
source, it saves the frame as captured (PNG: no compression artefacts in training data)
beside the defect images, under the same retention, and logs a ``KeptFrameRecord`` through
the defect log's one writer. `grad-edge dataset` writes them (with the frames operators
marked false positive) into a training folder.

Saving runs on a thread of its own with a small queue: the worker never waits for a PNG
encoder; a frame that finds the queue full is skipped and counted.
"""

from __future__ import annotations

import logging
import queue
import threading
import time

from edge.defect_log import DefectLogWriter, ImageStore, KeptFrameRecord
from edge.results import Verdict

log = logging.getLogger(__name__)


class NearThresholdKeeper:
    def __init__(self, writer: DefectLogWriter, images_root: str, *, band: float,
                 max_per_minute: float, run_id: int | None = None,
                 retention_days: float | None = None, retention_gb: float | None = None):
        self.writer = writer
        self.store = ImageStore(images_root, retention_days, retention_gb, image_format="png")
        self.band = band
        self.interval_s = 60.0 / max_per_minute
        self.run_id = run_id
        self.kept: dict[str, int] = {}
        self.skipped_busy = 0
        self._last: dict[str, float] = {}
        self._queue: queue.Queue = queue.Queue(maxsize=4)
        self._thread = threading.Thread(target=self._run, name="keep-frames", daemon=True)

    def near(self, score: float | None, threshold: float) -> bool:
        """Whether an OK frame's score lies in [threshold x (1 - band), threshold)."""
        return score is not None and threshold * (1.0 - self.band) <= score < threshold

    def observe(self, frame, result, decision) -> None:
        if decision.verdict is not Verdict.OK or not self.near(result.raw_score,
                                                               result.threshold):
            return
        now = time.monotonic()
        if now - self._last.get(frame.source_id, -1e9) < self.interval_s:
            return
        try:
            self._queue.put_nowait((frame, result))
        except queue.Full:
            self.skipped_busy += 1
            return
        self._last[frame.source_id] = now

    def counts(self) -> dict[str, int]:
        return dict(self.kept)

    def start(self) -> NearThresholdKeeper:
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Save what is queued, then stop (before the writer stops)."""
        self._queue.put(None)
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            frame, result = item
            try:
                self._keep(frame, result)
            except Exception:
                log.exception("could not keep near-threshold frame %s seq %d",
                              frame.source_id, frame.seq)

    def _keep(self, frame, result) -> None:
        id_ = self.writer.reserve_id(KeptFrameRecord)        # names the file, like a defect's
        saved = self.store.save(frame.source_id, frame.seq, frame.image, when=frame.wall_time,
                                run_id=self.run_id, defect_id=None, kind=f"k{id_}_kept")
        if saved.frame_path is None:
            return                                   # ImageStore logged why
        self.writer.submit(KeptFrameRecord(
            run_id=self.run_id, time=frame.wall_time, source_id=frame.source_id, seq=frame.seq,
            raw_score=float(result.raw_score), threshold=float(result.threshold),
            frame_path=saved.frame_path, part_id=frame.part_id,
            truth=None if frame.truth is None else int(frame.truth), id=id_))
        self.kept[frame.source_id] = self.kept.get(frame.source_id, 0) + 1
