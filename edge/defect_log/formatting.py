"""Plain-text tables of the defect log for the terminal (`grad-edge defects ...`)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

from edge.defect_log.reader import AlarmView, DefectView, RejectEventView, RunView


def _when(t: float | None) -> str:
    return "-" if t is None else dt.datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S")


def _num(x: float | int | None, fmt: str = "{:.3g}") -> str:
    return "-" if x is None else fmt.format(x)


def _cut(text: str | None, width: int = 60) -> str:
    text = text or ""
    return text if len(text) <= width else text[: width - 3] + "..."


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    lines = [header, *rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    rendered = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip()
                for line in lines]
    rendered.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(rendered)


def format_defect_table(rows: Sequence[DefectView]) -> str:
    """Defects, one a line."""
    if not rows:
        return "(no defects)"
    return _table(
        ("id", "time", "source", "seq", "part", "verdict", "score", "thr", "area", "ack",
         "reason"),
        [(str(r.id), _when(r.time), r.source_id, str(r.seq), _num(r.part_id, "{}"), r.verdict,
          _num(r.raw_score), _num(r.threshold), str(r.area_px),
          "yes" if r.acknowledged else "no", _cut(r.reason)) for r in rows])


def format_runs_table(rows: Sequence[RunView]) -> str:
    """Runs, newest first, with how each ended."""
    if not rows:
        return "(no runs)"
    return _table(
        ("id", "started", "stopped", "status", "exit", "host", "pid", "frames"),
        [(str(r.id), _when(r.started_at), _when(r.stopped_at),
          "running (process gone)" if r.process_alive is False else r.status,
          _num(r.exit_code, "{}"), r.host or "-", _num(r.pid, "{}"),
          _num((r.summary or r.progress or {}).get("frames"), "{}")) for r in rows])


def format_rejects_table(rows: Sequence[RejectEventView]) -> str:
    """Rejects: fired (which sinks took it), missed or unconfirmed (why)."""
    if not rows:
        return "(no rejects)"
    return _table(
        ("id", "defect", "source", "part", "outcome", "fired", "sinks ok", "failed", "reason"),
        [(str(r.id), _num(r.defect_id, "{}"), r.source_id, _num(r.part_id, "{}"), r.outcome,
          _when(r.fired_at), ",".join(r.sinks_ok) or "-", ",".join(r.sinks_failed) or "-",
          _cut(r.reason)) for r in rows])


def format_alarms_table(rows: Sequence[AlarmView]) -> str:
    """Alarms, newest first."""
    if not rows:
        return "(no alarms)"
    return _table(
        ("id", "time", "run", "source", "kind", "message"),
        [(str(r.id), _when(r.time), _num(r.run_id, "{}"), r.source_id or "-", r.kind,
          _cut(r.message, 80)) for r in rows])
