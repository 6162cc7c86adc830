"""The records the writer takes: frozen dataclasses, and their JSON form for spool files."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edge.results import Decision

if TYPE_CHECKING:
    from edge.reject import RejectEvent

logger = logging.getLogger(__name__)

@dataclass(frozen=True)
class DefectRecord:
    """A defect (or UNKNOWN) to log; ``id`` is handed out by :meth:`DefectLogWriter.submit`."""

    source_id: str
    seq: int
    time: float                     # capture time, seconds since the epoch
    verdict: str                    # "DEFECT" or "UNKNOWN"
    reason: str
    part_id: int | None = None
    encoder: int | None = None
    raw_score: float | None = None
    calibrated_score: float | None = None
    threshold: float | None = None
    box: tuple[int, int, int, int] | None = None
    area_px: int = 0
    frame_path: str | None = None
    heatmap_path: str | None = None
    run_id: int | None = None
    id: int | None = None

    @classmethod
    def from_decision(cls, decision: Decision, *, run_id: int | None = None,
                      threshold: float | None = None, frame_path: str | None = None,
                      heatmap_path: str | None = None) -> DefectRecord:
        """`threshold`: the one the rules used (RuleEngine.threshold_for), if not the worker's."""
        r = decision.result
        return cls(
            source_id=r.source_id, seq=r.seq, time=r.wall_time, verdict=decision.verdict.value,
            reason=decision.reason, part_id=r.part_id, encoder=r.encoder,
            raw_score=r.raw_score, calibrated_score=r.calibrated_score,
            threshold=r.threshold if threshold is None else threshold,
            box=tuple(r.box) if r.box is not None else None, area_px=r.area_px,
            frame_path=frame_path, heatmap_path=heatmap_path, run_id=run_id,
        )


@dataclass(frozen=True)
class RejectRecord:
    """A fired reject; ``id`` is handed out by :meth:`DefectLogWriter.submit`."""

    source_id: str
    issued_at: float
    part_id: int | None = None
    defect_id: int | None = None
    due_encoder: int | None = None
    due_time: float | None = None
    fired_at: float | None = None
    sinks_ok: tuple[str, ...] = ()
    sinks_failed: tuple[str, ...] = ()
    acknowledged_at: float | None = None
    run_id: int | None = None
    id: int | None = None

    @classmethod
    def from_fired(cls, event: RejectEvent, sinks_ok: Sequence[str],
                   sinks_failed: Sequence[str], *, fired_at: float | None = None,
                   run_id: int | None = None) -> RejectRecord:
        """From the scheduler's ``on_fired(event, ok, failed)`` callback."""
        return cls(
            source_id=event.source_id, issued_at=event.issued_at, part_id=event.part_id,
            defect_id=event.defect_id, due_encoder=event.due_encoder, due_time=event.due_time,
            fired_at=time.time() if fired_at is None else fired_at,
            sinks_ok=tuple(sinks_ok), sinks_failed=tuple(sinks_failed), run_id=run_id,
        )


@dataclass(frozen=True)
class RunEndRecord:
    """Closes a run: goes through the queue so it is retried and spooled like the rest."""

    run_id: int
    stopped_at: float
    summary: dict[str, Any] | None = None


LogRecord = DefectRecord | RejectRecord | RunEndRecord
_RECORD_KINDS: dict[str, type] = {"defect": DefectRecord, "reject": RejectRecord,
                                  "run_end": RunEndRecord}


def _record_to_json(record: LogRecord) -> str:
    kind = next(k for k, cls in _RECORD_KINDS.items() if isinstance(record, cls))
    return json.dumps({"kind": kind, "record": dataclasses.asdict(record)}, sort_keys=True)


def _record_from_json(line: str) -> LogRecord:
    obj = json.loads(line)
    fields = dict(obj["record"])
    # JSON has no tuples; the frozen records want them back.
    for name in ("box", "sinks_ok", "sinks_failed"):
        if isinstance(fields.get(name), list):
            fields[name] = tuple(fields[name])
    return _RECORD_KINDS[obj["kind"]](**fields)


def _read_spool(path: Path) -> list[LogRecord]:
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(_record_from_json(line))
        except (ValueError, KeyError, TypeError) as exc:
            # Most likely the last line of a spool cut off by a crash.
            logger.error("defect log spool %s line %d is not a record (%s); skipping: %r",
                         path, number, exc, line[:200])
    return records

