"""The whole line on real images: video file -> producer process -> ZeroMQ -> worker ->
rules -> SQLite defect log + reject sink, checked frame by frame against offline prediction."""

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from edge.commands import replay_config
from edge.config import RejectConfig, RuleSettings, RulesConfig, SinkConfig
from edge.line import Line
from deploy.runner import open_runner
from grad.config import get_config
from trainer.fit import fit
from trainer.train import TrainConfig

COUNTS_PER_FRAME = 100       # the video source's simulated encoder (default)
EJECTOR_COUNTS = 250         # camera-to-ejector distance in encoder counts
FRAME = 128                  # frames are written at 128 x 128


@pytest.fixture(scope="module")
def model_path(shared_data, tmp_path_factory) -> Path:
    """A tiny GRAD trained on real metal_plate normal images (seconds on two cores)."""
    out = tmp_path_factory.mktemp("model") / "metal_plate_tiny.pt"
    fit(shared_data, ["metal_plate"], get_config("tiny"),
        TrainConfig(epochs_abnormal=2, epochs_normal=4, holdout=0.2), out, show_progress=False)
    return out


@pytest.fixture(scope="module")
def line_video(shared_data, tmp_path_factory) -> tuple[Path, list[Path], list[int]]:
    """12 test images, good and defective interleaved, as a lossless FFV1 video and as PNGs."""
    folder = tmp_path_factory.mktemp("video")
    good = sorted((shared_data / "metal_plate/test/good").glob("*.png"))[:6]
    bad = sorted((shared_data / "metal_plate/test/defect").glob("*.png"))[:6]
    order = [p for pair in zip(good, bad) for p in pair]
    video = folder / "line.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"FFV1"), 10, (FRAME, FRAME))
    assert writer.isOpened(), "OpenCV cannot write FFV1 here"
    pngs = []
    for i, path in enumerate(order):
        frame = cv2.resize(cv2.imread(str(path)), (FRAME, FRAME), interpolation=cv2.INTER_AREA)
        writer.write(frame)
        pngs.append(folder / f"{i:03d}.png")
        cv2.imwrite(str(pngs[-1]), frame)
    writer.release()
    return video, pngs, [0, 1] * 6


def offline_scores(model: Path, pngs: list[Path], cwd: Path) -> list[float]:
    """`grad-edge predict` on the same frames, as a separate process."""
    r = subprocess.run([sys.executable, "-m", "edge.cli", "predict", "--model", str(model),
                        *map(str, pngs), "--out", str(cwd / "pred")], cwd=cwd,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return [json.loads(line)["score"] for line in r.stdout.splitlines() if line.startswith("{")]


def test_line_logs_and_rejects_exactly_the_frames_offline_prediction_flags_when_run_every_frame(
        model_path, line_video, tmp_path):
    video, pngs, truth = line_video
    expected = offline_scores(model_path, pngs, tmp_path)
    # A threshold between the scores, so some frames must be rejected and some must not,
    # whatever this small model's accuracy.
    threshold = float(np.median(expected))
    should_reject = [i for i, s in enumerate(expected) if s >= threshold]
    assert 0 < len(should_reject) < len(expected)

    cfg = replay_config(video, model_path, tmp_path / "run", "eager", None)
    cfg = cfg.__class__(**{**cfg.__dict__,
                           "rules": RulesConfig(default=RuleSettings(threshold=threshold)),
                           "reject": RejectConfig(camera_to_ejector_counts=EJECTOR_COUNTS, sinks=[
                               SinkConfig(kind="jsonl", path=str(tmp_path / "rejects.jsonl"))])})
    summary = Line(cfg, open_runner(cfg.model.path, backend="eager")).run()

    # Every frame accounted for, in order, none dropped.
    rows = [json.loads(line) for line in Path(summary.results).read_text().splitlines()]
    assert sorted(r["seq"] for r in rows) == list(range(len(pngs)))
    assert summary.counters["dropped"] == 0 and summary.counters["frames"] == len(pngs)
    by_seq = {r["seq"]: r for r in rows}

    # Each frame's score equals offline prediction on the same image.
    for i, score in enumerate(expected):
        assert by_seq[i]["raw_score"] == pytest.approx(score, rel=1e-4, abs=1e-5), i
        assert by_seq[i]["encoder"] == i * COUNTS_PER_FRAME

    # Defect rows for exactly the frames that should be rejected.
    db = sqlite3.connect(tmp_path / "run" / "defects.db")
    defects = db.execute("SELECT id, seq, encoder, verdict, frame_path, heatmap_path "
                         "FROM defects ORDER BY seq").fetchall()
    assert [d[1] for d in defects] == should_reject
    assert all(d[3] == "DEFECT" and Path(d[4]).is_file() and Path(d[5]).is_file()
               for d in defects)

    # One reject event per defect, due at the part's encoder count plus the ejector distance,
    # fired on the sink; the ones whose part had passed the ejector fired no earlier than that.
    events = db.execute("SELECT defect_id, due_encoder, sinks_ok, fired_at FROM reject_events "
                        "ORDER BY defect_id").fetchall()
    assert [e[0] for e in events] == [d[0] for d in defects]
    for (_, seq, encoder, *_), (_, due, ok, fired_at) in zip(defects, events):
        assert due == encoder + EJECTOR_COUNTS
        assert "jsonl" in ok and fired_at is not None
    sink_lines = [json.loads(line) for line in (tmp_path / "rejects.jsonl").read_text().splitlines()]
    assert sorted(e["seq"] for e in sink_lines) == should_reject
    for e in sink_lines:
        fired_with = [r for r in rows if r["encoder"] >= e["due_encoder"]]
        # Fired when the conveyor reached the ejector, or at end of stream if it never did.
        assert fired_with or e["due_encoder"] > max(r["encoder"] for r in rows)

    # The run is recorded with the model that made the calls.
    run = db.execute("SELECT model_hash, stopped_at FROM runs").fetchone()
    assert run[0] and run[1] is not None


def test_replay_gives_the_same_results_when_run_twice(model_path, line_video, tmp_path):
    video, pngs, _ = line_video

    def replay(out: Path) -> list[tuple]:
        r = subprocess.run([sys.executable, "-m", "edge.cli", "replay", str(video), "--model",
                            str(model_path), "--out", str(out)], cwd=tmp_path,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        assert (out / "results.csv").is_file()
        rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
        return sorted((r["seq"], r["raw_score"], r["verdict"]) for r in rows)

    first, second = replay(tmp_path / "a"), replay(tmp_path / "b")
    assert len(first) == len(pngs)
    assert first == second


def test_line_judges_long_frames_tiled_by_the_sources_product_threshold_when_unified(
        shared_data, tmp_path):
    """A unified, tiling model on the line: 64 x 192 frames (a long part) are tiled as in
    `predict`, and the source's `product:` picks that product's threshold."""
    import dataclasses

    import torch

    from grad.checkpoint import Calibration, save_checkpoint
    from grad.model import GRAD

    torch.manual_seed(0)
    model = GRAD(get_config("tiny", image_size=(32, 32), fit="tile")).eval()
    plate = Calibration(mean=1.0, std=2.0, threshold=0.5, n_images=20, rule="test")
    tile = Calibration(mean=0.0, std=1.0, threshold=1e9, n_images=20, rule="test")
    path = tmp_path / "unified.pt"
    save_checkpoint(path, model, tile, {"categories": ["plate", "tile"]},
                    {"plate": plate, "tile": tile})

    video, pngs = tmp_path / "long.avi", []
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"FFV1"), 10, (192, 64))
    for i, p in enumerate(sorted((shared_data / "metal_plate/test/defect").glob("*.png"))[:3]):
        frame = cv2.resize(cv2.imread(str(p)), (192, 64), interpolation=cv2.INTER_AREA)
        writer.write(frame)
        pngs.append(tmp_path / f"{i:03d}.png")
        cv2.imwrite(str(pngs[-1]), frame)
    writer.release()
    expected = offline_scores(path, pngs, tmp_path)

    cfg = replay_config(video, path, tmp_path / "run", "eager", None)
    source = dataclasses.replace(cfg.sources[0], product="plate")
    cfg = dataclasses.replace(cfg, sources=[source])
    summary = Line(cfg, open_runner(str(path), backend="eager")).run()
    rows = sorted((json.loads(line) for line in Path(summary.results).read_text().splitlines()),
                  key=lambda r: r["seq"])
    assert [r["threshold"] for r in rows] == [0.5] * 3          # plate's, not the default
    assert [r["raw_score"] for r in rows] == pytest.approx(expected, rel=1e-4, abs=1e-5)
    # ... and its calibrated score is on plate's scale too.
    assert [r["calibrated_score"] for r in rows] == pytest.approx(
        [(r["raw_score"] - 1.0) / 2.0 for r in rows])

    # A product the model does not know stops the line before it starts, naming the known ones.
    wrong = dataclasses.replace(cfg, sources=[dataclasses.replace(source, product="gear")],
                                run_dir=str(tmp_path / "run2"))
    with pytest.raises(LookupError, match="gear.*plate, tile"):
        Line(wrong, open_runner(str(path), backend="eager")).run()
