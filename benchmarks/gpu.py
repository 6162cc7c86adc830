"""GRAD on one GPU: every backend, batch 1/8/32, the line's end-to-end path, and parity.

    python benchmarks/gpu.py                      # on a CUDA machine; well under 8 minutes
    python benchmarks/gpu.py --dry-run            # CPU, tiny sizes: exercises the code paths

For the `edge` and `paper` configs (untrained heads: timing does not depend on the weights, so
no checkpoint is needed; the backbone is the real one when its weights package is installed):

    model        uint8 (B, 256, 256, 3) on the device -> score and map, per backend:
                 eager fp32, eager fp16, compile, cudagraph fp16, tensorrt (if importable)
    backbone     EfficientNet-Lite features alone, fp16 CUDA graph: the bound the head sits on
    end_to_end   uint8 1080p frames already in pinned host memory -> scores on the host
                 (H2D copy, resize inside the graph, replay, D2H copy); the same from a
                 pageable numpy batch through CudaGraphRunner.run; and a stream of batches
                 through CudaGraphRunner.submit, one in flight while the next is copied
                 (what the worker does)
    agreement    fp16 CUDA graph vs eager fp32 scores on the same frames

Latency is the median of per-iteration CUDA-event timings after warm-up; images/s = B / latency.
A time budget (--budget-s) skips what would not fit, cheapest and most important first, so the
script ends in time on any GPU; compile and TensorRT build times are recorded as compile_s.
Prints a table and writes benchmarks/results/gpu.json (a dry run writes gpu.dry-run.json).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import platform
import statistics
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from deploy.export import compile_tensorrt  # noqa: E402
from deploy.inference import InferenceModel  # noqa: E402
from deploy.verify import Tolerances, compare, strict_fp32, verify  # noqa: E402
from deploy.cudagraph import CudaGraphRunner, capture_graph  # noqa: E402
from deploy.runner import EagerRunner, cuda_missing_reason  # noqa: E402
from grad.backbone import BackboneWeightsMissing  # noqa: E402
from grad.config import get_config  # noqa: E402
from grad.model import GRAD  # noqa: E402

log = logging.getLogger("gpu-bench")
RESULTS = Path(__file__).resolve().parent / "results"


class Budget:
    """Wall-clock budget for the whole run; expensive steps ask for a reserve first."""

    def __init__(self, seconds: float):
        self.deadline = time.perf_counter() + seconds

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def allows(self, reserve_s: float = 0.0) -> bool:
        return self.left() > reserve_s


def build_model(name: str) -> tuple[GRAD, str]:
    torch.manual_seed(0)
    try:
        return GRAD(get_config(name)).eval(), "pretrained backbone"
    except BackboneWeightsMissing:
        # Timing does not depend on the weights; parity on random weights is still a parity.
        return GRAD(get_config(name), pretrained_backbone=False).eval(), "random backbone"


def frames_like_camera(b: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    """uint8 (b, h, w, 3): gradients plus noise, every frame different (not all-zero input)."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(20, 220, w, dtype=np.float32)[None, None, :, None]
    noise = rng.normal(0, 12, (b, 1, 1, 3)).astype(np.float32)
    rows = rng.normal(0, 8, (b, h, 1, 1)).astype(np.float32)   # float32: 1080p x 32 in float64
    frames = np.broadcast_to(ramp, (b, h, w, 3)) + noise + rows  # would cost seconds
    return frames.clip(0, 255).astype(np.uint8)


def timings_ms(fn: Callable[[], object], iters: int, warmup: int, cuda: bool) -> list[float]:
    """Per-iteration latency. On CUDA, events around each call, synchronised per call."""
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize()
    out = []
    for _ in range(iters):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            out.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            out.append(1000 * (time.perf_counter() - t))
    return out


def row(config: str, kind: str, backend: str, precision: str, batch: int,
        times: list[float] | None, compile_s: float | None = None, note: str = "") -> dict:
    median = statistics.median(times) if times else None
    return {"config": config, "kind": kind, "backend": backend, "precision": precision,
            "batch": batch, "median_ms": median,
            "p90_ms": float(np.percentile(times, 90)) if times else None,
            "images_per_s": batch * 1000 / median if median else None,
            "compile_s": compile_s, "note": note}


def free(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------
# what is measured


def model_rows(name: str, grad: GRAD, args, budget: Budget, backends: list[str]) -> list[dict]:
    """uint8 (B, S, S, 3) on the device -> score and map, for each backend and batch size."""
    cuda, device, s = args.device == "cuda", args.device, grad.cfg.image_size
    rows = []
    for backend in backends:
        precision = "fp16"
        if backend == "eager_fp32":
            # PyTorch's default on Ampere and later: fp32 tensors, TF32 convolutions.
            precision = "tf32" if cuda and torch.backends.cudnn.allow_tf32 else "fp32"
        if backend == "compile" and not cuda:
            precision = "fp32"
        for b in args.batch_sizes:
            reserve = 60 if backend in ("compile", "tensorrt") else 5
            if not budget.allows(reserve):
                rows.append(row(name, "model", backend, precision, b, None,
                                note="skipped: time budget"))
                continue
            x = torch.from_numpy(frames_like_camera(b, s, s)).to(device)   # (B, S, S, 3)
            compile_s = None
            try:
                with torch.inference_mode():
                    start = time.perf_counter()
                    fn = prepare(backend, grad, x, args)
                    if backend in ("compile", "tensorrt"):
                        fn()                                # compile/build happens here
                        free(device)
                        compile_s = time.perf_counter() - start
                    times = timings_ms(fn, args.iters, args.warmup, cuda)
                rows.append(row(name, "model", backend, precision, b, times, compile_s))
            except Exception as exc:  # one backend failing must not lose the other numbers
                log.exception("%s %s batch %d failed", name, backend, b)
                rows.append(row(name, "model", backend, precision, b, None,
                                note=f"failed: {type(exc).__name__}: {str(exc)[:200]}"))
            del x
            free(device)
    return rows


def prepare(backend: str, grad: GRAD, x: torch.Tensor, args) -> Callable[[], object]:
    """A no-argument callable running one batch of `x` on `backend`."""
    cuda = args.device == "cuda"
    if backend == "eager_fp32":
        im = InferenceModel(grad).to(args.device)
        return lambda: im(x)
    if backend == "eager_fp16":
        im = InferenceModel(grad, torch.float16, channels_last=cuda).to(args.device)
        return lambda: im(x)
    if backend == "compile":
        im = InferenceModel(grad, torch.float16 if cuda else torch.float32,
                            channels_last=cuda).to(args.device)
        compiled = torch.compile(im, mode=args.compile_mode if cuda else "default",
                                 dynamic=False)
        return lambda: compiled(x)
    if backend == "cudagraph":
        im = InferenceModel(grad, torch.float16, channels_last=True).to(args.device)
        static_x = x.clone()
        graph, _ = capture_graph(im, static_x)
        return graph.replay
    if backend == "tensorrt":
        # Exactly what `grad-edge export --backend tensorrt` builds (not saved here).
        trt_gm, _ = compile_tensorrt(grad, len(x), tuple(x.shape[1:3]), args.device)
        return lambda: trt_gm(x)
    raise ValueError(f"unknown backend {backend}")


def backbone_rows(name: str, grad: GRAD, args, budget: Budget) -> list[dict]:
    """The frozen backbone alone on normalised input: the bound for the whole model."""
    cuda, s = args.device == "cuda", grad.cfg.image_size
    rows = []
    for b in args.batch_sizes:
        backend, precision = ("cudagraph", "fp16") if cuda else ("eager", "fp32")
        if not budget.allows(5):
            rows.append(row(name, "backbone", backend, precision, b, None,
                            note="skipped: time budget"))
            continue
        with torch.inference_mode():
            if cuda:
                net = InferenceModel(grad, torch.float16, channels_last=True).model.backbone
                net = net.to(args.device)
                x = torch.randn(b, 3, s, s, device=args.device, dtype=torch.float16)
                x = x.contiguous(memory_format=torch.channels_last)
                graph, _ = capture_graph(net, x)
                fn = graph.replay
            else:
                x = torch.randn(b, 3, s, s)
                fn = lambda: grad.backbone(x)  # noqa: E731
            rows.append(row(name, "backbone", backend, precision, b,
                            timings_ms(fn, args.iters, args.warmup, cuda)))
        free(args.device)
    return rows


def end_to_end_rows(name: str, grad: GRAD, args, budget: Budget) -> list[dict]:
    """uint8 frames at camera resolution -> scores on the host, the resize inside the graph."""
    cuda = args.device == "cuda"
    h, w = args.frame_shape
    rows = []
    for b in args.batch_sizes:
        if not budget.allows(10):
            rows.append(row(name, "end_to_end", "cudagraph" if cuda else "eager",
                            "fp16" if cuda else "fp32", b, None, note="skipped: time budget"))
            continue
        frames = frames_like_camera(b, h, w)
        if cuda:
            runner = CudaGraphRunner(grad, batch_sizes=(b,), frame_shape=(h, w))
            g = runner.captured(b, h, w)
            pinned = torch.from_numpy(frames).pin_memory()    # as if received into pinned memory

            def from_pinned(g=g, pinned=pinned, out=g.slots[0].host_scores):
                g.device_in.copy_(pinned, non_blocking=True)
                g.graph.replay()
                out.copy_(g.scores, non_blocking=True)

            with torch.inference_mode():
                times = timings_ms(from_pinned, args.iters, args.warmup, cuda=True)
            rows.append(row(name, "end_to_end", "cudagraph", "fp16", b, times,
                            note=f"{h}x{w} uint8 in pinned memory -> scores on host"))
        else:
            runner = EagerRunner(grad, device="cpu", overlap=True)
        precision = "fp16" if cuda else "fp32"
        # What the worker calls: pageable numpy in, numpy out (adds the staging memcpy).
        times = timings_ms(lambda f=frames: runner.run(f), args.iters, args.warmup, cuda=False)
        rows.append(row(name, "end_to_end", f"{runner.backend}.run", precision, b, times,
                        note=f"{h}x{w} uint8 numpy -> RunnerOutput (wall clock)"))
        # A stream of batches, each submitted before the previous one is collected: batch k+1's
        # copy to the device overlaps batch k's graph. Time per batch = wall time / batches.
        times = overlapped_ms(runner, [frames, frames[::-1].copy()], args.iters, args.warmup)
        rows.append(row(name, "end_to_end", f"{runner.backend}.submit", precision, b, times,
                        note=f"{h}x{w} numpy, next batch submitted before collecting (overlap)"))
        runner.close()
        del frames
        free(args.device)
    return rows


def overlapped_ms(runner, batches: list[np.ndarray], iters: int, warmup: int) -> list[float]:
    """Wall-clock ms per batch over `iters` batches kept one deep in flight, as the worker does;
    repeated 3 times (a list of 3 means for the median)."""
    def stream(count: int) -> None:
        pending = None
        for i in range(count):
            nxt = runner.submit(batches[i % len(batches)])
            if pending is not None:
                pending.result()
            pending = nxt
        pending.result()

    stream(warmup)
    out = []
    for _ in range(3):
        start = time.perf_counter()
        stream(iters)
        out.append(1000 * (time.perf_counter() - start) / iters)
    return out


def agreement(grad: GRAD, args) -> dict:
    """Scores of the fp16 path vs eager fp32 on the same frames (batch of 8)."""
    frames = frames_like_camera(8, *args.frame_shape, seed=1)
    with strict_fp32():   # the reference is true fp32, as in `grad-edge verify`
        reference = EagerRunner(grad, device=args.device, whiten_bf16=False).run(frames)
    ref = reference.scores
    if args.device == "cuda":
        candidate = CudaGraphRunner(grad, batch_sizes=(8,))
    else:
        candidate = EagerRunner(grad, device="cpu", dtype=torch.float16)
    out = candidate.run(frames)
    candidate.close()
    # The same measures as `grad-edge verify`, from its own comparison.
    report = compare(candidate.backend, (ref, reference.maps), (out.scores, out.maps),
                     Tolerances())
    return {"candidate": f"{candidate.backend} fp16", "reference": "eager fp32",
            "n_frames": len(frames), "score_rel_max": report.score_rel_max,
            "score_rel_median": report.score_rel_median,
            "map_err_max_share_of_range": report.map_err_max,
            "map_corr_min": report.map_corr_min,
            "score_tolerance": Tolerances.score_rel,
            # Scores only: an untrained head's map is nearly flat noise, so its shape says
            # little; the trained checkpoint's maps are checked in verify_trained.
            "within_tolerance": report.score_rel_max <= Tolerances.score_rel,
            "rank_order_equal": bool((np.argsort(out.scores) == np.argsort(ref)).all())}


def verify_trained(args) -> dict:
    """`grad-edge verify` of the fp16 path against strict fp32 on a trained checkpoint, with the
    documented tolerances: synthetic line parts (the demo model's own kind), half defective, so
    the image AUROC is compared too."""
    from camera_sources.synthetic import DEFECT_KINDS, render_part

    images, labels = [], []
    for i in range(args.verify_images):
        kind = None if i % 2 == 0 else DEFECT_KINDS[(i // 2) % len(DEFECT_KINDS)]
        images.append(render_part(np.random.default_rng([7, i]), (256, 256), kind)[0])
        labels.append(int(kind is not None))
    if args.device == "cuda":
        candidate = CudaGraphRunner(args.model, batch_sizes=(8,))
    else:
        candidate = EagerRunner(args.model, device="cpu", dtype=torch.float16)
    report = verify(args.model, candidate, images, labels=labels, device=args.device)
    candidate.close()
    print(report.summary())
    return {"model": str(args.model), "candidate": f"{candidate.backend} fp16",
            "ok": report.ok, "n_images": report.n_images,
            "score_rel_max": report.score_rel_max, "score_rel_median": report.score_rel_median,
            "map_corr_min": report.map_corr_min,
            "map_err_max_share_of_range": report.map_err_max,
            "auroc_reference": report.auroc_reference, "auroc_candidate": report.auroc_candidate,
            "tolerances": dataclasses.asdict(report.tolerances),
            "failures": list(report.failures)}


# ---------------------------------------------------------------------------------------------
# the run


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true",
                   help="CPU, tiny config, tiny frames, 2 iterations: checks the code paths")
    p.add_argument("--configs", nargs="+", default=["edge", "paper"])
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8, 32])
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--frame-shape", nargs=2, type=int, default=[1080, 1920])
    p.add_argument("--compile-mode", default="reduce-overhead",
                   help="torch.compile mode on CUDA (reduce-overhead = inductor + CUDA graphs)")
    p.add_argument("--compile-configs", nargs="*", default=["edge"],
                   help="configs to torch.compile (each batch size compiles for ~tens of s)")
    p.add_argument("--tensorrt-configs", nargs="*", default=["edge"],
                   help="configs to build TensorRT engines for (minutes each)")
    p.add_argument("--budget-s", type=float, default=420.0,
                   help="stop starting new measurements after this many seconds")
    p.add_argument("--model", type=Path,
                   help="a trained checkpoint (e.g. runs/demo/model.pt): also verify the fp16 "
                        "path against fp32 on it with the documented tolerances")
    p.add_argument("--verify-images", type=int,
                   help="synthetic parts for --model's check (default 40; 6 in a dry run)")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    if args.verify_images is None and not args.dry_run:
        args.verify_images = 40
    if args.dry_run:
        args.device = "cpu"
        args.configs, args.batch_sizes, args.iters, args.warmup = ["tiny"], [1, 2], 2, 1
        args.verify_images = args.verify_images or 6
        args.frame_shape = [72, 128]
        args.compile_configs, args.tensorrt_configs = [], []
        args.out = args.out or RESULTS / "gpu.dry-run.json"
    else:
        args.device = "cuda"
        args.out = args.out or RESULTS / "gpu.json"
    return args


def available_backends(args, name: str) -> list[str]:
    backends = ["cudagraph", "eager_fp32", "eager_fp16"] if args.device == "cuda" else \
        ["eager_fp32", "eager_fp16"]
    if name in args.compile_configs:
        backends.append("compile")
    if args.device == "cuda" and name in args.tensorrt_configs:
        try:
            import torch_tensorrt  # noqa: F401
            backends.append("tensorrt")
        except ImportError:
            log.info("tensorrt: torch_tensorrt not importable here, skipped")
    return backends


def print_table(rows: list[dict], agree: dict[str, dict]) -> None:
    print(f"{'config':<7}{'kind':<11}{'backend':<18}{'prec':<6}{'batch':>6}{'median ms':>11}"
          f"{'images/s':>11}{'compile s':>11}  note")
    for r in rows:
        ms = f"{r['median_ms']:.3f}" if r["median_ms"] is not None else "-"
        ips = f"{r['images_per_s']:.0f}" if r["images_per_s"] is not None else "-"
        cs = f"{r['compile_s']:.1f}" if r["compile_s"] is not None else ""
        print(f"{r['config']:<7}{r['kind']:<11}{r['backend']:<18}{r['precision']:<6}"
              f"{r['batch']:>6}{ms:>11}{ips:>11}{cs:>11}  {r['note']}")
    for name, a in agree.items():
        if "failed" in a:
            print(f"agreement {name}: failed: {a['failed']}")
            continue
        print(f"agreement {name}: {a['candidate']} vs {a['reference']}: score rel err max "
              f"{a['score_rel_max']:.2e} (median {a['score_rel_median']:.2e}), map err max "
              f"{a['map_err_max_share_of_range']:.2e} of range, map corr min "
              f"{a['map_corr_min']:.4f}, rank order equal: "
              f"{a['rank_order_equal']}, within tolerance: {a['within_tolerance']}")


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.device == "cuda" and (reason := cuda_missing_reason()) is not None:
        print(f"benchmarks/gpu.py needs a CUDA GPU: {reason}. Run it on a GPU machine, or "
              "pass --dry-run to exercise its code paths on CPU.", file=sys.stderr)
        return 2
    # Fixed shapes everywhere: every backend gets cuDNN's timed algorithm choice (the line's
    # CudaGraphRunner sets the same), so the comparison is between backends, not settings.
    torch.backends.cudnn.benchmark = args.device == "cuda"
    budget = Budget(args.budget_s)
    started = time.perf_counter()
    rows, agree, notes = [], {}, {}
    trained: dict | None = None

    def section(name: str, kind: str, measure: Callable[[], list[dict]]) -> None:
        """One part of the run; a failure is a row saying so, and the rest still runs."""
        try:
            rows.extend(measure())
        except Exception as exc:
            log.exception("%s %s failed", name, kind)
            rows.append(row(name, kind, "-", "-", 0, None,
                            note=f"failed: {type(exc).__name__}: {str(exc)[:200]}"))
        free(args.device)

    def save(complete: bool) -> dict:
        """Written after every config, so a run cut short still leaves its figures."""
        result = {
            "dry_run": args.dry_run, "device": args.device, "complete": complete,
            "gpu": (torch.cuda.get_device_name(0) if args.device == "cuda"
                    else platform.processor()),
            "torch": torch.__version__, "cuda": torch.version.cuda,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "backbone_weights": notes, "wall_s": time.perf_counter() - started,
            "rows": rows, "agreement": agree, "verify_trained": trained,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
        return result

    if args.model is not None:
        try:
            trained = verify_trained(args)
        except Exception as exc:
            log.exception("verify on %s failed", args.model)
            trained = {"model": str(args.model), "failed": f"{type(exc).__name__}: {exc}"[:300]}
        free(args.device)
    # Cheap and most important first for every config; compile and TensorRT builds last.
    for name in args.configs:
        grad, notes[name] = build_model(name)
        grad = grad.to(args.device)
        log.info("%s: %s, measuring on %s", name, notes[name], args.device)
        cheap = [b for b in available_backends(args, name) if b not in ("compile", "tensorrt")]
        section(name, "model", lambda: model_rows(name, grad, args, budget, cheap))
        section(name, "backbone", lambda: backbone_rows(name, grad, args, budget))
        section(name, "end_to_end", lambda: end_to_end_rows(name, grad, args, budget))
        try:
            agree[name] = agreement(grad, args)
        except Exception as exc:
            log.exception("%s agreement failed", name)
            agree[name] = {"failed": f"{type(exc).__name__}: {str(exc)[:200]}"}
        del grad
        free(args.device)
        save(complete=False)
    for name in args.configs:
        costly = [b for b in available_backends(args, name) if b in ("compile", "tensorrt")]
        if costly:
            grad = build_model(name)[0].to(args.device)
            section(name, "model", lambda: model_rows(name, grad, args, budget, costly))
            del grad
            save(complete=False)

    print_table(rows, agree)
    result = save(complete=True)
    print(f"wrote {args.out} in {result['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
