"""The shift report: per run, or per shift of a day, and per source: parts, defects,
false-positive rate, unknowns, missed rejects, the score histogram against the threshold,
and a what-if threshold that recounts from the stored scores.

Every frame's score is in the run's results file (``results-<run id>.jsonl``, one line per
judged frame); what operators said (false positives) and what the ejector did (missed
rejects) are in the defect log.
"""

from __future__ import annotations

import bisect
import datetime as dt
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from edge.defect_log import DefectFilter, DefectLogReader

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Window:
    """What a report covers: a run, or a time range (a shift)."""

    label: str
    run_ids: tuple[int, ...]
    since: float | None = None
    until: float | None = None
    run_id: int | None = None          # when it is exactly one run


@dataclass
class SourceScores:
    """One source's frames in the window: sorted scores, with truth when the source knew it."""

    scores: list[float] = field(default_factory=list)        # sorted, failed frames left out
    parts: set = field(default_factory=set)
    frames: int = 0
    verdicts: dict[str, int] = field(default_factory=lambda: {"OK": 0, "DEFECT": 0,
                                                              "UNKNOWN": 0})
    threshold: float | None = None
    truth_scores: dict[int, list[float]] = field(default_factory=lambda: {0: [], 1: []})


def shift_window(day: dt.date, index: int, starts: list[str]) -> Window:
    """Shift `index` of `day` (local time): from its start to the next shift's start."""
    times = sorted(dt.time(*map(int, s.split(":"))) for s in starts)
    if not 0 <= index < len(times):
        raise ValueError(f"shift {index}: there are {len(times)} shifts (0..{len(times) - 1})")
    start = dt.datetime.combine(day, times[index])
    end = (dt.datetime.combine(day, times[index + 1]) if index + 1 < len(times)
           else dt.datetime.combine(day + dt.timedelta(days=1), times[0]))
    return Window(f"{day} shift {index + 1} ({times[index]:%H:%M}-{end:%H:%M})", (),
                  start.timestamp(), end.timestamp())


def run_window(reader: DefectLogReader, run_id: int) -> Window:
    run = reader.get_run(run_id)
    if run is None:
        raise LookupError(f"no run {run_id} in the defect log")
    return Window(f"run {run_id}", (run_id,), None, None, run_id)


def load_scores(run_dir: Path, reader: DefectLogReader, window: Window
                ) -> tuple[dict[str, SourceScores], list[str]]:
    """Scores per source from the results files of the window's runs; and notes about runs
    whose file is missing."""
    run_ids = list(window.run_ids)
    if not run_ids:                     # a time range: the runs that overlap it
        run_ids = [r.id for r in reader.list_runs(limit=None)
                   if (window.until is None or r.started_at < window.until)
                   and (window.since is None or r.stopped_at is None
                        or r.stopped_at >= window.since)]
    out: dict[str, SourceScores] = {}
    notes = []
    for run_id in sorted(run_ids):
        path = run_dir / f"results-{run_id}.jsonl"
        if not path.is_file():
            notes.append(f"run {run_id}: no per-frame results ({path.name} is not in {run_dir})")
            continue
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    row = json.loads(line)
                except ValueError:
                    continue                 # a line cut by a crash
                t = row.get("time")
                if (window.since is not None and (t is None or t < window.since)) or (
                        window.until is not None and (t is None or t >= window.until)):
                    continue
                s = out.setdefault(row["source_id"], SourceScores())
                s.frames += 1
                s.verdicts[row["verdict"]] = s.verdicts.get(row["verdict"], 0) + 1
                s.parts.add(row["part_id"] if row.get("part_id") is not None else
                            (run_id, row["seq"]))
                s.threshold = row.get("threshold", s.threshold)
                if row.get("raw_score") is not None:
                    s.scores.append(row["raw_score"])
                    if row.get("truth") is not None:
                        s.truth_scores[int(bool(row["truth"]))].append(row["raw_score"])
    for s in out.values():
        s.scores.sort()
        for v in s.truth_scores.values():
            v.sort()
    return out, notes


def at_or_above(sorted_scores: list[float], t: float) -> int:
    return len(sorted_scores) - bisect.bisect_left(sorted_scores, t)


def summary_rows(reader: DefectLogReader, window: Window,
                 scores: dict[str, SourceScores]) -> list[dict]:
    """One row per source (and the whole line): what the shift report table shows."""
    where = DefectFilter(run_id=window.run_id, since=window.since, until=window.until)
    counts = reader.defect_counts(where)
    rejects = reader.reject_counts(run_id=window.run_id, since=window.since,
                                   until=window.until)
    sources = sorted(set(scores) | {c["source_id"] for c in counts})
    rows = []
    for sid in sources:
        s = scores.get(sid, SourceScores())
        logged = sum(c["n"] for c in counts if c["source_id"] == sid and c["verdict"] == "DEFECT")
        fp = sum(c["n"] for c in counts if c["source_id"] == sid
                 and c["judgement"] == "false_positive")
        judged = sum(c["n"] for c in counts if c["source_id"] == sid and c["judgement"])
        rows.append({
            "source_id": sid, "parts": len(s.parts), "frames": s.frames,
            "defects": s.verdicts["DEFECT"] if s.frames else logged,
            "unknown": s.verdicts["UNKNOWN"] if s.frames else sum(
                c["n"] for c in counts if c["source_id"] == sid and c["verdict"] == "UNKNOWN"),
            "judged": judged, "false_positives": fp,
            "fp_rate": fp / judged if judged else None,
            "missed_rejects": sum(r["n"] for r in rejects if r["source_id"] == sid
                                  and r["outcome"] == "missed"),
            "rejects_fired": sum(r["n"] for r in rejects if r["source_id"] == sid
                                 and r["outcome"] == "fired"),
            "threshold": s.threshold})
    return rows


def histogram_svg(s: SourceScores, threshold: float | None, bins: int = 40,
                  width: int = 560, height: int = 140) -> dict:
    """Bars of the score histogram (good-truth, defect-truth or unlabelled) and the x scale,
    for the template's inline SVG."""
    if not s.scores:
        return {"bars": [], "lo": 0.0, "hi": 1.0, "width": width, "height": height}
    lo = s.scores[0]
    hi = max(s.scores[-1], threshold or s.scores[-1])
    hi = hi if hi > lo else lo + 1.0
    step = (hi - lo) / bins
    labelled = bool(s.truth_scores[0] or s.truth_scores[1])
    series = ({"good": s.truth_scores[0], "defective": s.truth_scores[1]} if labelled
              else {"frames": s.scores})
    counts = {k: [0] * bins for k in series}
    for k, values in series.items():
        for v in values:
            counts[k][min(int((v - lo) / step), bins - 1)] += 1
    top = max(max(c) for c in counts.values()) or 1
    bars = []
    for k, c in counts.items():
        for i, n in enumerate(c):
            if n:
                h = (height - 20) * n / top
                bars.append({"x": width * i / bins, "w": max(1.0, width / bins - 1),
                             "y": height - 20 - h, "h": h, "kind": k, "n": n,
                             "from": lo + i * step})
    return {"bars": bars, "lo": lo, "hi": hi, "width": width, "height": height,
            "x_of_threshold": None if threshold is None else
            width * (threshold - lo) / (hi - lo)}


def what_if(scores: dict[str, SourceScores], reader: DefectLogReader, window: Window,
            t: float) -> dict:
    """At threshold `t`: per source, frames at or above it, and (where known) defective parts
    found and good parts flagged; and how many of the frames operators marked false positive
    would still be flagged."""
    fps = reader.browse(DefectFilter(run_id=window.run_id, since=window.since,
                                     until=window.until, judgement="false_positive"),
                        limit=None).rows
    out = {}
    for sid, s in scores.items():
        row = {"frames": s.frames, "flagged": at_or_above(s.scores, t),
               "false_positives_still_flagged": sum(
                   1 for d in fps if d.source_id == sid and d.raw_score is not None
                   and d.raw_score >= t)}
        if s.truth_scores[0] or s.truth_scores[1]:
            row["defective"] = len(s.truth_scores[1])
            row["defective_found"] = at_or_above(s.truth_scores[1], t)
            row["good"] = len(s.truth_scores[0])
            row["good_flagged"] = at_or_above(s.truth_scores[0], t)
        out[sid] = row
    return {"threshold": t, "sources": out}
