"""benchmarks/defect_browser.py --quick end to end: a real station serving a real log."""

import json
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_defect_browser_benchmark_quick_times_every_page_when_run(tmp_path):
    out = tmp_path / "s.json"
    r = subprocess.run([sys.executable, "benchmarks/defect_browser.py", "--quick", "--out",
                        str(out)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["quick"] is True and result["rows"] == 2000
    rows = {row["variant"]: row for row in result["rows_measured"]}
    assert {"first", "deep_keyset", "by_source", "by_run", "false_pos", "unknown",
            "time_range", "detail", "thumbnail", "reader_keyset_deep",
            "reader_offset_deep"} == set(rows)
    assert all(row["ms_median"] > 0 for row in rows.values())
    assert rows["first"]["bytes"] > 1000 and str(out) in r.stdout
