"""The defect browser at 100,000 rows: milliseconds per page, served for real.

    python benchmarks/defect_browser.py              # 100,000 defects, 20 requests per variant
    python benchmarks/defect_browser.py --quick      # 2,000 defects, 3 requests: checks the paths

A defect log of --rows defects (10 runs, 4 sources, 10 % UNKNOWN, 5 % judged false
positive, 20 % acknowledged, one real JPEG per source as their pictures) is written by the
line's own writer. The station (`station.app`, uvicorn on a real socket) serves it; each
variant is a real HTTP GET of a whole page (the browser's HTML: filter, count, 50 rows),
timed end to end from this process:

    first          /defects, newest first
    deep_keyset    the page 50,000 rows down, reached by its keyset (`after=`): what "next"
                   costs after 1,000 clicks
    by_source      one source's newest
    by_run         one run's newest
    false_pos      only false positives
    unknown        only UNKNOWN
    time_range     a 6-hour window
    detail         one defect's page
    thumbnail      one thumbnail (decoded, resized, cached after the first)

and, in the same run, at the reader (no HTTP), what the page query would cost if paged by
OFFSET instead of keyset, at the same depth: `offset_deep` vs `keyset_deep` (the ratio is
why the browser pages by keyset).

Prints a table and writes benchmarks/results/station.json.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import sqlite3
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import cv2  # noqa: E402
import numpy as np  # noqa: E402
from sqlalchemy import select  # noqa: E402

from edge.defect_log import DefectFilter, DefectLogReader, DefectLogWriter, DefectRecord  # noqa: E402
from edge.defect_log.tables import DefectRow  # noqa: E402
from station.app import StationSettings  # noqa: E402
from station.link import HttpLineLink  # noqa: E402
from station.server import StationServer  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SOURCES = ("cam0", "cam1", "cam2", "cam3")
START = 1_780_000_000.0


def build_log(folder: Path, rows: int) -> tuple[Path, Path]:
    """The defect log, written by the line's writer (no journal: a throwaway database)."""
    images = folder / "images" / "2026-01-01"
    images.mkdir(parents=True)
    rng = np.random.default_rng(0)
    pictures = {}
    for sid in SOURCES:
        pictures[sid] = images / f"{sid}_frame.jpg"
        cv2.imwrite(str(pictures[sid]), rng.integers(0, 255, (480, 640, 3), dtype=np.uint8))
    db = folder / "defects.db"
    writer = DefectLogWriter(db, journal=False, batch_size=1000, queue_size=100_000).start()
    runs = [writer.begin_run(model_hash="bench", started_at=START + r * 86_400)
            for r in range(10)]
    per_run = rows // len(runs)
    for i in range(rows):
        sid = SOURCES[i % len(SOURCES)]
        run = runs[min(i // per_run, len(runs) - 1)]
        writer.submit(DefectRecord(
            source_id=sid, seq=i, time=START + i * 8.64, verdict="UNKNOWN" if i % 10 == 9
            else "DEFECT", reason="score 3.1 >= 2.5", part_id=i, encoder=i * 100,
            raw_score=2.5 + (i % 97) / 50, threshold=2.5, box=(100, 120, 180, 200),
            area_px=900, frame_path=str(pictures[sid]), heatmap_path=str(pictures[sid]),
            run_id=run, reject=True))
    for run in runs:
        writer.end_run(run, {"frames": per_run * 10})
    writer.stop(timeout=600)
    # Judgements in bulk (setup only; the station records each through the reader).
    with sqlite3.connect(db) as con:
        con.execute("UPDATE defects SET acknowledged = 1, judgement = 'false_positive', "
                    "judged_by = 'bench', judgements = 1 WHERE id % 20 = 0")
        con.execute("UPDATE defects SET acknowledged = 1, judgement = 'ack', "
                    "judged_by = 'bench', judgements = 1 WHERE id % 5 = 1")
    return db, folder / "images"


def timed_get(port: int, path: str, n: int) -> tuple[list[float], int]:
    """n GETs, each on a new connection (as curl does; on one kept-alive connection this
    machine adds a 40 ms delayed-ACK stall to every response, whatever the page)."""
    times, size = [], 0
    for _ in range(n):
        t0 = time.perf_counter()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        conn.request("GET", path)
        r = conn.getresponse()
        body = r.read()
        conn.close()
        times.append(1000 * (time.perf_counter() - t0))
        if r.status != 200:
            raise RuntimeError(f"GET {path}: HTTP {r.status}: {body[:200]!r}")
        size = len(body)
    return times, size


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="2,000 rows, 3 requests")
    parser.add_argument("--out", type=Path, default=RESULTS / "station.json")
    args = parser.parse_args()
    rows, n = (2_000, 3) if args.quick else (args.rows, args.requests)
    load_start = os.getloadavg()

    with tempfile.TemporaryDirectory(prefix="station-bench-") as tmp:
        t0 = time.perf_counter()
        db, images = build_log(Path(tmp), rows)
        build_s = time.perf_counter() - t0
        print(f"built {rows} defects in {build_s:.1f} s", file=sys.stderr)
        depth = rows // 2
        with DefectLogReader(db) as reader:
            with reader.engine.connect() as conn:
                key = conn.execute(select(DefectRow.time, DefectRow.id).order_by(
                    DefectRow.time.desc(), DefectRow.id.desc()).offset(depth).limit(1)).one()
            run_ids = [r.id for r in reader.list_runs()]
            # Reader level: keyset vs OFFSET at the same depth, interleaved.
            keyset, offset = [], []
            for _ in range(n):
                t = time.perf_counter()
                page = reader.browse(DefectFilter(), after=tuple(key), limit=50)
                keyset.append(1000 * (time.perf_counter() - t))
                t = time.perf_counter()
                with reader.engine.connect() as conn:
                    by_offset = conn.execute(select(DefectRow).order_by(
                        DefectRow.time.desc(), DefectRow.id.desc()).offset(depth + 1)
                        .limit(50)).all()
                offset.append(1000 * (time.perf_counter() - t))
            assert [r.id for r in page.rows] == [r.id for r in by_offset]

        dead = HttpLineLink("http://127.0.0.1:9/metrics", timeout_s=0.2)
        server = StationServer(StationSettings(db=str(db), images=images, run_dir=Path(tmp),
                                               link=dead), 0).start()
        time.sleep(0.5)
        after = "%r_%d" % (key[0], key[1])
        middle = START + rows * 8.64 / 2
        since = datetime.fromtimestamp(middle).strftime("%Y-%m-%dT%H:%M")
        until = datetime.fromtimestamp(middle + 6 * 3600).strftime("%Y-%m-%dT%H:%M")
        variants = {
            "first": "/defects", "deep_keyset": f"/defects?after={after}",
            "by_source": "/defects?source=cam2", "by_run": f"/defects?run={run_ids[3]}",
            "false_pos": "/defects?fp=yes", "unknown": "/defects?verdict=UNKNOWN",
            "time_range": f"/defects?since={since}&until={until}",
            "detail": f"/defects/{rows // 3}", "thumbnail": f"/defects/{rows // 3}/thumb.jpg"}
        table = []
        try:
            for name, path in variants.items():
                timed_get(server.port, path, 1)                 # warm: caches, first query
                times, size = timed_get(server.port, path, n)
                table.append({"variant": name, "path": path,
                              "ms_median": statistics.median(times),
                              "ms_p90": sorted(times)[int(0.9 * (len(times) - 1))],
                              "bytes": size})
        finally:
            server.stop()
    table += [{"variant": "reader_keyset_deep", "path": f"browse(after=row {depth})",
               "ms_median": statistics.median(keyset), "ms_p90": sorted(keyset)[
                   int(0.9 * (n - 1))], "bytes": None},
              {"variant": "reader_offset_deep", "path": f"OFFSET {depth}",
               "ms_median": statistics.median(offset), "ms_p90": sorted(offset)[
                   int(0.9 * (n - 1))], "bytes": None}]
    first = table[0]["ms_median"]
    for row in table:
        row["ratio_to_first"] = row["ms_median"] / first
    ratio = statistics.median(offset) / statistics.median(keyset)

    print(f"\n{'variant':<20} {'ms p50':>8} {'ms p90':>8} {'x first':>8}")
    for row in table:
        print(f"{row['variant']:<20} {row['ms_median']:>8.1f} {row['ms_p90']:>8.1f} "
              f"{row['ratio_to_first']:>8.2f}")
    print(f"\nOFFSET / keyset at row {depth}: {ratio:.1f}x")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "command": " ".join(["python"] + sys.argv),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "quick": args.quick, "rows": rows, "requests_per_variant": n, "page_size": 50,
        "build_seconds": round(build_s, 1),
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(),
                    "load_average_start": [round(x, 2) for x in load_start],
                    "load_average_end": [round(x, 2) for x in os.getloadavg()]},
        "rows_measured": table,
        "offset_over_keyset_at_depth": ratio,
        "notes": ("ms per whole page over real HTTP from the same machine (uvicorn, a new "
                  "connection per request, sequential requests); each page counts its matches (capped at "
                  "10,001) and renders 50 rows. reader_* rows time the page query alone."),
    }, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
