"""The whole line on this machine: throughput, capture-to-verdict latency and drops, plus
ZeroMQ transport alone for 1080p frames next to a plain in-memory copy.

    python benchmarks/pipeline.py                 # tiny and edge models; under ~10 min on 2 cores
    python benchmarks/pipeline.py --quick         # tiny sizes, a few frames: checks the code paths

Line rows: `edge.line.Line` exactly as `grad-edge run` builds it -- a synthetic-line producer
process (spawn), ZeroMQ over ipc://, the worker (eager runner on the CPU), rules, the SQLite
defect log with saved images, a JSONL reject sink -- with a model trained once by
`trainer.demo.train_demo_model` (small, quick: timing does not depend on accuracy) and cached
under the run folder.

    every_frame  replay-style (edge.commands.replay_config's worker settings), the source as
                 fast as possible: frames/s, latency p50/p99, drops (must be 0)
    latest       the source paced at --overload x the every_frame rate, the worker keeping only
                 the newest frames: frames/s processed, latency, drops counted by the line
    max_batch    the edge model's every_frame run again with worker.max_batch 1

frames/s is steady state: frames from the second model batch on, over the time from the end
of the first batch to the end of the last (process start-up, model warm-up and the producer's
spawn are left out). Latency is `latency_ms` of every frame in results.jsonl (capture on the
producer -> verdict in the worker; it includes the queues, so an every_frame run as fast as
possible shows the queue depth times the per-frame time). Drops: the worker's and producer's
counters; `lost` is frames produced minus frames judged, which the counters should explain.

Transport rows: one PUSH process (spawn) -> PULL here through edge.protocol.encode/send/recv/
decode, 1080x1920x3 uint8 frames, ipc:// and tcp://127.0.0.1, the line's high-water marks;
beside it np.copyto of the same bytes into a preallocated buffer in this process.

Absolute numbers come from whatever CPU this runs on (the reference run: 2 shared cores);
quote the ratios. Prints two tables and writes benchmarks/results/pipeline.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import multiprocessing as mp
import os
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import zmq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# Only light imports at module level: producer processes are spawned, and a spawned child
# imports this file again as __mp_main__; torch is imported inside the functions that use it.
from edge import protocol  # noqa: E402

log = logging.getLogger("pipeline-bench")
ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"

FULL = {
    "models": ["tiny", "edge"],
    "size": 256,                                   # synthetic frames, H = W
    "every_frame_frames": {"tiny": 300, "edge": 150},
    "latest_seconds": 10.0,                         # a latest run lasts about this long
    "batch1_frames": 100,                          # edge every_frame at max_batch 1
    "train": {"n_train": 24, "epochs": (1, 2)},
    "transport_frames": 300,
    "transport_warmup": 10,
}
QUICK = {
    "models": ["tiny"],
    "size": 128,
    "every_frame_frames": {"tiny": 30, "edge": 20},
    "latest_seconds": 2.0,
    "batch1_frames": 20,
    "train": {"n_train": 12, "epochs": (1, 1)},
    "transport_frames": 30,
    "transport_warmup": 3,
}
FRAME_1080P = (1080, 1920, 3)


# --------------------------------------------------------------------------- models


def get_model(name: str, cache: Path, train: dict) -> dict:
    """The cached demo model for config `name`, trained on first use."""
    from trainer.demo import train_demo_model

    path = cache / f"{name}.pt"
    info = {"path": str(path), "reused": path.exists(), "train_s": None}
    if not path.exists():
        cache.mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        train_demo_model(path, cache / f"data-{name}", n_train=train["n_train"], config=name,
                         epochs=tuple(train["epochs"]))
        info["train_s"] = round(time.perf_counter() - t, 1)
    return info


class TimedRunner:
    """The line's runner with the end time and size of every model call recorded."""

    def __init__(self, runner):
        self.inner = runner
        self.card = runner.card
        self.backend = runner.backend
        self.overlaps = runner.overlaps
        self.calls: list[tuple[float, int]] = []

    def run(self, frames: np.ndarray):
        out = self.inner.run(frames)
        self.calls.append((time.perf_counter(), len(frames)))
        return out

    def submit(self, frames: np.ndarray):
        from deploy.runner import Pending

        inner = self.inner.submit(frames)

        def result():
            out = inner.result()
            self.calls.append((time.perf_counter(), len(frames)))
            return out
        return Pending(result)


def steady_fps(calls: list[tuple[float, int]]) -> float | None:
    """Frames after the first batch over the time from its end to the last batch's end."""
    if len(calls) < 2:
        return None
    frames = sum(n for _, n in calls[1:])
    return frames / max(calls[-1][0] - calls[0][0], 1e-9)


# --------------------------------------------------------------------------- line runs


def line_config(model_path: str, run_dir: Path, *, policy: str, max_batch: int, frames: int,
                fps: float | None, size: int):
    """replay_config's one-source line, with the synthetic line as its source."""
    from edge.commands import replay_config
    from edge.config import (EncoderConfig, EncoderKind, RejectConfig, RuleSettings, RulesConfig,
                             SinkConfig, SourceConfig, SourceKind)
    from edge.protocol import DropPolicy

    cfg = replay_config(Path("line1.avi"), Path(model_path), run_dir, "eager", None)
    # No live belt: this measures throughput, not reject timing (benchmarks/faults.py does),
    # so frames are paced at `fps` and rejects fire as soon as they are decided.
    source = SourceConfig(id="line1", kind=SourceKind.SYNTHETIC, drop_policy=DropPolicy(policy),
                          frames=frames, fps=fps, seed=0, defect_every=10, size=[size, size],
                          encoder=EncoderConfig(kind=EncoderKind.NONE))
    # every_frame batches up to 8 with a 20 ms fill; a live latest line waits less for a
    # batch to fill (edge.yaml's 5 ms).
    worker = dataclasses.replace(cfg.worker, max_batch=max_batch,
                                 max_wait_ms=20.0 if policy == "every_frame" else 5.0)
    return dataclasses.replace(
        cfg, sources=[source], worker=worker, status_interval_s=1.0,
        model=dataclasses.replace(cfg.model, device="cpu"),
        rules=RulesConfig(default=RuleSettings(min_area_px=16)),
        reject=RejectConfig(camera_to_ejector_counts=500, sinks=[
            SinkConfig(kind="jsonl", path=str(run_dir / "rejects.jsonl"))]),
        source_file="benchmarks/pipeline.py", config_hash=f"bench-{policy}-b{max_batch}")


def run_line(runner, model: str, model_path: str, run_dir: Path, *, policy: str,
             max_batch: int, frames: int, fps: float | None, size: int,
             overlap: bool = False) -> dict:
    import shutil

    from edge.line import Line

    if run_dir.exists():
        shutil.rmtree(run_dir)   # one run per folder: results.jsonl holds exactly this run
    cfg = line_config(model_path, run_dir, policy=policy, max_batch=max_batch, frames=frames,
                      fps=fps, size=size)
    runner.calls.clear()
    summary = Line(cfg, runner).run()
    calls = runner.calls[1:]          # the first call is Line.run's warm-up
    c = summary.counters
    lat = [json.loads(line)["latency_ms"] for line in
           Path(summary.results).read_text().splitlines() if line]
    dropped = c["dropped"] + c["producer_dropped"]
    rejects = Path(run_dir / "rejects.jsonl")
    row = {
        "model": model, "policy": policy, "max_batch": max_batch, "overlap": overlap,
        "max_wait_ms": cfg.worker.max_wait_ms, "frame_size": [size, size],
        "source_fps": fps, "frames_produced": frames, "frames": c["frames"],
        "fps": steady_fps(calls),
        "fps_wall": c["frames"] / summary.seconds if summary.seconds else None,
        "wall_s": round(summary.seconds, 2),
        "latency_p50_ms": float(np.percentile(lat, 50)) if lat else None,
        "latency_p99_ms": float(np.percentile(lat, 99)) if lat else None,
        "latency_max_ms": float(np.max(lat)) if lat else None,
        "dropped": dropped, "dropped_worker": c["dropped"],
        "dropped_producer": c["producer_dropped"], "lost": frames - c["frames"],
        # lost but not counted: the producer reports its drops only in heartbeats (1 s apart;
        # the end-of-stream carries none), so drops after its last heartbeat go unreported
        "unaccounted": frames - c["frames"] - dropped,
        "mean_batch": (sum(n for _, n in calls) / len(calls)) if calls else None,
        "batches": len(calls),
        "verdicts": {"ok": c["ok"], "defect": c["defects"], "unknown": c["unknown"]},
        "rejects_fired": c["rejects"],
        "reject_lines": len(rejects.read_text().splitlines()) if rejects.exists() else 0,
        "corrupt": c["corrupt"],
        "counter_fps": c["fps"],   # the worker's own: frames / time since it was built
        "counter_latency_p50_ms": c["latency_p50_ms"],
        "counter_latency_p99_ms": c["latency_p99_ms"],
    }
    log.info("%s %s b%d: %d/%d frames, %.1f fps, p50 %.0f ms, dropped %d", model, policy,
             max_batch, row["frames"], frames, row["fps"] or 0, row["latency_p50_ms"] or 0,
             dropped)
    return row


def source_alone_fps(size: int, n: int = 10) -> float:
    """The synthetic line's own render rate in this process (what a producer can offer)."""
    from camera_sources.synthetic import SyntheticLine

    line = SyntheticLine(size=(size, size), defect_every=10)
    line.render(0)
    t = time.perf_counter()
    for seq in range(1, n + 1):
        line.render(seq)
    return n / (time.perf_counter() - t)


# --------------------------------------------------------------------------- transport


def _push(endpoint: str, n: int, shape: tuple[int, ...], sndhwm: int) -> None:
    """Child process: send n frames of `shape`, then end of stream."""
    image = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.SNDHWM, sndhwm)
    sock.setsockopt(zmq.LINGER, 5000)
    sock.connect(endpoint)
    run_id = protocol.new_run_id()
    for seq in range(n):
        # The same (unchanged) buffer each time: send is zero-copy and nobody writes into it.
        protocol.send(sock, protocol.Frame(source_id="bench", seq=seq, wall_time=time.time(),
                                           mono_ns=time.monotonic_ns(), image=image),
                      run_id=run_id)
    protocol.send(sock, protocol.EndOfStream(source_id="bench", last_seq=n - 1,
                                             reason="end of list", frames_captured=n,
                                             frames_sent=n, frames_dropped=0, frames_unsent=0),
                  run_id=run_id)
    sock.close()
    ctx.term()


def transport(kind: str, n: int, warmup: int, tmp: Path) -> dict:
    """PUSH (spawned process) -> PULL (here) of n 1080p frames, after `warmup` frames."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PULL)
    sock.setsockopt(zmq.RCVHWM, 2)     # the worker's Inbox setting
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind(protocol.default_endpoint("bench", tmp) if kind == "ipc" else "tcp://127.0.0.1:*")
    endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
    child = mp.get_context("spawn").Process(target=_push, args=(endpoint, warmup + n,
                                                                FRAME_1080P, 4), daemon=True)
    child.start()
    received, t0, nbytes = 0, None, 0
    try:
        while True:
            if not sock.poll(30_000):
                raise TimeoutError(f"transport over {kind}: nothing received for 30 s")
            msg = protocol.recv(sock)
            if isinstance(msg, protocol.EndOfStream):
                t1 = time.perf_counter()
                break
            received += 1
            if received == warmup:
                t0 = time.perf_counter()
            elif received > warmup:
                nbytes += msg.image.nbytes
    finally:
        child.join(timeout=10)
        if child.is_alive():
            child.terminate()
        sock.close(0)
        ctx.term()
    seconds = t1 - t0
    frames = received - warmup
    return {"kind": f"zmq {kind}", "endpoint": endpoint.split("://")[0] + "://",
            "frames": frames, "seconds": seconds, "fps": frames / seconds,
            "gb_per_s": nbytes / seconds / 1e9, "frame_bytes": int(np.prod(FRAME_1080P))}


def copy_baseline(n: int) -> dict:
    src = np.random.default_rng(0).integers(0, 256, FRAME_1080P, dtype=np.uint8)
    dst = np.empty_like(src)
    np.copyto(dst, src)   # fault the pages in
    t = time.perf_counter()
    for _ in range(n):
        np.copyto(dst, src)
    seconds = time.perf_counter() - t
    return {"kind": "np.copyto", "endpoint": "in-process", "frames": n, "seconds": seconds,
            "fps": n / seconds, "gb_per_s": n * src.nbytes / seconds / 1e9,
            "frame_bytes": int(src.nbytes)}


# --------------------------------------------------------------------------- repeats


def median_row(reps: list[dict], keys: tuple[str, ...]) -> dict:
    """The first repeat's fields, with `keys` replaced by their median over repeats, and
    every repeat's values (and their min-max) kept beside."""
    row = dict(reps[0])
    for k in keys:
        values = [r[k] for r in reps if r[k] is not None]
        row[k] = float(np.median(values)) if values else None
        row[f"{k}_repeats"] = [r[k] for r in reps]
    row["repeats"] = len(reps)
    return row


def aggregate(runs: list[dict]) -> list[dict]:
    """One row per (model, policy, max_batch, overlap): medians of rates and latencies, totals of
    frames and drops over the repeats."""
    rows = []
    def key_of(r):
        return r["model"], r["policy"], r["max_batch"], r["overlap"]

    for key in dict.fromkeys(key_of(r) for r in runs):
        reps = [r for r in runs if key_of(r) == key]
        row = median_row(reps, ("fps", "fps_wall", "counter_fps", "latency_p50_ms",
                                "latency_p99_ms", "mean_batch"))
        for k in ("frames_produced", "frames", "dropped", "dropped_worker", "dropped_producer",
                  "lost", "unaccounted", "rejects_fired", "reject_lines", "corrupt"):
            row[k] = sum(r[k] for r in reps)
        row["latency_max_ms"] = max(r["latency_max_ms"] or 0 for r in reps)
        row["wall_s"] = sum(r["wall_s"] for r in reps)
        row["verdicts"] = {v: sum(r["verdicts"][v] for r in reps) for v in reps[0]["verdicts"]}
        for k in ("repeat", "counter_latency_p50_ms", "counter_latency_p99_ms"):
            row.pop(k, None)
        rows.append(row)
    return rows


# --------------------------------------------------------------------------- main


def fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def spread(values: list) -> str:
    values = [v for v in values if v is not None]
    return f"{min(values):.1f}-{max(values):.1f}" if values else "-"


def load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes and few frames (tests)")
    ap.add_argument("--models", nargs="*", help="model configs (default: tiny edge; quick: tiny)")
    ap.add_argument("--run-dir", type=Path, default=ROOT / "runs" / "bench-pipeline",
                    help="line runs and the model cache (models/<config>.pt, reused)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads in the worker (0: torch's default, one per "
                         "core). 1 by default: the producer process needs a core too, and on a "
                         "busy 2-core machine 2 threads made the tiny model ~6x slower here")
    ap.add_argument("--overload", type=float, default=2.0,
                    help="latest runs: source rate = this x the every_frame frames/s")
    ap.add_argument("--repeats", type=int, help="runs of each setting; medians are reported "
                    "(default 3; quick: 1)")
    ap.add_argument("--no-batch1", action="store_true", help="skip the max_batch 1 run")
    ap.add_argument("--out", type=Path, default=RESULTS / "pipeline.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("edge", "camera_sources", "trainer", "grad", "deploy"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    settings = QUICK if args.quick else FULL
    models = args.models or settings["models"]
    args.repeats = args.repeats or (1 if args.quick else 3)

    import torch

    from deploy.runner import EagerRunner, open_runner

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    load_start = load_average()
    size = settings["size"]
    model_info, rows = {}, []
    src_fps = source_alone_fps(size)
    log.info("synthetic source alone: %.0f frames/s at %dx%d", src_fps, size, size)
    runs = []    # every line run; `rows` below: the median over repeats of each setting
    for name in models:
        info = get_model(name, args.run_dir / "models", settings["train"])
        runner = TimedRunner(open_runner(info["path"], backend="eager", device="cpu"))
        # The same model on a background thread: batch k+1 computes while batch k is judged.
        overlapped = TimedRunner(EagerRunner(info["path"], device="cpu", overlap=True))
        info.update(model_hash=runner.card.model_hash, image_size=runner.card.config.image_size,
                    threshold=runner.card.calibration.threshold)
        model_info[name] = info
        n = settings["every_frame_frames"][name]
        rate = None
        # Settings interleaved within each repeat, so drifting load on a shared machine
        # spreads over all of them rather than falling on one.
        for rep in range(args.repeats):
            ef = run_line(runner, name, info["path"], args.run_dir / f"{name}-every_frame-b8",
                          policy="every_frame", max_batch=8, frames=n, fps=None, size=size)
            runs.append({**ef, "repeat": rep})
            ov = run_line(overlapped, name, info["path"], args.run_dir / f"{name}-overlap-b8",
                          policy="every_frame", max_batch=8, frames=n, fps=None, size=size,
                          overlap=True)
            runs.append({**ov, "repeat": rep})
            if rate is None:   # fixed from the first every_frame run, the same for every repeat
                rate = round(args.overload * (ef["fps"] or 1.0), 1)
            lt = run_line(runner, name, info["path"], args.run_dir / f"{name}-latest-b8",
                          policy="latest", max_batch=8,
                          # the source cannot render faster than src_fps, whatever the pace
                          frames=max(10, int(min(rate, src_fps) * settings["latest_seconds"])),
                          fps=rate, size=size)
            runs.append({**lt, "repeat": rep})
            if name == "edge" and not args.no_batch1:
                b1 = run_line(runner, name, info["path"], args.run_dir / f"{name}-every_frame-b1",
                              policy="every_frame", max_batch=1,
                              frames=settings["batch1_frames"], fps=None, size=size)
                runs.append({**b1, "repeat": rep})
        overlapped.inner.close()
    rows = aggregate(runs)

    with tempfile.TemporaryDirectory(prefix="gebench-") as tmp:
        nt, warm = settings["transport_frames"], settings["transport_warmup"]
        trows = []
        for kind in ("ipc", "tcp"):
            reps = [transport(kind, nt, warm, Path(tmp)) for _ in range(args.repeats)]
            trows.append(median_row(reps, ("seconds", "fps", "gb_per_s")))
    copy = median_row([copy_baseline(nt) for _ in range(args.repeats)],
                      ("seconds", "fps", "gb_per_s"))
    for r in trows:
        r["ratio_to_copy"] = r["gb_per_s"] / copy["gb_per_s"]
    copy["ratio_to_copy"] = 1.0
    trows.append(copy)

    def find(model, policy, batch, overlap=False):
        return next((r for r in rows if (r["model"], r["policy"], r["max_batch"],
                                         r["overlap"]) == (model, policy, batch, overlap)), None)

    ratios = {}
    for name in models:
        ef, lt = find(name, "every_frame", 8), find(name, "latest", 8)
        if ef and lt and ef["fps"] and lt["fps"]:
            ratios[f"{name}: latest fps / every_frame fps"] = lt["fps"] / ef["fps"]
            ratios[f"{name}: latest p50 / every_frame p50"] = (
                lt["latency_p50_ms"] / ef["latency_p50_ms"])
            ratios[f"{name}: every_frame fps / synthetic source alone"] = ef["fps"] / src_fps
        ov = find(name, "every_frame", 8, overlap=True)
        if ef and ov and ef["fps"] and ov["fps"]:
            ratios[f"{name}: every_frame fps, eager overlapped / plain"] = ov["fps"] / ef["fps"]
    b1, b8 = find("edge", "every_frame", 1), find("edge", "every_frame", 8)
    if b1 and b8 and b1["fps"] and b8["fps"]:
        ratios["edge every_frame: fps max_batch 8 / max_batch 1"] = b8["fps"] / b1["fps"]
        ratios["edge every_frame: p50 max_batch 8 / max_batch 1"] = (
            b8["latency_p50_ms"] / b1["latency_p50_ms"])
    if "tiny" in models and "edge" in models:
        ratios["every_frame fps tiny / edge"] = (find("tiny", "every_frame", 8)["fps"] /
                                                 find("edge", "every_frame", 8)["fps"])
    for r in trows[:-1]:
        ratios[f"transport {r['kind']} / np.copyto (GB/s)"] = r["ratio_to_copy"]
    total_s = time.perf_counter() - start

    head = (f"{'model':<6}{'policy':<17}{'batch':>6}{'frames':>10}{'fps':>8}{'fps range':>13}"
            f"{'p50 ms':>8}{'p99 ms':>8}{'dropped':>9}{'lost':>6}")
    print(head)
    print("-" * len(head))
    for r in rows:
        policy = r["policy"] + ("+ovl" if r["overlap"] else "")
        print(f"{r['model']:<6}{policy:<17}{r['max_batch']:>6}"
              f"{str(r['frames']) + '/' + str(r['frames_produced']):>10}{fmt(r['fps'], '.1f'):>8}"
              f"{spread(r['fps_repeats']):>13}"
              f"{fmt(r['latency_p50_ms'], '.0f'):>8}{fmt(r['latency_p99_ms'], '.0f'):>8}"
              f"{r['dropped']:>9}{r['lost']:>6}")
    print(f"median of {args.repeats} run(s) per row (frames, drops: totals); synthetic source "
          f"alone {src_fps:.1f} frames/s at {size}x{size}; latest paced at {args.overload:g}x "
          "the first every_frame rate")
    print()
    head = f"{'1080p transport':<18}{'frames':>7}{'frames/s':>10}{'GB/s':>7}{'vs copy':>9}"
    print(head)
    print("-" * len(head))
    for r in trows:
        print(f"{r['kind']:<18}{r['frames']:>7}{r['fps']:>10.0f}{r['gb_per_s']:>7.2f}"
              f"{r['ratio_to_copy']:>9.3f}")
    print()
    for k, v in ratios.items():
        print(f"{k}: {v:.2f}")
    print(f"total {total_s / 60:.1f} min")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "command": " ".join(["python"] + sys.argv),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "quick": args.quick, "settings": settings, "models": model_info,
        "machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "torch_interop_threads": torch.get_num_interop_threads(),
                    "platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "pyzmq": zmq.__version__,
                    "libzmq": zmq.zmq_version(), "load_average_start": load_start,
                    "load_average_end": load_average()},
        "synthetic_source_alone_fps": src_fps,
        "repeats": args.repeats, "line": rows, "line_runs": runs, "transport": trows, "ratios": ratios, "total_s": total_s,
        "notes": "rows: median over repeats (frames and drops: totals), line_runs: every run; "
                 "CPU, eager runner; fps = steady state after the first model batch; latency "
                 "= capture (producer) -> verdict (worker) per frame from results.jsonl; "
                 "dropped = worker queue + producer queue drops as the line counts them, lost = "
                 "frames produced - frames judged; transport: one PUSH process -> PULL here, "
                 "1080x1920x3 uint8, line high-water marks (SNDHWM 4, RCVHWM 2); absolute "
                 "numbers are from this CPU, quote ratios",
    }, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
