"""The latest judged frames of each source, for the station's line view.

The worker hands every judged frame to :meth:`LiveFrames.observe` (``Worker.observers``),
which only keeps a reference to the newest one per source, at most ``per_s`` a second. A
thread of its own draws the heatmap overlay with the region's box and encodes it as JPEG,
keeping the last ``keep`` per source in memory: the worker's thread never waits on an
encoder. :class:`edge.metrics.MetricsServer` serves them beside /metrics.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque

import cv2

from edge.defect_log.images import annotate, heatmap_overlay

log = logging.getLogger(__name__)


class LiveFrames:
    def __init__(self, keep: int = 6, per_s: float = 2.0, *, max_side: int = 480):
        self.keep = keep
        self.interval = 1.0 / per_s
        self.max_side = max_side               # live pictures are for a screen, not evidence
        self._slots: dict[str, tuple] = {}     # source -> newest (frame, result, decision)
        self._last: dict[str, float] = {}
        self._frames: dict[str, deque] = {}    # source -> deque of (meta, jpeg)
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="live-frames", daemon=True)

    def start(self) -> LiveFrames:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(5)

    def observe(self, frame, result, decision) -> None:
        now = time.monotonic()
        if now - self._last.get(frame.source_id, -1e9) < self.interval:
            return
        self._last[frame.source_id] = now
        with self._lock:
            self._slots[frame.source_id] = (frame, result, decision)
        self._wake.set()

    def index(self) -> dict[str, list[dict]]:
        """Per source, the kept frames' metadata, newest first."""
        with self._lock:
            return {sid: [meta for meta, _ in reversed(q)] for sid, q in self._frames.items()}

    def jpeg(self, source_id: str, seq: int) -> bytes | None:
        with self._lock:
            for meta, data in self._frames.get(source_id, ()):
                if meta["seq"] == seq:
                    return data
        return None

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(0.5)
            self._wake.clear()
            with self._lock:
                slots, self._slots = self._slots, {}
            for sid, (frame, result, decision) in slots.items():
                try:
                    self._encode(sid, frame, result, decision)
                except Exception:
                    log.exception("live frame of %s seq %d could not be drawn", sid, frame.seq)

    def _encode(self, sid: str, frame, result, decision) -> None:
        image = frame.image
        if image.ndim == 2:
            image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
        if result.anomaly_map is not None:
            vmax = max(result.threshold, 1e-6) * 1.5
            image = heatmap_overlay(image, result.anomaly_map, vmax=vmax)
            image = annotate(image, result.box, result.raw_score, result.threshold,
                             scale=(float(result.anomaly_map.min()), vmax))
        h, w = image.shape[:2]
        scale = min(1.0, self.max_side / max(h, w))
        if scale < 1.0:
            image = cv2.resize(image, (int(w * scale), int(h * scale)),
                               interpolation=cv2.INTER_AREA)
        ok, data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 80])
        if not ok:
            return
        meta = {"source_id": sid, "seq": frame.seq, "part_id": frame.part_id,
                "time": frame.wall_time, "score": result.raw_score,
                "threshold": result.threshold, "verdict": decision.verdict.value,
                "reject": bool(decision.reject), "reason": decision.reason,
                "box": list(result.box) if result.box else None,
                "size": [int(frame.image.shape[1]), int(frame.image.shape[0])]}
        with self._lock:
            self._frames.setdefault(sid, deque(maxlen=self.keep)).append((meta, data.tobytes()))
