"""Checkpoints round-trip to identical scores and refuse what they cannot trust."""

import torch
import pytest

from grad.checkpoint import Calibration, CheckpointError, load_checkpoint, read_card, save_checkpoint


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
