"""Reject sinks and scheduler, against real files, real ZeroMQ sockets and pymodbus's own server."""

from __future__ import annotations

import asyncio
import glob
import json
import socket
import threading
import time

import pytest
import zmq

from edge.reject import (
    FakeSink,
    GpioSink,
    JsonlSink,
    ModbusCoilSink,
    RejectEvent,
    RejectScheduler,
    RejectSinkError,
    RejectTiming,
    ZmqPubSink,
)
from edge.results import Decision, FrameResult, Verdict


def reject_event(seq: int = 7, *, source_id: str = "cam0", due_encoder: int | None = None,
                 due_time: float | None = None) -> RejectEvent:
    return RejectEvent(
        source_id=source_id, seq=seq, part_id=100 + seq, encoder=None,
        due_encoder=due_encoder, due_time=due_time, verdict="DEFECT", raw_score=3.5,
        reason="score 3.5 >= 2.5", defect_id=42,
    )


def defect_decision(seq: int, *, encoder: int | None, wall_time: float = 1000.0,
                    source_id: str = "cam0") -> Decision:
    result = FrameResult(
        source_id=source_id, seq=seq, part_id=seq, encoder=encoder, wall_time=wall_time,
        capture_mono_ns=0, frame_shape=(64, 64), raw_score=3.0, calibrated_score=2.0,
        threshold=2.5,
    )
    return Decision(result, Verdict.DEFECT, True, "score 3 >= 2.5")


# --- sinks --------------------------------------------------------------------------------


def test_jsonl_sink_appends_one_line_per_event_when_fired(tmp_path):
    path = tmp_path / "rejects" / "rejects.jsonl"
    with JsonlSink(path) as sink:
        sink.fire(reject_event(1))
        sink.fire(reject_event(2))
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [line["seq"] for line in lines] == [1, 2]
    assert lines[0]["defect_id"] == 42 and "fired_at" in lines[0]


def test_zmq_pub_sink_delivers_topic_and_json_when_sub_socket_subscribes():
    context = zmq.Context()
    sink = ZmqPubSink("tcp://127.0.0.1:*", topic=b"reject", context=context)
    sub = context.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"reject")
    sub.connect(sink.endpoint)
    try:
        # PUB drops messages until the subscription has arrived ("slow joiner"): keep firing
        # until one comes through, as a real gateway would see the next reject.
        received = None
        deadline = time.monotonic() + 5.0
        while received is None and time.monotonic() < deadline:
            sink.fire(reject_event(9))
            if sub.poll(100):
                received = sub.recv_multipart()
        assert received is not None, "SUB socket never received a reject"
        topic, payload = received
        assert topic == b"reject"
        assert json.loads(payload)["seq"] == 9
    finally:
        sub.close(0)
        sink.close()
        context.term()


def test_zmq_pub_sink_raises_clear_error_when_endpoint_is_taken():
    context = zmq.Context()
    first = ZmqPubSink("tcp://127.0.0.1:*", context=context)
    try:
        with pytest.raises(RejectSinkError, match="cannot bind"):
            ZmqPubSink(first.endpoint, context=context)
    finally:
        first.close()
        context.term()


def _free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def modbus_server():
    """pymodbus's own TCP server on loopback, in a thread; yields (port, read_coil)."""
    from pymodbus.client import ModbusTcpClient
    from pymodbus.datastore import ModbusSequentialDataBlock, ModbusServerContext
    from pymodbus.server import ModbusTcpServer
    try:
        from pymodbus.datastore import ModbusDeviceContext as DeviceContext
    except ImportError:                                  # pymodbus < 3.10
        from pymodbus.datastore import ModbusSlaveContext as DeviceContext

    port = _free_tcp_port()
    loop = asyncio.new_event_loop()
    holder: dict = {}

    async def serve():
        # Old-style blocks are 1-based: a block at address 1 serves coils 0..15.
        context = ModbusServerContext(DeviceContext(co=ModbusSequentialDataBlock(1, [False] * 16)))
        holder["server"] = ModbusTcpServer(context, address=("127.0.0.1", port))
        await holder["server"].serve_forever()

    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True)
    thread.start()

    reader = ModbusTcpClient("127.0.0.1", port=port, timeout=2)
    deadline = time.monotonic() + 5.0
    while not reader.connect():
        assert time.monotonic() < deadline, "pymodbus server did not start"
        time.sleep(0.05)

    def read_coil(address: int) -> bool:
        response = reader.read_coils(address, count=1)
        assert not response.isError(), response
        return bool(response.bits[0])

    yield port, read_coil

    reader.close()
    asyncio.run_coroutine_threadsafe(holder["server"].shutdown(), loop).result(5)
    thread.join(5)
    loop.close()


def test_modbus_coil_sink_pulses_coil_when_fired(modbus_server):
    port, read_coil = modbus_server
    sink = ModbusCoilSink("127.0.0.1", port, unit=1, coil=3, pulse_ms=400)
    try:
        assert read_coil(3) is False
        sink.fire(reject_event())
        assert read_coil(3) is True                     # on during the pulse
        assert read_coil(2) is False                    # and only that coil
        deadline = time.monotonic() + 3.0
        while read_coil(3) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert read_coil(3) is False                    # off again after pulse_ms
    finally:
        sink.close()


def test_modbus_coil_sink_raises_when_device_is_unreachable():
    sink = ModbusCoilSink("127.0.0.1", _free_tcp_port(), coil=0, pulse_ms=10, timeout_s=0.3)
    try:
        with pytest.raises(RejectSinkError, match="could not write coil 0"):
            sink.fire(reject_event())
    finally:
        sink.close()


def test_gpio_sink_raises_clear_error_when_gpiod_or_chip_is_absent():
    with pytest.raises(RejectSinkError, match=r"gpiochip-missing|grad-edge\[gpio\]"):
        GpioSink("/dev/gpiochip-missing", line=3)


@pytest.mark.skipif(not glob.glob("/dev/gpiochip*"), reason="no /dev/gpiochip* on this machine")
def test_gpio_sink_pulses_line_when_chip_is_present():
    pytest.importorskip("gpiod", reason="gpiod (libgpiod v2 bindings) is not installed")
    chip = sorted(glob.glob("/dev/gpiochip*"))[0]
    sink = GpioSink(chip, line=0, pulse_ms=20)
    try:
        sink.fire(reject_event())          # raises if the line cannot be driven
    finally:
        sink.close()


# --- scheduler ----------------------------------------------------------------------------


def test_scheduler_fires_at_encoder_count_and_not_before_when_source_has_encoder():
    sink = FakeSink()
    scheduler = RejectScheduler([sink], default_timing=RejectTiming(camera_to_ejector_counts=500))
    event = scheduler.event_for(defect_decision(1, encoder=1000), defect_id=5)
    assert event.due_encoder == 1500 and event.due_time is None

    scheduler.schedule(event)
    assert scheduler.on_encoder("cam0", 1499) == []
    assert scheduler.on_encoder("other-cam", 9999) == []   # another conveyor
    assert sink.events == []
    fired = scheduler.on_encoder("cam0", 1503)
    assert [f.event.defect_id for f in fired] == [5]
    assert sink.events == [event] and scheduler.pending == 0


def test_scheduler_fires_after_delay_when_source_has_no_encoder():
    sink = FakeSink()
    scheduler = RejectScheduler([sink], per_source={"cam0": RejectTiming(delay_s=0.8)})
    event = scheduler.event_for(defect_decision(1, encoder=None, wall_time=1000.0))
    assert event.due_time == pytest.approx(1000.8) and event.due_encoder is None

    scheduler.schedule(event, now=1000.1)
    assert scheduler.poll(now=1000.5) == []
    assert sink.events == []
    assert len(scheduler.poll(now=1000.81)) == 1
    assert sink.events == [event]


def test_scheduler_keeps_firing_other_sinks_when_one_sink_fails(tmp_path):
    broken = FakeSink("plc", failing=True)
    log = JsonlSink(tmp_path / "rejects.jsonl")
    recorded = []
    scheduler = RejectScheduler(
        [broken, log], on_fired=lambda event, ok, failed: recorded.append((event.seq, ok, failed)))

    fired = scheduler.schedule(reject_event(3, due_time=0.0))
    scheduler.schedule(reject_event(4, due_time=0.0))
    log.close()

    assert fired[0].sinks_ok == ("jsonl",) and fired[0].sinks_failed == ("plc",)
    assert recorded == [(3, ["jsonl"], ["plc"]), (4, ["jsonl"], ["plc"])]
    assert scheduler.sink_failures == {"plc": 2, "jsonl": 0}
    assert len((tmp_path / "rejects.jsonl").read_text().splitlines()) == 2


def test_scheduler_fires_everything_pending_when_flushed(caplog):
    sink = FakeSink()
    scheduler = RejectScheduler([sink])
    scheduler.schedule(reject_event(1, due_encoder=10_000))
    scheduler.schedule(reject_event(2, due_time=time.time() + 3600))
    assert scheduler.pending == 2 and sink.events == []

    with caplog.at_level("WARNING", logger="edge.reject"):
        fired = scheduler.flush()

    assert sorted(f.event.seq for f in fired) == [1, 2]
    assert sorted(e.seq for e in sink.events) == [1, 2]
    assert scheduler.pending == 0
    assert "firing 2 pending reject(s)" in caplog.text
