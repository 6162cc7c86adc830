"""The line's metrics, exported in one place: Prometheus text on /metrics, and /healthz.

The numbers live with what they count: the worker's stats and inboxes (frames, verdicts,
drops, corrupt messages, silent and DOWN sources), the reject scheduler (missed rejects,
sink failures, alarms), the defect log's writer (queue depth, spool, journal failures), the
supervisor (captured frames, restarts). :class:`LineCollector` reads them when scraped; the
only numbers it keeps itself are per-source ones the worker has no use for (a latency
histogram, fps and percentiles over a rolling window, the last score, the count against the
source's truth), fed by :meth:`LineCollector.observe`, which the worker calls for every
judged frame (``Worker.observers``).

The operator station reads the line's state from this text (``station.link``), never from
the worker's objects, so it can run in another process: ``metrics.port`` serves it over
HTTP (:class:`MetricsServer`), beside ``/healthz``.

/healthz answers 200 when the line is healthy and 503 with the reasons when a source is
silent (no message at all) or DOWN (no frame for ``max_frame_gap_s``), or the writer is
stuck (records wait and none has landed for ``writer_stuck_s``).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                    HistogramMetricFamily, InfoMetricFamily)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

log = logging.getLogger(__name__)

# Capture-to-verdict latency buckets (ms): a line's budget is tens to hundreds of ms.
LATENCY_BUCKETS_MS = (5, 10, 20, 35, 50, 75, 100, 150, 200, 300, 500, 1000, 2000, 5000)
WINDOW_S = 5.0              # fps over the last 5 s
PERCENTILE_WINDOW = 1000    # p50/p99 over the last 1000 frames of a source


@dataclass
class SourceWindow:
    """What the collector keeps per source (the worker keeps no per-source latency)."""

    buckets: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS_MS) + 1))
    latency_sum_ms: float = 0.0
    verdicts: dict[str, int] = field(default_factory=lambda: {"OK": 0, "DEFECT": 0,
                                                              "UNKNOWN": 0})
    rejected: int = 0
    recent: deque = field(default_factory=lambda: deque(maxlen=PERCENTILE_WINDOW))
    times: deque = field(default_factory=lambda: deque(maxlen=4096))
    last_score: float | None = None
    threshold: float | None = None
    # Against the source's truth (the synthetic line knows which parts carry a defect):
    # (truth, verdict) -> frames, and good parts rejected.
    truth: dict[tuple[int, str], int] = field(default_factory=dict)
    good_rejected: int = 0


class LineCollector:
    """A prometheus-client collector over one running line (see the module docstring)."""

    def __init__(self, worker, writer, *, supervisor=None, run_id: int | None = None,
                 run_token: str | None = None, model_hash: str | None = None,
                 backend: str | None = None, writer_stuck_s: float = 10.0,
                 extra_counts=None):
        self.worker = worker
        self.writer = writer
        self.supervisor = supervisor
        self.run_id = run_id
        self.run_token = run_token
        self.model_hash = model_hash
        self.backend = backend
        self.writer_stuck_s = writer_stuck_s
        # () -> {source: n}: counters kept elsewhere (the near-threshold keeper's frames).
        self.extra_counts = extra_counts or {}
        self.sources: dict[str, SourceWindow] = {i.source_id: SourceWindow()
                                                 for i in worker.inboxes}
        self._lock = threading.Lock()
        self._written = (writer.written, time.monotonic())

    # --- fed by the worker, one call per judged frame -----------------------------------

    def observe(self, frame, result, decision) -> None:
        latency_ms = (time.monotonic_ns() - frame.mono_ns) / 1e6
        with self._lock:
            w = self.sources.setdefault(frame.source_id, SourceWindow())
            i = next((k for k, b in enumerate(LATENCY_BUCKETS_MS) if latency_ms <= b),
                     len(LATENCY_BUCKETS_MS))
            w.buckets[i] += 1
            w.latency_sum_ms += latency_ms
            w.recent.append(latency_ms)
            w.times.append(time.monotonic())
            verdict = decision.verdict.value
            w.verdicts[verdict] = w.verdicts.get(verdict, 0) + 1
            w.rejected += bool(decision.reject)
            w.last_score = result.raw_score
            w.threshold = result.threshold
            if frame.truth is not None:
                key = (int(frame.truth), verdict)
                w.truth[key] = w.truth.get(key, 0) + 1
                if not frame.truth and decision.reject:
                    w.good_rejected += 1

    def truth_score(self) -> dict[str, dict] | None:
        """Per source, how the run did against the source's truth; None when no frame
        carried truth. ``found``: defective parts judged DEFECT; ``false_rejects``: good
        parts rejected (DEFECT, or UNKNOWN under unknown_rejects); ``unknown_good``: good parts
        judged UNKNOWN (a late or failed result), so that a line falling behind does not read
        as a model rejecting good parts."""
        out = {}
        with self._lock:
            for sid, w in self.sources.items():
                if not w.truth:
                    continue
                bad = {v: n for (t, v), n in w.truth.items() if t}
                good = {v: n for (t, v), n in w.truth.items() if not t}
                out[sid] = {"defective": sum(bad.values()), "found": bad.get("DEFECT", 0),
                            "missed": bad.get("OK", 0), "unknown_defective": bad.get("UNKNOWN", 0),
                            "good": sum(good.values()), "false_rejects": w.good_rejected,
                            "good_flagged": good.get("DEFECT", 0),
                            "unknown_good": good.get("UNKNOWN", 0)}
        return out or None

    # --- health -------------------------------------------------------------------------

    def health(self) -> dict:
        """{"ok": bool, "problems": [...], "checked_at": epoch s} (see the module docstring)."""
        problems = []
        for sid in sorted(self.worker.silent_sources):
            problems.append(f"source {sid} is silent (no frames or heartbeats)")
        for sid in sorted(set(self.worker.down_sources)):
            problems.append(f"source {sid} is DOWN (no frame within its max_frame_gap_s)")
        stuck = self.writer_stuck_for()
        if stuck is not None:
            problems.append(f"defect log writer stuck: {self.writer.pending} record(s) waiting, "
                            f"none written for {stuck:.0f} s")
        return {"ok": not problems, "problems": problems, "checked_at": time.time()}

    def writer_stuck_for(self) -> float | None:
        """Seconds since the writer last landed a record while records wait; None if not
        stuck (nothing waits, or it wrote within writer_stuck_s)."""
        now = time.monotonic()
        written, since = self._written
        if self.writer.written != written or not self.writer.pending:
            self._written = (self.writer.written, now)
            return None
        waited = now - since
        return waited if waited >= self.writer_stuck_s else None

    # --- the scrape ---------------------------------------------------------------------

    def collect(self):
        yield from self._per_source()
        yield from self._line_wide()

    def _per_source(self):
        worker = self.worker
        frames = CounterMetricFamily("grad_edge_frames", "frames judged", labels=["source"])
        verdicts = CounterMetricFamily("grad_edge_verdicts", "verdicts by kind",
                                       labels=["source", "verdict"])
        rejected = CounterMetricFamily("grad_edge_rejects_decided",
                                       "parts the rules decided to reject",
                                       labels=["source"])
        latency = HistogramMetricFamily("grad_edge_latency_ms",
                                        "capture to verdict, milliseconds", labels=["source"])
        p50 = GaugeMetricFamily("grad_edge_latency_p50_ms",
                                f"median latency over the last {PERCENTILE_WINDOW} frames",
                                labels=["source"])
        p99 = GaugeMetricFamily("grad_edge_latency_p99_ms",
                                f"99th percentile latency over the last {PERCENTILE_WINDOW} "
                                "frames", labels=["source"])
        fps = GaugeMetricFamily("grad_edge_fps", f"frames judged per second over the last "
                                f"{WINDOW_S:g} s", labels=["source"])
        score = GaugeMetricFamily("grad_edge_last_score", "score of the last judged frame",
                                  labels=["source"])
        threshold = GaugeMetricFamily("grad_edge_threshold", "raw-score threshold in force",
                                      labels=["source"])
        dropped = CounterMetricFamily("grad_edge_dropped", "frames dropped (by the producer's "
                                      "queue or the worker's)", labels=["source", "by"])
        corrupt = CounterMetricFamily("grad_edge_corrupt_messages", "messages refused as "
                                      "corrupt", labels=["source"])
        missed = CounterMetricFamily("grad_edge_missed_rejects", "rejects whose verdict came "
                                     "after the part passed the ejector", labels=["source"])
        up = GaugeMetricFamily("grad_edge_source_up", "1 while the source delivers frames, 0 "
                               "when it is DOWN or silent", labels=["source", "state"])
        truth = CounterMetricFamily("grad_edge_truth", "frames by the source's truth (1: "
                                    "defective part) and verdict", labels=["source", "truth",
                                                                           "verdict"])
        kept = CounterMetricFamily("grad_edge_kept_frames", "near-threshold good frames kept "
                                   "for retraining", labels=["source"])
        silent = set(worker.silent_sources)
        down = set(worker.down_sources)
        missed_by = dict(worker.scheduler.missed)
        kept_by = self.extra_counts.get("kept", lambda: {})()
        now = time.monotonic()
        with self._lock:
            windows = {sid: w for sid, w in self.sources.items()}
            for inbox in worker.inboxes:
                sid = inbox.source_id
                w = windows.get(sid) or SourceWindow()
                frames.add_metric([sid], worker.stats.judged_by_source.get(sid, 0))
                for v, n in w.verdicts.items():
                    verdicts.add_metric([sid, v], n)
                rejected.add_metric([sid], w.rejected)
                cumulative, buckets = 0, []
                for bound, n in zip((*map(str, LATENCY_BUCKETS_MS), "+Inf"), w.buckets):
                    cumulative += n
                    buckets.append((bound, cumulative))
                latency.add_metric([sid], buckets, w.latency_sum_ms)
                if w.recent:
                    ordered = sorted(w.recent)
                    p50.add_metric([sid], ordered[int(0.50 * (len(ordered) - 1))])
                    p99.add_metric([sid], ordered[int(0.99 * (len(ordered) - 1))])
                recent = sum(1 for t in w.times if now - t <= WINDOW_S)
                span = min(WINDOW_S, now - worker.stats.started)
                fps.add_metric([sid], recent / span if span > 0 else 0.0)
                if w.last_score is not None:
                    score.add_metric([sid], w.last_score)
                if w.threshold is not None:
                    threshold.add_metric([sid], w.threshold)
                dropped.add_metric([sid, "worker"], inbox.dropped)
                dropped.add_metric([sid, "producer"], inbox.stats.producer_dropped)
                corrupt.add_metric([sid], inbox.stats.corrupt)
                missed.add_metric([sid], missed_by.get(sid, 0))
                state = ("down" if sid in down else "silent" if sid in silent else
                         "ended" if inbox.stats.ended else "up")
                up.add_metric([sid, state], 0 if state in ("down", "silent") else 1)
                for (t, v), n in sorted(w.truth.items()):
                    truth.add_metric([sid, str(t), v], n)
                kept.add_metric([sid], kept_by.get(sid, 0))
        yield from (frames, verdicts, rejected, latency, p50, p99, fps, score, threshold,
                    dropped, corrupt, missed, up, truth, kept)
        yield from self._accounting()

    def _accounting(self):
        from edge.summary import account

        fates = GaugeMetricFamily("grad_edge_accounting_frames", "where each source's captured "
                                  "frames went: captured = judged + dropped + "
                                  "unjudged_at_stop + lost (unaccounted must be 0)",
                                  labels=["source", "fate"])
        not_captured = GaugeMetricFamily("grad_edge_parts_not_captured", "parts that passed "
                                         "the camera with no frame captured",
                                         labels=["source"])
        restarts = CounterMetricFamily("grad_edge_producer_restarts", "producer restarts",
                                       labels=["source"])
        try:
            rows = account(self.worker, self.supervisor)
        except Exception:            # a count read mid-update: skip this scrape's table
            log.debug("accounting skipped in this scrape", exc_info=True)
            rows = {}
        for sid, a in rows.items():
            for fate in ("captured", "judged", "dropped", "unjudged_at_stop", "lost",
                         "unaccounted"):
                fates.add_metric([sid, fate], a[fate])
            not_captured.add_metric([sid], a["parts_not_captured"])
            restarts.add_metric([sid], a["producer_restarts"])
        yield from (fates, not_captured, restarts)

    def _line_wide(self):
        worker, writer = self.worker, self.writer
        fired = CounterMetricFamily("grad_edge_rejects_fired", "rejects fired at the sinks")
        fired.add_metric([], worker.stats.rejects_fired)
        yield fired
        sinks = CounterMetricFamily("grad_edge_sink_failures", "reject signals a sink failed "
                                    "to take", labels=["sink"])
        for name, n in dict(worker.scheduler.sink_failures).items():
            sinks.add_metric([name], n)
        yield sinks
        alarms = CounterMetricFamily("grad_edge_alarms", "alarms raised for a person",
                                     labels=["kind", "source"])
        counted: dict[tuple[str, str], int] = {}
        for alarm in list(worker.alarms):
            key = (alarm.kind, alarm.source_id or "")
            counted[key] = counted.get(key, 0) + 1
        for key, n in sorted(counted.items()):
            alarms.add_metric(list(key), n)
        yield alarms
        for name, text, value in (
                ("grad_edge_writer_queue_depth", "defect log records not yet committed",
                 writer.pending),
                ("grad_edge_writer_stuck_seconds", "seconds the writer has had records "
                 "waiting and landed none (0: not stuck)", self.writer_stuck_for() or 0.0)):
            g = GaugeMetricFamily(name, text)
            g.add_metric([], value)
            yield g
        for name, text, value in (
                ("grad_edge_writer_written", "defect log records committed", writer.written),
                ("grad_edge_writer_spooled", "records the writer had to spool to a file",
                 writer.spooled),
                ("grad_edge_writer_journal_failures", "records the journal could not take",
                 writer.journal_failures),
                ("grad_edge_writer_overflowed", "records that found the queue full (kept in "
                 "the journal)", writer.overflowed)):
            c = CounterMetricFamily(name, text)
            c.add_metric([], value)
            yield c
        spool = GaugeMetricFamily("grad_edge_spool_bytes", "size of the defect log's spool "
                                  "files (records waiting outside the database)")
        spool.add_metric([], _size(writer.spool_path) + _size(writer.failed_path))
        yield spool
        health = self.health()
        h = GaugeMetricFamily("grad_edge_healthy", "1 when /healthz is 200")
        h.add_metric([], 1 if health["ok"] else 0)
        yield h
        info = InfoMetricFamily("grad_edge_model", "the model the line runs")
        info.add_metric([], {"model_hash": self.model_hash or "", "backend": self.backend or ""})
        yield info
        run = InfoMetricFamily("grad_edge_run", "the run in progress")
        run.add_metric([], {"run_id": str(self.run_id or ""), "token": self.run_token or ""})
        yield run


def _size(path) -> int:
    try:
        return path.stat().st_size
    except (OSError, AttributeError):
        return 0


def registry_for(collector: LineCollector) -> CollectorRegistry:
    """A registry of its own (not the process-wide default): two lines in one process (tests)
    never mix their numbers."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return registry


def metrics_text(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)


class LinePublisher:
    """What a line publishes, from before its run opens to after it ends: its metrics text,
    its health and its live frames. A run attaches its collector and live frames when it
    starts; until then, and after it ends, health says why the line is not judging."""

    def __init__(self) -> None:
        self.collector: LineCollector | None = None
        self.registry: CollectorRegistry | None = None
        self.live = None
        self.state = "starting"       # starting | running | ended

    def attach(self, collector: LineCollector, live=None) -> None:
        self.collector, self.registry, self.live = collector, registry_for(collector), live
        self.state = "running"

    def metrics_text(self) -> bytes:
        return metrics_text(self.registry) if self.registry is not None else b""

    def health(self) -> dict:
        if self.state != "running" or self.collector is None:
            return {"ok": False, "problems": [f"the line is not running ({self.state})"],
                    "checked_at": time.time()}
        return self.collector.health()

    def live_index(self) -> dict:
        return self.live.index() if self.live is not None else {}

    def live_jpeg(self, source_id: str, seq: int) -> bytes | None:
        return self.live.jpeg(source_id, seq) if self.live is not None else None


class MetricsServer:
    """/metrics (Prometheus text), /healthz (JSON, 200 or 503) and the live frames of the
    line view (/live.json, /live/<source>/<seq>.jpg) on a port of their own, in a thread."""

    def __init__(self, publisher: LinePublisher, *, bind: str = "127.0.0.1", port: int = 0):
        self.publisher = publisher
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):             # noqa: N802 - the http.server API
                status, ctype, body = owner.answer(self.path)
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, fmt, *args):      # scrapes are not news
                log.debug("metrics: " + fmt, *args)

        try:
            self.server = ThreadingHTTPServer((bind, port), Handler)
        except OSError as exc:
            raise OSError(f"metrics: cannot listen on {bind}:{port} ({exc.strerror or exc}); "
                          "set metrics.port to a free port, or null to turn it off") from exc
        self.server.daemon_threads = True
        self.address = self.server.server_address[:2]
        self._thread = threading.Thread(target=self.server.serve_forever, name="metrics-http",
                                        daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.address[0]}:{self.address[1]}"

    def answer(self, path: str) -> tuple[int, str, bytes]:
        path = path.split("?", 1)[0]
        p = self.publisher
        if path == "/metrics":
            return 200, CONTENT_TYPE_LATEST, p.metrics_text()
        if path == "/healthz":
            h = p.health()
            return (200 if h["ok"] else 503), "application/json", json.dumps(h).encode()
        if path == "/live.json":
            return 200, "application/json", json.dumps(p.live_index()).encode()
        if path.startswith("/live/") and path.endswith(".jpg"):
            parts = path[len("/live/"):-len(".jpg")].split("/")
            if len(parts) == 2 and parts[1].isdigit():
                jpeg = p.live_jpeg(parts[0], int(parts[1]))
                if jpeg is not None:
                    return 200, "image/jpeg", jpeg
        return 404, "text/plain", b"not found\n"

    def start(self) -> MetricsServer:
        self._thread.start()
        log.info("metrics: %s/metrics and /healthz", self.url)
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
