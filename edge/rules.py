"""The rule engine: from the model's reading of a frame to OK / DEFECT / UNKNOWN.

The model gives a score and a map; the line needs a yes/no a person can defend. The rules
here are the ones a line engineer tunes without retraining:

* a threshold (the checkpoint's calibrated one unless the config overrides it),
* k of the last n frames of the same source must be over it (one noisy frame is not a defect),
* the region over it must be at least ``min_area_px`` frame pixels, counted only inside an
  optional ROI mask (a shiny bolt outside the inspected area is not a defect),
* a cooldown, so one part seen in several frames is rejected once (it is still logged),
* fail-safe: a result that failed or came too late is UNKNOWN and, by default, rejected —
  a part nobody looked at must not pass as good.

Every decision carries a reason a person can read, because the defect log and the operator's
screen show it verbatim.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from edge.results import Decision, FrameResult, Verdict

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RuleConfig:
    """How one source's results are judged.

    ``threshold`` is in the model's raw-score units (the same units as
    ``FrameResult.raw_score`` and the anomaly map); None means "the checkpoint's calibrated
    threshold", which is what a line should run with unless someone has a reason.
    """

    threshold: float | None = None
    k: int = 1                          # k of the last n frames of the source must be over
    n: int = 1
    min_area_px: int = 0                # frame pixels over threshold (inside the ROI, if any)
    roi_mask: str | None = None         # PNG in frame pixels, white = inspect
    cooldown_s: float = 0.0             # after a rejected DEFECT, no new reject for this long
    unknown_rejects: bool = True        # fail-safe: reject parts whose result failed or was late
    latency_budget_ms: float | None = None  # capture-to-decision time allowed before UNKNOWN

    def __post_init__(self) -> None:
        # Catch config typos at startup rather than as odd verdicts on the line.
        if self.n < 1 or not 1 <= self.k <= self.n:
            raise ValueError(
                f"rules: k={self.k}, n={self.n} is not a valid k-of-n rule; "
                "use 1 <= k <= n (k=1, n=1 judges every frame on its own)"
            )
        if self.min_area_px < 0:
            raise ValueError(f"rules: min_area_px={self.min_area_px} must be >= 0")
        if self.cooldown_s < 0:
            raise ValueError(f"rules: cooldown_s={self.cooldown_s} must be >= 0")
        if self.latency_budget_ms is not None and self.latency_budget_ms <= 0:
            raise ValueError(
                f"rules: latency_budget_ms={self.latency_budget_ms} must be > 0, "
                "or left out for no budget"
            )


class _SourceState:
    """What the engine remembers about one source between frames."""

    def __init__(self, n: int) -> None:
        self.hits: deque[bool] = deque(maxlen=n)   # last n frames: over threshold and big enough
        self.last_reject_at: float | None = None   # `now` of the last DEFECT that was rejected


def _load_roi_mask(path: str) -> np.ndarray:
    """Read a ROI mask as a boolean (H, W) array in frame pixels (True = inspect)."""
    if not Path(path).is_file():
        raise FileNotFoundError(
            f"rules: ROI mask {path!r} does not exist; give a PNG the size of the frame "
            "(white = inspect, black = ignore) or remove roi_mask from the config"
        )
    mask = cv2.imread(path, cv2.IMREAD_GRAYSCALE)
    if mask is None:
        raise ValueError(
            f"rules: ROI mask {path!r} could not be read as an image; save it as a PNG "
            "(white = inspect, black = ignore)"
        )
    inspect = mask > 127
    if not inspect.any():
        # An all-black mask would silently pass every part.
        raise ValueError(f"rules: ROI mask {path!r} is all black, so nothing would be inspected")
    return inspect


class RuleEngine:
    """Turns FrameResults into Decisions, remembering each source's recent frames.

    ``now`` passed to :meth:`decide` is wall-clock seconds since the epoch (``time.time()``,
    the clock of ``FrameResult.wall_time``); it drives the cooldown and the latency budget.
    Safe to call from several threads.
    """

    def __init__(
        self,
        default: RuleConfig,
        per_source: Mapping[str, RuleConfig] | None = None,
        checkpoint_threshold: float | None = None,
        source_thresholds: Mapping[str, float] | None = None,
    ) -> None:
        self.default = default
        self.per_source = dict(per_source or {})
        self.checkpoint_threshold = checkpoint_threshold
        # A unified model keeps one calibrated threshold per product; a source that sees a
        # named product is judged by that product's (a config threshold still overrides it).
        self.source_thresholds = dict(source_thresholds or {})

        for name, config in [("default", default), *self.per_source.items()]:
            if config.threshold is None and checkpoint_threshold is None:
                raise ValueError(
                    f"rules ({name}): threshold is None (use the checkpoint's) but no "
                    "checkpoint_threshold was given; pass the checkpoint's calibrated "
                    "threshold or set a threshold in the rules config"
                )

        # Load every mask now: a missing file should stop the line at startup, not per frame.
        self._roi_masks = {
            config.roi_mask: _load_roi_mask(config.roi_mask)
            for config in [default, *self.per_source.values()]
            if config.roi_mask is not None
        }
        self._roi_resized: dict[tuple[str, tuple[int, int]], np.ndarray] = {}
        self._warned: set[tuple] = set()
        self._states: dict[str, _SourceState] = {}
        self._lock = threading.Lock()

    # --- what applies to a source ---------------------------------------------------------

    def config_for(self, source_id: str) -> RuleConfig:
        return self.per_source.get(source_id, self.default)

    def threshold_for(self, source_id: str) -> float:
        """The raw-score threshold in force for a source (store it with the defect)."""
        config = self.config_for(source_id)
        if config.threshold is not None:
            return config.threshold
        if source_id in self.source_thresholds:
            return self.source_thresholds[source_id]
        assert self.checkpoint_threshold is not None  # checked in __init__
        return self.checkpoint_threshold

    def reset(self, source_id: str | None = None) -> None:
        """Forget the recent frames (all sources, or one), e.g. after a line stop."""
        with self._lock:
            if source_id is None:
                self._states.clear()
            else:
                self._states.pop(source_id, None)

    # --- the decision ---------------------------------------------------------------------

    def decide(self, result: FrameResult, now: float | None = None) -> Decision:
        now = time.time() if now is None else now
        config = self.config_for(result.source_id)
        threshold = self.threshold_for(result.source_id)

        with self._lock:
            state = self._states.get(result.source_id)
            if state is None or state.hits.maxlen != config.n:
                state = self._states[result.source_id] = _SourceState(config.n)

            if result.failed:
                # No score says nothing about the part, so it does not enter the k-of-n window.
                why = result.error or "the model returned no score"
                return self._unknown(result, config, f"no score: {why}")

            score = float(result.raw_score)
            over = score >= threshold
            area = self._area_over_threshold(result, config, threshold) if over else 0
            hit = over and area >= config.min_area_px
            # A late result still saw the part, so it counts towards k-of-n for later frames.
            state.hits.append(hit)

            lateness = self._lateness(result, config, now)
            if lateness is not None:
                return self._unknown(result, config, lateness)

            if not over:
                return Decision(result, Verdict.OK, False,
                                f"score {score:.3g} < threshold {threshold:.3g}")
            if not hit:
                where = " inside the ROI" if config.roi_mask is not None else ""
                return Decision(
                    result, Verdict.OK, False,
                    f"score {score:.3g} >= {threshold:.3g} but area {area} px{where} "
                    f"< min {config.min_area_px} px",
                )

            hits = sum(state.hits)
            window = f" in {hits} of last {len(state.hits)} frames" if config.n > 1 else ""
            if hits < config.k:
                return Decision(
                    result, Verdict.OK, False,
                    f"score {score:.3g} >= {threshold:.3g}{window}, "
                    f"needs {config.k} of {config.n}",
                )

            reason = f"score {score:.3g} >= {threshold:.3g}{window}, area {area} px"
            if state.last_reject_at is not None and now - state.last_reject_at < config.cooldown_s:
                # Most likely the same part seen again: log it, but one reject is enough.
                return Decision(
                    result, Verdict.DEFECT, False,
                    f"{reason}; reject suppressed: {now - state.last_reject_at:.2f} s since "
                    f"the last reject < cooldown {config.cooldown_s:g} s",
                )
            state.last_reject_at = now
            return Decision(result, Verdict.DEFECT, True, reason)

    def _unknown(self, result: FrameResult, config: RuleConfig, why: str) -> Decision:
        if config.unknown_rejects:
            return Decision(result, Verdict.UNKNOWN, True, f"{why}; fail-safe reject")
        return Decision(result, Verdict.UNKNOWN, False,
                        f"{why}; not rejected (unknown_rejects off)")

    def _lateness(self, result: FrameResult, config: RuleConfig, now: float) -> str | None:
        if result.late:
            return "result came after the source's latency budget"
        if config.latency_budget_ms is not None:
            # Wall clocks of producer and worker hosts must agree (NTP) for this to mean much;
            # the worker's own `late` flag above is the primary check.
            age_ms = (now - result.wall_time) * 1000.0
            if age_ms > config.latency_budget_ms:
                return (f"result {age_ms:.0f} ms after capture > latency budget "
                        f"{config.latency_budget_ms:g} ms")
        return None

    # --- area inside the ROI --------------------------------------------------------------

    def _area_over_threshold(self, result: FrameResult, config: RuleConfig,
                             threshold: float) -> int:
        """Frame pixels over threshold that the rules care about (inside the ROI, if any)."""
        if config.roi_mask is None:
            return result.area_px

        if result.anomaly_map is not None:
            amap = np.asarray(result.anomaly_map)
            h, w = amap.shape[:2]
            roi = self._roi_at(config.roi_mask, (h, w), result)
            above = int(np.count_nonzero((amap >= threshold) & roi))
            frame_h, frame_w = result.frame_shape
            # Each map pixel stands for (H*W)/(h*w) frame pixels.
            return int(round(above * (frame_h * frame_w) / (h * w)))

        # Without a map the best we can do is ask whether the peak lies inside the ROI.
        if result.peak_xy is not None:
            roi = self._roi_at(config.roi_mask, tuple(result.frame_shape), result)
            x, y = result.peak_xy
            inside = 0 <= y < roi.shape[0] and 0 <= x < roi.shape[1] and bool(roi[y, x])
            return result.area_px if inside else 0

        self._warn_once(("no-map", result.source_id),
                        "source %s: result has neither anomaly map nor peak, so the ROI mask "
                        "cannot be applied; using the whole-frame area", result.source_id)
        return result.area_px

    def _roi_at(self, path: str, shape: tuple[int, int], result: FrameResult) -> np.ndarray:
        """The ROI mask resized to `shape` (map or frame), cached per shape."""
        key = (path, shape)
        cached = self._roi_resized.get(key)
        if cached is not None:
            return cached
        mask = self._roi_masks[path]
        if mask.shape != tuple(result.frame_shape):
            self._warn_once(("roi-shape", path, tuple(result.frame_shape)),
                            "ROI mask %s is %s but source %s sends %s frames; stretching it — "
                            "redraw the mask at the frame size", path, mask.shape,
                            result.source_id, tuple(result.frame_shape))
        h, w = shape
        # INTER_AREA averages the mask over each target pixel; a pixel is inspected when at
        # least half of what it covers is.
        resized = cv2.resize(mask.astype(np.float32), (w, h), interpolation=cv2.INTER_AREA) >= 0.5
        self._roi_resized[key] = resized
        return resized

    def _warn_once(self, key: tuple, message: str, *args) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(message, *args)
