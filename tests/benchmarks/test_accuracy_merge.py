"""accuracy.py --merge and --speed: results measured in parts come together as one table."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import accuracy_report  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[2]


def part(path: Path, seeds: list[int], rows: dict[str, list[float]]) -> Path:
    """A result file as accuracy.py writes it: one run per seed, its metrics all `a`."""
    path.write_text(json.dumps({
        "command": f"accuracy.py --seeds {' '.join(map(str, seeds))}", "config": "edge",
        "seeds": seeds, "minutes": 1.0, "per_category": {"metal_plate": {
            name: accuracy_report.summary([{"image_auroc": a, "pixel_auroc": a, "aupro": a, "f1_max": a,
                               "ms_per_image": 9.0} for a in aurocs])
            for name, aurocs in rows.items()}}}))
    return path


def merge(tmp_path: Path, *parts: Path) -> dict:
    out = tmp_path / "merged.json"
    r = subprocess.run([sys.executable, "benchmarks/accuracy.py", "--merge", *map(str, parts),
                        "--out", str(out)], cwd=REPO_ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(out.read_text())["per_category"]["metal_plate"]


def test_a_row_measured_in_parts_is_pooled_over_all_its_seeds(tmp_path):
    rows = merge(tmp_path, part(tmp_path / "a.json", [0], {"GRAD edge 288": [0.90]}),
                 part(tmp_path / "b.json", [1, 2], {"GRAD edge 288": [0.96, 0.99],
                                                    "PatchCore": [0.5, 0.5]}))
    pooled = rows["GRAD edge 288"]
    assert pooled["n_seeds"] == 3
    assert pooled["mean"]["image_auroc"] == pytest.approx(0.95)
    assert [s["image_auroc"] for s in pooled["seeds"]] == [0.90, 0.96, 0.99]
    assert rows["PatchCore"]["n_seeds"] == 2


def test_the_same_seeds_measured_again_replace_the_earlier_run(tmp_path):
    rows = merge(tmp_path, part(tmp_path / "a.json", [0, 1], {"GRAD edge": [0.90, 0.92]}),
                 part(tmp_path / "b.json", [0, 1], {"GRAD edge": [0.95, 0.97]}))
    assert rows["GRAD edge"]["n_seeds"] == 2
    assert rows["GRAD edge"]["mean"]["image_auroc"] == pytest.approx(0.96)


def test_speed_gives_the_global_memory_row_its_cpu_speed_timing(tmp_path):
    out = part(tmp_path / "acc.json", [0], {"GRAD edge global memory 0.8": [1.0],
                                            "GRAD edge 288 cross-fit": [1.0]})
    speed = tmp_path / "speed.json"
    timing = {"ms": 31.0, "ms_runs": [30.0, 32.0]}
    speed.write_text(json.dumps({"command": "cpu_speed.py", "anomalib_patchcore_ms": {},
                                 "rows": {"metal_plate": {
                                     "GRAD edge + global memory, eager": timing,
                                     "GRAD edge 288, eager": {**timing, "ms": 27.0}}}}))
    r = subprocess.run([sys.executable, "benchmarks/accuracy.py", "--speed", str(speed),
                        "--out", str(out)], cwd=REPO_ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads(out.read_text())["per_category"]["metal_plate"]
    assert rows["GRAD edge global memory 0.8"]["ms_per_image"] == 31.0
    assert rows["GRAD edge 288 cross-fit"]["ms_per_image"] == 27.0
    assert rows["GRAD edge 288 cross-fit"]["ms_from"] == "cpu_speed.json"


def test_rows_meeting_peers_needs_every_metric_over_three_seeds():
    def row(i, p, a, seeds=3):
        return accuracy_report.summary([{"image_auroc": i, "pixel_auroc": p, "aupro": a}] * seeds)
    peers = accuracy_report.PEERS["magnetic_tile"]
    at = (peers["image_auroc"], peers["pixel_auroc"], peers["aupro"])
    results = {"magnetic_tile": {
        "GRAD edge": row(0.99, 0.90, at[2] - 0.01),               # AUPRO short of the peers'
        "GRAD edge 288": row(at[0] + 1e-9, at[1] + 0.01, at[2] + 1e-9),   # the best on each
        "GRAD edge 320": row(at[0] - 3e-4, at[1] + 0.01, at[2] + 0.01),   # 0.9637: not 0.964
        "GRAD edge one seed": row(0.99, 0.90, 0.90, seeds=1),     # too few seeds
        "GRAD edge below baseline": row(*at),                     # the peers', not PatchCore's
        "PatchCore (faithful)": row(at[0], at[1] + 0.01, at[2] - 0.05)}}
    assert accuracy_report.rows_meeting_peers(results) == {"magnetic_tile": ["GRAD edge 288"]}
