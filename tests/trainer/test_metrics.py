"""Metrics against hand-worked values, scikit-learn, and a port of the official MVTec AUPRO code."""

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from trainer.metrics import (Metrics, aupro, evaluate, f1_max, image_auroc, operating_point,
                             pixel_auroc)


def reference_aupro(masks, maps, fpr_limit):
    """Straight port of the MVTec AD evaluation (full sort of every pixel, scipy labelling)."""
    fp_change = np.zeros(masks.shape, dtype=np.float64)
    pro_change = np.zeros(masks.shape, dtype=np.float64)
    num_normal = 0
    num_regions = 0
    for i, mask in enumerate(masks):
        labelled, count = ndimage.label(mask, structure=np.ones((3, 3), dtype=int))
        num_regions += count
        num_normal += int((labelled == 0).sum())
        fp_change[i][labelled == 0] = 1.0
        for region in range(1, count + 1):
            pro_change[i][labelled == region] = 1.0 / (labelled == region).sum()
    order = np.argsort(maps.ravel(), kind="stable")[::-1]
    scores = maps.ravel()[order]
    fpr = np.cumsum(fp_change.ravel()[order]) / num_normal
    pro = np.cumsum(pro_change.ravel()[order]) / num_regions
    keep = np.append(np.diff(scores) != 0, True)
    fpr = np.concatenate(([0.0], fpr[keep], [1.0]))
    pro = np.concatenate(([0.0], pro[keep], [1.0]))
    inside = fpr <= fpr_limit
    x, y = fpr[inside], pro[inside]
    area = np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2)
    if x[-1] < fpr_limit:
        nxt = np.argmax(~inside)
        y_lim = y[-1] + (pro[nxt] - y[-1]) * (fpr_limit - x[-1]) / (fpr[nxt] - x[-1])
        area += (fpr_limit - x[-1]) * (y[-1] + y_lim) / 2
    return area / fpr_limit


def random_masks_and_maps(rng, n=6, h=40, w=48, signal=1.0):
    """Masks with a few blobs (some images without any) and noisy maps that are higher inside them."""
    import cv2

    masks = np.zeros((n, h, w), dtype=np.uint8)
    for i in range(n):
        if i % 3 == 2:
            continue  # a good image: contributes normal pixels only
        for _ in range(rng.integers(1, 4)):
            centre = (int(rng.integers(0, w)), int(rng.integers(0, h)))
            axes = (int(rng.integers(1, 8)), int(rng.integers(1, 8)))
            cv2.ellipse(masks[i], centre, axes, 0, 0, 360, 1, -1)
    masks = masks.astype(bool)
    maps = rng.normal(size=(n, h, w)) + signal * masks
    maps = np.round(maps, 1)  # many ties, which the metrics must count as ties
    return masks, maps


def two_region_case():
    """One 4x6 image with two regions, worked by hand below.

        mask          scores
        A A . . . .   .9 .9 .5 .5 0  0
        A A . . . .   .9 .9 .5 .5 0  0
        . . . . B B   0  0  0  0  .8 .8
        . . . . B B   0  0  0  0  .2 .2

    Region A (4 px) scores 0.9; region B (4 px) is half at 0.8, half at 0.2. Of the 16 normal
    pixels, 4 score 0.5 and 12 score 0. Lowering the threshold through the distinct scores:
        t=0.9: FPR 0,    PRO (1 + 0)/2   = 0.5
        t=0.8: FPR 0,    PRO (1 + 0.5)/2 = 0.75
        t=0.5: FPR 4/16, PRO 0.75
        t=0.2: FPR 0.25, PRO (1 + 1)/2   = 1
        t=0  : FPR 1,    PRO 1
    Area up to FPR 0.3 = 0.25 * 0.75 + 0.05 * 1 = 0.2375, normalised: 0.2375 / 0.3 = 0.791666...
    Up to 0.2: 0.2 * 0.75 / 0.2 = 0.75.  Up to 1.0: 0.1875 + 0.75 * 1 = 0.9375.
    """
    mask = np.zeros((4, 6), dtype=bool)
    mask[0:2, 0:2] = True
    mask[2:4, 4:6] = True
    scores = np.zeros((4, 6))
    scores[0:2, 0:2] = 0.9
    scores[0:2, 2:4] = 0.5
    scores[2, 4:6] = 0.8
    scores[3, 4:6] = 0.2
    return mask[None], scores[None]


def test_image_auroc_equals_hand_value_when_one_pair_is_misordered():
    # Positive 0.35 beats negative 0.1 but not 0.4; positive 0.8 beats both: 3 of 4 pairs.
    assert image_auroc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)


def test_image_auroc_counts_half_when_scores_tie():
    assert image_auroc([0, 1, 0, 1], [0.5, 0.5, 0.1, 0.9]) == pytest.approx((1 + 0.5 + 1 + 1) / 4)


def test_image_auroc_agrees_with_sklearn_when_data_is_random():
    rng = np.random.default_rng(1)
    for _ in range(5):
        labels = rng.integers(0, 2, size=300)
        scores = np.round(rng.normal(size=300) + 0.7 * labels, 1)
        assert image_auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_image_auroc_uses_raw_scores_when_they_are_large():
    # A sigmoid would map both large scores to 1.0 and tie them; raw scores keep the order.
    assert image_auroc([0, 1], [1000.0, 1001.0]) == 1.0


def test_image_auroc_raises_when_only_one_class_is_present():
    with pytest.raises(ValueError, match="good and defective"):
        image_auroc([1, 1, 1], [0.1, 0.2, 0.3])


def test_image_auroc_raises_when_scores_contain_nan():
    with pytest.raises(ValueError, match="NaN"):
        image_auroc([0, 1], [0.1, np.nan])


def test_image_auroc_raises_when_lengths_differ():
    with pytest.raises(ValueError, match="equal length"):
        image_auroc([0, 1, 1], [0.1, 0.2])


def test_pixel_auroc_agrees_with_sklearn_when_maps_are_random():
    masks, maps = random_masks_and_maps(np.random.default_rng(2))
    expected = roc_auc_score(masks.ravel(), maps.ravel())
    assert pixel_auroc(masks, maps) == pytest.approx(expected, abs=1e-12)


def test_pixel_auroc_is_one_when_map_equals_mask():
    masks, _ = random_masks_and_maps(np.random.default_rng(3))
    assert pixel_auroc(masks, masks.astype(np.float32)) == 1.0


def test_pixel_auroc_raises_when_shapes_differ():
    with pytest.raises(ValueError, match="equal shape"):
        pixel_auroc(np.zeros((2, 4, 4), bool), np.zeros((2, 4, 5)))


def test_pixel_auroc_raises_when_no_pixel_is_defective():
    with pytest.raises(ValueError, match="normal and defect pixels"):
        pixel_auroc(np.zeros((2, 4, 4), bool), np.zeros((2, 4, 4)))


def test_f1_max_equals_hand_value_when_best_threshold_is_in_the_middle():
    # Descending thresholds: 0.8 -> TP1 FP0 FN1, F1 2/3; 0.4 -> TP1 FP1 FN1, F1 1/2;
    # 0.35 -> TP2 FP1 FN0, F1 4/5; 0.1 -> TP2 FP2, F1 2/3. Best: 0.8.
    assert f1_max([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.8)


def test_f1_max_treats_tied_scores_as_one_threshold_when_labels_differ():
    # Scores 0.5 hold one good and one defective image: a threshold takes both or neither.
    # t=0.9: TP1 FP0 FN2 -> 2/4; t=0.5: TP2 FP1 FN1 -> 4/6; t=0.1: TP3 FP2 -> 6/8 = 0.75.
    assert f1_max([1, 0, 1, 0, 1], [0.9, 0.5, 0.5, 0.1, 0.1]) == pytest.approx(0.75)


def test_f1_max_is_one_when_scores_separate_the_classes():
    assert f1_max([0, 1, 0, 1], [0.2, 0.7, 0.1, 0.9]) == 1.0


def test_aupro_is_one_when_map_is_perfect():
    masks, _ = random_masks_and_maps(np.random.default_rng(4))
    assert aupro(masks, masks.astype(np.float64)) == pytest.approx(1.0)


def test_aupro_equals_hand_value_when_two_regions_differ_in_coverage():
    masks, maps = two_region_case()
    assert aupro(masks, maps) == pytest.approx(0.2375 / 0.3)


def test_aupro_changes_when_fpr_limit_changes():
    masks, maps = two_region_case()
    assert aupro(masks, maps, fpr_limit=0.2) == pytest.approx(0.75)
    assert aupro(masks, maps, fpr_limit=0.3) == pytest.approx(0.2375 / 0.3)
    assert aupro(masks, maps, fpr_limit=1.0) == pytest.approx(0.9375)


def test_aupro_joins_diagonal_neighbours_when_labelling_regions():
    # Pixel (0,0) touches the L-shaped block at (1,1) only at a corner. With 8-connectivity this
    # is one region of 4 px and a high score on (0,0) alone covers 1/4 of it at FPR 0; the rest
    # ties with the normal pixels at 0, so the curve is (0,0) (0,0.25) (1,1):
    # PRO(0.3) = 0.25 + 0.75 * 0.3 = 0.475; area = 0.3 * (0.25 + 0.475) / 2; normalised 0.3625.
    # (4-connectivity would give two regions, PRO 0.5 at FPR 0, and 0.575.)
    mask = np.zeros((5, 5), dtype=bool)
    mask[0, 0] = mask[1, 1] = mask[1, 2] = mask[2, 1] = True
    scores = np.zeros((5, 5))
    scores[0, 0] = 1.0
    assert aupro(mask[None], scores[None]) == pytest.approx(0.3625)


def test_aupro_lies_strictly_between_zero_and_one_when_map_is_noisy():
    masks, maps = random_masks_and_maps(np.random.default_rng(5), signal=1.0)
    value = aupro(masks, maps)
    assert 0.0 < value < 1.0


def test_aupro_agrees_with_official_full_sort_when_data_is_random():
    rng = np.random.default_rng(6)
    for limit in (0.05, 0.3, 1.0):
        masks, maps = random_masks_and_maps(rng, signal=1.5)
        assert aupro(masks, maps, fpr_limit=limit) == pytest.approx(
            reference_aupro(masks, maps, limit), abs=1e-9
        )


def test_aupro_counts_images_without_regions_only_as_false_positives():
    masks, maps = two_region_case()
    # A second, defect-free image whose 24 pixels all score 0.95 (above every defect pixel):
    # 24 of 40 normal pixels are false positives before any region pixel is flagged, so the
    # FPR is already 0.6 > 0.3 when PRO first rises, and the area up to 0.3 is 0.
    masks2 = np.concatenate([masks, np.zeros_like(masks)])
    maps2 = np.concatenate([maps, np.full_like(maps, 0.95)])
    assert aupro(masks2, maps2) == pytest.approx(0.0)
    # The same image scoring 0 everywhere adds 24 normal pixels below every defect pixel:
    # FPR at t=0.5 becomes 4/40 = 0.1 and at t=0.2 still 0.1 with PRO 1, so
    # area = 0.1 * 0.75 + 0.2 * 1 = 0.275, normalised 0.275 / 0.3.
    maps3 = np.concatenate([maps, np.zeros_like(maps)])
    assert aupro(masks2, maps3) == pytest.approx(0.275 / 0.3)


def test_aupro_raises_when_no_mask_has_a_region():
    with pytest.raises(ValueError, match="defect region"):
        aupro(np.zeros((2, 4, 4), bool), np.random.default_rng(0).random((2, 4, 4)))


def test_aupro_raises_when_maps_contain_nan():
    masks, maps = two_region_case()
    maps[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        aupro(masks, maps)


def test_evaluate_returns_all_four_metrics_when_inputs_are_valid():
    masks, maps = two_region_case()
    masks = np.concatenate([masks, np.zeros_like(masks)])
    maps = np.concatenate([maps, np.zeros_like(maps)])
    result = evaluate([1, 0], [0.9, 0.1], masks, maps)
    assert isinstance(result, Metrics)
    assert result.as_dict() == {
        "image_auroc": 1.0,
        "pixel_auroc": pytest.approx(pixel_auroc(masks, maps)),
        "aupro": pytest.approx(0.275 / 0.3),
        "f1_max": 1.0,
    }


def test_operating_point_counts_false_rejects_and_misses_at_the_stored_threshold():
    labels = np.array([0] * 100 + [1] * 4)
    scores = np.concatenate([np.arange(100, dtype=float), [50.0, 98.5, 200.0, 300.0]])
    op = operating_point(labels, scores, threshold=95.0)
    assert op.false_reject_rate == pytest.approx(5 / 100)      # goods 95..99 rejected
    assert op.miss_rate == pytest.approx(1 / 4)                 # the defect at 50 passes
    # 1% of 100 goods may be rejected: the threshold sits just above the second-highest good.
    assert 98.0 < op.threshold_at_budget <= 98.5
    assert op.miss_rate_at_budget == pytest.approx(1 / 4)
    assert np.mean(scores[:100] >= op.threshold_at_budget) <= 0.01
    assert (op.highest_good, op.lowest_defect) == (99.0, 50.0)


def test_evaluate_leaves_pixel_metrics_out_with_the_reason_when_there_are_no_masks():
    m = evaluate(np.array([0, 0, 1, 1]), np.array([0.1, 0.2, 0.8, 0.9]), None, None,
                 "2 defective images have no mask")
    assert m.image_auroc == 1.0 and m.pixel_auroc is None and m.aupro is None
    assert m.as_dict()["pixel_auroc"] is None and "no mask" in m.pixel_note
