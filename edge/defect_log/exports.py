"""Exports of the defect log: CSV or JSONL, chosen by the file's suffix (anything else is
refused), carrying what operators said about each defect.

Each row has the defect's fields, its run, its time in UTC and in local time, the latest
judgement (ack | false_positive), who gave it and when, how many judgements there were, and
every operator action (judgements and comments, with operator, time and where from). JSONL
carries the actions as a list; CSV as one JSON text cell (a spreadsheet shows it whole).
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edge.defect_log.engine import DefectLogError, is_disk_full

if TYPE_CHECKING:
    from edge.defect_log.reader import DefectFilter, DefectLogReader

EXPORT_FORMATS = {".csv": "csv", ".jsonl": "jsonl"}

EXPORT_COLUMNS = ("id", "run_id", "time", "time_iso", "time_local", "source_id", "seq",
                  "part_id", "encoder", "raw_score", "calibrated_score", "threshold", "verdict",
                  "reject", "reason", "x0", "y0", "x1", "y1", "area_px", "frame_path",
                  "heatmap_path", "acknowledged", "judgement", "judged_by", "judged_at_iso",
                  "judgements", "comments", "actions")


def export_format(path: str | os.PathLike) -> str:
    """csv or jsonl, from the suffix; anything else is refused rather than guessed."""
    suffix = Path(path).suffix.lower()
    if suffix not in EXPORT_FORMATS:
        raise ValueError(f"export {path}: unknown format {suffix or '(no suffix)'!r}; name the "
                         "file .csv or .jsonl")
    return EXPORT_FORMATS[suffix]


def _iso(t: float | None, tz=dt.timezone.utc) -> str | None:
    return None if t is None else dt.datetime.fromtimestamp(t, tz).isoformat()


def export_rows(reader: DefectLogReader, where: DefectFilter,
                limit: int | None = None) -> list[dict[str, Any]]:
    rows = list(reversed(reader.browse(where, limit=limit).rows))      # oldest first
    actions = reader.actions_for([r.id for r in rows])
    out = []
    for r in rows:
        x0, y0, x1, y1 = r.box if r.box is not None else (None, None, None, None)
        acts = [{"time_iso": _iso(a.time), "operator": a.operator, "action": a.action,
                 "comment": a.comment, "via": a.via,
                 "second_judgement": a.previous_id is not None} for a in actions[r.id]]
        out.append({
            "id": r.id, "run_id": r.run_id, "time": r.time, "time_iso": _iso(r.time),
            "time_local": _iso(r.time, None), "source_id": r.source_id, "seq": r.seq,
            "part_id": r.part_id, "encoder": r.encoder, "raw_score": r.raw_score,
            "calibrated_score": r.calibrated_score, "threshold": r.threshold,
            "verdict": r.verdict, "reject": r.reject, "reason": r.reason, "x0": x0, "y0": y0,
            "x1": x1, "y1": y1, "area_px": r.area_px, "frame_path": r.frame_path,
            "heatmap_path": r.heatmap_path, "acknowledged": r.acknowledged,
            "judgement": r.judgement, "judged_by": r.judged_by,
            "judged_at_iso": _iso(r.judged_at), "judgements": r.judgements,
            "comments": " | ".join(f"{a['operator']}: {a['comment']}" for a in acts
                                   if a["comment"]) or None,
            "actions": acts})
    return out


def write_export(reader: DefectLogReader, path: str | os.PathLike, where: DefectFilter, *,
                 limit: int | None = None, fmt: str | None = None) -> int:
    """Write the export; returns the number of defects written."""
    fmt = fmt or export_format(path)
    rows = export_rows(reader, where, limit)
    with _export_errors(path):
        if fmt == "csv":
            with open(path, "w", newline="", encoding="utf-8") as out:
                writer = csv.DictWriter(out, fieldnames=EXPORT_COLUMNS)
                writer.writeheader()
                writer.writerows({**row, "actions": json.dumps(row["actions"])}
                                 for row in rows)
        else:
            with open(path, "w", encoding="utf-8") as out:
                out.writelines(json.dumps(row) + "\n" for row in rows)
    return len(rows)


@contextmanager
def _export_errors(path: str | os.PathLike) -> Iterator[None]:
    try:
        yield
    except OSError as exc:
        what = "disk full" if is_disk_full(exc) else exc.strerror or str(exc)
        raise DefectLogError(f"cannot write the export {path} ({what}); choose another file "
                             "or free space on its disk") from exc
