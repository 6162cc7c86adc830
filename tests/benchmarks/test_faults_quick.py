"""benchmarks/faults.py --quick on two faults, end to end: the audit runs and the columns that
must be 0 are 0."""

import json
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_faults_benchmark_quick_audits_corrupt_messages_and_a_killed_producer(tmp_path):
    out = tmp_path / "faults.json"
    r = subprocess.run([sys.executable, "benchmarks/faults.py", "--quick", "--only",
                        "corrupt_1pct", "producer_sigkill", "--out", str(out)],
                       cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["must_be_zero_failures"] == {}
    rows = result["rows"]
    assert set(rows) == {"corrupt_1pct", "producer_sigkill"}
    for row in rows.values():
        assert row["produced"] > 0 and row["judged"] > 0
        assert row["unaccounted"] == row["records_lost"] == row["phantom_rejects"] == 0
    assert rows["corrupt_1pct"]["corrupt"] >= 1
    assert rows["producer_sigkill"]["note"] == "restarts 1"
