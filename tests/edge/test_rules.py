"""The rule engine on hand-built FrameResults: each test is one rule a line engineer relies on."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from edge.results import FrameResult, Verdict
from edge.rules import RuleConfig, RuleEngine

THRESHOLD = 2.5


def frame_result(seq: int, score: float | None, *, source_id: str = "cam0", area_px: int = 500,
                 anomaly_map: np.ndarray | None = None, frame_shape=(100, 100),
                 error: str | None = None, late: bool = False,
                 wall_time: float = 1000.0) -> FrameResult:
    return FrameResult(
        source_id=source_id, seq=seq, part_id=seq, encoder=None, wall_time=wall_time,
        capture_mono_ns=0, frame_shape=frame_shape, raw_score=score,
        calibrated_score=None if score is None else score - 1.0, threshold=THRESHOLD,
        area_px=area_px, anomaly_map=anomaly_map, error=error, late=late,
    )


def test_rule_engine_fires_on_second_hit_when_k_of_n_is_2_of_3():
    engine = RuleEngine(RuleConfig(k=2, n=3), checkpoint_threshold=THRESHOLD)
    scores = [3.0, 1.0, 1.0, 3.0, 1.0, 1.0, 3.0, 3.5]
    verdicts = [engine.decide(frame_result(i, s), now=1000.0 + i).verdict
                for i, s in enumerate(scores)]

    # Isolated hits (never two within three frames) stay OK; the second of a pair fires.
    assert verdicts[:7] == [Verdict.OK] * 7
    assert verdicts[7] == Verdict.DEFECT


def test_rule_engine_reason_counts_window_when_k_of_n_fires():
    engine = RuleEngine(RuleConfig(k=2, n=3), checkpoint_threshold=THRESHOLD)
    engine.decide(frame_result(0, 3.0), now=1000.0)
    decision = engine.decide(frame_result(1, 3.2), now=1000.1)
    assert decision.reject
    assert "2 of last 2 frames" in decision.reason
    assert "3.2 >= 2.5" in decision.reason


def test_rule_engine_passes_small_region_when_below_min_area():
    engine = RuleEngine(RuleConfig(min_area_px=100), checkpoint_threshold=THRESHOLD)
    small = engine.decide(frame_result(0, 9.0, area_px=40), now=1000.0)
    large = engine.decide(frame_result(1, 9.0, area_px=400), now=1000.0)

    assert small.verdict == Verdict.OK and not small.reject
    assert "area 40 px < min 100 px" in small.reason
    assert large.verdict == Verdict.DEFECT and large.reject


@pytest.fixture
def right_half_roi(tmp_path) -> str:
    mask = np.zeros((100, 100), np.uint8)
    mask[:, 50:] = 255                      # inspect the right half only
    path = tmp_path / "roi.png"
    cv2.imwrite(str(path), mask)
    return str(path)


def hot_map(rows: slice, cols: slice) -> np.ndarray:
    amap = np.zeros((25, 25), np.float32)   # 1 map pixel = 4x4 frame pixels
    amap[rows, cols] = 5.0
    return amap


def test_rule_engine_ignores_region_when_outside_roi_mask(right_half_roi):
    engine = RuleEngine(RuleConfig(min_area_px=100, roi_mask=right_half_roi),
                        checkpoint_threshold=THRESHOLD)
    # A 5x5 map-pixel hot patch (400 frame px) in the top-left corner: outside the ROI.
    outside = engine.decide(
        frame_result(0, 5.0, area_px=400, anomaly_map=hot_map(slice(0, 5), slice(0, 5))),
        now=1000.0)
    # The same patch on the right: inside.
    inside = engine.decide(
        frame_result(1, 5.0, area_px=400, anomaly_map=hot_map(slice(0, 5), slice(20, 25))),
        now=1000.0)

    assert outside.verdict == Verdict.OK
    assert "area 0 px inside the ROI" in outside.reason
    assert inside.verdict == Verdict.DEFECT
    assert "area 400 px" in inside.reason


def test_rule_engine_counts_only_roi_part_when_region_straddles_roi_edge(right_half_roi):
    engine = RuleEngine(RuleConfig(roi_mask=right_half_roi), checkpoint_threshold=THRESHOLD)
    # Columns 10..14 of the map are frame columns 40..59: half of them inside the ROI
    # (map column 12 covers frame 48..51, half inside, and counts as inside).
    decision = engine.decide(
        frame_result(0, 5.0, area_px=400, anomaly_map=hot_map(slice(0, 5), slice(10, 15))),
        now=1000.0)
    assert decision.verdict == Verdict.DEFECT
    assert "area 240 px" in decision.reason


def test_rule_engine_refuses_to_start_when_roi_mask_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="roi_missing.png"):
        RuleEngine(RuleConfig(roi_mask=str(tmp_path / "roi_missing.png")),
                   checkpoint_threshold=THRESHOLD)


def test_rule_engine_suppresses_second_reject_but_logs_defect_when_in_cooldown():
    engine = RuleEngine(RuleConfig(cooldown_s=2.0), checkpoint_threshold=THRESHOLD)
    first = engine.decide(frame_result(0, 4.0), now=1000.0)
    second = engine.decide(frame_result(1, 4.0), now=1000.5)
    after = engine.decide(frame_result(2, 4.0), now=1002.5)

    assert first.verdict == Verdict.DEFECT and first.reject
    assert second.verdict == Verdict.DEFECT and not second.reject
    assert "cooldown" in second.reason
    assert after.verdict == Verdict.DEFECT and after.reject


def test_rule_engine_rejects_unknown_when_result_failed_or_late():
    engine = RuleEngine(RuleConfig(), checkpoint_threshold=THRESHOLD)
    failed = engine.decide(frame_result(0, None, error="CUDA out of memory"), now=1000.0)
    late = engine.decide(frame_result(1, 0.1, late=True), now=1000.0)

    assert failed.verdict == Verdict.UNKNOWN and failed.reject
    assert "CUDA out of memory" in failed.reason
    assert late.verdict == Verdict.UNKNOWN and late.reject
    assert "late" in late.reason


def test_rule_engine_marks_late_when_past_latency_budget():
    engine = RuleEngine(RuleConfig(latency_budget_ms=200), checkpoint_threshold=THRESHOLD)
    on_time = engine.decide(frame_result(0, 0.1, wall_time=1000.0), now=1000.1)
    too_late = engine.decide(frame_result(1, 0.1, wall_time=1000.0), now=1000.5)
    assert on_time.verdict == Verdict.OK
    assert too_late.verdict == Verdict.UNKNOWN and "500 ms" in too_late.reason


def test_rule_engine_does_not_reject_unknown_when_unknown_rejects_is_off():
    engine = RuleEngine(RuleConfig(unknown_rejects=False), checkpoint_threshold=THRESHOLD)
    failed = engine.decide(frame_result(0, None, error="decode error"), now=1000.0)
    late = engine.decide(frame_result(1, 9.0, late=True), now=1000.0)

    assert failed.verdict == Verdict.UNKNOWN and not failed.reject
    assert late.verdict == Verdict.UNKNOWN and not late.reject


def test_rule_engine_uses_per_source_config_when_source_has_one():
    engine = RuleEngine(
        RuleConfig(),                                        # checkpoint threshold 2.5
        per_source={"cam1": RuleConfig(threshold=5.0, k=2, n=2)},
        checkpoint_threshold=THRESHOLD,
    )
    cam0 = engine.decide(frame_result(0, 3.0, source_id="cam0"), now=1000.0)
    cam1_first = engine.decide(frame_result(0, 6.0, source_id="cam1"), now=1000.0)
    cam1_low = engine.decide(frame_result(1, 3.0, source_id="cam1"), now=1000.1)

    assert cam0.verdict == Verdict.DEFECT
    assert engine.threshold_for("cam1") == 5.0 and engine.threshold_for("cam0") == THRESHOLD
    assert cam1_first.verdict == Verdict.OK and "needs 2 of 2" in cam1_first.reason
    assert cam1_low.verdict == Verdict.OK and "< threshold 5" in cam1_low.reason


def test_rule_engine_keeps_windows_apart_when_sources_interleave():
    engine = RuleEngine(RuleConfig(k=2, n=2), checkpoint_threshold=THRESHOLD)
    a = engine.decide(frame_result(0, 3.0, source_id="a"), now=1000.0)
    b = engine.decide(frame_result(0, 3.0, source_id="b"), now=1000.0)
    assert a.verdict == Verdict.OK and b.verdict == Verdict.OK   # one hit each, not two


def test_rule_config_rejects_k_greater_than_n():
    with pytest.raises(ValueError, match="k=3, n=2"):
        RuleConfig(k=3, n=2)


def test_rule_engine_refuses_to_start_when_no_threshold_is_known():
    with pytest.raises(ValueError, match="checkpoint_threshold"):
        RuleEngine(RuleConfig())


def test_rule_engine_judges_each_source_by_its_products_threshold_when_the_model_is_unified():
    # A unified model: plates score low, tiles high; each source sees one product.
    engine = RuleEngine(RuleConfig(), {"tiles_override": RuleConfig(threshold=9.0)},
                        checkpoint_threshold=THRESHOLD,
                        source_thresholds={"plates": 1.5, "tiles": 6.0, "tiles_override": 6.0})
    assert engine.threshold_for("plates") == 1.5 and engine.threshold_for("tiles") == 6.0
    assert engine.threshold_for("other") == THRESHOLD           # no product: the default
    assert engine.threshold_for("tiles_override") == 9.0       # a config threshold still wins
    assert engine.decide(frame_result(0, 2.0, source_id="plates")).verdict == Verdict.DEFECT
    assert engine.decide(frame_result(0, 5.0, source_id="tiles")).verdict == Verdict.OK
