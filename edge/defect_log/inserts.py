"""How a batch of records lands: one transaction, parents first, ids already there skipped.

Skipping ids that are already in the database is what makes the journal's replay after a
crash (and the writer's catch-up after an overflow) idempotent: a record met twice lands once.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine, insert, select, update

from edge.defect_log.engine import begin_write
from edge.defect_log.records import (AlarmRecord, DefectRecord, KeptFrameRecord, LogRecord,
                                     ProgressRecord, RejectRecord, RunEndRecord)
from edge.defect_log.tables import AlarmRow, DefectRow, KeptFrameRow, RejectEventRow, RunRow

# Records that carry an id from the writer, and the table that id belongs to; parents first.
ID_TABLES = {DefectRecord: DefectRow, RejectRecord: RejectEventRow, AlarmRecord: AlarmRow,
             KeptFrameRecord: KeptFrameRow}


def insert_batch(engine: Engine, batch: list[LogRecord]) -> None:
    """Insert a batch in one transaction; raises what the database raises."""
    with engine.connect() as conn:
        begin_write(conn)
        # Parents first (a reject names its defect). Skip ids already there: a journal
        # replayed after a crash repeats some, and a catch-up may meet a record twice.
        for cls, table in ID_TABLES.items():
            records = {}
            for r in batch:
                if isinstance(r, cls):
                    records.setdefault(r.id, r)
            if not records:
                continue
            have = set(conn.scalars(select(table.id).where(table.id.in_(list(records)))))
            rows = [_ROW[cls](r) for i, r in records.items() if i not in have]
            if rows:
                conn.execute(insert(table), rows)
        for r in batch:
            if isinstance(r, ProgressRecord):
                conn.execute(update(RunRow).where(RunRow.id == r.run_id,
                                                  RunRow.status == "running")
                             .values(progress=r.counters, progress_at=r.at))
            elif isinstance(r, RunEndRecord):
                conn.execute(update(RunRow).where(RunRow.id == r.run_id).values(
                    stopped_at=r.stopped_at, summary=r.summary, status=r.status,
                    exit_code=r.exit_code))
        conn.commit()


def _defect_row(r: DefectRecord) -> dict[str, Any]:
    x0, y0, x1, y1 = r.box if r.box is not None else (None, None, None, None)
    return {"id": r.id, "run_id": r.run_id, "time": r.time, "source_id": r.source_id,
            "seq": r.seq, "part_id": r.part_id, "encoder": r.encoder, "raw_score": r.raw_score,
            "calibrated_score": r.calibrated_score, "threshold": r.threshold,
            "verdict": r.verdict, "reason": r.reason, "x0": x0, "y0": y0, "x1": x1, "y1": y1,
            "area_px": r.area_px, "frame_path": r.frame_path, "heatmap_path": r.heatmap_path,
            "acknowledged": False, "reject": r.reject}


def _reject_row(r: RejectRecord) -> dict[str, Any]:
    return {"id": r.id, "run_id": r.run_id, "defect_id": r.defect_id, "source_id": r.source_id,
            "part_id": r.part_id, "issued_at": r.issued_at, "due_encoder": r.due_encoder,
            "due_time": r.due_time, "fired_at": r.fired_at, "sinks_ok": list(r.sinks_ok),
            "sinks_failed": list(r.sinks_failed), "acknowledged_at": r.acknowledged_at,
            "outcome": r.outcome, "reason": r.reason}


def _alarm_row(r: AlarmRecord) -> dict[str, Any]:
    return {"id": r.id, "run_id": r.run_id, "time": r.time, "source_id": r.source_id,
            "kind": r.kind, "message": r.message}


def _kept_row(r: KeptFrameRecord) -> dict[str, Any]:
    return {"id": r.id, "run_id": r.run_id, "time": r.time, "source_id": r.source_id,
            "seq": r.seq, "part_id": r.part_id, "raw_score": r.raw_score,
            "threshold": r.threshold, "truth": r.truth, "frame_path": r.frame_path}


_ROW = {DefectRecord: _defect_row, RejectRecord: _reject_row, AlarmRecord: _alarm_row,
        KeptFrameRecord: _kept_row}
