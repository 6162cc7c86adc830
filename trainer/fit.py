"""Train, evaluate, predict and re-calibrate: the work behind `grad-edge train|eval|predict|
calibrate`.

Each function takes plain arguments and returns a frozen result, so tests and benchmarks call
them in-process; the command-line shells in `trainer.commands` only parse and print.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import cv2
import numpy as np
import torch

from grad.checkpoint import Calibration, ModelCard, save_checkpoint
from grad.config import GRADConfig
from grad.model import GRAD
from trainer.dataset import IMAGE_SUFFIXES, Sample, load_image, load_mask, scan, split_holdout
from trainer.features import (Features, extract, fit_memory, fit_whitening, head_input,
                              predict_features, tile_groups, to_input)
from trainer.metrics import Metrics, OperatingPoint, evaluate, operating_point
from trainer.train import (MIN_CALIBRATION_IMAGES, EpochLog, TrainConfig, calibrate,
                           calibrate_products, train_head)

log = logging.getLogger(__name__)

# Pixel metrics are computed on one fixed grid, whatever the model's input and fit: each map is
# resized to it, each mask too (nearest), as the field's benchmarks (and the reference figures
# in shared/design/reference_figures.md) do. Models of different input shapes then compare.
EVAL_GRID = (256, 256)


@dataclass(frozen=True)
class FitResult:
    card: ModelCard
    history: list[EpochLog]
    n_train: int
    n_holdout: int
    feature_seconds: float
    train_seconds: float


@torch.inference_mode()
def check_routing(model: GRAD, feats: Features, products: list[str], names: list[str]) -> int:
    """How many tiles of these pictures the unified model's whitening routes to another
    product's statistics than their own (`names` numbers the groups, sorted); logged, with a
    warning naming the products when any are: such pictures are scored against the wrong
    product's normal spread."""
    routed = torch.cat([model.whiten.route(model.pool(f)) for f in feats.feats.split(64)])
    own = tile_groups(products, feats.plans, names)
    wrong = [(names[o], names[r]) for o, r in zip(own.tolist(), routed.tolist()) if o != r]
    if wrong:
        log.warning("whitening routes %d of %d calibration tiles to another product's "
                    "statistics (%s): these products look alike to it; train them as "
                    "separate models", len(wrong), len(own),
                    ", ".join(sorted({f"{a} -> {b}" for a, b in wrong})))
    else:
        log.info("whitening routes all %d calibration tiles to their own product", len(own))
    return len(wrong)


def for_products(cfg: GRADConfig, n_products: int) -> GRADConfig:
    """The config for a model of `n_products` products: a unified whitening model keeps
    statistics per product, and a picture is routed to its product's by its mean feature
    (grad.whitening)."""
    return replace(cfg, whiten_groups=n_products) if cfg.whiten and n_products > 1 else cfg


def fit_parts(model: GRAD, feats: Features, products: list[str], train_cfg: TrainConfig,
              held: Features | None = None, show_progress: bool = False
              ) -> tuple[list[EpochLog], Features]:
    """Fit the model's parts on backbone features of its training pictures (of `products`), in
    the order each needs the one before: whitening, then the head on whitened features, then
    the memory on those, its scale set on `held` (backbone features of held-out normal
    pictures; None: nothing held out, the fit set itself, each picture kept from matching its
    own patches). Returns the training history and `held`'s head input, for calibration."""
    fit_whitening(model, feats, products)
    feats = head_input(model, feats)
    held = feats if held is None else head_input(model, held)
    history = train_head(model, feats.feats, train_cfg, show_progress=show_progress)
    fit_memory(model, feats, held)
    return history, held


# The held-out share by default, where it leaves enough pictures of every product to calibrate.
DEFAULT_HOLDOUT = 0.1


def default_holdout(samples: list[Sample], seed: int) -> float:
    """The share of training pictures held out when none is asked for: DEFAULT_HOLDOUT when
    that holds out at least MIN_CALIBRATION_IMAGES of every product, else 0 (every picture
    trains and the threshold comes from the cross-fit, `cross_fit_scores`).

    Why: a product of 54 pictures (metal_plate) holds out 5 at 10%, and a threshold from 5
    scores is a guess. Over 3 seeds it rejected 0%, 19% and 0% of good parts; the cross-fit's
    threshold, from all 54, rejected none and passed none (`cross_fit_calibration`). It costs 5
    more trainings, which on such a product take seconds each."""
    _, held = split_holdout(samples, DEFAULT_HOLDOUT, seed=seed)
    short = {c: n for c, n in sorted(Counter(s.category for s in held).items())
             if n < MIN_CALIBRATION_IMAGES}
    if not short:
        return DEFAULT_HOLDOUT
    log.info("holding out %d%% would calibrate on fewer than %d pictures (%s): every picture "
             "trains, and the threshold comes from %d more trainings, each scoring the "
             "pictures it did not see (--holdout F holds out a share instead)",
             round(100 * DEFAULT_HOLDOUT), MIN_CALIBRATION_IMAGES,
             ", ".join(f"{c}: {n}" for c, n in short.items()), CROSS_FIT_FOLDS)
    return 0.0


# Calibrating with nothing held out: folds of the training pictures, each scored by a model
# trained on the others (`cross_fit_scores`).
CROSS_FIT_FOLDS = 5


def cross_fit_folds(products: list[str], seed: int, folds: int = CROSS_FIT_FOLDS) -> np.ndarray:
    """Each training picture's fold (N,) int64, drawn within each product, so that every
    fold's model knows every product. A product with one picture cannot be scored by a
    model that knows it: refused."""
    lone = sorted(p for p in set(products) if products.count(p) < 2)
    if lone:
        raise ValueError(f"nothing held out (--holdout 0) calibrates each training picture with "
                         f"a model trained on the others, and {', '.join(lone)} has only one "
                         f"picture: add good pictures of it, or hold some out")
    fold = np.empty(len(products), dtype=np.int64)
    rng = np.random.default_rng(seed)
    for name in sorted(set(products)):
        mine = np.flatnonzero(np.array(products) == name)
        fold[mine] = rng.permutation(len(mine)) % folds
    return fold


@dataclass(frozen=True)
class CrossFit:
    scores: np.ndarray            # (N,) each training picture's score, from a model without it
    memory_scale: float | None    # the fold models' mean lambda; None: no memory in some fold
    global_scale: float | None    # the same for the global memory's lambda_g


def cross_fit_scores(cfg: GRADConfig, feats: Features, products: list[str], fold: np.ndarray,
                     train_cfg: TrainConfig) -> CrossFit:
    """Each training picture's score from a model trained without it: each fold
    (`cross_fit_folds`) scored by whitening, head and memory fitted on the other folds' backbone
    features `feats`, as the final model is; and the fold models' memory scale.

    Why: a model scores the pictures it was fitted on far lower than new ones. Its whitening
    is a covariance estimated from them (with fewer pictures than channels, their own
    distances shrink most), its head learnt to reconstruct them, its memory holds them. On
    metal_plate (54 pictures, `edge`) they scored 10-11 where new good parts score up to ~79:
    a threshold from them rejected every good part. Fold models of 4/5 or 9/10 of the pictures
    gave the same threshold there (94.0, 94.1)."""
    scores = np.empty(len(products), dtype=np.float32)
    scales, global_scales = [], []
    n_folds = int(fold.max()) + 1
    for k in range(n_folds):
        test, rest = np.flatnonzero(fold == k), np.flatnonzero(fold != k)
        log.info("calibration fold %d of %d: a model on %d training pictures scores the "
                 "other %d", k + 1, n_folds, len(rest), len(test))
        torch.manual_seed(train_cfg.seed + 1 + k)
        # Features are cached: the fold's model never runs its backbone, so none is loaded.
        model = GRAD(cfg, pretrained_backbone=False)
        _, held = fit_parts(model, feats.select(rest.tolist()), [products[i] for i in rest],
                            train_cfg, feats.select(test.tolist()))
        scores[test] = predict_features(model, held)[0]
        scales.append(float(model.memory.scale) if model.memory is not None else 0.0)
        global_scales.append(float(model.global_memory.scale)
                             if model.global_memory is not None else 0.0)
    return CrossFit(scores, float(np.mean(scales)) if min(scales) > 0 else None,
                    float(np.mean(global_scales)) if min(global_scales) > 0 else None)


def cross_fit_calibration(model: GRAD, feats: Features, products: list[str], fold: np.ndarray,
                          train_cfg: TrainConfig) -> np.ndarray:
    """The scores that calibrate a model trained on every picture (`cross_fit_scores`), and
    its memory given the folds' scale, so that it scores new parts as the models that
    calibrated it did.

    Why the scale: the final model can only set it on its own pictures, where its head's
    residual is lowest (metal_plate: lambda 0.353, the folds' 0.435-0.438 on pictures they did
    not see). Its scores then sat under the folds', and the threshold over them: 2.8% of
    defects passed at 0% false rejects; with the folds' scale none did, every metric the same.
    """
    cross = cross_fit_scores(model.cfg, feats, products, fold, train_cfg)
    if cross.memory_scale is not None and model.memory is not None:
        log.info("local memory: lambda %.4f, the fold models' mean from pictures they did not "
                 "see (its own pictures gave %.4f: their residual is the lowest)",
                 cross.memory_scale, float(model.memory.scale))
        model.memory.scale.fill_(cross.memory_scale)
    if cross.global_scale is not None and model.global_memory is not None:
        log.info("global memory: lambda %.4f, the fold models' mean (its own pictures gave "
                 "%.4f)", cross.global_scale, float(model.global_memory.scale))
        model.global_memory.scale.fill_(cross.global_scale)
    return cross.scores


def fit(data: str | Path, categories: list[str] | None, model_cfg: GRADConfig,
        train_cfg: TrainConfig, out: str | Path, show_progress: bool = True) -> FitResult:
    """Train one (unified, when several categories are given) model and save its checkpoint,
    with one calibration per category (product) and a default."""
    samples = scan(data, categories, "train")
    cats = sorted({s.category for s in samples})
    share = (default_holdout(samples, train_cfg.seed) if train_cfg.holdout is None
             else train_cfg.holdout)
    train_cfg = replace(train_cfg, holdout=share)     # the card records what was done
    if share > 0:
        fit_set, holdout = split_holdout(samples, share, seed=train_cfg.seed)
        source = "held-out training images"
    else:
        # Every image trains; the threshold comes from models trained on the other folds
        # (`cross_fit_scores`): the pictures the final model saw would score too low.
        fit_set, holdout = samples, samples
        fold = cross_fit_folds([s.category for s in samples], train_cfg.seed)
        source = (f"training images, {int(fold.max()) + 1}-fold cross-fit (re-fit on fresh "
                  f"good parts with `grad-edge calibrate`)")
    log.info("training on %s: %d images, %d calibrate (%s)", ", ".join(cats), len(fit_set),
             len(holdout), source)
    torch.manual_seed(train_cfg.seed)
    model = GRAD(for_products(model_cfg, len(cats)))
    t0 = time.perf_counter()
    feats = extract(model, [s.path for s in fit_set], load_image, desc="features (train)")
    held = (None if holdout is fit_set else
            extract(model, [s.path for s in holdout], load_image, desc="features (holdout)"))
    t1 = time.perf_counter()
    routed = feats if held is None else held     # backbone features: the whitening routes them
    history, held = fit_parts(model, feats, [s.category for s in fit_set], train_cfg, held,
                              show_progress=show_progress)
    t2 = time.perf_counter()
    if model.whiten is not None:
        log.info("whitening fitted on %d tiles (%s; shrinkage %s)", len(feats.feats),
                 "one set per product: " + ", ".join(cats) if len(cats) > 1 else "one set",
                 " ".join(f"{float(v):.3f}" for v in model.whiten.shrinkage))
        if len(cats) > 1:
            check_routing(model, routed, [s.category for s in holdout], cats)
    if holdout is not fit_set:
        scores, _ = predict_features(model, held)
    else:
        log.info("nothing held out: %d more trainings, each without one fold of the "
                 "pictures, to calibrate the threshold", int(fold.max()) + 1)
        scores = cross_fit_calibration(model, feats, [s.category for s in fit_set], fold,
                                       train_cfg)
    default, products = calibrate_products(scores, [s.category for s in holdout],
                                           train_cfg.threshold_sigmas, source)
    meta = {"categories": cats, "data": str(data), "n_train": len(fit_set),
            "train_pictures": sorted(fingerprint(s.path) for s in fit_set),
            "n_holdout": len(holdout) if holdout is not fit_set else 0,
            "train": train_cfg.to_dict(), "train_seconds": round(t2 - t1, 1),
            "final_loss": history[-1].loss if history else None}
    card = save_checkpoint(out, model, default, meta, products)
    log.info("saved %s (model %s): threshold %.4f from %d normal images", out, card.model_hash,
             default.threshold, default.n_images)
    return FitResult(card, history, len(fit_set), len(holdout), t1 - t0, t2 - t1)


@dataclass(frozen=True)
class Predictions:
    scores: np.ndarray         # (N,) image scores
    maps: list[np.ndarray]     # N float32 anomaly maps, each (h, w) at model resolution
    ms_per_image: float        # model forward time (backbone + head + map), batch `batch_size`


@torch.inference_mode()
def predict_images(model: GRAD, images: list[np.ndarray], batch_size: int = 16) -> Predictions:
    """Full forward on RGB uint8 pictures of any sizes (batched by shape, order kept)."""
    model.eval()
    scores = np.empty(len(images), np.float32)
    maps: list[np.ndarray | None] = [None] * len(images)
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, im in enumerate(images):
        by_shape.setdefault(im.shape, []).append(i)
    seconds = 0.0
    for idx in by_shape.values():
        for k in range(0, len(idx), batch_size):
            chunk = idx[k:k + batch_size]
            x, plan = to_input([images[i] for i in chunk], model.cfg)
            t = time.perf_counter()
            out = model(x, plan)
            seconds += time.perf_counter() - t
            for i, score, amap in zip(chunk, out.score.numpy(), out.anomaly_map.numpy()):
                scores[i], maps[i] = score, amap.astype(np.float32)
    return Predictions(scores, maps, 1000 * seconds / max(1, len(images)))


@torch.inference_mode()
def route_images(model: GRAD, images: list[np.ndarray]) -> np.ndarray:
    """RGB uint8 pictures -> each one's product group (N,) in a unified model (`GRAD.route`)."""
    model.eval()
    return np.array([int(model.route(*to_input([im], model.cfg))[0]) for im in images])


def check_products(model: GRAD, card: ModelCard, images: list[np.ndarray], product: str | None,
                   what: str) -> list[str] | None:
    """The product each picture looks like to a unified model (None for one product), with a
    warning when some do not look like `product`: scored on another product's scale, they
    would be judged (or would calibrate) by the wrong yardstick."""
    groups = card.product_groups
    if groups is None:
        return None
    looks = [groups[g] for g in route_images(model, images)]
    other = [name for name in looks if name != product]
    if product is not None and product not in groups:
        # a product calibrated onto the model after training: no statistics of its own
        log.info("%s is not a product the model learned (%s); %s: whitened as %s",
                 product, ", ".join(groups), what, ", ".join(sorted(set(looks))))
    elif product is not None and other:
        log.warning("%d of %d %s look like %s to the unified model, not %s: is this the "
                    "right product (--product) or folder?", len(other), len(looks), what,
                    ", ".join(sorted(set(other))), product)
    return looks


def on_grid(maps: list[np.ndarray], grid: tuple[int, int] = EVAL_GRID) -> np.ndarray:
    """Maps of any shapes -> (N, *grid), bilinear (the evaluation grid, see EVAL_GRID)."""
    out = np.empty((len(maps), *grid), np.float32)
    for i, m in enumerate(maps):
        out[i] = m if m.shape == grid else cv2.resize(m, grid[::-1], interpolation=cv2.INTER_LINEAR)
    return out


@dataclass(frozen=True)
class CategoryEval:
    category: str
    metrics: Metrics
    n_images: int
    ms_per_image: float
    operating: OperatingPoint | None = None   # at the checkpoint's threshold, when known


def ground_truth(samples: list[Sample], grid: tuple[int, int] = EVAL_GRID
                 ) -> tuple[np.ndarray, np.ndarray | None, str]:
    """Image labels (N,), masks (N, *grid) resized like the maps (nearest) or None when some
    defective image has no mask, and the reason in words."""
    labels = np.array([s.label for s in samples])
    unmasked = [s for s in samples if not s.has_mask]
    if unmasked:
        return labels, None, (f"pixel metrics left out: {len(unmasked)} of "
                              f"{int(labels.sum())} defective image(s) have no mask "
                              f"(e.g. {unmasked[0].path.name}); image-level labels only")
    masks = []
    for s in samples:
        shape = cv2.imread(str(s.path), cv2.IMREAD_UNCHANGED).shape[:2]
        m = load_mask(s, shape).astype(np.uint8)
        masks.append(cv2.resize(m, grid[::-1], interpolation=cv2.INTER_NEAREST) > 0)
    return labels, np.stack(masks), ""


def evaluate_model(model: GRAD, data: str | Path, categories: list[str] | None = None,
                   batch_size: int = 16, card: ModelCard | None = None) -> list[CategoryEval]:
    """The field's metrics per category on the test split (pixel metrics on EVAL_GRID; left
    out, with the reason, where defects have image-level labels only) and, with a card, the
    false-reject and miss rates at the category's stored threshold."""
    samples = scan(data, categories, "test", masks="optional")
    results = []
    for cat in sorted({s.category for s in samples}):
        subset = [s for s in samples if s.category == cat]
        log.info("evaluating %s: %d test images", cat, len(subset))
        preds = predict_images(model, [load_image(s.path) for s in subset], batch_size)
        labels, masks, note = ground_truth(subset)
        if note:
            log.warning("%s: %s", cat, note)
        metrics = evaluate(labels, preds.scores, masks,
                           on_grid(preds.maps) if masks is not None else None, note)
        operating = None
        if card is not None:
            cal = card.products.get(cat, card.calibration)
            operating = operating_point(labels, preds.scores, cal.threshold)
        results.append(CategoryEval(cat, metrics, len(subset), preds.ms_per_image, operating))
    return results


def mean_metrics(results: list[CategoryEval]) -> dict[str, float | None]:
    keys = results[0].metrics.as_dict().keys()
    out = {}
    for k in keys:
        values = [r.metrics.as_dict()[k] for r in results]
        out[k] = None if any(v is None for v in values) else float(np.mean(values))
    return out


def fingerprint(path: Path) -> str:
    """A short digest of a file's bytes (16 hex digits): the card keeps those of the pictures
    that trained the model, so that `calibrate` can tell them from new ones."""
    return hashlib.blake2b(Path(path).read_bytes(), digest_size=8).hexdigest()


def list_pictures(folder: str | Path) -> list[Path]:
    """Image files under `folder`, recursively, sorted; an error when there are none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"no folder at {folder}: give a folder of good parts' images")
    found = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")
                   and p.suffix.lower() in IMAGE_SUFFIXES)
    if not found:
        raise ValueError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {folder}")
    return found


def calibration_from_folder(model: GRAD, good: str | Path, sigmas: float,
                            product: str | None = None,
                            card: ModelCard | None = None) -> Calibration:
    """A new calibration from a folder of good parts, without retraining (`calibrate`)."""
    paths = list_pictures(good)
    trained = set((card.meta.get("train_pictures") or []) if card is not None else [])
    if trained:
        # A model scores the pictures it trained on far lower than new ones (metal_plate: 10-11
        # against up to ~79 for new good parts): a threshold from them rejects most good parts.
        seen = {p for p in paths if fingerprint(p) in trained}
        if len(seen) == len(paths):
            raise ValueError(f"all {len(paths)} images in {good} trained this model: it scores "
                             f"them far lower than new good parts, and a threshold from them "
                             f"would reject most of those. Give good parts it has not seen "
                             f"(e.g. from the line: `grad-edge dataset`)")
        if seen:
            log.warning("%d of %d images in %s trained this model (e.g. %s): left out of the "
                        "calibration, which needs good parts it has not seen", len(seen),
                        len(paths), good, sorted(seen)[0].name)
            paths = [p for p in paths if p not in seen]
    log.info("scoring %d good images from %s", len(paths), good)
    images = [load_image(p) for p in paths]
    if card is not None:
        check_products(model, card, images, product, f"good images in {good}")
    preds = predict_images(model, images)
    return calibrate(preds.scores, sigmas, source=f"good images in {good}", name=product or "")
