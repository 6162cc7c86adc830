"""Reading image folders laid out like MVTec AD.

The layout, per category::

    <root>/<category>/train/good/*.png                     defect-free training images
    <root>/<category>/test/good/*.png                      defect-free test images
    <root>/<category>/test/<defect>/<name>.png             defective test images
    <root>/<category>/ground_truth/<defect>/<name>_mask.png   their pixel masks (0 = normal)

This module only lists and decodes files. It does not resize, normalise or batch: images of one
category may differ in size (magnetic_tile does), and choosing how to bring them to the model's
input size belongs to the preprocessing step. Listings are sorted so that every run sees the same
order, and layout problems fail early with a message that says what was expected and where,
instead of surfacing later as a silently empty or mislabelled evaluation.
"""

from __future__ import annotations

import math
import zlib
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
SPLITS = ("train", "test")
GOOD = "good"
MASK_SUFFIX = "_mask.png"


class DatasetLayoutError(ValueError):
    """The folder tree or a file in it does not match the MVTec AD layout."""


@dataclass(frozen=True)
class Sample:
    """One image of the dataset and what is known about it.

    ``mask_path`` is None for good images: they have no mask file and count as all-normal. A
    defective image read with ``scan(..., masks="optional")`` may have none either: it is then
    labelled at image level only (``has_mask`` False), as most data a plant collects is.
    """

    path: Path
    category: str
    split: str  # "train" or "test"
    defect_type: str  # "good" or the defect folder's name
    label: int  # 0 good, 1 defective
    mask_path: Path | None

    @property
    def has_mask(self) -> bool:
        """True when the pixel truth is known: a good image, or a defect with its mask."""
        return self.label == 0 or self.mask_path is not None


def list_categories(root: str | Path) -> list[str]:
    """Names of the folders under ``root`` that look like categories (have ``train/good``).

    Folders without ``train/good`` (and hidden ones) are skipped, so a ``manifest.csv`` or a
    stray folder next to the categories does not break the listing.
    """
    root = _existing_root(root)
    return sorted(
        entry.name
        for entry in root.iterdir()
        if entry.is_dir() and not entry.name.startswith(".") and (entry / "train" / GOOD).is_dir()
    )


def scan(root: str | Path, categories: list[str] | None = None, split: str = "train",
         masks: str = "required") -> list[Sample]:
    """List the samples of ``split`` ("train" or "test") for ``categories`` (None: all of them).

    The result is sorted by category, then defect folder, then file name. "train" reads only
    ``train/good``. "test" reads every folder under ``test/``. With ``masks="required"`` each
    defective image must have its mask, because an evaluation that silently treats a missing
    mask as "no defect" would report wrong pixel metrics; with ``masks="optional"`` a defective
    image without one is listed with ``mask_path=None`` (image-level label only), and the caller
    must leave pixel metrics out.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if masks not in ("required", "optional"):
        raise ValueError(f"masks must be 'required' or 'optional', got {masks!r}")
    root = _existing_root(root)
    available = list_categories(root)
    if categories is None:
        if not available:
            raise DatasetLayoutError(
                f"no category found under {root}: expected folders like "
                f"{root}/<category>/train/good; found {_names(root)}"
            )
        categories = available
    elif isinstance(categories, str):
        raise TypeError(f"categories must be a list of names or None, got the string {categories!r}")

    samples: list[Sample] = []
    for category in sorted(categories):
        category_dir = root / category
        if not category_dir.is_dir():
            raise DatasetLayoutError(
                f"category {category!r} not found under {root}; "
                f"categories found there: {', '.join(available) or 'none'}"
            )
        if not (category_dir / "train" / GOOD).is_dir():
            raise DatasetLayoutError(
                f"category {category!r} has no train/good folder: expected {category_dir / 'train' / GOOD}"
            )
        if split == "train":
            found = _scan_train(category_dir, category)
        else:
            found = _scan_test(category_dir, category, masks == "required")
        if not found:
            where = category_dir / ("train/good" if split == "train" else "test")
            raise DatasetLayoutError(
                f"split {split!r} of category {category!r} is empty: no image files "
                f"({', '.join(sorted(IMAGE_SUFFIXES))}) under {where}"
            )
        samples.extend(found)
    return samples


def load_image(path: str | Path) -> np.ndarray:
    """Decode an image file to RGB uint8 of shape (H, W, 3).

    Grayscale files are expanded to three equal channels so that every image feeds the same
    3-channel backbone; 16-bit files are reduced to 8 bits by OpenCV.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetLayoutError(f"image file not found: {path}")
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise DatasetLayoutError(f"cannot decode image {path}: not an image or an unsupported format")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def load_mask(sample: Sample, shape_hw: tuple[int, ...]) -> np.ndarray:
    """The defect mask of ``sample`` as bool (H, W); all False for good images.

    ``shape_hw`` is the image's (height, width) (``image.shape`` works too). Any non-zero mask
    pixel is a defect, so 0/255 and 0/1 masks both work. A mask whose size differs from its image
    is an error rather than something to resize: it means image and mask do not belong together.
    """
    height, width = int(shape_hw[0]), int(shape_hw[1])
    if sample.mask_path is None:
        if sample.label:
            raise DatasetLayoutError(f"defective image {sample.path} has no mask: its pixels' "
                                     "truth is unknown (image-level label only)")
        return np.zeros((height, width), dtype=bool)
    if not sample.mask_path.is_file():
        raise DatasetLayoutError(f"mask file not found: {sample.mask_path} (for image {sample.path})")
    mask = cv2.imread(str(sample.mask_path), cv2.IMREAD_GRAYSCALE)
    if mask is None:
        raise DatasetLayoutError(f"cannot decode mask {sample.mask_path}: not an image or an unsupported format")
    if mask.shape != (height, width):
        raise DatasetLayoutError(
            f"mask {sample.mask_path} is {mask.shape[0]}x{mask.shape[1]} (HxW) but its image "
            f"{sample.path} is {height}x{width}"
        )
    return mask > 0


def split_holdout(
    samples: list[Sample], fraction: float, seed: int = 0
) -> tuple[list[Sample], list[Sample]]:
    """Split train/good samples into (fit, holdout) with about ``fraction`` of each category held out.

    The holdout is kept away from training so that score thresholds can be calibrated on normal
    images the model has not memorised. Each category is split on its own, with a random stream
    seeded by (seed, category name), so that adding or removing another category does not change
    which images a category holds out. A category with at least 2 images keeps at least one image
    on each side; a category with a single image puts it in the fit part. Both lists keep the
    input's sorted order.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be strictly between 0 and 1, got {fraction}")
    not_train_good = [s for s in samples if s.split != "train" or s.label != 0]
    if not_train_good:
        raise ValueError(
            f"split_holdout takes only train/good samples; got {len(not_train_good)} others, "
            f"e.g. {not_train_good[0].path}"
        )

    by_category: dict[str, list[Sample]] = defaultdict(list)
    for sample in samples:
        by_category[sample.category].append(sample)

    held_out: set[Path] = set()
    for category, members in by_category.items():
        members = sorted(members, key=lambda s: s.path)
        n = len(members)
        if n < 2:
            continue
        n_holdout = min(max(math.floor(n * fraction + 0.5), 1), n - 1)
        rng = np.random.default_rng([seed, zlib.crc32(category.encode("utf-8"))])
        for index in rng.permutation(n)[:n_holdout]:
            held_out.add(members[index].path)

    fit = [s for s in samples if s.path not in held_out]
    holdout = [s for s in samples if s.path in held_out]
    return fit, holdout


def _existing_root(root: str | Path) -> Path:
    root = Path(root)
    if not root.is_dir():
        raise DatasetLayoutError(
            f"dataset root {root} does not exist or is not a folder: expected a folder with one "
            f"sub-folder per category (<category>/train/good, <category>/test/<type>, "
            f"<category>/ground_truth/<type>)"
        )
    return root


def _names(folder: Path) -> str:
    names = sorted(entry.name for entry in folder.iterdir() if not entry.name.startswith("."))
    return ", ".join(names) if names else "nothing"


def _image_files(folder: Path) -> list[Path]:
    return sorted(
        entry
        for entry in folder.iterdir()
        if entry.is_file() and not entry.name.startswith(".") and entry.suffix.lower() in IMAGE_SUFFIXES
    )


def _scan_train(category_dir: Path, category: str) -> list[Sample]:
    return [
        Sample(path=path, category=category, split="train", defect_type=GOOD, label=0, mask_path=None)
        for path in _image_files(category_dir / "train" / GOOD)
    ]


def _scan_test(category_dir: Path, category: str, require_masks: bool = True) -> list[Sample]:
    test_dir = category_dir / "test"
    if not test_dir.is_dir():
        raise DatasetLayoutError(f"category {category_dir.name!r} has no test folder: expected {test_dir}")
    samples: list[Sample] = []
    missing_masks: list[tuple[Path, Path]] = []
    defect_dirs = sorted(d for d in test_dir.iterdir() if d.is_dir() and not d.name.startswith("."))
    for defect_dir in defect_dirs:
        defect_type = defect_dir.name
        for path in _image_files(defect_dir):
            if defect_type == GOOD:
                samples.append(Sample(path, category, "test", GOOD, 0, None))
                continue
            mask_path = category_dir / "ground_truth" / defect_type / f"{path.stem}{MASK_SUFFIX}"
            if not mask_path.is_file():
                missing_masks.append((path, mask_path))
            samples.append(Sample(path, category, "test", defect_type, 1,
                                  mask_path if mask_path.is_file() else None))
    if missing_masks and require_masks:
        image, mask = missing_masks[0]
        raise DatasetLayoutError(
            f"{len(missing_masks)} defective test image(s) of category {category!r} have no mask, "
            f"e.g. {image} needs {mask} (with image-level labels only, read it with "
            f"masks='optional'; `grad-edge eval` does)"
        )
    return samples
