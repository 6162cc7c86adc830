"""A unified model on the line: a source whose frames look like another product than its
config names raises one `product_mismatch` alarm (edge.products); one odd part does not."""

import dataclasses
import logging
import sqlite3
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from deploy.runner import EagerRunner, open_runner
from edge.commands import replay_config
from edge.line import Line
from edge.products import ProductCheck
from edge.protocol import Frame
from edge.results import FrameResult
from edge.worker import SourceSetup
from grad.checkpoint import Calibration, save_checkpoint
from grad.config import get_config
from grad.model import GRAD
from grad.preprocess import Preprocess

SIZE = 128    # frames are written at 128 x 128


def pictures(root: Path, category: str, split: str, n: int, skip: int = 0) -> np.ndarray:
    paths = sorted((root / category / split / "good").glob("*.png"))[skip:skip + n]
    return np.stack([cv2.resize(cv2.imread(str(p)), (SIZE, SIZE), interpolation=cv2.INTER_AREA)
                     for p in paths])                                       # (n, S, S, 3) BGR


@pytest.fixture(scope="module")
def unified(shared_data, tmp_path_factory) -> Path:
    """A tiny unified model whose whitening knows two real products: metal_plate ("plate")
    and magnetic_tile ("tile"), fitted on 10 training pictures of each."""
    torch.manual_seed(0)
    model = GRAD(get_config("tiny", whiten=True, refine_k=None, whiten_groups=2)).eval()
    frames = np.concatenate([pictures(shared_data, "metal_plate", "train", 10),
                             pictures(shared_data, "magnetic_tile", "train", 10)])
    with torch.no_grad():
        x = Preprocess.for_config(model.cfg, bgr=True)(torch.from_numpy(frames))
        # groups are the sorted product names: plate 0, tile 1
        model.whiten.fit(model.pool(model.backbone(x)), torch.tensor([0] * 10 + [1] * 10))
    cal = Calibration(mean=0.0, std=1.0, threshold=1e9, n_images=20, rule="test")
    path = tmp_path_factory.mktemp("unified") / "unified.pt"
    save_checkpoint(path, model, cal, {"categories": ["tile", "plate"]},
                    {"plate": cal, "tile": cal})
    return path


@pytest.fixture(scope="module")
def tile_video(shared_data, tmp_path_factory) -> Path:
    """12 magnetic_tile test pictures as a lossless video."""
    video = tmp_path_factory.mktemp("video") / "tiles.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"FFV1"), 10, (SIZE, SIZE))
    for frame in pictures(shared_data, "magnetic_tile", "test", 12):
        writer.write(frame)
    writer.release()
    return video


def run_line(model: Path, video: Path, out: Path, product: str) -> tuple[Line, list[tuple]]:
    cfg = replay_config(video, model, out, "eager", None)
    cfg = dataclasses.replace(
        cfg, sources=[dataclasses.replace(cfg.sources[0], product=product)],
        # one frame a batch: the checks (after each batch) can confirm on the next frames
        worker=dataclasses.replace(cfg.worker, product_check_every=4, max_batch=1))
    line = Line(cfg, open_runner(str(model), backend="eager"))
    summary = line.run()
    assert summary.counters["frames"] == 12
    with sqlite3.connect(out / "defects.db") as db:
        alarms = db.execute("SELECT kind, source_id, message FROM alarms").fetchall()
    return line, alarms


def test_a_source_configured_as_another_product_raises_one_product_mismatch_alarm(
        unified, tile_video, tmp_path):
    line, alarms = run_line(unified, tile_video, tmp_path / "wrong", product="plate")
    mismatches = [a for a in alarms if a[0] == "product_mismatch"]
    assert len(mismatches) == 1, alarms           # once, not at every check
    kind, source, message = mismatches[0]
    assert source == "tiles" and "'plate'" in message and "look like 'tile'" in message
    check = line.product_check
    # frames 1-3 (the first, confirmed twice), then 5 and 9: every one elsewhere
    assert check.checks == {"tiles": 5} and check.elsewhere == {"tiles": 5}
    assert check.mismatched == {"tiles": "tile"}


def test_a_source_seeing_its_configured_product_is_checked_without_an_alarm(
        unified, tile_video, tmp_path):
    line, alarms = run_line(unified, tile_video, tmp_path / "right", product="tile")
    assert not [a for a in alarms if a[0] == "product_mismatch"]
    check = line.product_check
    assert check.checks == {"tiles": 3} and check.elsewhere == {}    # frames 1, 5 and 9


def test_one_odd_frame_neither_raises_nor_clears_the_alarm_and_a_return_is_logged(
        unified, shared_data, caplog):
    """Driven in-process with the real runner, one frame a batch: a plate among tiles at a
    check is dropped when the next frame is a tile; three plates in a row raise the alarm,
    once; one tile then does not clear it, three in a row do, with a warning."""
    tiles = pictures(shared_data, "magnetic_tile", "test", 8)
    plates = pictures(shared_data, "metal_plate", "test", 4)
    alarms = []
    runner = EagerRunner(unified)
    check = ProductCheck(runner.route, runner.card.product_groups, {"cam": ("tile", None)},
                         lambda *alarm: alarms.append(alarm), every=2)

    def show(image: np.ndarray, seq: int) -> None:
        frame = Frame("cam", seq, time.time(), time.monotonic_ns(), image)
        result = FrameResult("cam", seq, None, None, frame.wall_time, frame.mono_ns,
                             image.shape[:2], raw_score=0.0, calibrated_score=0.0,
                             threshold=1.0)
        check.observe(frame, result, None)
        check.after_batch()

    # checks at frames 1, 3, 5, ...: frame 3 a plate, frame 4 (its confirmation) a tile
    for seq, image in enumerate([tiles[0], tiles[1], plates[0], tiles[2]], start=1):
        show(image, seq)
    assert alarms == [] and check.elsewhere == {"cam": 1} and check.checks == {"cam": 3}
    for seq, image in enumerate(plates[1:], start=5):               # frames 5, 6, 7
        show(image, seq)
    assert len(alarms) == 1 and alarms[0][:2] == ("product_mismatch", "cam")
    assert check.mismatched == {"cam": "plate"}
    with caplog.at_level(logging.WARNING, logger="edge.products"):
        show(tiles[3], 8)                                           # not a check
        show(tiles[4], 9)                                           # a check: one tile ...
        show(plates[0], 10)                                         # ... then a plate
        assert check.mismatched == {"cam": "plate"} and "again" not in caplog.text
        for seq, image in enumerate(tiles[5:8], start=11):          # 11 a check, 12, 13
            show(image, seq)
    assert check.mismatched == {} and "look like tile again" in caplog.text
    assert len(alarms) == 1
    assert check.checks == {"cam": 11}       # 1, 3, 4, 5, 6, 7, 9, 10, 11, 12, 13


def test_checks_made_due_in_one_batch_run_once_after_it(unified, shared_data):
    """Observed frames only mark a check; it runs in after_batch, once per source however
    many of the batch's frames were due."""
    tiles = pictures(shared_data, "magnetic_tile", "test", 4)
    runner = EagerRunner(unified)
    check = ProductCheck(runner.route, runner.card.product_groups, {"cam": ("tile", None)},
                         lambda *alarm: None, every=2)
    for seq, image in enumerate(tiles, start=1):                    # 1 and 3 due
        frame = Frame("cam", seq, time.time(), time.monotonic_ns(), image)
        check.observe(frame, FrameResult("cam", seq, None, None, frame.wall_time,
                                         frame.mono_ns, image.shape[:2], raw_score=0.0,
                                         calibrated_score=0.0, threshold=1.0), None)
    assert check.checks == {}
    check.after_batch()
    assert check.checks == {"cam": 1}


def test_for_line_checks_only_trained_products_and_nothing_when_off_or_one_product(
        unified, tiny_checkpoint):
    """A product added by `calibrate` after training has no statistics to check against; a
    model of one product, or `every` 0, has no check at all."""
    runner = EagerRunner(unified)
    setups = [SourceSetup("a", "ipc://a", product="tile"), SourceSetup("b", "ipc://b",
                                                                       product="gear"),
              SourceSetup("c", "ipc://c")]
    check = ProductCheck.for_line(runner, setups, lambda *alarm: None, every=50)
    assert set(check.sources) == {"a"} and check.every == 50
    assert ProductCheck.for_line(runner, setups[1:], lambda *alarm: None, every=50) is None
    assert ProductCheck.for_line(runner, setups, lambda *alarm: None, every=0) is None
    one = EagerRunner(tiny_checkpoint)
    assert one.card.product_groups is None
    assert ProductCheck.for_line(one, setups, lambda *alarm: None, every=50) is None
