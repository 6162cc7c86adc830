"""`grad-edge export | verify`: thin shells over `deploy.export` and `deploy.verify`."""

from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np

from deploy.artifact import BACKENDS
from deploy.export import export
from deploy.runner import DEFAULT_BATCH_SIZES
from deploy.verify import Tolerances, verify

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="build a runtime artifact (TensorRT engines, or the "
                                      "metadata for CUDA graph / compile / eager)")
    p.add_argument("--model", required=True, type=Path, help="checkpoint (.pt)")
    p.add_argument("--backend", required=True, choices=BACKENDS)
    p.add_argument("--batch-sizes", nargs="+", type=int, default=list(DEFAULT_BATCH_SIZES),
                   help="static batch sizes to prepare (the runner pads up to the next one)")
    p.add_argument("--frame-shape", nargs=2, type=int, default=[1080, 1920],
                   metavar=("H", "W"), help="size of the camera frames the line sends")
    p.add_argument("--out", required=True, type=Path, help="artifact directory to write")
    p.set_defaults(func=export_command)

    p = sub.add_parser("verify", help="compare an artifact's scores and maps with eager fp32")
    p.add_argument("--model", required=True, type=Path, help="checkpoint (.pt)")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--artifact", type=Path, help="artifact directory from `export`")
    target.add_argument("--backend", choices=BACKENDS, help="a backend built at load instead")
    p.add_argument("--images", nargs="+", required=True, type=Path,
                   help="image files or folders (searched recursively)")
    p.add_argument("--labels", nargs="+", type=int, choices=[0, 1],
                   help="0 good / 1 defective per image, in order: also compares image AUROC")
    p.add_argument("--device", help="cuda or cpu (default: the best available)")
    p.add_argument("--score-rel", type=float, default=Tolerances.score_rel)
    p.add_argument("--map-corr", type=float, default=Tolerances.map_corr)
    p.add_argument("--auroc-abs", type=float, default=Tolerances.auroc_abs)
    p.set_defaults(func=verify_command)


def export_command(args: argparse.Namespace) -> int:
    meta = export(args.model, args.backend, tuple(args.batch_sizes), tuple(args.frame_shape),
                  out_dir=args.out)
    files = ", ".join(meta.engines.values()) or "metadata only"
    print(f"exported {args.backend} artifact to {args.out}  model {meta.model_hash}  "
          f"{meta.precision}  batch sizes {list(meta.batch_sizes)}  frames "
          f"{meta.frame_shape[0]}x{meta.frame_shape[1]}  ({files})")
    return 0


def image_paths(inputs: list[Path]) -> list[Path]:
    paths = []
    for p in inputs:
        if p.is_dir():
            paths += sorted(q for q in p.rglob("*") if q.suffix.lower() in IMAGE_SUFFIXES)
        elif p.is_file():
            paths.append(p)
        else:
            raise FileNotFoundError(f"no image or folder at {p}")
    if not paths:
        raise FileNotFoundError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under "
                                f"{', '.join(map(str, inputs))}")
    return paths


def read_bgr(path: Path) -> np.ndarray:
    """BGR uint8 (H, W, 3), as the line's frames arrive: runners flip to RGB themselves."""
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise ValueError(f"cannot decode image {path}: not an image or an unsupported format")
    return image


def verify_command(args: argparse.Namespace) -> int:
    paths = image_paths(args.images)
    if args.labels is not None and len(args.labels) != len(paths):
        raise ValueError(f"{len(args.labels)} labels for {len(paths)} images: give one per "
                         "image, in the order the images are listed (folders sorted)")
    tolerances = Tolerances(args.score_rel, args.map_corr, args.auroc_abs)
    report = verify(args.model, args.artifact or args.backend, [read_bgr(p) for p in paths],
                    tolerances, labels=args.labels, device=args.device)
    print(report.summary())
    return 0 if report.ok else 1
