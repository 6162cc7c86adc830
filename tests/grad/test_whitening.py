"""Per-position whitening: normal features come out with zero mean and unit covariance."""

import pytest
import torch

from grad.checkpoint import Calibration, load_checkpoint, save_checkpoint
from grad.config import get_config
from grad.model import GRAD
from grad.whitening import FeatureWhitening


def test_whitening_gives_normal_features_zero_mean_and_unit_covariance_when_fitted():
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(6, 6, generator=g)                       # correlated channels
    feats = torch.einsum("dc,nchw->ndhw", mix, torch.randn(500, 6, 2, 3, generator=g)) + 3.0
    w = FeatureWhitening(6, (2, 3), eps=0.0)
    w.fit(feats)
    y = w(feats)                                                # (N, 6, 2, 3)
    assert y.mean(0).abs().max() < 1e-4
    x = y[:, :, 1, 2]                                           # one position, (N, C)
    cov = x.T @ x / (len(x) - 1)
    assert torch.allclose(cov, torch.eye(6), atol=0.15)
    assert 0.0 <= float(w.shrinkage) <= 1.0


def test_whitening_fit_refuses_a_single_picture_with_the_reason():
    with pytest.raises(ValueError, match="at least 2"):
        FeatureWhitening(4, (2, 2)).fit(torch.randn(1, 4, 2, 2))


def test_grad_with_whitening_round_trips_its_statistics_through_a_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = GRAD(get_config("tiny", whiten=True, refine_k=None)).eval()
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        model.whiten.fit(model.backbone(torch.randn(8, 3, 64, 64)))
        expected = model(x).score
    cal = Calibration(mean=1.0, std=0.5, threshold=2.5, n_images=20, rule="test")
    save_checkpoint(tmp_path / "w.pt", model, cal)
    loaded, _ = load_checkpoint(tmp_path / "w.pt")
    with torch.no_grad():
        assert torch.equal(loaded(x).score, expected)
    assert not torch.equal(loaded.whiten.mean, torch.zeros_like(loaded.whiten.mean))


def two_products(n: int = 400, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Features of two products with different means and correlations, (2n, 6, 2, 3)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.einsum("dc,nchw->ndhw", torch.randn(6, 6, generator=g),
                     torch.randn(n, 6, 2, 3, generator=g)) + 3.0
    b = torch.einsum("dc,nchw->ndhw", torch.randn(6, 6, generator=g) * 0.3,
                     torch.randn(n, 6, 2, 3, generator=g)) - 5.0
    return torch.cat([a, b]), torch.tensor([0] * n + [1] * n)


def test_each_product_is_whitened_by_its_own_statistics_and_routed_there_without_a_label():
    feats, groups = two_products()
    w = FeatureWhitening(6, (2, 3), eps=0.0, groups=2)
    w.fit(feats, groups)
    assert (w.route(feats) == groups).all()                     # no label needed at inference
    y = w(feats)
    for k in (0, 1):
        x = y[groups == k][:, :, 0, 1]                          # one position, (N, C)
        assert x.mean(0).abs().max() < 1e-3
        torch.testing.assert_close(x.T @ x / (len(x) - 1), torch.eye(6), atol=0.15, rtol=0)
    # A batch mixing both products: each picture as if it came alone.
    mixed = feats[[0, 500, 1, 401]]
    torch.testing.assert_close(w(mixed), torch.cat([w(m[None]) for m in mixed]), rtol=1e-5,
                               atol=1e-5)
    # One set for both (what a unified model had before) leaves product 1 off centre and off
    # unit covariance: its normal spread no longer reads as 1.
    one = FeatureWhitening(6, (2, 3), eps=0.0)
    one.fit(feats)
    x = one(feats)[groups == 1][:, :, 0, 1]
    xc = x - x.mean(0)
    assert x.mean(0).abs().max() > 0.5
    assert (xc.T @ xc / (len(x) - 1) - torch.eye(6)).abs().max() > 0.5


def test_whitening_with_groups_refuses_to_fit_without_knowing_each_pictures_product():
    feats, _ = two_products(20)
    with pytest.raises(ValueError, match="each training picture's group"):
        FeatureWhitening(6, (2, 3), groups=2).fit(feats)
    with pytest.raises(ValueError, match="at least 2 training pictures"):
        FeatureWhitening(6, (2, 3), groups=2).fit(feats, torch.tensor([0] * 39 + [1]))


def test_a_checkpoint_from_before_whitening_groups_loads_as_one_group():
    feats, _ = two_products(50)
    w = FeatureWhitening(6, (2, 3))
    w.fit(feats)
    old = {"mean": w.mean[0].clone(), "factor": w.factor[0].clone(),
           "shrinkage": w.shrinkage[0].clone()}         # the layout checkpoints had
    loaded = FeatureWhitening(6, (2, 3))
    loaded.load_state_dict(old)
    torch.testing.assert_close(loaded(feats), w(feats))


def test_unified_grad_keeps_per_product_whitening_through_a_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = GRAD(get_config("tiny", whiten=True, refine_k=None, whiten_groups=2)).eval()
    x = torch.cat([torch.randn(6, 3, 64, 64), torch.randn(6, 3, 64, 64) * 0.3 + 1.5])
    with torch.no_grad():
        model.whiten.fit(model.backbone(x), torch.tensor([0] * 6 + [1] * 6))
        expected = model(x).score
    assert (model.whiten.route(model.backbone(x)) == torch.tensor([0] * 6 + [1] * 6)).all()
    cal = Calibration(mean=1.0, std=0.5, threshold=2.5, n_images=12, rule="test")
    save_checkpoint(tmp_path / "u.pt", model, cal)
    loaded, card = load_checkpoint(tmp_path / "u.pt")
    assert card.config.whiten_groups == 2 and loaded.whiten.groups == 2
    with torch.no_grad():
        assert torch.equal(loaded(x).score, expected)


def test_unified_checkpoints_are_version_3_and_one_product_ones_stay_version_2(tmp_path):
    """Code from before per-product whitening reads one-product checkpoints as it did (no new
    config key, same hash) and refuses unified ones with "upgrade grad-edge"."""
    cal = Calibration(mean=1.0, std=0.5, threshold=2.5, n_images=12, rule="test")
    for groups, version in ((1, 2), (2, 3)):
        model = GRAD(get_config("tiny", whiten=True, refine_k=None, whiten_groups=groups),
                     pretrained_backbone=False)
        save_checkpoint(tmp_path / f"g{groups}.pt", model, cal)
        payload = torch.load(tmp_path / f"g{groups}.pt", weights_only=True)
        assert payload["version"] == version
        assert ("whiten_groups" in payload["config"]) == (groups > 1)
