"""Several model workers for one line: a process each, with its own model, under one supervisor.

A host with two GPUs runs two workers; each judges its own sources (``workers`` in the config,
or by default one per visible GPU with the sources dealt round-robin). A worker process is a
whole :class:`edge.line.Line` over its sources: its producers, its model on its device, its
reject scheduler on its sources' belts, its defect-log writer. So everything a line
guarantees (rejects on the live belt, missed rejects, accounting, durable records) holds per
worker unchanged, and one worker's crash never touches another's parts.

The supervisor here:

- checks every source before it starts anything (a blind source: exit 2, nothing opened);
- starts the workers (each dies with this process), restarts one that dies with back-off
  (0.5 s doubling to 30 s), logged and counted; a worker that ended on its own (its sources
  ended, or one failed) is not restarted;
- forwards Ctrl-C / SIGTERM to every worker (each drains, then stops);
- prints one status line adding up the workers' (each writes ``status.json`` in its folder);
- ends with one summary adding up theirs, and the exit code of the worst.

Where each worker keeps its things: ``<run_dir>/<worker id>/`` (results, summary, status,
rejects of a per-worker sink); SQLite: ``<name>.<worker id>.db`` beside the configured file
(one writer owns a SQLite file); PostgreSQL: the one database, each worker its own runs.
Saved images: ``<images>/<worker id>/``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from edge.config import LineConfig, Transport, WorkerAssignment
from edge.summary import RunOutcome

log = logging.getLogger(__name__)


def default_workers(cfg: LineConfig, gpus: int) -> list[WorkerAssignment] | None:
    """The workers when the config names none: one per GPU when there are several (sources
    dealt round-robin), else None (the line's own process judges, as a single line does)."""
    if gpus < 2 or len(cfg.sources) < 2:
        return None
    n = min(gpus, len(cfg.sources))
    # Remote (tcp) sources all go to the first worker: it alone binds the hello socket.
    remote = [s.id for s in cfg.sources if s.transport is Transport.TCP]
    local = [s.id for s in cfg.sources if s.transport is not Transport.TCP]
    dealt = [local[i::n] for i in range(n)]
    dealt[0] = remote + dealt[0]
    return [WorkerAssignment(id=f"gpu{i}", device=f"cuda:{i}", sources=ids)
            for i, ids in enumerate(dealt) if ids]


def worker_config(cfg: LineConfig, w: WorkerAssignment, index: int = 0) -> LineConfig:
    """The line one worker process runs: its sources, its device, its own folder and file,
    and its own metrics port (metrics.port + its index: several processes cannot share one)."""
    url = cfg.defect_log.url
    if url.startswith("sqlite:///"):
        path = Path(url[len("sqlite:///"):])
        suffix = path.suffix or ".db"
        url = f"sqlite:///{path.with_name(f'{path.stem}.{w.id}{suffix}')}"
    return dataclasses.replace(
        cfg, sources=[s for s in cfg.sources if s.id in w.sources],
        run_dir=str(Path(cfg.run_dir) / w.id),
        model=dataclasses.replace(cfg.model, device=w.device or cfg.model.device),
        defect_log=dataclasses.replace(cfg.defect_log, url=url,
                                       images=str(Path(cfg.defect_log.images) / w.id)),
        reject=dataclasses.replace(cfg.reject, sinks=w.sinks if w.sinks is not None
                                   else cfg.reject.sinks),
        rules=dataclasses.replace(cfg.rules, per_source={
            k: v for k, v in cfg.rules.per_source.items() if k in w.sources}),
        metrics=dataclasses.replace(cfg.metrics, port=None if cfg.metrics.port is None
                                    else cfg.metrics.port + index),
        workers=None, source_file=f"{cfg.source_file} (worker {w.id})")


def run_worker(cfg: LineConfig, worker_id: str, parent_pid: int) -> None:
    """Process entry point of one worker: a whole line over its sources; exits with its code."""
    from camera_sources.producer import die_with_parent

    die_with_parent(parent_pid)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {worker_id} %(levelname)s "
                        "%(name)s: %(message)s")
    from deploy.runner import open_runner
    from edge.line import Line

    try:
        runner = open_runner(cfg.model.path, backend=cfg.model.backend, device=cfg.model.device,
                             artifact=cfg.model.artifact)
        summary = Line(cfg, runner).run()
    except (ValueError, FileNotFoundError, RuntimeError, LookupError) as exc:
        logging.getLogger("grad-edge").error("worker %s: %s", worker_id, exc)
        sys.exit(2)
    sys.exit(summary.outcome.exit_code)


@dataclass
class WorkerState:
    assignment: WorkerAssignment
    cfg: LineConfig
    proc: mp.process.BaseProcess | None = None
    restarts: int = 0
    backoff_s: float = 0.0
    restart_at: float | None = None
    exit_codes: list[int] = field(default_factory=list)   # every life's, in order

    @property
    def done(self) -> bool:
        return (self.proc is not None and not self.proc.is_alive()
                and self.restart_at is None)


@dataclass(frozen=True)
class PoolSummary:
    outcome: RunOutcome
    seconds: float
    workers: dict          # worker id -> its summary.json (the last life's), restarts, exit codes
    totals: dict           # the workers' counters added up

    def to_dict(self) -> dict:
        return {"outcome": self.outcome.name.lower(), "exit_code": self.outcome.exit_code,
                "seconds": self.seconds, "workers": self.workers, "totals": self.totals}


class WorkerPool:
    """Runs one worker process per assignment; see the module docstring."""

    def __init__(self, cfg: LineConfig, assignments: list[WorkerAssignment], *,
                 first_backoff_s: float = 0.5, max_backoff_s: float = 30.0):
        self.cfg = cfg
        self.run_dir = Path(cfg.run_dir)
        if cfg.worker.torch_threads is None and all(
                (w.device or cfg.model.device or "cpu").startswith("cpu") for w in assignments):
            # Workers sharing a CPU split its cores; each taking all of them would thrash.
            threads = max(1, (os.cpu_count() or 1) // len(assignments))
            cfg = dataclasses.replace(cfg, worker=dataclasses.replace(
                cfg.worker, torch_threads=threads))
        self.workers = {w.id: WorkerState(w, worker_config(cfg, w, i))
                        for i, w in enumerate(assignments)}
        self.first_backoff_s = first_backoff_s
        self.max_backoff_s = max_backoff_s
        self.signal: int | None = None
        self._ctx = mp.get_context("spawn")
        self._stop = threading.Event()

    def _spawn(self, state: WorkerState) -> None:
        state.proc = self._ctx.Process(
            target=run_worker, name=f"worker-{state.assignment.id}",
            args=(state.cfg, state.assignment.id, os.getpid()), daemon=False)
        state.proc.start()
        state.restart_at = None
        log.info("worker %s (pid %d, %s): sources %s", state.assignment.id, state.proc.pid,
                 state.cfg.model.device or "default device", ", ".join(state.assignment.sources))

    def _on_signal(self, signum, _frame) -> None:
        self.signal = self.signal or signum
        self._stop.set()
        for state in self.workers.values():
            if state.proc is not None and state.proc.is_alive():
                os.kill(state.proc.pid, signum)

    def run(self) -> PoolSummary:
        from edge.line import check_sources

        check_sources(self.cfg)          # a blind source: exit 2 before anything starts
        self.run_dir.mkdir(parents=True, exist_ok=True)
        previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                previous[sig] = signal.signal(sig, self._on_signal)
        start = time.monotonic()
        try:
            for state in self.workers.values():
                self._spawn(state)
            next_status = time.monotonic() + (self.cfg.status_interval_s or 1.0)
            while not all(s.done for s in self.workers.values()):
                self._stop.wait(0.2)
                self._supervise()
                if self.cfg.status_interval_s > 0 and time.monotonic() >= next_status:
                    log.info("status: %s", self.status_line())
                    next_status = time.monotonic() + self.cfg.status_interval_s
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            for state in self.workers.values():
                if state.proc is not None and state.proc.is_alive():
                    state.proc.terminate()
                    state.proc.join(10)
        summary = self._summary(time.monotonic() - start)
        (self.run_dir / "summary.json").write_text(json.dumps(summary.to_dict(), indent=2))
        return summary

    def _supervise(self) -> None:
        now = time.monotonic()
        for wid, state in self.workers.items():
            if state.restart_at is not None:
                if now >= state.restart_at and not self._stop.is_set():
                    state.restarts += 1
                    log.warning("restarting worker %s (restart %d)", wid, state.restarts)
                    self._spawn(state)
                continue
            proc = state.proc
            if proc is None or proc.is_alive() or len(state.exit_codes) > state.restarts:
                continue
            code = proc.exitcode
            state.exit_codes.append(code)
            ended = code in (0, 1, 2) or (self._stop.is_set() and code in (130, 143))
            if ended:
                log.info("worker %s ended (exit %s)", wid, code)
                continue
            state.backoff_s = (self.first_backoff_s if not state.backoff_s
                               else min(2 * state.backoff_s, self.max_backoff_s))
            state.restart_at = now + state.backoff_s
            log.error("ALARM worker_died: worker %s died (exit code %s); restarting it in "
                      "%.1f s", wid, code, state.backoff_s)

    def _status(self) -> dict[str, dict]:
        out = {}
        for wid, state in self.workers.items():
            path = Path(state.cfg.run_dir) / "status.json"
            try:
                out[wid] = json.loads(path.read_text())
            except (OSError, ValueError):
                out[wid] = {}
        return out

    def status_line(self) -> str:
        from edge.line import status_line

        per = self._status()
        return (" | ".join(f"{wid}: {c.get('frames', 0)} frames" for wid, c in per.items())
                + " | total: " + status_line(add_counters([c for c in per.values() if c])))

    def _summary(self, seconds: float) -> PoolSummary:
        workers, counters = {}, []
        for wid, state in self.workers.items():
            path = Path(state.cfg.run_dir) / "summary.json"
            try:
                s = json.loads(path.read_text())
            except (OSError, ValueError):
                s = None
            workers[wid] = {"summary": s, "restarts": state.restarts,
                            "exit_codes": state.exit_codes, "device": state.cfg.model.device,
                            "sources": state.assignment.sources}
            if s is not None:
                counters.append(s["counters"])
        codes = [st.exit_codes[-1] if st.exit_codes else None for st in self.workers.values()]
        if self.signal == signal.SIGINT:
            outcome = RunOutcome.INTERRUPTED
        elif self.signal == signal.SIGTERM:
            outcome = RunOutcome.TERMINATED
        elif any(c != 0 for c in codes):
            outcome = RunOutcome.FAILED
        else:
            outcome = RunOutcome.COMPLETED
        return PoolSummary(outcome, seconds, workers, add_counters(counters))


_SUMMED = ("frames", "fps", "dropped", "producer_dropped", "corrupt", "foreign", "misrouted",
           "inbox_errors", "defects", "unknown", "ok", "rejects", "missed_rejects")


def add_counters(counters: list[dict]) -> dict:
    """The workers' counters as one line's: sums, the worst latency, the union of lists."""
    total = {k: sum(c.get(k, 0) or 0 for c in counters) for k in _SUMMED}
    for key in ("latency_p50_ms", "latency_p99_ms"):
        values = [c[key] for c in counters if c.get(key) is not None]
        total[key] = max(values) if values else None     # the worst worker's
    for key in ("silent_sources", "down_sources"):
        total[key] = sorted({s for c in counters for s in c.get(key, [])})
    total["accounting"] = {sid: a for c in counters for sid, a in c.get("accounting", {}).items()}
    return total


def format_pool_summary(s: PoolSummary) -> str:
    from edge.summary import RunSummary, format_summary

    lines = [f"{len(s.workers)} workers:"]
    for wid, w in s.workers.items():
        run = w["summary"]["run_id"] if w["summary"] else "-"
        lines.append(f"  {wid}: run {run}, {w['device'] or 'default device'}, sources "
                     f"{', '.join(w['sources'])}, exit codes {w['exit_codes']}"
                     + (f", RESTARTED {w['restarts']}x" if w["restarts"] else ""))
    lines.append(format_summary(RunSummary(0, s.seconds, s.totals, "one per worker", "one per "
                                           "worker", s.outcome)).replace("run 0: ", "all: ", 1))
    return "\n".join(lines)
