"""The training schedule: which grid trains in which phase, loss goes down, calibration."""

import numpy as np
import pytest
import torch

from grad.config import get_config
from grad.model import GRAD
from trainer.train import TrainConfig, calibrate, calibrate_products, set_trainable, train_head


def test_schedule_freezes_the_normal_grid_when_the_abnormal_grid_trains_and_vice_versa():
    model = GRAD(get_config("tiny"))
    set_trainable(model, "abnormal")
    assert all(p.requires_grad for p in model.head.grid_parameters("abnormal"))
    assert not any(p.requires_grad for p in model.head.grid_parameters("normal"))
    assert model.head.trunk_n.out.weight.requires_grad  # non-grid tensors train in both phases
    set_trainable(model, "normal")
    assert all(p.requires_grad for p in model.head.grid_parameters("normal"))
    assert not any(p.requires_grad for p in model.head.grid_parameters("abnormal"))


def test_train_head_lowers_the_loss_and_leaves_frozen_grid_untouched_when_training(tiny_model):
    torch.manual_seed(0)
    model = GRAD(get_config("tiny"))
    cfg = model.cfg
    # Structured "normal" features: a fixed pattern plus a little noise per image.
    pattern = torch.randn(1, cfg.channels, *cfg.feature_hw)
    feats = pattern + 0.1 * torch.randn(24, *pattern.shape[1:])
    normal_before = [p.detach().clone() for p in model.head.grid_parameters("normal")]
    history = train_head(model, feats, TrainConfig(epochs_abnormal=3, epochs_normal=0,
                                                  batch_size=8), show_progress=False)
    assert [h.phase for h in history] == ["abnormal"] * 3
    assert history[-1].loss < history[0].loss
    # The normal grid was frozen throughout the abnormal phase.
    for before, p in zip(normal_before, model.head.grid_parameters("normal")):
        assert torch.equal(before, p)
    assert not model.training
    # The normal residual spread was fitted on the training features.
    assert (model.residual_scale > 0).all()
    assert not torch.equal(model.residual_scale, torch.ones_like(model.residual_scale))


def test_calibrate_sets_threshold_at_mean_plus_k_std_even_below_a_normal_score_seen(caplog):
    # The threshold is a false-reject budget, not a fence around every normal picture seen:
    # a threshold that followed the strangest held-out normal (3.0 here) would pass every
    # defect scoring below it.
    scores = np.array([1.0, 1.2, 0.9, 1.1, 3.0])
    with caplog.at_level("INFO", logger="trainer.train"):
        cal = calibrate(scores, sigmas=0.5)
    assert cal.threshold == pytest.approx(scores.mean() + 0.5 * scores.std())
    assert cal.threshold < 3.0 and cal.n_images == 5
    assert "1 of 5 calibrating normal image(s) score above the threshold" in caplog.text
    assert cal.rule.startswith("mean + 0.5 std")
    wide = calibrate(scores, sigmas=3.0)
    assert wide.threshold == pytest.approx(scores.mean() + 3 * scores.std())
    with pytest.raises(ValueError, match="at least one"):
        calibrate(np.array([]), 3.0)


def test_calibrate_leaves_a_normal_score_far_above_the_rest_out_of_the_statistics(caplog):
    # 99 normal scores around 10 and one picture the model scores like a defect (a defect
    # among the good images): the threshold stays with the 99, and the log says why.
    scores = np.append(np.random.default_rng(0).normal(10.0, 1.0, 99), 60.0)
    with caplog.at_level("WARNING", logger="trainer.train"):
        cal = calibrate(scores, sigmas=3.0)
    normal = scores[:99]
    assert cal.threshold == pytest.approx(normal.mean() + 3 * normal.std())
    assert cal.threshold < 15.0 and cal.n_images == 99
    assert "1 of 100 normal image(s)" in caplog.text and "60" in caplog.text
    # Fewer than 38 scores cannot hold one (the highest is at most sqrt(n - 1) std out): all
    # of them make the statistics.
    few = np.append(np.full(36, 10.0), 60.0)
    cal = calibrate(few, sigmas=3.0)
    assert cal.n_images == 37 and cal.threshold == pytest.approx(few.mean() + 3 * few.std())


def test_calibrate_warns_when_fewer_than_twenty_images_set_the_threshold(caplog):
    with caplog.at_level("WARNING", logger="trainer.train"):
        calibrate(np.linspace(1.0, 2.0, 19), sigmas=3.0, source="good images in d")
    assert "only 19 normal image(s)" in caplog.text and "grad-edge calibrate" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="trainer.train"):
        calibrate(np.linspace(1.0, 2.0, 20), sigmas=3.0)
    assert caplog.text == ""


def test_calibrate_products_gives_each_product_its_own_threshold_and_a_pooled_default():
    scores = np.array([1.0, 1.1, 0.9, 10.0, 11.0, 9.0])
    default, per = calibrate_products(scores, ["a", "a", "a", "b", "b", "b"], sigmas=0.0)
    assert per["a"].threshold == pytest.approx(1.0) and per["b"].threshold == pytest.approx(10.0)
    assert default.n_images == 6 and default.threshold == pytest.approx(5.5)
    one, only = calibrate_products(scores[:3], ["a"] * 3, sigmas=0.0)
    assert one == only["a"]
