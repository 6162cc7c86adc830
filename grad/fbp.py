"""Feature Block Paste (FBP): pseudo-anomalies made directly in feature space.

Training the abnormal grid needs anomalies, and the line only gives us normal parts. FBP pastes
a blob into the frozen backbone's features F: a random-walk shape inside a (2B+1)^2 block,
softened by a 3x3 Gaussian, scaled by an intensity I ~ U(lo, hi) and added to every channel at
a random place where the block fits. The walked cells are the label. Because it works on F, not
on pixels, training can run on cached features.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

_BLUR3 = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]) / 16.0


def random_walk_mask(radius: int, steps: int, gen: torch.Generator) -> torch.Tensor:
    """A (2r+1, 2r+1) 0/1 mask: the cells a four-neighbour walk from the centre visits."""
    size = 2 * radius + 1
    mask = torch.zeros(size, size)
    y = x = radius
    mask[y, x] = 1
    moves = torch.tensor([[0, 1], [0, -1], [1, 0], [-1, 0]])
    for step in torch.randint(0, 4, (steps,), generator=gen):
        dy, dx = moves[step].tolist()
        y = min(max(y + dy, 0), size - 1)   # the walk stays inside the block
        x = min(max(x + dx, 0), size - 1)
        mask[y, x] = 1
    return mask


class Pasted(NamedTuple):
    feats: torch.Tensor  # (B, C, H, W) F with the blobs added
    mask: torch.Tensor   # (B, H, W) bool, True on walked cells (the label)


def feature_block_paste(feats: torch.Tensor, gen: torch.Generator, max_radius: int = 9,
                        steps: int = 100, intensity: tuple[float, float] = (8.0, 16.0)) -> Pasted:
    """Paste one pseudo-anomaly into each sample of F (B, C, H, W)."""
    b, _, h, w = feats.shape
    max_radius = min(max_radius, (min(h, w) - 1) // 2)      # the block must fit the map
    add = torch.zeros(b, 1, h, w)
    label = torch.zeros(b, h, w, dtype=torch.bool)
    for i in range(b):
        r = int(torch.randint(0, max_radius + 1, (1,), generator=gen))
        walk = random_walk_mask(r, steps, gen)                      # (2r+1, 2r+1)
        soft = F.conv2d(walk[None, None], _BLUR3[None, None], padding=1)[0, 0]
        level = float(torch.empty(1).uniform_(*intensity, generator=gen))
        top = int(torch.randint(0, h - 2 * r, (1,), generator=gen))
        left = int(torch.randint(0, w - 2 * r, (1,), generator=gen))
        add[i, 0, top:top + 2 * r + 1, left:left + 2 * r + 1] = level * soft
        label[i, top:top + 2 * r + 1, left:left + 2 * r + 1] = walk.bool()
    return Pasted(feats + add.to(feats), label.to(feats.device))
