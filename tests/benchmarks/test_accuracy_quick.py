"""benchmarks/accuracy.py --quick on the real data: GRAD and the faithful PatchCore side by
side, metrics in range, operating points and verdicts written."""

import json
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_accuracy_quick_scores_grad_beside_patchcore_with_verdicts(tmp_path, shared_data):
    out = tmp_path / "a.json"
    r = subprocess.run([sys.executable, "benchmarks/accuracy.py", "--quick", "--data",
                        str(shared_data), "--categories", "metal_plate", "--out", str(out)],
                       cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(out.read_text())
    rows = result["per_category"]["metal_plate"]
    assert set(rows) == {"GRAD edge", "PatchCore (faithful)"}
    for name, row in rows.items():
        m = row["mean"]
        assert row["n_seeds"] == 1
        for k in ("image_auroc", "pixel_auroc", "aupro", "f1_max"):
            assert 0.0 <= m[k] <= 1.0, (name, k, m[k])
        assert row["ms_per_image"] > 0
    grad = rows["GRAD edge"]["mean"]
    assert 0.0 <= grad["false_reject_rate"] <= 1.0 and 0.0 <= grad["miss_rate"] <= 1.0
    # The other threshold rules, on the same normal scores: a higher one rejects no more good
    # parts and passes no fewer defects.
    assert grad["false_reject_rate[4 std]"] <= grad["false_reject_rate[3.5 std]"]
    assert grad["miss_rate[4 std]"] >= grad["miss_rate[3.5 std]"]
    assert 0.0 <= grad["miss_rate[log 3 std]"] <= 1.0
    # metal_plate's defects are plain to see: even 24 pictures and 2 + 2 epochs find them
    assert grad["image_auroc"] > 0.8
    verdict = result["verdicts"]["metal_plate"]["image_auroc"]
    assert verdict["peers"] == 1.0 and isinstance(verdict["meets_peers"], bool)
    assert "GRAD edge" in r.stdout and "peers (anomalib, best)" in r.stdout


def test_accuracy_holdout_names_its_rows_and_calibrates_on_the_share_held_out(tmp_path,
                                                                                shared_data):
    # --quick's 24 pictures would cross-fit by default (10% is under 20 pictures): asking for
    # a share holds it out instead, and the row says so, so it never merges over the default's.
    out = tmp_path / "h.json"
    r = subprocess.run([sys.executable, "benchmarks/accuracy.py", "--quick", "--no-baseline",
                        "--no-unified", "--holdout", "0.25", "--data", str(shared_data),
                        "--categories", "metal_plate", "--out", str(out)],
                       cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads(out.read_text())["per_category"]["metal_plate"]
    assert set(rows) == {"GRAD edge holdout 0.25"}
    assert rows["GRAD edge holdout 0.25"]["mean"]["calibration_images"] == 6   # 25% of 24


def test_the_baseline_row_keeps_its_name_beside_a_grad_option(tmp_path, shared_data):
    # GRAD's global memory is not PatchCore's: the baseline measured in the same run is still
    # "PatchCore (faithful)", the row the verdicts compare with.
    out = tmp_path / "g.json"
    r = subprocess.run([sys.executable, "benchmarks/accuracy.py", "--quick", "--no-unified",
                        "--global-memory", "0.8", "--data", str(shared_data),
                        "--categories", "metal_plate", "--out", str(out)],
                       cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads(out.read_text())["per_category"]["metal_plate"]
    assert set(rows) == {"GRAD edge global memory 0.8", "PatchCore (faithful)"}
