"""The local memory: nearest normal training patch within one grid cell, in GRAD's map."""

import pytest
import torch

from grad.checkpoint import Calibration, load_checkpoint, read_card, save_checkpoint
from grad.config import get_config
from grad.memory import LocalMemory, select_pictures
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
    memory.fit(bank)
    assert torch.allclose(memory(q), brute_force(q, bank), atol=1e-5)
    # A bank picture finds itself (0), unless told to leave it out: then its nearest other.
    assert memory(bank[2:4]).abs().max() < 1e-2     # float rounding of |q|^2 - 2 q.t + |t|^2
    rest = torch.cat([bank[:2], bank[3:]])
    assert torch.allclose(memory(bank[2:3], torch.tensor([2])), brute_force(bank[2:3], rest),
                          atol=1e-5)


def test_memory_finds_a_part_shifted_by_one_cell_and_not_by_two():
    g = torch.Generator().manual_seed(1)
    bank = torch.randn(1, 4, 8, 8, generator=g)
    memory = LocalMemory(4, (8, 8))
    memory.fit(bank)
    one, two = torch.roll(bank, 1, dims=3), torch.roll(bank, 2, dims=3)
    # away from the wrapped-around columns, a shift of one cell is matched exactly
    assert memory(one)[0, :, 1:].abs().max() < 1e-3
    assert memory(two)[0, :, 2:].min() > 0.1


def test_memory_selection_keeps_distinct_pictures_before_near_duplicates():
    g = torch.Generator().manual_seed(2)
    distinct = torch.randn(3, 2, 2, 2, generator=g) * 10
    copies = distinct[0:1] + 0.01 * torch.randn(5, 2, 2, 2, generator=g)
    keep = select_pictures(torch.cat([distinct, copies]), 3)
    chosen = torch.cat([distinct, copies])[keep]
    # one picture from each of the three distinct looks
    assert (torch.cdist(chosen.flatten(1), distinct.flatten(1)).min(dim=0).values < 1).all()
    assert len(select_pictures(distinct, 10)) == 3


def test_grad_with_memory_adds_scaled_distance_and_round_trips_through_a_checkpoint(tmp_path):
    torch.manual_seed(0)
    cfg = get_config("tiny", local_memory=0.3)
    model = GRAD(cfg).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        plain = model(x).anomaly_map
        model.memory.fit(model.features(torch.randn(6, 3, 64, 64)))
        model.memory.scale.fill_(0.5)
        out = model(x)
        feats = model.features(x)
        k = model.smooth_upsample(model.memory(feats))                    # (B, H, W)
    # The map is GRAD's plus lambda times the memory's distance, smoothed alike.
    assert torch.allclose(out.anomaly_map, plain + 0.5 * k, atol=1e-4)
    save_checkpoint(tmp_path / "m.pt", model,
                    Calibration(mean=1.0, std=0.5, threshold=2.5, n_images=20, rule="test"))
    card, state = read_card(tmp_path / "m.pt")
    assert state["memory.bank"].shape == (8 * 8, cfg.channels + 1, 6) and card.config == cfg
    loaded, _ = load_checkpoint(tmp_path / "m.pt")
    with torch.no_grad():
        assert torch.equal(loaded(x).score, out.score)


def test_config_without_memory_keeps_its_dict_and_refuses_a_weight_out_of_range():
    assert "local_memory" not in get_config("edge").to_dict()
    assert get_config("edge", local_memory=0.3).to_dict()["local_memory"] == 0.3
    with pytest.raises(ValueError, match="local_memory"):
        get_config("edge", local_memory=1.0)
