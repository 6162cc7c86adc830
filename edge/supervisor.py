"""The producer processes of a run: started, watched, restarted, stopped, accounted for.

One process per source (``camera_sources.producer.run_producer``), spawned fresh so no torch or
ZeroMQ state is forked. Every producer dies with the line (``die_with_parent``), so a crashed
line leaves no orphan pushing stale frames at the next run.

A producer that dies (a non-zero exit: killed, crashed) without its end-of-stream having
reached the worker is either restarted or its source fails (exit code 0 is a finished stream
whose end-of-stream may still be on its way to a worker that is behind):

- live sources (cameras, the synthetic line) are restarted with back-off (0.5 s doubling up
  to ``max_backoff_s``), logged and counted; the belt did not stop meanwhile, so the new
  producer starts at the part under the camera now;
- recorded sources (video, folder) fail: replaying them from the start would judge parts
  twice. Their source is closed and the run ends with exit code 1.

Each producer counts the frames its source captured in shared memory (``captured``), so the
run can account for every frame even when a producer is killed before it reports.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing as mp
import os
import time
from dataclasses import dataclass, field

from camera_sources.base import SourceSpec
from camera_sources.producer import run_producer
from edge.protocol import DropPolicy

log = logging.getLogger(__name__)


@dataclass
class ProducerState:
    """One source's producer: its current process and what happened to earlier ones."""

    source_id: str
    spec: SourceSpec
    endpoint: str
    policy: DropPolicy
    restartable: bool
    captured: object                      # multiprocessing Value('q'): frames captured, all lives
    proc: mp.process.BaseProcess | None = None
    restarts: int = 0
    deaths: list[str] = field(default_factory=list)   # one line per death, for the summary
    failed: str | None = None             # why the source failed (no restart)
    restart_at: float | None = None       # monotonic time of the next restart, when waiting
    backoff_s: float = 0.0
    dropped_by_dead: int = 0              # producer-side drops reported by earlier lives
    producer_kw: dict = field(default_factory=dict)   # more Producer options (ring_slots)


class ProducerSupervisor:
    """Starts a producer per source and keeps them going; see the module docstring.

    ``check(inboxes)`` is called periodically from one long-lived thread of the line (a
    child started with PR_SET_PDEATHSIG dies when the *thread* that started it exits, so
    restarts must come from a thread that lives as long as the run).
    """

    def __init__(self, ctx, stop_event, *, run_id: str | None = None,
                 first_backoff_s: float = 0.5, max_backoff_s: float = 30.0,
                 heartbeat_s: float = 1.0):
        self._ctx = ctx
        self._stop = stop_event             # multiprocessing.Event shared by all producers
        self.run_id = run_id
        self.first_backoff_s = first_backoff_s
        self.max_backoff_s = max_backoff_s
        self.heartbeat_s = heartbeat_s
        self.producers: dict[str, ProducerState] = {}
        self.stopping = False

    def add(self, spec: SourceSpec, endpoint: str, policy: DropPolicy, restartable: bool,
            **producer_kw) -> None:
        self.producers[spec.source_id] = ProducerState(
            spec.source_id, spec, endpoint, policy, restartable,
            captured=self._ctx.Value("q", 0, lock=False), producer_kw=producer_kw)

    def start_all(self) -> None:
        for state in self.producers.values():
            self._spawn(state)

    def _spawn(self, state: ProducerState) -> None:
        kwargs = {"policy": state.policy, "parent_pid": os.getpid(), "captured": state.captured,
                  "heartbeat_s": self.heartbeat_s, **state.producer_kw}
        if self.run_id is not None:
            kwargs["run_id"] = self.run_id
        state.proc = self._ctx.Process(
            target=run_producer, name=f"producer-{state.source_id}",
            args=(state.spec, state.endpoint, self._stop), kwargs=kwargs, daemon=True)
        state.proc.start()
        state.restart_at = None

    def check(self, inboxes: dict) -> list[tuple[str, str]]:
        """Look at every producer once; returns (source_id, what happened) for the alarms.

        ``inboxes``: source id -> the worker's Inbox (its stats say whether the source sent
        end-of-stream, its last seq and the drops its producer reported).
        """
        events: list[tuple[str, str]] = []
        now = time.monotonic()
        for sid, state in self.producers.items():
            inbox = inboxes[sid]
            proc = state.proc
            if state.restart_at is not None:
                if now >= state.restart_at and not self.stopping:
                    state.restarts += 1
                    log.warning("restarting producer %s (restart %d)", sid, state.restarts)
                    self._restart_spec(state, inbox)
                    self._spawn(state)
                continue
            if (proc is None or proc.is_alive() or inbox.stats.ended or inbox.end is not None
                    or state.failed):
                continue
            if proc.exitcode == 0:
                # It ended its stream on purpose (its source ran out, or it was asked to stop)
                # after sending end-of-stream, which a worker that is behind has not read yet:
                # not a death. Restarting it would give a finished belt a second life.
                # Should that end-of-stream never arrive, the line's watch ends the source.
                continue
            why = (f"producer {sid} died (exit code {proc.exitcode}) without end of stream "
                   f"after {state.captured.value} frame(s) captured")
            state.deaths.append(why)
            state.dropped_by_dead += inbox.stats.producer_dropped
            if state.restartable and not self.stopping:
                state.backoff_s = (self.first_backoff_s if not state.backoff_s
                                   else min(2 * state.backoff_s, self.max_backoff_s))
                state.restart_at = now + state.backoff_s
                log.error("%s; restarting it in %.1f s", why, state.backoff_s)
                events.append((sid, f"{why}; restarting in {state.backoff_s:.1f} s"))
            else:
                state.failed = why
                log.error("%s; its source has failed", why)
                events.append((sid, f"{why}; source failed"))
        return events

    def _restart_spec(self, state: ProducerState, inbox) -> None:
        # A camera keeps numbering its frames; the synthetic line numbers them by belt
        # position, which its belt already knows.
        if state.spec.kind == "camera":
            state.spec = dataclasses.replace(
                state.spec, options={**state.spec.options, "start_seq": inbox.last_seq + 1})

    def healthy_again(self, source_id: str) -> None:
        """Frames flow again after a restart: the next death starts the back-off afresh."""
        self.producers[source_id].backoff_s = 0.0

    def stop(self, timeout_s: float = 5.0) -> None:
        """Ask every producer to stop (they send end-of-stream), then make sure they did."""
        self.stopping = True
        self._stop.set()
        deadline = time.monotonic() + timeout_s
        for state in self.producers.values():
            if state.proc is None:
                continue
            state.proc.join(max(0.0, deadline - time.monotonic()))
            if state.proc.is_alive():
                log.warning("producer %s did not stop in %.0f s; terminating it",
                            state.source_id, timeout_s)
                state.proc.terminate()
                state.proc.join(2.0)
                if state.proc.is_alive():
                    state.proc.kill()
                    state.proc.join(2.0)
