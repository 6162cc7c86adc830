"""The accuracy benchmark's other threshold rules are the stored rule with another k."""

import sys
from pathlib import Path

import numpy as np
import pytest

from trainer.train import calibrate

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import accuracy  # noqa: E402


@pytest.mark.parametrize("k", [3.5, 4.0])
def test_k_std_rule_is_what_train_would_store_with_that_k(k):
    rng = np.random.default_rng(0)
    # 200 normal scores and one normal picture the model scores like a defect (the 320
    # cross-fit had 4 such among 762): calibrate leaves it out of mean and std.
    scores = np.append(rng.normal(40.0, 2.0, 200), 90.0)
    rule = accuracy.THRESHOLD_RULES[f"{k:g} std"](scores)
    assert rule == pytest.approx(calibrate(scores, k).threshold)
    # mean + k std of every score, the outlier included, sits far higher
    assert rule < scores.mean() + k * scores.std() - 5.0
