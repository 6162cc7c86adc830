"""Reject sinks and scheduler, against real files, real ZeroMQ sockets and pymodbus's own server."""

from __future__ import annotations

import asyncio
import dataclasses
import glob
import json
import socket
import threading
import time

import pytest
import zmq

from camera_sources.encoder import ManualEncoder
from edge.reject import MissedReject, RejectEvent, RejectScheduler, RejectTiming
from edge.sinks import FakeSink, GpioSink, JsonlSink, ModbusCoilSink, RejectSinkError, ZmqPubSink
from edge.results import Alarm, Decision, FrameResult, Verdict


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


def test_scheduler_fires_at_the_live_encoder_count_and_not_before_when_the_part_arrives():
    sink, belt = FakeSink(), ManualEncoder(1000)
    scheduler = RejectScheduler([sink], default_timing=RejectTiming(500, tolerance_counts=50),
                                encoders={"cam0": belt})
    event = scheduler.event_for(defect_decision(1, encoder=1000), defect_id=5)
    assert event.due_encoder == 1500 and event.due_time is None

    assert scheduler.schedule(event) is None
    belt.set(1499)
    assert scheduler.poll() == [] and sink.events == []
    belt.set(1503)
    fired = scheduler.poll()
    assert [f.event.defect_id for f in fired] == [5] and fired[0].position == 1503
    # The sinks learn where the belt was when it fired (a PLC can check the window).
    assert sink.events == [dataclasses.replace(event, fired_position=1503)]
    assert scheduler.pending == 0


def test_scheduler_reports_missed_and_fires_nothing_when_the_verdict_comes_after_the_part_passed():
    sink, belt = FakeSink(), ManualEncoder(0)
    missed: list[MissedReject] = []
    scheduler = RejectScheduler([sink], default_timing=RejectTiming(500, tolerance_counts=50),
                                encoders={"cam0": belt}, on_missed=missed.append)
    event = scheduler.event_for(defect_decision(1, encoder=1000), defect_id=9)
    belt.set(1551)          # the part is 51 counts past the ejector: firing would hit the next

    outcome = scheduler.schedule(event)

    assert isinstance(outcome, MissedReject) and "51 counts past" in outcome.reason
    assert sink.events == [] and scheduler.fired_count == 0
    assert scheduler.missed == {"cam0": 1} and [m.event.defect_id for m in missed] == [9]
    assert [a.kind for a in sink.alarms] == ["missed_reject"] and "defect 9" in sink.alarms[0].message


def test_scheduler_still_fires_within_the_tolerance_when_the_verdict_is_a_little_late():
    sink, belt = FakeSink(), ManualEncoder(1550)
    scheduler = RejectScheduler([sink], default_timing=RejectTiming(500, tolerance_counts=50),
                                encoders={"cam0": belt})
    fired = scheduler.schedule(scheduler.event_for(defect_decision(1, encoder=1000)))
    assert fired.position == 1550 and len(sink.events) == 1


def test_scheduler_reports_missed_when_an_encoder_timed_frame_has_no_count():
    sink = FakeSink()
    scheduler = RejectScheduler([sink], default_timing=RejectTiming(500),
                                encoders={"cam0": ManualEncoder(0)})
    outcome = scheduler.schedule(scheduler.event_for(defect_decision(1, encoder=None)))
    assert isinstance(outcome, MissedReject) and "no encoder count" in outcome.reason
    assert sink.events == []


def test_scheduler_thread_fires_on_time_while_nobody_polls_when_the_belt_moves_on_its_own(
        wait_until):
    sink, belt = FakeSink(), ManualEncoder(0)
    scheduler = RejectScheduler([sink], default_timing=RejectTiming(500, tolerance_counts=50),
                                encoders={"cam0": belt}).start()
    try:
        for seq, at in enumerate((100, 200, 300)):
            scheduler.schedule(scheduler.event_for(defect_decision(seq, encoder=at)))
        for count in range(0, 901, 10):       # the belt moves; the worker judges nothing
            belt.set(count)
            time.sleep(0.002)
        assert wait_until(lambda: len(sink.events) == 3, 2.0)
    finally:
        scheduler.close()
    assert [e.seq for e in sink.events] == [0, 1, 2] and scheduler.missed_total == 0
    # Each fired while its part was at the ejector: never before it, never past the tolerance.
    assert all(0 <= e.fired_position - e.due_encoder <= 50 for e in sink.events)


def test_scheduler_fires_after_delay_and_misses_past_the_tolerance_when_source_has_no_encoder():
    sink, now = FakeSink(), [1000.1]
    scheduler = RejectScheduler([sink], per_source={"cam0": RejectTiming(delay_s=0.8,
                                                                        tolerance_s=0.05)},
                                clock=lambda: now[0])
    on_time = scheduler.event_for(defect_decision(1, encoder=None, wall_time=1000.0))
    late = scheduler.event_for(defect_decision(2, encoder=None, wall_time=999.0))
    assert on_time.due_time == pytest.approx(1000.8) and on_time.due_encoder is None

    assert isinstance(scheduler.schedule(late), MissedReject)      # due at 999.8, now 1000.1
    assert scheduler.schedule(on_time) is None
    now[0] = 1000.5
    assert scheduler.poll() == [] and sink.events == []
    now[0] = 1000.81
    assert len(scheduler.poll()) == 1 and sink.events == [on_time]


def test_scheduler_keeps_firing_other_sinks_when_one_sink_fails(tmp_path):
    broken = FakeSink("plc", failing=True)
    log = JsonlSink(tmp_path / "rejects.jsonl")
    recorded = []
    scheduler = RejectScheduler(
        [broken, log], on_fired=lambda f: recorded.append((f.event.seq, f.sinks_ok, f.sinks_failed)))

    fired = scheduler.schedule(reject_event(3))
    scheduler.schedule(reject_event(4))
    scheduler.raise_alarm(Alarm("source_down", "camera cam0 delivered nothing for 5 s", "cam0"))
    log.close()

    assert fired.sinks_ok == ("jsonl",) and fired.sinks_failed == ("plc",)
    assert recorded == [(3, ("jsonl",), ("plc",)), (4, ("jsonl",), ("plc",))]
    assert scheduler.sink_failures == {"plc": 2, "jsonl": 0}
    assert scheduler.alarm_failures == {"plc": 1, "jsonl": 0}
    lines = [json.loads(line) for line in (tmp_path / "rejects.jsonl").read_text().splitlines()]
    assert [line.get("seq") for line in lines[:2]] == [3, 4]
    assert lines[2]["alarm"]["kind"] == "source_down"


def test_scheduler_drain_fires_parts_that_arrive_and_misses_the_rest_when_the_line_stops():
    sink, belt = FakeSink(), ManualEncoder(0)
    scheduler = RejectScheduler([sink], default_timing=RejectTiming(500, tolerance_counts=50),
                                encoders={"cam0": belt})
    scheduler.schedule(scheduler.event_for(defect_decision(1, encoder=0)))       # due at 500
    scheduler.schedule(scheduler.event_for(defect_decision(2, encoder=10_000)))  # far away
    mover = threading.Timer(0.1, belt.set, args=(510,))
    mover.start()

    acted = scheduler.drain(timeout_s=0.5)

    assert [type(a).__name__ for a in acted] == ["FiredReject", "MissedReject"]
    assert "line stopped" in acted[1].reason
    assert [e.seq for e in sink.events] == [1] and scheduler.pending == 0


def test_scheduler_fires_replay_rejects_at_the_end_of_the_footage_when_no_belt_is_live(caplog):
    sink = FakeSink()
    scheduler = RejectScheduler([sink], default_timing=RejectTiming(500))
    scheduler.schedule(scheduler.event_for(defect_decision(1, encoder=1000)))
    assert scheduler.on_encoder("cam0", 1400) == [] and scheduler.pending == 1
    assert len(scheduler.on_encoder("cam0", 1500)) == 1            # the footage is the belt
    scheduler.schedule(scheduler.event_for(defect_decision(2, encoder=5000)))

    with caplog.at_level("WARNING", logger="edge.reject"):
        acted = scheduler.drain(timeout_s=0.0)

    assert [a.event.seq for a in acted] == [2] and type(acted[0]).__name__ == "FiredReject"
    assert [e.seq for e in sink.events] == [1, 2] and "end of footage" in caplog.text
