"""Pictures -> frozen backbone features, computed once.

The backbone never trains, so its output for a picture never changes: computing it once and
training the head on the cache is what makes CPU training practical (the backbone is most of a
forward pass, and Feature Block Paste works on features, not pixels).

A picture becomes one model input or, when the config tiles (`grad.tiling`), several; the cache
keeps every tile's features, picture after picture, with each picture's `TilePlan`, so maps and
scores computed from the cache are stitched exactly as a full forward pass stitches them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from grad.config import GRADConfig
from grad.model import GRAD, GRADOutput
from grad.preprocess import Preprocess
from grad.tiling import TilePlan

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Features:
    """Backbone features of a list of pictures."""

    feats: torch.Tensor                 # (T, C, H/8, W/8): all tiles, picture-major
    plans: tuple[TilePlan, ...]         # one per picture; sum of plan.n == T
    # (T, C, H/8, W/8): the backbone's features before pooling and whitening, kept beside head
    # inputs (`head_input`) for a model with a global memory, which reads them; else None
    raw: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.plans)

    def groups(self, max_pictures: int = 32) -> Iterator[tuple[slice, TilePlan]]:
        """Runs of consecutive pictures with the same plan, at most `max_pictures` each:
        (their tiles' rows, b*n of them, the plan)."""
        start, i = 0, 0
        while i < len(self.plans):
            plan, j = self.plans[i], i
            while j < len(self.plans) and self.plans[j] == plan and j - i < max_pictures:
                j += 1
            end = start + (j - i) * plan.n
            yield slice(start, end), plan
            start, i = end, j

    def select(self, keep: Sequence[int]) -> "Features":
        """The pictures at indices `keep`, in that order."""
        offsets = np.cumsum([0] + [p.n for p in self.plans])
        rows = [r for i in keep for r in range(offsets[i], offsets[i + 1])]
        return Features(self.feats[rows], tuple(self.plans[i] for i in keep),
                        None if self.raw is None else self.raw[rows])


def to_input(images: Sequence[np.ndarray], cfg: GRADConfig) -> tuple[torch.Tensor, TilePlan]:
    """RGB uint8 pictures of one shape -> normalised tiles (B*n, 3, H, W) and their plan."""
    shapes = {im.shape for im in images}
    if len(shapes) != 1:
        raise ValueError(f"to_input takes pictures of one shape, got {sorted(shapes)}")
    pre = Preprocess.for_config(cfg)
    batch = torch.from_numpy(np.ascontiguousarray(np.stack(images)))   # (B, h, w, 3)
    return pre(batch), pre.plan(*images[0].shape[:2])


@torch.inference_mode()
def extract(model: GRAD, paths: Sequence, load: Callable[[object], np.ndarray],
            batch_size: int = 32, desc: str = "features") -> Features:
    """Backbone features of each picture at `paths`, with a progress bar."""
    feats, plans = [], []
    bar = tqdm(range(0, len(paths), batch_size), desc=desc, unit="batch", leave=False)
    for i in bar:
        tiles = []
        for p in paths[i:i + batch_size]:   # pictures may differ in shape: one plan each
            x, plan = to_input([load(p)], model.cfg)
            tiles.append(x)
            plans.append(plan)
        feats.append(model.backbone(torch.cat(tiles)))
    c, (h, w) = model.cfg.channels, model.cfg.feature_hw
    return Features(torch.cat(feats) if feats else torch.empty(0, c, h, w), tuple(plans))


@torch.inference_mode()
def predict_features(model: GRAD, features: Features,
                     batch_size: int = 32) -> tuple[np.ndarray, list[np.ndarray]]:
    """Scores (N,) and maps (one (h, w) array per picture) from cached features, through the
    same head, stitching and map as a full forward pass."""
    model.eval()
    scores, maps = [], []
    for rows, plan in features.groups(max(1, batch_size)):
        feats = features.feats[rows]
        raw = None if features.raw is None else features.raw[rows]
        out: GRADOutput = model.anomaly(feats, model.head(feats).z_hat, plan, raw)
        scores.append(out.score)
        maps.extend(out.anomaly_map.numpy())
    return (torch.cat(scores).numpy() if scores else np.empty(0, np.float32)), maps


@torch.inference_mode()
def head_input(model: GRAD, features: Features, batch_size: int = 64) -> Features:
    """Cached backbone features as the head sees them (`GRAD.prepare`: pooled and whitened
    where configured; fit `model.whiten` first, on `pooled` training features), with the
    backbone's own beside them where the model's global memory reads those."""
    raw = features.feats if model.global_memory is not None else None
    if model.whiten is None and model.cfg.feature_pool == 1:
        return Features(features.feats, features.plans, raw)
    return Features(torch.cat([model.prepare(f) for f in features.feats.split(batch_size)]),
                    features.plans, raw)


def tile_groups(products: Sequence[str], plans: Sequence[TilePlan],
                names: Sequence[str]) -> torch.Tensor:
    """Each tile's product number (its index in `names`), picture by picture: (T,) int64."""
    return torch.tensor([names.index(p) for p, plan in zip(products, plans)
                         for _ in range(plan.n)], dtype=torch.long)


@torch.inference_mode()
def fit_whitening(model: GRAD, features: Features, products: Sequence[str] | None = None,
                  batch_size: int = 64) -> None:
    """Fit `model.whiten` (when the model whitens) on training features, pooled as the head
    will see them. A model with `whiten_groups` > 1 gets one set of statistics per product:
    `products` names each picture's, and the sorted names number the groups."""
    if model.whiten is None:
        return
    groups = None
    if model.whiten.groups > 1:
        names = sorted(set(products or ()))
        if products is None or len(names) != model.whiten.groups:
            raise ValueError(f"the model whitens {model.whiten.groups} products separately; "
                             f"the training pictures name {len(names)}")
        groups = tile_groups(products, features.plans, names)
    model.whiten.fit(torch.cat([model.pool(f) for f in features.feats.split(batch_size)]),
                     groups)


def tile_pictures(plans: Sequence[TilePlan]) -> torch.Tensor:
    """Each tile's picture (its index in `plans`), picture-major as the cache holds them:
    (T,) int64."""
    return torch.arange(len(plans)).repeat_interleave(torch.tensor([p.n for p in plans],
                                                                   dtype=torch.long))


@torch.no_grad()   # not inference_mode: the bank must stay usable (and convertible) outside it
def fit_memory(model: GRAD, train: Features, held: Features, batch_size: int = 32) -> None:
    """Fill the model's memories (grad.memory: the local one from the fit set's head inputs,
    the global one from its raw backbone features) and put each one's distance in the
    residual's units, from held-out normal pictures (`held`, head inputs too; may be `train`
    itself when nothing was held out, each picture then kept from matching itself):

        lambda = w / (1 - w) * q(A) / q(K),  so  A + lambda K = q(A) / (1 - w) * M,
        M = (1 - w) A / q(A) + w K / q(K)

    with q the 99th percentile of the smoothed maps on the held-out pictures: each term in
    units of its own normal extreme, so the weight w (cfg.local_memory, cfg.global_memory)
    means the same on any product. Fit after the head has trained (A is its residual)."""
    cfg = model.cfg
    # (name, memory, weight, each kept patch's picture, whether it reads raw features)
    memories = []
    # Pictures, not tiles: a long picture's overlapping tiles can sit one feature cell apart,
    # so each holds the other's patches within the memory's reach.
    pictures = tile_pictures(train.plans)                                  # (T,)
    if model.memory is not None:
        source = pictures[model.memory.fit(train.feats, cfg.memory_size)]  # (HW, M)
        memories.append(("local memory", model.memory, cfg.local_memory, source, False))
    if model.global_memory is not None:
        if train.raw is None or held.raw is None:
            raise ValueError("the global memory reads the backbone's raw features: pass the "
                             "fit and held-out sets through `head_input`")
        n = train.raw.shape[0] * train.raw.shape[2] * train.raw.shape[3]
        log.info("global memory: choosing %d of %d patches (k-centre; its time grows as "
                 "the ratio x the square of the patches)", int(cfg.global_memory_ratio * n), n)
        source = pictures[model.global_memory.fit(train.raw, cfg.global_memory_ratio)]  # (M,)
        memories.append(("global memory", model.global_memory, cfg.global_memory, source, True))
    if not memories:
        return
    for _, memory, _, _, _ in memories:
        memory.scale.zero_()
    a_maps, k_maps = [], [[] for _ in memories]
    model.eval()
    own = tile_pictures(held.plans)                                       # (T,)
    for i in range(0, len(held.feats), batch_size):
        f = held.feats[i:i + batch_size]
        a_maps.append(model.smooth_upsample(model.residual(f, model.head(f).z_hat)))
        for maps, (_, memory, _, source, reads_raw) in zip(k_maps, memories):
            exclude = (source, own[i:i + len(f)]) if held is train else None
            x = held.raw[i:i + batch_size] if reads_raw else f
            maps.append(model.smooth_upsample(memory(x, exclude)))
    q_a = float(np.quantile(torch.cat(a_maps).numpy(), 0.99))
    for maps, (name, memory, w, _, _) in zip(k_maps, memories):
        q_k = float(np.quantile(torch.cat(maps).numpy(), 0.99))
        if not q_k > 0:
            log.warning("%s: no held-out patch is any distance from the bank (each has an "
                        "exact match, or nothing was held out and one picture trains); its "
                        "distance is left out of the map (hold out other pictures, or train "
                        "on more)", name)
            continue
        memory.scale.fill_(w / (1 - w) * q_a / q_k)
        log.info("%s: %d patches of %d training tiles kept %s (%.1f MB), weight %.2f, "
                 "lambda %.4f", name, memory.size, len(train.feats),
                 "per position" if memory is model.memory else "in all",
                 memory.bank.numel() * 4 / 2**20, w, float(memory.scale))
