"""`grad-edge train | eval | predict`: thin shells over `trainer.fit`."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import cv2

from grad.checkpoint import load_checkpoint
from grad.config import CONFIGS, get_config
from trainer.dataset import load_image
from trainer.fit import evaluate_model, fit, mean_metrics, overlay, predict_images
from trainer.train import TrainConfig

log = logging.getLogger(__name__)


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a GRAD model on normal images (MVTec AD layout)")
    p.add_argument("--data", required=True, type=Path, help="dataset root (CATEGORY/train/good)")
    p.add_argument("--category", action="append", dest="categories",
                   help="category to train on; repeat for a unified model (default: all)")
    p.add_argument("--config", default="edge", choices=sorted(CONFIGS), help="model size")
    p.add_argument("--backbone", choices=["lite0", "lite2"], help="override the backbone")
    p.add_argument("--epochs-abnormal", type=int, default=TrainConfig.epochs_abnormal)
    p.add_argument("--epochs-normal", type=int, default=TrainConfig.epochs_normal)
    p.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    p.add_argument("--holdout", type=float, default=TrainConfig.holdout,
                   help="share of normal training images kept back to calibrate the threshold")
    p.add_argument("--threshold-sigmas", type=float, default=TrainConfig.threshold_sigmas)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, type=Path, help="checkpoint file to write (.pt)")
    p.set_defaults(func=train)

    p = sub.add_parser("eval", help="image/pixel AUROC, AUPRO and F1-max on the test split")
    p.add_argument("--model", required=True, type=Path)
    p.add_argument("--data", required=True, type=Path)
    p.add_argument("--category", action="append", dest="categories")
    p.add_argument("--json", type=Path, help="where to write the metrics (default: beside model)")
    p.set_defaults(func=evaluate)

    p = sub.add_parser("predict", help="score images and write heatmap overlays")
    p.add_argument("--model", required=True, type=Path)
    p.add_argument("images", nargs="+", type=Path)
    p.add_argument("--out", type=Path, default=Path("predictions"), help="folder for overlays")
    p.set_defaults(func=predict)


def train(args: argparse.Namespace) -> int:
    overrides = {"backbone": args.backbone} if args.backbone else {}
    tcfg = TrainConfig(epochs_abnormal=args.epochs_abnormal, epochs_normal=args.epochs_normal,
                       batch_size=args.batch_size, holdout=args.holdout,
                       threshold_sigmas=args.threshold_sigmas, seed=args.seed)
    result = fit(args.data, args.categories, get_config(args.config, **overrides), tcfg, args.out)
    cal = result.card.calibration
    print(f"saved {args.out}  model {result.card.model_hash}  trained on {result.n_train} images "
          f"in {result.train_seconds:.0f}s  threshold {cal.threshold:.4f} "
          f"(normal mean {cal.mean:.4f}, std {cal.std:.4f}, n={cal.n_images})")
    return 0


def evaluate(args: argparse.Namespace) -> int:
    model, card = load_checkpoint(args.model)
    results = evaluate_model(model, args.data, args.categories)
    rows = {r.category: {**r.metrics.as_dict(), "n_images": r.n_images,
                         "ms_per_image": r.ms_per_image} for r in results}
    mean = mean_metrics(results)
    header = f"{'category':<16}{'I-AUROC':>9}{'P-AUROC':>9}{'AUPRO':>8}{'F1-max':>8}"
    print(header)
    for r in results:
        m = r.metrics
        print(f"{r.category:<16}{m.image_auroc:>9.4f}{m.pixel_auroc:>9.4f}{m.aupro:>8.4f}"
              f"{m.f1_max:>8.4f}")
    print(f"{'mean':<16}{mean['image_auroc']:>9.4f}{mean['pixel_auroc']:>9.4f}"
          f"{mean['aupro']:>8.4f}{mean['f1_max']:>8.4f}")
    path = args.json or args.model.with_suffix(".eval.json")
    path.write_text(json.dumps({"model": str(args.model), "model_hash": card.model_hash,
                                "data": str(args.data), "categories": rows, "mean": mean},
                               indent=2))
    print(f"wrote {path}")
    return 0


def predict(args: argparse.Namespace) -> int:
    model, card = load_checkpoint(args.model)
    images = [load_image(p) for p in args.images]
    preds = predict_images(model, images)
    cal = card.calibration
    args.out.mkdir(parents=True, exist_ok=True)
    for path, image, score, amap in zip(args.images, images, preds.scores, preds.maps):
        heat = args.out / f"{path.stem}_heatmap.png"
        cv2.imwrite(str(heat), overlay(image, amap, cal.mean, max(cal.threshold, cal.mean) * 1.5))
        verdict = "DEFECT" if score >= cal.threshold else "OK"
        print(json.dumps({"image": str(path), "score": float(score),
                          "calibrated": cal.calibrate(float(score)), "threshold": cal.threshold,
                          "verdict": verdict, "heatmap": str(heat)}))
    return 0
