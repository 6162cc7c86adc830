"""PatchCore (Roth et al., CVPR 2022) on the same frozen backbone GRAD uses, made faithful.

What anomalib's PatchCore does, step by step, and so what this does:
  - locally aware patch features: each feature stage (stride 8 and stride 16) is averaged over
    3 x 3 neighbourhoods at its own resolution (zero padding counted, as torch's AvgPool2d
    does by default), then the stride-16 map is resized (bilinear) to stride 8 and the two are
    concatenated: one C-dimensional patch per stride-8 cell;
  - memory bank: a greedy k-center coreset of the patches of *all* training images, picked in
    a random 128-d projection, `coreset_ratio` of them;
  - patch score: distance to the nearest bank entry; anomaly map: patch scores upsampled
    (bilinear) to the input and smoothed (Gaussian, sigma 4);
  - image score: the largest patch score, re-weighted by how isolated its nearest bank entry
    is: w = 1 - softmax(distances from the patch to that entry's 9 nearest bank neighbours)[0]
    (the paper's Eq. 7, anomalib's `compute_anomaly_score`).
The reference figures (shared/design/reference_figures.md) ran anomalib 2.7.0 this way on the
same data and weights.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from grad.memory import greedy_coreset  # shared with GRAD's global memory
from grad.model import GaussianBlur

log = logging.getLogger(__name__)


def locally_aware(f8: torch.Tensor, f16: torch.Tensor) -> torch.Tensor:
    """Stage maps (B, 40, h, w), (B, 112, h/2, w/2) -> patch features (B, C, h, w)."""
    f8 = F.avg_pool2d(f8.float(), 3, stride=1, padding=1)
    f16 = F.avg_pool2d(f16.float(), 3, stride=1, padding=1)
    f16 = F.interpolate(f16, size=f8.shape[-2:], mode="bilinear", align_corners=False)
    return torch.cat([f8, f16], dim=1)


def nearest(q: torch.Tensor, bank: torch.Tensor, k: int = 1, chunk: int = 8192
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Euclidean distances (M, k) and indices (M, k) of the k nearest bank rows to each q."""
    bank_sq = bank.pow(2).sum(1)
    dists, idx = [], []
    for i in range(0, q.shape[0], chunk):
        x = q[i:i + chunk]
        # ||x - b||^2 = ||x||^2 - 2 x.b + ||b||^2, as one matrix product per chunk
        d2 = (x.pow(2).sum(1, keepdim=True) - 2 * x @ bank.t() + bank_sq).clamp(min=0)
        v, j = d2.topk(k, dim=1, largest=False)
        dists.append(v.sqrt())
        idx.append(j)
    return torch.cat(dists), torch.cat(idx)


@dataclass
class PatchCore:
    input_hw: tuple[int, int]
    blur_sigma: float = 4.0
    coreset_ratio: float = 0.1
    num_neighbors: int = 9
    seed: int = 0
    bank: torch.Tensor | None = None   # (M, C)

    def fit(self, patches: torch.Tensor) -> None:
        """patches (N, C, h, w): `locally_aware` features of normal training images."""
        p = patches.permute(0, 2, 3, 1).reshape(-1, patches.shape[1])             # (N*h*w, C)
        k = max(1, int(self.coreset_ratio * p.shape[0]))
        log.info("coreset: %d of %d patches", k, p.shape[0])
        self.bank = p[greedy_coreset(p, k, self.seed)].contiguous()

    @torch.inference_mode()
    def predict(self, patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """patches (N, C, h, w) -> (image scores (N,), patch-score maps (N, h, w))."""
        n, c, h, w = patches.shape
        q = patches.permute(0, 2, 3, 1).reshape(-1, c)                             # (N*h*w, C)
        d, j = nearest(q, self.bank)
        d, j = d[:, 0].view(n, h * w), j[:, 0].view(n, h * w)
        worst = d.argmax(dim=1)                                                   # (N,)
        rows = torch.arange(n)
        score = d[rows, worst]
        # Re-weighting (Eq. 7): a patch whose nearest bank entry sits in a dense part of the
        # bank is more surely anomalous than one whose entry is itself an outlier.
        k = min(self.num_neighbors, self.bank.shape[0])
        _, support = nearest(self.bank[j[rows, worst]], self.bank, k=k)          # (N, k)
        query = q.view(n, h * w, c)[rows, worst]                                   # (N, C)
        dist = torch.cdist(query[:, None], self.bank[support]).squeeze(1)         # (N, k)
        weight = 1 - torch.softmax(dist, dim=1)[:, 0]
        return weight * score, d.view(n, h, w)

    def pixel_map(self, patch_maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Patch-score maps (N, h, w) -> upsampled to `size` and smoothed, (N, *size)."""
        m = F.interpolate(patch_maps[:, None], size=size, mode="bilinear", align_corners=False)
        return GaussianBlur(self.blur_sigma)(m).squeeze(1)
