"""GRAD against a faithful PatchCore on the same frozen backbone, several seeds, one run.

    python benchmarks/accuracy.py --data ../shared/data            # the full run
    python benchmarks/accuracy.py --data ../shared/data --quick    # CI-sized: minutes

Rows per category (each the mean ± std over --seeds):
  GRAD <config>          one model per category, trained and calibrated as `grad-edge train`
                         does: on 90% of train/good, the threshold from the other 10%, or
                         where that is under 20 pictures (metal_plate) on all of it, the
                         threshold from a 5-fold cross-fit (trainer.fit); with
                         --fits stretch tile also the aspect-kept tiled input on long parts
  PatchCore (faithful)   all training images, 3x3 locally aware patches, greedy coreset,
                         nearest-neighbour distance, Eq. 7 re-weighting (patchcore_baseline.py)
  GRAD unified           one model over all the categories, one threshold per product
  GRAD paper             the paper's head (L 9 at 2C), one seed, when --paper is given
Metrics: image AUROC, pixel AUROC and AUPRO (FPR <= 0.3) on a 256 x 256 grid (as the reference
figures), F1-max; at the stored threshold the false-reject rate on test/good and the miss rate
on defects, and the threshold that keeps false rejects <= 1% with its miss rate. ms/image is
batch 1 on this CPU, whole model (backbone included), median over a few test pictures, for GRAD
and PatchCore in this same run. Backbone features are computed once per (category, input) and
cached (feature_cache.py), so every seed and every head reads the same numbers.
Prints the table; writes benchmarks/results/accuracy.json after every row (a long run that is
stopped keeps what it measured).
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from accuracy_report import (BASELINE, METRICS, PEERS, merge, print_table,  # noqa: E402
                             rows_meeting_peers, summary, verdicts, with_speed)
from feature_cache import Stages, stages_for  # noqa: E402
from patchcore_baseline import PatchCore, locally_aware  # noqa: E402

from deploy.runner import EagerRunner  # noqa: E402
from grad.backbone import LiteFeatures  # noqa: E402
from grad.config import CONFIGS, GRADConfig, get_config  # noqa: E402
from grad.model import GRAD  # noqa: E402
from trainer.dataset import Sample, list_categories, load_image, scan, split_holdout  # noqa: E402
from trainer.features import head_input, predict_features, to_input  # noqa: E402
from trainer.fit import (EVAL_GRID, cross_fit_calibration, cross_fit_folds,  # noqa: E402
                         default_holdout, fit_parts, for_products, ground_truth, on_grid)
from trainer.metrics import evaluate, operating_point  # noqa: E402
from trainer.train import TrainConfig, calibrate, calibrate_products  # noqa: E402

log = logging.getLogger("accuracy")
RESULTS = Path(__file__).resolve().parent / "results"
OPERATING = ("false_reject_rate", "miss_rate", "threshold_at_budget", "miss_rate_at_budget",
             "highest_good", "lowest_defect")


def stored_rule(sigmas: float):
    """The stored rule with another k: what `--threshold-sigmas k` on `grad-edge train` or
    `calibrate` would store (normal scores over 6 std left out of mean and std, as
    trainer.train.calibrate does), not mean + k std of every score, which sits higher
    wherever a calibration set holds such a score (the 320 cross-fit: 4 of 762)."""
    return lambda s: calibrate(s, sigmas, "the normal scores",
                               name=f"the {sigmas:g} std rule").threshold


# Other threshold rules on the same normal scores (trainer.train.calibrate's is mean + 3 std),
# each row's false rejects and misses at them beside the stored threshold's: the evidence for
# keeping that rule. Keys go into the rows as false_reject_rate[NAME] and miss_rate[NAME].
THRESHOLD_RULES = {
    "3.5 std": stored_rule(3.5),
    "4 std": stored_rule(4.0),
    # scores are distances, skewed right: a Gaussian on their logs has the longer upper tail
    "log 3 std": lambda s: float(np.exp(np.log(np.maximum(s, 1e-12)).mean()
                                        + 3 * np.log(np.maximum(s, 1e-12)).std())),
    "max": lambda s: s.max(),
}
# The reference figures ran PatchCore at coreset 0.1, except magnetic_tile (0.0025: the greedy
# coreset costs ratio x N^2 and 0.1 takes hours on a 2-core CPU); the same here.
CORESET = {"magnetic_tile": 0.0025}


class Data:
    """One category's pictures, labels, masks and cached stage features per input config."""

    def __init__(self, root: Path, category: str, limit: int | None, backbone: LiteFeatures):
        self.category = category
        self.train = scan(root, [category], "train")
        self.test = scan(root, [category], "test", masks="optional")
        if limit:   # --quick: a few of each, good and defective alike
            rng = np.random.default_rng(0)
            pick = rng.choice(len(self.train), min(limit, len(self.train)), replace=False)
            self.train = [self.train[i] for i in sorted(pick)]
            good = [s for s in self.test if s.label == 0][:limit // 2]
            bad = [s for s in self.test if s.label == 1][:limit // 2]
            self.test = good + bad
        self.labels, self.masks, note = ground_truth(self.test, EVAL_GRID)
        if note:
            log.warning("%s: %s", category, note)
        self.backbone = backbone
        self.quick = bool(limit)

    def stages(self, split: str, cfg: GRADConfig) -> Stages:
        samples = self.train if split == "train" else self.test
        name = f"{self.category}{'-quick' if self.quick else ''}"
        return stages_for(samples, name, split, cfg, self.backbone)


def indices(samples: list[Sample], keep: list[Sample]) -> list[int]:
    where = {s.path: i for i, s in enumerate(samples)}
    return [where[s.path] for s in keep]


def as_runner(model: GRAD):
    """fn(input, plan) running `model` as the eager runner does on a CPU (deploy.runner: the
    backbone channels_last and folded, the whitening factor in bf16 where the CPU has it), so
    the row's ms is what the line pays."""
    fast = EagerRunner(model.eval()).inference.model

    def run(x: torch.Tensor, plan):
        return fast(x.contiguous(memory_format=torch.channels_last), plan)
    return run


def batch1_ms(fn, pictures: list[np.ndarray], cfg: GRADConfig) -> float:
    """Median ms of fn(input, plan) at batch 1, after one warm-up. Measured inside a long run,
    so it is only as quiet as the machine was; benchmarks/cpu_speed.py times the variants
    interleaved and is the figure to quote."""
    inputs = [to_input([p], cfg) for p in pictures]
    with torch.inference_mode():
        fn(*inputs[0])
        times = []
        for x, plan in inputs:
            t = time.perf_counter()
            fn(x, plan)
            times.append(1000 * (time.perf_counter() - t))
    return statistics.median(times)


def scored(data: Data, scores: np.ndarray, maps: list[np.ndarray]) -> dict:
    m = evaluate(data.labels, scores, data.masks,
                 on_grid(maps) if data.masks is not None else None, "no masks")
    return m.as_dict()


@dataclass(frozen=True)
class Trained:
    model: GRAD
    products: dict          # product -> Calibration (trainer.train), the stored thresholds
    train_s: float          # the final model's training
    normal: dict            # product -> the normal scores its threshold came from, (n,)


def train_grad(cfg: GRADConfig, tcfg: TrainConfig, parts: list[tuple[Data, Stages]]
               ) -> Trained:
    """A GRAD trained and calibrated per product as `grad-edge train` does (trainer.fit): on
    the fit share of every part's training pictures, calibrated on their held-out share; or,
    where the default holds out too few pictures to calibrate (or --holdout 0), on all of
    them, calibrated by the cross-fit. The seconds are the final model's training."""
    samples = [s for data, _ in parts for s in data.train]
    share = default_holdout(samples, tcfg.seed) if tcfg.holdout is None else tcfg.holdout
    fit_stages, held_parts, held_names, fit_names = [], [], [], []
    for data, stages in parts:
        fit_set, held = (split_holdout(data.train, share, seed=tcfg.seed) if share > 0
                         else (data.train, []))
        fit_stages.append(stages.select(indices(data.train, fit_set)))
        held_parts.append(stages.select(indices(data.train, held)))
        held_names += [data.category] * len(held)
        fit_names += [data.category] * len(fit_set)
    torch.manual_seed(tcfg.seed)
    model = GRAD(for_products(cfg, len(parts)))
    t = time.perf_counter()
    feats = Stages.join(fit_stages).features()
    _, held = fit_parts(model, feats, fit_names, tcfg,
                        Stages.join(held_parts).features() if held_names else None)
    train_s = time.perf_counter() - t
    if held_names:
        scores, _ = predict_features(model, held)
        source = "held-out training images"
    else:
        fold = cross_fit_folds(fit_names, tcfg.seed)
        scores = cross_fit_calibration(model, feats, fit_names, fold, tcfg)
        held_names = fit_names
        source = "training images, cross-fit"
    _, products = calibrate_products(scores, held_names, tcfg.threshold_sigmas, source)
    names = np.asarray(held_names)
    return Trained(model, products, train_s,
                   {p: np.asarray(scores)[names == p] for p in products})


def test_grad(trained: Trained, data: Data, stages: Stages, product: str) -> dict:
    model, threshold = trained.model, trained.products[product].threshold
    feats = stages.features()
    scores, maps = predict_features(model, head_input(model, feats))
    op = operating_point(data.labels, scores, threshold)
    row = {**scored(data, scores, maps), **{k: getattr(op, k) for k in OPERATING},
           "threshold": threshold}
    for name, rule in THRESHOLD_RULES.items():
        other = operating_point(data.labels, scores, rule(trained.normal[product]))
        row[f"false_reject_rate[{name}]"] = other.false_reject_rate
        row[f"miss_rate[{name}]"] = other.miss_rate
    if model.whiten is not None:
        # What a CPU line with native bf16 runs (deploy.inference.cpu_has_bf16): the same
        # model with its whitening factor stored in bfloat16. Its metrics beside float32's.
        # (The memories' banks, where there are some, too: the runner stores them alike.)
        factor = model.whiten.factor.data
        model.whiten.factor.data = factor.bfloat16()
        banks = [m for m in (model.memory, model.global_memory) if m is not None]
        kept = [m.bank for m in banks]
        for m in banks:
            m.bank = m.bank.bfloat16()
        try:
            s16, m16 = predict_features(model, head_input(model, feats))
        finally:
            model.whiten.factor.data = factor
            for m, bank in zip(banks, kept):
                m.bank = bank
        row.update({f"bf16_{k}": v for k, v in scored(data, s16, m16).items() if k in METRICS})
        row["bf16_score_rel_max"] = float(np.max(np.abs(s16 - scores) / np.abs(scores)))
    return row


def run_patchcore(data: Data, train: Stages, test: Stages, cfg: GRADConfig, seed: int,
                  ratio: float) -> dict:
    pc = PatchCore(cfg.input_hw, cfg.blur_sigma, coreset_ratio=ratio, seed=seed)
    t = time.perf_counter()
    pc.fit(locally_aware(train.f8, train.f16))
    train_s = time.perf_counter() - t
    maps, scores = [], []
    for i in range(0, len(test.plans), 32):
        part = test.select(list(range(i, min(i + 32, len(test.plans)))))
        s, patch_maps = pc.predict(locally_aware(part.f8, part.f16))
        scores.append(s)
        maps.extend(pc.pixel_map(patch_maps, cfg.input_hw).numpy())
    return {**scored(data, torch.cat(scores).numpy(), maps), "train_s": train_s,
            "bank_size": int(pc.bank.shape[0]), "coreset_ratio": ratio, "pc": pc}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path,
                    default=Path(__file__).resolve().parents[2] / "shared" / "data")
    ap.add_argument("--categories", nargs="*")
    ap.add_argument("--config", default="edge", choices=sorted(CONFIGS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--fits", nargs="*", default=["stretch", "tile"],
                    help="input fits for GRAD's per-category rows (none: no such rows); tile "
                         "is run on categories whose pictures are not square")
    ap.add_argument("--epochs-abnormal", type=int, default=TrainConfig.epochs_abnormal)
    ap.add_argument("--epochs-normal", type=int, default=TrainConfig.epochs_normal)
    ap.add_argument("--tile-seeds", type=int, default=1,
                    help="how many of --seeds the tiled input runs (its features cost most)")
    ap.add_argument("--unified-seeds", type=int, default=1,
                    help="how many of --seeds the unified model runs")
    ap.add_argument("--no-unified", action="store_true")
    ap.add_argument("--no-baseline", action="store_true")
    ap.add_argument("--image-size", type=int,
                    help="model input S x S instead of the config's (rows named 'GRAD edge S'); "
                         "features are cached per size")
    ap.add_argument("--local-memory", type=float, default=None, metavar="W",
                    help="GRAD's local memory (grad.memory) at weight W; where that is not the "
                         "preset's, rows of their own ('+ memory', or 'without memory' for 0)")
    ap.add_argument("--global-memory", type=float, default=None, metavar="W",
                    help="GRAD's global memory (grad.memory.GlobalMemory) at weight W: rows of "
                         "their own ('global memory W')")
    ap.add_argument("--memory-size", type=int, default=None, metavar="M",
                    help="patches the local memory keeps per grid position, if not the preset's")
    ap.add_argument("--holdout", type=float, default=None, metavar="F",
                    help="hold out this share of train/good to calibrate (0: every picture "
                         "trains, the threshold from the cross-fit), if not `grad-edge train`'s "
                         "default; rows of their own ('cross-fit', 'holdout F')")
    ap.add_argument("--paper", action="store_true", help="also the paper's head, one seed")
    ap.add_argument("--timing-images", type=int, default=10)
    ap.add_argument("--quick", action="store_true",
                    help="CI-sized: 24 train and 24 test pictures per category, one seed, "
                         "2+2 epochs, stretch only")
    ap.add_argument("--out", type=Path, default=RESULTS / "accuracy.json")
    ap.add_argument("--show", type=Path, nargs="+",
                    help="print the table of these result files and exit (runs nothing)")
    ap.add_argument("--merge", type=Path, nargs="+",
                    help="merge the rows of these result files (runs made in parts, e.g. in "
                         "parallel) into --out, print the table and exit; a row whose seeds "
                         "came in several files is pooled over all of them")
    ap.add_argument("--speed", type=Path, nargs="?", const=RESULTS / "cpu_speed.json",
                    help="copy the batch-1 CPU timings of benchmarks/cpu_speed.py (this file, "
                         "default results/cpu_speed.json) into --out and exit")
    args = ap.parse_args()
    if args.show:
        for path in args.show:
            print(path)
            print_table(json.loads(path.read_text())["per_category"])
        return 0
    if args.speed:
        out = json.loads(args.out.read_text()) if args.out.is_file() else {}
        with_speed(out, json.loads(args.speed.read_text()), args.speed)
        args.out.write_text(json.dumps(out, indent=2))
        print_table(out.get("per_category", {}))
        return 0
    if args.merge:
        merged = merge([json.loads(p.read_text()) for p in args.merge])
        args.out.write_text(json.dumps(merged, indent=2))
        print_table(merged["per_category"])
        print(f"wrote {args.out}")
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    limit = None
    if args.quick:
        limit, args.seeds, args.fits = 24, args.seeds[:1], ["stretch"]
        args.epochs_abnormal, args.epochs_normal, args.timing_images = 2, 2, 3
    cats = args.categories or list_categories(args.data)
    base_cfg = get_config(args.config)
    # A larger input is its own row ("GRAD edge 320"), never mixed into the default's verdicts.
    size = ""
    if args.image_size:
        base_cfg, size = replace(base_cfg, image_size=args.image_size), f" {args.image_size}"
    # The baseline's row is named for its input alone: GRAD's memories and calibration are not
    # PatchCore's, and a "PatchCore (faithful) global memory 0.8" row would merge beside, not
    # over, the baseline the verdicts compare with.
    baseline_name = f"{BASELINE}{size}"
    if args.local_memory is not None and args.local_memory != base_cfg.local_memory:
        # a memory the preset does not have (or none where it has one): a row of its own
        size += " + memory" if args.local_memory > 0 else " without memory"
        base_cfg = replace(base_cfg, local_memory=args.local_memory)
    if args.memory_size and args.memory_size != base_cfg.memory_size:
        # another bank size than the preset's, with the preset's memory or the one asked for
        base_cfg = replace(base_cfg, memory_size=args.memory_size)
        size += f" memory {args.memory_size}"
    if args.global_memory:
        base_cfg = replace(base_cfg, global_memory=args.global_memory)
        size += f" global memory {args.global_memory:g}"
    if args.holdout is not None:
        # Calibration chosen, not the default's: every row says so, as its pictures differ.
        size += " cross-fit" if args.holdout == 0 else f" holdout {args.holdout:g}"
    backbone = LiteFeatures(base_cfg.backbone)
    tcfgs = [TrainConfig(epochs_abnormal=args.epochs_abnormal, epochs_normal=args.epochs_normal,
                         seed=s, holdout=args.holdout) for s in args.seeds]
    results: dict[str, dict] = {c: {} for c in cats}
    start = time.perf_counter()

    def write() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({
            "command": " ".join(["python"] + sys.argv), "config": args.config,
            "model_config": base_cfg.to_dict(), "train_config": tcfgs[0].to_dict(),
            "seeds": args.seeds, "per_category": results, "peers": PEERS,
            "verdicts": verdicts(results, f"GRAD {args.config}"),
            "rows_meeting_peers": rows_meeting_peers(results),
            "minutes": (time.perf_counter() - start) / 60,
            "machine": {"cpu_threads": torch.get_num_threads(), "platform": platform.platform(),
                        "torch": torch.__version__},
            "notes": "mean ± std (population) over seeds; pixel metrics on a 256x256 grid; "
                     "AUPRO to FPR 0.3; ms/image batch 1 on this CPU, whole model; FRR/miss at "
                     "the threshold calibrated as `grad-edge train` does (mean + 3 std of 10% of "
                     "train/good held out, or of a 5-fold cross-fit on all of it where 10% is "
                     "under 20 pictures); miss@1% at the "
                     "threshold whose false-reject rate on test/good is <= 1%",
        }, indent=2))

    datas = {c: Data(args.data, c, limit, backbone) for c in cats}
    timing = {c: [load_image(s.path) for s in datas[c].test[:args.timing_images]] for c in cats}

    def grad_rows(cat: str, fit: str, seeds: list[TrainConfig]) -> None:
        data, cfg = datas[cat], replace(base_cfg, fit=fit)
        name = f"GRAD {args.config}{size}" + ("" if fit == "stretch" else f" ({fit})")
        train, test = data.stages("train", cfg), data.stages("test", cfg)
        runs, model = [], None
        for tcfg in seeds:
            log.info("%s: %s seed %d", cat, name, tcfg.seed)
            trained = train_grad(cfg, tcfg, [(data, train)])
            model = trained.model
            runs.append({**test_grad(trained, data, test, cat), "train_s": trained.train_s,
                         "calibration_images": trained.products[cat].n_images})
            log.info("%s: %s seed %d: %s", cat, name, tcfg.seed,
                     {k: round(runs[-1][k], 4) for k in METRICS if runs[-1][k] is not None})
        row = summary(runs)
        row["ms_per_image"] = batch1_ms(as_runner(model), timing[cat], cfg)
        results[cat][name] = row
        write()

    for cat in cats:
        data, cfg = datas[cat], base_cfg
        if "stretch" in args.fits:
            grad_rows(cat, "stretch", tcfgs)
        if not args.no_baseline:
            train, test = data.stages("train", cfg), data.stages("test", cfg)
            ratio = 0.1 if args.quick else CORESET.get(cat, 0.1)
            runs = []
            for seed in args.seeds:
                log.info("%s: PatchCore seed %d (coreset %g)", cat, seed, ratio)
                runs.append(run_patchcore(data, train, test, cfg, seed, ratio))
                log.info("%s: PatchCore seed %d: %s", cat, seed,
                         {k: round(runs[-1][k], 4) for k in METRICS if runs[-1][k] is not None})
            pc = runs[-1]["pc"]
            for r in runs:
                r.pop("pc")

            def patchcore_forward(x, plan, pc=pc):
                f8, f16 = backbone.stages(x)
                s, m = pc.predict(locally_aware(f8, f16))
                return s, pc.pixel_map(m, cfg.input_hw)

            row = summary(runs)
            row["ms_per_image"] = batch1_ms(patchcore_forward, timing[cat], cfg)
            results[cat][baseline_name] = row
            write()

    if not args.no_unified and len(cats) > 1:
        cfg = base_cfg
        parts = [(datas[c], datas[c].stages("train", cfg)) for c in cats]
        runs = {c: [] for c in cats}
        for tcfg in tcfgs[:args.unified_seeds]:
            log.info("unified over %s: seed %d", ", ".join(cats), tcfg.seed)
            trained = train_grad(cfg, tcfg, parts)
            for c in cats:
                runs[c].append({**test_grad(trained, datas[c], datas[c].stages("test", cfg), c),
                                "train_s": trained.train_s})
                log.info("unified seed %d on %s: %s", tcfg.seed, c,
                         {k: round(runs[c][-1][k], 4) for k in METRICS
                          if runs[c][-1][k] is not None})
            for c in cats:
                results[c][f"GRAD {args.config}{size} unified"] = summary(runs[c])
            write()

    # The aspect-kept input last: its tiles' features cost the most to compute.
    for fit in args.fits:
        for cat in cats:
            long = any(abs(im.shape[0] / im.shape[1] - 1) > 0.1 for im in timing[cat])
            if fit != "stretch" and long:
                grad_rows(cat, fit, tcfgs[:args.tile_seeds])

    if args.paper:
        pcfg = get_config("paper")
        if args.image_size:
            pcfg = replace(pcfg, image_size=args.image_size)
        for cat in cats:
            data = datas[cat]
            train, test = data.stages("train", pcfg), data.stages("test", pcfg)
            log.info("%s: GRAD paper (L %d at 2C), seed %d", cat, pcfg.trunk_blocks, args.seeds[0])
            trained = train_grad(pcfg, tcfgs[0], [(data, train)])
            row = summary([{**test_grad(trained, data, test, cat),
                            "train_s": trained.train_s}])
            row["ms_per_image"] = batch1_ms(as_runner(trained.model), timing[cat], pcfg)
            results[cat][f"GRAD paper{size}"] = row
            write()

    print_table(results)
    print(f"total {(time.perf_counter() - start) / 60:.1f} min; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
