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

The bank is read whole for every frame, so its size is the memory's cost. It keeps, at each
grid position, `cfg.memory_size` of the fit set's patches there, chosen by greedy k-centre
(`coreset`): column n is not one picture, but whichever patches cover the normal variety at
that place. Measured (magnetic_tile, seed-0 proxy, image AUROC 0.961 without the memory):
whole pictures, 128 of 686 (k-centre on pictures): 0.965 for an 80 MB bank; patches kept
per position, 16 / 32 / 64: 0.965 / 0.966 / 0.966 for 10 / 20 / 40 MB (a 32 x 32 grid of 152
channels, float32; half that in bf16). The default, 32, reads a quarter of the 128 pictures'
bytes for the same gain. Random projections of the channels (to 64 or 38) lost it (0.962-0.964).
Patches are centred by their mean per channel (distances do not change, and centred numbers
keep their precision when a CPU runner stores the bank in bfloat16).

Global memory (`GlobalMemory`, cfg.global_memory > 0): PatchCore's search, for products
whose pixel maps it sharpens. Each patch's distance to the nearest of a share of *all* the fit
set's patches, wherever they sat, on the backbone's raw features pooled as PatchCore pools
them (its "locally aware" patches), not on the whitened head input:

    G[p] = min over t in T of ||P(F)[p] - t||_2        (T: a k-centre share of the fit set)

and the map adds it beside the residual, A + lambda_g G, lambda_g from held-out normal maps as
for the local memory. On metal_plate (a proxy: the whitened distance standing in for A, seed
0) the map's pixel AUROC / AUPRO went 0.991 / 0.942 -> 0.9935 / 0.959 at weight 0.8, past
PatchCore's own map (0.993 / 0.957); the same search on the whitened features moved nothing,
and on the head's raw input (pooled 3 x 3 after concatenation) it reached 0.992 / 0.956. On
magnetic_tile a search over all positions cost 3 points of image AUROC (issue 9's notes), so
it is a choice per product, off by default. Its bank is the share `global_memory_ratio`
(0.1: 5,529 patches on metal_plate, 3.4 MB) and one frame's 1,024 patches against it are one
bfloat16 matrix product (~1 ms on 2 cores); the k-centre choice costs ratio x N^2 at training
(seconds on metal_plate's 55,296 patches, hours on magnetic_tile's 780,288).
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
        # (HW, C + 1, M): each kept patch t, centred, and -||t||^2 / 2 as one more channel,
        # so that one product with (q, 1) gives q.t - ||t||^2 / 2, and
        #   min_t ||q - t||^2 = ||q||^2 - 2 max_t (q.t - ||t||^2 / 2).
        # Patches last: the product reads it 1.3x faster than (HW, M, C + 1) transposed.
        self.register_buffer("bank", torch.zeros(h * w, channels + 1, 0))
        self.register_buffer("scale", torch.zeros(()))                  # lambda in A + lambda K

    def _load_from_state_dict(self, state, prefix, *args, **kwargs):
        # The number of patches kept is the trained model's, not known when the module is
        # built: take the stored M before loading into it. Only M: a bank for another grid or
        # width is left to fail the load as a size mismatch, not at the line's first frame.
        key = prefix + "bank"
        stored = state.get(key)
        if stored is not None and stored.shape[:2] == self.bank.shape[:2]:
            self.bank = self.bank.new_empty(stored.shape)
        super()._load_from_state_dict(state, prefix, *args, **kwargs)

    @property
    def size(self) -> int:
        """Patches kept at each grid position."""
        return self.bank.shape[2]

    @torch.no_grad()
    def fit(self, feats: torch.Tensor, size: int) -> torch.Tensor:
        """Keep `size` of these normal head inputs' (N, C, H, W) patches at each position,
        chosen by `coreset`; returns each kept patch's row in `feats`, (HW, size) int64 (the
        trainer turns rows into pictures for `forward`'s `exclude`)."""
        if len(feats) == 0:
            raise ValueError("the local memory needs at least one training picture")
        # One centre for all positions: a patch meets the bank's patches at other positions,
        # and only a common shift leaves those distances as they were.
        self.mean = feats.float().mean(dim=(0, 2, 3)).view(-1, 1, 1)     # (C, 1, 1)
        t = (feats.float() - self.mean).flatten(2).permute(2, 0, 1)      # (HW, N, C)
        source = coreset(t, size)                                         # (HW, M)
        t = torch.gather(t, 1, source.unsqueeze(2).expand(-1, -1, t.shape[2]))  # (HW, M, C)
        bank = torch.cat([t, -0.5 * t.pow(2).sum(2, keepdim=True)], dim=2)  # (HW, M, C+1)
        self.bank = bank.transpose(1, 2).contiguous()                     # (HW, C+1, M)
        return source

    def forward(self, feats: torch.Tensor,
                exclude: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """K (B, H, W) for head inputs (B, C, H, W). `exclude` = (each kept patch's picture,
        (HW, M); each input's own picture (B,)): an input may not match its own picture's
        patches (the trainer scoring the fit set itself; pictures, not tiles, since a picture's
        overlapping tiles hold each other's patches a cell apart); -1 for an input from
        elsewhere. A patch left with no candidate (every one its own) gets K = 0."""
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
        best = torch.bmm(x, self.bank)                                    # (HW, 9B, M)
        if exclude is not None:
            source, picture = exclude
            own = source.unsqueeze(1) == picture.view(1, b, 1)           # (HW, B, M)
            best = best.masked_fill(own.repeat(1, 9, 1), float("-inf"))  # (HW, 9B, M)
        near = best.amax(dim=2).float().view(h, w, 9, b).permute(2, 3, 0, 1)  # (9, B, H, W)
        # near[s] at bank position p belongs to the query at p - s: shift it back. A query
        # whose p + s falls off the grid has no candidate there (-inf); the border positions
        # keep their in-grid neighbours, as replicate padding would give (the same patches).
        back = F.pad(near, (1, 1, 1, 1), value=float("-inf"))
        m = torch.stack([back[i, :, 1 + dy:1 + dy + h, 1 + dx:1 + dx + w]
                         for i, (dy, dx) in enumerate(SHIFTS)]).amax(dim=0)  # (B, H, W)
        k = (qq - 2 * m).clamp(min=0).sqrt()                               # (B, H, W)
        if exclude is not None:
            # Only a fit set of one picture leaves none; inf there would turn the trainer's
            # percentiles, and with them the scale, into NaN.
            k = torch.where(torch.isfinite(m), k, torch.zeros_like(k))
        return k


def coreset(patches: torch.Tensor, m: int, chunk: int = 64) -> torch.Tensor:
    """At each position, `m` of its patches (HW, N, C) that cover the rest: greedy farthest-
    point (k-centre) selection, the first the one nearest the mean. Returns their indices,
    (HW, m) int64 (all N, in order, when m >= N). Positions in chunks, to bound the memory."""
    hw, n, _ = patches.shape
    if m >= n:
        return torch.arange(n).expand(hw, n).contiguous()
    out = []
    for i in range(0, hw, chunk):
        v = patches[i:i + chunk]                                          # (P, N, C)
        rows = torch.arange(len(v))
        pick = (v - v.mean(dim=1, keepdim=True)).norm(dim=2).argmin(dim=1)  # (P,)
        chosen = [pick]
        dist = (v - v[rows, pick].unsqueeze(1)).norm(dim=2)              # (P, N)
        for _ in range(m - 1):
            pick = dist.argmax(dim=1)
            chosen.append(pick)
            dist = torch.minimum(dist, (v - v[rows, pick].unsqueeze(1)).norm(dim=2))
        out.append(torch.stack(chosen, dim=1))                            # (P, m)
    return torch.cat(out)


# ---------------------------------------------------------------------------------------------
# Global memory


def greedy_coreset(x: torch.Tensor, k: int, seed: int = 0, proj_dim: int = 128) -> torch.Tensor:
    """Indices of k rows of x (N, C) chosen by greedy k-centre (farthest point first), on a
    random projection to `proj_dim` channels as PatchCore does (its Johnson-Lindenstrauss step)."""
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


class GlobalMemory(nn.Module):
    """Backbone features F (B, C, H, W), raw (the concatenated stages, neither pooled nor
    whitened) -> G (B, H, W): each patch's distance to the nearest bank patch, wherever it sat
    in the fit set. Empty (and G = 0) until `fit`."""

    def __init__(self, stage_channels: tuple[int, int]):
        super().__init__()
        self.c8 = stage_channels[0]
        c = sum(stage_channels)
        self.register_buffer("mean", torch.zeros(c, 1, 1))              # centre, per channel
        # (C + 1, M): each kept patch t, centred, with -||t||^2 / 2 as one more row, so one
        # product with (q, 1) gives q.t - ||t||^2 / 2 (as LocalMemory's bank)
        self.register_buffer("bank", torch.zeros(c + 1, 0))
        self.register_buffer("scale", torch.zeros(()))                  # lambda_g

    def _load_from_state_dict(self, state, prefix, *args, **kwargs):
        # M is the trained model's (as LocalMemory): take the stored size before loading.
        stored = state.get(prefix + "bank")
        if stored is not None and stored.shape[0] == self.bank.shape[0]:
            self.bank = self.bank.new_empty(stored.shape)
        super()._load_from_state_dict(state, prefix, *args, **kwargs)

    @property
    def size(self) -> int:
        """Patches kept."""
        return self.bank.shape[1]

    def patches(self, feats: torch.Tensor) -> torch.Tensor:
        """PatchCore's locally aware patches from the concatenated stages (B, C, H, W): each
        stage averaged over 3 x 3 of its own cells. The stride-16 stage sits resized to stride
        8 here, so its 3 x 3 cells are 5 x 5 of these (measured on metal_plate: 0.959 AUPRO,
        against 0.957 pooling the stride-16 map itself). Zero padding counted, as PatchCore's
        avg_pool2d does (borders left uncounted: 0.955)."""
        f8 = F.avg_pool2d(feats[:, :self.c8].float(), 3, stride=1, padding=1)   # (B, c8, H, W)
        f16 = F.avg_pool2d(feats[:, self.c8:].float(), 5, stride=1, padding=2)  # (B, c16, H, W)
        return torch.cat([f8, f16], dim=1)                                      # (B, C, H, W)

    @torch.no_grad()
    def fit(self, feats: torch.Tensor, ratio: float) -> torch.Tensor:
        """Keep the share `ratio` of these normal features' (N, C, H, W) patches, chosen by
        greedy k-centre; returns each kept patch's picture (tile) in `feats`, (M,) int64."""
        if len(feats) == 0:
            raise ValueError("the global memory needs at least one training picture")
        p = torch.cat([self.patches(f) for f in feats.split(32)])             # (N, C, H, W)
        n, c, h, w = p.shape
        self.mean = p.mean(dim=(0, 2, 3)).view(-1, 1, 1)                       # (C, 1, 1)
        t = (p - self.mean).permute(0, 2, 3, 1).reshape(-1, c)                # (N*H*W, C)
        m = max(1, int(ratio * len(t)))
        rows = greedy_coreset(t, m)                                            # (M,)
        t = t[rows]                                                            # (M, C)
        self.bank = torch.cat([t, -0.5 * t.pow(2).sum(1, keepdim=True)], dim=1).t().contiguous()
        return rows // (h * w)

    def forward(self, feats: torch.Tensor,
                exclude: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """G (B, H, W) for raw features (B, C, H, W). `exclude` = (each kept patch's picture
        (M,), each input's own picture (B,)): an input may not match its own picture's patches
        (the trainer scoring the fit set itself). A patch left with no candidate gets 0."""
        b, c, h, w = feats.shape
        if self.size == 0:                                                    # not fitted yet
            return feats.new_zeros(b, h, w, dtype=torch.float32)
        q = self.patches(feats) - self.mean                                   # (B, C, H, W)
        qq = q.pow(2).sum(dim=1)                                              # (B, H, W)
        qa = torch.cat([q, q.new_ones(b, 1, h, w)], dim=1)                    # (q, 1)
        qa = qa.permute(0, 2, 3, 1).reshape(b * h * w, c + 1).to(self.bank.dtype)
        best = qa @ self.bank                                                 # (BHW, M)
        if exclude is not None:
            source, picture = exclude
            own = source.view(1, -1) == picture.repeat_interleave(h * w).view(-1, 1)
            best = best.masked_fill(own, float("-inf"))
        m = best.amax(dim=1).float().view(b, h, w)                            # (B, H, W)
        g = (qq - 2 * m).clamp(min=0).sqrt()                                  # (B, H, W)
        if exclude is not None:
            g = torch.where(torch.isfinite(m), g, torch.zeros_like(g))
        return g
