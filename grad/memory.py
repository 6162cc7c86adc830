"""Local memory: each patch's distance to the nearest normal training patch around its place.

GRAD's residual ||F - z_hat|| says how far a patch is from what the grids reconstruct there. The
grids generalise over the normal images, which is the point, and a faint defect whose features
stay close to that generalisation scores low. A second, nonparametric measure sits beside it:
the distance from each patch to the closest patch of the normal training pictures at the same
grid position or one of the 8 around it (a part that sits a cell off still finds its match),

    K[p] = min over n, |s| <= 1 of ||F[p] - T_n[p + s]||_2        (T_n: training picture n)

and the anomaly map adds it in GRAD's units, A + lambda * K, with lambda fitted by the trainer
from held-out normal pictures (`GRAD.anomaly`). Only the 9 positions around p are searched, not
all positions as PatchCore does: 9 N candidates a patch instead of N H W. A search over all
positions (measured on 10% of them, issue 9's notes) lifted the maps as much and cost
magnetic_tile 3 points of image AUROC.

F is the head's input: whitened, in the `edge` config. Measured beside the raw pooled features
(magnetic_tile, seed 0, the whitened distance standing in for GRAD's residual): whitened, the
memory lifted image AUROC (0.961 -> 0.965) and cost AUPRO 0.3 points; raw, it lifted AUPRO
(0.741 -> 0.749) and left image AUROC as it was.

The bank is the fit set's head inputs, minus their mean per channel (distances do not change,
and centred numbers keep their precision when a CPU runner stores the bank in bfloat16). It is
large (N x (C + 1) x H x W floats: 76 MB for 128 pictures at 256 x 256) and read whole for
every frame, so its size is the memory's cost (~4-5 ms a frame on 2 CPU cores at 128,
benchmarks/cpu_speed.py) and at most `cfg.memory_pictures` pictures are kept, chosen to cover
the training set (`select_pictures`). Fewer cost the gain: magnetic_tile's image AUROC, seed 0,
0.961 / 0.962 / 0.964 with 32 / 64 / 128 pictures (0.961 without the memory).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# The 3 x 3 neighbourhood's offsets (dy, dx), in a fixed order.
SHIFTS = tuple((dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1))


class LocalMemory(nn.Module):
    """Head input F (B, C, H, W) -> K (B, H, W): distance to the nearest bank patch within one
    grid cell. Empty (and K = 0) until `fit`."""

    def __init__(self, channels: int, feature_hw: tuple[int, int]):
        super().__init__()
        h, w = feature_hw
        self.register_buffer("mean", torch.zeros(channels, 1, 1))        # centre, per channel
        # (HW, C + 1, N): each bank patch t, centred, and -||t||^2 / 2 as one more channel,
        # so that one product with (q, 1) gives q.t - ||t||^2 / 2, and
        #   min_t ||q - t||^2 = ||q||^2 - 2 max_t (q.t - ||t||^2 / 2).
        # Patches last: the product reads it 1.3x faster than (HW, N, C + 1) transposed.
        self.register_buffer("bank", torch.zeros(h * w, channels + 1, 0))
        self.register_buffer("scale", torch.zeros(()))                  # lambda in A + lambda K

    def _load_from_state_dict(self, state, prefix, *args, **kwargs):
        # The bank's size is the trained model's, not known when the module is built: take
        # the stored shape before loading into it.
        key = prefix + "bank"
        if key in state and state[key].shape != self.bank.shape:
            self.bank = torch.empty_like(state[key], dtype=self.bank.dtype)
        super()._load_from_state_dict(state, prefix, *args, **kwargs)

    @property
    def size(self) -> int:
        """Pictures (tiles) in the bank."""
        return self.bank.shape[2]

    @torch.no_grad()
    def fit(self, feats: torch.Tensor) -> None:
        """Keep these normal head inputs (N, C, H, W) as the bank."""
        if len(feats) == 0:
            raise ValueError("the local memory needs at least one training picture")
        # One centre for all positions: a patch meets the bank's patches at other positions,
        # and only a common shift leaves those distances as they were.
        self.mean = feats.float().mean(dim=(0, 2, 3)).view(-1, 1, 1)     # (C, 1, 1)
        t = (feats.float() - self.mean).flatten(2).permute(2, 0, 1)      # (HW, N, C)
        bank = torch.cat([t, -0.5 * t.pow(2).sum(2, keepdim=True)], dim=2)  # (HW, N, C+1)
        self.bank = bank.transpose(1, 2).contiguous()                     # (HW, C+1, N)

    def forward(self, feats: torch.Tensor, exclude: torch.Tensor | None = None) -> torch.Tensor:
        """K (B, H, W) for head inputs (B, C, H, W). `exclude` (B,) names a bank picture each
        input may not match (itself, when the trainer scores the fit set); -1 for none."""
        b, c, h, w = feats.shape
        if self.size == 0:                                                # not fitted yet
            return feats.new_zeros(b, h, w, dtype=torch.float32)
        q = feats.float() - self.mean                                     # (B, C, H, W)
        qq = q.pow(2).sum(dim=1)                                          # (B, H, W) ||q||^2
        qa = torch.cat([q, q.new_ones(b, 1, h, w)], dim=1).to(self.bank.dtype)  # (q, 1)
        # Shifting the queries instead of the bank: bank patch p meets query p - s for each
        # shift s, so the bank is read once, in one batched product for all 9 shifts.
        qp = F.pad(qa, (1, 1, 1, 1)).permute(2, 3, 0, 1)                 # (H+2, W+2, B, C+1)
        x = torch.stack([qp[1 - dy:1 - dy + h, 1 - dx:1 - dx + w] for dy, dx in SHIFTS],
                        dim=2).view(h * w, 9 * b, c + 1)                  # (HW, 9B, C+1)
        best = torch.bmm(x, self.bank)                                    # (HW, 9B, N)
        if exclude is not None:
            own = F.one_hot(exclude.clamp(min=0), self.size).bool() & (exclude >= 0)[:, None]
            best = best.masked_fill(own.repeat(9, 1).unsqueeze(0), float("-inf"))
        near = best.amax(dim=2).float().view(h, w, 9, b).permute(2, 3, 0, 1)  # (9, B, H, W)
        # near[s] at bank position p belongs to the query at p - s: shift it back. A query
        # whose p + s falls off the grid has no candidate there (-inf); the border positions
        # keep their in-grid neighbours, as replicate padding would give (the same patches).
        back = F.pad(near, (1, 1, 1, 1), value=float("-inf"))
        m = torch.stack([back[i, :, 1 + dy:1 + dy + h, 1 + dx:1 + dx + w]
                         for i, (dy, dx) in enumerate(SHIFTS)]).amax(dim=0)  # (B, H, W)
        return (qq - 2 * m).clamp(min=0).sqrt()


def select_pictures(feats: torch.Tensor, n: int) -> torch.Tensor:
    """Indices of `n` of these pictures (N, C, H, W) that cover the rest: greedy farthest-point
    (k-centre) selection on whole-picture features, the first the one nearest the mean. A
    bank of near-duplicates would spend memory on patches the search already has."""
    if n >= len(feats):
        return torch.arange(len(feats))
    x = feats.float().flatten(1)                                          # (N, C*H*W)
    first = int((x - x.mean(0)).norm(dim=1).argmin())
    chosen = [first]
    dist = (x - x[first]).norm(dim=1)
    for _ in range(n - 1):
        nxt = int(dist.argmax())
        chosen.append(nxt)
        dist = torch.minimum(dist, (x - x[nxt]).norm(dim=1))
    return torch.tensor(sorted(chosen))
