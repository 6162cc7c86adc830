"""The operators' side: reading, acknowledging and exporting, in short sessions of their own.

Every database error comes out as one :class:`DefectLogError` line (what is wrong with which
file, and what to do), never as a SQLAlchemy traceback.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select, tuple_
from sqlalchemy.exc import SQLAlchemyError

from edge.defect_log.engine import (check_database_path, database_url, display_name, explain,
                                    sqlite_path)
from edge.defect_log.judgements import (ActionResult, DefectNotFoundError, act,
                                        not_found_message, record_audit)
from edge.defect_log.migrations import open_database
from edge.defect_log.runs import process_alive
from edge.defect_log.tables import (AlarmRow, AuditRow, DefectRow, KeptFrameRow,
                                    OperatorActionRow, RejectEventRow, RunRow)

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
    judgement: str | None = None        # the latest: ack | false_positive (None: not judged)
    judged_by: str | None = None
    judged_at: float | None = None
    judgements: int = 0                 # how many judgements (2+: operators judged it again)

    @property
    def false_positive(self) -> bool:
        return self.judgement == "false_positive"

    @classmethod
    def from_row(cls, row: DefectRow) -> DefectView:
        box = (row.x0, row.y0, row.x1, row.y1) if row.x0 is not None else None
        return cls(row.id, row.run_id, row.time, row.source_id, row.seq, row.part_id,
                   row.encoder, row.raw_score, row.calibrated_score, row.threshold,
                   row.verdict, row.reason, box, row.area_px, row.frame_path,
                   row.heatmap_path, bool(row.acknowledged), row.reject, row.judgement,
                   row.judged_by, row.judged_at, row.judgements or 0)


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
    via: str | None = None
    previous_id: int | None = None      # the judgement this one follows (a second judgement)

    @classmethod
    def from_row(cls, a: OperatorActionRow) -> OperatorActionView:
        return cls(a.id, a.defect_id, a.time, a.operator, a.action, a.comment, a.via,
                   a.previous_id)


@dataclass(frozen=True)
class AuditView:
    id: int
    time: float
    operator: str
    via: str
    action: str
    target: str
    detail: dict[str, Any] | None


@dataclass(frozen=True)
class KeptFrameView:
    id: int
    run_id: int | None
    time: float
    source_id: str
    seq: int
    part_id: int | None
    raw_score: float
    threshold: float
    truth: int | None
    frame_path: str | None


@dataclass(frozen=True)
class DefectDetail:
    defect: DefectView
    reject_events: tuple[RejectEventView, ...]
    actions: tuple[OperatorActionView, ...]


def narrowed(query, equal: tuple = (), time=None, since: float | None = None,
             until: float | None = None):
    """query where column == value for each (column, value) in `equal` whose value is not None,
    and since <= time < until where given: the one filter chain every listing shares."""
    for column, value in equal:
        if value is not None:
            query = query.where(column == value)
    if since is not None:
        query = query.where(time >= since)
    if until is not None:
        query = query.where(time < until)
    return query


@dataclass(frozen=True)
class DefectFilter:
    """What the defect browser and `defects list` filter by; None: any."""

    run_id: int | None = None
    source: str | None = None
    verdict: str | None = None          # DEFECT | UNKNOWN
    since: float | None = None          # time >= since
    until: float | None = None          # time < until
    acknowledged: bool | None = None    # judged by an operator (ack or false positive)
    judgement: str | None = None        # the latest judgement: ack | false_positive

    def apply(self, query):
        query = narrowed(query, ((DefectRow.run_id, self.run_id),
                                 (DefectRow.source_id, self.source),
                                 (DefectRow.verdict, self.verdict)),
                         DefectRow.time, self.since, self.until)
        if self.acknowledged is not None:
            query = query.where(DefectRow.acknowledged.is_(self.acknowledged))
        if self.judgement is not None:
            query = query.where(DefectRow.judgement == self.judgement)
        return query


@dataclass(frozen=True)
class DefectPage:
    """One page of the browser, newest first; ``next_key`` continues after its last row."""

    rows: tuple[DefectView, ...]
    next_key: tuple[float, int] | None


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

    def list_defects(self, since: float | None = None, source: str | None = None,
                     unacked_only: bool = False, limit: int | None = 100, *,
                     until: float | None = None, run_id: int | None = None) -> list[DefectView]:
        """Newest first."""
        where = DefectFilter(run_id=run_id, source=source, since=since, until=until,
                             acknowledged=False if unacked_only else None)
        return list(self.browse(where, limit=limit).rows)

    def browse(self, where: DefectFilter = DefectFilter(), *,
               after: tuple[float, int] | None = None, limit: int | None = 50) -> DefectPage:
        """One page, newest first, continuing after the key ``(time, id)`` of the last row of
        the page before. A keyset, not an OFFSET: page 2,000 costs what page 1 costs
        (benchmarks/station.py)."""
        query = where.apply(select(DefectRow))
        if after is not None:
            # A row value: SQLite walks the (..., time, id) index from the key.
            query = query.where(tuple_(DefectRow.time, DefectRow.id) < tuple_(*after))
        query = query.order_by(DefectRow.time.desc(), DefectRow.id.desc())
        if limit is not None:
            query = query.limit(limit + 1)          # one more: is there a next page?
        with self._errors(), self.engine.connect() as conn:
            rows = [DefectView.from_row(r) for r in conn.execute(query)]
        more = limit is not None and len(rows) > limit
        rows = rows[:limit] if limit is not None else rows
        return DefectPage(tuple(rows), (rows[-1].time, rows[-1].id) if more else None)

    def count_defects(self, where: DefectFilter = DefectFilter(), *,
                      cap: int | None = None) -> int:
        """How many defects match; stops counting at ``cap`` (the browser says "10,000+")."""
        inner = where.apply(select(DefectRow.id))
        if cap is not None:
            inner = inner.limit(cap)
        with self._errors(), self.engine.connect() as conn:
            return conn.execute(select(func.count()).select_from(inner.subquery())).scalar()

    def defect_counts(self, where: DefectFilter = DefectFilter()) -> list[dict[str, Any]]:
        """Per source, verdict and latest judgement: how many defects (for reports)."""
        query = where.apply(select(DefectRow.source_id, DefectRow.verdict, DefectRow.judgement,
                                   func.count()).group_by(DefectRow.source_id,
                                                          DefectRow.verdict,
                                                          DefectRow.judgement))
        with self._errors(), self.engine.connect() as conn:
            return [{"source_id": s, "verdict": v, "judgement": j, "n": n}
                    for s, v, j, n in conn.execute(query)]

    def reject_counts(self, *, run_id: int | None = None, since: float | None = None,
                      until: float | None = None) -> list[dict[str, Any]]:
        """Per source and outcome (fired, missed, unconfirmed): how many rejects."""
        query = select(RejectEventRow.source_id, RejectEventRow.outcome, func.count()) \
            .group_by(RejectEventRow.source_id, RejectEventRow.outcome)
        query = narrowed(query, ((RejectEventRow.run_id, run_id),), RejectEventRow.issued_at,
                         since, until)
        with self._errors(), self.engine.connect() as conn:
            return [{"source_id": s, "outcome": o, "n": n} for s, o, n in conn.execute(query)]

    def sources(self) -> list[str]:
        """Every source id that logged a defect."""
        with self._errors(), self.engine.connect() as conn:
            return list(conn.scalars(select(DefectRow.source_id).distinct()
                                     .order_by(DefectRow.source_id)))

    def get_defect(self, defect_id: int) -> DefectDetail:
        with self._errors(), self.engine.connect() as conn:
            row = conn.execute(select(DefectRow).where(DefectRow.id == defect_id)).first()
            if row is None:
                raise DefectNotFoundError(not_found_message(defect_id, self.name))
            rejects = conn.execute(select(RejectEventRow).where(
                RejectEventRow.defect_id == defect_id).order_by(RejectEventRow.id))
            actions = conn.execute(select(OperatorActionRow).where(
                OperatorActionRow.defect_id == defect_id).order_by(OperatorActionRow.id))
            return DefectDetail(
                defect=DefectView.from_row(row),
                reject_events=tuple(RejectEventView.from_row(r) for r in rejects),
                actions=tuple(OperatorActionView.from_row(a) for a in actions),
            )

    def actions_for(self, defect_ids: list[int]) -> dict[int, list[OperatorActionView]]:
        """Every operator action on these defects, oldest first (exports)."""
        out: dict[int, list[OperatorActionView]] = {i: [] for i in defect_ids}
        with self._errors(), self.engine.connect() as conn:
            for start in range(0, len(defect_ids), 500):        # SQLite's variable limit
                chunk = defect_ids[start:start + 500]
                for a in conn.execute(select(OperatorActionRow).where(
                        OperatorActionRow.defect_id.in_(chunk)).order_by(OperatorActionRow.id)):
                    out[a.defect_id].append(OperatorActionView.from_row(a))
        return out

    def get_run(self, run_id: int) -> RunView | None:
        with self._errors(), self.engine.connect() as conn:
            row = conn.execute(select(RunRow).where(RunRow.id == run_id)).first()
            return RunView.from_row(row) if row is not None else None

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
        query = narrowed(query, ((RejectEventRow.outcome, outcome),
                                 (RejectEventRow.run_id, run_id)))
        with self._errors(), self.engine.connect() as conn:
            rows = conn.execute(query.limit(limit) if limit is not None else query)
            return [RejectEventView.from_row(r) for r in rows]

    def list_alarms(self, since: float | None = None, run_id: int | None = None,
                    kind: str | None = None, limit: int | None = 100) -> list[AlarmView]:
        """Newest first."""
        query = select(AlarmRow).order_by(AlarmRow.time.desc(), AlarmRow.id.desc())
        query = narrowed(query, ((AlarmRow.run_id, run_id), (AlarmRow.kind, kind)),
                         AlarmRow.time, since)
        with self._errors(), self.engine.connect() as conn:
            rows = conn.execute(query.limit(limit) if limit is not None else query)
            return [AlarmView.from_row(r) for r in rows]

    def list_kept_frames(self, *, run_id: int | None = None, source: str | None = None,
                         since: float | None = None, until: float | None = None,
                         limit: int | None = None) -> list[KeptFrameView]:
        """Near-threshold good frames the line kept, oldest first."""
        query = select(KeptFrameRow).order_by(KeptFrameRow.time, KeptFrameRow.id)
        query = narrowed(query, ((KeptFrameRow.run_id, run_id),
                                 (KeptFrameRow.source_id, source)), KeptFrameRow.time,
                         since, until)
        with self._errors(), self.engine.connect() as conn:
            rows = conn.execute(query.limit(limit) if limit is not None else query)
            return [KeptFrameView(r.id, r.run_id, r.time, r.source_id, r.seq, r.part_id,
                                  r.raw_score, r.threshold, r.truth, r.frame_path) for r in rows]

    def list_audit(self, limit: int | None = 100) -> list[AuditView]:
        """Every operator action, newest first."""
        query = select(AuditRow).order_by(AuditRow.id.desc())
        with self._errors(), self.engine.connect() as conn:
            rows = conn.execute(query.limit(limit) if limit is not None else query)
            return [AuditView(r.id, r.time, r.operator, r.via, r.action, r.target, r.detail)
                    for r in rows]

    @property
    def name(self) -> str:
        return display_name(self.url)

    # --- operator actions (judgements.py) -----------------------------------------------

    def acknowledge(self, defect_id: int, operator: str, comment: str | None = None, *,
                    via: str = "cli") -> ActionResult:
        with self._errors():
            return act(self.engine, self.name, defect_id, operator, "ack", comment, via=via)

    def mark_false_positive(self, defect_id: int, operator: str,
                            comment: str | None = None, *, via: str = "cli") -> ActionResult:
        # Judging it a false positive is also looking at it: it counts as acknowledged.
        with self._errors():
            return act(self.engine, self.name, defect_id, operator, "false_positive", comment,
                       via=via)

    def comment(self, defect_id: int, operator: str, comment: str, *,
                via: str = "cli") -> ActionResult:
        with self._errors():
            return act(self.engine, self.name, defect_id, operator, "comment", comment, via=via)

    def record_audit(self, operator: str, via: str, action: str, target: str,
                     detail: dict[str, Any] | None = None) -> int:
        """An operator action that touched no defect (a saved ROI): the audit table only."""
        with self._errors():
            return record_audit(self.engine, operator, via, action, target, detail)

    # --- exports (exports.py) -----------------------------------------------------------

    def export(self, path: str | os.PathLike, where: DefectFilter = DefectFilter(), *,
               limit: int | None = None) -> int:
        """Write the matching defects, oldest first, with their judgements, operators,
        comments and run ids; the format comes from the suffix (.csv, .jsonl) or is refused."""
        from edge.defect_log.exports import write_export

        return write_export(self, path, where, limit=limit)
