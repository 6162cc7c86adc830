"""What the defect log's journal costs per record: the writer with and without it, one run.

    python benchmarks/defect_log.py                  # 3 repeats x 3 variants, ~1 min
    python benchmarks/defect_log.py --quick          # a few records: checks the code paths
    python benchmarks/defect_log.py --dir /mnt/ssd   # the database on another disk

Variants (`edge.defect_log.DefectLogWriter`, a fresh SQLite file each, WAL, same records):

    memory         journal=False: the old in-memory queue; a SIGKILL loses what is queued
    journal_write  journal_fsync=False: appended, not fsynced; survives SIGKILL, not a
                   power cut
    journal_fsync  the default: appended and fdatasync'ed before submit returns; survives
                   SIGKILL and a power cut

Each repeat submits --records DefectRecords (the worker's shape: scores, box, image paths)
one after the other from one thread, as the worker does, then stops the writer (everything
committed). Columns: submit_us (median and p99 of one `submit` call: what the line's worker
thread pays per defect), records_per_s (records / time from the first submit until every
record is committed), and each variant's ratio to `memory`. Variants are interleaved within
each repeat so a shared machine's drifting load hits them alike; medians of the repeats.

Prints a table and writes benchmarks/results/defect_log.json.
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

from edge.defect_log import DefectLogWriter, DefectRecord  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS = {
    "memory": {"journal": False},
    "journal_write": {"journal": True, "journal_fsync": False},
    "journal_fsync": {"journal": True, "journal_fsync": True},
}


def record(seq: int, run_id: int) -> DefectRecord:
    return DefectRecord(
        source_id="cam0", seq=seq, time=time.time(), verdict="DEFECT",
        reason="score 3.21 >= 2.50 (k=1 of n=1), area 412 px >= 0", part_id=seq // 2,
        encoder=seq * 100, raw_score=3.21, calibrated_score=4.4, threshold=2.5,
        box=(120, 80, 180, 131), area_px=412, run_id=run_id, reject=True,
        frame_path=f"/var/lib/grad-edge/images/2026-11-30/r{run_id}_d{seq}_cam0_{seq}_frame.jpg",
        heatmap_path=f"/var/lib/grad-edge/images/2026-11-30/r{run_id}_d{seq}_cam0_{seq}_heatmap.jpg")


def one_run(folder: Path, variant: str, records: int) -> dict:
    db = folder / f"{variant}.db"
    writer = DefectLogWriter(db, **VARIANTS[variant]).start()
    run_id = writer.begin_run(model_hash="bench")
    calls = []
    start = time.perf_counter()
    for seq in range(records):
        r = record(seq, run_id)
        t0 = time.perf_counter()
        writer.submit(r)
        calls.append(time.perf_counter() - t0)
    writer.stop()
    total = time.perf_counter() - start
    assert writer.written == records, (variant, writer.written)
    calls.sort()
    return {"variant": variant, "records": records,
            "submit_us_median": 1e6 * statistics.median(calls),
            "submit_us_p99": 1e6 * calls[min(len(calls) - 1, int(0.99 * len(calls)))],
            "records_per_s": records / total, "seconds": total}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="50 records, 1 repeat")
    parser.add_argument("--dir", type=Path, help="where the databases go (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=RESULTS / "defect_log.json")
    args = parser.parse_args()
    records, repeats = (50, 1) if args.quick else (args.records, args.repeats)

    load_start = os.getloadavg()
    runs = []
    with tempfile.TemporaryDirectory(prefix="defect-log-bench-", dir=args.dir) as tmp:
        for repeat in range(repeats):
            for variant in VARIANTS:
                folder = Path(tmp) / f"r{repeat}"
                folder.mkdir(exist_ok=True)
                runs.append({"repeat": repeat, **one_run(folder, variant, records)})
                print(f"repeat {repeat + 1}/{repeats} {variant}: "
                      f"{runs[-1]['records_per_s']:.0f} records/s", file=sys.stderr)
        disk = os.statvfs(tmp)

    rows = []
    for variant in VARIANTS:
        mine = [r for r in runs if r["variant"] == variant]
        rows.append({"variant": variant, **{key: statistics.median(r[key] for r in mine)
                                            for key in ("submit_us_median", "submit_us_p99",
                                                        "records_per_s")}})
    base = rows[0]
    for row in rows:
        row["submit_us_ratio_to_memory"] = row["submit_us_median"] / base["submit_us_median"]
        row["records_per_s_ratio_to_memory"] = row["records_per_s"] / base["records_per_s"]

    print(f"\n{'variant':<14} {'submit us p50':>13} {'p99':>9} {'records/s':>10} "
          f"{'submit x':>9} {'rate x':>7}")
    for row in rows:
        print(f"{row['variant']:<14} {row['submit_us_median']:>13.1f} "
              f"{row['submit_us_p99']:>9.1f} {row['records_per_s']:>10.0f} "
              f"{row['submit_us_ratio_to_memory']:>9.2f} "
              f"{row['records_per_s_ratio_to_memory']:>7.2f}")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "command": " ".join(["python"] + sys.argv),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "quick": args.quick,
        "records_per_repeat": records,
        "repeats": repeats,
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(),
                    "database_dir": str(args.dir or tempfile.gettempdir()),
                    "database_fs_block_size": disk.f_bsize,
                    "load_average_start": [round(x, 2) for x in load_start],
                    "load_average_end": [round(x, 2) for x in os.getloadavg()]},
        "rows": rows,
        "runs": runs,
        "notes": ("submit_us is what the line's worker thread pays per defect record; "
                  "journal_fsync is the default. Ratios are to `memory` (no journal) in the "
                  "same run."),
    }, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
