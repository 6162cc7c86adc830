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
