"""The loop back into training, end to end: does a retrained demo model reject fewer good parts?

    python benchmarks/retrain.py              # ~5-10 min on 2 shared cores
    python benchmarks/retrain.py --quick      # a tiny run of every step (checks the paths)

1. **Base model**: GRAD `tiny` (at --image-size) trained on --train synthetic normal parts
   (the demo's generator and seed), few epochs: a small, quick model that makes mistakes.
2. **Run the line** (`edge.line.Line`, the real thing: producer process, worker, defect
   log) on the demo footage (synthetic seed 0, --frames frames) with the near-threshold keep
   on (`keep.band`).
3. **The operator** looks at every DEFECT and marks the good parts among them false positive
   (through the reader, as the station and `grad-edge defects false-positive` do); here the
   synthetic source's truth plays the operator's eyes.
4. **`grad-edge dataset`** (station.dataset.write_dataset) writes the false positives and
   the kept near-threshold good frames, with the base training images (--include), as an
   MVTec-layout folder; the model is **retrained** on it with the same config, epochs and seed.
5. **Both models run the same footage again**, and footage neither saw (seed 7).
6. **The control** ("more normal"): the base images plus as many fresh random normal parts
   as the loop added, trained alike: did the judged frames teach the model, or just more
   data?

Columns: false rejects (good parts rejected) of good parts and defective parts found (judged
DEFECT) of defective parts at each model's own calibrated threshold; then good parts
rejected with the threshold moved to where the model finds 50 % and 80 % of the defective
parts (the same defects found, so a model cannot buy fewer false rejects by finding less);
and the image AUROC of the score against the truth; per model and footage. The same-footage row is in-sample for
the retrained model (it trained on those false positives): that is the loop's promise on
the line it watches; the held-out row says whether it generalises.

Prints a table and writes benchmarks/results/retrain.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import yaml  # noqa: E402

from camera_sources.synthetic import write_dataset as write_synthetic  # noqa: E402
from deploy.runner import open_runner  # noqa: E402
from edge.config import load_config  # noqa: E402
from edge.defect_log import DefectLogReader  # noqa: E402
from edge.line import Line  # noqa: E402
from grad.config import get_config  # noqa: E402
from station.dataset import write_dataset  # noqa: E402
from trainer.demo import DEMO_SEED  # noqa: E402
from trainer.fit import fit  # noqa: E402
from trainer.train import TrainConfig  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
log = logging.getLogger("retrain")


def train(data_root: Path, category: str, out: Path, epochs: tuple[int, int],
          image_size: int) -> dict:
    t0 = time.perf_counter()
    result = fit(data_root, [category], get_config("tiny", image_size=image_size),
                 TrainConfig(epochs_abnormal=epochs[0], epochs_normal=epochs[1], holdout=0.15,
                             seed=0), out, show_progress=False)
    return {"images": result.n_train, "seconds": round(time.perf_counter() - t0, 1),
            "threshold": result.card.calibration.threshold}


def run_line(folder: Path, model: Path, seed: int, frames: int, size: int,
             keep_band: float) -> tuple[Path, dict]:
    """One run of the line; returns its run folder and its score against the truth."""
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {"run_dir": "run", "model": {"path": str(model), "backend": "eager", "device": "cpu"},
           "sources": [{"id": "line1", "kind": "synthetic", "frames": frames, "fps": 30,
                        "seed": seed, "defect_every": 10, "size": [size, size]}],
           "worker": {"max_batch": 8, "max_wait_ms": 5},
           "defect_log": {"url": "sqlite:///run/defects.db", "images": "run/images",
                          "journal_fsync": False},
           "keep": {"band": keep_band, "max_per_minute": 6000}, "status_interval_s": 0}
    (folder / "line.yaml").write_text(yaml.safe_dump(cfg))
    line_cfg = load_config(folder / "line.yaml")
    summary = Line(line_cfg, open_runner(str(model), backend="eager", device="cpu")).run()
    truth = summary.counters["truth"]["line1"]
    rows = [json.loads(x) for x in Path(summary.results).read_text().splitlines() if x]
    return folder / "run", {"false_rejects": truth["false_rejects"], "good": truth["good"],
                            "found": truth["found"], "defective": truth["defective"],
                            "kept": sum(summary.counters["kept_frames"].values()),
                            "frames": summary.counters["frames"],
                            **at_matched_recall(rows), "auroc": auroc(rows)}


def at_matched_recall(rows: list[dict]) -> dict:
    """Good parts rejected when the threshold is set where the model finds half, and 80 %,
    of the defective parts: the models compared for the same defects found (what the
    station's what-if slider recounts), not at thresholds each calibrated its own way."""
    bad = sorted((r["raw_score"] for r in rows if r["truth"] == 1), reverse=True)
    good = [r["raw_score"] for r in rows if r["truth"] == 0]
    out = {}
    for share in (0.5, 0.8):
        t = bad[max(0, int(round(share * len(bad))) - 1)]
        out[f"false_rejects_at_{int(share * 100)}pct_found"] = sum(g >= t for g in good)
    return out


def auroc(rows: list[dict]) -> float:
    """Image AUROC of the raw score against the source's truth (ties count half)."""
    bad = [r["raw_score"] for r in rows if r["truth"] == 1]
    good = [r["raw_score"] for r in rows if r["truth"] == 0]
    wins = sum((b > g) + 0.5 * (b == g) for b in bad for g in good)
    return round(wins / (len(bad) * len(good)), 4)


def operator_marks_false_positives(run_dir: Path) -> int:
    """Every DEFECT whose part the source knew to be good is marked false positive."""
    rows = [json.loads(x) for x in (run_dir / "results.jsonl").read_text().splitlines() if x]
    good_flagged = [r["defect_id"] for r in rows if r["defect_id"] is not None and r["truth"] == 0]
    with DefectLogReader(run_dir / "defects.db") as reader:
        for defect_id in good_flagged:
            reader.mark_false_positive(defect_id, "bench-operator", "good part",
                                       via="benchmarks/retrain.py")
    return len(good_flagged)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=30, help="base training images")
    parser.add_argument("--frames", type=int, default=300, help="frames per line run")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--epochs", type=int, nargs=2, default=(4, 8), metavar=("ABN", "NORM"))
    parser.add_argument("--keep-band", type=float, default=0.15)
    parser.add_argument("--image-size", type=int, default=128,
                        help="the model's input (tiny's own 64 px loses the small defects)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-control", action="store_true",
                        help="skip the control model (base + as many fresh normal parts)")
    parser.add_argument("--out", type=Path, default=RESULTS / "retrain.json")
    args = parser.parse_args()
    if args.quick:
        args.train, args.frames, args.size, args.epochs = 12, 40, 96, (1, 1)
        args.image_size = 64
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    load_start = os.getloadavg()
    t_all = time.perf_counter()

    with tempfile.TemporaryDirectory(prefix="retrain-bench-", dir="/tmp") as tmp:
        tmp = Path(tmp)
        base_data = write_synthetic(tmp / "base", n_train=args.train, n_test_good=0,
                                    n_test_defect=0, seed=DEMO_SEED,
                                    size=(args.size, args.size))
        base_model = tmp / "base.pt"
        base_fit = train(base_data.parent, base_data.name, base_model, args.epochs,
                         args.image_size)
        print(f"base model: {base_fit}", file=sys.stderr)

        first_run, before = run_line(tmp / "line-base", base_model, 0, args.frames, args.size,
                                     args.keep_band)
        marked = operator_marks_false_positives(first_run)
        summary = write_dataset(str(first_run / "defects.db"), tmp / "retrain-data",
                                category="synthetic_line", include=base_data)
        new_model = tmp / "retrained.pt"
        new_fit = train(tmp / "retrain-data", "synthetic_line", new_model, args.epochs,
                        args.image_size)
        print(f"retrained: {new_fit}", file=sys.stderr)

        rows = [{"model": "base", "footage": "same (seed 0)", **before}]
        _, after = run_line(tmp / "line-new", new_model, 0, args.frames, args.size, 0.0)
        rows.append({"model": "retrained", "footage": "same (seed 0)", **after})
        _, held_base = run_line(tmp / "held-base", base_model, 7, args.frames, args.size, 0.0)
        rows.append({"model": "base", "footage": "held out (seed 7)", **held_base})
        _, held_new = run_line(tmp / "held-new", new_model, 7, args.frames, args.size, 0.0)
        rows.append({"model": "retrained", "footage": "held out (seed 7)", **held_new})
        control_fit = None
        if not args.no_control:
            # The control: as many *fresh random* normal parts as the loop added, instead of
            # the judged and kept frames. If it did as well, the loop's gain was only "more
            # data"; if not, the frames the line got wrong are what taught the model.
            extra = summary.false_positives + summary.kept
            fresh = write_synthetic(tmp / "fresh", n_train=args.train + extra, n_test_good=0,
                                    n_test_defect=0, seed=DEMO_SEED + 1,
                                    size=(args.size, args.size))
            control_data = tmp / "control-data" / "synthetic_line" / "train" / "good"
            control_data.mkdir(parents=True)
            for image in sorted((base_data / "train" / "good").iterdir()):
                shutil.copyfile(image, control_data / f"base_{image.name}")
            for image in sorted((fresh / "train" / "good").iterdir())[:extra]:
                shutil.copyfile(image, control_data / f"fresh_{image.name}")
            control_model = tmp / "control.pt"
            control_fit = train(tmp / "control-data", "synthetic_line", control_model,
                                args.epochs, args.image_size)
            _, same = run_line(tmp / "line-control", control_model, 0, args.frames, args.size,
                               0.0)
            rows.append({"model": "more normal", "footage": "same (seed 0)", **same})
            _, held = run_line(tmp / "held-control", control_model, 7, args.frames, args.size,
                               0.0)
            rows.append({"model": "more normal", "footage": "held out (seed 7)", **held})
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"\n{'model':<12} {'footage':<18} {'false rejects':>14} {'defects found':>14} "
          f"{'FR @50% found':>14} {'FR @80% found':>14} {'AUROC':>6}")
    for r in rows:
        print(f"{r['model']:<12} {r['footage']:<18} {r['false_rejects']:>5} of {r['good']:<6}"
              f" {r['found']:>5} of {r['defective']:<6} {r['false_rejects_at_50pct_found']:>14}"
              f" {r['false_rejects_at_80pct_found']:>14} {r['auroc']:>6.3f}")
    ratio = {f: (r2["false_rejects"] / r1["false_rejects"] if r1["false_rejects"] else None)
             for f, r1, r2 in (("same", rows[0], rows[1]), ("held_out", rows[2], rows[3]))}
    print(f"\nfalse rejects retrained / base: same footage {ratio['same']}, held out "
          f"{ratio['held_out']}")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "command": " ".join(["python"] + sys.argv),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "quick": args.quick, "config": f"tiny, image_size {args.image_size}",
        "epochs": list(args.epochs),
        "base_training_images": args.train, "frames_per_run": args.frames,
        "frame_size": args.size, "keep_band": args.keep_band,
        "base_fit": base_fit, "retrained_fit": new_fit, "control_fit": control_fit,
        "operator_marked_false_positive": marked,
        "dataset": {"false_positives": summary.false_positives, "kept": summary.kept,
                    "included": summary.included,
                    "skipped_defective": summary.skipped_defective},
        "rows": rows, "false_rejects_retrained_over_base": ratio,
        "seconds": round(time.perf_counter() - t_all, 1),
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(),
                    "load_average_start": [round(x, 2) for x in load_start],
                    "load_average_end": [round(x, 2) for x in os.getloadavg()]},
        "notes": ("false rejects: good parts rejected (the source's truth); defects found: "
                  "defective parts judged DEFECT, both at each model's calibrated threshold "
                  "(the retrained model calibrates on a holdout that includes near-threshold "
                  "frames, so its threshold rises). false_rejects_at_N_pct_found: good parts "
                  "rejected at the threshold where the model finds N % of the defective parts. "
                  "The same-footage rows are in-sample for the retrained model; the held-out "
                  "rows are footage neither model saw."),
    }, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
