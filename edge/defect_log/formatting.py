"""Plain-text tables of the defect log for the terminal (`grad-edge defects ...`), and the
readable form of one defect (`show`). Times are local, to the second."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

from edge.defect_log.reader import AlarmView, AuditView, DefectDetail, DefectView, RejectEventView, RunView


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


def judgement_text(r: DefectView) -> str:
    """`-`, `ack maria`, `FP li`, with `(2x)` when operators judged it more than once."""
    if r.judgement is None:
        return "-"
    text = f"{'FP' if r.judgement == 'false_positive' else 'ack'} {r.judged_by or '?'}"
    return text + (f" ({r.judgements}x)" if r.judgements > 1 else "")


def format_defect_table(rows: Sequence[DefectView]) -> str:
    """Defects, one a line; `judged`: the latest judgement (ack or FP = false positive)."""
    if not rows:
        return "(no defects)"
    return _table(
        ("id", "run", "time", "source", "seq", "part", "verdict", "score", "thr", "area",
         "judged", "reason"),
        [(str(r.id), _num(r.run_id, "{}"), _when(r.time), r.source_id, str(r.seq),
          _num(r.part_id, "{}"), r.verdict, _num(r.raw_score), _num(r.threshold),
          str(r.area_px), judgement_text(r), _cut(r.reason)) for r in rows])


def format_defect_detail(detail: DefectDetail) -> str:
    """One defect as a person reads it: what was seen, what was done, what operators said."""
    d = detail.defect
    box = "-" if d.box is None else "({}, {}) to ({}, {})".format(*d.box)
    rows = [
        ("defect", f"{d.id} ({d.verdict}) of run {_num(d.run_id, '{}')}"),
        ("time", _when(d.time)),
        ("source", f"{d.source_id}, frame {d.seq}, part {_num(d.part_id, '{}')}, encoder "
                   f"{_num(d.encoder, '{}')}"),
        ("score", f"{_num(d.raw_score, '{:.4g}')} against threshold "
                  f"{_num(d.threshold, '{:.4g}')} (calibrated {_num(d.calibrated_score, '{:.3g}')})"),
        ("region", f"{box}, {d.area_px} px above threshold"),
        ("reason", d.reason),
        ("rejected", {True: "yes", False: "no", None: "-"}[d.reject]),
        ("judged", {None: "not yet"}.get(d.judgement, f"{judgement_text(d)} at "
                                                     f"{_when(d.judged_at)}")),
        ("frame", d.frame_path or "-"),
        ("heatmap", d.heatmap_path or "-"),
    ]
    for ev in detail.reject_events:
        if ev.outcome == "fired":
            what = (f"fired {_when(ev.fired_at)} on {', '.join(ev.sinks_ok) or 'no sink'}"
                    + (f" (failed: {', '.join(ev.sinks_failed)})" if ev.sinks_failed else ""))
        else:
            what = f"{ev.outcome.upper()}: {ev.reason or '-'}"
        due = (f"due at count {ev.due_encoder}" if ev.due_encoder is not None else
               f"due {_when(ev.due_time)}" if ev.due_time is not None else "")
        rows.append(("reject", f"{what}{'; ' + due if due else ''}"))
    for a in detail.actions:
        action = {"ack": "acknowledged", "false_positive": "marked false positive",
                  "comment": "commented"}[a.action]
        text = f"{_when(a.time)} {a.operator} {action}"
        if a.previous_id is not None:
            text += " (a second judgement)"
        if a.comment:
            text += f": {a.comment}"
        if a.via:
            text += f"  [via {a.via}]"
        rows.append(("action", text))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:>{width}}: {v}" for k, v in rows)


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


def format_audit_table(rows: Sequence[AuditView]) -> str:
    """The audit trail, newest first."""
    if not rows:
        return "(no operator actions)"
    return _table(
        ("id", "time", "operator", "via", "action", "target", "detail"),
        [(str(r.id), _when(r.time), r.operator, r.via, r.action, r.target,
          _cut(", ".join(f"{k}={v}" for k, v in (r.detail or {}).items() if v is not None), 70))
         for r in rows])
