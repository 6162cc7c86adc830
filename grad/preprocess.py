"""Pixels to model input: uint8 pictures (B, h, w, 3) -> normalised float tiles (B*n, 3, H, W).

One module used everywhere a score is computed (training's feature cache, eval, predict, the
line's worker, exported artifacts), so the same picture gives the same score on every path.
How a picture becomes H x W inputs (stretched, or tiled with its aspect kept) is the config's
`fit` (`grad.tiling`); `plan(h, w)` says what this module will do to an h x w picture, and GRAD
uses that same plan to stitch the tiles' maps back together.
EfficientNet-Lite was trained on inputs scaled as (x - 127) / 128, not ImageNet mean/std.

A resized picture is in whole grey levels, as a picture is: on a CPU, PyTorch's vectorised
uint8 kernel resizes it (antialiased bilinear, its weights in fixed point), 4-8x faster than
the float one on the same picture (373 x 248 -> 288 x 288: 0.6 vs 2.5 ms; 1080p -> 288 x 288:
2.5 vs 21 ms; benchmarks/cpu_speed.py's rows measure the whole frame's cost). Other devices
have no such kernel: they resize in float32 and round, which lands within one grey level of
the CPU's (on ~17% of pixels, by one), far inside a camera's noise. Training, eval and the
line's CPU runners all resize on the CPU, so they see the same pixels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from grad.tiling import TilePlan, cut, plan_tiles

LITE_MEAN = 127.0
LITE_SCALE = 128.0
# What a picture becomes, versioned: anything that keeps model inputs computed before (the
# accuracy benchmark's feature cache) must not mix them with today's. 2: whole grey levels
# from the uint8 kernel on a CPU (1 resized in float and kept the fractions).
VERSION = 2


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
        x = resize(images, plan.scaled_hw)                                 # (B, 3, sh, sw)
        if self.bgr:
            # After the resize, which treats channels alike, so the result is the same, but the
            # copy is of the model-sized picture, not of a full float 1080p frame (25 MB).
            x = x.flip(1)
        return cut((x - LITE_MEAN) / LITE_SCALE, plan)                     # (B*n, 3, H, W)


def resize(images: torch.Tensor, size: tuple[int, int], uint8_kernel: bool | None = None
           ) -> torch.Tensor:
    """Pictures (B, h, w, 3), uint8 or float32 holding whole grey levels -> float32
    (B, 3, H, W) resized to `size` in whole grey levels (antialiased: line frames are often
    1080p, and plain bilinear would alias 4x down). `uint8_kernel`: PyTorch's uint8 kernel,
    or float32 and round; by default the first on a CPU, which alone has it."""
    x = images.permute(0, 3, 1, 2)                                  # (B, 3, h, w) NHWC strides
    if tuple(x.shape[-2:]) != tuple(size):
        if x.device.type == "cpu" if uint8_kernel is None else uint8_kernel:
            # The uint8 kernel takes the channels-last view as it is. A float input (an
            # exported engine casts its frames first) holds whole grey levels: exact in uint8.
            x = F.interpolate(x.to(torch.uint8), size=size, mode="bilinear",
                              align_corners=False, antialias=True)  # (B, 3, H, W) uint8
        else:
            # Cast and NHWC -> NCHW in one pass: the CUDA antialiased resize makes its input
            # contiguous anyway, and a second full-frame float copy would cost memory and time.
            x = F.interpolate(x.to(torch.float32, memory_format=torch.contiguous_format),
                              size=size, mode="bilinear", align_corners=False,
                              antialias=True).round_().clamp_(0, 255)
    return x.to(torch.float32, memory_format=torch.contiguous_format)
