"""Encoder inputs read on their own: a simulated belt shared across processes, a real Modbus
counter (pymodbus's own server), and the sources that ride a belt."""

from __future__ import annotations

import multiprocessing as mp
import time

import pytest

from camera_sources.encoder import EncoderSpec, ManualEncoder, ModbusEncoder, SimulatedBelt
from camera_sources.synthetic import SyntheticLine


def _child_reads(belt: SimulatedBelt, manual: ManualEncoder, out) -> None:
    belt.start()                           # already started by the parent: no effect
    out.put((belt.read(), time.monotonic_ns()))
    manual.set(4242)


def test_simulated_belt_is_still_until_started_then_moves_at_its_speed():
    belt = SimulatedBelt(1000.0)
    assert belt.read() is None and not belt.started
    t0 = belt.start()
    time.sleep(0.2)
    position = belt.read()
    assert 180 <= position <= 400, position           # 1000 counts/s for ~0.2 s (busy CI)
    assert belt.start() == t0                          # a second start changes nothing
    assert belt.time_at(500) == t0 + 500_000_000


def test_simulated_belt_and_manual_encoder_are_shared_with_a_spawned_producer_process():
    ctx = mp.get_context("spawn")
    belt, manual = SimulatedBelt(1000.0, ctx=ctx), ManualEncoder(ctx=ctx)
    t0 = belt.start()
    out = ctx.Queue()
    child = ctx.Process(target=_child_reads, args=(belt, manual, out))
    child.start()
    child_position, child_now = out.get(timeout=60)
    child.join(30)
    # Same start moment, same host clock: the child sees the belt where the parent does.
    assert child_position == pytest.approx((child_now - t0) / 1e6, abs=2)
    assert manual.read() == 4242


def test_modbus_encoder_reads_a_32_bit_count_and_unwraps_it_when_the_counter_rolls_over(
        modbus_registers):
    port, write = modbus_registers
    encoder = EncoderSpec("modbus", {"host": "127.0.0.1", "port": port, "register": 2}).build()
    try:
        write(2, [0x0001, 0x0002])                     # high word first
        assert encoder.read() == 0x0001_0002
        write(2, [0xFFFF, 0xFFF0])
        assert encoder.read() == 0xFFFF_FFF0
        write(2, [0x0000, 0x0010])                     # rolled over past 2**32
        assert encoder.read() == (1 << 32) + 0x10
    finally:
        encoder.close()


def test_modbus_encoder_reads_none_and_logs_once_when_the_device_is_unreachable(caplog):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]                      # nothing listens here
    encoder = ModbusEncoder("127.0.0.1", port, timeout_s=0.2)
    with caplog.at_level("ERROR", logger="camera_sources.encoder"):
        assert encoder.read() is None and encoder.read() is None
    assert caplog.text.count("unreadable") == 1
    encoder.close()


def test_synthetic_line_stamps_each_frame_at_the_moment_the_belt_reached_it():
    belt = SimulatedBelt(100 * 50.0)                   # 50 frames/s at 100 counts per frame
    line = SyntheticLine(size=(32, 32), n_frames=5, fps=50, belt=belt)

    class Never:
        def is_set(self):
            return False

        def wait(self, timeout=None):
            time.sleep(timeout or 0)
            return False

    frames = list(line.frames(Never()))
    assert [f.seq for f in frames] == [0, 1, 2, 3, 4]
    assert [f.encoder for f in frames] == [0, 100, 200, 300, 400]
    assert [f.mono_ns for f in frames] == [belt.time_at(f.encoder) for f in frames]
    # Each was yielded no sooner than its trigger moment (the belt had reached it).
    assert all(time.monotonic_ns() >= f.mono_ns for f in frames)


def test_synthetic_line_restarted_on_a_moving_belt_resumes_at_the_part_under_the_camera():
    belt = SimulatedBelt(1000.0)                        # 10 frames/s at 100 counts per frame
    belt.start(time.monotonic_ns() - 2_000_000_000)     # the belt has run for 2 s already

    class Once:
        def is_set(self):
            return False

        def wait(self, timeout=None):
            return False

    first = next(SyntheticLine(size=(32, 32), fps=10, belt=belt).frames(Once()))
    # ~20 parts passed while no producer was there; they were never captured.
    assert 20 <= first.seq <= 23 and first.encoder == first.seq * 100
