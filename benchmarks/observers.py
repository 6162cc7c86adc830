"""What publishing costs the worker: the per-frame observers on the worker's thread.

    python benchmarks/observers.py            # 20,000 frames per observer, 3 repeats
    python benchmarks/observers.py --quick

The worker calls each observer once per judged frame (`Worker.observers`): the metrics
collector (`edge.metrics.LineCollector.observe`), the live frames (`edge.live.LiveFrames
.observe`, which only keeps a reference; the JPEG is drawn on its own thread) and the
near-threshold keeper (`edge.keep.NearThresholdKeeper.observe`, which queues the frames it
keeps; the PNG is written on its own thread). Each is timed alone on the same frames (a 256 x
256 frame, its 32 x 32 map), interleaved over the repeats; `all` is the three together, as
the line runs them. Frames for the keeper score just under the threshold every 10th frame,
with its rate limit as configured, so it queues some and skips most.

Prints a table (microseconds per frame: median of the repeats' medians, and p99) and writes
benchmarks/results/observers.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from edge.defect_log import DefectLogWriter  # noqa: E402
from edge.keep import NearThresholdKeeper  # noqa: E402
from edge.live import LiveFrames  # noqa: E402
from edge.metrics import LineCollector  # noqa: E402
from edge.protocol import Frame  # noqa: E402
from edge.results import Decision, FrameResult, Verdict  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


class Inbox:
    """The two attributes LineCollector reads at construction."""

    def __init__(self, source_id: str) -> None:
        self.source_id = source_id


class Worker:
    inboxes = [Inbox("line1")]


def frames(n: int) -> list[tuple]:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)
    amap = rng.random((32, 32), dtype=np.float32)
    out = []
    for seq in range(n):
        near = seq % 10 == 0
        score = 0.95 if near else 0.5
        frame = Frame(source_id="line1", seq=seq, wall_time=time.time(),
                      mono_ns=time.monotonic_ns(), image=image, truth=0)
        result = FrameResult(source_id="line1", seq=seq, part_id=seq, encoder=None,
                             wall_time=frame.wall_time, capture_mono_ns=frame.mono_ns,
                             frame_shape=(256, 256), raw_score=score, calibrated_score=score,
                             threshold=1.0, anomaly_map=amap)
        out.append((frame, result, Decision(result, Verdict.OK, False, "below")))
    return out


def time_calls(observe, batch: list[tuple]) -> list[float]:
    times = []
    for frame, result, decision in batch:
        t0 = time.perf_counter_ns()
        observe(frame, result, decision)
        times.append((time.perf_counter_ns() - t0) / 1000)
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS / "observers.json")
    args = parser.parse_args()
    n, repeats = (500, 1) if args.quick else (args.frames, args.repeats)
    batch = frames(n)
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="observers-bench-") as tmp:
        writer = DefectLogWriter(Path(tmp) / "d.db", journal=False).start()
        run_id = writer.begin_run()
        collector = LineCollector(Worker(), writer, run_id=run_id)
        live = LiveFrames(6, 2.0).start()
        keeper = NearThresholdKeeper(writer, str(Path(tmp) / "images"), band=0.1,
                                     max_per_minute=30, run_id=run_id).start()

        def together(frame, result, decision):
            for observe in (collector.observe, live.observe, keeper.observe):
                observe(frame, result, decision)

        variants = {"metrics": collector.observe, "live_frames": live.observe,
                    "keeper": keeper.observe, "all": together}
        runs: dict[str, list[list[float]]] = {k: [] for k in variants}
        for _ in range(repeats):
            for name, observe in variants.items():
                runs[name].append(time_calls(observe, batch))
        keeper.stop()
        live.stop()
        writer.stop()
    rows = []
    for name, reps in runs.items():
        rows.append({"observer": name,
                     "us_median": statistics.median(statistics.median(r) for r in reps),
                     "us_p99": statistics.median(sorted(r)[int(0.99 * (len(r) - 1))]
                                                 for r in reps)})
    print(f"\n{'observer':<12} {'us/frame p50':>13} {'p99':>8}")
    for row in rows:
        print(f"{row['observer']:<12} {row['us_median']:>13.2f} {row['us_p99']:>8.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "command": " ".join(["python"] + sys.argv),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "quick": args.quick, "frames": n, "repeats": repeats, "rows": rows,
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(),
                    "load_average_start": [round(x, 2) for x in load_start],
                    "load_average_end": [round(x, 2) for x in os.getloadavg()]},
        "notes": ("microseconds the worker's thread spends per judged frame in each "
                  "observer; a frame at 30 fps has 33,000 us. The JPEG of live frames and "
                  "the PNG of kept frames are made on threads of their own."),
    }, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
