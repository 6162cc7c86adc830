"""Pixels to model input: uint8 (B, H, W, 3) -> normalised float (B, 3, S, S).

One module used everywhere a score is computed (training's feature cache, eval, predict, the
line's worker, exported artifacts), so the same image gives the same score on every path.
EfficientNet-Lite was trained on inputs scaled as (x - 127) / 128, not ImageNet mean/std.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

LITE_MEAN = 127.0
LITE_SCALE = 128.0


class Preprocess(nn.Module):
    def __init__(self, image_size: int, bgr: bool = False):
        super().__init__()
        self.image_size = image_size
        self.bgr = bgr  # OpenCV frames arrive BGR; flipping here saves a full-frame copy outside

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # Cast and NHWC -> NCHW in one pass: the CUDA antialiased resize makes its input
        # contiguous anyway, and a second full-frame float copy would cost memory and time.
        x = images.permute(0, 3, 1, 2).to(torch.float32,
                                          memory_format=torch.contiguous_format)  # (B, 3, H, W)
        if x.shape[-2:] != (self.image_size, self.image_size):
            # Antialiased: line frames are often 1080p, and plain bilinear would alias 4x down.
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear",
                              align_corners=False, antialias=True)
        if self.bgr:
            # After the resize, which treats channels alike, so the result is the same, but the
            # copy is of S x S pixels, not of a full float 1080p frame (25 MB per frame).
            x = x.flip(1)
        return (x - LITE_MEAN) / LITE_SCALE                  # (B, 3, S, S)
