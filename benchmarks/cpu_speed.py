"""GRAD's cost per picture at batch 1 on this CPU, beside PatchCore on the same backbone.

    python benchmarks/cpu_speed.py --data ../shared/data        # ~2 min on 2 cores, quiet machine
    python benchmarks/cpu_speed.py --data ../shared/data --quick

What the line pays per frame on a CPU: uint8 BGR frame in, map and score out, through the
runners `grad-edge run` uses (`deploy.runner`), one real test picture after another. Rows:

  backbone alone           the frozen EfficientNet-Lite0 stages GRAD and PatchCore share, in
                           the eager runner's layout: the floor any model on these features pays
  GRAD edge, eager (plain) `InferenceModel` as the eager runner built it before this benchmark:
                           NCHW, BatchNorm as separate layers
  GRAD edge, eager (fp32 whitening)  the same with the whitening factor kept in float32
  GRAD edge, eager         the eager runner now: channels_last backbone, BatchNorm folded,
                           the whitening factor in bfloat16 (on a CPU with native bf16)
  GRAD edge, compile       the compile runner on the CPU (inductor, C++ kernels; compiled once
                           at start-up, not timed)
  GRAD edge (tile)         the eager runner on the aspect-kept tiled input (long pictures only)
  GRAD edge 320            the eager runner at a 320 x 320 input (--image-sizes), and the
                           compile runner at it
  GRAD edge without memory the eager runner on the preset without its local memory
                           (grad.memory): what the memory costs (the other rows keep it)
  GRAD edge + global memory the eager and compile runners with the global memory
                           (grad.memory.GlobalMemory) at the bank a category's accuracy row
                           keeps (GLOBAL_MEMORY: metal_plate only)
  GRAD edge unified        the eager runner on a unified model over two products (whitening
                           statistics per product; every frame runs both, keeps its own)
  GRAD edge unified, product check
                           that runner's `route` of one frame (backbone, pooling, nearest
                           product): what the line's product check pays once per
                           `worker.product_check_every` frames of a source
  PatchCore (faithful)     the same eager backbone + locally aware patches + nearest-neighbour
                           search in a bank the size the accuracy benchmark's coreset keeps

Pictures are spread over the test set, every shape among them (the compile row gets them
resized to the first one's shape: its graph is specialised to one). Variants run interleaved,
round after round, in one process, so a busy moment slows all of them alike; the whole
measurement runs --runs times, since on a shared machine the level drifts between minutes.
The table gives each run's median and each row's ratio to PatchCore measured in that run and to
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

import cv2
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
# Categories whose accuracy rows run GRAD's global memory (grad-edge train --global-memory):
# its share of the training patches (the config's global_memory_ratio).
GLOBAL_MEMORY = {"metal_plate": 0.1}


def random_grad(cfg, global_bank: int = 0) -> GRAD:
    """An untrained GRAD whose whitening is a real (random) per-position factor, not identity:
    identity and random cost the same, but keep the benchmark honest about what it multiplies.
    A local memory gets a bank of the size training leaves (cfg.memory_size patches at each
    position, or fewer on a smaller training set), of random patches; a global memory one of
    `global_bank` random patches."""
    torch.manual_seed(0)
    model = GRAD(cfg).eval()
    if model.whiten is not None:
        model.whiten.factor.normal_(0, 0.1)
    if model.memory is not None:
        model.memory.fit(torch.randn(cfg.memory_size, cfg.channels, *cfg.feature_hw),
                         cfg.memory_size)
        model.memory.scale.fill_(1.0)
    if model.global_memory is not None:
        model.global_memory.bank = torch.randn(cfg.channels + 1, global_bank)
        model.global_memory.scale.fill_(1.0)
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


def spread(samples, n: int) -> list[np.ndarray]:
    """n BGR frames (1, h, w, 3) spread over `samples` (as the line gets them from a camera):
    every shape among them, so a tiled row pays for long pictures' extra tiles too."""
    step = max(1, len(samples) // n)
    return [np.ascontiguousarray(load_image(s.path)[None, :, :, ::-1])
            for s in samples[::step][:n]]


def at_shape(fn, frames: list[np.ndarray], hw: tuple[int, int]):
    """fn fed each frame resized to hw beforehand (outside the timing): the compile runner is
    specialised to one frame shape, as a line camera gives one."""
    ready = {id(f): np.ascontiguousarray(cv2.resize(f[0], (hw[1], hw[0]),
                                                    interpolation=cv2.INTER_AREA)[None])
             for f in frames}
    return lambda f: fn(ready[id(f)])


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
    ap.add_argument("--rounds", type=int, default=6, help="rounds over the pictures per run")
    ap.add_argument("--runs", type=int, default=2, help="whole measurements, one after another")
    ap.add_argument("--image-sizes", type=int, nargs="*", default=[320],
                    help="also the eager runner at these S x S inputs (accuracy.py --image-size)")
    ap.add_argument("--no-compile", action="store_true", help="skip the compile runner row")
    ap.add_argument("--quick", action="store_true", help="3 pictures, 1 round, 1 run, no compile")
    ap.add_argument("--out", type=Path, default=RESULTS / "cpu_speed.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.quick:
        args.pictures, args.rounds, args.runs, args.no_compile = 3, 1, 1, True
    start = time.perf_counter()
    rows: dict[str, dict] = {}
    for cat in args.categories:
        test = scan(args.data, [cat], "test", masks="optional")
        frames = spread(test, args.pictures)
        n_train = len(scan(args.data, [cat], "train"))
        bank = max(1, int(CORESET.get(cat, 0.1) * n_train * 1024))
        cfg = get_config(args.config)
        bare = replace(cfg, local_memory=0.0)
        model = random_grad(cfg)
        plain = InferenceModel(model).eval()     # the eager runner's model before this benchmark
        eager = EagerRunner(model)
        exact = EagerRunner(model, whiten_bf16=False)
        fns = {
            "backbone alone": backbone_fn(eager.inference),
            f"GRAD {args.config}, eager (plain)":
                torch.inference_mode()(lambda f: plain(torch.from_numpy(f))),
            f"GRAD {args.config}, eager (fp32 whitening)": exact.run,
            f"GRAD {args.config}, eager": eager.run,
        }
        if not args.no_compile:
            t = time.perf_counter()
            hw = frames[0].shape[1:3]
            compiled = CompileRunner(model, device="cpu", batch_sizes=(1,), frame_shape=hw)
            log.info("%s: compiled in %.0f s", cat, time.perf_counter() - t)
            fns[f"GRAD {args.config}, compile"] = at_shape(compiled.run, frames, hw)
        if any(abs(f.shape[1] / f.shape[2] - 1) > 0.1 for f in frames):
            fns[f"GRAD {args.config} (tile), eager"] = EagerRunner(
                random_grad(replace(cfg, fit="tile"))).run
        for size in args.image_sizes:   # a larger input: its accuracy row's cost
            sized = random_grad(replace(cfg, image_size=size))
            fns[f"GRAD {args.config} {size}, eager"] = EagerRunner(sized).run
            if not args.no_compile:     # and what the compile runner makes of it
                compiled = CompileRunner(sized, device="cpu", batch_sizes=(1,), frame_shape=hw)
                fns[f"GRAD {args.config} {size}, compile"] = at_shape(compiled.run, frames, hw)
        if cat in GLOBAL_MEMORY:    # with the global memory, at this category's bank
            h8, w8 = cfg.feature_hw
            g_bank = int(GLOBAL_MEMORY[cat] * n_train * h8 * w8)
            with_global = random_grad(replace(cfg, global_memory=0.8,
                                              global_memory_ratio=GLOBAL_MEMORY[cat]), g_bank)
            fns[f"GRAD {args.config} + global memory, eager"] = EagerRunner(with_global).run
            if not args.no_compile:
                compiled = CompileRunner(with_global, device="cpu", batch_sizes=(1,),
                                         frame_shape=hw)
                fns[f"GRAD {args.config} + global memory, compile"] = at_shape(
                    compiled.run, frames, hw)
        # without the local memory (grad.memory), which the preset has: what it costs
        fns[f"GRAD {args.config} without memory, eager"] = EagerRunner(random_grad(bare)).run
        if cfg.whiten:   # one model for two products: both products' whitening run per frame
            unified = EagerRunner(random_grad(replace(cfg, whiten_groups=2)))
            fns[f"GRAD {args.config} unified, eager"] = unified.run
            # the line's product check: one frame's route, paid once per
            # worker.product_check_every frames of a source (edge.products)
            fns[f"GRAD {args.config} unified, product check"] = unified.route
        fns["PatchCore (faithful), eager"] = patchcore_fn(eager.inference, bank)
        # Whole measurements repeated: on a shared machine the level drifts between minutes,
        # which rounds inside one run do not show; each run's medians are kept.
        runs = [interleaved(fns, frames, args.rounds) for _ in range(args.runs)]
        pc = [statistics.median(r["PatchCore (faithful), eager"]) for r in runs]
        rows[cat] = {}
        for k in fns:
            per_run = [statistics.median(r[k]) for r in runs]
            ref = ANOMALIB_PATCHCORE_MS.get(cat)
            rows[cat][k] = {
                "ms": statistics.median([t for r in runs for t in r[k]]),
                "ms_runs": per_run,
                "p90_ms": float(np.percentile([t for r in runs for t in r[k]], 90)),
                "vs_patchcore_here_runs": [m / p for m, p in zip(per_run, pc)],
                "vs_anomalib_patchcore_runs": [m / ref for m in per_run] if ref else None}
        rows[cat]["_notes"] = {"pictures": len(frames), "rounds": args.rounds, "runs": args.runs,
                               "bank": bank,
                               "frame_shapes": sorted({tuple(f.shape[1:3]) for f in frames}),
                               "compile_frame_shape": list(frames[0].shape[1:3])}
    print(f"{'category':<14}{'variant':<40}{'ms per run':>18}{'/PC here':>14}{'/anomalib PC':>14}")

    def span(vals, f):
        return "-".join(f.format(v) for v in (min(vals), max(vals))) if len(vals) > 1 \
            else f.format(vals[0])
    for cat, r in rows.items():
        for k, v in r.items():
            if k.startswith("_"):
                continue
            ref = v["vs_anomalib_patchcore_runs"]
            print(f"{cat:<14}{k:<40}{span(v['ms_runs'], '{:.1f}'):>18}"
                  f"{span(v['vs_patchcore_here_runs'], '{:.2f}'):>14}"
                  f"{span(ref, '{:.2f}') if ref else '':>14}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "command": " ".join(["python"] + sys.argv), "config": args.config, "rows": rows,
        "anomalib_patchcore_ms": ANOMALIB_PATCHCORE_MS,
        "minutes": (time.perf_counter() - start) / 60,
        "machine": {"cpu_threads": torch.get_num_threads(), "platform": platform.platform(),
                    "torch": torch.__version__},
        "notes": "median ms per picture at batch 1 (uint8 BGR frame in, map and score out), "
                 "variants interleaved; ms over all runs, ms_runs each run's median; ratios per "
                 "run against PatchCore measured in that run and anomalib's PatchCore in "
                 "reference_figures.md; the compile row runs the pictures resized to the "
                 "first's shape (its graph is specialised to one)",
    }, indent=2, default=list))
    print(f"wrote {args.out} in {(time.perf_counter() - start) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
