"""Start-up checks against real files: a source that cannot deliver a frame is refused with one
line saying why, before any run opens."""

from __future__ import annotations

import numpy as np
import pytest

from camera_sources.base import SourceSpec
from camera_sources.probe import SourceUnavailable, probe_source


def test_probe_reports_fps_count_and_shape_when_the_video_is_good(video_file):
    info = probe_source(SourceSpec("video", "cam", {"path": str(video_file)}))
    assert info.fps == pytest.approx(20.0) and info.frame_count == 20
    assert info.frame_shape == (48, 64, 3)


def test_probe_names_the_file_when_the_video_is_missing(tmp_path):
    missing = tmp_path / "nope.mp4"
    with pytest.raises(SourceUnavailable, match="does not exist") as err:
        probe_source(SourceSpec("video", "cam", {"path": str(missing)}))
    assert str(missing) in str(err.value) and "\n" not in str(err.value)


def test_probe_refuses_random_bytes_named_mp4(tmp_path):
    junk = tmp_path / "line.mp4"
    junk.write_bytes(np.random.default_rng(0).integers(0, 256, 200_000, np.uint8).tobytes())
    with pytest.raises(SourceUnavailable, match="cannot (open|be decoded)") as err:
        probe_source(SourceSpec("video", "cam", {"path": str(junk)}))
    assert str(junk) in str(err.value)


def test_probe_refuses_an_image_folder_with_no_image(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(SourceUnavailable, match="no .* images"):
        probe_source(SourceSpec("folder", "cam", {"root": str(tmp_path / "empty")}))


def test_probe_gives_a_camera_its_retries_then_refuses_it_when_it_never_answers(tmp_path, caplog):
    with caplog.at_level("WARNING", logger="camera_sources.probe"):
        with pytest.raises(SourceUnavailable, match="after 2 attempt"):
            probe_source(SourceSpec("camera", "cam", {"device": str(tmp_path / "no-camera")}),
                         attempts=2, first_wait_s=0.05)
    assert "attempt 1 of 2" in caplog.text


def test_probe_accepts_a_camera_that_delivers_a_frame(video_file):
    # cv2.VideoCapture opens a file like a device: a real capture, no camera needed.
    info = probe_source(SourceSpec("camera", "cam", {"device": str(video_file)}))
    assert info.frame_shape == (48, 64, 3)
