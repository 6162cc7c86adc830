"""CameraSource reconnects against real failing targets: a missing file that appears later,
and a stream that ends (a video file read to its end stands in for a camera that drops)."""

from __future__ import annotations

import itertools
import os
import threading
import time

import pytest

from camera_sources.camera import CameraSource, backoff_delays


def test_backoff_delays_double_until_the_cap():
    assert list(itertools.islice(backoff_delays(0.5, 8.0), 7)) == [0.5, 1, 2, 4, 8, 8, 8]
    with pytest.raises(ValueError, match="0 < first <= max"):
        CameraSource(0, reconnect_backoff=(2.0, 1.0))


def wait_until(condition, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def test_camera_source_reconnects_when_device_appears_late_and_then_drops(tmp_path, write_video,
                                                                          frame_level):
    device = tmp_path / "camera.avi"          # not there yet: the camera is unplugged
    source = CameraSource(str(device), source_id="cam1", reconnect_backoff=(0.01, 0.05))
    stop = threading.Event()
    frames = []
    reader = threading.Thread(target=lambda: frames.extend(source.frames(stop)), daemon=True)
    reader.start()
    try:
        wait_until(lambda: source.reconnects >= 3)
        assert frames == [] and source.connects == 0
        # Plug it in: written aside and renamed, so no half-written file is ever opened.
        os.replace(write_video(tmp_path / "staging.avi"), device)
        # 20 frames, then the stream ends (a drop): it must reconnect and deliver again.
        wait_until(lambda: source.connects >= 2 and len(frames) >= 30)
    finally:
        stop.set()
        reader.join(timeout=2.0)
    assert not reader.is_alive(), "the source did not stop within 2 s of the stop event"
    assert source.read_failures >= 1
    seqs = [f.seq for f in frames]
    assert seqs == list(range(len(frames))), "seq must keep counting across reconnects"
    assert [frame_level(f.image) for f in frames[18:22]] == [18, 19, 0, 1]
    assert all(f.encoder is None for f in frames)
    assert source.end_reason == "stopped"


def test_camera_source_stops_during_back_off_when_stop_is_set():
    source = CameraSource("/nonexistent/grad-edge-camera.avi", reconnect_backoff=(5.0, 10.0))
    stop = threading.Event()
    reader = threading.Thread(target=lambda: list(source.frames(stop)), daemon=True)
    reader.start()
    wait_until(lambda: source.reconnects >= 1)
    start = time.monotonic()
    stop.set()
    reader.join(timeout=2.0)
    assert not reader.is_alive()
    assert time.monotonic() - start < 1.0, "a 5 s back-off must not delay the stop"
    assert source.connects == 0
