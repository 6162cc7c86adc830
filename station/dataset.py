"""`grad-edge dataset`: the loop back into training.

Frames the operators marked false positive (good parts the model rejected) and the
near-threshold good frames the line kept (good parts it nearly rejected) are written as
``<out>/<category>/train/good/*.png``: the MVTec AD layout `grad-edge train --data` reads. With
``--include`` the normal images a model was trained on are copied in too, so a retrained
model learns what it got wrong without forgetting what it knew.

A kept frame is the model's own guess that the part was good; where the source knew better
(the synthetic line's truth says the part was defective) it is left out and counted.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import cv2

from edge.defect_log import DefectFilter, DefectLogReader
from trainer.dataset import IMAGE_SUFFIXES

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DatasetSummary:
    folder: Path
    false_positives: int
    kept: int
    included: int
    skipped_missing: int           # rows whose image file is gone (retention, moved disk)
    skipped_defective: int         # kept frames the source's truth says were defective


def write_dataset(db: str, out: str | Path, *, category: str = "line",
                  include: str | Path | None = None, run_id: int | None = None,
                  since: float | None = None, source: str | None = None) -> DatasetSummary:
    folder = Path(out) / category / "train" / "good"
    folder.mkdir(parents=True, exist_ok=True)
    missing = defective = 0
    n_fp = n_kept = n_included = 0
    with DefectLogReader(db) as reader:
        fps = reader.browse(DefectFilter(run_id=run_id, since=since, source=source,
                                         judgement="false_positive"), limit=None).rows
        kept = reader.list_kept_frames(run_id=run_id, since=since, source=source)
    for d in fps:
        if _write_png(d.frame_path, folder / f"fp_r{d.run_id}_d{d.id}_{d.source_id}_{d.seq}.png"):
            n_fp += 1
        else:
            missing += 1
    for k in kept:
        if k.truth:
            defective += 1
            continue
        if _write_png(k.frame_path, folder / f"kept_r{k.run_id}_k{k.id}_{k.source_id}_{k.seq}.png"):
            n_kept += 1
        else:
            missing += 1
    if include is not None:
        base = Path(include)
        good = base / "train" / "good" if (base / "train" / "good").is_dir() else base
        if not good.is_dir():
            raise FileNotFoundError(f"--include {include}: no train/good folder there (give a "
                                    "category folder of an MVTec-layout dataset)")
        for image in sorted(good.iterdir()):
            if image.suffix.lower() in IMAGE_SUFFIXES:
                shutil.copyfile(image, folder / f"base_{image.name}")
                n_included += 1
    if missing:
        log.warning("%d judged or kept frame(s) have no image file any more (retention?); "
                    "left out", missing)
    if n_fp + n_kept + n_included == 0:
        raise ValueError(f"nothing to write from {db}: no frame is marked false positive and "
                         "no near-threshold frame was kept (set keep.band in the line's config)")
    return DatasetSummary(Path(out) / category, n_fp, n_kept, n_included, missing, defective)


def _write_png(src: str | None, dst: Path) -> bool:
    """The frame as PNG (the defect log keeps JPEG evidence; training reads either)."""
    if not src or not Path(src).is_file():
        return False
    if Path(src).suffix.lower() == ".png":
        shutil.copyfile(src, dst)
        return True
    image = cv2.imread(src, cv2.IMREAD_COLOR)
    return image is not None and cv2.imwrite(str(dst), image)
