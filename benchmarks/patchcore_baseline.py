"""A simple PatchCore-style baseline on the same frozen features GRAD uses.

PatchCore (Roth et al., CVPR 2022) in its plainest form:
  - patch features: the backbone map averaged over 3x3 neighbourhoods (local awareness);
  - memory bank: a greedy k-center coreset of all training patches, picked in a random
    128-d projection (as anomalib does), `coreset_ratio` of them, capped at `max_bank`;
  - patch score: distance to the nearest bank entry; image score: the map's maximum.
The map gets exactly GRAD's post-processing (bilinear upsample, Gaussian blur, max), so the
comparison isolates the head. Not included: anomalib's neighbour re-weighting of the image
score.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from grad.model import GaussianBlur

log = logging.getLogger(__name__)


def greedy_coreset(x: torch.Tensor, k: int, seed: int = 0, proj_dim: int = 128) -> torch.Tensor:
    """Indices of k rows of x (N, C) chosen by greedy k-center (farthest point first)."""
    g = torch.Generator().manual_seed(seed)
    if x.shape[1] > proj_dim:
        x = x @ (torch.randn(x.shape[1], proj_dim, generator=g) / proj_dim ** 0.5)  # (N, 128)
    sq = x.pow(2).sum(1)                                                             # (N,)
    chosen = [int(torch.randint(x.shape[0], (1,), generator=g))]
    min_d = sq - 2 * x @ x[chosen[0]] + sq[chosen[0]]                               # (N,)
    for _ in range(k - 1):
        i = int(torch.argmax(min_d))
        chosen.append(i)
        min_d = torch.minimum(min_d, sq - 2 * x @ x[i] + sq[i])
    return torch.tensor(chosen)


@dataclass
class NearestNeighbourBaseline:
    image_size: int
    blur_sigma: float = 4.0
    coreset_ratio: float = 0.1
    max_bank: int = 2048
    seed: int = 0
    bank: torch.Tensor | None = None   # (M, C)

    @staticmethod
    def _patches(feats: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(feats, 3, stride=1, padding=1, count_include_pad=False)

    def fit(self, feats: torch.Tensor) -> None:
        """feats (N, C, H, W) of normal training images."""
        p = self._patches(feats).permute(0, 2, 3, 1).reshape(-1, feats.shape[1])  # (N*H*W, C)
        k = max(1, min(self.max_bank, int(self.coreset_ratio * p.shape[0])))
        log.info("coreset: %d of %d patches", k, p.shape[0])
        self.bank = p[greedy_coreset(p, k, self.seed)].contiguous()

    @torch.inference_mode()
    def predict(self, feats: torch.Tensor, chunk: int = 16384) -> tuple[torch.Tensor, torch.Tensor]:
        """feats (N, C, H, W) -> (scores (N,), maps (N, S, S))."""
        n, c, h, w = feats.shape
        q = self._patches(feats).permute(0, 2, 3, 1).reshape(-1, c)
        bank_sq = self.bank.pow(2).sum(1)
        dists = []
        for i in range(0, q.shape[0], chunk):
            x = q[i:i + chunk]
            # ||x - b||^2 = ||x||^2 - 2 x.b + ||b||^2, as one matrix product per chunk
            d2 = x.pow(2).sum(1, keepdim=True) - 2 * x @ self.bank.t() + bank_sq
            dists.append(d2.amin(dim=1).clamp(min=0).sqrt())
        m = torch.cat(dists).view(n, 1, h, w)
        m = F.interpolate(m, size=(self.image_size,) * 2, mode="bilinear", align_corners=False)
        m = GaussianBlur(self.blur_sigma)(m).squeeze(1)
        return m.flatten(1).amax(1), m
