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

A unified model over several products (`groups` > 1) keeps one set of statistics per product:
one covariance for two products at each position is mostly the larger one's, and measured
3.2 AUPRO points off metal_plate's own (benchmarks/results/accuracy.json). Each picture is
whitened with the statistics of the product whose mean feature is nearest its own,

    g = argmin_k ||mean_p F[p] - c_k||,   F_w[p] = W_{g,p} (F[p] - mu_{g,p}),

so the line needs no product label: the one model file routes each picture itself.
"""

from __future__ import annotations

import torch
from torch import nn


class FeatureWhitening(nn.Module):
    """F (B, C, H, W) -> F_w (B, C, H, W), per position (and product); identity until `fit`."""

    def __init__(self, channels: int, feature_hw: tuple[int, int], eps: float = 0.01,
                 groups: int = 1):
        super().__init__()
        h, w = feature_hw
        self.eps = eps
        self.groups = groups
        self.register_buffer("mean", torch.zeros(groups, channels, h, w))         # mu_{g,p}
        self.register_buffer("factor",                                            # W_{g,p}^T
                             torch.eye(channels).repeat(groups, h * w, 1, 1))
        self.register_buffer("shrinkage", torch.zeros(groups))                    # l, recorded
        self.register_buffer("centroid", torch.zeros(groups, channels))           # c_g

    def _load_from_state_dict(self, state, prefix, *args, **kwargs):
        # Checkpoints from before products had statistics of their own hold one set without
        # the group axis (mean (C, H, W), factor (HW, C, C), shrinkage ()): the same, as group 0.
        old = {"mean": 3, "factor": 3, "shrinkage": 0}
        for name, ndim in old.items():
            key = prefix + name
            if key in state and state[key].dim() == ndim:
                state[key] = state[key].unsqueeze(0)
                # one product has no routing to do: its centroid is never read
                state.setdefault(prefix + "centroid", torch.zeros_like(self.centroid))
        super()._load_from_state_dict(state, prefix, *args, **kwargs)

    def distances(self, feats: torch.Tensor) -> torch.Tensor:
        """Each picture's mean feature's distance to each group's centroid, (B, G)."""
        # The exact distance, not the matrix-product form cdist takes above 25 rows: a picture
        # halfway between two products must not route by its batch size.
        return torch.cdist(feats.float().mean(dim=(2, 3)), self.centroid,
                           compute_mode="donot_use_mm_for_euclid_dist")      # (B, G)

    def route(self, feats: torch.Tensor) -> torch.Tensor:
        """Each picture's group: the nearest centroid to its mean feature, (B,) int64."""
        return self.distances(feats).argmin(dim=1)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        b, c, h, w = feats.shape
        # The factor is float32 unless a runner stored it in bfloat16 (deploy.inference, on a
        # CPU with native bf16): half the bytes of the 94 MB read per frame and product,
        # products summed in float32 by oneDNN; x follows it.
        if self.groups == 1:
            # contiguous: bmm on the permuted view copies it per matrix and ran 2.5x slower on
            # the CPU (20 vs 8 ms at batch 1, 256 x 256; benchmarks/cpu_speed.py)
            x = (feats.float() - self.mean[0]).flatten(2).permute(2, 0, 1).contiguous()
            y = torch.bmm(x.to(self.factor.dtype), self.factor[0])      # (HW, B, C)
            return y.permute(1, 2, 0).reshape(b, c, h, w).to(feats.dtype)
        # Several products: every group's whitening, then each picture takes its own. G times
        # the work, but no branch on the data, so compiled graphs and CUDA graphs still hold.
        g = self.route(feats)                                            # (B,)
        x = (feats.float().unsqueeze(0) - self.mean.unsqueeze(1))        # (G, B, C, H, W)
        x = x.flatten(3).permute(0, 3, 1, 2).reshape(-1, b, c)           # (G*HW, B, C)
        y = torch.bmm(x.to(self.factor.dtype), self.factor.flatten(0, 1))  # (G*HW, B, C)
        pick = torch.arange(b, device=g.device)
        y = y.view(self.groups, h * w, b, c)[g, :, pick]                 # (B, HW, C)
        return y.transpose(1, 2).reshape(b, c, h, w).to(feats.dtype)    # (B, C, H, W)

    @torch.no_grad()
    def fit(self, feats: torch.Tensor, groups: torch.Tensor | None = None,
            chunk: int = 128) -> None:
        """Statistics from normal features (N, C, H, W); `groups` (N,) says each one's product
        (0 .. G-1) when G > 1. Each group needs at least 2 pictures (tiles)."""
        if groups is None:
            if self.groups != 1:
                raise ValueError(f"whitening with {self.groups} groups needs each training "
                                 "picture's group")
            groups = torch.zeros(len(feats), dtype=torch.long)
        for k in range(self.groups):
            mine = feats[groups == k]
            mean, factor, shrink = self._statistics(mine, chunk)
            self.mean[k].copy_(mean)
            self.factor[k].copy_(factor)
            self.shrinkage[k] = shrink
            self.centroid[k].copy_(mine.float().mean(dim=(0, 2, 3)))

    def _statistics(self, feats: torch.Tensor, chunk: int
                    ) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(mu (C, H, W), W^T (HW, C, C), shrinkage l) of one group's features (N, C, H, W)."""
        n, c, h, w = feats.shape
        if n < 2:
            raise ValueError(f"whitening needs at least 2 training pictures (tiles) per "
                             f"product, got {n}")
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
        return mean, inv.transpose(1, 2), float(shrink)                  # x @ W_p^T
