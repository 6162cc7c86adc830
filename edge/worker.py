"""The GRAD worker: frames in from ZeroMQ, verdicts, defect records and reject signals out.

Reading order, following one frame:
  Inbox       (edge.inbox) one socket, thread and bounded queue per source.
  Batcher     (edge.inbox) micro-batches across sources (max batch, max wait).
  submit      ROI crop -> runner (preprocess + GRAD on the device), one call per frame shape.
  judge       runner output -> FrameResult in frame pixels (peak, box and area of the region
              above threshold, timings). Two steps, so that on a runner that overlaps, batch
              k+1 computes while batch k is judged.
  Worker      rules -> Decision; defects to the defect log (one writer) with saved images;
              rejects to the scheduler, which fires the sinks at the ejector; a per-frame
              results file; live counters for the status line.

The worker runs in-process (tests drive it directly); `edge.line` wraps it with the producer
processes and the status display.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import zmq

from edge.defect_log import AlarmRecord, DefectLogWriter, DefectRecord, ImageStore, RejectRecord
from edge.inbox import Batcher, Inbox
from edge.protocol import DropPolicy, Frame
from edge.reject import FiredReject, MissedReject, RejectScheduler
from edge.results import Alarm, Decision, FrameResult, Verdict
from edge.rules import RuleEngine
from edge.security import ServerKeys

log = logging.getLogger(__name__)


# --- judge: runner output -> FrameResult -------------------------------------------------------

def crop(image: np.ndarray, roi: list[int] | None) -> tuple[np.ndarray, tuple[int, int]]:
    """ROI crop (a view, no copy) and 3 channels; returns the crop and its (x0, y0) offset."""
    if image.ndim == 2:
        image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    if roi is None:
        return image, (0, 0)
    x0, y0, x1, y1 = roi
    return image[y0:y1, x0:x1], (x0, y0)


def region(amap: np.ndarray, threshold: float, crop_hw: tuple[int, int],
           offset: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int, int, int] | None, int]:
    """Peak, box and area of the map's region >= threshold, in frame pixels.

    The map covers the ROI crop resized to S x S, so map cell (r, c) maps back to crop pixel
    (r * h / S, c * w / S), shifted by the crop's offset.
    """
    s_h, s_w = amap.shape
    h, w = crop_hw
    sy, sx = h / s_h, w / s_w
    r, c = np.unravel_index(int(np.argmax(amap)), amap.shape)
    peak = (int(offset[0] + (c + 0.5) * sx), int(offset[1] + (r + 0.5) * sy))
    above = amap >= threshold
    count = int(above.sum())
    if count == 0:
        return peak, None, 0
    rows = np.flatnonzero(above.any(axis=1))
    cols = np.flatnonzero(above.any(axis=0))
    box = (int(offset[0] + cols[0] * sx), int(offset[1] + rows[0] * sy),
           int(np.ceil(offset[0] + (cols[-1] + 1) * sx)), int(np.ceil(offset[1] + (rows[-1] + 1) * sy)))
    return peak, box, int(round(count * sx * sy))


# --- Worker ------------------------------------------------------------------------------------

@dataclass
class WorkerStats:
    frames: int = 0
    batches: int = 0
    verdicts: dict[str, int] = field(default_factory=lambda: {v.value: 0 for v in Verdict})
    rejects_fired: int = 0
    rejects_missed: int = 0      # verdicts that came after their part passed the ejector
    judged_by_source: dict[str, int] = field(default_factory=dict)
    failed: int = 0
    latencies_ms: deque = field(default_factory=lambda: deque(maxlen=2000))
    started: float = field(default_factory=time.monotonic)

    def percentile(self, q: float) -> float | None:
        return float(np.percentile(list(self.latencies_ms), q)) if self.latencies_ms else None


@dataclass(frozen=True)
class ModelCall:
    """One runner call for the frames of one shape: `idx` into the batch, the runner's Pending
    (None when submitting failed, with `error` saying why), and when it was submitted."""

    idx: list[int]
    pending: object | None      # deploy.runner.Pending (edge does not import deploy)
    error: str | None
    t0: float


@dataclass(frozen=True)
class InFlight:
    """A batch handed to the runner and not yet judged."""

    frames: list[Frame]
    crops: list[tuple[np.ndarray, tuple[int, int]]]
    calls: list[ModelCall]


@dataclass(frozen=True)
class SourceSetup:
    """What the worker needs to know about one source."""

    source_id: str
    endpoint: str
    policy: DropPolicy = DropPolicy.EVERY_FRAME
    queue_size: int = 8
    roi: list[int] | None = None
    run_id: str | None = None   # the wire's run token (protocol `run`), not the DB run number
    max_frame_gap_s: float | None = None   # no frame for this long: the source is down
    curve: ServerKeys | None = None        # tcp: the CURVE keys its socket requires
    ring: bool = False                     # shm: take frames through a frame ring
    product: str | None = None             # a unified model's product this source sees


class Worker:
    """Runs the line's model side until every source has ended or `stop` is set.

    `runner` is a `deploy.runner.Runner` (edge does not import deploy; this is the contract):
    `card` (model card: calibration, hash), `submit(frames) -> pending` with
    `pending.result() -> scores, maps`, and `overlaps` (True when submit returns before the
    batch is done, so the worker keeps one batch in flight while it judges the previous one).
    """

    def __init__(self, runner, sources: list[SourceSetup], rules: RuleEngine,
                 scheduler: RejectScheduler, writer: DefectLogWriter, images: ImageStore | None,
                 *, max_batch: int = 8, max_wait_ms: float = 5.0,
                 latency_budget_ms: float | None = None, heartbeat_timeout_s: float = 3.0,
                 results_path: str | Path | None = None, run_id: int | None = None,
                 ctx: zmq.Context | None = None):
        self.runner = runner
        self.card = runner.card
        self.rules = rules
        self.scheduler = scheduler
        self.writer = writer
        self.images = images
        self.latency_budget_ms = latency_budget_ms
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.run_id = run_id
        self.stats = WorkerStats()
        self.stop_event = threading.Event()
        self._ctx = ctx or zmq.Context.instance()
        self._arrived = threading.Event()
        self._setups = {s.source_id: s for s in sources}
        # A unified model's scores sit on a scale per product: each source's calibrated score
        # uses its own product's statistics, as its threshold does (RuleEngine).
        self._calibrations = {s.source_id: self.card.calibration_for(s.product) for s in sources}
        self.inboxes = [Inbox(self._ctx, s.source_id, s.endpoint, s.policy, s.queue_size,
                              self._arrived, run_id=s.run_id, curve=s.curve, ring=s.ring)
                        for s in sources]
        self.batcher = Batcher(self.inboxes, max_batch, max_wait_ms / 1000.0, self._arrived)
        self._results = open(results_path, "a", buffering=1) if results_path else None
        self._silent: set[str] = set()
        self.down_sources: set[str] = set()
        self.failed_sources: dict[str, str] = {}   # source id -> why it failed
        self.alarms: list[Alarm] = []
        # Called with (frame, result, decision) for every judged frame: the metrics, the
        # station's live frames, the near-threshold keeper (edge.metrics, .live, .keep).
        self.observers: list = []
        # Called with no arguments once every frame of a batch is handled (its rejects
        # scheduled): work that may take a while but must not delay the batch's own verdicts,
        # e.g. the unified model's product check (edge.products).
        self.after_batch: list = []
        scheduler.on_fired = self._on_fired
        scheduler.on_missed = self._on_missed
        scheduler.on_alarm = self._on_alarm

    # The endpoints actually bound (tcp://127.0.0.1:* resolves to a real port).
    @property
    def endpoints(self) -> dict[str, str]:
        return {i.source_id: i.endpoint for i in self.inboxes}

    def _on_fired(self, fired: FiredReject) -> None:
        self.stats.rejects_fired += 1
        self.writer.submit(RejectRecord.from_fired(fired.event, fired.sinks_ok,
                                                   fired.sinks_failed, fired_at=fired.fired_at,
                                                   run_id=self.run_id))

    def _on_missed(self, missed: MissedReject) -> None:
        self.stats.rejects_missed += 1
        self.writer.submit(RejectRecord.missed(missed.event, missed.reason, run_id=self.run_id))

    def _on_alarm(self, alarm: Alarm) -> None:
        self.alarms.append(alarm)
        self.writer.submit(AlarmRecord(self.run_id, alarm.time, alarm.source_id, alarm.kind,
                                       alarm.message))

    def source_alarm(self, kind: str, source_id: str | None, message: str) -> None:
        """Raise an alarm about a source: ERROR log, every sink, the defect log."""
        self.scheduler.raise_alarm(Alarm(kind, message, source_id))

    def submit(self, frames: list[Frame]) -> "InFlight":
        """ROI crop and hand the frames to the runner, one call per frame shape. Returns at once
        on a runner that overlaps (`runner.overlaps`); `judge` collects the results."""
        crops = [crop(f.image, self._setups[f.source_id].roi) for f in frames]
        groups: dict[tuple, list[int]] = {}
        for i, (c, _) in enumerate(crops):
            groups.setdefault(c.shape, []).append(i)   # one model call per frame shape
        calls = []
        for idx in groups.values():
            t0 = time.perf_counter()
            try:
                pending, error = self.runner.submit(np.stack([crops[i][0] for i in idx])), None
            except Exception as exc:  # a failed batch is UNKNOWN (fail-safe), not a crash
                log.exception("model failed on a batch of %d frames", len(idx))
                pending, error = None, f"model failed: {exc}"
            calls.append(ModelCall(idx, pending, error, t0))
        return InFlight(frames, crops, calls)

    def judge(self, batch: "InFlight") -> list[FrameResult]:
        """Wait for a submitted batch's model calls -> one FrameResult per frame, in order."""
        results: list[FrameResult | None] = [None] * len(batch.frames)
        for call in batch.calls:
            out, error = None, call.error
            if call.pending is not None:
                try:
                    out = call.pending.result()
                except Exception as exc:
                    log.exception("model failed on a batch of %d frames", len(call.idx))
                    error = f"model failed: {exc}"
            model_ms = 1000 * (time.perf_counter() - call.t0)
            for j, i in enumerate(call.idx):
                results[i] = self._result(batch.frames[i], batch.crops[i], out, j, error,
                                          model_ms, len(call.idx))
        return results

    def _result(self, frame: Frame, cropped, out, j: int, error: str | None, model_ms: float,
                batch: int) -> FrameResult:
        threshold = self.rules.threshold_for(frame.source_id)
        common = dict(source_id=frame.source_id, seq=frame.seq, part_id=frame.part_id,
                      encoder=frame.encoder, wall_time=frame.wall_time,
                      capture_mono_ns=frame.mono_ns, frame_shape=tuple(frame.image.shape[:2]),
                      threshold=threshold)
        if out is None:
            return FrameResult(raw_score=None, calibrated_score=None, error=error, **common)
        raw = float(out.scores[j])
        amap = out.maps[j]
        peak, box, area = region(amap, threshold, cropped[0].shape[:2], cropped[1])
        latency_ms = (time.monotonic_ns() - frame.mono_ns) / 1e6
        budget = (self.latency_budget_ms if self.latency_budget_ms is not None
                  else self.rules.config_for(frame.source_id).latency_budget_ms)
        late = budget is not None and latency_ms > budget
        calibration = self._calibrations.get(frame.source_id, self.card.calibration)
        return FrameResult(raw_score=raw, calibrated_score=calibration.calibrate(raw),
                           peak_xy=peak, box=box, area_px=area, anomaly_map=amap, late=late,
                           timings_ms={"model": model_ms, "batch": batch,
                                       "capture_to_result": latency_ms}, **common)

    def handle(self, frame: Frame, result: FrameResult) -> Decision:
        """Rules, defect log, reject scheduling and the results file for one frame."""
        decision = self.rules.decide(result)
        self.stats.frames += 1
        self.stats.judged_by_source[frame.source_id] = \
            self.stats.judged_by_source.get(frame.source_id, 0) + 1
        self.stats.verdicts[decision.verdict.value] += 1
        self.stats.failed += result.failed
        self.stats.latencies_ms.append((time.monotonic_ns() - frame.mono_ns) / 1e6)
        defect_id = None
        if decision.verdict is not Verdict.OK:
            # The id first, so the saved images are named by run and defect: a later run's
            # defect can never overwrite this one's evidence.
            defect_id = self.writer.reserve_defect_id()
            frame_path = heat_path = None
            if self.images is not None and result.anomaly_map is not None:
                saved = self.images.save(frame.source_id, frame.seq, frame.image,
                                         result.anomaly_map, when=frame.wall_time,
                                         vmax=max(result.threshold, 1e-6) * 1.5,
                                         run_id=self.run_id, defect_id=defect_id,
                                         box=result.box, score=result.raw_score,
                                         threshold=result.threshold)
                frame_path, heat_path = saved.frame_path, saved.heatmap_path
            # Journaled (fsynced) before submit returns, so before the reject is scheduled.
            self.writer.submit(DefectRecord.from_decision(
                decision, run_id=self.run_id, frame_path=frame_path, heatmap_path=heat_path,
                id=defect_id))
        if decision.reject:
            self.scheduler.schedule(self.scheduler.event_for(decision, defect_id=defect_id))
        if frame.encoder is not None:
            self.scheduler.on_encoder(frame.source_id, frame.encoder)
        if self._results is not None:
            self._results.write(json.dumps({
                "run_id": self.run_id, "time": frame.wall_time, "source_id": frame.source_id, "seq": frame.seq, "part_id": frame.part_id,
                "encoder": frame.encoder, "truth": frame.truth, "raw_score": result.raw_score,
                "calibrated_score": result.calibrated_score, "threshold": result.threshold,
                "verdict": decision.verdict.value, "reject": decision.reject,
                "reason": decision.reason, "box": result.box, "area_px": result.area_px,
                "peak_xy": result.peak_xy, "defect_id": defect_id, "late": result.late,
                "error": result.error,
                "latency_ms": round(self.stats.latencies_ms[-1], 3)}) + "\n")
        for observe in self.observers:
            try:
                observe(frame, result, decision)
            except Exception:          # an observer never stops the line judging
                log.exception("observer %r failed on %s seq %d", observe, frame.source_id,
                              frame.seq)
        return decision

    def _check_sources(self) -> None:
        """Silent: no message at all (the producer is gone). Down: no *frame* for longer than
        the source's limit, even while its producer's heartbeats come (a camera that does
        not deliver, retrying). Down raises an alarm; coming back is logged."""
        now = time.monotonic()
        for inbox in self.inboxes:
            sid, st = inbox.source_id, inbox.stats
            if inbox.queue.qsize():
                # Frames wait to be judged: the source delivers, the worker is behind (under
                # every_frame the producer is then blocked, heartbeats included).
                st.last_seen = st.last_frame_at = now
            silent = (not st.ended and inbox.end is None
                      and now - st.last_seen > self.heartbeat_timeout_s)
            if silent and sid not in self._silent:
                log.warning("source %s silent for %.1fs (no frames or heartbeats): is its "
                            "producer running?", sid, now - st.last_seen)
                self._silent.add(sid)
            elif not silent:
                self._silent.discard(sid)
            gap = self._setups[sid].max_frame_gap_s
            down = (gap is not None and not st.ended and inbox.end is None
                    and now - st.last_frame_at > gap)
            if down and sid not in self.down_sources:
                self.down_sources.add(sid)
                self.source_alarm("source_down", sid, (
                    f"SOURCE DOWN: {sid} delivered no frame for {now - st.last_frame_at:.1f} s "
                    f"(limit {gap:g} s; last seq {st.last_seq}"
                    + ("; its producer is alive, the camera is not delivering)"
                       if not silent else "; its producer is silent)")))
            elif not down and sid in self.down_sources and now - st.last_frame_at <= gap:
                self.down_sources.discard(sid)
                log.warning("source %s delivers frames again", sid)

    def end_source(self, source_id: str) -> None:
        """Stop waiting for a source: it sent end-of-stream, or its producer died."""
        for inbox in self.inboxes:
            if inbox.source_id == source_id:
                inbox.stats.ended = True

    @property
    def silent_sources(self) -> set[str]:
        return set(self._silent)

    def run(self) -> WorkerStats:
        """Process frames until every source sent end-of-stream (or stop is set)."""
        for inbox in self.inboxes:
            # Silence and gaps count from now: model warm-up and producer start-up came first.
            inbox.stats.last_seen = inbox.stats.last_frame_at = time.monotonic()
            inbox.start(self.stop_event)
        log.info("worker: %d source(s), backend %s, model %s", len(self.inboxes),
                 getattr(self.runner, "backend", "?"), self.card.model_hash)
        overlaps = getattr(self.runner, "overlaps", False)
        in_flight: InFlight | None = None
        try:
            while not self.stop_event.is_set() and not all(i.stats.ended for i in self.inboxes):
                # With a batch in flight, take only frames already waiting: if none are, judge
                # the batch now rather than hold its verdicts back for the next frame.
                frames, ends = self.batcher.next_batch(timeout=0.0 if in_flight else 0.2)
                submitted = None
                if frames:
                    self.stats.batches += 1
                    submitted = self.submit(frames)
                # On an overlapping runner the batch just submitted computes while the one
                # before it is judged (rules, defect log, images); on the others it is done.
                if in_flight is not None:
                    self._handle_all(in_flight)
                in_flight = submitted
                if in_flight is not None and not overlaps:
                    self._handle_all(in_flight)
                    in_flight = None
                for end in ends:
                    self.end_source(end.source_id)
                    if end.reason.startswith("source error"):
                        self.failed_sources[end.source_id] = end.reason
                        self.source_alarm("source_failed", end.source_id,
                                          f"SOURCE FAILED: {end.source_id}: {end.reason}")
                    else:
                        log.info("source %s ended (%s) after seq %d", end.source_id,
                                 end.reason, end.last_seq)
                self.scheduler.poll()
                self._check_sources()
        finally:
            if in_flight is not None:   # frames taken from a source are always judged
                self._handle_all(in_flight)
            self.stop_event.set()
            for inbox in self.inboxes:
                inbox.join()
            # Rejects still pending are the line's to drain (RejectScheduler.close): the
            # belt keeps moving after the last frame, and they fire when their part arrives.
            if self._results is not None:
                self._results.close()
        return self.stats

    def _handle_all(self, batch: InFlight) -> None:
        for frame, result in zip(batch.frames, self.judge(batch)):
            self.handle(frame, result)
        for hook in self.after_batch:
            try:
                hook()
            except Exception:          # like an observer: never stops the line judging
                log.exception("after-batch hook %r failed", hook)

    def counters(self) -> dict:
        """Live numbers for the status line and the run summary."""
        elapsed = max(time.monotonic() - self.stats.started, 1e-9)
        return {
            "frames": self.stats.frames,
            "fps": self.stats.frames / elapsed,
            "latency_p50_ms": self.stats.percentile(50),
            "latency_p99_ms": self.stats.percentile(99),
            "dropped": sum(i.dropped for i in self.inboxes),
            "producer_dropped": sum(i.stats.producer_dropped for i in self.inboxes),
            "corrupt": sum(i.stats.corrupt for i in self.inboxes),
            # Refused messages of another run / naming another source, and inbox faults.
            "foreign": sum(i.stats.foreign for i in self.inboxes),
            "misrouted": sum(i.stats.misrouted for i in self.inboxes),
            "inbox_errors": sum(i.stats.errors for i in self.inboxes),
            # tcp sources: connections the CURVE handshake turned away (unlisted key, no CURVE).
            "refused_connections": sum(i.handshakes.refused for i in self.inboxes),
            "defects": self.stats.verdicts["DEFECT"],
            "unknown": self.stats.verdicts["UNKNOWN"],
            "ok": self.stats.verdicts["OK"],
            "rejects": self.stats.rejects_fired,
            "missed_rejects": self.stats.rejects_missed,
            "reject_sink_failures": dict(self.scheduler.sink_failures),
            "silent_sources": sorted(self._silent),
            "down_sources": sorted(self.down_sources),
        }
