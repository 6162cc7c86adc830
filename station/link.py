"""The station's view of the line: what the line publishes, read as a person needs it.

The station never touches the worker. It reads the Prometheus text the line publishes
(`edge.metrics`) and its live frames, either over HTTP from the line's metrics port
(:class:`HttpLineLink`, `grad-edge serve` in another process) or from the publisher of a line
running in the same process (:class:`LocalLineLink`, `grad-edge run --serve`). Both give the
same :class:`LineState`, parsed from the same text.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families


@dataclass
class SourceState:
    source_id: str
    state: str = "unknown"          # up | down | silent | ended
    frames: int = 0
    fps: float = 0.0
    p50_ms: float | None = None
    p99_ms: float | None = None
    ok: int = 0
    defects: int = 0
    unknown: int = 0
    dropped: int = 0
    corrupt: int = 0
    missed_rejects: int = 0
    last_score: float | None = None
    threshold: float | None = None
    kept: int = 0
    accounting: dict[str, int] = field(default_factory=dict)
    parts_not_captured: int = 0
    producer_restarts: int = 0
    truth: dict[str, int] = field(default_factory=dict)   # "1/DEFECT" -> n


@dataclass
class LineState:
    reachable: bool
    problem: str | None = None              # why the line cannot be read
    sources: dict[str, SourceState] = field(default_factory=dict)
    rejects_fired: int = 0
    sink_failures: dict[str, int] = field(default_factory=dict)
    alarms: dict[tuple[str, str], int] = field(default_factory=dict)   # (kind, source) -> n
    writer_queue: int = 0
    writer_stuck_s: float = 0.0
    spool_bytes: int = 0
    healthy: bool = False
    model_hash: str | None = None
    backend: str | None = None
    run_id: str | None = None

    @property
    def alarms_total(self) -> int:
        return sum(self.alarms.values())

    @property
    def down(self) -> list[str]:
        return [s.source_id for s in self.sources.values() if s.state in ("down", "silent")]


def parse_metrics(text: str) -> LineState:
    """The line's Prometheus text -> LineState (names as `edge.metrics` writes them)."""
    state = LineState(reachable=True)
    if not text.strip():
        return LineState(reachable=True, problem="the line is starting (no metrics yet)")

    def src(labels) -> SourceState:
        sid = labels["source"]
        return state.sources.setdefault(sid, SourceState(sid))

    for family in text_string_to_metric_families(text):
        for s in family.samples:
            name, labels, value = s.name, s.labels, s.value
            if name == "grad_edge_frames_total":
                src(labels).frames = int(value)
            elif name == "grad_edge_verdicts_total":
                attr = {"OK": "ok", "DEFECT": "defects", "UNKNOWN": "unknown"}[labels["verdict"]]
                setattr(src(labels), attr, int(value))
            elif name == "grad_edge_fps":
                src(labels).fps = value
            elif name == "grad_edge_latency_p50_ms":
                src(labels).p50_ms = value
            elif name == "grad_edge_latency_p99_ms":
                src(labels).p99_ms = value
            elif name == "grad_edge_last_score":
                src(labels).last_score = value
            elif name == "grad_edge_threshold":
                src(labels).threshold = value
            elif name == "grad_edge_dropped_total":
                src(labels).dropped += int(value)
            elif name == "grad_edge_corrupt_messages_total":
                src(labels).corrupt = int(value)
            elif name == "grad_edge_missed_rejects_total":
                src(labels).missed_rejects = int(value)
            elif name == "grad_edge_source_up":
                src(labels).state = labels["state"]
            elif name == "grad_edge_kept_frames_total":
                src(labels).kept = int(value)
            elif name == "grad_edge_truth_total":
                src(labels).truth[f"{labels['truth']}/{labels['verdict']}"] = int(value)
            elif name == "grad_edge_accounting_frames":
                src(labels).accounting[labels["fate"]] = int(value)
            elif name == "grad_edge_parts_not_captured":
                src(labels).parts_not_captured = int(value)
            elif name == "grad_edge_producer_restarts_total":
                src(labels).producer_restarts = int(value)
            elif name == "grad_edge_rejects_fired_total":
                state.rejects_fired = int(value)
            elif name == "grad_edge_sink_failures_total":
                state.sink_failures[labels["sink"]] = int(value)
            elif name == "grad_edge_alarms_total":
                state.alarms[(labels["kind"], labels["source"])] = int(value)
            elif name == "grad_edge_writer_queue_depth":
                state.writer_queue = int(value)
            elif name == "grad_edge_writer_stuck_seconds":
                state.writer_stuck_s = value
            elif name == "grad_edge_spool_bytes":
                state.spool_bytes = int(value)
            elif name == "grad_edge_healthy":
                state.healthy = bool(value)
            elif name == "grad_edge_model_info":
                state.model_hash, state.backend = labels.get("model_hash"), labels.get("backend")
            elif name == "grad_edge_run_info":
                state.run_id = labels.get("run_id")
    return state


class LocalLineLink:
    """A line in this process (`grad-edge run --serve`): its publisher, read directly."""

    def __init__(self, publisher) -> None:
        self.publisher = publisher
        self.where = "this process"

    def metrics_text(self) -> bytes:
        return self.publisher.metrics_text()

    def health(self) -> dict:
        return self.publisher.health()

    def state(self) -> LineState:
        if self.publisher.state == "starting":
            return LineState(reachable=True, problem="the line is starting")
        s = parse_metrics(self.metrics_text().decode())
        if self.publisher.state == "ended":
            s.problem = "the run has ended; these are its last numbers"
        return s

    def live_index(self) -> dict:
        return self.publisher.live_index()

    def live_jpeg(self, source_id: str, seq: int) -> bytes | None:
        return self.publisher.live_jpeg(source_id, seq)


class HttpLineLink:
    """A line in another process, through its metrics port (`metrics.port`)."""

    def __init__(self, base_url: str, timeout_s: float = 2.0) -> None:
        self.base = base_url.rstrip("/").removesuffix("/metrics")
        self.where = self.base
        self.timeout_s = timeout_s

    def _get(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(self.base + path, timeout=self.timeout_s) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def metrics_text(self) -> bytes:
        return self._get("/metrics")[1]

    def health(self) -> dict:
        try:
            return json.loads(self._get("/healthz")[1])
        except (OSError, ValueError) as exc:
            return {"ok": False, "problems": [f"line not reachable at {self.base} ({exc})"]}

    def state(self) -> LineState:
        try:
            return parse_metrics(self.metrics_text().decode())
        except (OSError, ValueError) as exc:
            return LineState(reachable=False,
                             problem=f"line not reachable at {self.base}/metrics ({exc}); is "
                                     "it running with metrics.port set?")

    def live_index(self) -> dict:
        try:
            return json.loads(self._get("/live.json")[1])
        except (OSError, ValueError):
            return {}

    def live_jpeg(self, source_id: str, seq: int) -> bytes | None:
        try:
            status, body = self._get(f"/live/{urllib.request.quote(source_id)}/{seq}.jpg")
        except OSError:
            return None
        return body if status == 200 else None
