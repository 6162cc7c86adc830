"""benchmarks/pipeline.py --quick end to end: the whole line (producer process, ZeroMQ, worker,
rules, defect log, reject sink) with a freshly trained tiny model, and 1080p transport."""

import json
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_pipeline_benchmark_quick_writes_positive_rates_and_no_every_frame_drops(tmp_path):
    out = tmp_path / "p.json"
    r = subprocess.run([sys.executable, "benchmarks/pipeline.py", "--quick", "--out", str(out),
                        "--run-dir", str(tmp_path / "run")],
                       cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["quick"] is True
    assert result["machine"]["cpu_count"] >= 1 and result["machine"]["torch_threads"] >= 1

    rows = result["line"]
    assert {(row["model"], row["policy"]) for row in rows} >= {("tiny", "every_frame"),
                                                               ("tiny", "latest")}
    for row in rows:
        assert row["fps"] > 0, row
        assert row["frames"] > 0 and row["latency_p50_ms"] > 0
        assert row["latency_p99_ms"] >= row["latency_p50_ms"]
        if row["policy"] == "every_frame":
            assert row["dropped"] == 0 and row["lost"] == 0, row
            assert row["frames"] == row["frames_produced"]

    kinds = {t["kind"]: t for t in result["transport"]}
    assert set(kinds) == {"zmq ipc", "zmq tcp", "np.copyto"}
    for t in kinds.values():
        assert t["frames"] > 0 and t["fps"] > 0 and t["gb_per_s"] > 0
        assert t["frame_bytes"] == 1080 * 1920 * 3
    assert "transport zmq ipc / np.copyto (GB/s)" in result["ratios"]
