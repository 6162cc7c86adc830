"""VideoFileSource on real MJPG files written by OpenCV."""

from __future__ import annotations

import threading
import time

import pytest

from camera_sources.video import VideoFileSource


def test_video_source_yields_every_frame_with_encoder_when_pace_fast(video_file, frame_level):
    source = VideoFileSource(video_file, source_id="cam1", pace="fast", counts_per_frame=250,
                             frames_per_part=4)
    frames = list(source.frames(threading.Event()))
    assert [f.seq for f in frames] == list(range(20))
    assert [frame_level(f.image) for f in frames] == list(range(20))
    assert [f.encoder for f in frames[:3]] == [0, 250, 500]
    assert [f.part_id for f in frames[:6]] == [0, 0, 0, 0, 1, 1]
    assert frames[0].image.shape == (48, 64, 3)
    assert source.end_reason == "end of file"
    assert len(list(source.frames(threading.Event()))) == 20, "a second pass starts over"
    source.close()


def test_video_source_skips_and_counts_corrupt_frame_when_mid_file(tmp_path, write_video,
                                                                   frame_level):
    path = write_video(tmp_path / "corrupt.avi")
    data = bytearray(path.read_bytes())
    # Wipe frame 10's JPEG (from its start-of-image marker to the next one).
    starts = [i for i in range(len(data) - 1) if data[i] == 0xFF and data[i + 1] == 0xD8]
    assert len(starts) == 20
    data[starts[10]:starts[11] - 8] = bytes(starts[11] - 8 - starts[10])
    path.write_bytes(data)

    source = VideoFileSource(path, source_id="cam1", pace="fast")
    frames = list(source.frames(threading.Event()))
    assert source.corrupt_frames == 1
    assert [f.seq for f in frames] == [s for s in range(20) if s != 10]
    assert [frame_level(f.image) for f in frames] == [s for s in range(20) if s != 10]


def test_video_source_raises_a_clear_error_when_file_is_missing_or_not_a_video(tmp_path,
                                                                               write_video):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        VideoFileSource(tmp_path / "nope.avi")
    text = tmp_path / "notes.avi"
    text.write_text("not a video")
    with pytest.raises(ValueError, match="cannot open video"):
        VideoFileSource(text)
    with pytest.raises(ValueError, match="needs fps"):
        VideoFileSource(write_video(tmp_path / "ok.avi"), pace="fixed")


def test_video_source_keeps_counting_seq_when_looping(video_file, frame_level):
    source = VideoFileSource(video_file, pace="fast", loop=True)
    stop = threading.Event()
    frames = []
    for frame in source.frames(stop):
        frames.append(frame)
        if len(frames) == 45:
            stop.set()
    assert [f.seq for f in frames] == list(range(45))
    assert [frame_level(f.image) for f in frames[18:23]] == [18, 19, 0, 1, 2]
    assert source.end_reason == "stopped"


def test_video_source_paces_at_the_files_fps_when_pace_file(tmp_path, write_video):
    path = write_video(tmp_path / "slow.avi", n_frames=6, fps=25.0)
    start = time.monotonic()
    frames = list(VideoFileSource(path, pace="file").frames(threading.Event()))
    elapsed = time.monotonic() - start
    assert len(frames) == 6
    assert elapsed >= 5 / 25.0 * 0.9, f"6 frames at 25 fps took only {elapsed:.3f} s"


def test_video_source_stops_promptly_when_stop_is_set_while_pacing(video_file):
    source = VideoFileSource(video_file, pace="fixed", fps=0.2)   # 5 s between frames
    stop = threading.Event()
    frames = source.frames(stop)
    next(frames)
    threading.Timer(0.1, stop.set).start()
    start = time.monotonic()
    assert list(frames) == []
    assert time.monotonic() - start < 1.0
    assert source.end_reason == "stopped"


def test_video_source_fails_instead_of_ending_when_the_file_breaks_off_mid_way(tmp_path,
                                                                                write_video):
    from camera_sources.video import VideoReadError

    path = write_video(tmp_path / "cut.avi", n_frames=40)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])      # a copy cut off half way: 40 frames announced
    source = VideoFileSource(path, pace="fast")
    read = []
    with pytest.raises(VideoReadError, match="unreadable from frame .* of 40"):
        for frame in source.frames(threading.Event()):
            read.append(frame.seq)
    assert 0 < len(read) < 40
