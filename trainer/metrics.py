"""The anomaly-detection field's evaluation metrics, computed exactly in numpy.

Scores are used as they are: raw anomaly scores rank images and pixels, and nothing here squashes
them through a sigmoid (which some metric libraries do and which ties up large raw scores).
All metrics are threshold-free or take the best threshold, as in the MVTec AD literature:

- image AUROC and F1-max on one score per image,
- pixel AUROC over every pixel of every image,
- AUPRO: the area under the per-region-overlap curve up to a false-positive rate of 30 %.

Memory matters at the pixel level (700 maps of 256x256 are 46 M pixels), so the pixel metrics
avoid sorting all pixels together with index arrays: AUROC sorts only the normal pixels' scores,
and AUPRO sorts only the pixels that score above the threshold where the FPR limit is reached.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import cv2
import numpy as np

# Ground-truth regions for AUPRO are 8-connected, as in the official MVTec AD evaluation code
# (scipy.ndimage.label with a 3x3 structure of ones): pixels touching at a corner form one defect.
REGION_CONNECTIVITY = 8


@dataclass(frozen=True)
class Metrics:
    """The four standard numbers for one evaluation run.

    The pixel metrics are None when the data has image-level labels only (no masks), and
    ``pixel_note`` then says why.
    """

    image_auroc: float
    pixel_auroc: float | None
    aupro: float | None
    f1_max: float
    pixel_note: str = ""

    def as_dict(self) -> dict[str, float | None]:
        return {name: (None if value is None else float(value))
                for name, value in asdict(self).items() if name != "pixel_note"}


def evaluate(labels, scores, masks=None, maps=None, pixel_note: str = "") -> Metrics:
    """All four metrics: image level from ``labels``/``scores``, pixel level from ``masks``/``maps``.

    Without masks (None) only the image metrics are computed; say why in ``pixel_note``.
    """
    pixel = masks is not None
    return Metrics(
        image_auroc=image_auroc(labels, scores),
        pixel_auroc=pixel_auroc(masks, maps) if pixel else None,
        aupro=aupro(masks, maps) if pixel else None,
        f1_max=f1_max(labels, scores),
        pixel_note="" if pixel else (pixel_note or "no pixel masks given"),
    )


def image_auroc(labels, scores) -> float:
    """Area under the ROC curve of image scores; labels are 0 (good) / 1 (defective)."""
    labels, scores = _image_inputs(labels, scores)
    return _auroc(labels, scores)


def pixel_auroc(masks, maps) -> float:
    """Area under the ROC curve over all pixels of all images (masks (N,H,W), maps (N,H,W))."""
    masks, maps = _pixel_inputs(masks, maps)
    return _auroc(masks.ravel(), maps.ravel())


def f1_max(labels, scores) -> float:
    """The best F1 score over all thresholds "score >= t" at image level.

    Every distinct score is tried as the threshold, so the result is exact.
    """
    labels, scores = _image_inputs(labels, scores, need_both_classes=False)
    n_positive = int(labels.sum())
    if n_positive == 0:
        raise ValueError("f1_max needs at least one defective image (label 1); F1 is undefined without")
    order = np.argsort(-scores, kind="stable")
    sorted_scores = scores[order]
    true_pos = np.cumsum(labels[order], dtype=np.int64)
    predicted_pos = np.arange(1, len(scores) + 1)
    # A threshold equal to a score flags all images with that score, so only the last index of
    # each run of tied scores is a reachable operating point.
    last_of_tie = np.append(sorted_scores[1:] != sorted_scores[:-1], True)
    true_pos, predicted_pos = true_pos[last_of_tie], predicted_pos[last_of_tie]
    f1 = 2.0 * true_pos / (predicted_pos + n_positive)  # 2TP / (2TP + FP + FN)
    return float(f1.max())


def aupro(masks, maps, fpr_limit: float = 0.3) -> float:
    """Normalised area under the per-region-overlap (PRO) curve for FPR in [0, fpr_limit].

    The MVTec AD definition, computed exactly (every distinct score is a threshold):

    - each 8-connected component of each ground-truth mask is one region;
    - at threshold t (pixel flagged when its score >= t), PRO(t) is the mean over all regions of
      all images of the fraction of the region that is flagged, so small and large defects weigh
      the same;
    - FPR(t) is the fraction of normal pixels (outside every mask, in all images) that is flagged;
      images without any region contribute only these normal pixels;
    - PRO is integrated over FPR by the trapezoid rule from 0 to ``fpr_limit``, interpolating the
      curve linearly at exactly ``fpr_limit``, and divided by ``fpr_limit`` so a perfect map
      scores 1.0.

    Only thresholds whose FPR stays below the limit shape that area, i.e. scores above the
    k-th largest normal score with k = ceil(fpr_limit * normal pixels). So only pixels above that
    score are sorted; all pixels at or below it collapse into the one curve point that crosses the
    limit. This keeps memory at a fraction of the input size even for 46 M pixels.
    """
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    masks, maps = _pixel_inputs(masks, maps, need_both_classes=False)

    num_normal = int(masks.size - np.count_nonzero(masks))
    if num_normal == 0:
        raise ValueError("aupro needs normal pixels (outside the masks) to measure the false-positive rate")

    # The score at which the FPR first reaches the limit: the k-th largest normal score.
    k = max(1, int(np.ceil(fpr_limit * num_normal - 1e-9)))
    normal_scores = maps[~masks]
    normal_scores.partition(num_normal - k)
    limit_score = normal_scores[num_normal - k]
    del normal_scores

    above_scores, above_normal, above_weight = [], [], []
    num_regions = 0
    normal_at_limit = 0  # normal pixels scoring >= limit_score
    weight_at_limit = 0.0  # sum of 1/region_size over defect pixels scoring >= limit_score
    for mask, score_map in zip(masks, maps):
        count, region_ids, stats, _ = cv2.connectedComponentsWithStats(
            mask.astype(np.uint8), connectivity=REGION_CONNECTIVITY
        )
        # Each defect pixel adds 1/(its region's size) to PRO's sum: a fully flagged region adds 1.
        weight_of_id = 1.0 / stats[:, cv2.CC_STAT_AREA].astype(np.float64)
        weight_of_id[0] = 0.0  # id 0 is the background (normal pixels)
        pixel_weight = weight_of_id[region_ids]
        num_regions += count - 1

        at_or_above = score_map >= limit_score
        normal_at_limit += int(np.count_nonzero(at_or_above & ~mask))
        weight_at_limit += float(pixel_weight[at_or_above].sum())

        above = score_map > limit_score
        above_scores.append(score_map[above])
        above_normal.append(~mask[above])
        above_weight.append(pixel_weight[above])

    if num_regions == 0:
        raise ValueError("aupro needs at least one defect region: every mask is empty")

    scores = np.concatenate(above_scores)
    is_normal = np.concatenate(above_normal)
    weight = np.concatenate(above_weight)
    del above_scores, above_normal, above_weight

    order = np.argsort(scores)[::-1]  # descending: each step lowers the threshold
    scores, is_normal, weight = scores[order], is_normal[order], weight[order]
    del order
    last_of_tie = np.ones(len(scores), dtype=bool)  # works for an empty selection too
    last_of_tie[:-1] = scores[1:] != scores[:-1]
    fpr = np.cumsum(is_normal, dtype=np.int64)[last_of_tie] / num_normal
    pro = np.cumsum(weight)[last_of_tie] / num_regions

    # Start at (0, 0) (threshold above every score) and end at the point that crosses the limit.
    fpr = np.concatenate(([0.0], fpr, [normal_at_limit / num_normal]))
    pro = np.concatenate(([0.0], pro, [weight_at_limit / num_regions]))
    pro = np.minimum(pro, 1.0)  # rounding in the cumulative sum must not exceed full coverage
    return _area_up_to(fpr, pro, fpr_limit) / fpr_limit


def _area_up_to(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoid area under the polyline (x, y) (x non-decreasing, x[0] = 0) for x in [0, x_max]."""
    inside = int(np.searchsorted(x, x_max, side="right"))  # points with x <= x_max
    xs, ys = x[:inside], y[:inside]
    area = float(np.sum(np.diff(xs) * (ys[1:] + ys[:-1]) / 2.0))
    if inside < len(x) and xs[-1] < x_max:
        x0, y0, x1, y1 = xs[-1], ys[-1], x[inside], y[inside]
        y_at_max = y0 + (y1 - y0) * (x_max - x0) / (x1 - x0)
        area += (x_max - x0) * (y0 + y_at_max) / 2.0
    return area


def _auroc(positive: np.ndarray, scores: np.ndarray) -> float:
    """Exact AUROC as the Mann-Whitney statistic: P(score_pos > score_neg) + P(equal) / 2.

    Only the negatives' scores are sorted (in a copy); each positive is located in them by binary
    search. That needs no index array over all pixels, unlike sorting scores and labels together.
    """
    negative_scores = scores[~positive]  # a copy, sorted in place
    negative_scores.sort()
    positive_scores = scores[positive]
    below = np.searchsorted(negative_scores, positive_scores, side="left")
    below_or_equal = np.searchsorted(negative_scores, positive_scores, side="right")
    # Twice the statistic, in integers, so that ties count exactly one half.
    twice_u = int(np.sum(below, dtype=np.int64)) + int(np.sum(below_or_equal, dtype=np.int64))
    return twice_u / (2.0 * len(positive_scores) * len(negative_scores))


def _image_inputs(labels, scores, need_both_classes: bool = True) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels)
    scores = _as_float(scores, "scores")
    if labels.ndim != 1 or scores.ndim != 1 or labels.shape != scores.shape:
        raise ValueError(
            f"labels and scores must be 1-D of equal length, got shapes {labels.shape} and {scores.shape}"
        )
    if len(labels) == 0:
        raise ValueError("no images: labels and scores are empty")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError(f"labels must be 0 (good) or 1 (defective), got values {np.unique(labels)[:10]}")
    labels = labels.astype(bool)
    if need_both_classes and (labels.all() or not labels.any()):
        present = "defective" if labels.all() else "good"
        raise ValueError(f"AUROC needs good and defective images, but all {len(labels)} are {present}")
    return labels, scores


def _pixel_inputs(masks, maps, need_both_classes: bool = True) -> tuple[np.ndarray, np.ndarray]:
    masks = np.asarray(masks)
    maps = _as_float(maps, "maps")
    if masks.ndim != 3 or masks.shape != maps.shape:
        raise ValueError(f"masks and maps must both be (N, H, W) of equal shape, got {masks.shape} and {maps.shape}")
    if masks.size == 0:
        raise ValueError(f"masks and maps are empty: shape {masks.shape}")
    if masks.dtype != bool:
        masks = masks != 0
    if need_both_classes:
        defect_pixels = int(np.count_nonzero(masks))
        if defect_pixels == 0 or defect_pixels == masks.size:
            present = "defect" if defect_pixels else "normal"
            raise ValueError(f"pixel AUROC needs normal and defect pixels, but all {masks.size} are {present}")
    return masks, maps


def _as_float(values, name: str) -> np.ndarray:
    """Float view of the scores without copying float32/float64 input (maps can be large)."""
    values = np.asarray(values)
    if not np.issubdtype(values.dtype, np.floating):
        if not (np.issubdtype(values.dtype, np.integer) or values.dtype == bool):
            raise ValueError(f"{name} must be numeric, got dtype {values.dtype}")
        values = values.astype(np.float64)
    if not np.isfinite(values).all():
        raise ValueError(f"{name} contain NaN or infinite values")
    return values


@dataclass(frozen=True)
class OperatingPoint:
    """What a threshold does on the line: the verdict is DEFECT when score >= threshold."""

    threshold: float             # the stored one (the checkpoint's, for this product)
    false_reject_rate: float     # share of good images rejected at it
    miss_rate: float             # share of defective images passed at it
    max_false_reject: float      # the false-reject budget of the point below (e.g. 0.01)
    threshold_at_budget: float   # the lowest threshold whose false-reject rate is within it
    miss_rate_at_budget: float   # the miss rate there
    # The margins either side of the stored threshold: how far it sits from the good part it
    # came closest to rejecting and the defect it came closest to passing (a 0% / 0% point
    # with the threshold a hair from either is not the same line as one in a wide gap).
    highest_good: float          # the highest score of a good image
    lowest_defect: float         # the lowest score of a defective image

    def as_dict(self) -> dict[str, float]:
        return {name: float(value) for name, value in asdict(self).items()}


def operating_point(labels, scores, threshold: float, max_false_reject: float = 0.01
                    ) -> OperatingPoint:
    """False-reject and miss rates at `threshold`, and the threshold that rejects at most
    `max_false_reject` of the good images (the lowest such, so it misses the fewest)."""
    labels, scores = _image_inputs(labels, scores)
    good, bad = np.sort(scores[~labels])[::-1], scores[labels]
    allowed = int(np.floor(max_false_reject * len(good) + 1e-9))   # good images it may reject
    # Just above the (allowed+1)-th highest good score: exactly `allowed` goods score above it
    # (ties at that score pass too, which only lowers the false-reject rate).
    at_budget = float(np.nextafter(good[allowed], np.inf)) if allowed < len(good) \
        else float(good[-1])
    return OperatingPoint(
        threshold=float(threshold),
        false_reject_rate=float(np.mean(good >= threshold)),
        miss_rate=float(np.mean(bad < threshold)),
        max_false_reject=max_false_reject,
        threshold_at_budget=at_budget,
        miss_rate_at_budget=float(np.mean(bad < at_budget)),
        highest_good=float(good[0]),
        lowest_defect=float(bad.min()))
