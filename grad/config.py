"""GRAD model configuration: one frozen dataclass, three named presets.

The config is everything needed to rebuild the network; a checkpoint stores it beside the state
dict (`grad.checkpoint`). Channel count C and the feature map's H x W come from the backbone and
the input size, so they are derived, not configured.

The model input is `image_size`: an int S for S x S, or [H, W] for a non-square input (a long
part keeps its shape instead of being squashed). `fit` says how a picture of another shape
becomes model input (`grad.preprocess`): "stretch" resizes it to H x W whatever its aspect;
"tile" scales it, aspect kept, until it covers one H x W tile, then cuts overlapping tiles along
its long axis; the maps are stitched back into one map of the scaled picture.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

from grad.backbone import VARIANTS, feature_channels

FITS = ("stretch", "tile")


@dataclass(frozen=True)
class GRADConfig:
    backbone: str = "lite0"          # EfficientNet-Lite variant: lite0 (C=152) or lite2 (C=168)
    image_size: int | tuple[int, int] = 256  # model input: S (square) or (H, W); features
                                     # are H/8 x W/8
    fit: str = "stretch"             # picture -> input: "stretch" (aspect not kept) or "tile"
    tile_overlap: float = 0.25       # "tile": least share of a tile its neighbour overlaps
    local_grid: int = 8              # R_l: local grid is 1 x C x R_l x R_l
    global_grid: int = 4             # R_g: global grid is 1 x (C*H*W) x R_g x R_g
    trunk_width: int | None = None   # channels inside each trunk; None = 2C as in the paper
    trunk_blocks: int = 1            # L: ResNet BasicBlocks per trunk (public code: 9)
    coord_jitter: float = 0.05       # std of the training-time noise on local coordinates
    fusion_init: float = -0.2        # w in z = z_n + w * z_a (public code's fusion)
    refine_k: float | None = 10.0    # k in S = 0.3*1[mean_c (F - z)^2 < k] + 0.7*cos_c(F, z);
                                     # None: no refinement, z_hat = z
    feature_pool: int = 1            # average F over k x k neighbourhoods first (PatchCore's
                                     # locally aware patches); 1 = off
    whiten: bool = False             # whiten F per position with the normal images' covariance
                                     # before the head (grad.whitening; fitted by the trainer)
    whiten_groups: int = 1           # products with statistics of their own in a unified model
                                     # (the trainer sets it to the number of categories)
    blur_sigma: float = 4.0          # Gaussian smoothing of the upsampled map; 0 turns it off
    score_topk: float = 0.0          # image score = mean of this fraction of the highest map
                                     # pixels; 0 = the map's maximum (the paper)
    local_memory: float = 0.0        # weight w of the local memory's distance in the map
                                     # (grad.memory): (1 - w) A / q(A) + w K / q(K), q the
                                     # held-out normal maps' 99th percentile; 0 = off
    memory_size: int = 32            # patches the local memory keeps at each grid position
                                     # (chosen from the fit set's patches there: k-centre)
    global_memory: float = 0.0       # weight w_g of the global memory's distance in the map
                                     # (grad.memory.GlobalMemory: PatchCore's search over all
                                     # places, on raw features), scaled as the local one's;
                                     # 0 = off
    global_memory_ratio: float = 0.1  # share of the fit set's patches the global memory keeps
                                     # (k-centre; its cost: ratio x N^2 to choose, and the bank
                                     # read per frame)
    residual_norm: float | None = None  # divide F - z_hat by the normal residual spread, a
                                     # blend a*per-position + (1-a)*per-channel; None = raw
                                     # units (the paper). Fitted after training (trainer).
    # Feature Block Paste (training only; lives in grad.fbp, configured here so a checkpoint
    # records how it was trained).
    fbp_max_radius: int = 9          # block radius B in {0..max}; the mask is (2B+1)^2
    fbp_steps: int = 100             # four-neighbour random-walk steps from the block centre
    fbp_intensity: tuple[float, float] = (8.0, 16.0)

    def __post_init__(self) -> None:
        if self.backbone not in VARIANTS:
            raise ValueError(f"backbone {self.backbone!r} unknown; choose one of {sorted(VARIANTS)}")
        size = self.image_size
        if isinstance(size, (list, tuple)):
            if len(size) != 2 or not all(isinstance(v, int) for v in size):
                raise ValueError(f"image_size must be an int S or [H, W], got {size!r}")
            # One spelling per shape: [S, S] is S, so equal configs compare (and hash) equal.
            object.__setattr__(self, "image_size", size[0] if size[0] == size[1] else tuple(size))
        elif not isinstance(size, int):
            raise ValueError(f"image_size must be an int S or [H, W], got {size!r}")
        if any(v < 16 or v % 16 for v in self.input_hw):
            raise ValueError(f"image_size {self.image_size} must be multiples of 16, at least 16 "
                             "(stride-16 features are resized to stride 8)")
        if self.fit not in FITS:
            raise ValueError(f"fit {self.fit!r} unknown; choose one of {FITS}")
        if not 0.0 <= self.tile_overlap < 1.0:
            raise ValueError(f"tile_overlap must be in [0, 1), got {self.tile_overlap}")
        if self.whiten_groups < 1:
            raise ValueError(f"whiten_groups must be >= 1, got {self.whiten_groups}")
        if not 0.0 <= self.local_memory < 1.0:
            raise ValueError(f"local_memory must be in [0, 1), got {self.local_memory}")
        if self.memory_size < 1:
            raise ValueError(f"memory_size must be >= 1, got {self.memory_size}")
        if not 0.0 <= self.global_memory < 1.0:
            raise ValueError(f"global_memory must be in [0, 1), got {self.global_memory}")
        if not 0.0 < self.global_memory_ratio <= 1.0:
            raise ValueError(f"global_memory_ratio must be in (0, 1], got "
                             f"{self.global_memory_ratio}")
        if self.feature_pool < 1 or self.feature_pool % 2 == 0:
            raise ValueError(f"feature_pool must be an odd size >= 1, got {self.feature_pool}")
        for name in ("local_grid", "global_grid", "trunk_blocks"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @property
    def channels(self) -> int:
        return feature_channels(self.backbone)

    @property
    def input_hw(self) -> tuple[int, int]:
        """(H, W) of one model input (one tile when fit is "tile")."""
        s = self.image_size
        return (s, s) if isinstance(s, int) else (s[0], s[1])

    @property
    def feature_hw(self) -> tuple[int, int]:
        """(H/8, W/8): the backbone's feature map for one model input."""
        h, w = self.input_hw
        return h // 8, w // 8

    @property
    def width(self) -> int:
        return self.trunk_width or 2 * self.channels

    def to_dict(self) -> dict:
        d = asdict(self)
        d["fbp_intensity"] = list(self.fbp_intensity)
        if not isinstance(self.image_size, int):
            d["image_size"] = list(self.image_size)
        if self.whiten_groups == 1:
            # Left out at its default: checkpoints of one-product models stay readable by
            # grad-edge from before the key existed, and keep their model hash.
            del d["whiten_groups"]
        if self.local_memory == 0.0:
            # Likewise: a model without the local memory keeps its config and hash.
            del d["local_memory"], d["memory_size"]
        if self.global_memory == 0.0:
            del d["global_memory"], d["global_memory_ratio"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "GRADConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown GRAD config keys {sorted(unknown)}; known: {sorted(known)}")
        d = dict(d)
        if "fbp_intensity" in d:
            d["fbp_intensity"] = tuple(d["fbp_intensity"])
        if isinstance(d.get("image_size"), list):
            d["image_size"] = tuple(d["image_size"])
        return cls(**d)


CONFIGS: dict[str, GRADConfig] = {
    # The paper's sizes (EfficientNet-B6 replaced by Lite0 here): R_l 32, R_g 4, L 9 at 2C.
    "paper": GRADConfig(local_grid=32, global_grid=4, trunk_blocks=9),
    # The default on the line: trains on a 2-core CPU in minutes and runs fast on a GPU.
    # A narrow trunk keeps the convolutions cheap; the grids keep the paper's sizes.
    # Measured on ../shared/data (benchmarks/accuracy.py, notes in the JSON): a narrower trunk
    # (64) generalises less to defects than 128; k = 3 keeps less of the input where the
    # reconstruction is off; residual normalisation and top-1% pooling stop a few noisy normal
    # locations from deciding the image score.
    # Whitening the features first (PaDiM's statistics, grad.whitening) lifted magnetic_tile's
    # image AUROC from 0.83 to 0.97 (same head); in whitened units the refinement and the
    # residual normalisation no longer helped, so they are off.
    # Averaging over 3 x 3 neighbourhoods first (PatchCore's locally aware patches) lifted the
    # whitened distance to I 0.966 / P 0.796 / AUPRO 0.743 on magnetic_tile (from 0.961 /
    # 0.776 / 0.753) and 1.000 / 0.991 / 0.942 on metal_plate (from 1.000 / 0.985 / 0.934).
    # A 320 x 320 input (image_size=320) localises better (AUPRO magnetic_tile 0.759, metal_plate
    # 0.952, with the memory) at 1.3-1.4x the time and -0.2 points of magnetic_tile's image AUROC
    # (0.9637): a choice per line, not the default (benchmarks/results/accuracy.json,
    # cpu_speed.json).
    # The local memory (grad.memory: the nearest of 32 normal patches kept per position, within
    # one cell, weight 0.3) lifts magnetic_tile's image AUROC from 0.963 to 0.966 (3 seeds) and
    # cuts its misses at ~1% false rejects from 31.5% to 29.3%, for 1.06-1.20x the time and a
    # 20 MB bank; AUPRO 0.742 -> 0.738, metal_plate unchanged. local_memory=0 turns it off.
    "edge": GRADConfig(local_grid=32, global_grid=4, trunk_width=64, trunk_blocks=1,
                       feature_pool=3, whiten=True, refine_k=None, residual_norm=None,
                       score_topk=0.01, local_memory=0.3),
    # For CPU tests: the real backbone and the real head at toy sizes.
    "tiny": GRADConfig(image_size=64, local_grid=4, global_grid=2, trunk_width=16,
                       trunk_blocks=1, blur_sigma=1.0, fbp_max_radius=2, fbp_steps=10,
                       refine_k=3.0, residual_norm=0.25, score_topk=0.01),
}


def get_config(name: str, **overrides) -> GRADConfig:
    if name not in CONFIGS:
        raise ValueError(f"unknown model config {name!r}; choose one of {sorted(CONFIGS)}")
    return replace(CONFIGS[name], **overrides)
