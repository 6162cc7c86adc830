"""Images -> frozen backbone features, computed once.

The backbone never trains, so its output for an image never changes: computing it once and
training the head on the cache is what makes CPU training practical (the backbone is most of a
forward pass, and Feature Block Paste works on features, not pixels).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np
import torch
from tqdm import tqdm

from grad.model import GRAD
from grad.preprocess import Preprocess

log = logging.getLogger(__name__)


def to_input(images: Sequence[np.ndarray], image_size: int) -> torch.Tensor:
    """RGB uint8 images of any sizes -> normalised (B, 3, S, S), one resize per image."""
    pre = Preprocess(image_size)
    return torch.cat([pre(torch.from_numpy(np.ascontiguousarray(im))[None]) for im in images])


@torch.inference_mode()
def extract(model: GRAD, paths: Sequence, load: Callable[[object], np.ndarray],
            batch_size: int = 32, desc: str = "features") -> torch.Tensor:
    """Backbone features F (N, C, H, W) for each path, with a progress bar."""
    out = []
    bar = tqdm(range(0, len(paths), batch_size), desc=desc, unit="batch", leave=False)
    for i in bar:
        x = to_input([load(p) for p in paths[i:i + batch_size]], model.cfg.image_size)
        out.append(model.backbone(x))
    return torch.cat(out) if out else torch.empty(0)
