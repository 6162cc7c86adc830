"""`grad-edge train | eval | predict` as real processes on a small real dataset."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import torch
import pytest

from grad.checkpoint import load_checkpoint, read_card
from trainer.commands import output_paths
from trainer.dataset import load_image, scan
from trainer.features import to_input
from trainer.fit import predict_images
from trainer.overlay import BANNER_H, BAR_W


def grad_edge(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edge.cli", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def small_dataset(shared_data, tmp_path_factory) -> Path:
    """12 train, 4 good + 4 defective test images of metal_plate, copied (never committed)."""
    root = tmp_path_factory.mktemp("data") / "metal_plate"
    src = shared_data / "metal_plate"
    picks = {"train/good": 12, "test/good": 4, "test/defect": 4}
    for sub, n in picks.items():
        (root / sub).mkdir(parents=True)
        for f in sorted((src / sub).glob("*.png"))[:n]:
            shutil.copy(f, root / sub / f.name)
            if sub == "test/defect":
                (root / "ground_truth/defect").mkdir(parents=True, exist_ok=True)
                shutil.copy(src / "ground_truth/defect" / f"{f.stem}_mask.png",
                            root / "ground_truth/defect")
    return root.parent


def test_cli_trains_evaluates_and_predicts_when_given_a_small_real_dataset(small_dataset, tmp_path):
    model = tmp_path / "m.pt"
    r = grad_edge("train", "--data", str(small_dataset), "--config", "tiny", "--epochs-abnormal",
                  "1", "--epochs-normal", "2", "--holdout", "0.25", "--out", str(model), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "threshold" in r.stdout and model.is_file()

    r = grad_edge("eval", "--model", str(model), "--data", str(small_dataset), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    report = json.loads(model.with_suffix(".eval.json").read_text())
    m = report["categories"]["metal_plate"]
    for key in ("image_auroc", "pixel_auroc", "aupro", "f1_max"):
        assert 0.0 <= m[key] <= 1.0
    assert m["n_images"] == 8
    # The margins either side of the threshold agree with the rates at it.
    op = m["operating_point"]
    assert (op["false_reject_rate"] > 0) == (op["highest_good"] >= op["threshold"])
    assert (op["miss_rate"] > 0) == (op["lowest_defect"] < op["threshold"])
    assert "good max" in r.stdout

    test_images = [s.path for s in scan(small_dataset, None, "test")][:2]
    r = grad_edge("predict", "--model", str(model), *map(str, test_images), "--out",
                  str(tmp_path / "pred"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    lines = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 2
    heat = cv2.imread(lines[0]["heatmap"])
    h, w = load_image(test_images[0]).shape[:2]
    assert heat.shape[:2] == (h + BANNER_H, w + BAR_W)   # the picture, a banner, a colour bar
    # The printed score is the model's score for that image, computed in-process here.
    net, _ = load_checkpoint(model)
    expected = predict_images(net, [load_image(test_images[0])]).scores[0]
    assert lines[0]["score"] == pytest.approx(float(expected), rel=1e-5)


def test_cli_train_names_the_missing_category_when_layout_is_wrong(small_dataset, tmp_path):
    r = grad_edge("train", "--data", str(small_dataset), "--category", "bottle", "--config",
                  "tiny", "--out", str(tmp_path / "m.pt"), cwd=tmp_path)
    assert r.returncode == 2
    assert "bottle" in r.stderr and "metal_plate" in r.stderr


def test_cli_lists_its_subcommands_when_asked_for_help(tmp_path):
    r = grad_edge("--help", cwd=tmp_path)
    assert r.returncode == 0
    for cmd in ("train", "eval", "predict"):
        assert cmd in r.stdout


def test_output_paths_mirror_the_input_folders_when_two_inputs_share_a_name(tmp_path):
    a, b = tmp_path / "test/good/000.png", tmp_path / "test/crack/000.png"
    outs = output_paths([a, b], tmp_path / "pred")
    assert outs == [tmp_path / "pred/good/000_heatmap.png", tmp_path / "pred/crack/000_heatmap.png"]


def test_cli_calibrates_evaluates_without_masks_and_predicts_distinct_files(small_dataset,
                                                                             tmp_path):
    model = tmp_path / "m.pt"
    r = grad_edge("train", "--data", str(small_dataset), "--config", "tiny", "--epochs-abnormal",
                  "1", "--epochs-normal", "1", "--holdout", "0.25", "--out", str(model),
                  cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    before, _ = read_card(model)

    # Re-fit the threshold from a folder of good parts: 4 images warn, the card records it.
    good = small_dataset / "metal_plate/test/good"
    r = grad_edge("calibrate", "--model", str(model), "--good", str(good), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "only 4 normal image(s)" in r.stderr
    after, _ = read_card(model)
    net, _ = load_checkpoint(model)
    scores = predict_images(net, [load_image(p) for p in sorted(good.glob("*.png"))]).scores
    expected = scores.mean() + 3 * scores.std()                      # the default 3 sigmas
    assert after.calibration.threshold == pytest.approx(float(expected), rel=1e-5)
    assert after.calibration_for("metal_plate") == after.calibration
    assert after.model_hash != before.model_hash
    assert after.meta["calibrations"][-1]["good"] == str(good)

    # Image-level labels only: no ground_truth folder -> pixel metrics null, with the reason.
    bare = tmp_path / "bare"
    shutil.copytree(small_dataset / "metal_plate", bare / "metal_plate",
                    ignore=shutil.ignore_patterns("ground_truth"))
    r = grad_edge("eval", "--model", str(model), "--data", str(bare), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    m = json.loads(model.with_suffix(".eval.json").read_text())["categories"]["metal_plate"]
    assert m["pixel_auroc"] is None and m["aupro"] is None and 0 <= m["image_auroc"] <= 1
    assert "no mask" in m["pixel_metrics_note"]
    assert m["operating_point"]["threshold"] == pytest.approx(after.calibration.threshold)

    # Same file name in two folders: two overlays, mirrored under --out.
    r = grad_edge("predict", "--model", str(model), str(good / "000.png"),
                  str(small_dataset / "metal_plate/test/defect/000.png"), "--out",
                  str(tmp_path / "pred"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    heats = [json.loads(line)["heatmap"] for line in r.stdout.splitlines()
             if line.startswith("{")]
    assert heats == [str(tmp_path / "pred/good/000_heatmap.png"),
                     str(tmp_path / "pred/defect/000_heatmap.png")]
    assert all(Path(h).is_file() for h in heats)

    # The pictures it trained on score far lower than new ones: a threshold from them would
    # reject most good parts. They are left out (the 3 held out calibrate), or, all of them
    # seen, refused.
    from trainer.dataset import split_holdout
    trained, _ = split_holdout(scan(small_dataset, None, "train"), 0.25, seed=0)
    r = grad_edge("calibrate", "--model", str(model), "--good",
                  str(small_dataset / "metal_plate/train/good"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert f"{len(trained)} of 12 images in" in r.stderr and "left out" in r.stderr
    assert read_card(model)[0].calibration.n_images == 12 - len(trained)
    seen = tmp_path / "seen"
    seen.mkdir()
    for s in trained[:3]:
        shutil.copy(s.path, seen / s.path.name)
    r = grad_edge("calibrate", "--model", str(model), "--good", str(seen), cwd=tmp_path)
    assert r.returncode != 0 and "all 3 images in" in r.stderr
    assert "trained this model" in r.stderr


def test_fit_whitens_features_and_scores_pictures_as_it_calibrated_when_config_whitens(
        small_dataset, tmp_path):
    from grad.config import get_config
    from trainer.dataset import split_holdout
    from trainer.fit import fit
    from trainer.train import TrainConfig

    fit(small_dataset, None, get_config("tiny", whiten=True, refine_k=None, feature_pool=3),
        TrainConfig(epochs_abnormal=1, epochs_normal=1, holdout=0.25), tmp_path / "w.pt",
        show_progress=False)
    net, card = load_checkpoint(tmp_path / "w.pt")
    assert not torch.equal(net.whiten.mean, torch.zeros_like(net.whiten.mean))
    # The calibration was made from cached, whitened features; a full forward on the same
    # held-out pictures (backbone, whitening, head) must give the same scores.
    _, held = split_holdout(scan(small_dataset, None, "train"), 0.25, seed=0)
    scores = predict_images(net, [load_image(s.path) for s in held]).scores
    assert card.calibration.n_images == len(held)
    assert card.calibration.mean == pytest.approx(float(scores.mean()), rel=1e-4)


def test_fit_fills_the_local_memory_and_every_path_scores_pictures_as_it_calibrated(
        small_dataset, tmp_path, caplog):
    from deploy.runner import EagerRunner
    from grad.config import get_config
    from trainer.dataset import split_holdout
    from trainer.fit import fit
    from trainer.train import TrainConfig

    cfg = get_config("tiny", whiten=True, refine_k=None, feature_pool=3, local_memory=0.3,
                     memory_size=6)
    with caplog.at_level("INFO", logger="trainer.features"):
        fit(small_dataset, None, cfg, TrainConfig(epochs_abnormal=1, epochs_normal=1,
                                                  holdout=0.25), tmp_path / "m.pt",
            show_progress=False)
    assert "local memory: 6 patches of 9 training tiles kept per position" in caplog.text
    net, card = load_checkpoint(tmp_path / "m.pt")
    assert net.memory.size == 6 and float(net.memory.scale) > 0
    # Calibrated from cached features; a full forward and the line's runner (bf16 bank where
    # the CPU has native bf16) score the same held-out pictures alike.
    _, held = split_holdout(scan(small_dataset, None, "train"), 0.25, seed=0)
    pictures = [load_image(s.path) for s in held]
    scores = predict_images(net, pictures).scores
    assert card.calibration.mean == pytest.approx(float(scores.mean()), rel=1e-4)
    with EagerRunner(tmp_path / "m.pt") as runner:
        out = runner.run(np.stack([p[:, :, ::-1] for p in pictures]))   # RGB -> BGR frames
    np.testing.assert_allclose(out.scores, scores, rtol=2e-2)
    # Nothing held out (the default for 12 pictures: 10% would be 1): the memory's scale comes
    # from the fit set, each picture kept from matching its own patches (else every distance
    # would be 0 and the memory left out), and the threshold from 5 models each trained
    # without a fifth of the pictures, which they score: the final model scores the pictures
    # it was fitted on far lower than new ones.
    caplog.clear()
    with caplog.at_level("INFO", logger="trainer"):
        fit(small_dataset, None, cfg, TrainConfig(epochs_abnormal=1, epochs_normal=1),
            tmp_path / "all.pt", show_progress=False)
    assert "calibration fold 5 of 5: a model on 10 training pictures scores the other 2" \
        in caplog.text
    assert "left out of the map" not in caplog.text
    net, card = load_checkpoint(tmp_path / "all.pt")
    assert net.memory.size == 6 and float(net.memory.scale) > 0
    # The memory's scale is the folds' mean, set on pictures they did not see, not the one
    # the final model set on its own pictures (their residual is the lowest).
    import re
    folds = [float(v) for v in re.findall(r"lambda ([0-9.]+)\n", caplog.text)[1:]]
    adopted = re.search(r"lambda ([0-9.]+), the fold models' mean .*gave ([0-9.]+)", caplog.text)
    assert len(folds) == 5 and float(adopted[1]) == pytest.approx(np.mean(folds), abs=1e-4)
    assert float(net.memory.scale) == pytest.approx(float(adopted[1]), abs=1e-4)
    assert float(adopted[2]) != pytest.approx(float(adopted[1]), abs=1e-4)
    assert card.calibration.n_images == 12 and "5-fold cross-fit" in card.calibration.source
    assert card.meta["train"]["holdout"] == 0.0 and card.meta["n_train"] == 12
    seen = predict_images(net, [load_image(s.path) for s in scan(small_dataset, None, "train")])
    new = predict_images(net, [load_image(s.path)
                               for s in scan(small_dataset, None, "test", masks="optional")
                               if s.label == 0])
    # The cross-fit scores sit with new good parts, not with the seen pictures (which the
    # threshold came from before: every good part rejected).
    assert card.calibration.mean > 2 * seen.scores.mean()
    assert card.calibration.mean > 0.5 * new.scores.mean()
    assert (new.scores < card.calibration.threshold).all()


def test_fit_fills_the_global_memory_and_every_path_scores_pictures_as_it_calibrated(
        small_dataset, tmp_path, caplog):
    """The global memory (PatchCore's search on raw backbone features) through training:
    the cached path that calibrates, a full forward and the line's runner score alike; with
    nothing held out its scale is the fold models' mean, as the local memory's."""
    import re

    from deploy.runner import EagerRunner
    from grad.config import get_config
    from trainer.dataset import split_holdout
    from trainer.fit import fit
    from trainer.train import TrainConfig

    cfg = get_config("tiny", whiten=True, refine_k=None, feature_pool=3, global_memory=0.5)
    with caplog.at_level("INFO", logger="trainer.features"):
        fit(small_dataset, None, cfg, TrainConfig(epochs_abnormal=1, epochs_normal=1,
                                                  holdout=0.25), tmp_path / "m.pt",
            show_progress=False)
    # 9 training pictures of an 8 x 8 grid, a tenth of their patches
    assert "global memory: 57 patches of 9 training tiles kept in all" in caplog.text
    net, card = load_checkpoint(tmp_path / "m.pt")
    assert net.memory is None and net.global_memory.size == 57
    assert float(net.global_memory.scale) > 0
    _, held = split_holdout(scan(small_dataset, None, "train"), 0.25, seed=0)
    pictures = [load_image(s.path) for s in held]
    scores = predict_images(net, pictures).scores
    assert card.calibration.mean == pytest.approx(float(scores.mean()), rel=1e-4)
    with EagerRunner(tmp_path / "m.pt") as runner:
        out = runner.run(np.stack([p[:, :, ::-1] for p in pictures]))   # RGB -> BGR frames
    np.testing.assert_allclose(out.scores, scores, rtol=2e-2)
    # Without the memory's term the scores are lower: it is in the map
    net.global_memory.scale.zero_()
    assert (predict_images(net, pictures).scores < scores - 1e-3).all()

    caplog.clear()
    with caplog.at_level("INFO", logger="trainer"):
        fit(small_dataset, None, cfg, TrainConfig(epochs_abnormal=1, epochs_normal=1),
            tmp_path / "all.pt", show_progress=False)
    assert "left out of the map" not in caplog.text
    # the final model's own lambda first (set on its own pictures), then the 5 folds'
    folds = [float(v) for v in re.findall(r"global memory: .* lambda ([0-9.]+)\n",
                                          caplog.text)[1:]]
    adopted = re.search(r"global memory: lambda ([0-9.]+), the fold models' mean",
                        caplog.text)
    assert len(folds) == 5 and float(adopted[1]) == pytest.approx(np.mean(folds), abs=1e-4)
    net, _ = load_checkpoint(tmp_path / "all.pt")
    assert float(net.global_memory.scale) == pytest.approx(float(adopted[1]), abs=1e-4)


def test_nothing_held_out_refuses_a_product_of_one_picture(small_dataset, tmp_path):
    from grad.config import get_config
    from trainer.fit import fit
    from trainer.train import TrainConfig

    (tmp_path / "data/lone/train/good").mkdir(parents=True)
    one = next((small_dataset / "metal_plate/train/good").glob("*.png"))
    shutil.copy(one, tmp_path / "data/lone/train/good" / one.name)
    with pytest.raises(ValueError, match="lone has only one picture"):
        fit(tmp_path / "data", None, get_config("tiny"), TrainConfig(holdout=0.0),
            tmp_path / "m.pt", show_progress=False)


def test_default_holdout_cross_fits_where_ten_percent_would_calibrate_on_under_20(caplog):
    from trainer.dataset import Sample
    from trainer.fit import default_holdout

    def pictures(category: str, n: int) -> list[Sample]:
        return [Sample(Path(f"/d/{category}/train/good/{i:03d}.png"), category, "train",
                       "good", 0, None) for i in range(n)]

    # 200 pictures hold out 20: enough to calibrate on.
    assert default_holdout(pictures("big", 200), seed=0) == pytest.approx(0.1)
    # 54 (metal_plate's count) would hold out 5; so would one small product beside a big one.
    with caplog.at_level("INFO", logger="trainer.fit"):
        assert default_holdout(pictures("small", 54), seed=0) == 0.0
        assert default_holdout(pictures("big", 762) + pictures("small", 54), seed=0) == 0.0
    assert "fewer than 20 pictures (small: 5)" in caplog.text
    assert "--holdout F holds out a share instead" in caplog.text


def test_fit_on_two_products_whitens_each_with_its_own_statistics_and_routes_pictures(
        shared_data, tmp_path, caplog):
    from grad.config import get_config
    from trainer.fit import fit
    from trainer.train import TrainConfig

    for cat in ("metal_plate", "magnetic_tile"):
        (tmp_path / "data" / cat / "train/good").mkdir(parents=True)
        for f in sorted((shared_data / cat / "train/good").glob("*.png"))[:8]:
            shutil.copy(f, tmp_path / "data" / cat / "train/good" / f.name)
    with caplog.at_level("INFO", logger="trainer.fit"):
        fit(tmp_path / "data", None, get_config("tiny", whiten=True, refine_k=None),
            TrainConfig(epochs_abnormal=1, epochs_normal=1, holdout=0.25), tmp_path / "u.pt",
            show_progress=False)
    assert "whitening routes all 4 calibration tiles to their own product" in caplog.text
    net, card = load_checkpoint(tmp_path / "u.pt")
    assert card.config.whiten_groups == 2 and set(card.products) == {"magnetic_tile",
                                                                      "metal_plate"}
    # Groups are numbered by sorted product name; a picture finds its own without a label.
    for group, cat in enumerate(("magnetic_tile", "metal_plate")):
        pictures = [load_image(f) for f in
                    sorted((shared_data / cat / "test/good").glob("*.png"))[:3]]
        x = torch.cat([to_input([p], net.cfg)[0] for p in pictures])
        with torch.no_grad():
            assert (net.whiten.route(net.pool(net.backbone(x))) == group).all()
    # Told the wrong products, the routing check counts every tile and warns by name.
    from trainer.features import extract
    from trainer.fit import check_routing
    paths = sorted((shared_data / "magnetic_tile/test/good").glob("*.png"))[:2]
    feats = extract(net, paths, load_image, desc="t")
    caplog.clear()
    assert check_routing(net, feats, ["metal_plate"] * 2, ["magnetic_tile", "metal_plate"]) == 2
    assert "routes 2 of 2 calibration tiles to another product's statistics (metal_plate -> " \
           "magnetic_tile)" in caplog.text

    # The CLI says so too: `predict` names the product each picture looks like, and
    # `calibrate --product` warns when the good parts it is given look like another.
    tiles = tmp_path / "tiles"
    tiles.mkdir()
    for f in paths:
        shutil.copy(f, tiles / f.name)
    r = grad_edge("predict", "--model", str(tmp_path / "u.pt"), "--product", "metal_plate",
                  *map(str, paths), "--out", str(tmp_path / "pred"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    lines = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert [(d["product"], d["looks_like"]) for d in lines] == [("metal_plate",
                                                                 "magnetic_tile")] * 2
    assert "2 of 2" not in r.stderr and "look like magnetic_tile" in r.stderr
    r = grad_edge("calibrate", "--model", str(tmp_path / "u.pt"), "--good", str(tiles),
                  "--product", "metal_plate", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "2 of 2 good images in" in r.stderr and "look like magnetic_tile to the unified " \
           "model, not metal_plate" in r.stderr
    r = grad_edge("calibrate", "--model", str(tmp_path / "u.pt"), "--good", str(tiles),
                  "--product", "magnetic_tile", cwd=tmp_path)
    assert r.returncode == 0 and "unified model, not" not in r.stderr, r.stderr


def test_cli_trains_and_predicts_with_a_non_square_tiled_input_when_asked(small_dataset,
                                                                          tmp_path):
    model = tmp_path / "t.pt"
    r = grad_edge("train", "--data", str(small_dataset), "--config", "tiny", "--image-size",
                  "32", "64", "--fit", "tile", "--epochs-abnormal", "1", "--epochs-normal", "1",
                  "--out", str(model), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    net, card = load_checkpoint(model)
    assert card.input_hw == (32, 64) and card.config.fit == "tile"
    # A 512 x 512 picture is scaled to 64 x 64 (aspect kept) and cut into 32 x 64 tiles.
    picture = load_image(next((small_dataset / "metal_plate/test/good").glob("*.png")))
    preds = predict_images(net, [picture])
    assert preds.maps[0].shape == (64, 64)
    r = grad_edge("eval", "--model", str(model), "--data", str(small_dataset), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    m = json.loads(model.with_suffix(".eval.json").read_text())["categories"]["metal_plate"]
    assert 0.0 <= m["pixel_auroc"] <= 1.0 and 0.0 <= m["aupro"] <= 1.0
