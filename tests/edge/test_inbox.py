"""The worker's inbox under attack: poisoned messages, other runs' producers, a killed run's
socket file, and faults inside the inbox thread. Real ZeroMQ sockets throughout; the poisoned
run drives a real Worker with the tiny model."""

from __future__ import annotations

import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time

import msgpack
import numpy as np
import pytest
import zmq

from camera_sources.base import FakeSource
from camera_sources.producer import Producer
from deploy.runner import EagerRunner
from edge import protocol
from edge.protocol import DropPolicy, EndOfStream, Frame, Heartbeat
from edge.inbox import Inbox
from edge.worker import SourceSetup

RUN = "thisrun000000001"
OTHER = "earlierrun000001"


def gray(value: int, size: tuple[int, int] = (64, 64)) -> np.ndarray:
    return np.full((*size, 3), value % 256, np.uint8)


def frame(seq: int, source_id: str = "cam", **kw) -> Frame:
    return Frame(source_id, seq, time.time(), time.monotonic_ns(), gray(seq, (8, 8)), **kw)


def header(parts: list) -> dict:
    return msgpack.unpackb(parts[0])


def poisons() -> list[tuple[str, list]]:
    """(counter, parts): one of each kind of bad message, and the counter it must land in."""
    good = protocol.encode(frame(0), RUN)
    h = header(good)
    beat = protocol.encode(Heartbeat("cam", -1, 1, 0, 0, 0, 0), RUN)
    end = protocol.encode(EndOfStream("cam", -1, "stopped", 0, 0, 0, 0), RUN)
    rng = np.random.default_rng(7)
    return [
        ("corrupt", [b"\xc1 definitely not msgpack", b"pixels"]),
        ("corrupt", [rng.bytes(64)]),
        ("corrupt", [msgpack.packb({**h, "kind": ["frame"]}), good[1]]),       # unhashable kind
        ("corrupt", [msgpack.packb({**h, "kind": {"frame": 1}}), good[1]]),
        ("corrupt", [msgpack.packb({**h, "v": 1}), good[1]]),                  # wrong version
        ("corrupt", [good[0]]),                                                # parts missing
        ("corrupt", [good[0], good[1], b"extra"]),                            # one part too many
        ("corrupt", [end[0], b"pixels"]),
        ("corrupt", [msgpack.packb({**h, "mono_ns": 2 ** 64 - 1}), good[1]]),  # huge int
        ("corrupt", [msgpack.packb({**h, "wall_time": float("nan")}), good[1]]),
        ("corrupt", [msgpack.packb({**h, "encoder": "300"}), good[1]]),        # wrong type
        ("corrupt", [msgpack.packb({**h, "truth": True}), good[1]]),
        ("corrupt", [msgpack.packb({**h, "source_id": "../../etc"}), good[1]]),
        ("corrupt", [msgpack.packb({**h, "shape": [8, 9, 3]}), good[1]]),      # size mismatch
        ("corrupt", [msgpack.packb({**header(end), "last_seq": [1]})]),
        ("foreign", protocol.encode(frame(0), OTHER)),                        # another run
        ("foreign", protocol.encode(Heartbeat("cam", 5, 1, 6, 6, 0, 0), OTHER)),
        ("foreign", protocol.encode(EndOfStream("cam", 5, "stopped", 6, 6, 0, 0), OTHER)),
        ("misrouted", protocol.encode(frame(0, source_id="cam2"), RUN)),       # another source
        ("misrouted", protocol.encode(EndOfStream("cam2", -1, "stopped", 0, 0, 0, 0), RUN)),
        ("heartbeats", beat),                                                  # a good one
    ]


# --- a running worker fed poison between good frames -------------------------------------------

def test_worker_judges_every_good_frame_and_counts_each_bad_message_when_poison_is_interleaved(
        worker_rig, short_dir, caplog):
    endpoint = protocol.run_endpoint("cam", RUN, short_dir)
    rig = worker_rig([SourceSetup("cam", endpoint, DropPolicy.EVERY_FRAME, 4, run_id=RUN)],
                     max_batch=4, max_wait_ms=1).start()
    push = rig.push("cam")
    bad = poisons()
    n_good = 3 * len(bad)
    expected = {"corrupt": 0, "foreign": 0, "misrouted": 0, "heartbeats": 0}
    with caplog.at_level(logging.WARNING, logger="edge.worker"):
        for seq in range(n_good):
            push.frame(seq, gray(seq))
            counter, parts = bad[seq % len(bad)]     # every kind of poison, three times over
            push.raw(parts)
            expected[counter] += 1
        push.eos(n_good - 1)
        rig.join(timeout=60)

    inbox = rig.worker.inboxes[0]
    assert [r["seq"] for r in rig.results_rows()] == list(range(n_good))
    assert rig.worker.counters()["frames"] == inbox.stats.received == n_good
    counted = {k: getattr(inbox.stats, k) for k in expected}
    assert counted == expected
    assert inbox.stats.errors == 0
    # The other run's end-of-stream did not end this source; its own did, with its reason.
    assert inbox.stats.eos_reason == "end of file" and inbox.end.run_id == RUN
    # Warnings are summarised: a line per kind at first, then one per 5 s.
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert 3 <= len(warnings) <= 9, [r.getMessage() for r in warnings]
    first_foreign = next(r.getMessage() for r in warnings if "another run" in r.getMessage())
    assert OTHER in first_foreign and RUN in first_foreign


class SlowRunner(EagerRunner):
    """The real eager runner, slowed down: a model slower than the line."""

    def __init__(self, path, delay_s: float):
        super().__init__(path, device="cpu")
        self.delay_s = delay_s

    def run(self, frames):
        time.sleep(self.delay_s)
        return super().run(frames)


def test_worker_does_not_call_a_source_silent_when_only_the_model_holds_it_back(
        tiny_checkpoint, worker_rig, wait_until, caplog):
    # every_frame, a 1-frame queue and a model slower than the silence limit: the inbox waits
    # to queue each frame for longer than heartbeat_timeout_s, and hears nothing meanwhile,
    # although the producer's heartbeats keep coming.
    rig = worker_rig([SourceSetup("cam", "tcp://127.0.0.1:*", DropPolicy.EVERY_FRAME, 1,
                                  run_id=RUN)],
                     runner=SlowRunner(tiny_checkpoint, 1.0), max_batch=1, max_wait_ms=0,
                     heartbeat_timeout_s=0.5).start()
    frames, beats = rig.push("cam"), rig.push("cam")
    done = threading.Event()

    def heartbeats() -> None:
        while not done.wait(0.05):
            beats.heartbeat()

    beating = threading.Thread(target=heartbeats, daemon=True)
    with caplog.at_level(logging.WARNING, logger="edge.worker"):
        beating.start()
        for seq in range(4):
            frames.frame(seq, gray(seq))
        assert wait_until(lambda: len(rig.results_rows()) == 4, timeout=30)
        done.set()
        beating.join(5)
        frames.eos(3)
        rig.join(timeout=30)
    assert [r["seq"] for r in rig.results_rows()] == list(range(4))
    assert not [r.getMessage() for r in caplog.records if "silent" in r.getMessage()]


# --- the inbox alone -------------------------------------------------------------------------------

class Rx:
    """An Inbox on a real socket with its thread running; drains frames until end-of-stream."""

    def __init__(self, endpoint: str, run_id: str | None = RUN, inbox_class=Inbox, **kw):
        self.ctx = zmq.Context()
        self.stop = threading.Event()
        self.inbox = inbox_class(self.ctx, "cam", endpoint, DropPolicy.EVERY_FRAME, 1000,
                                 threading.Event(), run_id=run_id, **kw)
        self.inbox.start(self.stop)

    def push(self) -> zmq.Socket:
        sock = self.ctx.socket(zmq.PUSH)
        sock.setsockopt(zmq.LINGER, 2000)
        sock.connect(self.inbox.endpoint)
        return sock

    def frames_until_end(self, timeout_s: float = 15.0) -> list[Frame]:
        frames, deadline = [], time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                frames.append(self.inbox.queue.get(timeout=0.05))
            except queue.Empty:
                if self.inbox.end is not None and self.inbox.queue.qsize() == 0:
                    return frames
        raise AssertionError(f"no end-of-stream within {timeout_s} s: {self.inbox.stats}")

    def close(self) -> None:
        self.stop.set()
        self.inbox._thread.join(5)
        self.ctx.destroy(linger=0)


@pytest.fixture
def rx():
    made: list[Rx] = []

    def build(*args, **kw) -> Rx:
        made.append(Rx(*args, **kw))
        return made[-1]
    yield build
    for r in made:
        r.close()


def run_producer_thread(producer: Producer, stop: threading.Event) -> tuple[threading.Thread, list]:
    results: list = []
    thread = threading.Thread(target=lambda: results.append(producer.run(stop)), daemon=True)
    thread.start()
    return thread, results


def test_inbox_takes_only_its_run_when_an_earlier_runs_producer_still_pushes(rx):
    r = rx("tcp://127.0.0.1:*")
    # The orphan: a real producer of another run, alive and pushing into the same socket.
    orphan_stop = threading.Event()
    orphan = Producer(FakeSource([gray(200)] * 50, source_id="cam", fps=200.0, hold_open=True),
                      r.inbox.endpoint, run_id=OTHER, heartbeat_s=0.05)
    orphan_thread, _ = run_producer_thread(orphan, orphan_stop)
    time.sleep(0.3)
    mine = Producer(FakeSource([gray(i) for i in range(30)], source_id="cam"),
                    r.inbox.endpoint, run_id=RUN, eos_drain_s=0.5)
    mine_thread, mine_stats = run_producer_thread(mine, threading.Event())
    try:
        frames = r.frames_until_end()
    finally:
        orphan_stop.set()
        orphan_thread.join(10)
        mine_thread.join(10)
    stats = mine_stats[0]
    assert [f.seq for f in frames] == list(range(30))
    assert {f.run_id for f in frames} == {RUN}
    assert r.inbox.stats.foreign >= 10      # the orphan's frames and heartbeats, refused
    # The producer's accounting arrived with its end-of-stream: every captured frame sent.
    s = r.inbox.stats
    assert (s.producer_captured, s.producer_sent, s.producer_dropped, s.producer_unsent) == (
        stats.frames_captured, stats.frames_sent, 0, 0) == (30, 30, 0, 0)
    assert s.received == stats.frames_sent


def test_inbox_takes_any_run_when_started_without_a_run_id(rx):
    r = rx("tcp://127.0.0.1:*", run_id=None)
    sock = r.push()
    for seq, run in enumerate(("a", "b", "c")):
        protocol.send(sock, frame(seq), run_id=run)
    protocol.send(sock, EndOfStream("cam", 2, "end of list", 3, 3, 0, 0), run_id="d")
    assert [f.run_id for f in r.frames_until_end()] == ["a", "b", "c"]
    assert r.inbox.stats.foreign == 0
    sock.close(0)


def kill_a_worker_process_bound_to(endpoint: str) -> None:
    """A real worker-like process binds `endpoint`, then dies by SIGKILL, leaving the file."""
    code = ("import sys, time, zmq; s = zmq.Context().socket(zmq.PULL); s.bind(sys.argv[1]); "
            "print('bound', flush=True); time.sleep(120)")
    child = subprocess.Popen([sys.executable, "-c", code, endpoint], stdout=subprocess.PIPE,
                             text=True)
    assert child.stdout.readline().strip() == "bound"
    os.kill(child.pid, signal.SIGKILL)
    child.wait(10)


def test_inbox_binds_and_receives_when_a_killed_run_left_its_socket_file(rx, short_dir):
    endpoint = protocol.run_endpoint("cam", RUN, short_dir)
    kill_a_worker_process_bound_to(endpoint)
    assert (short_dir / f"src-cam-{RUN}.sock").exists()
    r = rx(endpoint)
    sock = r.push()
    protocol.send(sock, frame(0), run_id=RUN)
    protocol.send(sock, EndOfStream("cam", 0, "end of list", 1, 1, 0, 0), run_id=RUN)
    assert [f.seq for f in r.frames_until_end()] == [0]
    sock.close(0)


def test_inbox_refuses_to_bind_when_a_live_worker_holds_the_socket(rx, short_dir):
    endpoint = protocol.run_endpoint("cam", RUN, short_dir)
    rx(endpoint)
    ctx = zmq.Context()
    try:
        with pytest.raises(ValueError, match="source cam: cannot bind .* another live process"):
            Inbox(ctx, "cam", endpoint, DropPolicy.EVERY_FRAME, 4, threading.Event(), run_id=RUN)
    finally:
        ctx.destroy(linger=0)


class FaultyInbox(Inbox):
    """A real inbox whose hand-off to the queue fails for frames 1 and 4, as a fault deep
    in the inbox thread would (the decoder itself raises nothing but ProtocolError)."""

    def _put(self, item) -> bool:
        if item.seq in (1, 4):
            raise RuntimeError(f"fault injected at frame {item.seq}")
        return super()._put(item)


def test_inbox_counts_logs_once_and_keeps_reading_when_its_thread_hits_an_unexpected_error(
        rx, caplog):
    r = rx("tcp://127.0.0.1:*", inbox_class=FaultyInbox)
    sock = r.push()
    with caplog.at_level(logging.WARNING, logger="edge.worker"):
        for seq in range(6):
            protocol.send(sock, frame(seq), run_id=RUN)
        protocol.send(sock, EndOfStream("cam", 5, "end of list", 6, 6, 0, 0), run_id=RUN)
        frames = r.frames_until_end()
    assert [f.seq for f in frames] == [0, 2, 3, 5]
    assert r.inbox.stats.errors == 2 and r.inbox._thread.is_alive() is False   # ended by EOS
    tracebacks = [rec for rec in caplog.records if rec.exc_info]
    assert len(tracebacks) == 1 and "fault injected at frame 1" in str(tracebacks[0].exc_info[1])
    sock.close(0)


def test_inbox_summarises_corrupt_messages_in_the_log_when_flooded(rx, caplog):
    r = rx("tcp://127.0.0.1:*", log_every_s=60.0)
    sock = r.push()
    with caplog.at_level(logging.WARNING, logger="edge.worker"):
        for i in range(500):
            sock.send_multipart([b"\xc1" + i.to_bytes(2, "big")])
        protocol.send(sock, EndOfStream("cam", -1, "end of list", 0, 0, 0, 0), run_id=RUN)
        assert r.frames_until_end() == []
    assert r.inbox.stats.corrupt == 500
    lines = [rec.getMessage() for rec in caplog.records if "corrupt" in rec.getMessage()]
    assert len(lines) == 1 and "dropped 1 corrupt message(s) (1 in total)" in lines[0]
    sock.close(0)
