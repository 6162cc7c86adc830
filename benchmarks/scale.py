"""Beyond one host: what moving frames costs the worker, by transport and by number of
producers, in one run on this machine.

    python benchmarks/scale.py              # 1080p frames; a few minutes on 2 cores
    python benchmarks/scale.py --quick      # small frames, few of them: checks the code paths

Every row is the line's own code: `camera_sources.producer.Producer` processes (spawned, as the
supervisor starts them; `grad-edge produce` runs the same Producer on a camera host) pushing
into the worker's intake (`edge.inbox.Inbox` per source, the `Batcher` across them, as
`edge.worker.Worker` builds them) in this process. The model is left out -- its cost is
`benchmarks/pipeline.py`'s -- so what is measured is the transport. Each producer captures
every frame as a camera driver does, by writing it into memory (a copy of one stored 1080p
image: rendering a new one would measure the renderer), into the buffer its source is
given: a fresh array, or under shm a slot of the frame ring, from which it travels with no
further copy. So every row pays one capture copy per frame, and the in-process copy is the
cost of exactly that.

Transports: `ipc` (the default, unix socket), `shm` (pixels in the shared-memory frame ring,
the header over ipc), `tcp` (loopback, as a camera host's producer would connect) and
`tcp+curve` (the same with CURVE, as the worker requires beyond loopback).

Tables:

  1080p transport   one producer of 1920x1080x3 frames: frames/s, GB/s and the ratio to an
                    in-process copy (np.copyto into a preallocated buffer, as pipeline.py
                    measures it, into the next of 8 buffers, as frames land in a queue or a
                    ring, and into 8 slots of shared memory, the memory the ring has: numpy's
                    own buffers get transparent huge pages, shared memory only where the
                    kernel's shmem_enabled allows), p99 latency (capture -> in a batch); the
                    CPU time of both
                    processes per frame, and from it CURVE's cost per 1080p frame
                    (tcp+curve - tcp)
  producers         1, 2 and 4 producers, each its own source, into one intake: total
                    frames/s and p99 latency (capture -> in a batch), as ratios to the
                    single-producer ipc run of the same benchmark run
  worker processes  the whole line with the model (real `grad-edge run`s, tiny GRAD on CPU),
                    1, 2 and 4 producers into 1 and 2 worker processes: judged frames/s and
                    p99 latency, as ratios to its 1 producer x 1 worker run
  defect log        SQLite vs PostgreSQL writes/s: benchmarks/defect_log.py (referenced)

Settings are interleaved within each repeat, so a load that drifts on a shared machine
falls on all of them; rows are medians over repeats. Absolute numbers are this CPU's; quote
the ratios. Writes benchmarks/results/scale.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import multiprocessing as mp
import os
import platform
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import zmq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# Light imports only: producers are spawned, and a spawned child imports this file again.
from camera_sources.base import FrameSource, make_frame  # noqa: E402
from camera_sources.producer import Producer  # noqa: E402
from edge import protocol  # noqa: E402
from edge.inbox import Batcher, Inbox  # noqa: E402
from edge.protocol import DropPolicy  # noqa: E402
from edge.security import ClientKeys, ServerKeys, load_public, load_secret, make_keys  # noqa: E402

log = logging.getLogger("scale-bench")
RESULTS = Path(__file__).resolve().parent / "results"
RUN = "scalebench000001"
TRANSPORTS = ("ipc", "shm", "tcp", "tcp+curve")
RING_SLOTS = 8            # the config's default: as many as a batch holds

FULL = {"shape": (1080, 1920, 3), "transport_frames": 200, "warmup": 10,
        "producers": (1, 2, 4), "frames_per_producer": 120, "repeats": 3, "line_frames": 150}
QUICK = {"shape": (120, 160, 3), "transport_frames": 30, "warmup": 3,
         "producers": (1, 2), "frames_per_producer": 20, "repeats": 1, "line_frames": 10}
LINE_FRAME = (256, 256)      # the whole-line rows' synthetic frames (the tiny model's input)


# --------------------------------------------------------------------------- producer side


class CaptureSource(FrameSource):
    """``n`` frames as fast as the producer takes them, each captured the way a camera
    driver captures: written into memory -- here a copy of one stored image -- into the
    buffer the source is given (a frame-ring slot under shm) or a fresh array."""

    def __init__(self, source_id: str, n: int, shape: tuple[int, ...]):
        self.source_id = source_id
        self.n = n
        self.image = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)

    def frames(self, stop):
        for seq in range(self.n):
            if stop.is_set():
                self.end_reason = "stopped"
                return
            buf = self.buffer(self.image.shape)
            if buf is None:
                buf = np.empty(self.image.shape, np.uint8)
            np.copyto(buf, self.image)
            yield make_frame(self.source_id, seq, buf)
        self.end_reason = "end of list"


def produce(source_id: str, endpoint: str, n: int, shape: tuple, transport: str,
            keys_dir: str | None, ready, go, done, cpu_out, ring_slots: int) -> None:
    """Child process: one Producer of n frames, started when every producer is ready; the
    CPU seconds it spends from then on go to ``cpu_out``. It stays connected until ``done``
    (the worker has every end-of-stream): a PUSH socket that closes while the worker's pipe
    is full loses what the kernel still holds (libzmq #160; see Producer)."""
    curve = None
    if transport == "tcp+curve":
        public, secret = load_secret(Path(keys_dir) / "cam.key")
        curve = ClientKeys(public, secret, load_public(Path(keys_dir) / "worker.key"))
    producer = Producer(CaptureSource(source_id, n, shape), endpoint, run_id=RUN,
                        curve=curve, ring_slots=ring_slots if transport == "shm" else None,
                        eos_drain_s=60.0)
    ready.set()
    go.wait()
    cpu0 = time.process_time()
    producer.run(done)
    cpu_out.value = time.process_time() - cpu0


# --------------------------------------------------------------------------- worker side


class Intake:
    """The worker's intake for ``n`` sources over one transport, in this process."""

    def __init__(self, transport: str, n: int, tmp: Path, keys_dir: Path):
        self.ctx = zmq.Context()
        self.arrived = threading.Event()
        self.stop = threading.Event()
        curve = None
        if transport == "tcp+curve":
            public, secret = load_secret(keys_dir / "worker.key")
            curve = ServerKeys(public, secret, frozenset({load_public(keys_dir / "cam.key")}))
        self.inboxes = []
        for i in range(n):
            endpoint = ("tcp://127.0.0.1:*" if transport.startswith("tcp")
                        else protocol.default_endpoint(f"src-s{i}", tmp))
            self.inboxes.append(Inbox(self.ctx, f"s{i}", endpoint, DropPolicy.EVERY_FRAME, 8,
                                      self.arrived, run_id=RUN, curve=curve,
                                      ring=transport == "shm"))
        for inbox in self.inboxes:
            inbox.start(self.stop)
        self.batcher = Batcher(self.inboxes, 8, 0.005, self.arrived)

    def close(self) -> None:
        self.stop.set()
        for inbox in self.inboxes:
            inbox.join()
        self.ctx.destroy(linger=0)


def measure(transport: str, n_producers: int, frames: int, warmup: int, shape: tuple,
            tmp: Path, keys_dir: Path, ring_slots: int = None) -> dict:
    """n producers of ``frames`` frames each into one intake; rates after ``warmup`` each."""
    intake = Intake(transport, n_producers, tmp, keys_dir)
    spawn = mp.get_context("spawn")
    cpu = [spawn.Value("d", 0.0) for _ in range(n_producers)]
    ready = [spawn.Event() for _ in range(n_producers)]
    go, done = spawn.Event(), spawn.Event()
    procs = [spawn.Process(target=produce, args=(inbox.source_id, inbox.endpoint, frames,
                                                 shape, transport, str(keys_dir), ready[i], go,
                                                 done, cpu[i], ring_slots or RING_SLOTS),
                           daemon=True) for i, inbox in enumerate(intake.inboxes)]
    for p in procs:
        p.start()
    # All producers up (processes started, sockets connected) before the first frame: the
    # window measures streaming, not process start-up.
    for event in ready:
        assert event.wait(60), f"{transport}: a producer did not start"
    go.set()
    taken, latencies, nbytes = 0, [], 0
    t0 = cpu0 = None
    ended = 0
    deadline = time.monotonic() + float(os.environ.get("SCALE_STALL_S", 300))
    try:
        while ended < n_producers:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{transport} x{n_producers}: stalled: " + "; ".join(
                    f"{i.source_id} received {i.stats.received} queued {i.queue.qsize()} "
                    f"ended {i.end is not None} corrupt {i.stats.corrupt} ring "
                    f"{i.ring.stats if i.ring else '-'}" for i in intake.inboxes)
                    + f"; producers alive {[p.is_alive() for p in procs]}")
            batch, ends = intake.batcher.next_batch(timeout=1.0)
            now = time.monotonic_ns()
            ended += len(ends)
            for frame in batch:
                taken += 1
                if taken == warmup * n_producers:
                    t0, cpu0 = time.perf_counter(), time.process_time()
                elif t0 is not None:
                    latencies.append((now - frame.mono_ns) / 1e6)
                    nbytes += frame.image.nbytes
            batch = frame = None      # judged: their ring slots go back
        t1, cpu1 = time.perf_counter(), time.process_time()
    finally:
        done.set()
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
        intake.close()
        gc.collect()
    counted = len(latencies)
    seconds = t1 - t0
    return {"transport": transport, "producers": n_producers, "frames": counted,
            "received": taken, "expected": frames * n_producers, "seconds": seconds,
            "fps": counted / seconds, "gb_per_s": nbytes / seconds / 1e9,
            "latency_p50_ms": float(np.percentile(latencies, 50)),
            "latency_p99_ms": float(np.percentile(latencies, 99)),
            # CPU per frame: the producers from their first frame on (warm-up included) and
            # this process over the measured window.
            "producer_cpu_ms_per_frame": 1000 * sum(c.value for c in cpu) / taken,
            "worker_cpu_ms_per_frame": 1000 * (cpu1 - cpu0) / counted}


def copy_baseline(n: int, shape: tuple, buffers: int = 1, shared: bool = False) -> dict:
    """np.copyto of one frame into a preallocated buffer, n times: with ``buffers=1`` the
    yardstick of benchmarks/pipeline.py (source and destination stay in the CPU's cache);
    with ``buffers=RING_SLOTS`` each copy lands in the next of that many buffers, as frames
    do in a queue or a ring (a 1080p frame is 6 MB: eight of them do not stay in cache).
    ``shared``: the buffers are slots of a memfd mapped shared, the memory the frame ring
    uses. numpy backs its own large arrays with transparent huge pages; shared memory gets
    them only where the kernel allows it (/sys/kernel/mm/transparent_hugepage/shmem_enabled),
    and 4 KB pages make the same copy slower, so this is the ring's like-for-like yardstick."""
    import mmap

    src = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    if shared:
        fd = os.memfd_create("scale-copy")
        os.ftruncate(fd, src.nbytes * buffers)
        mm = mmap.mmap(fd, src.nbytes * buffers, mmap.MAP_SHARED,
                       mmap.PROT_READ | mmap.PROT_WRITE)
        os.close(fd)
        slots = np.frombuffer(mm, np.uint8).reshape(buffers, *shape)
        dsts = [slots[i] for i in range(buffers)]
    else:
        dsts = [np.empty_like(src) for _ in range(buffers)]
    for dst in dsts:
        np.copyto(dst, src)   # fault the pages in
    t = time.perf_counter()
    for i in range(n):
        np.copyto(dsts[i % buffers], src)
    seconds = time.perf_counter() - t
    name = "in-process copy" + (f", {buffers} buffers" if buffers > 1 else "") + (
        " in shared memory" if shared else "")
    # The shared memory goes with the last view of it (mm closes itself when collected).
    return {"transport": name, "producers": 1, "frames": n, "seconds": seconds,
            "fps": n / seconds, "gb_per_s": n * src.nbytes / seconds / 1e9,
            "latency_p50_ms": None, "latency_p99_ms": None,
            "producer_cpu_ms_per_frame": None, "worker_cpu_ms_per_frame": 1000 * seconds / n}


def median_row(reps: list[dict]) -> dict:
    row = dict(reps[0])
    for k, v in reps[0].items():
        if isinstance(v, float):
            values = [r[k] for r in reps if r[k] is not None]
            row[k] = float(np.median(values)) if values else None
            row[f"{k}_repeats"] = [r[k] for r in reps]
    row["repeats"] = len(reps)
    return row


# --------------------------------------------------------------------------- rows others add


def line_clip(path: Path, frames: int) -> Path:
    """A recorded clip of the synthetic line for the whole-line rows: a video source paced
    `fast` hands the worker every frame as soon as it takes it (no belt to outrun)."""
    import cv2

    from camera_sources.synthetic import SyntheticLine

    line = SyntheticLine(seed=0, size=LINE_FRAME)
    out = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 30.0,
                          (LINE_FRAME[1], LINE_FRAME[0]))
    for i in range(frames):
        out.write(line.render(i)[0])
    out.release()
    return path


def line_run(n_producers: int, n_workers: int, clip: Path, frames: int, tmp: Path,
             model: Path) -> dict:
    """One whole `grad-edge run` (a real process tree: producers, worker processes, model,
    rules, defect log): ``n_producers`` video sources of ``frames`` frames each, paced
    `fast` with `every_frame` (the model is the limit), split over ``n_workers`` worker
    processes (1: the line's own process judges)."""
    import subprocess

    import yaml

    folder = Path(tempfile.mkdtemp(prefix=f"line{n_producers}x{n_workers}-", dir=tmp))
    ids = [f"cam{i}" for i in range(n_producers)]
    cfg = {
        "run_dir": "run",
        "model": {"path": str(model), "backend": "eager", "device": "cpu"},
        "sources": [{"id": sid, "kind": "video", "path": str(clip), "pace": "fast",
                     "drop_policy": "every_frame"} for sid in ids],
        "rules": {"default": {"threshold": 1e9}},       # no defects: measure the judging
        "defect_log": {"url": "sqlite:///run/defects.db", "images": "run/images",
                       "journal_fsync": False},
        "status_interval_s": 0,
    }
    if n_workers > 1:
        cfg["workers"] = [{"id": f"w{w}", "sources": ids[w::n_workers]}
                          for w in range(n_workers)]
    (folder / "line.yaml").write_text(yaml.safe_dump(cfg))
    r = subprocess.run([sys.executable, "-m", "edge.cli", "run", "line.yaml"], cwd=folder,
                       capture_output=True, text=True, timeout=900)
    if r.returncode != 0:
        raise RuntimeError(f"line run {n_producers}x{n_workers} failed: {r.stderr[-2000:]}")
    summary = json.loads((folder / "run" / "summary.json").read_text())
    if n_workers > 1:
        lives = [w["summary"] for w in summary["workers"].values()]
        judged = sum(x["counters"]["frames"] for x in lives)
        seconds = max(x["seconds"] for x in lives)      # judging time, after model load
        p99 = max(x["counters"]["latency_p99_ms"] for x in lives)
    else:
        judged, seconds = summary["counters"]["frames"], summary["seconds"]
        p99 = summary["counters"]["latency_p99_ms"]
    if judged != frames * n_producers:
        raise RuntimeError(f"line run {n_producers}x{n_workers}: judged {judged} of "
                           f"{frames * n_producers} frames")
    return {"transport": "ipc", "producers": n_producers, "workers": n_workers,
            "frames": judged, "seconds": seconds, "fps": judged / seconds,
            "latency_p99_ms": p99}


def worker_process_rows(settings: dict, tmp: Path, repeats: int) -> list[dict]:
    """1 vs 2 worker processes: the whole line with the model (a real `grad-edge run` each),
    1, 2 and 4 producers, as ratios to the single-producer, single-worker run of this
    benchmark run (rows without the model are not comparable: the model is the cost here).
    On a CPU the workers split its cores (edge.pool), so 2 workers pay off only where one
    worker cannot use every core; on a host with a GPU per worker each has its own device."""
    import torch

    from grad.checkpoint import Calibration, save_checkpoint
    from grad.config import get_config
    from grad.model import GRAD

    torch.manual_seed(0)
    model = tmp / "tiny.pt"
    save_checkpoint(model, GRAD(get_config("tiny")).eval(),
                    Calibration(mean=0.0, std=1.0, threshold=1.0, n_images=10, rule="bench"))
    clip = line_clip(tmp / "line.avi", settings["line_frames"])
    runs = []
    for rep in range(repeats):
        for n in settings["producers"]:
            for workers in (1, 2):
                if workers > n:
                    continue
                log.info("line: %d producer(s) into %d worker process(es), repeat %d",
                         n, workers, rep + 1)
                runs.append(line_run(n, workers, clip, settings["line_frames"], tmp, model))
    rows = []
    for key in dict.fromkeys((r["producers"], r["workers"]) for r in runs):
        reps = [r for r in runs if (r["producers"], r["workers"]) == key]
        row = dict(reps[len(reps) // 2])
        for k in ("fps", "latency_p99_ms", "seconds"):
            row[k] = float(np.median([r[k] for r in reps]))
            row[f"{k}_repeats"] = [r[k] for r in reps]
        rows.append(row)
    base = next(r for r in rows if (r["producers"], r["workers"]) == (1, 1))
    for r in rows:
        r["fps_vs_line_1x1"] = r["fps"] / base["fps"]
        r["p99_vs_line_1x1"] = r["latency_p99_ms"] / base["latency_p99_ms"]
    return rows


def defect_log_reference() -> dict:
    """SQLite vs PostgreSQL defect writes per second are measured by benchmarks/defect_log.py
    (the PostgreSQL engineer's rows); quoted from its results file when they are there."""
    path = RESULTS / "defect_log.json"
    try:
        result = json.loads(path.read_text())
    except (OSError, ValueError):
        result = {}
    found = {k: v for k, v in result.items() if "postgres" in k.lower()}
    return {"measured_by": "benchmarks/defect_log.py", "results": str(path.relative_to(
        RESULTS.parent.parent)), "postgresql": found or None}


# --------------------------------------------------------------------------- main


def fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small frames, few of them (tests)")
    ap.add_argument("--repeats", type=int, help="runs of each setting (default 3; quick 1)")
    ap.add_argument("--out", type=Path, default=RESULTS / "scale.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("edge", "camera_sources"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    settings = dict(QUICK if args.quick else FULL)
    repeats = args.repeats or settings["repeats"]
    shape = settings["shape"]
    start = time.perf_counter()
    load_start = os.getloadavg()

    runs: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="gescale-") as tmp:
        tmp = Path(tmp)
        keys_dir = tmp / "keys"
        make_keys(keys_dir, ["worker", "cam"])
        for rep in range(repeats):
            log.info("repeat %d/%d", rep + 1, repeats)
            runs.append({**copy_baseline(settings["transport_frames"], shape), "table": "copy",
                         "repeat": rep})
            runs.append({**copy_baseline(settings["transport_frames"], shape, RING_SLOTS),
                         "table": "copy", "repeat": rep})
            runs.append({**copy_baseline(settings["transport_frames"], shape, RING_SLOTS,
                                         shared=True), "table": "copy", "repeat": rep})
            for transport in TRANSPORTS:
                row = measure(transport, 1, settings["transport_frames"] + settings["warmup"],
                              settings["warmup"], shape, tmp, keys_dir)
                runs.append({**row, "table": "transport", "repeat": rep})
            for n in settings["producers"]:
                for transport in TRANSPORTS:
                    row = measure(transport, n, settings["frames_per_producer"],
                                  settings["warmup"], shape, tmp, keys_dir)
                    runs.append({**row, "table": "producers", "repeat": rep})
        line_rows = worker_process_rows(settings, tmp, repeats)

    def rows_of(table: str) -> list[dict]:
        keys = dict.fromkeys((r["transport"], r["producers"]) for r in runs
                             if r["table"] == table)
        return [median_row([r for r in runs if r["table"] == table
                            and (r["transport"], r["producers"]) == key]) for key in keys]

    copy, copy_n, copy_shm = rows_of("copy")
    transport_rows = [copy, copy_n, copy_shm, *rows_of("transport")]
    for r in transport_rows:
        r["ratio_to_copy"] = r["gb_per_s"] / copy["gb_per_s"]
        r[f"ratio_to_copy_{RING_SLOTS}_buffers"] = r["gb_per_s"] / copy_n["gb_per_s"]
        r["ratio_to_copy_shared_memory"] = r["gb_per_s"] / copy_shm["gb_per_s"]
        # The same ratio within each repeat: load on a shared machine drifts between them.
        r["ratio_to_copy_repeats"] = [a / b for a, b in zip(r["gb_per_s_repeats"],
                                                             copy["gb_per_s_repeats"])]
    by = {r["transport"]: r for r in transport_rows}
    curve_cost = {
        "producer_ms_per_frame": (by["tcp+curve"]["producer_cpu_ms_per_frame"]
                                  - by["tcp"]["producer_cpu_ms_per_frame"]),
        "worker_ms_per_frame": (by["tcp+curve"]["worker_cpu_ms_per_frame"]
                                - by["tcp"]["worker_cpu_ms_per_frame"]),
    }
    curve_cost["total_ms_per_frame"] = (curve_cost["producer_ms_per_frame"]
                                        + curve_cost["worker_ms_per_frame"])
    producer_rows = rows_of("producers")
    base = next(r for r in producer_rows if (r["transport"], r["producers"]) == ("ipc", 1))
    for r in producer_rows:
        r["fps_vs_ipc_1"] = r["fps"] / base["fps"]
        r["p99_vs_ipc_1"] = r["latency_p99_ms"] / base["latency_p99_ms"]
    total_s = time.perf_counter() - start

    h, w = shape[:2]
    head = (f"{f'{w}x{h} transport':<43}{'frames/s':>9}{'GB/s':>7}{'vs copy':>9}"
            f"{f'vs copy x{RING_SLOTS}':>12}{'vs shm copy':>12}{'p99 ms':>8}"
            f"{'CPU ms/frame prod+worker':>26}")
    print(head)
    print("-" * len(head))
    for r in transport_rows:
        cpu = ("-" if r["producer_cpu_ms_per_frame"] is None else
               f"{r['producer_cpu_ms_per_frame']:.2f} + {r['worker_cpu_ms_per_frame']:.2f}")
        print(f"{r['transport']:<43}{r['fps']:>9.0f}{r['gb_per_s']:>7.2f}"
              f"{r['ratio_to_copy']:>9.2f}{r[f'ratio_to_copy_{RING_SLOTS}_buffers']:>12.2f}"
              f"{r['ratio_to_copy_shared_memory']:>12.2f}"
              f"{fmt(r['latency_p99_ms'], '.1f'):>8}{cpu:>26}")
    print(f"CURVE costs {curve_cost['total_ms_per_frame']:.2f} ms of CPU per {w}x{h} frame "
          f"({curve_cost['producer_ms_per_frame']:.2f} producer + "
          f"{curve_cost['worker_ms_per_frame']:.2f} worker)")
    print()
    head = (f"{'producers':<11}{'transport':<11}{'frames/s':>10}{'vs ipc x1':>10}"
            f"{'p99 ms':>8}{'vs ipc x1':>10}")
    print(head)
    print("-" * len(head))
    for r in producer_rows:
        print(f"{r['producers']:<11}{r['transport']:<11}{r['fps']:>10.0f}"
              f"{r['fps_vs_ipc_1']:>10.2f}{r['latency_p99_ms']:>8.1f}{r['p99_vs_ipc_1']:>10.2f}")
    print()
    head = (f"{'whole line':<11}{'workers':<9}{'frames/s':>10}{'vs 1x1':>8}{'p99 ms':>9}"
            f"{'vs 1x1':>8}")
    print(head)
    print("-" * len(head))
    for r in line_rows:
        print(f"{r['producers']:<11}{r['workers']:<9}{r['fps']:>10.1f}"
              f"{r['fps_vs_line_1x1']:>8.2f}{r['latency_p99_ms']:>9.1f}"
              f"{r['p99_vs_line_1x1']:>8.2f}")
    ref = defect_log_reference()
    print(f"defect log, SQLite vs PostgreSQL writes/s: {ref['measured_by']} "
          f"({'quoted in scale.json' if ref['postgresql'] else 'not measured yet'})")
    print(f"median of {repeats} run(s) per row; total {total_s / 60:.1f} min")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "command": " ".join(["python"] + sys.argv),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "quick": args.quick, "settings": settings, "repeats": repeats,
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(), "pyzmq": zmq.__version__,
                    "libzmq": zmq.zmq_version(), "load_average_start": load_start,
                    "load_average_end": os.getloadavg()},
        "transport": transport_rows, "curve_cpu_cost": curve_cost,
        "producers": producer_rows,
        "worker_processes": line_rows,           # the whole line, 1 vs 2 worker processes
        "defect_log": ref,                       # SQLite vs PostgreSQL: benchmarks/defect_log.py
        "runs": runs, "total_s": total_s,
        "notes": "Producer processes (spawned) -> Inbox per source + Batcher in this process, "
                 "no model; every_frame, the line's queue sizes and high-water marks; one "
                 "frame repeated; latency = capture -> taken (transport table: from the "
                 "intake's batcher, producers table likewise); fps over the frames after "
                 "each producer's warm-up; CPU: producer processes' whole lives / frames, "
                 "this process over the measured window / frames. Quote ratios.",
    }, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
