"""benchmarks/cpu_speed.py --quick on the real data: every row timed, on pictures of every
shape, with ratios that follow from the timings."""

import json
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
ANOMALIB_MS = {"magnetic_tile": 82.0, "metal_plate": 102.0}


def test_cpu_speed_quick_times_grad_beside_patchcore_on_each_category(tmp_path, shared_data):
    out = tmp_path / "s.json"
    r = subprocess.run([sys.executable, "benchmarks/cpu_speed.py", "--quick", "--data",
                        str(shared_data), "--out", str(out)],
                       cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert set(rows) == {"magnetic_tile", "metal_plate"}
    for cat, row in rows.items():
        notes = row["_notes"]
        assert notes["pictures"] == 3 and notes["runs"] == 1
        timed = {k: v for k, v in row.items() if not k.startswith("_")}
        assert {"backbone alone", "GRAD edge, eager", "GRAD edge, eager (plain)",
                "GRAD edge 320, eager", "PatchCore (faithful), eager"} <= set(timed)
        pc = timed["PatchCore (faithful), eager"]["ms_runs"][0]
        for name, v in timed.items():
            (ms,) = v["ms_runs"]
            assert ms > 0, (cat, name)
            assert abs(v["vs_patchcore_here_runs"][0] - ms / pc) < 1e-9, (cat, name)
            assert abs(v["vs_anomalib_patchcore_runs"][0] - ms / ANOMALIB_MS[cat]) < 1e-9
    # magnetic_tile's pictures come in several shapes, long ones among them: all are timed,
    # and the tiled input gets its row
    assert len(rows["magnetic_tile"]["_notes"]["frame_shapes"]) > 1
    assert "GRAD edge (tile), eager" in rows["magnetic_tile"]
    assert "magnetic_tile" in r.stdout and "PatchCore (faithful), eager" in r.stdout
