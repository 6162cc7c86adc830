"""What `grad-edge predict` draws: the heatmap over the picture, the verdict, a box around what
is above the threshold, and the colour scale that says what the colours mean.

    +-------------------------------+-----+
    | DEFECT  score 14.2  thr 11.0  |     |   banner: verdict, score, threshold
    +-------------------------------+ max |
    |                               |     |
    |   picture, heatmap blended    | thr |   colour bar, fixed per model (normal mean ..
    |        [ box ]                |     |   1.5 x threshold), so blue is normal and red is
    |                               | mean|   well past the threshold on every picture
    +-------------------------------+-----+
"""

from __future__ import annotations

import cv2
import numpy as np

BANNER_H = 24
BAR_W = 72
RED, GREEN, WHITE, BLACK = (0, 0, 255), (0, 160, 0), (255, 255, 255), (0, 0, 0)


def colour_scale(vmin: float, vmax: float) -> tuple[float, float]:
    """The fixed range of the colours: from the normal mean to 1.5x the threshold."""
    return vmin, max(vmax, vmin + 1e-6)


def heatmap(image_rgb: np.ndarray, amap: np.ndarray, vmin: float, vmax: float) -> np.ndarray:
    """JET heatmap of the map, resized to the image, blended 50/50: BGR uint8."""
    h, w = image_rgb.shape[:2]
    m = cv2.resize(amap, (w, h), interpolation=cv2.INTER_LINEAR)
    m = np.clip((m - vmin) / max(vmax - vmin, 1e-9), 0, 1)
    heat = cv2.applyColorMap((m * 255).astype(np.uint8), cv2.COLORMAP_JET)
    return cv2.addWeighted(cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR), 0.5, heat, 0.5, 0)


def defect_box(amap: np.ndarray, threshold: float, image_hw: tuple[int, int]
               ) -> tuple[int, int, int, int] | None:
    """(x0, y0, x1, y1) in image pixels around every map pixel at or above the threshold."""
    ys, xs = np.nonzero(amap >= threshold)
    if len(ys) == 0:
        return None
    sy, sx = image_hw[0] / amap.shape[0], image_hw[1] / amap.shape[1]
    return (int(xs.min() * sx), int(ys.min() * sy),
            int(np.ceil((xs.max() + 1) * sx)) - 1, int(np.ceil((ys.max() + 1) * sy)) - 1)


def _bar(height: int, vmin: float, vmax: float, threshold: float) -> np.ndarray:
    """The colour scale, top = vmax, with the threshold marked."""
    bar = np.full((height, BAR_W, 3), 255, np.uint8)
    top, bottom = 8, height - 8
    ramp = np.linspace(1, 0, max(bottom - top, 2))
    colours = cv2.applyColorMap((ramp * 255).astype(np.uint8)[:, None], cv2.COLORMAP_JET)
    bar[top:bottom, 4:18] = colours[:bottom - top]

    def row(v: float) -> int:
        return int(round(top + (1 - np.clip((v - vmin) / (vmax - vmin), 0, 1)) * (bottom - top - 1)))

    for v, colour in ((vmax, BLACK), (vmin, BLACK), (threshold, RED)):
        y = row(v)
        cv2.line(bar, (2, y), (20, y), colour, 1)
        cv2.putText(bar, f"{v:.3g}", (22, min(max(y + 4, 10), height - 2)),
                    cv2.FONT_HERSHEY_SIMPLEX, 0.35, colour, 1, cv2.LINE_AA)
    return bar


def annotate(image_rgb: np.ndarray, amap: np.ndarray, score: float, threshold: float,
             vmin: float, vmax: float) -> np.ndarray:
    """The picture with heatmap, verdict banner, box and colour scale: BGR uint8 for imwrite."""
    vmin, vmax = colour_scale(vmin, vmax)
    defect = score >= threshold
    body = heatmap(image_rgb, amap, vmin, vmax)
    box = defect_box(amap, threshold, image_rgb.shape[:2]) if defect else None
    if box is not None:
        cv2.rectangle(body, box[:2], box[2:], WHITE, 2)
    h, w = body.shape[:2]
    banner = np.full((BANNER_H, w, 3), RED if defect else GREEN, np.uint8)
    text = f"{'DEFECT' if defect else 'OK'} {score:.3g} / thr {threshold:.3g}"
    cv2.putText(banner, text, (4, 17), cv2.FONT_HERSHEY_SIMPLEX, 0.45, WHITE, 1, cv2.LINE_AA)
    left = np.vstack([banner, body])
    return np.hstack([left, _bar(h + BANNER_H, vmin, vmax, threshold)])
