"""Pixels to model input: uint8 pictures (B, h, w, 3) -> normalised float tiles (B*n, 3, H, W).

One module used everywhere a score is computed (training's feature cache, eval, predict, the
line's worker, exported artifacts), so the same picture gives the same score on every path.
How a picture becomes H x W inputs (stretched, or tiled with its aspect kept) is the config's
`fit` (`grad.tiling`); `plan(h, w)` says what this module will do to an h x w picture, and GRAD
uses that same plan to stitch the tiles' maps back together.
EfficientNet-Lite was trained on inputs scaled as (x - 127) / 128, not ImageNet mean/std.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from grad.tiling import TilePlan, cut, plan_tiles

LITE_MEAN = 127.0
LITE_SCALE = 128.0


class Preprocess(nn.Module):
    def __init__(self, input_hw: int | tuple[int, int], bgr: bool = False, fit: str = "stretch",
                 overlap: float = 0.25):
        super().__init__()
        self.input_hw = (input_hw, input_hw) if isinstance(input_hw, int) else tuple(input_hw)
        self.fit = fit
        self.overlap = overlap
        self.bgr = bgr  # OpenCV frames arrive BGR; flipping here saves a full-frame copy outside

    @classmethod
    def for_config(cls, cfg, bgr: bool = False) -> "Preprocess":
        return cls(cfg.input_hw, bgr=bgr, fit=cfg.fit, overlap=cfg.tile_overlap)

    def plan(self, h: int, w: int) -> TilePlan:
        return plan_tiles((h, w), self.input_hw, self.fit, self.overlap)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        plan = self.plan(images.shape[1], images.shape[2])
        # Cast and NHWC -> NCHW in one pass: the CUDA antialiased resize makes its input
        # contiguous anyway, and a second full-frame float copy would cost memory and time.
        x = images.permute(0, 3, 1, 2).to(torch.float32,
                                          memory_format=torch.contiguous_format)  # (B, 3, h, w)
        if x.shape[-2:] != plan.scaled_hw:
            # Antialiased: line frames are often 1080p, and plain bilinear would alias 4x down.
            x = F.interpolate(x, size=plan.scaled_hw, mode="bilinear", align_corners=False,
                              antialias=True)                              # (B, 3, sh, sw)
        if self.bgr:
            # After the resize, which treats channels alike, so the result is the same, but the
            # copy is of the model-sized picture, not of a full float 1080p frame (25 MB).
            x = x.flip(1)
        return cut((x - LITE_MEAN) / LITE_SCALE, plan)                     # (B*n, 3, H, W)
