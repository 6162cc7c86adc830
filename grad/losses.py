"""GRAD's two losses. Both take the head's `Reconstruction`; neither lives inside the model."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from grad.model import Reconstruction


def reconstruction_loss(target: torch.Tensor, rec: Reconstruction, on: str = "z_hat") -> torch.Tensor:
    """L_rec = mean (F - z_hat)^2 on the refined output (`on="z"`: on the fused z instead).

    `target` is the *clean* F: under Feature Block Paste the head sees the pasted features but
    must return normal ones, which is what makes a pasted (or real) defect stand out.
    """
    return F.mse_loss(getattr(rec, on), target)


def contrast_loss(rec: Reconstruction, pasted: torch.Tensor, margin: float = 0.5) -> torch.Tensor:
    """L_con on channel 0 of z_a (public code): >= +margin on pasted cells, <= -margin elsewhere.

    Each side is averaged over its own cells, so a small blob weighs as much as the background.
    `pasted` is the (B, H, W) bool label from FBP.
    """
    c0 = rec.z_a[:, 0]                                       # (B, H, W)
    pos = F.relu(margin - c0)[pasted]
    neg = F.relu(c0 + margin)[~pasted]
    zero = c0.new_zeros(())
    return (pos.mean() if pos.numel() else zero) + (neg.mean() if neg.numel() else zero)
