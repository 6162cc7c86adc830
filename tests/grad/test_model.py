"""Real forward and backward passes of the tiny GRAD; FBP masks; loss signs."""

import torch

from grad.config import CONFIGS, GRADConfig, get_config
from grad.fbp import feature_block_paste, random_walk_mask
from grad.losses import contrast_loss, reconstruction_loss
from grad.model import GRAD, Reconstruction, refine, standardise


def test_grad_forward_returns_map_and_score_when_given_a_batch(tiny_model):
    cfg = tiny_model.cfg
    out = tiny_model(torch.randn(3, 3, cfg.image_size, cfg.image_size))
    assert out.anomaly_map.shape == (3, cfg.image_size, cfg.image_size)
    assert out.score.shape == (3,)
    k = max(1, int(cfg.score_topk * cfg.image_size ** 2))
    top = out.anomaly_map.flatten(1).topk(k, dim=1).values
    assert torch.allclose(out.score, top.mean(1))           # tiny pools the top 1%
    assert (out.score <= top[:, 0]).all()
    assert (out.anomaly_map >= 0).all()


def test_grad_score_is_the_map_maximum_when_top_k_pooling_is_off():
    model = GRAD(get_config("tiny", score_topk=0.0)).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 64))
    assert torch.allclose(out.score, out.anomaly_map.flatten(1).amax(1))


def test_grad_map_is_measured_in_units_of_the_residual_scale():
    model = GRAD(get_config("tiny", blur_sigma=0.0, score_topk=0.0)).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        raw = model(x).anomaly_map
        model.residual_scale.fill_(2.0)
        halved = model(x).anomaly_map
    assert torch.allclose(halved, raw / 2, atol=1e-5)


def test_map_is_the_residual_upsampled_then_blurred_whatever_the_input_shape():
    """SmoothUpsample's two matrix products stand for F.interpolate + GaussianBlur."""
    for kw in ({}, {"image_size": (64, 128)}, {"blur_sigma": 3.0}, {"blur_sigma": 0.0}):
        model = GRAD(get_config("tiny", **kw), pretrained_backbone=False).eval()
        x = torch.randn(2, 3, *model.cfg.input_hw)
        with torch.no_grad():
            feats = model.features(x)
            z_hat = model.head(feats).z_hat
            out = model(x)
            step_by_step = model.finish(model.residual_map(feats, z_hat))
        assert out.anomaly_map.shape == (2, *model.cfg.input_hw)
        torch.testing.assert_close(out.anomaly_map, step_by_step.anomaly_map, rtol=1e-5,
                                   atol=1e-5)
        torch.testing.assert_close(out.score, step_by_step.score, rtol=1e-5, atol=1e-5)
        assert out.anomaly_map.std() > 0                     # a map, not a constant


def test_standardise_is_zero_mean_unit_std_per_sample_and_channel():
    q = torch.randn(2, 5, 7, 9) * torch.arange(1, 6).view(1, 5, 1, 1) + 3.0
    z = standardise(q)
    torch.testing.assert_close(z.mean(dim=(2, 3)), torch.zeros(2, 5), atol=1e-5, rtol=0)
    torch.testing.assert_close(z.std(dim=(2, 3)), torch.ones(2, 5), atol=1e-4, rtol=0)


def test_grad_backward_reaches_every_head_parameter_when_training_on_pasted_features():
    cfg = get_config("tiny")
    model = GRAD(cfg).train()
    feats = torch.randn(4, cfg.channels, *cfg.feature_hw)
    pasted = feature_block_paste(feats, torch.Generator().manual_seed(0), cfg.fbp_max_radius,
                                 cfg.fbp_steps, cfg.fbp_intensity)
    rec = model.head(pasted.feats)
    (reconstruction_loss(feats, rec) + contrast_loss(rec, pasted.mask)).backward()
    no_grad = [n for n, p in model.head.named_parameters() if p.grad is None or not p.grad.any()]
    assert no_grad == []
    assert all(p.grad is None for p in model.backbone.parameters())


def test_fbp_mask_is_connected_walk_inside_block_when_radius_is_given():
    gen = torch.Generator().manual_seed(1)
    m = random_walk_mask(3, 50, gen)
    assert m.shape == (7, 7)
    assert m[3, 3] == 1                      # the walk starts at the centre
    assert 1 < m.sum() <= 49
    assert set(m.unique().tolist()) <= {0.0, 1.0}


def test_fbp_adds_intensity_only_around_the_labelled_cells_when_pasting():
    gen = torch.Generator().manual_seed(2)
    feats = torch.zeros(8, 3, 16, 16)
    out = feature_block_paste(feats, gen, max_radius=3, steps=20, intensity=(8.0, 16.0))
    assert out.mask.shape == (8, 16, 16) and out.mask.any(dim=(1, 2)).all()
    added = out.feats[:, 0]
    # Every channel gets the same blob; labelled cells got a clear share of I in [8, 16].
    assert torch.equal(out.feats[:, 0], out.feats[:, 2])
    assert (added[out.mask] > 8 / 16).all()
    assert added.amax() <= 16
    # Far from the block (dilated by the 3x3 blur) nothing was added.
    near = torch.nn.functional.max_pool2d(out.mask.float()[:, None], 3, 1, 1)[:, 0].bool()
    assert (added[~near] == 0).all()


def test_contrast_loss_is_zero_when_channel0_separates_pasted_cells_by_the_margin():
    mask = torch.zeros(1, 4, 4, dtype=torch.bool)
    mask[0, 1:3, 1:3] = True
    z_a = torch.full((1, 2, 4, 4), -0.6)
    z_a[0, 0][mask[0]] = 0.7
    rec = Reconstruction(z_a, z_a, z_a, z_a)
    assert contrast_loss(rec, mask).item() == 0.0
    flipped = Reconstruction(-z_a, -z_a, -z_a, -z_a)
    # Wrong sign on both sides: each side averages to (0.5 + 0.6) and (0.7 + 0.5).
    assert abs(contrast_loss(flipped, mask).item() - (1.1 + 1.2)) < 1e-6


def test_reconstruction_loss_is_zero_only_when_refined_output_equals_target():
    f = torch.randn(2, 4, 3, 3)
    assert reconstruction_loss(f, Reconstruction(f, f, f, f)).item() == 0
    assert reconstruction_loss(f, Reconstruction(f, f, f, f + 1)).item() == 1.0


def test_refine_keeps_input_when_reconstruction_is_exact_and_not_when_it_is_far():
    f = torch.randn(1, 8, 2, 2)
    assert torch.allclose(refine(f, f.clone(), k=10.0), f, atol=1e-5)   # S = 1
    z = -f * 10                                                          # cos = -1, far away
    out = refine(f, z, k=10.0)
    assert (out - f).norm() > (f.norm())                                 # anomaly not hidden


def test_named_configs_build_when_looked_up_and_reject_unknown_names():
    assert set(CONFIGS) == {"paper", "edge", "tiny"}
    assert get_config("paper").local_grid == 32 and get_config("paper").trunk_blocks == 9
    assert GRADConfig.from_dict(get_config("edge").to_dict()) == get_config("edge")
    import pytest
    with pytest.raises(ValueError, match="unknown model config"):
        get_config("huge")
    with pytest.raises(ValueError, match="unknown GRAD config keys"):
        GRADConfig.from_dict({"grid": 3})
