"""Checkpoints round-trip to identical scores and refuse what they cannot trust."""

import torch
import pytest

from grad.checkpoint import (Calibration, CheckpointError, _hash, load_checkpoint, read_card,
                             recalibrate, save_checkpoint)


def test_checkpoint_round_trip_gives_identical_scores_when_reloaded(tiny_model, tmp_path):
    cal = Calibration(mean=1.0, std=0.5, threshold=2.5, n_images=4, rule="test")
    with torch.no_grad():  # give the head non-initial weights, so the test can tell them apart
        for p in tiny_model.head.parameters():
            p.add_(torch.randn_like(p) * 0.01)
        tiny_model.residual_scale.uniform_(0.5, 2.0)  # fitted after training: must travel too
    card = save_checkpoint(tmp_path / "m.pt", tiny_model, cal, {"categories": ["x"]})
    model, loaded = load_checkpoint(tmp_path / "m.pt")
    x = torch.randn(2, 3, tiny_model.cfg.image_size, tiny_model.cfg.image_size)
    with torch.no_grad():
        assert torch.equal(model(x).score, tiny_model.eval()(x).score)
    assert loaded.model_hash == card.model_hash and len(card.model_hash) == 16
    assert loaded.calibration == cal and loaded.config == tiny_model.cfg
    assert loaded.calibration.calibrate(3.5) == pytest.approx(5.0)


def test_checkpoint_load_fails_with_reason_when_file_was_tampered(tiny_model, tmp_path):
    cal = Calibration(mean=1.0, std=0.5, threshold=2.5, n_images=4, rule="test")
    save_checkpoint(tmp_path / "m.pt", tiny_model, cal)
    payload = torch.load(tmp_path / "m.pt", weights_only=True)
    payload["calibration"]["threshold"] = 99.0
    torch.save(payload, tmp_path / "m.pt")
    with pytest.raises(CheckpointError, match="corrupt"):
        read_card(tmp_path / "m.pt")


def test_checkpoint_load_names_the_fix_when_file_is_missing_or_foreign(tmp_path):
    with pytest.raises(CheckpointError, match="grad-edge train"):
        read_card(tmp_path / "nope.pt")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a grad-edge checkpoint"):
        read_card(tmp_path / "other.pt")


def test_checkpoint_keeps_one_threshold_per_product_when_the_model_is_unified(tiny_model, tmp_path):
    pooled = Calibration(mean=1.5, std=1.0, threshold=4.0, n_images=40, rule="test")
    plate = Calibration(mean=1.0, std=0.2, threshold=1.6, n_images=20, rule="test")
    tile = Calibration(mean=2.0, std=0.5, threshold=3.5, n_images=20, rule="test")
    save_checkpoint(tmp_path / "u.pt", tiny_model, pooled, {"categories": ["plate", "tile"]},
                    {"tile": tile, "plate": plate})
    card, _ = read_card(tmp_path / "u.pt")
    assert card.calibration_for("plate") == plate and card.calibration_for("tile") == tile
    assert card.calibration_for(None) == pooled
    with pytest.raises(LookupError, match="no calibration for product 'gear'.*plate, tile"):
        card.calibration_for("gear")


def test_recalibrate_replaces_the_threshold_keeps_the_weights_and_records_it(tiny_model, tmp_path):
    old = Calibration(mean=1.0, std=0.5, threshold=2.5, n_images=30, rule="test")
    first = save_checkpoint(tmp_path / "m.pt", tiny_model, old, {"categories": ["plate"]},
                            {"plate": old})
    _, weights_before = read_card(tmp_path / "m.pt")
    new = Calibration(mean=1.2, std=0.4, threshold=2.9, n_images=25, rule="test", source="dir")
    card = recalibrate(tmp_path / "m.pt", new, None, record={"good": "dir"})
    _, weights_after = read_card(tmp_path / "m.pt")
    # A one-product model: its default and its product's threshold are the same thing.
    assert card.calibration == new and card.calibration_for("plate") == new
    assert card.model_hash != first.model_hash          # decisions log under a new name
    assert card.meta["calibrations"][-1]["good"] == "dir"
    assert card.meta["calibrations"][-1]["threshold"] == 2.9
    assert all(torch.equal(weights_before[k], weights_after[k]) for k in weights_before)


def test_version_1_checkpoint_loads_with_its_calibration_as_its_only_products(tiny_model, tmp_path):
    cal = Calibration(mean=1.0, std=0.5, threshold=2.5, n_images=4, rule="test")
    save_checkpoint(tmp_path / "m.pt", tiny_model, cal, {"categories": ["plate"]})
    payload = torch.load(tmp_path / "m.pt", weights_only=True)
    del payload["products"]
    payload["version"] = 1
    payload["calibration"]["per_category"] = {"plate": {"n": 4}}   # v1 field, now dropped
    del payload["calibration"]["source"]
    payload["model_hash"] = _hash(payload["config"], payload["state_dict"],
                                  payload["calibration"], payload["backbone_sha256"])
    torch.save(payload, tmp_path / "m.pt")
    card, _ = read_card(tmp_path / "m.pt")
    assert card.calibration.threshold == 2.5 and card.calibration_for("plate").threshold == 2.5
