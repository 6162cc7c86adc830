"""The synthetic line: deterministic, varied good parts, visible defects with true masks."""

from __future__ import annotations

import threading

import cv2
import numpy as np
import pytest

from camera_sources.synthetic import DEFECT_KINDS, SyntheticLine, render_part, write_dataset


def test_synthetic_line_renders_the_same_frames_when_the_seed_is_the_same():
    first = SyntheticLine(seed=3, defect_every=2, size=(96, 128))
    again = SyntheticLine(seed=3, defect_every=2, size=(96, 128))
    other = SyntheticLine(seed=4, defect_every=2, size=(96, 128))
    for seq in (5, 0, 1):                  # any order: each frame has its own random stream
        image, mask = first.render(seq)
        image_again, mask_again = again.render(seq)
        np.testing.assert_array_equal(image, image_again)
        np.testing.assert_array_equal(mask, mask_again)
        assert not np.array_equal(image, other.render(seq)[0])
    assert image.shape == (96, 128, 3) and image.dtype == np.uint8


def test_synthetic_line_masks_are_nonempty_on_defect_frames_and_empty_on_good_frames():
    line = SyntheticLine(seed=0, defect_every=4, defect_frames={1})
    defect_seqs = [seq for seq in range(12) if line.defect_at(seq)]
    assert defect_seqs == [1, 3, 7, 11]
    for seq in range(12):
        _, mask = line.render(seq)
        if seq in defect_seqs:
            assert mask.sum() > 0, f"defect frame {seq} ({line.defect_at(seq)}) has an empty mask"
        else:
            assert mask.max() == 0, f"good frame {seq} has defect pixels"


def test_synthetic_good_parts_vary_when_seq_changes():
    line = SyntheticLine(seed=0)
    a, b = line.render(0)[0].astype(np.float32), line.render(1)[0].astype(np.float32)
    assert np.abs(a - b).mean() > 5.0, "good parts must differ, or a model only memorises one"


@pytest.mark.parametrize("kind", DEFECT_KINDS)
def test_synthetic_defect_changes_only_its_masked_pixels_and_visibly_when_drawn(kind):
    for i in range(3):
        good, empty = render_part(np.random.default_rng([9, i]), (128, 128), None)
        bad, mask = render_part(np.random.default_rng([9, i]), (128, 128), kind)
        diff = np.abs(bad.astype(np.float32) - good).mean(axis=-1)
        inside = mask > 0
        assert empty.max() == 0 and inside.any()
        assert np.percentile(diff[inside], 90) > 30, f"{kind} is too faint to be a defect"
        assert diff[~inside].mean() < 0.5, f"{kind} changes pixels outside its mask"


def test_synthetic_line_frames_carry_truth_encoder_and_end_when_n_frames_reached():
    line = SyntheticLine("line-a", seed=1, size=(64, 64), defect_every=3, n_frames=6, fps=None)
    frames = list(line.frames(threading.Event()))
    assert [f.truth for f in frames] == [0, 0, 1, 0, 0, 1]
    assert [f.encoder for f in frames] == [0, 100, 200, 300, 400, 500]
    assert [f.part_id for f in frames] == list(range(6))
    assert {f.source_id for f in frames} == {"line-a"}
    assert line.end_reason == "n_frames reached"
    np.testing.assert_array_equal(frames[2].image, line.render(2)[0])


def test_write_dataset_writes_the_mvtec_layout_with_a_mask_per_defect_image(tmp_path):
    category = write_dataset(tmp_path, n_train=3, n_test_good=2, n_test_defect=10, seed=0,
                             size=(64, 80))
    assert category == tmp_path / "synthetic_line"
    assert len(list((category / "train" / "good").glob("*.png"))) == 3
    assert len(list((category / "test" / "good").glob("*.png"))) == 2
    for kind in DEFECT_KINDS:
        images = sorted((category / "test" / kind).glob("*.png"))
        assert [p.name for p in images] == ["000.png", "001.png"]
        for image_path in images:
            mask = cv2.imread(str(category / "ground_truth" / kind / f"{image_path.stem}_mask.png"),
                              cv2.IMREAD_GRAYSCALE)
            assert mask.shape == (64, 80) and mask.max() == 255
    train = cv2.imread(str(category / "train" / "good" / "000.png"))
    test = cv2.imread(str(category / "test" / "good" / "000.png"))
    assert not np.array_equal(train, test), "test images must not repeat training images"
