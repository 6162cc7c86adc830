"""The accuracy benchmark's feature cache serves only inputs made by today's preprocessing."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import feature_cache  # noqa: E402

from grad.backbone import LiteFeatures  # noqa: E402
from grad.config import get_config  # noqa: E402
from grad.preprocess import VERSION  # noqa: E402
from trainer.dataset import scan  # noqa: E402


def test_a_cache_from_another_preprocessing_is_not_read(tmp_path, shared_data):
    cfg = get_config("tiny")
    samples = scan(shared_data, ["metal_plate"], "train")[:3]
    backbone = LiteFeatures(cfg.backbone)
    fresh = feature_cache.stages_for(samples, "metal_plate", "train", cfg, backbone,
                                     root=tmp_path)
    (written,) = tmp_path.glob("*.pt")
    assert written.stem.endswith(f"-pre{VERSION}")
    # The same pictures cached by an older preprocessing (its file named as they were before
    # the version was part of the name, its features all zero): computed again, not served.
    old = tmp_path / "old"
    old.mkdir()
    stale = written.stem.removesuffix(f"-pre{VERSION}")
    torch.save({**torch.load(written, weights_only=True),
                "f8": torch.zeros_like(fresh.f8), "f16": torch.zeros_like(fresh.f16)},
               old / f"{stale}.pt")
    again = feature_cache.stages_for(samples, "metal_plate", "train", cfg, backbone, root=old)
    assert torch.equal(again.f8, fresh.f8) and fresh.f8.abs().sum() > 0
    # and a cache of today's preprocessing is read back as written
    assert torch.equal(feature_cache.stages_for(samples, "metal_plate", "train", cfg, backbone,
                                                root=tmp_path).f16, fresh.f16)
