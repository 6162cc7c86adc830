"""benchmarks/cpu_speed.py --quick on the real data: every row timed, ratios consistent."""

import json
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_cpu_speed_quick_times_grad_beside_patchcore_on_each_category(tmp_path, shared_data):
    out = tmp_path / "s.json"
    r = subprocess.run([sys.executable, "benchmarks/cpu_speed.py", "--quick", "--data",
                        str(shared_data), "--out", str(out)],
                       cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert set(rows) == {"magnetic_tile", "metal_plate"}
    for cat, row in rows.items():
        timed = {k: v for k, v in row.items() if not k.startswith("_")}
        assert {"backbone alone", "GRAD edge, eager", "GRAD edge, eager (plain)",
                "GRAD edge 320, eager", "PatchCore (faithful), eager"} <= set(timed)
        assert timed["PatchCore (faithful), eager"]["vs_patchcore_here"] == 1.0
        for name, v in timed.items():
            assert v["ms"] > 0 and v["p90_ms"] >= v["ms"], (cat, name)
            assert abs(v["vs_anomalib_patchcore"] * {"magnetic_tile": 82, "metal_plate": 102}[cat]
                       - v["ms"]) < 1e-6
    # magnetic_tile's pictures are not square: the tiled input gets its row
    assert "GRAD edge (tile), eager" in rows["magnetic_tile"]
