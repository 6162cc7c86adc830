"""benchmarks/scale.py --quick end to end: real producer processes over ipc, the frame ring,
tcp and tcp with CURVE into the worker's intake, the table it prints and the JSON it writes."""

import json
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_scale_benchmark_quick_measures_every_transport_and_producer_count(tmp_path):
    out = tmp_path / "scale.json"
    r = subprocess.run([sys.executable, "benchmarks/scale.py", "--quick", "--out", str(out)],
                       cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["quick"] is True

    transports = {row["transport"]: row for row in result["transport"]}
    assert set(transports) == {"in-process copy", "in-process copy, 8 buffers",
                               "in-process copy, 8 buffers in shared memory", "ipc", "shm",
                               "tcp", "tcp+curve"}
    for row in transports.values():
        assert row["fps"] > 0 and row["gb_per_s"] > 0 and row["ratio_to_copy"] > 0
    for name in ("ipc", "shm", "tcp", "tcp+curve"):
        row = transports[name]
        assert row["received"] == row["expected"], row       # every frame arrived
        assert row["latency_p99_ms"] >= row["latency_p50_ms"] > 0
        assert row["producer_cpu_ms_per_frame"] > 0 and row["worker_cpu_ms_per_frame"] > 0
    assert set(result["curve_cpu_cost"]) == {"producer_ms_per_frame", "worker_ms_per_frame",
                                             "total_ms_per_frame"}

    rows = {(row["transport"], row["producers"]): row for row in result["producers"]}
    assert set(rows) == {(t, n) for t in ("ipc", "shm", "tcp", "tcp+curve") for n in (1, 2)}
    assert rows[("ipc", 1)]["fps_vs_ipc_1"] == 1.0
    for row in rows.values():
        assert row["received"] == row["expected"] and row["fps_vs_ipc_1"] > 0, row
    # The whole line (real `grad-edge run`s): every frame judged, 1 and 2 worker processes.
    lines = {(row["producers"], row["workers"]): row for row in result["worker_processes"]}
    assert set(lines) == {(1, 1), (2, 1), (2, 2)}
    assert lines[(1, 1)]["fps_vs_line_1x1"] == 1.0
    for (n, _), row in lines.items():
        assert row["frames"] == 10 * n and row["fps"] > 0 and row["latency_p99_ms"] > 0
    assert result["defect_log"]["measured_by"] == "benchmarks/defect_log.py"
    assert "transport" in r.stdout and "producers" in r.stdout and "CURVE costs" in r.stdout
