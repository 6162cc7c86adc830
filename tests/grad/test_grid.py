"""The grid reads: matrix form of the global lookup equals grid_sample; bilinear weights sum to 1."""

import torch
import torch.nn.functional as F

from grad.grid import bilinear_weights, read_global, read_local


def test_global_lookup_equals_grid_sample_when_points_are_inside_and_outside_the_grid():
    torch.manual_seed(0)
    c, h, r, b = 5, 3, 4, 64
    grid = torch.randn(1, c * h * h, r, r, dtype=torch.float64)
    # Points near the border exercise the zero padding, points inside plain bilinear reads.
    uv = torch.rand(b, 2, dtype=torch.float64) * 2.2 - 1.1
    ours = read_global(grid, uv, (c, h, h))
    ref = F.grid_sample(grid.expand(b, -1, -1, -1), uv.view(b, 1, 1, 2), mode="bilinear",
                        padding_mode="zeros", align_corners=False).view(b, c, h, h)
    assert torch.allclose(ours, ref, atol=1e-12)


def test_bilinear_weights_sum_to_one_when_point_is_well_inside_the_grid():
    uv = torch.tensor([[0.1, -0.3], [0.0, 0.0], [0.4, 0.2]])
    w = bilinear_weights(uv, 4)
    assert w.shape == (3, 16)
    assert torch.allclose(w.sum(1), torch.ones(3))
    assert (w > 0).sum(1).max() <= 4  # at most four cells touched


def test_bilinear_weights_lose_mass_when_point_is_past_the_edge():
    # Zero padding: beyond the outer cell centres some weight falls on cells that do not exist.
    w = bilinear_weights(torch.tensor([[-0.99, 0.0]]), 4)
    assert w.sum() < 1


def test_local_lookup_returns_one_feature_per_location():
    grid = torch.randn(1, 6, 4, 4)
    uv = torch.zeros(2, 5, 7, 2)
    out = read_local(grid, uv)
    assert out.shape == (2, 6, 5, 7)
    # The centre of a 4x4 grid is the mean of its four middle cells.
    assert torch.allclose(out[0, :, 0, 0], grid[0, :, 1:3, 1:3].mean(dim=(1, 2)), atol=1e-6)
