"""benchmarks/defect_log.py --quick end to end: the three writer variants on real SQLite files
and on a real (throwaway) PostgreSQL server, where one can be started here."""

import json
import subprocess
import sys
from pathlib import Path

from edge.defect_log.throwaway_postgres import PostgresUnavailable, find_bindir

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_defect_log_benchmark_quick_writes_every_variant_with_positive_rates(tmp_path):
    out = tmp_path / "d.json"
    r = subprocess.run([sys.executable, "benchmarks/defect_log.py", "--quick", "--out", str(out),
                        "--dir", str(tmp_path)], cwd=REPO_ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["quick"] is True and result["records_per_repeat"] == 50
    try:
        find_bindir()
        backends = {"sqlite", "postgresql"}
    except PostgresUnavailable:
        backends = {"sqlite"}
    rows = {(row["backend"], row["variant"]): row for row in result["rows"]}
    assert set(rows) == {(b, v) for b in backends
                         for v in ("memory", "journal_write", "journal_fsync")}
    for row in rows.values():
        assert row["records_per_s"] > 0 and row["submit_us_p99"] >= row["submit_us_median"] > 0
        assert row["records_per_s_ratio_to_sqlite"] > 0
    for backend in backends:
        assert rows[(backend, "memory")]["submit_us_ratio_to_memory"] == 1.0
    assert "journal_fsync" in r.stdout and str(out) in r.stdout
