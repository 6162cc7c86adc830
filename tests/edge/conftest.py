"""Fixtures for the line's tests: a tiny real checkpoint, a worker wired to real parts
(ZeroMQ sockets, SQLite defect log, reject scheduler) and PUSH sockets that speak the wire
format. Shared here because test files are imported with --import-mode=importlib."""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zmq

from edge import protocol
from edge.defect_log import DefectLogWriter
from edge.protocol import DropPolicy, EndOfStream, Frame, Heartbeat
from edge.reject import RejectScheduler
from edge.sinks import FakeSink
from edge.rules import RuleConfig, RuleEngine
from edge.worker import SourceSetup, Worker


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A real checkpoint of the `tiny` GRAD (real backbone weights, untrained head).

    Its calibrated threshold is 1.0; tests that care about verdicts set their own threshold.
    """
    import torch

    from grad.checkpoint import Calibration, save_checkpoint
    from grad.config import get_config
    from grad.model import GRAD

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "tiny.pt"
    save_checkpoint(path, GRAD(get_config("tiny")).eval(),
                    Calibration(mean=0.0, std=1.0, threshold=1.0, n_images=10, rule="test"))
    return path


@pytest.fixture(scope="session")
def eager_runner(tiny_checkpoint):
    """One EagerRunner on the tiny checkpoint, warmed up (the first call pays for setup)."""
    from deploy.runner import EagerRunner

    runner = EagerRunner(tiny_checkpoint, device="cpu")
    runner.run(np.zeros((1, 64, 64, 3), np.uint8))
    return runner


@pytest.fixture
def ctx():
    """A ZeroMQ context of the test's own, destroyed without lingering afterwards."""
    context = zmq.Context()
    yield context
    context.destroy(linger=0)


@pytest.fixture
def short_dir():
    """A short folder under /tmp: ipc:// socket paths must stay under 107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="ge-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def make_frame(source_id: str, seq: int, image: np.ndarray, **kw) -> Frame:
    return Frame(source_id=source_id, seq=seq, wall_time=time.time(),
                 mono_ns=time.monotonic_ns(), image=image, **kw)


class Push:
    """A producer's end: a real PUSH socket connected to a worker's endpoint, stamping its
    messages with `run_id` and keeping the producer's counters (every frame captured is sent).
    """

    def __init__(self, ctx: zmq.Context, endpoint: str, source_id: str, sndhwm: int = 1000,
                 run_id: str = "test-run"):
        self.source_id = source_id
        self.run_id = run_id
        self.sent = 0
        self.sock = ctx.socket(zmq.PUSH)
        self.sock.setsockopt(zmq.SNDHWM, sndhwm)
        self.sock.setsockopt(zmq.LINGER, 2000)
        self.sock.connect(endpoint)

    def frame(self, seq: int, image: np.ndarray, **kw) -> None:
        protocol.send(self.sock, make_frame(self.source_id, seq, image, **kw), run_id=self.run_id)
        self.sent += 1

    def eos(self, last_seq: int, reason: str = "end of file") -> None:
        protocol.send(self.sock, EndOfStream(self.source_id, last_seq, reason, self.sent,
                                             self.sent, 0, 0), run_id=self.run_id)

    def heartbeat(self, seq: int = -1, dropped: int = 0) -> None:
        protocol.send(self.sock, Heartbeat(self.source_id, seq, time.monotonic_ns(),
                                           self.sent + dropped, self.sent, dropped, 0),
                      run_id=self.run_id)

    def raw(self, parts: list) -> None:
        self.sock.send_multipart(parts)

    def close(self) -> None:
        self.sock.close()


class Rig:
    """A Worker on real parts, run in a thread; what a test needs to drive and inspect it."""

    def __init__(self, worker: Worker, writer: DefectLogWriter, sink: FakeSink, db: Path,
                 results: Path, ctx: zmq.Context):
        self.worker, self.writer, self.sink, self.db, self.results = (
            worker, writer, sink, db, results)
        self.ctx = ctx
        self.thread = threading.Thread(target=self._run, name="worker", daemon=True)
        self.error: BaseException | None = None
        self.stats = None
        self._pushes: list[Push] = []

    def _run(self) -> None:
        try:
            self.stats = self.worker.run()
        except BaseException as exc:  # noqa: BLE001 - surfaced by join()
            self.error = exc

    def start(self) -> "Rig":
        self.thread.start()
        return self

    def push(self, source_id: str, sndhwm: int = 1000, run_id: str | None = None) -> Push:
        """A PUSH socket to a source's inbox, stamping `run_id` (default: the inbox's run)."""
        inbox = next(i for i in self.worker.inboxes if i.source_id == source_id)
        p = Push(self.ctx, self.worker.endpoints[source_id], source_id, sndhwm,
                 run_id or inbox.run_id or "test-run")
        self._pushes.append(p)
        return p

    def join(self, timeout: float = 20.0) -> None:
        """Wait for run() to return on its own; fails the test if it does not."""
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"worker.run() did not return within {timeout} s"
        if self.error is not None:
            raise self.error

    def results_rows(self) -> list[dict]:
        import json

        if not self.results.exists():
            return []
        return [json.loads(line) for line in self.results.read_text().splitlines() if line]

    def close(self) -> None:
        self.worker.stop_event.set()
        self.worker.scheduler.close()
        self.thread.join(10)
        for p in self._pushes:
            p.close()
        self.writer.stop()


@pytest.fixture
def worker_rig(eager_runner, tmp_path):
    """Factory: `worker_rig(sources, runner=..., threshold=..., **worker_kwargs)` -> Rig.

    `sources` are SourceSetup-like dicts or (source_id, policy, queue_size) tuples; every
    endpoint is tcp://127.0.0.1:* (the bound port is in worker.endpoints). The rules use
    `threshold` (default: far above any score, so every frame is OK).
    """
    ctx = zmq.Context()
    rigs: list[Rig] = []

    def build(sources, *, runner=None, threshold: float = 1e9, rule_kw: dict | None = None,
              scheduler_kw: dict | None = None, **worker_kw) -> Rig:
        setups = []
        for s in sources:
            if isinstance(s, SourceSetup):
                setups.append(s)
            else:
                sid, policy, qsize, *roi = s
                setups.append(SourceSetup(sid, "tcp://127.0.0.1:*", DropPolicy(policy), qsize,
                                          roi[0] if roi else None))
        n = len(rigs)
        db = tmp_path / f"defects{n}.db"
        results = tmp_path / f"results{n}.jsonl"
        writer = DefectLogWriter(db).start()
        run_id = writer.begin_run(model_hash="test")
        sink = FakeSink()
        rules = RuleEngine(RuleConfig(threshold=threshold, **(rule_kw or {})))
        scheduler = RejectScheduler([sink], **(scheduler_kw or {}))
        worker = Worker(runner or eager_runner, setups, rules, scheduler, writer,
                        None, results_path=results, run_id=run_id, ctx=ctx, **worker_kw)
        rig = Rig(worker, writer, sink, db, results, ctx)
        rigs.append(rig)
        return rig

    yield build
    for rig in rigs:
        rig.close()
    ctx.destroy(linger=0)


@pytest.fixture
def wait_until():
    """wait_until(predicate, timeout=5.0) -> bool, polling every 20 ms."""
    def wait(predicate, timeout: float = 5.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return True
            time.sleep(0.02)
        return bool(predicate())
    return wait


# --- PostgreSQL: the session's throwaway server and its databases are in tests/conftest.py


@pytest.fixture(params=["sqlite", "postgresql"])
def log_target(request, tmp_path):
    """Where a defect log lives, for tests that hold for both databases: a SQLite file
    (a Path) or a fresh database on the session's PostgreSQL server (a URL)."""
    if request.param == "sqlite":
        return tmp_path / "line" / "defects.db"
    return request.getfixturevalue("postgres_url")
