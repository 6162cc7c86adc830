"""The embedded default line: procedurally generated metal parts on a conveyor belt.

Every frame shows one part (a brushed-metal plate with five holes) lying on a textured grey
belt between two rails. Good parts differ the way real ones do -- position, rotation, scale,
lighting direction, brightness, brushing, belt position -- so a model has to learn what
"normal" looks like rather than memorise one image. Defects are drawn onto the part at known
frames with their pixel mask known:

- ``scratch``       a thin bright or dark line
- ``dent``          a small shaded depression (dark on one side, bright on the other)
- ``spot``          an irregular dark stain
- ``missing_hole``  one corner hole was never drilled
- ``crack``         a jagged dark line running in from the part's edge

Everything is deterministic for a seed: frame ``seq`` of line ``seed`` is drawn from its own
random stream, so the same frames come out on every run and in any order.
:func:`write_dataset` writes the same kind of images as an MVTec-layout folder for training
and evaluating the demo model.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Iterable, Iterator

import cv2
import numpy as np

from camera_sources.base import (BeltTrigger, ConveyorEncoder, FrameSource, Pacer, StopEvent,
                                 make_frame)
from edge.protocol import Frame

logger = logging.getLogger(__name__)

DEFECT_KINDS = ("scratch", "dent", "spot", "missing_hole", "crack")

# Part geometry as fractions of the frame's shorter side (s): a landscape plate.
_PART_HALF_W = 0.33
_PART_HALF_H = 0.23
_CORNER_R = 0.07
_HOLE_R = 0.035
_CENTRE_HOLE_R = 0.06
_CORNER_HOLES = ((-0.24, -0.14), (0.24, -0.14), (-0.24, 0.14), (0.24, 0.14))


# --------------------------------------------------------------------------- drawing


def _belt(rng: np.random.Generator, h: int, w: int, s: int) -> np.ndarray:
    """A grey rubber belt with slats across the direction of travel, between two rails."""
    level = 95.0 + rng.normal(0, 3)
    grain = cv2.GaussianBlur(rng.normal(0, 7, (h, w)).astype(np.float32), (0, 0), 0.8)
    mottling = cv2.resize(rng.normal(0, 4, (h // 16 + 2, w // 16 + 2)).astype(np.float32),
                          (w, h), interpolation=cv2.INTER_CUBIC)
    belt = level + grain + mottling
    # Slats move with the belt, so their phase differs frame to frame.
    period = max(4.0, 0.09 * s)
    phase = rng.uniform(0, period)
    x = np.arange(w, dtype=np.float32)
    slat = ((x + phase) % period) < max(1.0, s / 128)
    belt[:, slat] -= 18
    rail = max(2, int(0.07 * h))
    streaks = cv2.blur(rng.normal(0, 12, (h, w)).astype(np.float32), (21, 1))
    belt[:rail] = 60 + streaks[:rail]
    belt[h - rail:] = 60 + streaks[h - rail:]
    # A faintly green-grey belt: B, G, R channels.
    return np.stack([belt * 0.97, belt * 1.02, belt * 0.98], axis=-1)


def _rounded_rect(cx: float, cy: float, hw: float, hh: float, r: float) -> np.ndarray:
    """Polygon points of a rounded rectangle, for cv2.fillPoly."""
    points = []
    for (sx, sy, start) in ((1, 1, 0), (-1, 1, 90), (-1, -1, 180), (1, -1, 270)):
        ox, oy = cx + sx * (hw - r), cy + sy * (hh - r)
        for deg in range(start, start + 91, 10):
            rad = math.radians(deg)
            points.append((ox + r * math.cos(rad), oy + r * math.sin(rad)))
    return np.array(points, dtype=np.float32)


def _fill(canvas: np.ndarray, polygon: np.ndarray, value: float) -> None:
    # Sub-pixel vertices (shift=4) and anti-aliased edges, so outlines are not stair-stepped.
    cv2.fillPoly(canvas, [np.round(polygon * 16).astype(np.int32)], value, cv2.LINE_AA, shift=4)


def _hole_centres(cx: float, cy: float, s: int) -> list[tuple[float, float]]:
    return [(cx + fx * s, cy + fy * s) for fx, fy in _CORNER_HOLES]


def _on_surface(rng: np.random.Generator, cx: float, cy: float, s: int,
                margin: float) -> tuple[float, float]:
    """A random point on the plate's flat surface, clear of holes and edges by ``margin``."""
    holes = _hole_centres(cx, cy, s) + [(cx, cy)]
    radii = [_HOLE_R * s] * 4 + [_CENTRE_HOLE_R * s]
    for _ in range(200):
        x = cx + rng.uniform(-1, 1) * (_PART_HALF_W * s - margin)
        y = cy + rng.uniform(-1, 1) * (_PART_HALF_H * s - margin)
        if all(math.hypot(x - hx, y - hy) > r + margin for (hx, hy), r in zip(holes, radii)):
            return x, y
    return cx + 0.12 * s, cy   # between the centre hole and the corners: always clear


def _draw_scratch(rng, texture, mask, cx, cy, s) -> None:
    length = rng.uniform(0.15, 0.28) * s
    x, y = _on_surface(rng, cx, cy, s, margin=0.05 * s)
    angle = rng.uniform(0, math.pi)
    dx, dy = math.cos(angle) * length / 2, math.sin(angle) * length / 2
    bend = rng.normal(0, 0.015 * s)
    points = np.array([(x - dx, y - dy), (x - bend * math.sin(angle), y + bend * math.cos(angle)),
                       (x + dx, y + dy)], dtype=np.float32)
    thickness = max(1, round(s / 200))
    delta = 90.0 if rng.random() < 0.5 else -90.0
    layer = np.zeros(mask.shape, np.float32)
    cv2.polylines(layer, [np.round(points).astype(np.int32)], False, 1.0, thickness, cv2.LINE_AA)
    texture += delta * layer[..., None]
    cv2.polylines(mask, [np.round(points).astype(np.int32)], False, 255, thickness + 4)


def _draw_dent(rng, texture, mask, cx, cy, s) -> None:
    rx, ry = rng.uniform(0.03, 0.05) * s, rng.uniform(0.025, 0.04) * s
    x, y = _on_surface(rng, cx, cy, s, margin=0.06 * s)
    h, w = mask.shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    blob = np.exp(-(((xx - x) / rx) ** 2 + ((yy - y) / ry) ** 2) * 2.0)
    # Lit from the top left: the near wall of the dent is in shadow, the far wall shines.
    shift = max(1.0, 0.012 * s)
    shaded = np.exp(-(((xx - x + shift) / rx) ** 2 + ((yy - y + shift) / ry) ** 2) * 2.0) \
        - np.exp(-(((xx - x - shift) / rx) ** 2 + ((yy - y - shift) / ry) ** 2) * 2.0)
    change = -110.0 * shaded - 30.0 * blob
    texture += change[..., None]
    mask[np.abs(change) > 6.0] = 255   # wherever the dent visibly changed the surface


def _draw_spot(rng, texture, mask, cx, cy, s) -> None:
    radius = rng.uniform(0.03, 0.05) * s
    x, y = _on_surface(rng, cx, cy, s, margin=radius + 0.02 * s)
    h, w = mask.shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    # An irregular outline: a disc whose radius wobbles with low-frequency noise.
    wobble = cv2.resize(rng.normal(0, 1, (6, 6)).astype(np.float32), (w, h),
                        interpolation=cv2.INTER_CUBIC)
    inside = np.hypot(xx - x, yy - y) < radius * (1 + 0.3 * wobble)
    stain = cv2.GaussianBlur(inside.astype(np.float32), (0, 0), max(0.7, s / 256))
    # Oil-brown: darker, and less blue than the metal.
    texture -= stain[..., None] * np.array([95.0, 70.0, 55.0], np.float32)
    mask[stain > 0.08] = 255   # the stain's visible extent, blurred rim included


def _draw_crack(rng, texture, mask, cx, cy, s) -> None:
    # Start on a long edge of the plate and wander inwards.
    side = 1 if rng.random() < 0.5 else -1
    x = cx + rng.uniform(-0.15, 0.15) * s
    y = cy + side * (_PART_HALF_H * s - 1)
    heading = -side * math.pi / 2 + rng.normal(0, 0.3)
    step = max(2.0, 0.012 * s)
    points = [(x, y)]
    for _ in range(int(rng.uniform(0.08, 0.14) * s / step)):
        heading += rng.normal(0, 0.45)
        heading = -side * math.pi / 2 + float(np.clip(heading + side * math.pi / 2, -0.9, 0.9))
        x, y = x + step * math.cos(heading), y + step * math.sin(heading)
        points.append((x, y))
    polyline = np.round(np.array(points, dtype=np.float32)).astype(np.int32)
    thickness = max(1, round(s / 160))
    layer = np.zeros(mask.shape, np.float32)
    cv2.polylines(layer, [polyline], False, 1.0, thickness, cv2.LINE_AA)
    texture -= 100.0 * layer[..., None]
    cv2.polylines(mask, [polyline], False, 255, thickness + 4)


_DEFECT_DRAWERS = {"scratch": _draw_scratch, "dent": _draw_dent, "spot": _draw_spot,
                   "crack": _draw_crack}


def render_part(rng: np.random.Generator, size: tuple[int, int] = (256, 256),
                defect: str | None = None,
                out: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Draw one frame: a part on the belt, with ``defect`` (a DEFECT_KINDS name) or none.

    Returns ``(image, mask)``: image uint8 (H, W, 3) BGR -- ``out`` when given, drawn into
    it; mask uint8 (H, W), 255 on the defect's pixels and 0 elsewhere (all 0 for a good part).
    """
    if defect is not None and defect not in DEFECT_KINDS:
        raise ValueError(f"unknown defect {defect!r}; choose one of {DEFECT_KINDS}")
    h, w = size
    s = min(h, w)
    if s < 32:
        raise ValueError(f"size {size} is too small to draw a part; use at least 32x32")
    # The defect draws from its own stream, taken first whatever the defect: the same rng
    # state then gives the same part, pose and lighting with or without a defect, so the
    # defect is the only difference (tests rely on it; so can anyone studying the model).
    defect_rng = np.random.default_rng(rng.integers(2**63))
    belt = _belt(rng, h, w, s)

    # The part is drawn upright at the frame centre, then moved/rotated as a whole, so its
    # texture, holes and defect move with it.
    cx, cy = w / 2, h / 2
    alpha = np.zeros((h, w), np.uint8)
    _fill(alpha, _rounded_rect(cx, cy, _PART_HALF_W * s, _PART_HALF_H * s, _CORNER_R * s), 255)

    brushing = cv2.blur(rng.normal(0, 1, (h, w)).astype(np.float32), (max(3, s // 8), 1))
    metal = 165.0 + rng.normal(0, 8) + 22.0 * brushing + rng.normal(0, 2.5, (h, w))
    texture = np.stack([metal * 1.03, metal, metal * 0.96], axis=-1).astype(np.float32)

    missing = int(defect_rng.integers(4)) if defect == "missing_hole" else None
    mask = np.zeros((h, w), np.uint8)
    holes = [(hx, hy, _HOLE_R * s) for hx, hy in _hole_centres(cx, cy, s)]
    holes.append((cx, cy, _CENTRE_HOLE_R * s))
    for i, (hx, hy, r) in enumerate(holes):
        if i == missing:
            # The hole, its chamfer ring and the shadow it would have had.
            cv2.circle(mask, (round(hx), round(hy)), round(r + 0.025 * s), 255, -1)
            continue
        # A dark chamfer ring round each drilled hole, then the hole itself.
        ring = np.zeros((h, w), np.float32)
        cv2.circle(ring, (round(hx), round(hy)), round(r + 2), 1.0, max(2, round(s / 100)),
                   cv2.LINE_AA)
        texture -= 45.0 * ring[..., None]
        cv2.circle(alpha, (round(hx), round(hy)), round(r), 0, -1, cv2.LINE_AA)
    if defect in _DEFECT_DRAWERS:
        _DEFECT_DRAWERS[defect](defect_rng, texture, mask, cx, cy, s)

    # Rounded edges catch less light: darken a narrow band along the outline.
    edge = cv2.GaussianBlur(alpha.astype(np.float32) / 255, (0, 0), max(1.0, s / 100))
    texture *= (0.75 + 0.25 * edge)[..., None]

    # Pose jitter: where and how the part lies on the belt.
    angle = rng.normal(0, 3.0)
    scale = 1.0 + rng.normal(0, 0.025)
    pose = cv2.getRotationMatrix2D((cx, cy), angle, scale)
    pose[:, 2] += rng.normal(0, 0.02 * s, 2)
    texture = cv2.warpAffine(texture, pose, (w, h), flags=cv2.INTER_LINEAR)
    part = cv2.warpAffine(alpha.astype(np.float32) / 255, pose, (w, h), flags=cv2.INTER_LINEAR)
    mask = cv2.warpAffine(mask, pose, (w, h), flags=cv2.INTER_NEAREST)

    # Lighting: a gentle gradient from a random direction across the part.
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    light = rng.uniform(0, 2 * math.pi)
    texture += (18.0 * ((xx - cx) * math.cos(light) + (yy - cy) * math.sin(light)) / s)[..., None]

    # The part casts a soft shadow down-right onto the belt (and into its own holes).
    offset = np.float32([[1, 0, 0.015 * s], [0, 1, 0.02 * s]])
    shadow = cv2.GaussianBlur(cv2.warpAffine(part, offset, (w, h)), (0, 0), 0.02 * s)
    belt *= (1.0 - 0.5 * shadow)[..., None]

    image = belt * (1 - part[..., None]) + texture * part[..., None]
    image = image * (1.0 + rng.normal(0, 0.04)) + rng.normal(0, 2.0, image.shape)
    mask[part < 0.5] = 0
    if out is not None:      # straight into the buffer the frame travels in (a ring slot)
        np.copyto(out, np.clip(image, 0, 255), casting="unsafe")
        return out, mask
    return np.clip(image, 0, 255).astype(np.uint8), mask


# --------------------------------------------------------------------------- the line


class SyntheticLine(FrameSource):
    """A conveyor of synthetic parts; one part per frame.

    Defects: at every frame in ``defect_frames``, and at frames ``defect_every - 1``,
    ``2 * defect_every - 1``, ... when ``defect_every`` is set (so frame 0 is always good
    unless listed). The defect kind of a frame is drawn from ``kinds`` by the frame's own
    random stream. ``n_frames=None`` runs until stopped; ``fps=None`` as fast as possible.
    Each frame carries ``truth`` (0 good, 1 defect) and the simulated encoder.

    With a ``belt`` (:class:`camera_sources.encoder.SimulatedBelt`) the parts ride a belt that
    moves whatever the line does: frame ``seq`` is triggered when the belt reaches
    ``seq * counts_per_frame`` (``fps`` is then the belt's business) and a restarted
    producer resumes at the part under the camera now. ``stall=(frame, seconds)`` is a fault
    drill: from that frame the camera delivers nothing for that long.
    """

    def __init__(self, source_id: str = "synthetic", seed: int = 0,
                 size: tuple[int, int] = (256, 256), defect_every: int | None = None,
                 defect_frames: Iterable[int] | None = None, n_frames: int | None = None,
                 fps: float | None = 10.0, kinds: Iterable[str] = DEFECT_KINDS,
                 counts_per_frame: int = 100, frames_per_part: int = 1, belt=None,
                 stall: tuple[int, float] | None = None):
        if defect_every is not None and defect_every < 1:
            raise ValueError(f"defect_every must be >= 1 or None, got {defect_every}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.source_id = source_id
        self.seed = seed
        self.size = (int(size[0]), int(size[1]))
        self.defect_every = defect_every
        self.defect_frames = frozenset(defect_frames or ())
        self.n_frames = n_frames
        self.fps = fps
        self.kinds = tuple(kinds)
        unknown = set(self.kinds) - set(DEFECT_KINDS)
        if not self.kinds or unknown:
            raise ValueError(
                f"kinds must be a non-empty subset of {DEFECT_KINDS}, got {self.kinds}")
        self.conveyor = ConveyorEncoder(counts_per_frame, frames_per_part)
        self.trigger = BeltTrigger(belt, self.conveyor) if belt is not None else None
        # A fault drill: at frame stall[0] the camera delivers nothing for stall[1] seconds.
        self.stall = (int(stall[0]), float(stall[1])) if stall else None

    def defect_at(self, seq: int) -> str | None:
        """The defect kind drawn on frame ``seq``, or None for a good part."""
        scheduled = seq in self.defect_frames or (
            self.defect_every is not None and seq % self.defect_every == self.defect_every - 1)
        if not scheduled:
            return None
        pick = np.random.default_rng([self.seed, seq, 1]).integers(len(self.kinds))
        return self.kinds[int(pick)]

    def render(self, seq: int, out: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Frame ``seq``'s image (uint8 BGR; into ``out`` when given) and defect mask (uint8,
        255 on the defect)."""
        return render_part(np.random.default_rng([self.seed, seq]), self.size,
                           self.defect_at(seq), out=out)

    def frames(self, stop: StopEvent) -> Iterator[Frame]:
        pacer = Pacer(self.fps)
        seq = self.trigger.first_seq() if self.trigger else 0
        stall = self.stall
        while self.n_frames is None or seq < self.n_frames:
            if stall is not None and seq >= stall[0]:
                logger.warning("synthetic line %s: camera stalls for %.1f s (fault drill)",
                               self.source_id, stall[1])
                if stop.wait(stall[1]):
                    self.end_reason = "stopped"
                    return
                stall = None
                if self.trigger:          # the belt moved on: the parts meanwhile pass unseen
                    seq = max(seq, self.trigger.first_seq())
            waited = self.trigger.wait(seq, stop) if self.trigger else pacer.wait(stop)
            if not waited:
                self.end_reason = "stopped"
                return
            image, _ = self.render(seq, out=self.buffer((*self.size, 3)))
            yield make_frame(self.source_id, seq, image,
                             part_id=self.conveyor.part_id(seq),
                             encoder=self.conveyor.encoder(seq),
                             truth=0 if self.defect_at(seq) is None else 1,
                             stamp=self.trigger.stamp(seq) if self.trigger else None)
            seq += 1
        self.end_reason = "n_frames reached"


# --------------------------------------------------------------------------- the dataset


def write_dataset(root: str | Path, n_train: int, n_test_good: int, n_test_defect: int,
                  seed: int = 0, size: tuple[int, int] = (256, 256),
                  kinds: Iterable[str] = DEFECT_KINDS) -> Path:
    """Write an MVTec-layout dataset of synthetic parts; returns ``root/synthetic_line``.

    ::

        synthetic_line/train/good/000.png                  n_train good parts
        synthetic_line/test/good/000.png                   n_test_good good parts
        synthetic_line/test/<kind>/000.png                 n_test_defect defective parts in all,
        synthetic_line/ground_truth/<kind>/000_mask.png    dealt round-robin over ``kinds``

    Train, test-good and test-defect images come from separate random streams of ``seed``,
    so no test image repeats a training image.
    """
    kinds = tuple(kinds)
    if not kinds or set(kinds) - set(DEFECT_KINDS):
        raise ValueError(f"kinds must be a non-empty subset of {DEFECT_KINDS}, got {kinds}")
    category = Path(root) / "synthetic_line"

    def write(path: Path, image: np.ndarray) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        if not cv2.imwrite(str(path), image):
            raise OSError(f"could not write {path}; is the folder writable and the disk not full?")

    for i in range(n_train):
        image, _ = render_part(np.random.default_rng([seed, 0, i]), size, None)
        write(category / "train" / "good" / f"{i:03d}.png", image)
    for i in range(n_test_good):
        image, _ = render_part(np.random.default_rng([seed, 1, i]), size, None)
        write(category / "test" / "good" / f"{i:03d}.png", image)
    for i in range(n_test_defect):
        kind = kinds[i % len(kinds)]
        stem = f"{i // len(kinds):03d}"
        image, mask = render_part(np.random.default_rng([seed, 2, i]), size, kind)
        write(category / "test" / kind / f"{stem}.png", image)
        write(category / "ground_truth" / kind / f"{stem}_mask.png", mask)
    logger.info("wrote synthetic dataset to %s: %d train, %d test good, %d test defect",
                category, n_train, n_test_good, n_test_defect)
    return category
