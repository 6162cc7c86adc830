"""Plain-text tables of the defect log for the terminal."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

from edge.defect_log.reader import DefectView

def format_defect_table(rows: Sequence[DefectView]) -> str:
    """A plain-text table for the terminal."""
    if not rows:
        return "(no defects)"
    header = ("id", "time", "source", "seq", "part", "verdict", "score", "thr", "area", "ack",
              "reason")
    lines = [header]
    for r in rows:
        lines.append((
            str(r.id),
            dt.datetime.fromtimestamp(r.time).strftime("%Y-%m-%d %H:%M:%S"),
            r.source_id,
            str(r.seq),
            "-" if r.part_id is None else str(r.part_id),
            r.verdict,
            "-" if r.raw_score is None else f"{r.raw_score:.3g}",
            "-" if r.threshold is None else f"{r.threshold:.3g}",
            str(r.area_px),
            "yes" if r.acknowledged else "no",
            r.reason if len(r.reason) <= 60 else r.reason[:57] + "...",
        ))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    rendered = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip()
                for line in lines]
    rendered.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(rendered)
