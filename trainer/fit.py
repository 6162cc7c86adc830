"""Train, evaluate and predict: the work behind `grad-edge train|eval|predict`.

Each function takes plain arguments and returns a frozen result, so tests and benchmarks call
them in-process; the command-line shells in `trainer.commands` only parse and print.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

from grad.checkpoint import ModelCard, save_checkpoint
from grad.config import GRADConfig
from grad.model import GRAD
from trainer.dataset import Sample, load_image, load_mask, scan, split_holdout
from trainer.features import extract, to_input
from trainer.metrics import Metrics, evaluate
from trainer.train import EpochLog, TrainConfig, calibrate, predict_features, train_head

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FitResult:
    card: ModelCard
    history: list[EpochLog]
    n_train: int
    n_holdout: int
    feature_seconds: float
    train_seconds: float


def fit(data: str | Path, categories: list[str] | None, model_cfg: GRADConfig,
        train_cfg: TrainConfig, out: str | Path, show_progress: bool = True) -> FitResult:
    """Train one (unified, when several categories are given) model and save its checkpoint."""
    samples = scan(data, categories, "train")
    fit_set, holdout = split_holdout(samples, train_cfg.holdout, seed=train_cfg.seed)
    cats = sorted({s.category for s in samples})
    log.info("training on %s: %d images, %d held back for calibration", ", ".join(cats),
             len(fit_set), len(holdout))
    torch.manual_seed(train_cfg.seed)
    model = GRAD(model_cfg)
    t0 = time.perf_counter()
    feats = extract(model, [s.path for s in fit_set], load_image, desc="features (train)")
    held = extract(model, [s.path for s in holdout], load_image, desc="features (holdout)")
    t1 = time.perf_counter()
    history = train_head(model, feats, train_cfg, show_progress=show_progress)
    t2 = time.perf_counter()
    scores = predict_features(model, held).score.numpy()
    calibration = calibrate(scores, train_cfg.threshold_sigmas, [s.category for s in holdout])
    meta = {"categories": cats, "data": str(data), "n_train": len(fit_set),
            "n_holdout": len(holdout), "train": train_cfg.to_dict(),
            "train_seconds": round(t2 - t1, 1), "final_loss": history[-1].loss if history else None}
    card = save_checkpoint(out, model, calibration, meta)
    log.info("saved %s (model %s): threshold %.4f from %d held-out normal images", out,
             card.model_hash, calibration.threshold, calibration.n_images)
    return FitResult(card, history, len(fit_set), len(holdout), t1 - t0, t2 - t1)


@dataclass(frozen=True)
class Predictions:
    scores: np.ndarray      # (N,) image scores
    maps: np.ndarray        # (N, S, S) float32 anomaly maps at model resolution
    ms_per_image: float     # model forward time (backbone + head + map), batch `batch_size`


@torch.inference_mode()
def predict_images(model: GRAD, images: list[np.ndarray], batch_size: int = 16) -> Predictions:
    """Full forward on RGB uint8 images of any sizes."""
    model.eval()
    scores, maps, seconds = [], [], 0.0
    for i in range(0, len(images), batch_size):
        x = to_input(images[i:i + batch_size], model.cfg.image_size)
        t = time.perf_counter()
        out = model(x)
        seconds += time.perf_counter() - t
        scores.append(out.score)
        maps.append(out.anomaly_map)
    return Predictions(torch.cat(scores).numpy(), torch.cat(maps).numpy().astype(np.float32),
                       1000 * seconds / max(1, len(images)))


@dataclass(frozen=True)
class CategoryEval:
    category: str
    metrics: Metrics
    n_images: int
    ms_per_image: float


def ground_truth(samples: list[Sample], size: int) -> tuple[np.ndarray, np.ndarray]:
    """Image labels (N,) and masks (N, size, size), resized like the images (nearest)."""
    labels = np.array([s.label for s in samples])
    masks = []
    for s in samples:
        shape = cv2.imread(str(s.path), cv2.IMREAD_UNCHANGED).shape[:2]
        m = load_mask(s, shape).astype(np.uint8)
        masks.append(cv2.resize(m, (size, size), interpolation=cv2.INTER_NEAREST) > 0)
    return labels, np.stack(masks)


def evaluate_model(model: GRAD, data: str | Path, categories: list[str] | None = None,
                   batch_size: int = 16) -> list[CategoryEval]:
    """The field's metrics per category on the test split, at model resolution."""
    samples = scan(data, categories, "test")
    results = []
    for cat in sorted({s.category for s in samples}):
        subset = [s for s in samples if s.category == cat]
        log.info("evaluating %s: %d test images", cat, len(subset))
        preds = predict_images(model, [load_image(s.path) for s in subset], batch_size)
        labels, masks = ground_truth(subset, model.cfg.image_size)
        results.append(CategoryEval(cat, evaluate(labels, preds.scores, masks, preds.maps),
                                    len(subset), preds.ms_per_image))
    return results


def mean_metrics(results: list[CategoryEval]) -> dict[str, float]:
    keys = results[0].metrics.as_dict().keys()
    return {k: float(np.mean([r.metrics.as_dict()[k] for r in results])) for k in keys}


def overlay(image_rgb: np.ndarray, amap: np.ndarray, vmin: float, vmax: float) -> np.ndarray:
    """Heatmap (JET) of the map, resized to the image, blended 50/50: BGR uint8 for cv2.imwrite.

    The colour scale is fixed by the caller (normal mean .. threshold-ish), not per image, so a
    normal part looks blue and a defect red, instead of every image being stretched to red.
    """
    h, w = image_rgb.shape[:2]
    m = cv2.resize(amap, (w, h), interpolation=cv2.INTER_LINEAR)
    m = np.clip((m - vmin) / max(vmax - vmin, 1e-9), 0, 1)
    heat = cv2.applyColorMap((m * 255).astype(np.uint8), cv2.COLORMAP_JET)
    return cv2.addWeighted(cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR), 0.5, heat, 0.5, 0)
