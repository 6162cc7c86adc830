"""The records the writer takes: frozen dataclasses, and their one JSON form (journal, spool).

Defect, reject and alarm records get their ``id`` from the writer (``submit`` fills it in, or
``reserve_defect_id`` hands one out first, so the saved images can carry it). The id is what
makes replaying a journal idempotent: a record whose id is already in the database is skipped.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from edge.defect_log.tables import REJECT_OUTCOMES, RUN_STATUSES
from edge.results import Decision

if TYPE_CHECKING:
    from edge.reject import RejectEvent

DEFECT_VERDICTS = ("DEFECT", "UNKNOWN")


@dataclass(frozen=True)
class DefectRecord:
    """A defect (or UNKNOWN) to log."""

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
    reject: bool | None = None      # the rules decided to reject the part

    def __post_init__(self) -> None:
        if self.verdict not in DEFECT_VERDICTS:
            raise ValueError(f"DefectRecord verdict {self.verdict!r}: only DEFECT and UNKNOWN "
                             "frames are logged")

    @classmethod
    def from_decision(cls, decision: Decision, *, run_id: int | None = None,
                      threshold: float | None = None, frame_path: str | None = None,
                      heatmap_path: str | None = None, id: int | None = None) -> DefectRecord:
        """`threshold`: the one the rules used (RuleEngine.threshold_for), if not the worker's;
        `id`: from DefectLogWriter.reserve_defect_id() when the images were named with it."""
        r = decision.result
        return cls(
            source_id=r.source_id, seq=r.seq, time=r.wall_time, verdict=decision.verdict.value,
            reason=decision.reason, part_id=r.part_id, encoder=r.encoder,
            raw_score=r.raw_score, calibrated_score=r.calibrated_score,
            threshold=r.threshold if threshold is None else threshold,
            box=tuple(r.box) if r.box is not None else None, area_px=r.area_px,
            frame_path=frame_path, heatmap_path=heatmap_path, run_id=run_id, id=id,
            reject=bool(decision.reject),
        )


@dataclass(frozen=True)
class RejectRecord:
    """A reject: ``fired`` at the sinks, or ``missed`` (never fired, ``reason`` says why).

    A verdict that arrives after its part has passed the ejector must not be fired at whatever
    part is there now: it is written with :meth:`missed`. (``unconfirmed`` is for crash
    recovery only; see tables.REJECT_OUTCOMES.)
    """

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
    outcome: str = "fired"
    reason: str | None = None

    def __post_init__(self) -> None:
        if self.outcome not in REJECT_OUTCOMES:
            raise ValueError(f"RejectRecord outcome {self.outcome!r}; use one of "
                             f"{', '.join(REJECT_OUTCOMES)}")
        if self.outcome != "fired" and not self.reason:
            raise ValueError(f"a {self.outcome} RejectRecord needs a reason (why it did not fire)")

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

    @classmethod
    def missed(cls, event: RejectEvent, reason: str, *,
               run_id: int | None = None) -> RejectRecord:
        """A reject that was not fired because its part had already passed the ejector."""
        return cls(
            source_id=event.source_id, issued_at=event.issued_at, part_id=event.part_id,
            defect_id=event.defect_id, due_encoder=event.due_encoder, due_time=event.due_time,
            run_id=run_id, outcome="missed", reason=reason,
        )


@dataclass(frozen=True)
class AlarmRecord:
    """Something raised for a person (a missed reject, a camera down); ``id`` from the writer."""

    run_id: int | None
    time: float
    source_id: str | None
    kind: str                       # short and stable, e.g. "missed_reject", "source_down"
    message: str
    id: int | None = None

    def __post_init__(self) -> None:
        if not self.kind or not self.message:
            raise ValueError("an AlarmRecord needs a kind and a message")


@dataclass(frozen=True)
class KeptFrameRecord:
    """A good frame kept because its score fell near the threshold (config ``keep``): what
    the model nearly rejected, for `grad-edge dataset` to feed back into training."""

    run_id: int | None
    time: float                     # capture time, seconds since the epoch
    source_id: str
    seq: int
    raw_score: float
    threshold: float
    frame_path: str | None
    part_id: int | None = None
    truth: int | None = None        # what the source knew (the synthetic line does)
    id: int | None = None


@dataclass(frozen=True)
class RunEndRecord:
    """Closes a run: goes through the journal and the queue like the records it follows."""

    run_id: int
    stopped_at: float
    summary: dict[str, Any] | None = None
    status: str = "completed"
    exit_code: int | None = None

    def __post_init__(self) -> None:
        if self.status not in RUN_STATUSES or self.status == "running":
            raise ValueError(f"a run ends as one of {', '.join(RUN_STATUSES[1:])}, "
                             f"not {self.status!r}")


@dataclass(frozen=True)
class ProgressRecord:
    """The latest counters of a running run (note_progress): a snapshot, never journaled."""

    run_id: int
    at: float
    counters: dict[str, Any]


LogRecord = (DefectRecord | RejectRecord | AlarmRecord | KeptFrameRecord | RunEndRecord
             | ProgressRecord)
RECORD_KINDS: dict[str, type] = {"defect": DefectRecord, "reject": RejectRecord,
                                 "alarm": AlarmRecord, "kept": KeptFrameRecord,
                                 "run_end": RunEndRecord, "progress": ProgressRecord}
_TUPLE_FIELDS = ("box", "sinks_ok", "sinks_failed")


def record_kind(record: LogRecord) -> str:
    return next(k for k, cls in RECORD_KINDS.items() if isinstance(record, cls))


def _json_default(value: Any) -> Any:
    # numpy numbers (a score straight from a tensor) are written as the plain number.
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"a log record field holds {type(value).__name__}, which JSON cannot hold")


def record_to_json(record: LogRecord) -> str:
    """One line of JSON: {"kind": ..., "record": {...}}."""
    return json.dumps({"kind": record_kind(record), "record": dataclasses.asdict(record)},
                      sort_keys=True, default=_json_default)


def record_from_json(line: str) -> LogRecord:
    """The record of one `record_to_json` line; raises ValueError/KeyError/TypeError if not."""
    obj = json.loads(line)
    fields = dict(obj["record"])
    for name in _TUPLE_FIELDS:          # JSON has no tuples; the frozen records want them back
        if isinstance(fields.get(name), list):
            fields[name] = tuple(fields[name])
    return RECORD_KINDS[obj["kind"]](**fields)
