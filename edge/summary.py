"""How a run ended, and where every captured frame went.

The summary is what `grad-edge run` prints, writes to ``summary.json`` and stores on the
run's row. Its accounting holds per source:

    captured = judged + dropped + unjudged at stop + lost

- **captured**: frames the source produced, counted by the producer in shared memory (exact
  even when the producer is killed); for a remote source (``transport: tcp``, no producer
  on this host) its producer's own counters from its end-of-stream or last heartbeat (every
  life of it, when it was restarted), and never fewer than the frames that arrived;
- **judged**: frames that got a verdict (a late verdict whose reject was missed is judged,
  and counted again under ``missed_rejects``);
- **dropped**: by the producer's queue or the worker's (``latest`` policy), each counted;
- **unjudged at stop**: in the worker's queue, or still in the producer (its end-of-stream
  says how many), when the run stopped;
- **lost**: captured but never delivered nor reported: in the queue of a producer that was
  killed (at most its small queue), or in transit when a stream broke off. For a remote
  source, ``lost_in_transit`` says how many of them its producer sent and this worker never
  received (a link cut while they were on the wire).

``unaccounted`` is what the counters cannot explain: frames the worker received but neither
judged, dropped nor left queued, or more frames delivered than captured. It must be 0.
"""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass


class RunOutcome(enum.Enum):
    """How a run ended; the value is the process exit code."""

    COMPLETED = 0         # every source ended cleanly
    FAILED = 1            # a source failed (or the line stopped itself, e.g. a missed reject)
    INTERRUPTED = 130     # SIGINT (Ctrl-C)
    TERMINATED = 143      # SIGTERM

    @property
    def exit_code(self) -> int:
        return self.value

    @property
    def run_status(self) -> str:
        """The run's status in the defect log."""
        return {RunOutcome.COMPLETED: "completed", RunOutcome.FAILED: "failed"}.get(
            self, "interrupted")


@dataclass(frozen=True)
class RunSummary:
    run_id: int
    seconds: float
    counters: dict
    database: str
    results: str
    outcome: RunOutcome = RunOutcome.COMPLETED

    def to_dict(self) -> dict:
        d = asdict(self)
        d["outcome"] = self.outcome.name.lower()
        d["exit_code"] = self.outcome.exit_code
        return d


def account(worker, supervisor) -> dict[str, dict]:
    """Per source, where its captured frames went (see the module docstring)."""
    rows = {}
    for inbox in worker.inboxes:
        sid = inbox.source_id
        state = supervisor.producers.get(sid) if supervisor is not None else None
        st = inbox.stats
        received = st.received
        judged = worker.stats.judged_by_source.get(sid, 0)
        dropped_worker = inbox.dropped
        in_queue = inbox.queue.qsize() + st.held_at_stop
        if state is not None:
            dropped_producer = st.producer_dropped + state.dropped_by_dead
            captured = state.captured.value
        else:
            # No producer here: its reports, over every life (a report lags the frames sent
            # after it, so what arrived is captured too).
            dropped_producer = st.earlier_dropped + st.producer_dropped
            captured = max(st.earlier_captured + st.producer_captured,
                           received + dropped_producer)
        undelivered = captured - dropped_producer - received
        # An end-of-stream says how many frames the last producer still held (unsent); what
        # else is missing went down with a killed producer or broke off in transit. Without
        # one (stopped before it came), all that is missing was still on its way.
        unsent = inbox.end.frames_unsent if inbox.end is not None else max(undelivered, 0)
        lost = max(undelivered - unsent, 0)
        unjudged = in_queue + min(unsent, max(undelivered, 0))
        unaccounted = (received - judged - dropped_worker - in_queue) + min(undelivered, 0)
        in_transit = (min(lost, max(st.earlier_sent + st.producer_sent - received, 0))
                      if state is None and inbox.end is not None else 0)
        rows[sid] = {
            "captured": captured, "judged": judged,
            "dropped": dropped_producer + dropped_worker,
            "dropped_by_producer": dropped_producer, "dropped_by_worker": dropped_worker,
            "unjudged_at_stop": unjudged, "lost": lost, "lost_in_transit": in_transit,
            "unaccounted": unaccounted,
            "missed_rejects": worker.scheduler.missed.get(sid, 0),
            # Parts that passed the camera with no frame captured (seq gaps, less the frames
            # dropped or lost after capture): a stall, a restart, an unreadable frame.
            "parts_not_captured": max(0, inbox.stats.seq_gaps - dropped_producer - lost),
            # A remote producer's restarts show as new lives of it (protocol: `producer`).
            "producer_restarts": state.restarts if state else max(st.lives - 1, 0),
            "ended": inbox.end.reason if inbox.end is not None else None,
        }
    return rows


def format_summary(s: RunSummary) -> str:
    c = s.counters
    lat = ("-" if c["latency_p50_ms"] is None else
           f"p50 {c['latency_p50_ms']:.1f} ms, p99 {c['latency_p99_ms']:.1f} ms")
    lines = [
        f"run {s.run_id}: {c['frames']} frames in {s.seconds:.1f}s ({c['fps']:.1f} fps), "
        f"latency {lat} -- {s.outcome.name.lower()} (exit {s.outcome.exit_code})"
        + (f": {c['stop_reason']}" if c.get("stop_reason") else ""),
        f"  OK {c['ok']}, DEFECT {c['defects']}, UNKNOWN {c['unknown']}, rejects fired "
        f"{c['rejects']}, MISSED rejects {c['missed_rejects']}, dropped "
        f"{c['dropped'] + c['producer_dropped']}, corrupt {c['corrupt']}",
    ]
    for sid, a in c.get("accounting", {}).items():
        lines.append(
            f"  {sid}: captured {a['captured']} = judged {a['judged']} + dropped "
            f"{a['dropped']} + unjudged at stop {a['unjudged_at_stop']} + lost "
            f"{a['lost']}" + (f" ({a['lost_in_transit']} in transit)"
                              if a.get("lost_in_transit") else "")
            + f"; unaccounted {a['unaccounted']}"
            + (f"; producer restarts {a['producer_restarts']}" if a["producer_restarts"] else "")
            + (f"; PARTS NOT CAPTURED {a['parts_not_captured']}" if a["parts_not_captured"]
               else ""))
    for sid, t in (c.get("truth") or {}).items():
        lines.append(
            f"  {sid} against the source's truth: injected defects found {t['found']} of "
            f"{t['defective']}" + (f" ({t['unknown_defective']} UNKNOWN)"
                                    if t["unknown_defective"] else "")
            + f"; good parts rejected {t['false_rejects']} of {t['good']}"
            + (f" ({t['unknown_good']} UNKNOWN)" if t.get("unknown_good") else ""))
    kept = sum((c.get("kept_frames") or {}).values())
    if kept:
        lines.append(f"  near-threshold good frames kept for retraining: {kept}")
    lines += [f"  defect log: {s.database}", f"  per-frame results: {s.results}"]
    return "\n".join(lines)
