"""What the defect log's journal costs per record, and SQLite against PostgreSQL, one run.

    python benchmarks/defect_log.py                  # 3 repeats x 3 variants x 2 databases
    python benchmarks/defect_log.py --quick          # a few records: checks the code paths
    python benchmarks/defect_log.py --dir /mnt/ssd   # the database on another disk
    python benchmarks/defect_log.py --backends sqlite   # SQLite only (no PostgreSQL here)

Databases: `sqlite` (a fresh file each run, WAL, synchronous=NORMAL: the line's default) and
`postgresql` (a fresh database each run on a throwaway local server started by the benchmark,
edge.defect_log.throwaway_postgres, with fsync and synchronous_commit on, as a plant's server
runs; reached over TCP on 127.0.0.1, so no network latency is in the figure). PostgreSQL is
skipped, saying so, where its binaries are absent.

Variants (`edge.defect_log.DefectLogWriter`, same records):

    memory         journal=False: the old in-memory queue; a SIGKILL loses what is queued
    journal_write  journal_fsync=False: appended, not fsynced; survives SIGKILL, not a
                   power cut
    journal_fsync  the default: appended and fdatasync'ed before submit returns; survives
                   SIGKILL and a power cut

Each repeat submits --records DefectRecords (the worker's shape: scores, box, image paths)
one after the other from one thread, as the worker does, then stops the writer (everything
committed). Columns: submit_us (median and p99 of one `submit` call: what the line's worker
thread pays per defect), records_per_s (defect-writes per second: records / time from the
first submit until every record is committed), each variant's ratio to `memory` of the same
database, and PostgreSQL's ratio to SQLite for the same variant. Variants and databases are
interleaved within each repeat so a shared machine's drifting load hits them alike; medians
of the repeats.

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
from edge.defect_log.throwaway_postgres import (PostgresUnavailable,  # noqa: E402
                                                ThrowawayPostgres)

RESULTS = Path(__file__).resolve().parent / "results"
BACKENDS = ("sqlite", "postgresql")
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


def one_run(folder: Path, backend: str, variant: str, records: int,
            server: ThrowawayPostgres | None) -> dict:
    if backend == "sqlite":
        writer = DefectLogWriter(folder / f"{variant}.db", **VARIANTS[variant]).start()
    else:
        url = server.create_database(f"bench_{folder.name}_{variant}")
        writer = DefectLogWriter(url, journal_dir=folder / "pg-journal",
                                 **VARIANTS[variant]).start()
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
    assert writer.written == records, (backend, variant, writer.written)
    calls.sort()
    return {"backend": backend, "variant": variant, "records": records,
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
    parser.add_argument("--backends", default=",".join(BACKENDS),
                        help="databases to measure, comma-separated (sqlite,postgresql)")
    args = parser.parse_args()
    records, repeats = (50, 1) if args.quick else (args.records, args.repeats)
    backends = [b for b in args.backends.split(",") if b]
    if set(backends) - set(BACKENDS) or not backends:
        parser.error(f"--backends {args.backends!r}: choose from {', '.join(BACKENDS)}")

    server, server_note = None, None
    if "postgresql" in backends:
        try:
            server = ThrowawayPostgres(fsync=True)
        except PostgresUnavailable as exc:
            server_note = f"postgresql skipped: {exc}"
            print(server_note, file=sys.stderr)
            backends.remove("postgresql")
    load_start = os.getloadavg()
    runs = []
    try:
        with tempfile.TemporaryDirectory(prefix="defect-log-bench-", dir=args.dir) as tmp:
            for repeat in range(repeats):
                folder = Path(tmp) / f"r{repeat}"
                folder.mkdir(exist_ok=True)
                for variant in VARIANTS:
                    for backend in backends:
                        runs.append({"repeat": repeat, **one_run(folder, backend, variant,
                                                                 records, server)})
                        print(f"repeat {repeat + 1}/{repeats} {backend} {variant}: "
                              f"{runs[-1]['records_per_s']:.0f} records/s", file=sys.stderr)
            disk = os.statvfs(tmp)
        server_version = server.version() if server is not None else None
    finally:
        if server is not None:
            server.close()

    rows = []
    for backend in backends:
        for variant in VARIANTS:
            mine = [r for r in runs if (r["backend"], r["variant"]) == (backend, variant)]
            rows.append({"backend": backend, "variant": variant,
                         **{key: statistics.median(r[key] for r in mine)
                            for key in ("submit_us_median", "submit_us_p99", "records_per_s")}})
    by_key = {(row["backend"], row["variant"]): row for row in rows}
    for row in rows:
        base = by_key[(row["backend"], "memory")]
        row["submit_us_ratio_to_memory"] = row["submit_us_median"] / base["submit_us_median"]
        row["records_per_s_ratio_to_memory"] = row["records_per_s"] / base["records_per_s"]
        sqlite = by_key.get(("sqlite", row["variant"]))
        row["records_per_s_ratio_to_sqlite"] = (row["records_per_s"] / sqlite["records_per_s"]
                                                if sqlite else None)

    print(f"\n{'database':<11} {'variant':<14} {'submit us p50':>13} {'p99':>9} "
          f"{'records/s':>10} {'submit x':>9} {'rate x':>7} {'vs sqlite':>9}")
    for row in rows:
        vs = row["records_per_s_ratio_to_sqlite"]
        print(f"{row['backend']:<11} {row['variant']:<14} {row['submit_us_median']:>13.1f} "
              f"{row['submit_us_p99']:>9.1f} {row['records_per_s']:>10.0f} "
              f"{row['submit_us_ratio_to_memory']:>9.2f} "
              f"{row['records_per_s_ratio_to_memory']:>7.2f} "
              f"{'-' if vs is None else f'{vs:.2f}':>9}")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "command": " ".join(["python"] + sys.argv),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "quick": args.quick,
        "records_per_repeat": records,
        "repeats": repeats,
        "backends": backends,
        "postgresql": {"server": server_version, "fsync": True, "synchronous_commit": True,
                       "connection": "TCP 127.0.0.1, same machine",
                       "note": server_note},
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(),
                    "database_dir": str(args.dir or tempfile.gettempdir()),
                    "database_fs_block_size": disk.f_bsize,
                    "load_average_start": [round(x, 2) for x in load_start],
                    "load_average_end": [round(x, 2) for x in os.getloadavg()]},
        "rows": rows,
        "runs": runs,
        "notes": ("submit_us is what the line's worker thread pays per defect record; "
                  "journal_fsync is the default. records_per_s is defect-writes per second "
                  "until all are committed. Ratios are to `memory` (no journal) of the same "
                  "database, and PostgreSQL's to SQLite for the same variant, in the same run."),
    }, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
