"""GRAD vs a PatchCore-style nearest-neighbour baseline, same backbone features, one run.

    python benchmarks/accuracy.py --data ../shared/data [--config edge] [--categories ...]

One model per category (as in shared/design/reference_figures.md). Backbone features are
computed once per image and shared by both methods, so the comparison is of the heads. Prints a
table and writes benchmarks/results/accuracy.json. CPU ms/img is batch 1, whole model (backbone
included), median over a few test images, measured in this same run.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from grad.config import CONFIGS, get_config  # noqa: E402
from grad.model import GRAD  # noqa: E402
from patchcore_baseline import NearestNeighbourBaseline  # noqa: E402
from trainer.dataset import list_categories, load_image, scan, split_holdout  # noqa: E402
from trainer.features import extract, to_input  # noqa: E402
from trainer.fit import ground_truth  # noqa: E402
from trainer.metrics import evaluate  # noqa: E402
from trainer.train import TrainConfig, predict_features, train_head  # noqa: E402

log = logging.getLogger("accuracy")
RESULTS = Path(__file__).resolve().parent / "results"


def batch1_ms(fn, images: list[np.ndarray], size: int) -> float:
    xs = [to_input([im], size) for im in images]
    fn(xs[0])  # warm-up
    times = []
    for x in xs:
        t = time.perf_counter()
        fn(x)
        times.append(1000 * (time.perf_counter() - t))
    return statistics.median(times)


def run_category(data: Path, cat: str, cfg_name: str, tcfg: TrainConfig, timing_images: int):
    cfg = get_config(cfg_name)
    torch.manual_seed(tcfg.seed)
    model = GRAD(cfg)
    train = scan(data, [cat], "train")
    fit_set, _ = split_holdout(train, tcfg.holdout, seed=tcfg.seed)
    test = scan(data, [cat], "test")
    t = time.perf_counter()
    f_fit = extract(model, [s.path for s in fit_set], load_image, desc=f"{cat} train features")
    f_test = extract(model, [s.path for s in test], load_image, desc=f"{cat} test features")
    feature_s = time.perf_counter() - t
    labels, masks = ground_truth(test, cfg.image_size)
    rows = {}

    log.info("%s: training GRAD (%s) on %d images", cat, cfg_name, len(fit_set))
    t = time.perf_counter()
    history = train_head(model, f_fit, tcfg)
    grad_train_s = time.perf_counter() - t
    out = predict_features(model, f_test)
    scores, maps = out.score.numpy(), out.anomaly_map.numpy()
    m = evaluate(labels, scores, masks, maps)
    timing = [load_image(s.path) for s in test[:timing_images]]
    rows["GRAD"] = {**m.as_dict(), "train_s": grad_train_s + feature_s,
                    "ms_per_img": batch1_ms(lambda x: model(x), timing, cfg.image_size),
                    "final_loss": history[-1].loss}

    log.info("%s: fitting the nearest-neighbour baseline", cat)
    base = NearestNeighbourBaseline(cfg.image_size, cfg.blur_sigma)
    t = time.perf_counter()
    base.fit(f_fit)
    base_train_s = time.perf_counter() - t
    b_scores, b_maps = base.predict(f_test)
    m = evaluate(labels, b_scores.numpy(), masks, b_maps.numpy())
    rows["NN baseline"] = {**m.as_dict(), "train_s": base_train_s + feature_s,
                           "ms_per_img": batch1_ms(lambda x: base.predict(model.backbone(x)),
                                                   timing, cfg.image_size),
                           "bank_size": int(base.bank.shape[0])}
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    ap.add_argument("--config", default="edge", choices=sorted(CONFIGS))
    ap.add_argument("--categories", nargs="*")
    ap.add_argument("--epochs-abnormal", type=int, default=TrainConfig.epochs_abnormal)
    ap.add_argument("--epochs-normal", type=int, default=TrainConfig.epochs_normal)
    ap.add_argument("--timing-images", type=int, default=10)
    ap.add_argument("--out", type=Path, default=RESULTS / "accuracy.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    tcfg = TrainConfig(epochs_abnormal=args.epochs_abnormal, epochs_normal=args.epochs_normal)
    cats = args.categories or list_categories(args.data)
    start = time.perf_counter()
    results = {cat: run_category(args.data, cat, args.config, tcfg, args.timing_images)
               for cat in cats}
    total_s = time.perf_counter() - start

    keys = ["image_auroc", "pixel_auroc", "aupro", "f1_max"]
    methods = list(next(iter(results.values())))
    mean = {meth: {k: float(np.mean([results[c][meth][k] for c in cats])) for k in keys}
            for meth in methods}
    head = f"{'category':<15}{'method':<13}{'I-AUROC':>8}{'P-AUROC':>8}{'AUPRO':>7}{'F1-max':>7}" \
           f"{'train s':>9}{'ms/img':>8}"
    print(head)
    print("-" * len(head))
    for cat in cats:
        for meth in methods:
            r = results[cat][meth]
            print(f"{cat:<15}{meth:<13}{r['image_auroc']:>8.3f}{r['pixel_auroc']:>8.3f}"
                  f"{r['aupro']:>7.3f}{r['f1_max']:>7.3f}{r['train_s']:>9.0f}{r['ms_per_img']:>8.0f}")
    for meth in methods:
        r = mean[meth]
        print(f"{'mean':<15}{meth:<13}{r['image_auroc']:>8.3f}{r['pixel_auroc']:>8.3f}"
              f"{r['aupro']:>7.3f}{r['f1_max']:>7.3f}")
    print(f"total {total_s / 60:.1f} min")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "command": " ".join(["python"] + sys.argv),
        "config": args.config, "model_config": get_config(args.config).to_dict(),
        "train_config": tcfg.to_dict(), "per_category": results, "mean": mean,
        "total_minutes": total_s / 60,
        "machine": {"cpu_threads": torch.get_num_threads(), "platform": platform.platform(),
                    "torch": torch.__version__},
        "notes": "one model per category; 256x256 input, aspect ratio not kept; metrics at model "
                 "resolution; AUPRO integrated to FPR 0.3; ms/img batch 1 on this CPU",
    }, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
