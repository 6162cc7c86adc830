"""The shared-memory frame ring, with real processes and real memory: every frame intact
through fewer slots than frames, a slot back only when nothing holds its pixels (judged,
dropped by a latest queue), garbage refused and counted, and nothing left behind -- in
/dev/shm or in any process's memory -- when the producer or the whole line is SIGKILLed."""

from __future__ import annotations

import array
import fcntl
import gc
import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid

import numpy as np
import pytest
import yaml
import zmq

from camera_sources.base import FakeSource, SourceSpec
from camera_sources.producer import Producer, run_producer
from edge import protocol
from edge.inbox import Inbox
from edge.protocol import DropPolicy, RingFrame, RingOffer
from edge.ring import RingReceiver, RingWriter, ring_bytes_mapped

RUN = "ringrun000000001"
spawn = multiprocessing.get_context("spawn")


def image(i: int, shape=(120, 160, 3)) -> np.ndarray:
    rng = np.random.default_rng(i)
    return rng.integers(0, 256, shape, dtype=np.uint8)


def unique_source() -> str:
    # A source id no other test (or engineer on this machine) uses: its rings are named by it.
    return f"shm-{uuid.uuid4().hex[:8]}"


def rings_held_anywhere(source_id: str) -> list[str]:
    """Every process on this machine that maps, or holds a descriptor of, this source's ring."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/maps") as maps:
                if f"memfd:grad-edge-ring-{source_id}" in maps.read():
                    found.append(f"{pid} maps it")
            for fd in os.listdir(f"/proc/{pid}/fd"):
                if f"grad-edge-ring-{source_id}" in os.readlink(f"/proc/{pid}/fd/{fd}"):
                    found.append(f"{pid} holds fd {fd}")
        except OSError:
            continue
    return found


def shm_segments() -> set[str]:
    """/dev/shm entries that are shared memory segments. Named semaphores (sem.*) and the
    PostgreSQL servers other engineers run on this machine are left out."""
    return {n for n in os.listdir("/dev/shm")
            if not n.startswith(("sem.", "PostgreSQL."))}


@pytest.fixture
def ring_inbox(ctx, short_dir):
    """ring_inbox(source_id, policy, queue_size) -> a started Inbox taking a frame ring."""
    stop = threading.Event()
    made = []

    def make(source_id: str, policy=DropPolicy.EVERY_FRAME, queue_size: int = 8) -> Inbox:
        inbox = Inbox(ctx, source_id, protocol.default_endpoint(f"src-{source_id}", short_dir),
                      policy, queue_size, threading.Event(), run_id=RUN, ring=True)
        inbox.start(stop)
        made.append(inbox)
        return inbox

    yield make
    stop.set()
    for inbox in made:
        inbox.join()


def produce(endpoint: str, source_id: str, images, slots: int, **kw):
    stop = threading.Event()
    result = []
    producer = Producer(FakeSource(images, source_id=source_id, **kw), endpoint, run_id=RUN,
                        ring_slots=slots, stop_timeout_s=0.5, eos_drain_s=1.0)
    thread = threading.Thread(target=lambda: result.append(producer.run(stop)), daemon=True)
    thread.start()
    return thread, stop, result


def test_ring_delivers_every_frame_intact_through_fewer_slots_than_frames(ring_inbox, wait_until):
    sid = unique_source()
    inbox = ring_inbox(sid)
    sent = [image(i) for i in range(12)]
    thread, _, result = produce(inbox.endpoint, sid, sent, slots=3)
    received = []
    deadline = time.monotonic() + 20
    while len(received) < 12 and time.monotonic() < deadline:
        try:
            frame = inbox.queue.get(timeout=0.5)
        except Exception:
            continue
        assert not frame.image.flags.writeable
        received.append((frame.seq, frame.image.copy()))
        del frame                       # judged: its slot goes back
    thread.join(10)
    assert [seq for seq, _ in received] == list(range(12))
    for (seq, pixels), original in zip(received, sent):
        np.testing.assert_array_equal(pixels, original)
    # Through the ring, most captured straight into a slot; a frame that found every slot
    # with the worker went the plain way.
    stats = result[0]
    assert stats.frames_sent == 12 and stats.frames_in_ring >= 6
    assert 1 <= stats.frames_captured_in_ring <= stats.frames_in_ring
    assert inbox.ring.stats.frames == stats.frames_in_ring == inbox.ring.stats.released
    assert wait_until(lambda: inbox.end is not None)


def test_ring_slot_stays_with_the_worker_while_any_view_of_its_pixels_lives(short_dir):
    sid = unique_source()
    path = str(short_dir / "src.ring")
    receiver = RingReceiver(path, sid, RUN)
    writer = RingWriter(path, sid, RUN, slots=2)
    serve = threading.Thread(target=_serve_once, args=(receiver,), daemon=True)
    serve.start()
    from camera_sources.base import make_frame

    header = writer.put(make_frame(sid, 0, image(0)))
    serve.join(5)
    assert isinstance(header, RingFrame) and writer.state == "open"
    frame = receiver.frame(header)
    crop = frame.image[10:20, 30:50]        # what the worker's ROI crop keeps
    del frame
    gc.collect()
    assert header.slot in receiver.rings[header.ring].busy and receiver.stats.released == 0
    np.testing.assert_array_equal(crop, image(0)[10:20, 30:50])
    with pytest.raises(protocol.ProtocolError, match="still held by an earlier frame"):
        receiver.frame(header)              # a confused producer reusing a held slot
    del crop
    assert receiver.stats.released == 1
    writer._take_releases()
    assert sorted(writer._free) == [0, 1]
    writer.close()
    receiver.close()


def test_a_lent_slot_travels_without_a_copy_and_comes_back_when_its_frame_is_dropped_unsent(
        short_dir):
    sid = unique_source()
    path = str(short_dir / "src.ring")
    receiver = RingReceiver(path, sid, RUN)
    writer = RingWriter(path, sid, RUN, slots=2)
    serve = threading.Thread(target=_serve_once, args=(receiver,), daemon=True)
    serve.start()
    from camera_sources.base import make_frame

    assert writer.lend((120, 160, 3)) is None                # no ring before the first frame
    first = writer.put(make_frame(sid, 0, image(0)))
    serve.join(5)
    assert first.slot == 0 and writer._free == [1]
    lent = writer.lend((120, 160, 3))
    assert lent is not None and lent.flags.writeable and writer._free == []
    assert writer.lend((120, 160, 3)) is None                # none free: capture elsewhere
    np.copyto(lent, image(1))                                # the camera writes the slot
    header = writer.put(make_frame(sid, 1, lent))
    assert header.slot == 1 and writer.lent_sent == 1        # sent as it lies: no copy
    np.testing.assert_array_equal(receiver.frame(header).image, image(1))   # judged: back
    receiver.rings[first.ring].release(0)                    # the first frame's slot too
    writer._take_releases()
    assert sorted(writer._free) == [0, 1]
    # A lent slot whose frame is dropped before it is sent is free again.
    dropped = writer.lend((120, 160, 3))
    assert dropped is not None and len(writer._free) == 1
    del dropped
    gc.collect()
    assert sorted(writer._free) == [0, 1]
    writer.close()
    receiver.close()


def _serve_once(receiver: RingReceiver) -> None:
    """Answer one ring offer, as the inbox thread does."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not receiver.rings:
        for fd in receiver.fds():
            receiver.ready(fd)
        time.sleep(0.01)


def test_latest_queue_dropping_a_ring_frame_gives_its_slot_back(ring_inbox, wait_until):
    sid = unique_source()
    inbox = ring_inbox(sid, DropPolicy.LATEST, queue_size=1)
    # Nobody judges: the queue keeps only the newest frame; with 2 slots the producer would
    # stall after 2 frames if a dropped frame kept its slot.
    thread, _, result = produce(inbox.endpoint, sid, [image(i) for i in range(10)], slots=2)
    assert wait_until(lambda: inbox.end is not None, timeout=20)
    thread.join(10)
    assert inbox.stats.received == 10 and inbox.dropped == 9 and inbox.queue.qsize() == 1
    # Only the queued frame holds a slot: every dropped one gave its slot back.
    assert result[0].frames_in_ring >= 5
    assert inbox.ring.stats.released == inbox.ring.stats.frames - 1 or \
        inbox.ring.stats.released == inbox.ring.stats.frames     # (the queued one went plain)
    assert inbox.queue.get().seq == 9


def test_ring_refuses_and_counts_an_offer_it_cannot_trust(ring_inbox, wait_until):
    sid = unique_source()
    inbox = ring_inbox(sid)
    path = protocol.ring_path(inbox.endpoint)

    kept = []

    def offer(fd: int, **kw) -> str:
        fields = dict(source_id=sid, ring="evil", slots=2, slot_bytes=4096, run_id=RUN) | kw
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        kept.append(sock)             # a ring lives while its producer's connection does
        sock.settimeout(5)
        sock.connect(path)
        sock.sendmsg(protocol.encode(RingOffer(**fields)),
                     [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])
        return protocol.decode([sock.recv(4096)], expect=protocol.RING_REPLY_KINDS).error

    unsealed = os.memfd_create("unsealed", os.MFD_ALLOW_SEALING)
    os.ftruncate(unsealed, 2 * 4096)
    sealed = os.memfd_create("sealed", os.MFD_ALLOW_SEALING)
    os.ftruncate(sealed, 2 * 4096)
    fcntl.fcntl(sealed, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
    try:
        assert "not sealed" in offer(unsealed)          # it could shrink under us: SIGBUS
        assert "belongs to run" in offer(sealed, run_id="another0run00001")
        assert "names source" in offer(sealed, source_id="cam-other")
        assert "not 3 slots" in offer(sealed, slots=3)  # the size disagrees with the file
        assert offer(sealed) == ""                       # and a sound one is taken
    finally:
        os.close(unsealed)
        os.close(sealed)
    assert inbox.ring.stats.refused == 4 and inbox.ring.stats.offered == 5

    # Headers that point at nothing are corrupt, and the inbox keeps reading.
    push = zmq.Context.instance().socket(zmq.PUSH)
    push.connect(inbox.endpoint)
    for header in (RingFrame(sid, 0, 1.0, 1, (8, 8), ring="nosuchring", slot=0),
                   RingFrame(sid, 1, 1.0, 1, (64, 64, 3), ring="evil", slot=0),   # too big
                   RingFrame(sid, 2, 1.0, 1, (8, 8), ring="evil", slot=1)):       # sound
        protocol.send(push, header, run_id=RUN)
    assert wait_until(lambda: inbox.stats.received == 1)
    assert inbox.stats.corrupt == 2
    push.close(0)
    for sock in kept:
        sock.close()


def test_a_killed_producer_leaves_no_shared_memory_once_the_worker_is_done_with_its_frames(
        ring_inbox, wait_until):
    sid = unique_source()
    before = shm_segments()
    inbox = ring_inbox(sid, queue_size=2)
    spec = SourceSpec("fake", sid, {"images": [image(i) for i in range(50)], "fps": 50.0})
    proc = spawn.Process(target=run_producer, args=(spec, inbox.endpoint),
                         kwargs={"run_id": RUN, "ring_slots": 4}, daemon=True)
    proc.start()
    # Nobody judges: the queue fills, every slot is with the worker, the producer waits.
    assert wait_until(lambda: inbox.queue.qsize() == 2, timeout=30)
    assert wait_until(lambda: inbox.ring.stats.frames >= 2)
    assert ring_bytes_mapped() > 0 and ring_bytes_mapped(proc.pid) > 0
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(5)
    # The frames it sent are judged after it died (the inbox, blocked on its full queue, then
    # reads on and notices the producer go); the ring is forgotten after a grace time for
    # frames in flight.
    held = []

    def judge_what_came() -> bool:
        while not inbox.queue.empty():
            held.append(inbox.queue.get())
        return not inbox.ring.rings

    assert wait_until(judge_what_came, timeout=15)
    assert len(held) >= 2 and all(f.image.sum() > 0 for f in held)
    # ... and once they are judged, nothing is left: not in this process, not anywhere.
    held.clear()
    gc.collect()
    assert wait_until(lambda: ring_bytes_mapped() == 0 and not rings_held_anywhere(sid))
    assert shm_segments() - before == set()


SIZE = 64


def test_a_killed_line_leaves_no_shared_memory_and_no_producer_holding_a_ring(
        tiny_checkpoint, short_dir, wait_until):
    sid = unique_source()
    before = shm_segments()
    cfg = {
        "run_dir": "run",
        "model": {"path": str(tiny_checkpoint), "backend": "eager", "device": "cpu"},
        "sources": [{"id": sid, "kind": "synthetic", "frames": None, "fps": 20,
                     "size": [SIZE, SIZE], "transport": "shm", "ring_slots": 3}],
        "worker": {"max_batch": 4, "max_wait_ms": 5},
        "rules": {"default": {"threshold": 1e9}},
        "defect_log": {"url": "sqlite:///run/defects.db", "images": "run/images"},
        "status_interval_s": 0.5,
    }
    path = short_dir / "line.yaml"
    path.write_text(yaml.safe_dump(cfg))
    log = short_dir / "run.log"
    line = subprocess.Popen([sys.executable, "-m", "edge.cli", "run", str(path)], cwd=short_dir,
                            stdout=subprocess.DEVNULL, stderr=open(log, "w"), text=True)
    try:
        results = short_dir / "run" / "results.jsonl"
        assert wait_until(lambda: results.exists() and len(results.read_text().splitlines())
                          >= 10, timeout=120), log.read_text()[-3000:]
        holders = rings_held_anywhere(sid)
        assert any(h.startswith(f"{line.pid} ") for h in holders), holders   # the worker
        assert len({h.split()[0] for h in holders}) == 2, holders          # and its producer
    finally:
        line.send_signal(signal.SIGKILL)
        line.wait(10)
    # The producer dies with the line (PDEATHSIG): with both gone, so is the ring.
    assert wait_until(lambda: not rings_held_anywhere(sid), timeout=10), rings_held_anywhere(sid)
    assert shm_segments() - before == set()


def test_a_line_with_a_shm_source_judges_every_frame_and_accounts_for_it(
        tiny_checkpoint, short_dir):
    cfg = {
        "run_dir": "run",
        "model": {"path": str(tiny_checkpoint), "backend": "eager", "device": "cpu"},
        "sources": [{"id": "belt", "kind": "synthetic", "frames": 40, "fps": 40,
                     "size": [SIZE, SIZE], "transport": "shm", "ring_slots": 2}],
        "worker": {"max_batch": 4, "max_wait_ms": 5},
        "rules": {"default": {"threshold": 1e9}},
        "defect_log": {"url": "sqlite:///run/defects.db", "images": "run/images"},
        "status_interval_s": 0.5,
    }
    path = short_dir / "line.yaml"
    path.write_text(yaml.safe_dump(cfg))
    done = subprocess.run([sys.executable, "-m", "edge.cli", "run", str(path)], cwd=short_dir,
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "frame ring" in done.stderr and "mapped (2 x" in done.stderr
    summary = json.loads((short_dir / "run" / "summary.json").read_text())
    belt = summary["counters"]["accounting"]["belt"]
    assert belt["captured"] == belt["judged"] == 40 and belt["unaccounted"] == 0
    assert belt["lost"] == 0 and belt["dropped"] == 0


def test_producer_sends_plain_frames_when_the_worker_takes_no_ring(ctx, short_dir, wait_until):
    sid = unique_source()
    stop = threading.Event()
    inbox = Inbox(ctx, sid, protocol.default_endpoint(f"src-{sid}", short_dir),
                  DropPolicy.EVERY_FRAME, 16, threading.Event(), run_id=RUN)   # no ring here
    inbox.start(stop)
    try:
        sent = [image(i) for i in range(5)]
        thread, _, result = produce(inbox.endpoint, sid, sent, slots=4)
        assert wait_until(lambda: inbox.end is not None, timeout=20)
        thread.join(10)
        assert inbox.stats.received == 5 and inbox.stats.corrupt == 0
        for original in sent:
            np.testing.assert_array_equal(inbox.queue.get().image, original)
        assert result[0].frames_in_ring == 0 and ring_bytes_mapped() == 0
    finally:
        stop.set()
        inbox.join()
