"""`grad-edge dataset` on a real defect log: frames operators marked false positive and the
near-threshold good frames the line kept become an MVTec-layout training folder that
`grad-edge train` reads (a real, if tiny, training run)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np

from edge.defect_log import DefectLogReader, DefectLogWriter, DefectRecord, KeptFrameRecord
from trainer.dataset import scan

from tests.station.conftest import write_jpeg

WHEN = 1_700_000_000.0


def grad_edge(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edge.cli", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


def judged_log(tmp_path: Path) -> Path:
    """Six defects (two marked false positive, one acknowledged), six kept good frames (one
    the source knew was defective), one defect whose image is gone."""
    images = tmp_path / "images"
    db = tmp_path / "defects.db"
    writer = DefectLogWriter(db).start()
    run_id = writer.begin_run()
    ids = []
    for seq in range(6):
        frame = write_jpeg(images / f"d{seq}_frame.jpg", seed=seq)
        ids.append(writer.submit(DefectRecord(
            source_id="cam0", seq=seq, time=WHEN + seq, verdict="DEFECT", reason="r",
            run_id=run_id, raw_score=3.0, threshold=2.0, frame_path=str(frame))))
    ids.append(writer.submit(DefectRecord(
        source_id="cam0", seq=99, time=WHEN + 99, verdict="DEFECT", reason="r", run_id=run_id,
        frame_path=str(images / "gone.jpg"))))
    rng = np.random.default_rng(5)
    for seq in range(10, 16):
        path = images / f"k{seq}_kept.png"
        cv2.imwrite(str(path), rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
        writer.submit(KeptFrameRecord(run_id=run_id, time=WHEN + seq, source_id="cam0",
                                      seq=seq, raw_score=1.9, threshold=2.0,
                                      frame_path=str(path), truth=1 if seq == 15 else 0))
    writer.end_run(run_id)
    writer.stop()
    with DefectLogReader(db) as reader:
        reader.mark_false_positive(ids[0], "maria")
        reader.mark_false_positive(ids[3], "li")
        reader.acknowledge(ids[1], "maria")                 # a real defect: not training data
        reader.mark_false_positive(ids[-1], "li")           # its image is gone
    return db


def test_dataset_writes_false_positives_and_kept_frames_as_training_images_that_train_reads(
        tmp_path, tiny_checkpoint):
    db = judged_log(tmp_path)
    base = tmp_path / "base" / "train" / "good"
    base.mkdir(parents=True)
    for i in range(6):
        write_jpeg(base / f"{i:03d}.jpg", seed=100 + i)
    out = tmp_path / "data"
    r = grad_edge("dataset", "--db", str(db), "--out", str(out), "--include",
                  str(tmp_path / "base"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "2 false positive(s), 5 near-threshold good frame(s), 6 included" in r.stdout
    assert "left out 1 with no image file" in r.stdout
    assert "left out 1 kept frame(s) the source knew were defective" in r.stdout

    written = sorted(p.name for p in (out / "line" / "train" / "good").iterdir())
    assert len(written) == 13
    assert all(name.endswith(".png") for name in written if not name.startswith("base_"))
    assert sum(name.startswith("fp_") for name in written) == 2
    assert sum(name.startswith("kept_") for name in written) == 5
    samples = scan(out, ["line"], "train")
    assert len(samples) == 13 and {s.label for s in samples} == {0}

    trained = grad_edge("train", "--data", str(out), "--category", "line", "--config", "tiny",
                        "--epochs-abnormal", "1", "--epochs-normal", "1", "--holdout", "0.25",
                        "--out", str(tmp_path / "retrained.pt"), cwd=tmp_path, timeout=600)
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert (tmp_path / "retrained.pt").is_file() and "trained on" in trained.stdout


def test_dataset_exits_2_saying_what_to_do_when_nothing_was_judged_or_kept(tmp_path):
    db = tmp_path / "defects.db"
    writer = DefectLogWriter(db).start()
    writer.begin_run()
    writer.stop()
    r = grad_edge("dataset", "--db", str(db), "--out", str(tmp_path / "data"), cwd=tmp_path)
    assert r.returncode == 2
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "no frame is marked false positive" in lines[0]
    assert "keep.band" in lines[0]
