"""The memories: nearest normal training patch within one grid cell (local) or anywhere
(global, PatchCore's search), in GRAD's map."""

import pytest
import torch

from grad.checkpoint import Calibration, load_checkpoint, read_card, save_checkpoint
from grad.config import get_config
from grad.memory import GlobalMemory, LocalMemory, coreset
from grad.model import GRAD


def brute_force(q: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """min over n and |s| <= 1 of ||q[p] - bank_n[p + s]||, looping over every position."""
    b, c, h, w = q.shape
    out = torch.full((b, h, w), float("inf"))
    for y in range(h):
        for x in range(w):
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    if 0 <= y + dy < h and 0 <= x + dx < w:
                        d = torch.cdist(q[:, :, y, x], bank[:, :, y + dy, x + dx])  # (B, N)
                        out[:, y, x] = torch.minimum(out[:, y, x], d.min(dim=1).values)
    return out


def test_memory_distance_is_the_nearest_bank_patch_within_one_cell_when_fitted():
    g = torch.Generator().manual_seed(0)
    bank, q = torch.randn(7, 5, 4, 6, generator=g) + 2.0, torch.randn(3, 5, 4, 6, generator=g)
    memory = LocalMemory(5, (4, 6))
    source = memory.fit(bank, size=7)                       # all 7 kept at every position
    assert torch.equal(source, torch.arange(7).expand(24, 7))
    assert torch.allclose(memory(q), brute_force(q, bank), atol=1e-5)
    # A bank picture finds itself (0), unless told to leave its own patches out: then its
    # nearest *other* picture's.
    assert memory(bank[2:4]).abs().max() < 1e-2     # float rounding of |q|^2 - 2 q.t + |t|^2
    rest = torch.cat([bank[:2], bank[3:]])
    assert torch.allclose(memory(bank[2:3], (source, torch.tensor([2]))),
                          brute_force(bank[2:3], rest), atol=1e-5)
    # -1: an input from elsewhere, nothing left out
    assert torch.equal(memory(q, (source, torch.full((3,), -1))), memory(q))


def test_memory_finds_a_part_shifted_by_one_cell_and_not_by_two():
    g = torch.Generator().manual_seed(1)
    bank = torch.randn(1, 4, 8, 8, generator=g)
    memory = LocalMemory(4, (8, 8))
    memory.fit(bank, size=1)
    one, two = torch.roll(bank, 1, dims=3), torch.roll(bank, 2, dims=3)
    # away from the wrapped-around columns, a shift of one cell is matched exactly
    assert memory(one)[0, :, 1:].abs().max() < 1e-3
    assert memory(two)[0, :, 2:].min() > 0.1


def test_coreset_keeps_each_distinct_patch_before_near_duplicates_at_every_position():
    g = torch.Generator().manual_seed(2)
    distinct = torch.randn(2, 3, 4, generator=g) * 10                  # (HW, 3 looks, C)
    copies = distinct[:, :1] + 0.01 * torch.randn(2, 5, 4, generator=g)  # 5 near copies of one
    patches = torch.cat([copies, distinct], dim=1)                      # (HW, 8, C)
    keep = coreset(patches, 3, chunk=1)                                 # (HW, 3)
    for p in range(2):
        chosen = patches[p, keep[p]]                                    # (3, C)
        # one patch of each of the three looks, not two of the copied one
        assert (torch.cdist(distinct[p], chosen).min(dim=1).values < 1).all()
    assert torch.equal(coreset(patches, 10), torch.arange(8).expand(2, 8))


def test_memory_keeps_the_asked_number_of_patches_and_they_are_training_patches():
    g = torch.Generator().manual_seed(3)
    train = torch.randn(9, 4, 3, 3, generator=g)
    memory = LocalMemory(4, (3, 3))
    source = memory.fit(train, size=4)
    assert memory.size == 4 and source.shape == (9, 4)
    # each kept patch is the training patch its source names, at that position (centred)
    t = (train - memory.mean).flatten(2).permute(2, 0, 1)               # (HW, N, C)
    kept = memory.bank[:, :-1].transpose(1, 2)                          # (HW, 4, C)
    assert torch.allclose(kept, torch.gather(t, 1, source.unsqueeze(2).expand(-1, -1, 4)))


def test_grad_with_memory_adds_scaled_distance_and_round_trips_through_a_checkpoint(tmp_path):
    torch.manual_seed(0)
    cfg = get_config("tiny", local_memory=0.3)
    model = GRAD(cfg).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        plain = model(x).anomaly_map
        model.memory.fit(model.features(torch.randn(6, 3, 64, 64)), size=4)
        model.memory.scale.fill_(0.5)
        out = model(x)
        feats = model.features(x)
        k = model.smooth_upsample(model.memory(feats))                    # (B, H, W)
    # The map is GRAD's plus lambda times the memory's distance, smoothed alike.
    assert torch.allclose(out.anomaly_map, plain + 0.5 * k, atol=1e-4)
    save_checkpoint(tmp_path / "m.pt", model,
                    Calibration(mean=1.0, std=0.5, threshold=2.5, n_images=20, rule="test"))
    card, state = read_card(tmp_path / "m.pt")
    assert state["memory.bank"].shape == (8 * 8, cfg.channels + 1, 4) and card.config == cfg
    loaded, _ = load_checkpoint(tmp_path / "m.pt")
    with torch.no_grad():
        assert torch.equal(loaded(x).score, out.score)


def test_config_without_memory_keeps_its_dict_and_refuses_a_weight_out_of_range():
    # (a checkpoint from before the memory has no such key: it loads as a model without one)
    assert "local_memory" not in get_config("edge", local_memory=0.0).to_dict()
    assert get_config("edge").to_dict()["local_memory"] == 0.3
    assert get_config("tiny").local_memory == 0.0
    with pytest.raises(ValueError, match="local_memory"):
        get_config("edge", local_memory=1.0)


def test_a_bank_of_another_grid_fails_to_load_as_a_size_mismatch():
    # Only the number of kept patches is taken from a stored bank: a bank for another grid
    # fails the load, not the line's first frame.
    other = LocalMemory(5, (3, 3))
    other.fit(torch.randn(2, 5, 3, 3), size=2)
    memory = LocalMemory(5, (4, 6))
    with pytest.raises(RuntimeError, match="size mismatch"):
        memory.load_state_dict(other.state_dict())
    same = LocalMemory(5, (3, 3))
    same.load_state_dict(other.state_dict())
    assert torch.equal(same.bank, other.bank)


def tiled_fit_set(cfg, pictures: int):
    """`pictures` pictures of two tiles each, the second the first one feature cell further
    along (a long part's overlapping tiles): what the trainer caches for a tiled model."""
    from grad.tiling import TilePlan
    from trainer.features import Features
    g = torch.Generator().manual_seed(1)
    base = torch.randn(pictures, cfg.channels, *cfg.feature_hw, generator=g)
    feats = torch.stack([base, base.roll(-1, dims=-1)], dim=1).flatten(0, 1)  # (2P, C, h, w)
    h, w = cfg.input_hw
    plan = TilePlan(scaled_hw=(h, w + 8), tile_hw=(h, w), origins=((0, 0), (0, 8)))
    return Features(feats, (plan,) * pictures)


def test_fit_set_scored_by_itself_leaves_out_each_pictures_own_tiles():
    import numpy as np

    from trainer.features import fit_memory
    torch.manual_seed(0)
    cfg = get_config("tiny", local_memory=0.3, memory_size=16)
    model = GRAD(cfg, pretrained_backbone=False).eval()
    train = tiled_fit_set(cfg, 3)
    # Nothing held out: the fit set is its own held-out set (trainer.fit with --holdout 0),
    # and lambda = w / (1 - w) q(A) / q(K) must come from each picture's distance to the
    # *other* pictures: 16 >= 6 tiles, so the bank keeps every tile, and leaving a picture
    # out is exactly a bank of the other two. Had only the tile itself been left out, its
    # sibling one cell over would match it (K = 0 at 7 of 8 columns), and lambda would
    # follow the border columns instead (measured: 0.264 against 0.2545 here).
    fit_memory(model, train, train)
    with torch.no_grad():
        f = train.feats
        a = model.smooth_upsample(model.residual(f, model.head(f).z_hat))
        k = []
        for i in range(3):
            others = LocalMemory(cfg.channels, cfg.feature_hw)
            others.fit(torch.cat([f[:2 * i], f[2 * i + 2:]]), size=16)
            k.append(model.smooth_upsample(others(f[2 * i:2 * i + 2])))
    q = lambda maps: float(np.quantile(maps.numpy(), 0.99))
    expect = 0.3 / 0.7 * q(a) / q(torch.cat(k))
    assert float(model.memory.scale) == pytest.approx(expect, rel=1e-4)


def test_one_training_picture_with_nothing_held_out_leaves_the_memory_out(caplog):
    from grad.tiling import TilePlan
    from trainer.features import Features, fit_memory
    cfg = get_config("tiny", local_memory=0.3)
    model = GRAD(cfg, pretrained_backbone=False).eval()
    whole = TilePlan(scaled_hw=cfg.input_hw, tile_hw=cfg.input_hw, origins=((0, 0),))
    one = Features(torch.randn(1, cfg.channels, *cfg.feature_hw), (whole,))
    with caplog.at_level("WARNING", logger="trainer.features"):
        fit_memory(model, one, one)
    # Its only picture is left out of its own bank: no distance to scale the memory by
    # (before: K = inf, and a NaN scale that made every score NaN, every defect a pass).
    assert "left out of the map" in caplog.text and float(model.memory.scale) == 0.0
    own = torch.zeros(model.memory.bank.shape[0], model.memory.size, dtype=torch.long)
    with torch.no_grad():
        assert torch.equal(model.memory(one.feats, (own, torch.tensor([0]))),
                           torch.zeros(1, *cfg.feature_hw))
        assert torch.isfinite(model(torch.randn(1, 3, *cfg.input_hw)).score).all()


def test_global_memory_distance_is_the_nearest_kept_patch_anywhere():
    g = torch.Generator().manual_seed(4)
    memory = GlobalMemory((2, 3))                  # a stride-8 stage of 2 channels, one of 3
    train, q = torch.randn(4, 5, 6, 6, generator=g), torch.randn(2, 5, 6, 6, generator=g)
    source = memory.fit(train, ratio=1.0)          # every patch kept
    assert memory.size == 4 * 36 and torch.equal(source.sort().values,
                                                  torch.arange(4).repeat_interleave(36))
    # PatchCore's locally aware patches: the stride-8 channels averaged 3 x 3, the resized
    # stride-16 ones 5 x 5, zero padding counted
    p = memory.patches(train)
    assert torch.allclose(p[0, :2, 0, 0], train[0, :2, :2, :2].sum(dim=(1, 2)) / 9)
    assert torch.allclose(p[0, 2:, 2, 2], train[0, 2:, :5, :5].mean(dim=(1, 2)))
    flat = lambda t: t.permute(0, 2, 3, 1).reshape(-1, 5)                   # noqa: E731
    nearest = torch.cdist(flat(memory.patches(q)), flat(p)).min(dim=1).values.view(2, 6, 6)
    assert torch.allclose(memory(q), nearest, atol=1e-4)
    # unlike the local memory, a part moved two cells finds its own patches (away from the
    # border and the seam of the roll, where its pooled windows differ)
    wide = torch.randn(3, 5, 12, 12, generator=g)
    memory.fit(wide, ratio=1.0)
    local = LocalMemory(5, (12, 12))
    local.fit(wide, size=3)
    moved = torch.roll(wide[1:2], shifts=(2, 2), dims=(2, 3))
    assert memory(moved)[0, 4:10, 4:10].abs().max() < 1e-2
    assert local(moved)[0, 4:10, 4:10].min() > 0.5
    memory.fit(train, ratio=1.0)
    # a fit picture scored by itself, its own patches left out: its nearest other picture's
    own = memory(train[1:2], (source, torch.tensor([1])))
    others = torch.cdist(flat(p[1:2]), flat(p[[0, 2, 3]])).min(dim=1).values.view(1, 6, 6)
    assert torch.allclose(own, others, atol=1e-4) and own.min() > 0.01


def test_global_memory_keeps_its_share_by_k_centre_and_loads_its_stored_size(tmp_path):
    g = torch.Generator().manual_seed(5)
    memory = GlobalMemory((2, 3))
    memory.fit(torch.randn(10, 5, 4, 4, generator=g), ratio=0.25)
    assert memory.size == 40 and memory.bank.shape == (6, 40)
    # kept patches are centred training patches, the last row -|t|^2 / 2
    assert torch.allclose(memory.bank[-1], -0.5 * memory.bank[:-1].pow(2).sum(0))
    other = GlobalMemory((2, 3))
    other.load_state_dict(memory.state_dict())
    assert torch.equal(other.bank, memory.bank) and other.size == 40


def test_grad_with_global_memory_reads_raw_features_and_round_trips_through_a_checkpoint(
        tmp_path):
    torch.manual_seed(0)
    cfg = get_config("tiny", whiten=True, global_memory=0.8)
    # a model without one keeps its config dict (and model hash) as before the key existed
    assert "global_memory" not in get_config("tiny").to_dict()
    assert cfg.to_dict()["global_memory"] == 0.8
    model = GRAD(cfg).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        train = model.backbone(torch.randn(6, 3, 64, 64))
        model.whiten.fit(model.pool(train))
        plain = model(x).anomaly_map
        model.global_memory.fit(train, ratio=0.5)
        model.global_memory.scale.fill_(0.5)
        out = model(x)
        # on the backbone's raw features, not the whitened head input
        g = model.smooth_upsample(model.global_memory(model.backbone(x)))
    assert torch.allclose(out.anomaly_map, plain + 0.5 * g, atol=1e-4)
    with pytest.raises(ValueError, match="raw features"):
        f = model.features(x)
        model.anomaly(f, model.head(f).z_hat)
    save_checkpoint(tmp_path / "m.pt", model,
                    Calibration(mean=1.0, std=0.5, threshold=2.5, n_images=20, rule="test"))
    card, state = read_card(tmp_path / "m.pt")
    assert state["global_memory.bank"].shape == (cfg.channels + 1, 192) and card.config == cfg
    loaded, _ = load_checkpoint(tmp_path / "m.pt")
    with torch.no_grad():
        assert torch.equal(loaded(x).score, out.score)
    with pytest.raises(ValueError, match="global_memory"):
        get_config("edge", global_memory=1.0)
