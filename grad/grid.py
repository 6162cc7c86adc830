"""The parts GRAD reads its reconstruction from: coordinate mapping and the two grid lookups.

A feature map F is squeezed to 2-D coordinates (u, v) in (-1, 1)^2, once per location (local)
and once per image (global); a learned grid is then read at those coordinates. Two numbers per
location cannot carry an arbitrary defect, so the grid returns what *normal* features look like
near that point: that is the bottleneck the whole method rests on.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LocalCoordinates(nn.Module):
    """1x1 conv C->C, tanh, 1x1 conv C->2, tanh: one (u, v) per feature location."""

    def __init__(self, channels: int, jitter: float):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(channels, channels, 1), nn.Tanh(), nn.Conv2d(channels, 2, 1), nn.Tanh())
        self.jitter = jitter

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        uv = self.net(feats).permute(0, 2, 3, 1)             # (B, H, W, 2), grid_sample order (x, y)
        # Training only: with probability 0.5 per batch, N(0, jitter^2) noise on the coordinates,
        # so nearby grid cells learn similar features and the lookup stays smooth.
        if self.training and self.jitter > 0 and torch.rand(()) < 0.5:
            uv = uv + torch.randn_like(uv) * self.jitter
        return uv


class GlobalCoordinates(nn.Module):
    """Global average pool, Linear C->C, tanh, Linear C->2, tanh: one (u, v) per image."""

    def __init__(self, channels: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(channels, channels), nn.Tanh(), nn.Linear(channels, 2), nn.Tanh())

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.net(feats.mean(dim=(2, 3)))              # (B, 2)


def read_local(grid: torch.Tensor, uv: torch.Tensor) -> torch.Tensor:
    """Bilinear read of a (1, C, R, R) grid at (B, H, W, 2) coordinates -> (B, C, H, W)."""
    return F.grid_sample(grid.expand(uv.shape[0], -1, -1, -1), uv,
                         mode="bilinear", padding_mode="zeros", align_corners=False)


def bilinear_weights(uv: torch.Tensor, size: int) -> torch.Tensor:
    """Weights of each of the size x size cells for one point per image: (B, 2) -> (B, size*size).

    With align_corners=False, coordinate u lands at pixel position p = ((u + 1) * size - 1) / 2.
    Bilinear interpolation gives cell j the "tent" weight max(0, 1 - |p - j|); cells outside the
    grid simply are not in the sum, which is exactly grid_sample's zero padding.
    """
    cells = torch.arange(size, device=uv.device, dtype=uv.dtype)
    pos = ((uv + 1) * size - 1) / 2                          # (B, 2): (x, y) in cell units
    wx = (1 - (pos[:, 0:1] - cells).abs()).clamp(min=0)      # (B, size) over columns
    wy = (1 - (pos[:, 1:2] - cells).abs()).clamp(min=0)      # (B, size) over rows
    return (wy[:, :, None] * wx[:, None, :]).flatten(1)      # (B, size*size), row-major like the grid


def read_global(grid: torch.Tensor, uv: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
    """Read a (1, C*H*W, R, R) grid at one (B, 2) point per image -> (B, C, H, W).

    grid_sample would walk ~C*H*W channels one after another for a single sample point; the same
    values are one (B, R^2) x (R^2, C*H*W) matrix product, which is what GPUs are built for.
    """
    size = grid.shape[-1]
    w = bilinear_weights(uv, size)                           # (B, R^2)
    table = grid.reshape(grid.shape[1], size * size)         # (C*H*W, R^2)
    return (w @ table.t()).view(uv.shape[0], *shape)         # (B, C, H, W)


class BiGrid(nn.Module):
    """One grid of the pair (normal or abnormal): a local part and a global part, xavier-normal."""

    def __init__(self, channels: int, feature_hw: tuple[int, int], local_size: int,
                 global_size: int):
        super().__init__()
        h, w = feature_hw
        self.shape = (channels, h, w)
        self.local = nn.Parameter(torch.empty(1, channels, local_size, local_size))
        self.globl = nn.Parameter(torch.empty(1, channels * h * w, global_size, global_size))
        nn.init.xavier_normal_(self.local)
        nn.init.xavier_normal_(self.globl)

    def forward(self, uv_local: torch.Tensor, uv_global: torch.Tensor) -> torch.Tensor:
        """Concatenate [global, local] reads -> the trunk's query (B, 2C, H, W)."""
        q_global = read_global(self.globl, uv_global, self.shape)  # (B, C, H, W)
        q_local = read_local(self.local, uv_local)                 # (B, C, H, W)
        return torch.cat([q_global, q_local], dim=1)
