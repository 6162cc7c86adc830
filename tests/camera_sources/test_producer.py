"""Producer over real ZeroMQ sockets: in order, heartbeats, backpressure, drops, shutdown."""

from __future__ import annotations

import multiprocessing
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import zmq

from camera_sources.base import FakeSource, SourceSpec, build_source
from camera_sources.producer import Producer, run_producer
from edge import protocol
from edge.protocol import EndOfStream, Frame, Heartbeat

# Spawned, not forked: the way a supervisor starts producers, and no inherited sockets.
spawn = multiprocessing.get_context("spawn")


@pytest.fixture
def pull(tmp_path, request):
    """A PULL socket bound on ipc:// in tmp_path, like the worker's; yields (socket, endpoint).

    ``@pytest.mark.parametrize("pull", [n], indirect=True)`` sets its RCVHWM to n.
    """
    context = zmq.Context()
    socket = context.socket(zmq.PULL)
    socket.setsockopt(zmq.RCVHWM, getattr(request, "param", 1000))
    endpoint = protocol.default_endpoint("worker", tmp_path)
    socket.bind(endpoint)
    yield socket, endpoint
    socket.close(linger=0)
    context.term()


# A tiny receive pipe: the worker stops reading and backpressure reaches the producer quickly.
stalling_consumer = pytest.mark.parametrize("pull", [1], indirect=True)


def receive_until_eos(socket: zmq.Socket, timeout_s: float = 15.0, delay_s: float = 0.0):
    """Every message up to and including the EndOfStream; fails after timeout_s."""
    messages = []
    deadline = time.monotonic() + timeout_s
    while True:
        remaining_ms = int((deadline - time.monotonic()) * 1000)
        assert remaining_ms > 0 and socket.poll(remaining_ms), \
            f"no EndOfStream within {timeout_s} s; got {len(messages)} messages"
        message = protocol.recv(socket)
        messages.append(message)
        if isinstance(message, EndOfStream):
            return messages
        if isinstance(message, Frame):
            time.sleep(delay_s)


def frames_of(messages):
    return [m for m in messages if isinstance(m, Frame)]


def ended(message, source_id: str, last_seq: int, reason: str) -> EndOfStream:
    """The message, asserted to be the EndOfStream named, with counters that add up."""
    assert isinstance(message, EndOfStream), message
    assert (message.source_id, message.last_seq, message.reason) == (source_id, last_seq, reason)
    assert message.frames_captured == (message.frames_sent + message.frames_dropped
                                       + message.frames_unsent), message
    return message


def start_in_thread(producer: Producer, stop: threading.Event):
    results = []
    thread = threading.Thread(target=lambda: results.append(producer.run(stop)), daemon=True)
    thread.start()
    return thread, results


@stalling_consumer
def test_producer_process_delivers_every_frame_in_order_then_eos_when_pushing_a_video(
        pull, video_file, frame_level):
    socket, endpoint = pull
    stop = spawn.Event()
    spec = SourceSpec("video", "cam1", {"path": str(video_file), "pace": "fast"})
    process = spawn.Process(target=run_producer, args=(spec, endpoint, stop), daemon=True)
    process.start()
    try:
        messages = receive_until_eos(socket, delay_s=0.01)
        # It waits for the stop after a natural end, so no tail is lost in socket buffers.
        time.sleep(0.2)
        assert process.is_alive(), "the producer exited before being told to stop"
    finally:
        stop.set()
        process.join(timeout=5)
    frames = frames_of(messages)
    assert [f.seq for f in frames] == list(range(20))
    assert [frame_level(f.image) for f in frames] == list(range(20))
    assert [f.encoder for f in frames[:3]] == [0, 100, 200]
    eos = ended(messages[-1], "cam1", 19, "end of file")
    assert (eos.frames_captured, eos.frames_sent, eos.frames_unsent) == (20, 20, 0)
    # run_producer without a run id: one fresh token, on every message.
    assert len({m.run_id for m in messages}) == 1
    assert protocol.check_run_id(messages[0].run_id)
    assert process.exitcode == 0


def test_producer_process_sends_eos_when_stopped_by_event_or_sigterm(pull):
    socket, endpoint = pull
    spec = SourceSpec("synthetic", "line", {"size": (64, 64), "fps": 50.0})
    for how in ("event", "sigterm"):
        stop = spawn.Event()
        process = spawn.Process(target=run_producer, args=(spec, endpoint, stop), daemon=True)
        process.start()
        try:
            assert socket.poll(15000), "the producer process sent nothing within 15 s"
            messages = [protocol.recv(socket) for _ in range(5)]
            stop.set() if how == "event" else process.terminate()
            messages += receive_until_eos(socket)
        finally:
            process.join(timeout=10)
        assert messages[-1].reason == "stopped", how
        assert messages[-1].last_seq == max(f.seq for f in frames_of(messages)), how
        assert process.exitcode == 0, f"{how}: producer exited with {process.exitcode}"


def test_producer_sends_heartbeats_when_the_source_is_idle(pull):
    socket, endpoint = pull
    producer = Producer(FakeSource([], source_id="idle", hold_open=True), endpoint,
                        heartbeat_s=0.1)
    stop = threading.Event()
    thread, results = start_in_thread(producer, stop)
    beats = []
    deadline = time.monotonic() + 0.55
    while time.monotonic() < deadline:
        if socket.poll(50):
            beats.append(protocol.recv(socket))
    stop.set()
    messages = receive_until_eos(socket)
    thread.join(timeout=5)
    assert len(beats) >= 4 and all(isinstance(b, Heartbeat) for b in beats), beats
    assert beats[-1].frames_sent == beats[-1].frames_captured == 0 and beats[-1].seq == -1
    assert [b.mono_ns for b in beats] == sorted(b.mono_ns for b in beats)
    assert ended(messages[-1], "idle", -1, "stopped").frames_captured == 0
    assert results[0].eos_delivered


@stalling_consumer
def test_producer_loses_nothing_and_waits_when_the_consumer_is_slow_and_policy_every_frame(pull):
    socket, endpoint = pull
    images = [np.full((240, 320, 3), i, np.uint8) for i in range(30)]   # ~230 kB each
    producer = Producer(FakeSource(images, source_id="cam1"), endpoint, policy="every_frame")
    stop = threading.Event()
    thread, results = start_in_thread(producer, stop)
    messages = receive_until_eos(socket, delay_s=0.03)
    stop.set()
    thread.join(timeout=5)
    frames = frames_of(messages)
    assert [f.seq for f in frames] == list(range(30))
    assert [int(f.image[0, 0, 0]) for f in frames] == list(range(30))
    assert results[0].frames_dropped == 0 and results[0].frames_sent == 30
    assert results[0].frames_captured == 30 and results[0].frames_unsent == 0
    # Backpressure reached the source: it captured at the consumer's pace, not all at once.
    capture_span_s = (frames[-1].mono_ns - frames[0].mono_ns) / 1e9
    assert capture_span_s > 0.3, f"all frames captured within {capture_span_s:.3f} s"


@stalling_consumer
def test_producer_drops_oldest_and_counts_when_the_consumer_is_slow_and_policy_latest(pull):
    socket, endpoint = pull
    images = [np.full((240, 320, 3), i, np.uint8) for i in range(60)]
    producer = Producer(FakeSource(images, source_id="cam1"), endpoint, policy="latest",
                        queue_size=2)
    stop = threading.Event()
    thread, results = start_in_thread(producer, stop)
    messages = receive_until_eos(socket, delay_s=0.02)
    stop.set()
    thread.join(timeout=5)
    stats = results[0]
    seqs = [f.seq for f in frames_of(messages)]
    assert stats.frames_dropped > 0
    assert stats.frames_captured == 60 and stats.frames_unsent == 0
    assert stats.frames_sent + stats.frames_dropped == 60
    assert len(seqs) == stats.frames_sent
    assert seqs == sorted(set(seqs)) and seqs[-1] == 59, "the newest frame must never be dropped"
    eos = ended(messages[-1], "cam1", 59, "end of list")
    assert (eos.frames_sent, eos.frames_dropped) == (stats.frames_sent, stats.frames_dropped)


def test_producer_stamps_its_run_id_on_every_frame_heartbeat_and_eos(pull):
    socket, endpoint = pull
    images = [np.full((8, 8), i, np.uint8) for i in range(5)]
    producer = Producer(FakeSource(images, source_id="cam1"), endpoint, run_id="run-A_1")
    stop = threading.Event()
    thread, results = start_in_thread(producer, stop)
    messages = receive_until_eos(socket)
    stop.set()
    thread.join(timeout=5)
    kinds = {type(m) for m in messages}
    assert kinds == {Frame, Heartbeat, EndOfStream}
    assert {m.run_id for m in messages} == {"run-A_1"} == {results[0].run_id}


def test_producer_refuses_to_start_when_source_id_or_run_id_is_unsafe(pull):
    _, endpoint = pull
    with pytest.raises(ValueError, match=r"source '\.\./etc'.*source_id '\.\./etc'"):
        Producer(FakeSource([], source_id="../etc"), endpoint)
    with pytest.raises(ValueError, match=r"source 'cam1'.*run token 'run one'"):
        Producer(FakeSource([], source_id="cam1"), endpoint, run_id="run one")


def test_producer_counts_a_frame_the_wire_refuses_as_dropped_and_keeps_sending(pull, caplog):
    socket, endpoint = pull
    images = [np.full((8, 8), i, np.uint8) for i in range(6)]
    truths = [0, 2, 1, 7, 0, 1]          # a buggy source: truth must be 0, 1 or nil
    producer = Producer(FakeSource(images, source_id="cam1", truths=truths), endpoint)
    stop = threading.Event()
    with caplog.at_level("ERROR", logger="camera_sources.producer"):
        thread, results = start_in_thread(producer, stop)
        messages = receive_until_eos(socket)
        stop.set()
        thread.join(timeout=5)
    assert [f.seq for f in frames_of(messages)] == [0, 2, 4, 5]
    eos = ended(messages[-1], "cam1", 5, "end of list")
    assert (eos.frames_captured, eos.frames_sent, eos.frames_dropped) == (6, 4, 2)
    refusals = [r for r in caplog.records if "the wire refuses" in r.getMessage()]
    assert len(refusals) == 1 and "truth must be 0, 1 or nil" in refusals[0].getMessage()


@stalling_consumer
def test_producer_accounts_for_every_captured_frame_when_stopped_while_the_consumer_stalls(
        pull):
    socket, endpoint = pull
    images = [np.full((240, 320, 3), i % 256, np.uint8) for i in range(200)]
    producer = Producer(FakeSource(images, source_id="cam1"), endpoint, policy="every_frame",
                        queue_size=4, stop_timeout_s=5.0)
    stop = threading.Event()
    thread, results = start_in_thread(producer, stop)
    # Read a few frames, then stop reading: the producer blocks with frames queued.
    first = [protocol.recv(socket) for _ in range(3) if socket.poll(5000)]
    time.sleep(0.5)
    stop.set()
    messages = first + receive_until_eos(socket)
    thread.join(timeout=10)
    stats = results[0]
    eos = ended(messages[-1], "cam1", stats.last_seq, "stopped")
    assert stats.eos_delivered and eos.frames_unsent > 0
    assert eos.frames_captured == stats.frames_captured < 200
    # Every frame handed to ZeroMQ arrived, in order; the rest are counted as unsent.
    assert [f.seq for f in frames_of(messages)] == list(range(stats.frames_sent))
    assert (eos.frames_sent, eos.frames_dropped, eos.frames_unsent) == (
        stats.frames_sent, 0, stats.frames_unsent)
    for beat in (m for m in messages if isinstance(m, Heartbeat)):
        assert beat.frames_captured >= beat.frames_sent + beat.frames_dropped + beat.frames_unsent


def test_build_source_names_the_choices_when_kind_is_unknown():
    with pytest.raises(ValueError, match=r"unknown source kind 'webcam'.*'synthetic'"):
        build_source(SourceSpec("webcam", "cam1"))
    assert build_source(SourceSpec("fake", "f", {"images": []})).source_id == "f"


def test_camera_sources_load_without_torch_when_imported_in_a_fresh_process():
    # Producers run as their own processes on small machines: they import the wire format
    # and never the model stack.
    code = ("import sys, camera_sources.base, camera_sources.producer, camera_sources.video, camera_sources.camera, "
            "camera_sources.folder, camera_sources.synthetic; "
            "print(sorted(m for m in ('torch', 'trainer', 'deploy', 'grad') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60, check=True)
    assert result.stdout.strip() == "[]", result.stdout + result.stderr
