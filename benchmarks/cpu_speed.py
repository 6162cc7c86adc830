"""GRAD's cost per picture at batch 1 on this CPU, beside PatchCore on the same backbone.

    python benchmarks/cpu_speed.py --data ../shared/data        # ~5 min on 2 cores, quiet machine
    python benchmarks/cpu_speed.py --data ../shared/data --quick

What the line pays per frame on a CPU: uint8 BGR frame in, map and score out, through the
runners `grad-edge run` uses (`deploy.runner`), one real test picture after another. Rows:

  backbone alone           the frozen EfficientNet-Lite0 stages GRAD and PatchCore share, in
                           the eager runner's layout: the floor any model on these features pays
  GRAD edge, eager (plain) `InferenceModel` as the eager runner built it before this benchmark:
                           NCHW, BatchNorm as separate layers
  GRAD edge, eager         the eager runner now: channels_last backbone, BatchNorm folded
  GRAD edge, compile       the compile runner on the CPU (inductor, C++ kernels; compiled once
                           at start-up, not timed)
  GRAD edge (tile)         the eager runner on the aspect-kept tiled input (long pictures only)
  GRAD edge 320            the eager runner at a 320 x 320 input (--image-sizes)
  PatchCore (faithful)     the same eager backbone + locally aware patches + nearest-neighbour
                           search in a bank the size the accuracy benchmark's coreset keeps

Variants run interleaved, round after round, in one process, so a busy moment slows all of
them alike; the table gives the median and each row's ratio to PatchCore measured here and to
anomalib's PatchCore (shared/design/reference_figures.md: 82 ms magnetic_tile, 102 ms
metal_plate on a 2-core CPU like this one). The head's weights do not change its cost, so the
models are untrained (whitening factors random). Prints the table; writes
benchmarks/results/cpu_speed.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from patchcore_baseline import PatchCore, locally_aware  # noqa: E402

from deploy.inference import InferenceModel  # noqa: E402
from deploy.runner import CompileRunner, EagerRunner  # noqa: E402
from grad.config import get_config  # noqa: E402
from grad.model import GRAD  # noqa: E402
from trainer.dataset import load_image, scan  # noqa: E402

log = logging.getLogger("cpu-speed")
RESULTS = Path(__file__).resolve().parent / "results"
ANOMALIB_PATCHCORE_MS = {"magnetic_tile": 82.0, "metal_plate": 102.0}
# Bank sizes the accuracy benchmark's coreset keeps (ratio x training pictures x 1,024 patches).
CORESET = {"magnetic_tile": 0.0025, "metal_plate": 0.1}


def random_grad(cfg) -> GRAD:
    """An untrained GRAD whose whitening is a real (random) per-position factor, not identity:
    identity and random cost the same, but keep the benchmark honest about what it multiplies."""
    torch.manual_seed(0)
    model = GRAD(cfg).eval()
    if model.whiten is not None:
        model.whiten.factor.normal_(0, 0.1)
    return model


def patchcore_fn(runner: InferenceModel, bank_size: int):
    """Frame -> PatchCore score and map with the runner's backbone and preprocessing."""
    pc = PatchCore(runner.input_hw, coreset_ratio=1.0)
    pc.bank = torch.randn(bank_size, runner.model.cfg.channels)

    @torch.inference_mode()
    def run(frames: np.ndarray):
        x = runner.preprocess(torch.from_numpy(frames))
        if runner.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        f8, f16 = runner.model.backbone.stages(x)
        scores, maps = pc.predict(locally_aware(f8, f16))
        return scores, pc.pixel_map(maps, runner.input_hw)
    return run


def backbone_fn(runner: InferenceModel):
    @torch.inference_mode()
    def run(frames: np.ndarray):
        x = runner.preprocess(torch.from_numpy(frames))
        if runner.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return runner.model.backbone(x)
    return run


def one_shape(samples, n: int) -> list[np.ndarray]:
    """Up to n BGR frames (1, h, w, 3) of the most common picture shape among `samples`: a line
    camera gives one shape, and the compile runner is specialised to it."""
    pictures = [load_image(s.path) for s in samples[::max(1, len(samples) // (8 * n))]]
    shapes = [p.shape for p in pictures]
    common = max(set(shapes), key=shapes.count)
    return [np.ascontiguousarray(p[None, :, :, ::-1]) for p in pictures if p.shape == common][:n]


def interleaved(fns: dict, frames: list[np.ndarray], rounds: int) -> dict[str, list[float]]:
    """ms per call of every fn, round after round over the same frames."""
    times = {k: [] for k in fns}
    for fn in fns.values():               # warm-up: allocator, oneDNN primitives
        fn(frames[0])
    for r in range(rounds):
        for f in frames:
            for k, fn in fns.items():
                t = time.perf_counter()
                fn(f)
                times[k].append(1000 * (time.perf_counter() - t))
        log.info("round %d/%d", r + 1, rounds)
    return times


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path,
                    default=Path(__file__).resolve().parents[2] / "shared" / "data")
    ap.add_argument("--categories", nargs="*", default=["magnetic_tile", "metal_plate"])
    ap.add_argument("--config", default="edge")
    ap.add_argument("--pictures", type=int, default=5, help="test pictures per category")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--image-sizes", type=int, nargs="*", default=[320],
                    help="also the eager runner at these S x S inputs (accuracy.py --image-size)")
    ap.add_argument("--no-compile", action="store_true", help="skip the compile runner row")
    ap.add_argument("--quick", action="store_true", help="2 pictures, 2 rounds, no compile")
    ap.add_argument("--out", type=Path, default=RESULTS / "cpu_speed.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.quick:
        args.pictures, args.rounds, args.no_compile = 2, 2, True
    start = time.perf_counter()
    rows: dict[str, dict] = {}
    for cat in args.categories:
        test = scan(args.data, [cat], "test", masks="optional")
        frames = one_shape(test, args.pictures)
        n_train = len(scan(args.data, [cat], "train"))
        bank = max(1, int(CORESET.get(cat, 0.1) * n_train * 1024))
        cfg = get_config(args.config)
        model = random_grad(cfg)
        plain = InferenceModel(model).eval()     # the eager runner's model before this benchmark
        eager = EagerRunner(model)
        fns = {
            "backbone alone": backbone_fn(eager.inference),
            f"GRAD {args.config}, eager (plain)":
                torch.inference_mode()(lambda f: plain(torch.from_numpy(f))),
            f"GRAD {args.config}, eager": eager.run,
        }
        if not args.no_compile:
            t = time.perf_counter()
            compiled = CompileRunner(model, device="cpu", batch_sizes=(1,),
                                     frame_shape=frames[0].shape[1:3])
            log.info("%s: compiled in %.0f s", cat, time.perf_counter() - t)
            fns[f"GRAD {args.config}, compile"] = compiled.run
        if abs(frames[0].shape[1] / frames[0].shape[2] - 1) > 0.1:
            fns[f"GRAD {args.config} (tile), eager"] = EagerRunner(
                random_grad(replace(cfg, fit="tile"))).run
        for size in args.image_sizes:   # a larger input: its accuracy row's cost
            fns[f"GRAD {args.config} {size}, eager"] = EagerRunner(
                random_grad(replace(cfg, image_size=size))).run
        fns["PatchCore (faithful), eager"] = patchcore_fn(eager.inference, bank)
        times = interleaved(fns, frames, args.rounds)
        pc_ms = statistics.median(times["PatchCore (faithful), eager"])
        rows[cat] = {}
        for k, ts in times.items():
            ms = statistics.median(ts)
            rows[cat][k] = {"ms": ms, "p90_ms": float(np.percentile(ts, 90)),
                            "vs_patchcore_here": ms / pc_ms,
                            "vs_anomalib_patchcore": ms / ANOMALIB_PATCHCORE_MS[cat]
                            if cat in ANOMALIB_PATCHCORE_MS else None}
        rows[cat]["_notes"] = {"pictures": len(frames), "rounds": args.rounds, "bank": bank,
                               "frame_shape": list(frames[0].shape[1:3])}
    print(f"{'category':<14}{'variant':<32}{'ms':>8}{'p90':>8}{'/PC here':>10}{'/anomalib PC':>14}")
    for cat, r in rows.items():
        for k, v in r.items():
            if k.startswith("_"):
                continue
            ref = f"{v['vs_anomalib_patchcore']:>14.2f}" if v["vs_anomalib_patchcore"] else ""
            print(f"{cat:<14}{k:<32}{v['ms']:>8.1f}{v['p90_ms']:>8.1f}"
                  f"{v['vs_patchcore_here']:>10.2f}{ref}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "command": " ".join(["python"] + sys.argv), "config": args.config, "rows": rows,
        "anomalib_patchcore_ms": ANOMALIB_PATCHCORE_MS,
        "minutes": (time.perf_counter() - start) / 60,
        "machine": {"cpu_threads": torch.get_num_threads(), "platform": platform.platform(),
                    "torch": torch.__version__},
        "notes": "median ms per picture at batch 1 (uint8 BGR frame in, map and score out), "
                 "variants interleaved; ratios against PatchCore measured in this run and "
                 "anomalib's PatchCore in reference_figures.md",
    }, indent=2, default=list))
    print(f"wrote {args.out} in {(time.perf_counter() - start) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
