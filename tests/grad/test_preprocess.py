"""Preprocess's resize: whole grey levels on every device, the CPU's fast uint8 kernel within
one grey level of the float one, and the same pixels from a uint8 or a float frame."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from grad.preprocess import LITE_MEAN, LITE_SCALE, Preprocess, resize


def picture(h: int, w: int, seed: int = 0) -> torch.Tensor:
    """A (1, h, w, 3) uint8 picture with edges and texture: a gradient, a bright bar, noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    img = (x * 255 / w)[..., None] * np.array([1.0, 0.6, 0.3]) + rng.normal(0, 12, (h, w, 3))
    img[h // 3: h // 3 + 4] = 250
    return torch.from_numpy(np.clip(img, 0, 255).astype(np.uint8))[None]


@pytest.mark.parametrize("hw, size", [((373, 248), (288, 288)), ((512, 512), (256, 256)),
                                      ((120, 90), (256, 256))])
def test_both_kernels_give_whole_grey_levels_within_one_of_the_exact_resize(hw, size):
    img = picture(*hw)
    exact = F.interpolate(img.permute(0, 3, 1, 2).float(), size=size, mode="bilinear",
                          align_corners=False, antialias=True)
    fast, rounded = resize(img, size, uint8_kernel=True), resize(img, size, uint8_kernel=False)
    for x in (fast, rounded):
        assert x.dtype == torch.float32 and x.shape == (1, 3, *size) and x.is_contiguous()
        assert torch.equal(x, x.round()) and x.min() >= 0 and x.max() <= 255
        assert (x - exact).abs().max() <= 1.0
    assert torch.equal(rounded, exact.round().clamp(0, 255))
    # The two kernels part by one grey level on some pixels (fixed-point weights), never more.
    assert (fast - rounded).abs().max() <= 1.0


def test_a_float_frame_gives_the_pixels_of_its_uint8_frame_and_no_resize_keeps_them():
    img = picture(373, 248, seed=1)
    assert torch.equal(resize(img, (288, 288)), resize(img.float(), (288, 288)))
    same = resize(img, (373, 248))
    assert torch.equal(same, img.permute(0, 3, 1, 2).float())


def test_preprocess_flips_bgr_after_the_resize_and_normalises():
    img = picture(300, 200, seed=2)
    rgb = Preprocess(256)(img)
    bgr = Preprocess(256, bgr=True)(img.flip(-1))
    assert torch.equal(rgb, bgr)
    assert torch.equal(rgb, (resize(img, (256, 256)) - LITE_MEAN) / LITE_SCALE)
