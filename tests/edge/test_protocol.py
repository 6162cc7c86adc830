"""The wire format: round trips, zero-copy, clear errors, and the drop-policy queues."""

from __future__ import annotations

import logging
import queue
import threading

import msgpack
import numpy as np
import pytest
import zmq

from edge import protocol
from edge.protocol import (
    PROTOCOL_VERSION,
    DropPolicy,
    EndOfStream,
    Frame,
    Heartbeat,
    LatestQueue,
    ProtocolError,
)


def make_image(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def test_protocol_round_trips_frame_when_image_is_gray():
    frame = Frame("cam1", 7, 1700000000.25, 123456789, make_image((48, 64)))
    decoded = protocol.decode(protocol.encode(frame))
    assert isinstance(decoded, Frame)
    assert decoded.image.shape == (48, 64)
    np.testing.assert_array_equal(decoded.image, frame.image)
    assert (decoded.source_id, decoded.seq, decoded.wall_time, decoded.mono_ns) == \
        ("cam1", 7, 1700000000.25, 123456789)
    assert (decoded.part_id, decoded.encoder, decoded.truth) == (None, None, None)


def test_protocol_round_trips_frame_when_image_is_colour_with_line_fields():
    frame = Frame("line-a", 3, 1.5, 99, make_image((32, 40, 3)), part_id=12, encoder=300, truth=1)
    decoded = protocol.decode(protocol.encode(frame))
    np.testing.assert_array_equal(decoded.image, frame.image)
    assert decoded.image.dtype == np.uint8
    assert (decoded.part_id, decoded.encoder, decoded.truth) == (12, 300, 1)


def test_protocol_round_trips_eos_and_heartbeat():
    eos = EndOfStream("cam1", 19, "end of file")
    beat = Heartbeat("cam1", 19, 555, frames_sent=20, frames_dropped=2)
    assert protocol.decode(protocol.encode(eos)) == eos
    assert protocol.decode(protocol.encode(beat)) == beat
    assert len(protocol.encode(eos)) == 1 and len(protocol.encode(beat)) == 1


def test_encode_shares_pixel_memory_when_image_is_contiguous():
    image = make_image((30, 20, 3))
    parts = protocol.encode(Frame("cam1", 0, 0.0, 0, image))
    assert np.shares_memory(np.frombuffer(parts[1], dtype=np.uint8), image)


def test_encode_sends_the_visible_pixels_when_image_is_a_non_contiguous_view():
    big = make_image((40, 40, 3))
    view = big[5:25, 10:30]            # a crop: not C-contiguous
    decoded = protocol.decode(protocol.encode(Frame("cam1", 0, 0.0, 0, view)))
    np.testing.assert_array_equal(decoded.image, view)


def test_decode_raises_protocol_error_when_version_differs():
    parts = protocol.encode(EndOfStream("cam1", 0, "stopped"))
    header = msgpack.unpackb(parts[0])
    header["v"] = PROTOCOL_VERSION + 1
    with pytest.raises(ProtocolError, match=rf"received protocol version {PROTOCOL_VERSION + 1}.*"
                                            rf"supports version {PROTOCOL_VERSION}"):
        protocol.decode([msgpack.packb(header)])


def test_decode_raises_protocol_error_when_shape_disagrees_with_buffer():
    parts = protocol.encode(Frame("cam1", 0, 0.0, 0, make_image((10, 10, 3))))
    header = msgpack.unpackb(parts[0])
    header["shape"] = [10, 12, 3]
    with pytest.raises(ProtocolError, match=r"needs 360 bytes but the pixel part has 300"):
        protocol.decode([msgpack.packb(header), parts[1]])


def test_decode_raises_protocol_error_when_kind_is_unknown_or_header_is_garbage():
    with pytest.raises(ProtocolError, match="unknown message kind 'photo'"):
        protocol.decode([msgpack.packb({"v": PROTOCOL_VERSION, "kind": "photo"})])
    with pytest.raises(ProtocolError, match="not valid msgpack"):
        protocol.decode([b"\xc1"])
    with pytest.raises(ProtocolError, match="must have 2 part"):
        protocol.decode(protocol.encode(Frame("cam1", 0, 0.0, 0, make_image((4, 4))))[:1])


def test_frame_rejects_image_when_dtype_or_channels_are_wrong():
    with pytest.raises(ProtocolError, match="carries only uint8"):
        Frame("cam1", 0, 0.0, 0, np.zeros((4, 4, 3), np.float32))
    with pytest.raises(ProtocolError, match=r"expected \(H, W\) gray or \(H, W, 3\) BGR"):
        Frame("cam1", 0, 0.0, 0, np.zeros((4, 4, 4), np.uint8))


def test_send_recv_delivers_a_read_only_zero_copy_frame_over_ipc(tmp_path):
    endpoint = protocol.default_endpoint("frames", tmp_path)
    context = zmq.Context()
    pull = context.socket(zmq.PULL)
    push = context.socket(zmq.PUSH)
    try:
        pull.bind(endpoint)
        push.connect(endpoint)
        image = make_image((240, 320, 3))          # above pyzmq's copy threshold
        protocol.send(push, Frame("cam1", 5, 2.0, 3, image, encoder=500))
        assert pull.poll(2000), "nothing arrived on the PULL socket within 2 s"
        received = protocol.recv(pull)
        np.testing.assert_array_equal(received.image, image)
        assert received.encoder == 500
        # A view on the received zmq.Frame, not a private copy, and closed to writing.
        owner = received.image
        while not isinstance(owner, memoryview):
            owner = owner.base
        assert isinstance(owner.obj, zmq.Frame)
        assert not received.image.flags.writeable
    finally:
        push.close(linger=0)
        pull.close(linger=0)
        context.term()


def test_default_endpoint_is_ipc_under_run_dir_and_refuses_overlong_paths(tmp_path):
    assert protocol.default_endpoint("worker", tmp_path) == f"ipc://{tmp_path}/worker.sock"
    with pytest.raises(ValueError, match="107-byte limit"):
        protocol.default_endpoint("worker", tmp_path / ("x" * 120))


def test_latest_queue_drops_oldest_and_counts_when_overloaded():
    q = LatestQueue(maxsize=3, name="cam1")
    for i in range(10):
        q.put(i)
    assert q.dropped == 7
    assert [q.get(timeout=0.1) for _ in range(3)] == [7, 8, 9]
    with pytest.raises(queue.Empty):
        q.get(timeout=0.01)


def test_latest_queue_logs_drops_rate_limited_when_overloaded(caplog):
    q = LatestQueue(maxsize=2, name="cam1", log_every_s=60.0)
    with caplog.at_level(logging.WARNING, logger="edge.backpressure"):
        for i in range(500):
            q.put(i)
    drop_lines = [r for r in caplog.records if "dropped" in r.getMessage()]
    assert q.dropped == 498
    assert len(drop_lines) == 1, "drops must be summarised, not logged once per frame"


def test_latest_queue_wakes_a_waiting_getter_when_an_item_arrives():
    q = LatestQueue(maxsize=2)
    threading.Timer(0.05, q.put, args=("frame",)).start()
    assert q.get(timeout=2.0) == "frame"


def test_make_queue_returns_the_policy_queue_when_given_name_or_enum():
    blocking = protocol.make_queue("every_frame", 2)
    assert isinstance(blocking, queue.Queue)
    blocking.put(1)
    blocking.put(2)
    with pytest.raises(queue.Full):         # full: the reader must wait, nothing dropped
        blocking.put(3, timeout=0.01)
    assert isinstance(protocol.make_queue(DropPolicy.LATEST, 2), LatestQueue)
    with pytest.raises(ValueError):
        protocol.make_queue("newest", 2)
