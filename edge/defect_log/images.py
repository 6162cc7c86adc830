"""Saved evidence: frames and heatmap overlays of defects, one folder per day, with retention."""

from __future__ import annotations

import datetime as dt
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SavedImages:
    """Where a defect's images went; None where writing failed."""

    frame_path: str | None
    heatmap_path: str | None


_DAY_FOLDER = re.compile(r"^\d{4}-\d{2}-\d{2}$")


class ImageStore:
    """Frames and heatmap overlays of defects, in one folder per day, with retention.

    Evidence is never overwritten: a file is named after its run and defect,
    ``<day>/r<run id>_d<defect id>_<source>_<seq>_frame.jpg`` (and ``_heatmap``), and is
    created exclusively, so even two databases sharing one folder cannot replace each other's
    files (the second gets ``_2``, ``_3``... before the kind). Only :meth:`enforce_retention`
    deletes.

    A failed write (full disk, bad folder) is logged and gives a None path: the defect row
    matters more than its picture.
    """

    def __init__(self, root: str | os.PathLike, retention_days: float | None = None,
                 retention_gb: float | None = None, *, image_format: str = "jpg",
                 jpeg_quality: int = 90, heatmap_alpha: float = 0.5) -> None:
        if image_format not in ("jpg", "png"):
            raise ValueError(f"ImageStore: image_format {image_format!r}; use 'jpg' or 'png'")
        self.root = Path(root)
        self.retention_days = retention_days
        self.retention_gb = retention_gb
        self.image_format = image_format
        self.jpeg_quality = jpeg_quality
        self.heatmap_alpha = heatmap_alpha

    def save(self, source_id: str, seq: int, frame: np.ndarray,
             anomaly_map: np.ndarray | None = None, *, when: float | None = None,
             vmax: float | None = None, run_id: int | None = None,
             defect_id: int | None = None, box: tuple[int, int, int, int] | None = None,
             score: float | None = None, threshold: float | None = None,
             kind: str = "frame") -> SavedImages:
        """Write the frame and (given a map) its heatmap overlay.

        `run_id` and `defect_id` (DefectLogWriter.reserve_defect_id) name the files. The
        heatmap colours run from the map's minimum to `vmax` (default: the map's maximum);
        pass the threshold x 2, say, to compare heatmaps across frames. Given `box`, `score`
        and `threshold`, the heatmap carries the region's box, the score against the
        threshold and the colour scale with the threshold marked (:func:`annotate`); the
        frame itself stays as captured. `kind` names the frame's file (``kept`` for a
        near-threshold good frame).
        """
        day = dt.date.fromtimestamp(time.time() if when is None else when).isoformat()
        ids = "".join(f"{tag}{value}_" for tag, value in (("r", run_id), ("d", defect_id))
                      if value is not None)
        stem = f"{ids}{re.sub(r'[^A-Za-z0-9_.-]', '_', source_id)}_{seq}"
        folder = self.root / day
        bgr = _to_bgr(frame)
        frame_path = self._write(folder, stem, kind, bgr)
        heatmap_path = None
        if anomaly_map is not None:
            overlay = heatmap_overlay(bgr, anomaly_map, vmax=vmax, alpha=self.heatmap_alpha)
            if score is not None or box is not None:
                overlay = annotate(overlay, box, score, threshold,
                                   scale=(float(np.min(anomaly_map)), vmax))
            heatmap_path = self._write(folder, stem, "heatmap", overlay)
        return SavedImages(frame_path, heatmap_path)

    def _write(self, folder: Path, stem: str, kind: str, image: np.ndarray) -> str | None:
        params = [cv2.IMWRITE_JPEG_QUALITY, self.jpeg_quality] if self.image_format == "jpg" else []
        path = folder / f"{stem}_{kind}.{self.image_format}"
        created = False
        try:
            ok, encoded = cv2.imencode(f".{self.image_format}", image, params)
            if not ok:
                raise OSError("cv2.imencode returned False")
            folder.mkdir(parents=True, exist_ok=True)
            for n in range(2, 1000):
                try:
                    out = open(path, "xb")            # never replace an existing file
                except FileExistsError:
                    path = folder / f"{stem}_{n}_{kind}.{self.image_format}"
                    continue
                created = True
                with out:
                    out.write(encoded.tobytes())
                break
            else:
                raise OSError(f"999 files named {stem}_*_{kind} already there")
        except (OSError, cv2.error) as exc:
            logger.error("could not save %s (%s); the defect is logged without it: is the "
                         "disk full or the folder not writable?", path, exc)
            if created:
                try:
                    path.unlink(missing_ok=True)     # no half-written picture (ours only)
                except OSError:
                    pass
            return None
        return str(path)

    def enforce_retention(self, now: float | None = None) -> int:
        """Delete the oldest images beyond retention_days / retention_gb; returns files deleted."""
        if not self.root.is_dir():
            return 0
        now = time.time() if now is None else now
        deleted = 0
        days = sorted(d for d in self.root.iterdir() if d.is_dir() and _DAY_FOLDER.match(d.name))

        if self.retention_days is not None:
            cutoff = dt.date.fromtimestamp(now - self.retention_days * 86400).isoformat()
            for folder in [d for d in days if d.name < cutoff]:
                deleted += sum(1 for f in folder.rglob("*") if f.is_file())
                shutil.rmtree(folder, ignore_errors=True)
                days.remove(folder)
                logger.info("image retention: removed %s (older than %g days)", folder,
                            self.retention_days)

        if self.retention_gb is not None:
            limit = self.retention_gb * 1024**3
            # Oldest first: by day folder, then by modification time within the day.
            files = [(d.name, f.stat().st_mtime, f.stat().st_size, f)
                     for d in days for f in d.iterdir() if f.is_file()]
            files.sort(key=lambda item: (item[0], item[1]))
            total = sum(size for _, _, size, _ in files)
            for _, _, size, path in files:
                if total <= limit:
                    break
                path.unlink(missing_ok=True)
                total -= size
                deleted += 1
            for folder in days:
                if folder.is_dir() and not any(folder.iterdir()):
                    folder.rmdir()
            if deleted:
                logger.info("image retention: %d file(s) deleted to stay under %g GB",
                            deleted, self.retention_gb)
        return deleted


def _to_bgr(frame: np.ndarray) -> np.ndarray:
    image = np.asarray(frame)
    if image.dtype != np.uint8:
        # Float frames are taken as 0..1.
        scale = 255.0 if np.issubdtype(image.dtype, np.floating) else 1.0
        image = np.clip(image * scale, 0, 255).astype(np.uint8)
    if image.ndim == 2:
        image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    return image


def heatmap_overlay(frame_bgr: np.ndarray, anomaly_map: np.ndarray, *,
                    vmax: float | None = None, alpha: float = 0.5) -> np.ndarray:
    """JET colours of the anomaly map, resized to the frame and blended over it."""
    h, w = frame_bgr.shape[:2]
    amap = cv2.resize(np.asarray(anomaly_map, np.float32), (w, h),
                      interpolation=cv2.INTER_LINEAR)
    lo = float(amap.min())
    hi = float(amap.max()) if vmax is None else float(vmax)
    scaled = np.clip((amap - lo) / max(hi - lo, 1e-12), 0.0, 1.0)
    colours = cv2.applyColorMap((scaled * 255).astype(np.uint8), cv2.COLORMAP_JET)
    return cv2.addWeighted(colours, alpha, frame_bgr, 1.0 - alpha, 0.0)



def annotate(image: np.ndarray, box: tuple[int, int, int, int] | None, score: float | None,
             threshold: float | None, *, scale: tuple[float, float | None] | None = None
             ) -> np.ndarray:
    """The region's box, `score / threshold` in the corner and, given the colour range
    `scale` = (low, high) of the heatmap, a JET colour bar on the right edge with its two
    ends written and the threshold marked in white. Returns a new image."""
    out = image.copy()
    h, w = out.shape[:2]
    thick = max(1, round(min(h, w) / 200))
    font = max(0.35, min(h, w) / 600)
    if box is not None:
        cv2.rectangle(out, (int(box[0]), int(box[1])), (int(box[2]) - 1, int(box[3]) - 1),
                      (255, 255, 255), thick + 1)
        cv2.rectangle(out, (int(box[0]), int(box[1])), (int(box[2]) - 1, int(box[3]) - 1),
                      (0, 0, 255), thick)
    if score is not None and min(h, w) >= 128:        # no room for text on a thumbnail
        text = f"score {score:.3g}" + (f" / thr {threshold:.3g}" if threshold is not None
                                       else "")
        _label(out, text, (4, int(16 * font / 0.4)), font, thick)
    if scale is not None and scale[1] is not None and min(h, w) >= 128:
        lo, hi = scale
        bar_w, top, bottom = max(6, w // 40), int(0.1 * h), int(0.9 * h)
        x0 = w - bar_w - 2
        ramp = np.linspace(255, 0, bottom - top).astype(np.uint8)[:, None]
        colours = cv2.applyColorMap(np.repeat(ramp, bar_w, axis=1), cv2.COLORMAP_JET)
        out[top:bottom, x0:x0 + bar_w] = colours
        cv2.rectangle(out, (x0 - 1, top - 1), (x0 + bar_w, bottom), (255, 255, 255), 1)
        if threshold is not None and hi > lo:
            frac = min(max((threshold - lo) / (hi - lo), 0.0), 1.0)
            y = int(bottom - frac * (bottom - top))
            cv2.line(out, (x0 - 4, y), (x0 + bar_w + 1, y), (255, 255, 255), thick + 1)
        small = font * 0.8
        for value, y in ((hi, top - 3), (lo, min(h - 3, bottom + int(12 * small / 0.4)))):
            text = f"{value:.3g}"
            (tw, _), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, small, 1)
            _label(out, text, (max(0, w - tw - 2), max(10, y)), small, 1)
    return out


def _label(image: np.ndarray, text: str, org: tuple[int, int], font: float, thick: int) -> None:
    """White text with a dark outline: readable on any heatmap colour."""
    cv2.putText(image, text, org, cv2.FONT_HERSHEY_SIMPLEX, font, (0, 0, 0), thick + 2,
                cv2.LINE_AA)
    cv2.putText(image, text, org, cv2.FONT_HERSHEY_SIMPLEX, font, (255, 255, 255), thick,
                cv2.LINE_AA)
