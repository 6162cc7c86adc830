"""The operators' side: reading, acknowledging and exporting, in short sessions of their own.

Every database error comes out as one :class:`DefectLogError` line (what is wrong with which
file, and what to do), never as a SQLAlchemy traceback.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from sqlalchemy import insert, select, update
from sqlalchemy.exc import SQLAlchemyError

from edge.defect_log.engine import (DefectLogError, begin_write, check_database_path,
                                    database_url, explain, is_disk_full, sqlite_path)
from edge.defect_log.migrations import open_database
from edge.defect_log.runs import process_alive
from edge.defect_log.tables import (AlarmRow, DefectRow, OperatorActionRow, RejectEventRow,
                                    RunRow)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DefectView:
    id: int
    run_id: int | None
    time: float
    source_id: str
    seq: int
    part_id: int | None
    encoder: int | None
    raw_score: float | None
    calibrated_score: float | None
    threshold: float | None
    verdict: str
    reason: str
    box: tuple[int, int, int, int] | None
    area_px: int
    frame_path: str | None
    heatmap_path: str | None
    acknowledged: bool
    reject: bool | None = None          # the rules decided to reject (None: logged before v3)

    @classmethod
    def from_row(cls, row: DefectRow) -> DefectView:
        box = (row.x0, row.y0, row.x1, row.y1) if row.x0 is not None else None
        return cls(row.id, row.run_id, row.time, row.source_id, row.seq, row.part_id,
                   row.encoder, row.raw_score, row.calibrated_score, row.threshold,
                   row.verdict, row.reason, box, row.area_px, row.frame_path,
                   row.heatmap_path, bool(row.acknowledged), row.reject)


@dataclass(frozen=True)
class RejectEventView:
    id: int
    defect_id: int | None
    source_id: str
    part_id: int | None
    issued_at: float
    due_encoder: int | None
    due_time: float | None
    fired_at: float | None
    sinks_ok: tuple[str, ...]
    sinks_failed: tuple[str, ...]
    acknowledged_at: float | None
    outcome: str = "fired"              # fired | missed | unconfirmed (tables.REJECT_OUTCOMES)
    reason: str | None = None
    run_id: int | None = None

    @classmethod
    def from_row(cls, r: RejectEventRow) -> RejectEventView:
        return cls(r.id, r.defect_id, r.source_id, r.part_id, r.issued_at, r.due_encoder,
                   r.due_time, r.fired_at, tuple(r.sinks_ok), tuple(r.sinks_failed),
                   r.acknowledged_at, r.outcome, r.reason, r.run_id)


@dataclass(frozen=True)
class RunView:
    id: int
    started_at: float
    stopped_at: float | None
    status: str                         # tables.RUN_STATUSES
    exit_code: int | None
    host: str | None
    pid: int | None
    model_hash: str | None
    config_path: str | None
    summary: dict[str, Any] | None
    progress: dict[str, Any] | None
    progress_at: float | None
    # For a `running` run of this host: whether its process still runs. A run whose process
    # is gone is closed as crashed by the next writer; until then it shows here.
    process_alive: bool | None = None

    @classmethod
    def from_row(cls, r: RunRow) -> RunView:
        alive = None
        if r.status == "running" and r.host == socket.gethostname() and r.pid is not None:
            alive = process_alive(r.pid, r.process_start)
        return cls(r.id, r.started_at, r.stopped_at, r.status, r.exit_code, r.host, r.pid,
                   r.model_hash, r.config_path, r.summary, r.progress, r.progress_at, alive)


@dataclass(frozen=True)
class AlarmView:
    id: int
    run_id: int | None
    time: float
    source_id: str | None
    kind: str
    message: str

    @classmethod
    def from_row(cls, r: AlarmRow) -> AlarmView:
        return cls(r.id, r.run_id, r.time, r.source_id, r.kind, r.message)


@dataclass(frozen=True)
class OperatorActionView:
    id: int
    defect_id: int
    time: float
    operator: str
    action: str
    comment: str | None


@dataclass(frozen=True)
class DefectDetail:
    defect: DefectView
    reject_events: tuple[RejectEventView, ...]
    actions: tuple[OperatorActionView, ...]


class DefectNotFoundError(LookupError):
    pass


EXPORT_COLUMNS = ("id", "run_id", "time", "time_iso", "source_id", "seq", "part_id", "encoder",
                  "raw_score", "calibrated_score", "threshold", "verdict", "reason", "x0", "y0",
                  "x1", "y1", "area_px", "frame_path", "heatmap_path", "acknowledged")


class DefectLogReader:
    """Operators' side: short sessions of its own, never the writer's.

    Acknowledgements and comments are small single-row transactions; WAL and busy_timeout
    make them safe next to the running writer.
    """

    def __init__(self, url_or_path: str | os.PathLike, *, busy_timeout_ms: int = 5000) -> None:
        self.url = database_url(url_or_path)
        path = sqlite_path(self.url)
        if path is not None:
            check_database_path(path)
            if not path.exists():
                raise FileNotFoundError(
                    f"no defect log at {path}; start the line first (it creates the "
                    "database), or check the database path / URL")
        self.engine = open_database(self.url, busy_timeout_ms=busy_timeout_ms)

    @contextmanager
    def _errors(self) -> Iterator[None]:
        """Database and file errors as one DefectLogError line."""
        try:
            yield
        except (SQLAlchemyError, OSError) as exc:
            raise explain(exc, self.url) from exc

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> DefectLogReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- reading ------------------------------------------------------------------------

    def _query(self, since: float | None, until: float | None, source: str | None,
               unacked_only: bool, limit: int | None, newest_first: bool):
        query = select(DefectRow)
        if since is not None:
            query = query.where(DefectRow.time >= since)
        if until is not None:
            query = query.where(DefectRow.time < until)
        if source is not None:
            query = query.where(DefectRow.source_id == source)
        if unacked_only:
            query = query.where(DefectRow.acknowledged.is_(False))
        order = (DefectRow.time.desc(), DefectRow.id.desc()) if newest_first else (
            DefectRow.time, DefectRow.id)
        query = query.order_by(*order)
        return query.limit(limit) if limit is not None else query

    def list_defects(self, since: float | None = None, source: str | None = None,
                     unacked_only: bool = False, limit: int | None = 100, *,
                     until: float | None = None) -> list[DefectView]:
        """Newest first."""
        with self._errors(), self.engine.connect() as conn:
            rows = conn.execute(self._query(since, until, source, unacked_only, limit, True))
            return [DefectView.from_row(row) for row in rows]

    def get_defect(self, defect_id: int) -> DefectDetail:
        with self._errors(), self.engine.connect() as conn:
            row = conn.execute(select(DefectRow).where(DefectRow.id == defect_id)).first()
            if row is None:
                raise DefectNotFoundError(self._not_found(defect_id))
            rejects = conn.execute(select(RejectEventRow).where(
                RejectEventRow.defect_id == defect_id).order_by(RejectEventRow.id))
            actions = conn.execute(select(OperatorActionRow).where(
                OperatorActionRow.defect_id == defect_id).order_by(OperatorActionRow.id))
            return DefectDetail(
                defect=DefectView.from_row(row),
                reject_events=tuple(RejectEventView.from_row(r) for r in rejects),
                actions=tuple(OperatorActionView(a.id, a.defect_id, a.time, a.operator,
                                                 a.action, a.comment) for a in actions),
            )

    def list_runs(self, limit: int | None = 20) -> list[RunView]:
        """Newest first, with status (running, completed, failed, interrupted, crashed)."""
        with self._errors(), self.engine.connect() as conn:
            query = select(RunRow).order_by(RunRow.id.desc())
            rows = conn.execute(query.limit(limit) if limit is not None else query)
            return [RunView.from_row(r) for r in rows]

    def list_rejects(self, outcome: str | None = None, run_id: int | None = None,
                     limit: int | None = 100) -> list[RejectEventView]:
        """Newest first; `outcome` = fired, missed or unconfirmed."""
        query = select(RejectEventRow).order_by(RejectEventRow.issued_at.desc(),
                                                RejectEventRow.id.desc())
        if outcome is not None:
            query = query.where(RejectEventRow.outcome == outcome)
        if run_id is not None:
            query = query.where(RejectEventRow.run_id == run_id)
        with self._errors(), self.engine.connect() as conn:
            rows = conn.execute(query.limit(limit) if limit is not None else query)
            return [RejectEventView.from_row(r) for r in rows]

    def list_alarms(self, since: float | None = None, run_id: int | None = None,
                    kind: str | None = None, limit: int | None = 100) -> list[AlarmView]:
        """Newest first."""
        query = select(AlarmRow).order_by(AlarmRow.time.desc(), AlarmRow.id.desc())
        if since is not None:
            query = query.where(AlarmRow.time >= since)
        if run_id is not None:
            query = query.where(AlarmRow.run_id == run_id)
        if kind is not None:
            query = query.where(AlarmRow.kind == kind)
        with self._errors(), self.engine.connect() as conn:
            rows = conn.execute(query.limit(limit) if limit is not None else query)
            return [AlarmView.from_row(r) for r in rows]

    def _not_found(self, defect_id: int) -> str:
        return (f"no defect with id {defect_id} in {self.url}; list recent ones with "
                "list_defects() (grad-edge defects list)")

    # --- operator actions ---------------------------------------------------------------

    def acknowledge(self, defect_id: int, operator: str, comment: str | None = None) -> None:
        self._act(defect_id, operator, "ack", comment, acknowledges=True)

    def mark_false_positive(self, defect_id: int, operator: str,
                            comment: str | None = None) -> None:
        # Judging it a false positive is also looking at it: it counts as acknowledged.
        self._act(defect_id, operator, "false_positive", comment, acknowledges=True)

    def comment(self, defect_id: int, operator: str, comment: str) -> None:
        if not comment or not comment.strip():
            raise ValueError("comment is empty; write what you want recorded")
        self._act(defect_id, operator, "comment", comment, acknowledges=False)

    def _act(self, defect_id: int, operator: str, action: str, comment: str | None,
             acknowledges: bool) -> None:
        if not operator or not operator.strip():
            raise ValueError("operator name is empty; actions are recorded with who took them")
        now = time.time()
        with self._errors(), self.engine.connect() as conn:
            begin_write(conn)
            if conn.execute(select(DefectRow.id).where(DefectRow.id == defect_id)).first() is None:
                raise DefectNotFoundError(self._not_found(defect_id))
            if acknowledges:
                conn.execute(update(DefectRow).where(DefectRow.id == defect_id)
                             .values(acknowledged=True))
                conn.execute(update(RejectEventRow)
                             .where(RejectEventRow.defect_id == defect_id,
                                    RejectEventRow.acknowledged_at.is_(None))
                             .values(acknowledged_at=now))
            conn.execute(insert(OperatorActionRow).values(
                defect_id=defect_id, time=now, operator=operator.strip(), action=action,
                comment=comment))
            conn.commit()
        logger.info("defect %d: %s by %s", defect_id, action, operator)

    # --- exports ------------------------------------------------------------------------

    def _export_rows(self, since, until, source, unacked_only, limit) -> list[dict[str, Any]]:
        with self._errors(), self.engine.connect() as conn:
            rows = conn.execute(self._query(since, until, source, unacked_only, limit, False))
            out = []
            for row in rows:
                record = {name: getattr(row, name) for name in EXPORT_COLUMNS if name != "time_iso"}
                record["time_iso"] = dt.datetime.fromtimestamp(
                    row.time, dt.timezone.utc).isoformat()
                record["acknowledged"] = bool(row.acknowledged)
                out.append({name: record[name] for name in EXPORT_COLUMNS})
            return out

    def export_csv(self, path: str | os.PathLike, *, since: float | None = None,
                   until: float | None = None, source: str | None = None,
                   unacked_only: bool = False, limit: int | None = None) -> int:
        """Write the matching defects, oldest first, to a CSV file; returns the row count."""
        rows = self._export_rows(since, until, source, unacked_only, limit)
        with _export_errors(path), open(path, "w", newline="", encoding="utf-8") as out:
            writer = csv.DictWriter(out, fieldnames=EXPORT_COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
        return len(rows)

    def export_jsonl(self, path: str | os.PathLike, *, since: float | None = None,
                     until: float | None = None, source: str | None = None,
                     unacked_only: bool = False, limit: int | None = None) -> int:
        """Write the matching defects, oldest first, one JSON object a line; returns the count."""
        rows = self._export_rows(since, until, source, unacked_only, limit)
        with _export_errors(path), open(path, "w", encoding="utf-8") as out:
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
