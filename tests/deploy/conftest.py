"""Fixtures for the deploy tests: a real tiny checkpoint and camera-like BGR frames."""

from pathlib import Path

import numpy as np
import pytest

from grad.checkpoint import Calibration, save_checkpoint


@pytest.fixture(scope="session")
def checkpoint(tiny_model, tmp_path_factory) -> Path:
    """The tiny GRAD saved as a real checkpoint file (head weights + calibration)."""
    path = tmp_path_factory.mktemp("model") / "tiny.pt"
    save_checkpoint(path, tiny_model, Calibration(mean=80.0, std=1.0, threshold=85.0,
                                                  n_images=4, rule="test"))
    return path


def _bgr_frames(n: int, h: int = 80, w: int = 96, seed: int = 0) -> np.ndarray:
    """uint8 (n, h, w, 3) frames: smooth gradients plus noise, each frame different."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 200, w, dtype=np.float32)[None, :, None]
    frames = ramp + rng.normal(0, 20, (n, h, w, 3)) + 10 * np.arange(n)[:, None, None, None]
    return frames.clip(0, 255).astype(np.uint8)


@pytest.fixture
def bgr_frames():
    """make(n, h=80, w=96, seed=0) -> uint8 (n, h, w, 3) BGR frames."""
    return _bgr_frames
