"""Remote producers over real tcp and CURVE: the hello that tells a camera host its run, the
producer that follows the run's state, `grad-edge produce` beside `grad-edge run`, and a
network link cut for real (a proxy process killed and started again) that the line survives
with every frame accounted for."""

from __future__ import annotations

import json
import logging
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
import zmq

from camera_sources.base import SourceSpec
from camera_sources.remote import RemoteError, RemoteProducer, WorkerLink
from edge.hello import HelloService
from edge.inbox import Inbox
from edge.protocol import DropPolicy
from edge.security import ClientKeys, ServerKeys, load_public, load_secret, make_keys

RUN = "remoterun0000001"
HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    folder = tmp_path_factory.mktemp("keys")
    make_keys(folder, ["worker", "cam", "stranger"])
    return folder


def server(keys, *allowed: str) -> ServerKeys:
    public, secret = load_secret(keys / "worker.key")
    return ServerKeys(public, secret, frozenset(load_public(keys / f"{n}.key") for n in allowed))


def client(keys, name: str) -> ClientKeys:
    public, secret = load_secret(keys / f"{name}.key")
    return ClientKeys(public, secret, load_public(keys / "worker.key"))


class Worker:
    """The worker's network side, in-process: one source's CURVE inbox and the hello socket."""

    def __init__(self, ctx: zmq.Context, keys, allowed=("cam",), source_id: str = "cam",
                 hello_allowed=None):
        self.stop = threading.Event()
        curve = server(keys, *allowed)
        self.inbox = Inbox(ctx, source_id, "tcp://127.0.0.1:*", DropPolicy.EVERY_FRAME, 64,
                           threading.Event(), run_id=RUN, curve=curve)
        port = int(self.inbox.endpoint.rsplit(":", 1)[1])
        self.hello = HelloService(ctx, "tcp://127.0.0.1:0", RUN, {source_id: port},
                                  server(keys, *(hello_allowed or allowed)),
                                  keys={source_id: curve.allowed},
                                  ended=lambda sid: self.inbox.end is not None).start()
        self.inbox.start(self.stop)

    def close(self) -> None:
        self.stop.set()
        self.inbox.join()
        self.hello.close()


@pytest.fixture
def worker(keys):
    ctx = zmq.Context()
    made = []

    def make(**kw) -> Worker:
        made.append(Worker(ctx, keys, **kw))
        return made[-1]

    yield make
    for w in made:
        w.close()
    ctx.destroy(linger=0)


def remote(hello_port: int, curve: ClientKeys, n: int = 5, hold_open: bool = False, **kw):
    images = [np.full((16, 16), i, np.uint8) for i in range(n)]
    spec = SourceSpec("fake", "cam", {"images": images, "fps": 50.0, "hold_open": hold_open})
    producer = RemoteProducer(spec, "127.0.0.1", hello_port, curve, once=True,
                              hello_every_s=0.2, **kw)
    stop = threading.Event()
    out: list = []
    thread = threading.Thread(target=lambda: out.append(producer.run(stop)), daemon=True)
    thread.start()
    return producer, thread, stop, out


def test_remote_producer_learns_its_run_and_port_from_the_hello_and_streams_over_curve(
        keys, worker, wait_until):
    w = worker()
    _, thread, _, out = remote(w.hello.port, client(keys, "cam"), n=5)
    assert wait_until(lambda: w.inbox.end is not None, timeout=20)
    thread.join(10)
    assert w.inbox.stats.received == 5 and w.inbox.stats.foreign == 0
    frames = [w.inbox.queue.get() for _ in range(5)]
    assert [f.seq for f in frames] == [0, 1, 2, 3, 4]
    assert {f.run_id for f in frames} == {RUN}
    # On one host the clocks agree: capture times arrive on the worker's clock.
    assert all(0 <= time.monotonic_ns() - f.mono_ns < 10e9 for f in frames)
    (stats,) = out[0]
    assert stats.run_id == RUN and stats.frames_sent == 5 and stats.eos_delivered
    assert w.inbox.end.producer is not None and w.hello.answered >= 1


def test_remote_producer_stops_resending_its_end_of_stream_once_the_worker_says_ended(
        keys, worker, wait_until):
    w = worker()
    _, thread, _, out = remote(w.hello.port, client(keys, "cam"), n=2)
    assert wait_until(lambda: w.inbox.end is not None, timeout=20)
    # The hello now answers "ended": the producer stops draining at once, not in 10 minutes.
    thread.join(5)
    assert not thread.is_alive() and out[0][0].eos_delivered


def test_producer_sends_its_end_of_stream_again_while_draining_when_asked_to(tmp_path):
    from camera_sources.base import FakeSource
    from camera_sources.producer import Producer
    from edge import protocol

    ctx = zmq.Context.instance()
    pull = ctx.socket(zmq.PULL)
    endpoint = protocol.default_endpoint("w", tmp_path)
    pull.bind(endpoint)
    producer = Producer(FakeSource([np.zeros((4, 4), np.uint8)], source_id="cam"), endpoint,
                        run_id=RUN, eos_drain_s=30.0, eos_resend_s=0.2)
    stop = threading.Event()
    thread = threading.Thread(target=producer.run, args=(stop,), daemon=True)
    thread.start()
    ends = []
    deadline = time.monotonic() + 10
    while len(ends) < 3 and time.monotonic() < deadline:
        if pull.poll(500):
            msg = protocol.recv(pull)
            if isinstance(msg, protocol.EndOfStream):
                ends.append(msg)
    stop.set()
    thread.join(5)
    pull.close(0)
    assert len(ends) == 3 and len(set(ends)) == 1      # the same end-of-stream, again


def test_remote_producer_sends_end_of_stream_when_the_worker_says_its_run_is_stopping(
        keys, worker, wait_until):
    w = worker()
    producer, thread, _, out = remote(w.hello.port, client(keys, "cam"), n=3, hold_open=True)
    assert wait_until(lambda: w.inbox.stats.received == 3, timeout=20)
    assert w.inbox.end is None                        # a live camera: no end of its own
    w.hello.state = "stopping"
    assert wait_until(lambda: w.inbox.end is not None, timeout=5)
    assert w.inbox.end.reason == "stopped"
    thread.join(5)
    assert out[0][0].frames_captured == 3


def test_remote_producer_waits_saying_the_worker_refuses_its_key_when_it_is_not_listed(
        keys, worker, wait_until, caplog):
    w = worker()
    caplog.set_level(logging.WARNING)
    _, thread, stop, out = remote(w.hello.port, client(keys, "stranger"))
    assert wait_until(lambda: "refuses this host's key" in caplog.text, timeout=10), caplog.text
    stop.set()
    thread.join(5)
    assert out == [[]] and w.inbox.stats.received == 0
    assert w.hello.watch is None or w.hello.answered == 0


def test_remote_producer_raises_when_its_key_is_listed_for_another_source(keys, worker):
    # The hello lets every remote source's key in; the source's socket only its own.
    w = worker(allowed=("cam",), hello_allowed=("cam", "stranger"))
    images = [np.zeros((4, 4), np.uint8)]
    producer = RemoteProducer(SourceSpec("fake", "cam", {"images": images}), "127.0.0.1",
                              w.hello.port, client(keys, "stranger"), once=True)
    with pytest.raises(RemoteError, match="does not take this host's key for source 'cam'"):
        producer.run(threading.Event())


def test_remote_producer_raises_when_the_worker_has_no_such_source(keys, worker):
    w = worker(source_id="other", allowed=("cam",))
    images = [np.zeros((4, 4), np.uint8)]
    producer = RemoteProducer(SourceSpec("fake", "cam", {"images": images}), "127.0.0.1",
                              w.hello.port, client(keys, "cam"), once=True)
    with pytest.raises(RemoteError, match="has no source 'cam' in its run"):
        producer.run(threading.Event())


def test_hello_answers_a_request_that_is_not_a_hello_with_an_empty_reply_and_counts_it(
        keys, worker):
    w = worker()
    ctx = zmq.Context.instance()
    req = ctx.socket(zmq.REQ)
    curve = client(keys, "cam")
    req.curve_publickey, req.curve_secretkey = curve.public, curve.secret
    req.curve_serverkey = curve.server_public
    req.connect(f"tcp://127.0.0.1:{w.hello.port}")
    req.send(b"\x93garbage")
    assert req.poll(5000) and req.recv() == b""
    assert w.hello.bad_requests == 1
    link = WorkerLink(ctx, f"tcp://127.0.0.1:{w.hello.port}", "cam", curve)
    answer = link.ask(2.0)
    assert answer is not None and answer.run_id == RUN and answer.state == "running"
    assert abs(link.offset_ns) < 50e6            # one host: the clocks agree to the round trip
    link.close()
    req.close(0)


# --- `grad-edge run` + `grad-edge produce`, and the link cut for real ----------------------------

def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def two_host_config(folder: Path, model: Path, frames: int, worker_host: str,
                    ports: list[int], **source) -> Path:
    make_keys(folder / "keys", ["worker", "cam"])
    cfg = {
        "run_dir": "run",
        "model": {"path": str(model), "backend": "eager", "device": "cpu"},
        "sources": [{"id": "cam", "kind": "synthetic", "frames": frames, "fps": 25,
                     "size": [64, 64], "defect_every": None, "transport": "tcp",
                     "port": ports[1], "key": "keys/cam.key", "encoder": {"kind": "none"},
                     "max_frame_gap_s": None, **source}],
        "worker": {"max_batch": 4, "max_wait_ms": 5, "heartbeat_timeout_s": 1.5},
        "rules": {"default": {"threshold": 1e9}},
        "defect_log": {"url": "sqlite:///run/defects.db", "images": "run/images"},
        "network": {"listen": "127.0.0.1", "worker": worker_host, "hello_port": ports[0],
                    "worker_key": "keys/worker.key"},
        "status_interval_s": 0.5,
    }
    path = folder / "line.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def cli(*args: str, cwd: Path, log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "edge.cli", *args], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=open(log, "w"), text=True)


def wait_for(predicate, procs, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        for p in procs:
            assert p.poll() is None, f"{p.args} exited {p.returncode}"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def finish(proc: subprocess.Popen, timeout: float, *logs: Path) -> str:
    """The process's stdout once it exits; fails with the tails of its logs if it does not."""
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        tails = "\n".join(f"--- {log.name}\n{log.read_text()[-4000:]}" for log in logs)
        pytest.fail(f"{' '.join(proc.args[-4:])} did not exit within {timeout} s\n{tails}")
    return out


def judged(folder: Path) -> int:
    path = folder / "run" / "results.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def test_run_and_produce_judge_every_frame_of_a_camera_host_over_curve(tiny_checkpoint,
                                                                       short_dir):
    config = two_host_config(short_dir, tiny_checkpoint, 40, "127.0.0.1", free_ports(2))
    logs = short_dir / "run.log", short_dir / "produce.log"
    run = cli("run", str(config), cwd=short_dir, log=logs[0])
    produce = cli("produce", str(config), "--source", "cam", "--once", cwd=short_dir,
                  log=logs[1])
    try:
        out = finish(run, 180, *logs)
        assert run.returncode == 0, (short_dir / "run.log").read_text()[-3000:]
        printed = finish(produce, 30, *logs)
        assert produce.returncode == 0, (short_dir / "produce.log").read_text()[-3000:]
    finally:
        for p in (run, produce):
            if p.poll() is None:
                p.kill()
    assert "cam: captured 40 = judged 40 + dropped 0 + unjudged at stop 0 + lost 0" in out
    assert "captured 40 = sent 40 + dropped 0 + unsent 0" in printed
    acc = json.loads((short_dir / "run" / "summary.json").read_text())["counters"]
    assert acc["accounting"]["cam"]["unaccounted"] == 0 and acc["refused_connections"] == 0


def test_a_cut_link_marks_the_source_silent_the_producer_reconnects_and_every_frame_is_accounted(
        tiny_checkpoint, short_dir):
    ports = free_ports(2)
    # The camera "host" reaches the worker at 127.0.0.2, through a proxy process: the link.
    config = two_host_config(short_dir, tiny_checkpoint, 150, "127.0.0.2", ports)
    proxy_cmd = [sys.executable, str(HERE / "tcp_proxy.py"), "127.0.0.2", "127.0.0.1",
                 *map(str, ports)]

    def start_proxy() -> subprocess.Popen:
        proxy = subprocess.Popen(proxy_cmd, stdout=subprocess.PIPE, text=True)
        assert proxy.stdout.readline().strip() == "ready"
        return proxy

    run_log, produce_log = short_dir / "run.log", short_dir / "produce.log"
    run = cli("run", str(config), cwd=short_dir, log=run_log)
    proxy = start_proxy()
    produce = cli("produce", str(config), "--source", "cam", "--once", cwd=short_dir,
                  log=produce_log)
    procs = [run, produce]
    try:
        wait_for(lambda: judged(short_dir) >= 20, procs)
        proxy.kill()                                    # the link is cut, bytes in flight lost
        proxy.wait()
        # (the producer may have sent everything into the dying link and be waiting to hear
        # that its end-of-stream arrived: only the line must stay up)
        wait_for(lambda: "source cam silent" in run_log.read_text(), [run], timeout=20)
        at_cut = judged(short_dir)
        time.sleep(1.0)
        proxy = start_proxy()                           # and back
        out = finish(run, 180, run_log, produce_log)
        finish(produce, 30, run_log, produce_log)
    finally:
        for p in (run, produce, proxy):
            if p.poll() is None:
                p.kill()
    log = run_log.read_text()
    assert run.returncode == 0, log[-3000:]
    assert produce.returncode == 0, produce_log.read_text()[-3000:]
    assert judged(short_dir) > at_cut                   # frames came again after the cut
    assert "source cam: connected (2 so far)" in log     # it reconnected
    assert "the worker answers again" in produce_log.read_text()
    cam = json.loads((short_dir / "run" / "summary.json").read_text())["counters"][
        "accounting"]["cam"]
    assert cam["captured"] == 150                       # the producer's end-of-stream says so
    assert cam["captured"] == (cam["judged"] + cam["dropped"] + cam["unjudged_at_stop"]
                               + cam["lost"]), cam
    assert cam["unaccounted"] == 0 and cam["lost"] == cam["lost_in_transit"], cam
    assert f"lost {cam['lost']}" in out


def test_a_killed_remote_producer_started_again_joins_its_run_and_every_frame_is_accounted(
        tiny_checkpoint, short_dir):
    config = two_host_config(short_dir, tiny_checkpoint, 60, "127.0.0.1", free_ports(2))
    logs = short_dir / "run.log", short_dir / "produce.log", short_dir / "produce2.log"
    run = cli("run", str(config), cwd=short_dir, log=logs[0])
    first = cli("produce", str(config), "--source", "cam", "--once", cwd=short_dir, log=logs[1])
    procs = [run, first]
    try:
        wait_for(lambda: judged(short_dir) >= 15, procs)
        first.send_signal(signal.SIGKILL)               # the camera host's service dies
        first.wait()
        # ... and its service manager starts it again: a new life of the same source.
        second = cli("produce", str(config), "--source", "cam", "--once", cwd=short_dir,
                     log=logs[2])
        procs.append(second)
        out = finish(run, 180, *logs)
        finish(second, 30, *logs)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert run.returncode == 0, logs[0].read_text()[-3000:]
    assert "a new producer (life 2) took over" in logs[0].read_text()
    cam = json.loads((short_dir / "run" / "summary.json").read_text())["counters"][
        "accounting"]["cam"]
    # The second life sent all 60 of its frames; the first reported what it had captured.
    assert cam["judged"] >= 60 + 15 and cam["producer_restarts"] == 1, cam
    assert cam["captured"] == (cam["judged"] + cam["dropped"] + cam["unjudged_at_stop"]
                               + cam["lost"]), cam
    assert cam["unaccounted"] == 0, cam
    assert "producer restarts 1" in out


def test_an_end_of_stream_lost_with_a_dead_link_is_sent_again_and_the_run_ends(
        tiny_checkpoint, short_dir):
    ports = free_ports(2)
    # 40 frames over 4 s: the link must freeze while the producer is still sending. At 200
    # fps, on a loaded machine, all 40 had crossed before the first verdict was seen, and
    # nothing was left to die on the wire.
    config = two_host_config(short_dir, tiny_checkpoint, 40, "127.0.0.2", ports, fps=10)
    proxy_cmd = [sys.executable, str(HERE / "tcp_proxy.py"), "127.0.0.2", "127.0.0.1",
                 *map(str, ports)]

    def start_proxy() -> subprocess.Popen:
        proxy = subprocess.Popen(proxy_cmd, stdout=subprocess.PIPE, text=True)
        assert proxy.stdout.readline().strip() == "ready"
        return proxy

    run_log, produce_log = short_dir / "run.log", short_dir / "produce.log"
    run = cli("run", str(config), cwd=short_dir, log=run_log)
    proxy = start_proxy()
    produce = cli("produce", str(config), "--source", "cam", "--once", cwd=short_dir,
                  log=produce_log)
    procs = [run, produce, proxy]
    try:
        wait_for(lambda: judged(short_dir) >= 1, [run, produce])
        # The link freezes: what the producer sends from now on -- the rest of its frames and
        # its end-of-stream -- waits in the kernel's buffers around the frozen proxy ...
        proxy.send_signal(signal.SIGSTOP)
        wait_for(lambda: "end of stream sent" in produce_log.read_text(), [run, produce],
                 timeout=60)
        # ... and dies with it.
        proxy.kill()
        proxy.wait()
        time.sleep(1.0)
        proxy = start_proxy()
        procs.append(proxy)
        out = finish(run, 120, run_log, produce_log)
        finish(produce, 60, run_log, produce_log)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert run.returncode == 0, run_log.read_text()[-3000:]
    cam = json.loads((short_dir / "run" / "summary.json").read_text())["counters"][
        "accounting"]["cam"]
    assert cam["captured"] == 40 and cam["unaccounted"] == 0, cam
    assert cam["lost"] == cam["lost_in_transit"] > 0, cam     # they died on the wire
    assert cam["captured"] == cam["judged"] + cam["lost"], cam
    assert f"lost {cam['lost']} ({cam['lost']} in transit)" in out
