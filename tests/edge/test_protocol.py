"""The wire format: round trips, zero-copy, every field checked, clear errors, endpoints, and
the drop-policy queues."""

from __future__ import annotations

import logging
import os
import queue
import signal
import subprocess
import sys
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
    Hello,
    LatestQueue,
    ProtocolError,
    RingFrame,
    RingOffer,
    RingReply,
    Welcome,
)

RUN = "0123abcd0123abcd"
HUGE = 2 ** 64 - 1                      # the largest int msgpack carries: over int64
NAN, INF = float("nan"), float("inf")


def make_image(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def eos(**kw) -> EndOfStream:
    fields = dict(source_id="cam1", last_seq=19, reason="end of file", frames_captured=22,
                  frames_sent=20, frames_dropped=2, frames_unsent=0)
    return EndOfStream(**{**fields, **kw})


def beat(**kw) -> Heartbeat:
    fields = dict(source_id="cam1", seq=19, mono_ns=555, frames_captured=23, frames_sent=20,
                  frames_dropped=2, frames_unsent=0)
    return Heartbeat(**{**fields, **kw})


def header_of(parts: list) -> dict:
    return msgpack.unpackb(parts[0])


# --- round trips (version 2) -------------------------------------------------------------------

def test_protocol_round_trips_frame_when_image_is_gray():
    frame = Frame("cam1", 7, 1700000000.25, 123456789, make_image((48, 64)))
    decoded = protocol.decode(protocol.encode(frame, RUN))
    assert isinstance(decoded, Frame)
    assert decoded.image.shape == (48, 64)
    np.testing.assert_array_equal(decoded.image, frame.image)
    assert (decoded.source_id, decoded.seq, decoded.wall_time, decoded.mono_ns, decoded.run_id) \
        == ("cam1", 7, 1700000000.25, 123456789, RUN)
    assert (decoded.part_id, decoded.encoder, decoded.truth) == (None, None, None)


def test_protocol_round_trips_frame_when_image_is_colour_with_line_fields():
    frame = Frame("line-a", 3, 1.5, 99, make_image((32, 40, 3)), part_id=12, encoder=-300,
                  truth=1, run_id=RUN)
    decoded = protocol.decode(protocol.encode(frame))
    np.testing.assert_array_equal(decoded.image, frame.image)
    assert decoded.image.dtype == np.uint8
    assert (decoded.part_id, decoded.encoder, decoded.truth) == (12, -300, 1)
    assert header_of(protocol.encode(frame))["v"] == PROTOCOL_VERSION == 3


def test_protocol_round_trips_eos_and_heartbeat_with_run_and_every_counter():
    for message in (eos(run_id=RUN), beat(run_id=RUN), eos(last_seq=-1, run_id=RUN),
                    beat(seq=-1, frames_captured=0, frames_sent=0, frames_dropped=0,
                         run_id=RUN)):
        parts = protocol.encode(message)
        assert len(parts) == 1
        assert protocol.decode(parts) == message
    assert sorted(header_of(protocol.encode(beat(), RUN))) == sorted(
        ["v", "kind", "run", "source_id", "seq", "mono_ns", "producer", "frames_captured",
         "frames_sent", "frames_dropped", "frames_unsent"])
    assert protocol.decode(protocol.encode(beat(producer="life-1"), RUN)).producer == "life-1"


def test_decode_gives_plain_python_types_when_the_source_used_numpy_scalars():
    frame = Frame("cam1", np.int64(4), np.float32(2.5), np.uint64(9), make_image((4, 4)),
                  part_id=np.int32(1), encoder=np.int64(400), truth=np.uint8(0))
    decoded = protocol.decode(protocol.encode(frame, RUN))
    values = (decoded.seq, decoded.mono_ns, decoded.part_id, decoded.encoder, decoded.truth)
    assert values == (4, 9, 1, 400, 0)
    assert all(type(v) is int for v in values) and type(decoded.wall_time) is float


def test_decode_reads_an_int_wall_time_as_a_float():
    header = header_of(protocol.encode(Frame("cam1", 0, 0.0, 0, make_image((2, 2))), RUN))
    header["wall_time"] = 1700000000
    decoded = protocol.decode([msgpack.packb(header), bytes(4)])
    assert decoded.wall_time == 1700000000.0 and type(decoded.wall_time) is float


def test_encode_shares_pixel_memory_when_image_is_contiguous():
    image = make_image((30, 20, 3))
    parts = protocol.encode(Frame("cam1", 0, 0.0, 0, image), RUN)
    assert np.shares_memory(np.frombuffer(parts[1], dtype=np.uint8), image)


def test_encode_sends_the_visible_pixels_when_image_is_a_non_contiguous_view():
    big = make_image((40, 40, 3))
    view = big[5:25, 10:30]            # a crop: not C-contiguous
    decoded = protocol.decode(protocol.encode(Frame("cam1", 0, 0.0, 0, view), RUN))
    np.testing.assert_array_equal(decoded.image, view)


def test_send_recv_delivers_a_read_only_zero_copy_frame_over_ipc(tmp_path):
    endpoint = protocol.default_endpoint("frames", tmp_path)
    context = zmq.Context()
    pull = context.socket(zmq.PULL)
    push = context.socket(zmq.PUSH)
    try:
        pull.bind(endpoint)
        push.connect(endpoint)
        image = make_image((240, 320, 3))          # above pyzmq's copy threshold
        protocol.send(push, Frame("cam1", 5, 2.0, 3, image, encoder=500), run_id=RUN)
        assert pull.poll(2000), "nothing arrived on the PULL socket within 2 s"
        received = protocol.recv(pull)
        np.testing.assert_array_equal(received.image, image)
        assert received.encoder == 500 and received.run_id == RUN
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


# --- what encode refuses -----------------------------------------------------------------------

def test_encode_refuses_a_message_when_it_has_no_run_token():
    with pytest.raises(ProtocolError, match="has no run token; pass run_id="):
        protocol.encode(eos())
    with pytest.raises(ProtocolError, match="run token 'a/b'"):
        protocol.encode(eos(), run_id="a/b")


def test_encode_refuses_what_decode_would_refuse_when_a_source_builds_a_bad_frame():
    image = make_image((4, 4))
    for bad, field in ((dict(seq=-1), "seq"), (dict(truth=2), "truth"),
                       (dict(source_id="../etc"), "source_id"), (dict(wall_time=NAN), "wall_time"),
                       (dict(mono_ns=True), "mono_ns"), (dict(part_id="7"), "part_id")):
        frame = Frame(**{**dict(source_id="cam1", seq=0, wall_time=0.0, mono_ns=0,
                                image=image), **bad})
        with pytest.raises(ProtocolError, match=field):
            protocol.encode(frame, RUN)
    with pytest.raises(ProtocolError, match="reason"):
        protocol.encode(eos(reason="two\nlines"), RUN)


def test_frame_rejects_image_when_dtype_or_channels_are_wrong():
    with pytest.raises(ProtocolError, match="carries only uint8"):
        Frame("cam1", 0, 0.0, 0, np.zeros((4, 4, 3), np.float32))
    with pytest.raises(ProtocolError, match=r"expected \(H, W\) gray or \(H, W, 3\) BGR"):
        Frame("cam1", 0, 0.0, 0, np.zeros((4, 4, 4), np.uint8))


def test_clean_reason_makes_one_printable_line_of_at_most_256_chars():
    assert protocol.clean_reason("source error: OSError:\n  bad\tthing\x00") == \
        "source error: OSError: bad thing"
    long = protocol.clean_reason("x" * 1000)
    assert len(long) == protocol.MAX_REASON_CHARS and long.endswith("...")
    protocol.encode(eos(reason=long), RUN)          # accepted as is


# --- what decode refuses: every field, every wrong type ----------------------------------------

def valid_header(kind: str) -> tuple[dict, list]:
    """A valid header of `kind` and the parts after it."""
    message = {"frame": Frame("cam1", 3, 1.5, 99, make_image((4, 4, 3)), part_id=1,
                              encoder=2, truth=0),
               "ring_frame": RingFrame("cam1", 3, 1.5, 99, (4, 4, 3), ring="r1", slot=2),
               "eos": eos(producer="p1"), "heartbeat": beat(),
               "hello": Hello("cam1", 5),
               "welcome": Welcome("cam1", "running", 5601, 7, 5),
               "ring": RingOffer("cam1", "r1", 4, 4096),
               "ring_reply": RingReply("r1", "")}[kind]
    parts = protocol.encode(message, RUN)
    return header_of(parts), parts[1:]


GARBAGE = [[1], {"a": 1}, b"\x01", msgpack.ExtType(5, b"x")]
COUNTER_BAD = [-1, True, 1.0, "3", None, HUGE, NAN, *GARBAGE]
NULLABLE_INT_BAD = [True, False, 1.0, "1", HUGE, NAN, *GARBAGE]
BAD_VALUES = {
    "run": ["", "a/b", "x" * 65, "run 1", "rün", "run\n", 7, None, True, *GARBAGE],
    "source_id": ["", ".", "..", "a/b", "../etc", "x" * 65, "a b", "a;b", "cam\n", "café", 3,
                  None, True, *GARBAGE],
    "frame.seq": [-1, True, 1.0, "1", None, HUGE, NAN, *GARBAGE],
    "heartbeat.seq": [-2, True, 1.0, "1", None, HUGE, *GARBAGE],
    "last_seq": [-2, False, 0.0, "0", None, HUGE, *GARBAGE],
    "wall_time": [NAN, INF, -INF, -1.0, 1e300, True, "1.0", None, *GARBAGE],
    "mono_ns": [-1, True, 1.5, "5", None, HUGE, NAN, *GARBAGE],
    "part_id": NULLABLE_INT_BAD,
    "encoder": NULLABLE_INT_BAD,
    "truth": [2, -1, True, False, 1.0, "1", NAN, *GARBAGE],
    "dtype": ["float32", "", 8, None, ["uint8"], b"uint8", {"uint8": 1}],
    "shape": [[0, 4], [4], [4, 4, 4], [4, 4, 1], [4.0, 4, 3], [True, 4, 3], [-4, -4],
              "4x4", None, [[4], 4, 3], {"h": 4}, [2 ** 31, 1], [HUGE, HUGE], [4, 4, 3, 1]],
    "reason": ["x" * 257, "line\nbreak", "nul\x00", 5, None, True, *GARBAGE],
    "error": ["x" * 257, "line\nbreak", 5, None, True, *GARBAGE],
    "producer": ["", "a/b", "x" * 65, 7, True, *GARBAGE],
    "ring": ["", "a/b", "x" * 65, 7, None, True, *GARBAGE],
    "slot": [-1, 1024, True, 1.0, "1", None, *GARBAGE],
    "slots": [0, 1025, True, 1.0, None, *GARBAGE],
    "slot_bytes": [0, -1, 2 ** 34 + 1, True, 1.0, None, *GARBAGE],
    "state": ["", "RUNNING", "gone", 1, None, True, *GARBAGE],
    "port": [-1, 65536, True, 1.0, "5601", None, *GARBAGE],
    "echo_ns": [-1, True, 1.5, None, HUGE, *GARBAGE],
    **{key: COUNTER_BAD for key in ("frames_captured", "frames_sent", "frames_dropped",
                                    "frames_unsent")},
}


ALL_KINDS = frozenset(protocol._FIELDS)


def bad_field_cases():
    for kind in sorted(ALL_KINDS):
        header, _ = valid_header(kind)
        for key in header:
            if key in ("v", "kind"):
                continue
            values = BAD_VALUES.get(f"{kind.replace('ring_', '')}.{key}", BAD_VALUES.get(key))
            assert values, f"no bad values listed for {kind}.{key}"
            for i, value in enumerate(values):
                yield pytest.param(kind, key, value, id=f"{kind}-{key}-{i}")


@pytest.mark.parametrize("kind, key, value", list(bad_field_cases()))
def test_decode_raises_protocol_error_naming_the_field_when_a_field_is_wrong(kind, key, value):
    header, rest = valid_header(kind)
    header[key] = value
    with pytest.raises(ProtocolError, match=key):
        protocol.decode([msgpack.packb(header), *rest], expect=ALL_KINDS)


def test_decode_accepts_the_boundary_values_of_every_range():
    header, rest = valid_header("frame")
    for key, value in (("seq", 0), ("seq", 2 ** 63 - 1), ("part_id", -(2 ** 63)),
                       ("encoder", 2 ** 63 - 1), ("truth", None), ("truth", 1),
                       ("wall_time", 0.0), ("source_id", "a" * 64), ("run", "R" * 64),
                       ("source_id", "cam_1.left-2"), ("run", "-_-")):
        decoded = protocol.decode([msgpack.packb({**header, key: value}), *rest])
        field = {"run": "run_id"}.get(key, key)
        assert getattr(decoded, field) == value
    header, _ = valid_header("eos")
    assert protocol.decode([msgpack.packb({**header, "reason": ""})]).reason == ""


@pytest.mark.parametrize("version", [1, 2, 4, None, True, 3.0, "3", [3], {"v": 3}, HUGE])
def test_decode_raises_protocol_error_when_version_is_not_exactly_3(version):
    header, rest = valid_header("heartbeat")
    header["v"] = version
    with pytest.raises(ProtocolError, match=r"received protocol version .* supports version 3"):
        protocol.decode([msgpack.packb(header), *rest])


def test_decode_refuses_a_version_1_message_as_the_old_encoder_made_it():
    v1 = {"v": 1, "kind": "heartbeat", "source_id": "cam1", "seq": 3, "mono_ns": 5,
          "frames_sent": 4, "frames_dropped": 0}
    with pytest.raises(ProtocolError, match="received protocol version 1"):
        protocol.decode([msgpack.packb(v1)])


@pytest.mark.parametrize("kind", ["photo", "", None, 3, True, ["frame"], {"frame": 1}, b"eos"])
def test_decode_raises_protocol_error_when_kind_is_unknown_or_unhashable(kind):
    with pytest.raises(ProtocolError, match="unknown message kind"):
        protocol.decode([msgpack.packb({"v": PROTOCOL_VERSION, "kind": kind})])


def test_decode_raises_protocol_error_when_header_is_not_a_msgpack_map_of_strings():
    cases = {
        b"\xc1": "not valid msgpack",                       # a reserved byte
        b"": "not valid msgpack",
        msgpack.packb([1, 2]): "must be a msgpack map",
        msgpack.packb(7): "must be a msgpack map",
        b"\x81\x91\x01\x01": "not valid msgpack",           # {[1]: 1}: an unhashable key
        b"\x81\x80\x01": "not valid msgpack",               # {{}: 1}
        b"\x81\x01\x01": "not valid msgpack",               # {1: 1}
        b"\x91" * 3000 + b"\x01": "not valid msgpack",      # nested past msgpack's stack
        b"\x82\xa1v\x02\xa1v\x02": "not valid msgpack",     # "v" twice
        msgpack.packb({"v": 2}) + b"\x00": "not valid msgpack",    # trailing bytes
        b"\xa2\xff\xfe": "not valid msgpack",                # a str that is not UTF-8
        msgpack.packb({"r": "x" * 5000}): "over the 4096-byte limit",
    }
    for raw, message in cases.items():
        with pytest.raises(ProtocolError, match=message):
            protocol.decode([raw])


def test_decode_raises_protocol_error_when_a_key_is_unknown_duplicated_or_missing():
    header, rest = valid_header("frame")
    with pytest.raises(ProtocolError, match=r"unknown key\(s\) 'colour'"):
        protocol.decode([msgpack.packb({**header, "colour": "red"}), *rest])
    with pytest.raises(ProtocolError, match=r"unknown key\(s\) b'seq'"):
        protocol.decode([msgpack.packb({**header, b"seq": 1}), *rest])
    twice = msgpack.Packer().pack_map_pairs([*header.items(), ("seq", 4)])
    with pytest.raises(ProtocolError, match="a key appears twice"):
        protocol.decode([twice, *rest])
    del header["truth"]
    with pytest.raises(ProtocolError, match=r"frame header is missing \['truth'\]"):
        protocol.decode([msgpack.packb(header), *rest])


def test_decode_raises_protocol_error_when_parts_are_missing_extra_or_not_buffers():
    header, rest = valid_header("frame")
    packed = msgpack.packb(header)
    eos_parts = protocol.encode(eos(), RUN)
    strided = np.zeros((4, 8, 3), np.uint8)[:, ::2]      # the right size, not contiguous
    cases = [
        ([], "non-empty list"), (None, "non-empty list"), ("abc", "non-empty list"),
        (b"header", "non-empty list"), ([None], "header part is not a byte buffer"),
        ([12], "header part is not a byte buffer"), (["text"], "not a byte buffer"),
        ([packed], "must have 2 part"), ([packed, *rest, b""], "must have 2 part"),
        ([*eos_parts, b"pixels"], "must have 1 part"), ([packed, None], "pixel part is not"),
        ([packed, "pixels"], "pixel part is not"), ([packed, strided], "pixel part is not"),
        ([packed, bytes(47)], "needs 48 bytes but the pixel part has 47"),
    ]
    for parts, message in cases:
        with pytest.raises(ProtocolError, match=message):
            protocol.decode(parts)


def test_decode_raises_protocol_error_when_shape_disagrees_with_buffer():
    parts = protocol.encode(Frame("cam1", 0, 0.0, 0, make_image((10, 10, 3))), RUN)
    header = header_of(parts)
    header["shape"] = [10, 12, 3]
    with pytest.raises(ProtocolError, match=r"needs 360 bytes but the pixel part has 300"):
        protocol.decode([msgpack.packb(header), parts[1]])
    header["shape"] = [2 ** 31 - 1, 2 ** 31 - 1, 3]     # no overflow into a small product
    with pytest.raises(ProtocolError, match="the pixel part has 300"):
        protocol.decode([msgpack.packb(header), parts[1]])


def test_protocol_round_trips_every_v3_kind_on_its_channel():
    ring = RingFrame("cam1", 4, 2.5, 10, (6, 8, 3), ring="ring-1", slot=3, part_id=2, run_id=RUN)
    cases = [(ring, protocol.DATA_KINDS),
             (Hello("cam1", 12), protocol.HELLO_KINDS),
             (Welcome("cam1", "stopping", 5601, 99, 12, run_id=RUN), protocol.WELCOME_KINDS),
             (RingOffer("cam1", "ring-1", 4, 6 * 8 * 3, run_id=RUN), protocol.RING_OFFER_KINDS),
             (RingReply("ring-1", "not sealed"), protocol.RING_REPLY_KINDS)]
    for message, channel in cases:
        parts = protocol.encode(message)
        assert len(parts) == 1
        assert protocol.decode(parts, expect=channel) == message
    assert ring.nbytes == 144
    assert "run" not in header_of(protocol.encode(Hello("cam1", 1)))


def test_decode_refuses_a_kind_that_does_not_belong_on_the_channel():
    hello = protocol.encode(Hello("cam1", 1))
    with pytest.raises(ProtocolError, match="a hello message does not belong on this channel"):
        protocol.decode(hello)                       # a data socket
    with pytest.raises(ProtocolError, match="a frame message does not belong"):
        protocol.decode(protocol.encode(Frame("cam1", 0, 0.0, 0, make_image((2, 2))), RUN),
                        expect=protocol.HELLO_KINDS)


def test_decode_refuses_a_ring_offer_over_the_size_limit():
    header = header_of(protocol.encode(RingOffer("cam1", "r", 4, 16, run_id=RUN)))
    header.update(slots=1024, slot_bytes=2 ** 30)
    with pytest.raises(ProtocolError, match="over the .*-byte limit of a frame ring"):
        protocol.decode([msgpack.packb(header)], expect=protocol.RING_OFFER_KINDS)


def test_ring_path_sits_beside_the_ipc_socket_and_refuses_tcp(tmp_path):
    assert protocol.ring_path("ipc:///tmp/g/src-cam1.sock") == "/tmp/g/src-cam1.ring"
    with pytest.raises(ValueError, match="needs the source on an ipc:// endpoint"):
        protocol.ring_path("tcp://127.0.0.1:5000")


# --- names and endpoints -----------------------------------------------------------------------

def test_new_run_id_is_a_fresh_valid_token_each_time():
    tokens = {protocol.new_run_id() for _ in range(100)}
    assert len(tokens) == 100
    assert all(protocol.check_run_id(t) == t and len(t) == 16 for t in tokens)


def test_default_endpoint_is_ipc_under_run_dir_and_refuses_overlong_paths(tmp_path):
    assert protocol.default_endpoint("worker", tmp_path) == f"ipc://{tmp_path}/worker.sock"
    with pytest.raises(ValueError, match="107-byte limit"):
        protocol.default_endpoint("worker", tmp_path / ("x" * 120))


def test_run_endpoint_names_source_and_run_and_refuses_unsafe_names(tmp_path):
    assert protocol.run_endpoint("cam1", RUN, tmp_path) == f"ipc://{tmp_path}/src-cam1-{RUN}.sock"
    with pytest.raises(ValueError, match="source_id '../x'"):
        protocol.run_endpoint("../x", RUN, tmp_path)
    with pytest.raises(ValueError, match="run token 'a b'"):
        protocol.run_endpoint("cam1", "a b", tmp_path)


def bind_in_a_child(endpoint: str) -> subprocess.Popen:
    """A real process listening on `endpoint`, as a worker of another run would."""
    code = ("import sys, time, zmq; s = zmq.Context().socket(zmq.PULL); s.bind(sys.argv[1]); "
            "print('bound', flush=True); time.sleep(120)")
    child = subprocess.Popen([sys.executable, "-c", code, endpoint], stdout=subprocess.PIPE,
                             text=True)
    assert child.stdout.readline().strip() == "bound"
    return child


def test_bind_replaces_a_stale_socket_file_when_its_process_was_killed(short_dir):
    endpoint = protocol.run_endpoint("cam1", RUN, short_dir)
    child = bind_in_a_child(endpoint)
    os.kill(child.pid, signal.SIGKILL)
    child.wait(10)
    assert (short_dir / f"src-cam1-{RUN}.sock").exists(), "the killed process left its socket"
    ctx = zmq.Context()
    pull, push = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    try:
        assert protocol.bind(pull, endpoint) == endpoint
        push.connect(endpoint)
        protocol.send(push, beat(), run_id=RUN)
        assert pull.poll(5000) and protocol.recv(pull) == beat(run_id=RUN)
    finally:
        push.close(0)
        pull.close(0)
        ctx.term()


def test_bind_refuses_a_socket_when_a_live_process_listens_on_it(short_dir):
    endpoint = protocol.run_endpoint("cam1", RUN, short_dir)
    child = bind_in_a_child(endpoint)
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    try:
        with pytest.raises(ValueError, match="another live process listens on that socket"):
            protocol.bind(pull, endpoint)
    finally:
        child.kill()
        child.wait(10)
        pull.close(0)
        ctx.term()


def test_bind_names_the_endpoint_when_the_path_is_a_directory(short_dir):
    (short_dir / "dir.sock").mkdir()
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    try:
        with pytest.raises(ValueError, match=r"cannot bind ipc://.*dir\.sock"):
            protocol.bind(pull, f"ipc://{short_dir}/dir.sock")
    finally:
        pull.close(0)
        ctx.term()


# --- drop-policy queues (edge.backpressure, re-exported by the protocol) -----------------------

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
