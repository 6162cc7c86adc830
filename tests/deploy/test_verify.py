"""Parity verification: passes eager against eager, fails with numbers when perturbed."""

import cv2
import numpy as np
import pytest
import torch

from deploy.runner import EagerRunner, Runner
from deploy.verify import Tolerances, image_auroc, map_correlation, verify
from edge.cli import main as grad_edge


class NoisyRunner(Runner):
    """An eager runner whose scores and maps are off by a few percent: a broken backend."""

    backend = "noisy"

    def __init__(self, model_path, rel_noise: float):
        self.inner = EagerRunner(model_path)
        super().__init__(self.inner.card, self.inner.image_size, "cpu", (1, 8, 32))
        self.rel_noise = rel_noise

    def _run(self, frames):
        maps, scores = self.inner._run(frames)
        return maps * (1 + self.rel_noise), scores * (1 + self.rel_noise)


class ShiftedRunner(NoisyRunner):
    """An eager runner whose maps sit 8 pixels off (as a wrong pad or resize would leave
    them) while its scores are right: only the map check can catch it."""

    backend = "shifted"

    def _run(self, frames):
        maps, scores = self.inner._run(frames)
        return torch.roll(maps, 8, dims=2), scores


def images(bgr_frames, n=6):
    # Two sizes: verify must batch by shape and keep the input order.
    return list(bgr_frames(n // 2, 80, 96, seed=1)) + list(bgr_frames(n - n // 2, 60, 70, seed=2))


def test_verify_passes_when_candidate_is_eager_fp32(checkpoint, bgr_frames):
    ims = images(bgr_frames)
    # On the CPU: on a CUDA GPU the candidate runs the line's default TF32 convolutions, while
    # the reference runs strict fp32, so the errors would not be zero there.
    report = verify(checkpoint, "eager", ims, labels=[0, 1, 0, 1, 0, 1], device="cpu")
    assert report.ok, report.summary()
    assert report.n_images == 6
    assert report.score_rel_max == 0.0 and report.map_err_max == 0.0
    assert report.map_corr_min == pytest.approx(1.0)
    assert report.auroc_candidate == report.auroc_reference


def test_verify_fails_with_numbers_when_candidate_is_perturbed(checkpoint, bgr_frames):
    report = verify(checkpoint, NoisyRunner(checkpoint, rel_noise=0.05), images(bgr_frames))
    assert not report.ok
    assert report.score_rel_max == pytest.approx(0.05, rel=1e-3)
    assert report.map_corr_min == pytest.approx(1.0)     # scaled, not moved: shape intact
    text = report.summary()
    assert "FAILED" in text and "score rel err 5.000e-02 > 1e-02" in text
    assert len(report.failures) == 1


def test_verify_fails_on_the_map_when_maps_are_shifted_but_scores_are_right(checkpoint,
                                                                           bgr_frames):
    report = verify(checkpoint, ShiftedRunner(checkpoint, rel_noise=0.0), images(bgr_frames))
    assert not report.ok
    assert report.score_rel_max == 0.0
    assert report.map_corr_min < Tolerances().map_corr
    assert [f.split(" ")[:2] for f in report.failures] == [["map", "correlation"]]


def test_verify_fails_when_fp16_meets_an_absurd_tolerance(checkpoint, bgr_frames):
    fp16 = EagerRunner(checkpoint, dtype=torch.float16)
    report = verify(checkpoint, fp16, images(bgr_frames, 2), Tolerances(score_rel=1e-9))
    assert not report.ok
    assert 0 < report.score_rel_max < 5e-2        # fp16 is close, just not 1e-9 close


def test_map_correlation_is_one_for_equal_flat_maps_and_zero_for_unequal_ones():
    flat = np.full((1, 4, 4), 3.0, np.float32)
    ramp = np.arange(16, dtype=np.float32).reshape(1, 4, 4)
    assert map_correlation(flat, flat)[0] == 1.0
    assert map_correlation(flat, flat + 1)[0] == 0.0
    assert map_correlation(ramp, 2 * ramp + 5)[0] == pytest.approx(1.0)
    assert map_correlation(ramp, ramp[:, ::-1, ::-1].copy())[0] == pytest.approx(-1.0)


def test_image_auroc_counts_ties_as_half_when_scores_are_equal():
    assert image_auroc(np.array([0, 0, 1, 1]), np.array([1.0, 2.0, 3.0, 4.0])) == 1.0
    assert image_auroc(np.array([0, 1]), np.array([2.0, 2.0])) == 0.5
    with pytest.raises(ValueError, match="both good"):
        image_auroc(np.array([1, 1]), np.array([1.0, 2.0]))


def test_verify_command_prints_ok_when_backend_is_eager(checkpoint, bgr_frames, tmp_path,
                                                        capsys):
    for i, frame in enumerate(bgr_frames(3)):
        cv2.imwrite(str(tmp_path / f"{i}.png"), frame)
    code = grad_edge(["verify", "--model", str(checkpoint), "--backend", "eager",
                      "--images", str(tmp_path), "--device", "cpu"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "verify eager vs eager fp32 on 3 images: OK" in out
