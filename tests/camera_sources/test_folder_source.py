"""ImageFolderSource on real PNG files, one of them corrupt."""

from __future__ import annotations

import threading

import cv2
import numpy as np
import pytest

from camera_sources.folder import ImageFolderSource
from camera_sources.synthetic import DEFECT_KINDS, write_dataset


def test_folder_source_skips_and_counts_an_unreadable_file(tmp_path):
    for i in (0, 1, 3):
        cv2.imwrite(str(tmp_path / f"{i:03d}.png"), np.full((20, 30, 3), 40 * i, np.uint8))
    (tmp_path / "002.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    (tmp_path / "readme.txt").write_text("not an image, not counted")

    source = ImageFolderSource(tmp_path, source_id="folder")
    frames = list(source.frames(threading.Event()))
    assert source.unreadable_files == 1
    assert [f.seq for f in frames] == [0, 1, 3]
    assert [int(f.image.mean()) for f in frames] == [0, 40, 120]
    assert all(f.truth is None for f in frames)
    assert source.end_reason == "end of folder"


def test_folder_source_takes_truth_from_the_folder_when_label_from_path(tmp_path):
    category = write_dataset(tmp_path, n_train=0, n_test_good=3, n_test_defect=5, seed=1,
                             size=(64, 64))
    source = ImageFolderSource(category / "test", label_from_path=True, gray=True)
    frames = list(source.frames(threading.Event()))
    assert len(frames) == 8
    truths = {path.parent.name: frame.truth for path, frame in zip(source.paths, frames)}
    assert truths["good"] == 0
    assert all(truths[kind] == 1 for kind in DEFECT_KINDS)
    assert frames[0].image.ndim == 2


def test_folder_source_raises_a_clear_error_when_no_images_match(tmp_path):
    with pytest.raises(FileNotFoundError, match="no .* images match"):
        ImageFolderSource(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolderSource(tmp_path / "missing")
