"""Backbone stage outputs of a category's pictures, computed once per input shape, kept on disk.

The backbone is frozen, so GRAD (every seed, every config) and the PatchCore baseline all read
the same numbers; computing them once per (category, split, backbone, input, fit) is what lets
the accuracy benchmark run three seeds of several heads on a 2-core CPU. The two stages are
kept apart (stride 8 and stride 16): GRAD concatenates them (`grad.backbone.concat_stages`),
PatchCore pools each first (`patchcore_baseline.locally_aware`).

Files live under benchmarks/.cache/ (gitignored), named for the preprocessing's version
(`grad.preprocess.VERSION`); a file is reused only if it lists exactly the same image files, so
a changed dataset or preprocessing is recomputed, not silently mixed.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from grad.backbone import LiteFeatures, concat_stages
from grad.config import GRADConfig
from grad.preprocess import VERSION as PREPROCESS_VERSION
from grad.preprocess import Preprocess
from grad.tiling import TilePlan
from trainer.dataset import Sample, load_image
from trainer.features import Features

log = logging.getLogger(__name__)

CACHE = Path(__file__).resolve().parent / ".cache"


@dataclass(frozen=True)
class Stages:
    f8: torch.Tensor                 # (T, 40, H/8, W/8) float32, all tiles, picture-major
    f16: torch.Tensor                # (T, 112, H/16, W/16)
    plans: tuple[TilePlan, ...]      # one per picture

    def features(self) -> Features:
        """GRAD's input: the two stages concatenated at stride 8."""
        return Features(concat_stages(self.f8, self.f16), self.plans)

    def select(self, keep: list[int]) -> "Stages":
        offsets = np.cumsum([0] + [p.n for p in self.plans])
        rows = [r for i in keep for r in range(offsets[i], offsets[i + 1])]
        return Stages(self.f8[rows], self.f16[rows], tuple(self.plans[i] for i in keep))

    @staticmethod
    def join(parts: list["Stages"]) -> "Stages":
        return Stages(torch.cat([p.f8 for p in parts]), torch.cat([p.f16 for p in parts]),
                      tuple(pl for p in parts for pl in p.plans))


def cache_key(category: str, split: str, cfg: GRADConfig) -> str:
    # The preprocessing's version is in the name: a cache from before a change to it (the
    # uint8 resize) would otherwise serve the old inputs, and a run meant to measure the
    # change would measure nothing.
    h, w = cfg.input_hw
    fit = cfg.fit if cfg.fit == "stretch" else f"tile{cfg.tile_overlap:g}"
    return f"{category}-{split}-{cfg.backbone}-{h}x{w}-{fit}-pre{PREPROCESS_VERSION}"


@torch.inference_mode()
def stages_for(samples: list[Sample], category: str, split: str, cfg: GRADConfig,
               backbone: LiteFeatures, root: Path = CACHE, batch: int = 16) -> Stages:
    """The stages for `samples` (all of one category and split), from disk when cached."""
    path = root / f"{cache_key(category, split, cfg)}.pt"
    names = [s.path.name for s in samples]
    if path.is_file():
        saved = torch.load(path, weights_only=True)
        if saved["names"] == names:
            plans = tuple(TilePlan(tuple(a), tuple(b), tuple(map(tuple, c)))
                          for a, b, c in saved["plans"])
            return Stages(saved["f8"], saved["f16"], plans)
        log.info("%s lists other files than the data now: recomputing", path.name)
    pre = Preprocess.for_config(cfg)
    f8, f16, plans = [], [], []
    start = time.perf_counter()
    for i in tqdm(range(0, len(samples), batch), desc=f"features {path.stem}", unit="batch"):
        tiles = []
        for s in samples[i:i + batch]:
            image = torch.from_numpy(load_image(s.path))[None]           # (1, h, w, 3)
            tiles.append(pre(image))
            plans.append(pre.plan(*image.shape[1:3]))
        a, b = backbone.stages(torch.cat(tiles))
        f8.append(a)
        f16.append(b)
    stages = Stages(torch.cat(f8), torch.cat(f16), tuple(plans))
    root.mkdir(parents=True, exist_ok=True)
    torch.save({"names": names, "f8": stages.f8, "f16": stages.f16,
                "plans": [(p.scaled_hw, p.tile_hw, p.origins) for p in plans]}, path)
    log.info("cached %s: %d pictures, %d tiles in %.0f s", path.name, len(samples),
             len(stages.f8), time.perf_counter() - start)
    return stages
