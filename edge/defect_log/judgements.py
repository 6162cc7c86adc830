"""Operator actions: judgements (ack, false positive), comments, and the audit trail.

Each action is one short write transaction beside the running line's writer (WAL and
``busy_timeout`` let the two share the file; ``BEGIN IMMEDIATE`` takes the write lock up
front). In that one transaction:

- the action lands in ``operator_actions`` with who gave it and where from (``via``: ``cli``,
  or ``station`` and the client's address);
- a judgement updates the defect's latest-judgement columns; a judgement on a defect that
  already had one is recorded as a *second judgement* (``previous_id`` names the earlier
  one) and the caller is told whose judgement it follows: nothing is overwritten or lost;
- the same action is written to ``audit``, the one table that lists every operator action
  (judgements, comments, a saved ROI), never updated, never deleted.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Engine, insert, select, update

from edge.defect_log.engine import begin_write
from edge.defect_log.tables import (JUDGEMENTS, AuditRow, DefectRow, OperatorActionRow,
                                    RejectEventRow)

logger = logging.getLogger(__name__)


class DefectNotFoundError(LookupError):
    pass


@dataclass(frozen=True)
class ActionResult:
    """What an action recorded: its row id, and for a judgement that follows an earlier one on
    the same defect, that one (``previous``: action, operator, time)."""

    action_id: int
    defect_id: int
    action: str
    operator: str
    previous: tuple[str, str, float] | None = None

    @property
    def second_judgement(self) -> bool:
        return self.previous is not None

    def describe(self) -> str:
        """One line for the operator, e.g. `defect 3 marked false positive by li (a second
        judgement: maria acknowledged it at 2026-11-30 14:02:11)`."""
        import datetime as dt

        what = {"ack": "acknowledged", "false_positive": "marked false positive",
                "comment": "commented"}[self.action]
        line = f"defect {self.defect_id} {what} by {self.operator}"
        if self.previous is not None:
            action, operator, at = self.previous
            before = "acknowledged it" if action == "ack" else "marked it false positive"
            line += (f" (a second judgement, recorded beside the first: {operator} {before} at "
                     f"{dt.datetime.fromtimestamp(at):%Y-%m-%d %H:%M:%S})")
        return line


def not_found_message(defect_id: int, where: str) -> str:
    return (f"no defect with id {defect_id} in {where}; `grad-edge defects list` shows the "
            "recent ones")


def check_operator(operator: str | None) -> str:
    if not operator or not operator.strip():
        raise ValueError("operator name is empty; actions are recorded with who took them")
    return operator.strip()


def act(engine: Engine, where: str, defect_id: int, operator: str, action: str,
        comment: str | None, *, via: str = "cli") -> ActionResult:
    """Record one action on a defect (see the module docstring)."""
    if action not in (*JUDGEMENTS, "comment"):
        raise ValueError(f"unknown operator action {action!r}; use ack, false_positive or "
                         "comment")
    operator = check_operator(operator)
    if action == "comment" and (not comment or not comment.strip()):
        raise ValueError("comment is empty; write what you want recorded")
    now = time.time()
    with engine.connect() as conn:
        begin_write(conn)
        row = conn.execute(select(DefectRow.id, DefectRow.judgement).where(
            DefectRow.id == defect_id)).first()
        if row is None:
            raise DefectNotFoundError(not_found_message(defect_id, where))
        previous = None
        previous_id = None
        if action in JUDGEMENTS:
            last = conn.execute(
                select(OperatorActionRow.id, OperatorActionRow.action,
                       OperatorActionRow.operator, OperatorActionRow.time)
                .where(OperatorActionRow.defect_id == defect_id,
                       OperatorActionRow.action.in_(JUDGEMENTS))
                .order_by(OperatorActionRow.id.desc()).limit(1)).first()
            if last is not None:
                previous_id, previous = last.id, (last.action, last.operator, last.time)
            conn.execute(update(DefectRow).where(DefectRow.id == defect_id).values(
                acknowledged=True, judgement=action, judged_by=operator, judged_at=now,
                judgements=DefectRow.judgements + 1))
            conn.execute(update(RejectEventRow)
                         .where(RejectEventRow.defect_id == defect_id,
                                RejectEventRow.acknowledged_at.is_(None))
                         .values(acknowledged_at=now))
        result = conn.execute(insert(OperatorActionRow).values(
            defect_id=defect_id, time=now, operator=operator, action=action, comment=comment,
            via=via, previous_id=previous_id))
        action_id = result.inserted_primary_key[0]
        _audit(conn, now, operator, via, action, f"defect {defect_id}",
               {"comment": comment, "action_id": action_id,
                **({"follows_action": previous_id, "follows": list(previous)}
                   if previous else {})})
        conn.commit()
    outcome = ActionResult(action_id, defect_id, action, operator, previous)
    logger.info("%s (via %s)", outcome.describe(), via)
    return outcome


def record_audit(engine: Engine, operator: str, via: str, action: str, target: str,
                 detail: dict[str, Any] | None = None) -> int:
    """An action that touched no defect (a saved ROI, ...): the audit table only."""
    operator = check_operator(operator)
    with engine.connect() as conn:
        begin_write(conn)
        audit_id = _audit(conn, time.time(), operator, via, action, target, detail)
        conn.commit()
    logger.info("audit: %s %s by %s (via %s)", action, target, operator, via)
    return audit_id


def _audit(conn: Connection, when: float, operator: str, via: str, action: str, target: str,
           detail: dict[str, Any] | None) -> int:
    result = conn.execute(insert(AuditRow).values(time=when, operator=operator, via=via,
                                                  action=action, target=target, detail=detail))
    return result.inserted_primary_key[0]
