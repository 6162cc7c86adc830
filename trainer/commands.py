"""`grad-edge train | eval | predict | calibrate`: thin shells over `trainer.fit`."""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

import cv2

from grad.checkpoint import load_checkpoint, recalibrate
from grad.config import CONFIGS, FITS, get_config
from trainer.dataset import load_image
from trainer.fit import (calibration_from_folder, check_products, evaluate_model, fit, mean_metrics,
                         predict_images)
from trainer.overlay import annotate
from trainer.train import TrainConfig

log = logging.getLogger(__name__)


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a GRAD model on normal images (MVTec AD layout)")
    p.add_argument("--data", required=True, type=Path, help="dataset root (CATEGORY/train/good)")
    p.add_argument("--category", action="append", dest="categories",
                   help="category to train on; repeat for a unified model (default: all)")
    p.add_argument("--config", default="edge", choices=sorted(CONFIGS), help="model size")
    p.add_argument("--backbone", choices=["lite0", "lite2"], help="override the backbone")
    p.add_argument("--image-size", type=int, nargs="+", metavar="S",
                   help="model input: S for S x S, or H W (multiples of 16)")
    p.add_argument("--fit", choices=FITS,
                   help="how pictures of another shape become model input: stretch (aspect "
                        "not kept) or tile (aspect kept, overlapping tiles along the long side)")
    p.add_argument("--local-memory", type=float, metavar="W",
                   help="weight in [0, 1) of the local memory's distance in the map (nearest "
                        "normal training patch within one feature cell; grad.memory); 0: off")
    p.add_argument("--global-memory", type=float, metavar="W",
                   help="weight in [0, 1) of the global memory's distance in the map (nearest of "
                        "a share of all normal training patches, PatchCore's search on raw "
                        "features; grad.memory.GlobalMemory): sharper maps on some products "
                        "(metal_plate: 0.8), image AUROC lost on others; 0: off (the default)")
    p.add_argument("--epochs-abnormal", type=int, default=TrainConfig.epochs_abnormal)
    p.add_argument("--epochs-normal", type=int, default=TrainConfig.epochs_normal)
    p.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    p.add_argument("--holdout", type=float, default=TrainConfig.holdout,
                   help="share of normal training images kept back to calibrate the threshold "
                        "(0: train on all; the threshold then comes from 5 more trainings, each "
                        "scoring the fifth of the images it did not see; re-fit it on fresh good "
                        "parts with `calibrate`). Default: 0.1 where that keeps back at least "
                        "20 images of every product, else 0")
    p.add_argument("--threshold-sigmas", type=float, default=TrainConfig.threshold_sigmas)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, type=Path, help="checkpoint file to write (.pt)")
    p.set_defaults(func=train)

    p = sub.add_parser("eval", help="image/pixel AUROC, AUPRO, F1-max and the threshold's "
                                    "false-reject and miss rates on the test split")
    p.add_argument("--model", required=True, type=Path)
    p.add_argument("--data", required=True, type=Path)
    p.add_argument("--category", action="append", dest="categories")
    p.add_argument("--json", type=Path, help="where to write the metrics (default: beside model)")
    p.set_defaults(func=evaluate)

    p = sub.add_parser("predict", help="score images and write annotated heatmap overlays")
    p.add_argument("--model", required=True, type=Path)
    p.add_argument("images", nargs="+", type=Path)
    p.add_argument("--product", help="whose threshold to judge by (unified models)")
    p.add_argument("--out", type=Path, default=Path("predictions"),
                   help="folder for overlays; the inputs' folders are mirrored under it")
    p.set_defaults(func=predict)

    p = sub.add_parser("calibrate", help="re-fit a model's threshold from a folder of good "
                                         "parts, without retraining")
    p.add_argument("--model", required=True, type=Path, help="checkpoint to update in place")
    p.add_argument("--good", required=True, type=Path, help="folder of good parts' images")
    p.add_argument("--product", help="the product these parts are (a unified model keeps one "
                                     "calibration per product); default: the model's default")
    p.add_argument("--threshold-sigmas", type=float, default=TrainConfig.threshold_sigmas)
    p.set_defaults(func=calibrate)


def train(args: argparse.Namespace) -> int:
    overrides = {"backbone": args.backbone} if args.backbone else {}
    if args.local_memory is not None:
        overrides["local_memory"] = args.local_memory
    if args.global_memory is not None:
        overrides["global_memory"] = args.global_memory
    if args.image_size:
        if len(args.image_size) > 2:
            raise ValueError(f"--image-size takes S or H W, got {args.image_size}")
        overrides["image_size"] = (args.image_size[0] if len(args.image_size) == 1
                                   else tuple(args.image_size))
    if args.fit:
        overrides["fit"] = args.fit
    tcfg = TrainConfig(epochs_abnormal=args.epochs_abnormal, epochs_normal=args.epochs_normal,
                       batch_size=args.batch_size, holdout=args.holdout,
                       threshold_sigmas=args.threshold_sigmas, seed=args.seed)
    result = fit(args.data, args.categories, get_config(args.config, **overrides), tcfg, args.out)
    cal = result.card.calibration
    print(f"saved {args.out}  model {result.card.model_hash}  trained on {result.n_train} images "
          f"in {result.train_seconds:.0f}s  threshold {cal.threshold:.4f} "
          f"(normal mean {cal.mean:.4f}, std {cal.std:.4f}, n={cal.n_images})")
    if len(result.card.products) > 1:
        for name, c in result.card.products.items():
            print(f"  product {name}: threshold {c.threshold:.4f} (n={c.n_images})")
    return 0


def _fmt(v: float | None, width: int) -> str:
    return f"{'-':>{width}}" if v is None else f"{v:>{width}.4f}"


def evaluate(args: argparse.Namespace) -> int:
    model, card = load_checkpoint(args.model)
    results = evaluate_model(model, args.data, args.categories, card=card)
    rows = {}
    for r in results:
        rows[r.category] = {**r.metrics.as_dict(), "n_images": r.n_images,
                            "ms_per_image": r.ms_per_image,
                            "pixel_metrics_note": r.metrics.pixel_note or None,
                            "operating_point": r.operating.as_dict() if r.operating else None}
    mean = mean_metrics(results)
    print(f"{'category':<16}{'I-AUROC':>9}{'P-AUROC':>9}{'AUPRO':>8}{'F1-max':>8}"
          f"{'thr':>9}{'FRR':>7}{'miss':>7}{'thr@1%':>9}{'miss@1%':>8}"
          f"{'good max':>9}{'bad min':>9}")
    for r in results:
        m, o = r.metrics, r.operating
        print(f"{r.category:<16}{m.image_auroc:>9.4f}{_fmt(m.pixel_auroc, 9)}{_fmt(m.aupro, 8)}"
              f"{m.f1_max:>8.4f}{o.threshold:>9.3g}{o.false_reject_rate:>7.3f}"
              f"{o.miss_rate:>7.3f}{o.threshold_at_budget:>9.3g}{o.miss_rate_at_budget:>8.3f}"
              f"{o.highest_good:>9.3g}{o.lowest_defect:>9.3g}")
        if m.pixel_note:
            print(f"  {r.category}: {m.pixel_note}")
    print(f"{'mean':<16}{mean['image_auroc']:>9.4f}{_fmt(mean['pixel_auroc'], 9)}"
          f"{_fmt(mean['aupro'], 8)}{mean['f1_max']:>8.4f}")
    path = args.json or args.model.with_suffix(".eval.json")
    path.write_text(json.dumps({"model": str(args.model), "model_hash": card.model_hash,
                                "data": str(args.data), "categories": rows, "mean": mean},
                               indent=2))
    print(f"wrote {path}")
    return 0


def output_paths(inputs: list[Path], out: Path) -> list[Path]:
    """One overlay per input, mirroring the inputs' folders (below their common folder) under
    `out`, so test/crack/001.png and test/good/001.png never overwrite each other."""
    parents = [p.resolve().parent for p in inputs]
    root = Path(os.path.commonpath(parents))
    return [out / p.resolve().parent.relative_to(root) / f"{p.stem}_heatmap.png" for p in inputs]


def predict(args: argparse.Namespace) -> int:
    model, card = load_checkpoint(args.model)
    cal = card.calibration_for(args.product)
    outputs = output_paths(args.images, args.out)
    # One picture at a time: a folder of full-resolution photos need not fit in memory.
    for path, heat in zip(args.images, outputs):
        image = load_image(path)
        preds = predict_images(model, [image])
        # a unified model: which product the picture looks like (warned when not --product);
        # one more backbone pass per picture, and only for a unified model
        looks = check_products(model, card, [image], args.product, str(path))
        score, amap = float(preds.scores[0]), preds.maps[0]
        heat.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(heat), annotate(image, amap, score, cal.threshold, cal.mean,
                                        max(cal.threshold, cal.mean) * 1.5))
        verdict = "DEFECT" if score >= cal.threshold else "OK"
        print(json.dumps({"image": str(path), "score": score,
                          "calibrated": cal.calibrate(score), "threshold": cal.threshold,
                          "product": args.product, "verdict": verdict, "heatmap": str(heat),
                          **({"looks_like": looks[0]} if looks else {})}))
    return 0


def calibrate(args: argparse.Namespace) -> int:
    model, card = load_checkpoint(args.model)
    if args.product is None and len(card.products) > 1:
        log.warning("%s serves %d products (%s); without --product this re-fits only the "
                    "default threshold", args.model, len(card.products),
                    ", ".join(sorted(card.products)))
    before = card.calibration_for(args.product) if (args.product is None or
                                                    args.product in card.products) else None
    cal = calibration_from_folder(model, args.good, args.threshold_sigmas, args.product, card)
    new = recalibrate(args.model, cal, args.product,
                      record={"good": str(args.good), "previous_model_hash": card.model_hash})
    was = f"{before.threshold:.4f}" if before else "none"
    print(f"calibrated {args.model}{f' for {args.product}' if args.product else ''}: "
          f"threshold {cal.threshold:.4f} (was {was}) from {cal.n_images} good images "
          f"(mean {cal.mean:.4f}, std {cal.std:.4f}); model {new.model_hash}")
    return 0
