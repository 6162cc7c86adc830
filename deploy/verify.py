"""Parity check (`grad-edge verify`): does an artifact score like the eager fp32 model?

Both run the same uint8 BGR frames; the reference is EagerRunner in fp32 on the same device,
with TF32 turned off and the whitening factor kept in float32, so that "fp32" means fp32 (on a
CPU its backbone is channels_last with the BatchNorms folded: the plain model's numbers to ~1e-6
relative). Three numbers decide (defaults and reasons in deploy/README.md):

    score relative error   |s - s_ref| / |s_ref| per image: max and median
    map error              max |A - A_ref| over the map, divided by the range of A_ref
                           (max - min), per image; the worst image counts
    image AUROC            with labels (0 good, 1 defective): the candidate's AUROC must equal
                           the reference's within `auroc_abs`

`ok` is False, with the numbers and the limits they broke, when any is beyond tolerance.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from deploy.artifact import BACKENDS, is_artifact, read_meta
from deploy.runner import EagerRunner, Runner, open_runner

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Tolerances:
    score_rel: float = 1e-2     # max relative error of image scores
    map_corr: float = 0.99      # least correlation of a map with the reference's, any image
    auroc_abs: float = 2e-3     # allowed change of image AUROC (when labels are given)


@dataclass(frozen=True)
class VerifyReport:
    backend: str
    n_images: int
    score_rel_max: float
    score_rel_median: float
    map_corr_min: float                # least Pearson correlation of a map with the reference
    map_err_max: float                 # max abs error / the reference map's range (reported)
    auroc_reference: float | None
    auroc_candidate: float | None
    tolerances: Tolerances
    failures: tuple[str, ...] = field(default_factory=tuple)

    @property
    def ok(self) -> bool:
        return not self.failures

    def summary(self) -> str:
        lines = [f"verify {self.backend} vs eager fp32 on {self.n_images} images: "
                 f"{'OK' if self.ok else 'FAILED'}",
                 f"  score rel err  max {self.score_rel_max:.2e}  median "
                 f"{self.score_rel_median:.2e}  (limit {self.tolerances.score_rel:.0e})",
                 f"  map correlation  min {self.map_corr_min:.5f}  (limit "
                 f"{self.tolerances.map_corr:g});  map err / range  max "
                 f"{self.map_err_max:.2e}  (reported)"]
        if self.auroc_reference is not None:
            lines.append(f"  image AUROC  reference {self.auroc_reference:.4f}  candidate "
                         f"{self.auroc_candidate:.4f}  (limit +-{self.tolerances.auroc_abs:.0e})")
        lines += [f"  beyond tolerance: {f}" for f in self.failures]
        return "\n".join(lines)


def map_correlation(ref: np.ndarray, cand: np.ndarray) -> np.ndarray:
    """Pearson correlation of each candidate map with its reference, (N, h, w) -> (N,).

    The map check is about shape, the score check about scale: a map scaled by 1.05 keeps
    correlation 1 and fails on its score; a map shifted, flipped or transposed by a layout bug
    keeps its score and fails here. Two constant maps correlate 1 if equal, else 0.
    """
    a = ref.reshape(len(ref), -1).astype(np.float64)
    b = cand.reshape(len(cand), -1).astype(np.float64)
    a, b = a - a.mean(1, keepdims=True), b - b.mean(1, keepdims=True)
    norm = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    flat = norm < 1e-12
    corr = np.where(flat, 0.0, (a * b).sum(1) / np.where(flat, 1.0, norm))
    same = flat & np.all(np.isclose(ref, cand).reshape(len(ref), -1), axis=1)
    return np.where(same, 1.0, corr)


def image_auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """AUROC as the Mann-Whitney statistic, ties counted half (deploy does not import trainer)."""
    labels = np.asarray(labels).astype(bool)
    pos, neg = scores[labels], scores[~labels]
    if len(pos) == 0 or len(neg) == 0:
        raise ValueError("image AUROC needs labels with both good (0) and defective (1) images")
    greater = (pos[:, None] > neg[None, :]).sum()
    ties = (pos[:, None] == neg[None, :]).sum()
    return float((greater + 0.5 * ties) / (len(pos) * len(neg)))


@contextlib.contextmanager
def strict_fp32() -> Iterator[None]:
    """TF32 off while the reference runs: on Ampere+ fp32 convolutions default to TF32."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def run_all(runner: Runner, images: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Scores (N,) and maps (N, mh, mw) in input order; frames batched by shape up to the
    runner's largest batch size. Frames of one shape give maps of one shape; mixed frame shapes
    of a tiling model would give maps of several, which one array cannot hold."""
    scores = np.empty(len(images), np.float32)
    shapes = {runner.map_hw(im.shape[:2]) for im in images}
    if len(shapes) > 1:
        raise ValueError(f"these frames give anomaly maps of {len(shapes)} shapes {sorted(shapes)}"
                         " (the model tiles with the aspect kept): verify with frames of one "
                         "shape, as the line sends them")
    maps = np.empty((len(images), *shapes.pop()), np.float32)
    limit = runner.batch_sizes[-1]
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, im in enumerate(images):
        by_shape.setdefault(im.shape, []).append(i)
    for idx in by_shape.values():
        for k in range(0, len(idx), limit):
            chunk = idx[k:k + limit]
            out = runner.run(np.stack([images[i] for i in chunk]))
            scores[chunk], maps[chunk] = out.scores, out.maps
    return scores, maps


def compare(backend: str, ref: tuple[np.ndarray, np.ndarray],
            cand: tuple[np.ndarray, np.ndarray], tolerances: Tolerances,
            labels: Sequence[int] | None = None) -> VerifyReport:
    (s_ref, m_ref), (s, m) = ref, cand
    score_rel = np.abs(s - s_ref) / np.maximum(np.abs(s_ref), 1e-12)
    span = (m_ref.max(axis=(1, 2)) - m_ref.min(axis=(1, 2))).clip(min=1e-12)
    map_err = np.abs(m - m_ref).max(axis=(1, 2)) / span
    corr = map_correlation(m_ref, m)
    report = dict(score_rel_max=float(score_rel.max()),
                  score_rel_median=float(np.median(score_rel)),
                  map_corr_min=float(corr.min()), map_err_max=float(map_err.max()),
                  auroc_reference=None, auroc_candidate=None)
    failures = []
    if report["score_rel_max"] > tolerances.score_rel:
        worst = int(score_rel.argmax())
        failures.append(f"score rel err {report['score_rel_max']:.3e} > "
                        f"{tolerances.score_rel:.0e} (image {worst}: {s[worst]:.5g} vs "
                        f"{s_ref[worst]:.5g})")
    if report["map_corr_min"] < tolerances.map_corr:
        failures.append(f"map correlation {report['map_corr_min']:.5f} < "
                        f"{tolerances.map_corr:g} (image {int(corr.argmin())})")
    if labels is not None:
        labels = np.asarray(labels)
        if len(labels) != len(s):
            raise ValueError(f"{len(labels)} labels for {len(s)} images: give one per image")
        a_ref, a = image_auroc(labels, s_ref), image_auroc(labels, s)
        report.update(auroc_reference=a_ref, auroc_candidate=a)
        if abs(a - a_ref) > tolerances.auroc_abs:
            failures.append(f"image AUROC changed {a_ref:.4f} -> {a:.4f} "
                            f"(> {tolerances.auroc_abs:.0e})")
    return VerifyReport(backend=backend, n_images=len(s), tolerances=tolerances,
                        failures=tuple(failures), **report)


def verify(model_path: str | Path, artifact_dir_or_backend: str | Path | Runner,
           images: Sequence[np.ndarray], tolerances: Tolerances = Tolerances(),
           labels: Sequence[int] | None = None, device: str | None = None) -> VerifyReport:
    """Run the candidate (an artifact directory, a backend name, or an open Runner) and eager
    fp32 on the same BGR uint8 images (any sizes) and compare.

    A runner passed in is used as it is and not closed; one opened here is closed here.
    """
    if not images:
        raise ValueError("verify needs at least one image")
    candidate, opened = artifact_dir_or_backend, False
    if not isinstance(candidate, Runner):
        target = candidate
        if str(target) in BACKENDS and not Path(str(target)).is_dir():
            candidate = open_runner(model_path, backend=str(target), device=device)
        elif is_artifact(target):
            candidate = open_runner(model_path, backend=read_meta(target).backend,
                                    device=device, artifact=target)
        else:
            raise ValueError(f"{target!r} is neither a backend ({', '.join(BACKENDS)}) nor an "
                             "artifact directory with artifact.json")
        opened = True
    try:
        ref_device = device or candidate.device
        with EagerRunner(model_path, device=ref_device, whiten_bf16=False) as reference, \
                strict_fp32():
            ref = run_all(reference, images)
        cand = run_all(candidate, images)
    finally:
        if opened:
            candidate.close()
    report = compare(candidate.backend, ref, cand, tolerances, labels)
    (log.info if report.ok else log.warning)("%s", report.summary())
    return report
