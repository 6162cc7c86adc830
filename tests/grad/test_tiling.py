"""Pictures of any shape: stretched, or tiled with the aspect kept and stitched back."""

import pytest
import torch

from grad.config import GRADConfig, get_config
from grad.model import GRAD
from grad.preprocess import Preprocess
from grad.tiling import cut, plan_tiles, stitch


def test_plan_tiles_covers_a_long_picture_with_overlapping_tiles_when_fit_is_tile():
    # magnetic_tile-like: 600 x 200 (h x w) at a 64 x 64 tile -> scaled to 192 x 64.
    plan = plan_tiles((600, 200), (64, 64), "tile", overlap=0.25)
    assert plan.scaled_hw == (192, 64) and plan.tile_hw == (64, 64)
    ys = [y for y, _ in plan.origins]
    assert ys[0] == 0 and ys[-1] + 64 == 192                 # first and last tile at the edges
    assert all(x == 0 for _, x in plan.origins)
    assert all(b - a <= 64 * 0.75 for a, b in zip(ys, ys[1:]))  # each overlap >= a quarter


def test_plan_tiles_is_one_whole_tile_when_the_aspect_already_matches_or_fit_stretches():
    assert plan_tiles((512, 512), (64, 64), "tile").identity
    assert plan_tiles((600, 200), (64, 64), "stretch").identity
    assert plan_tiles((300, 100), (96, 32), "tile").identity      # same aspect as the input
    with pytest.raises(ValueError, match="fit 'crop' unknown"):
        plan_tiles((10, 10), (64, 64), "crop")


def test_stitch_undoes_cut_when_the_tiles_overlap():
    plan = plan_tiles((300, 100), (32, 32), "tile", overlap=0.5)
    pictures = torch.randn(2, 1, *plan.scaled_hw)                 # (B, 1, sh, sw)
    tiles = cut(pictures, plan)                                   # (B*n, 1, 32, 32)
    assert tiles.shape == (2 * plan.n, 1, 32, 32)
    assert torch.allclose(stitch(tiles[:, 0], plan), pictures[:, 0], atol=1e-6)


def test_grad_config_takes_a_non_square_input_and_spells_a_square_one_as_an_int():
    cfg = GRADConfig(image_size=[64, 128])
    assert cfg.input_hw == (64, 128) and cfg.feature_hw == (8, 16)
    assert GRADConfig.from_dict(cfg.to_dict()) == cfg
    assert GRADConfig(image_size=[64, 64]) == GRADConfig(image_size=64)
    with pytest.raises(ValueError, match="multiples of 16"):
        GRADConfig(image_size=[64, 100])
    with pytest.raises(ValueError, match="fit 'squash' unknown"):
        GRADConfig(fit="squash")


def test_grad_gives_one_map_of_the_scaled_picture_when_a_long_picture_is_tiled():
    torch.manual_seed(0)
    cfg = get_config("tiny", fit="tile")
    model = GRAD(cfg).eval()
    pre = Preprocess.for_config(cfg)
    picture = torch.randint(0, 255, (1, 300, 100, 3), dtype=torch.uint8)   # long part
    plan = pre.plan(300, 100)
    with torch.no_grad():
        out = model(pre(picture), plan)
    h, w = cfg.input_hw
    assert plan.n >= 3 and out.anomaly_map.shape == (1, *plan.scaled_hw)
    assert plan.scaled_hw[1] == w and plan.scaled_hw[0] == round(300 * w / 100)
    assert out.score.shape == (1,) and torch.isfinite(out.anomaly_map).all()


def test_grad_runs_a_non_square_input_end_to_end_when_image_size_is_h_w():
    torch.manual_seed(0)
    model = GRAD(get_config("tiny", image_size=(96, 32))).eval()
    with torch.no_grad():
        out = model(Preprocess.for_config(model.cfg)(
            torch.randint(0, 255, (2, 300, 100, 3), dtype=torch.uint8)))
    assert out.anomaly_map.shape == (2, 96, 32) and out.score.shape == (2,)
