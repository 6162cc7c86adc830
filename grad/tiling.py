"""How a picture of any shape becomes model inputs, and how their maps become one map again.

GRAD's grids have a fixed feature shape (the global grid holds C x H x W values per cell), so
every model input has the config's H x W. A picture of another shape gets there one of two ways
(`GRADConfig.fit`):

    stretch   resize to H x W whatever the picture's aspect (what the field's benchmarks do;
              a part three times longer than wide is squashed threefold along its length)
    tile      resize with the aspect kept until the picture just covers one H x W tile (one
              side equal, the other at least as long), then cut n tiles along the long side,
              neighbours overlapping by at least `overlap` of a tile, spread evenly so the last
              tile ends at the picture's edge. n = 1 when the aspect already matches.

A `TilePlan` is pure arithmetic on the picture's shape: the same plan is made in training, in
`eval`/`predict` and on the line (the worker's frames have a fixed shape per source, so its plan
is fixed too and graph-captured or exported backends see static shapes). The tiles' maps are
stitched by averaging where tiles overlap; the picture's map is then at the scaled size, with
the picture's aspect, and the line maps it back to frame pixels like any other map.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TilePlan:
    scaled_hw: tuple[int, int]              # the picture after the resize (the map's shape)
    tile_hw: tuple[int, int]                # one model input
    origins: tuple[tuple[int, int], ...]    # (y, x) of each tile's top-left corner, in order

    @property
    def n(self) -> int:
        return len(self.origins)

    @property
    def identity(self) -> bool:
        """One tile that is the whole (resized) picture: nothing to cut or stitch."""
        return self.n == 1 and self.scaled_hw == self.tile_hw


def _starts(length: int, tile: int, overlap: float) -> list[int]:
    """Tile origins along one axis: as few tiles as keep each overlap >= `overlap` of a tile."""
    if length <= tile:
        return [0]
    n = math.ceil((length - tile) / (tile * (1.0 - overlap))) + 1
    return [round(i * (length - tile) / (n - 1)) for i in range(n)]


def plan_tiles(picture_hw: tuple[int, int], tile_hw: tuple[int, int], fit: str,
               overlap: float = 0.25) -> TilePlan:
    """The plan for a picture of `picture_hw` (h, w) pixels; see the module docstring."""
    h, w = int(picture_hw[0]), int(picture_hw[1])
    th, tw = int(tile_hw[0]), int(tile_hw[1])
    if h < 1 or w < 1:
        raise ValueError(f"picture shape must be positive (h, w), got {picture_hw}")
    if fit == "stretch":
        return TilePlan((th, tw), (th, tw), ((0, 0),))
    if fit != "tile":
        raise ValueError(f"fit {fit!r} unknown; choose stretch or tile")
    scale = max(th / h, tw / w)                       # the picture covers one tile, aspect kept
    sh, sw = max(th, round(h * scale)), max(tw, round(w * scale))
    origins = tuple((y, x) for y in _starts(sh, th, overlap) for x in _starts(sw, tw, overlap))
    return TilePlan((sh, sw), (th, tw), origins)


def cut(pictures: torch.Tensor, plan: TilePlan) -> torch.Tensor:
    """(B, C, sh, sw) resized pictures -> (B*n, C, th, tw) tiles, picture-major."""
    if plan.identity:
        return pictures
    th, tw = plan.tile_hw
    tiles = [pictures[:, :, y:y + th, x:x + tw] for y, x in plan.origins]   # n x (B, C, th, tw)
    return torch.stack(tiles, dim=1).flatten(0, 1)                         # (B*n, C, th, tw)


def stitch(maps: torch.Tensor, plan: TilePlan) -> torch.Tensor:
    """(B*n, th, tw) tile maps -> (B, sh, sw): the mean of the tiles covering each pixel."""
    if plan.identity:
        return maps
    th, tw = plan.tile_hw
    maps = maps.unflatten(0, (-1, plan.n))                                  # (B, n, th, tw)
    total = maps.new_zeros(maps.shape[0], *plan.scaled_hw)                  # (B, sh, sw)
    count = maps.new_zeros(plan.scaled_hw)                                  # (sh, sw)
    for i, (y, x) in enumerate(plan.origins):
        total[:, y:y + th, x:x + tw] += maps[:, i]
        count[y:y + th, x:x + tw] += 1
    return total / count
