"""Per-position feature whitening: backbone features in units of their normal spread.

GRAD reconstructs F and scores ||F - z_hat||. In raw backbone units a few channels that are
simply noisy on normal parts (and correlated with each other) dominate that norm, and a small
defect that moves quiet channels is drowned (magnetic_tile: image AUROC 0.83, measured). So F is
first whitened at each feature position p with the statistics of the normal training images:

    F_w[p] = W_p (F[p] - mu_p),   W_p^T W_p = Sigma_p^{-1}

where Sigma_p = (1 - l) S_p + l * mean_q S_q + eps I is the sample covariance at p shrunk
towards the covariance averaged over all positions (Ledoit & Wolf 2004's intensity l, computed
from the data: few training images, e.g. metal_plate's 54, would make S_p singular), and W_p is
the inverse of its Cholesky factor. ||F_w[p]|| alone is PaDiM's Mahalanobis distance (Defard et
al. 2021); GRAD then learns to reconstruct F_w, and its residual is measured in these units.
Fitted once from the training features (`fit`), stored in the checkpoint like any buffer.
"""

from __future__ import annotations

import torch
from torch import nn


class FeatureWhitening(nn.Module):
    """F (B, C, H, W) -> F_w (B, C, H, W), per position; identity until `fit`."""

    def __init__(self, channels: int, feature_hw: tuple[int, int], eps: float = 0.01):
        super().__init__()
        h, w = feature_hw
        self.eps = eps
        self.register_buffer("mean", torch.zeros(channels, h, w))                  # mu_p
        self.register_buffer("factor", torch.eye(channels).repeat(h * w, 1, 1))    # W_p^T
        self.register_buffer("shrinkage", torch.zeros(()))                        # l, recorded

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        b, c, h, w = feats.shape
        # contiguous: bmm on the permuted view copies it per matrix and ran 2.5x slower on the
        # CPU (20 vs 8 ms at batch 1, 256 x 256; benchmarks/cpu_speed.py)
        x = (feats.float() - self.mean).flatten(2).permute(2, 0, 1).contiguous()  # (HW, B, C)
        # The factor is float32 unless a runner stored it in bfloat16 (deploy.inference, on a
        # CPU with native bf16): half the bytes of the 94 MB read per frame, products summed in
        # float32 by oneDNN; x follows it.
        y = torch.bmm(x.to(self.factor.dtype), self.factor)             # (HW, B, C)
        return y.permute(1, 2, 0).reshape(b, c, h, w).to(feats.dtype)   # (B, C, H, W)

    @torch.no_grad()
    def fit(self, feats: torch.Tensor, chunk: int = 128) -> None:
        """Statistics from normal features (N, C, H, W); N >= 2."""
        n, c, h, w = feats.shape
        if n < 2:
            raise ValueError(f"whitening needs at least 2 training pictures (tiles), got {n}")
        mean = feats.float().mean(0)                                     # (C, H, W)
        s = torch.empty(h * w, c, c)                                     # S_p (biased)
        s2 = torch.zeros(())                                             # for l's numerator
        for i in range(0, h * w, chunk):                                 # positions, in chunks
            p = slice(i, i + chunk)
            xc = (feats.float().flatten(2)[:, :, p] - mean.flatten(1)[:, p]).permute(2, 0, 1)
            s[p] = xc.transpose(1, 2) @ xc / n                           # (P, C, C)
            x2 = xc.pow(2)
            # sum over p of the variance of the entries of S_p (Ledoit-Wolf's pi, / n)
            s2 += ((x2.transpose(1, 2) @ x2) / n - s[p].pow(2)).sum() / n
        target = s.mean(0, keepdim=True)                                 # (1, C, C)
        shrink = (s2 / (s - target).pow(2).sum().clamp(min=1e-12)).clamp(0.0, 1.0)
        cov = (1 - shrink) * s * n / (n - 1) + shrink * target + self.eps * torch.eye(c)
        chol = torch.linalg.cholesky(cov)                                # Sigma_p = L L^T
        eye = torch.eye(c).expand_as(chol)
        inv = torch.linalg.solve_triangular(chol, eye, upper=False)     # W_p = L^{-1}
        self.mean.copy_(mean)
        self.factor.copy_(inv.transpose(1, 2))                           # x @ W_p^T
        self.shrinkage.fill_(float(shrink))
