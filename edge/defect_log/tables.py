"""The defect log's tables (SQLAlchemy models), as the latest migration leaves them.

Times are float seconds since the epoch, the clock of FrameResult.wall_time: no time zones to
get wrong, and they sort. The migrations (migrations.py) never build tables from these models:
each migration freezes its own DDL, and a test checks that applying them all gives exactly the
columns described here.

Ids of defects, rejects and alarms are handed out by the writer (not by the database's
insert), so a reject can name its defect before the row has landed, a saved image can carry its
defect's id, and replaying the journal after a crash is idempotent. How the writer gets them
(one writer per SQLite file; sequences shared by many writers on PostgreSQL) is in ids.py.

Ids are 64-bit on PostgreSQL (BIGINT; SQLite's INTEGER already is): ids.py's offline range
lies above 2**62.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import (JSON, BigInteger, CheckConstraint, ForeignKey, Index, Integer, String,
                        Text)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# An id or a reference to one: INTEGER on SQLite (64-bit there, and the rowid alias it must
# stay), BIGINT on PostgreSQL.
ID = Integer().with_variant(BigInteger(), "postgresql")

# A run is `running` until it is closed: by the line (completed / failed / interrupted), or at
# a later start, when its process is found gone (crashed).
RUN_STATUSES = ("running", "completed", "failed", "interrupted", "crashed")

# `fired`: the sinks were driven (sinks_ok / sinks_failed say which took it). `missed`: the
# verdict came after the part had passed the ejector, so nothing was fired (reason says why).
# `unconfirmed`: written only by crash recovery, for a defect whose reject was decided but
# whose firing was never recorded because the process died (it may or may not have fired).
REJECT_OUTCOMES = ("fired", "missed", "unconfirmed")

OPERATOR_ACTIONS = ("ack", "false_positive", "comment")


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[str]: JSON}


class RunRow(Base):
    """One start-to-stop of the line software, with what it ran and how it ended."""

    __tablename__ = "runs"

    id: Mapped[int] = mapped_column(ID, primary_key=True)
    started_at: Mapped[float]
    stopped_at: Mapped[float | None]
    model_hash: Mapped[str | None] = mapped_column(String(128))
    config_hash: Mapped[str | None] = mapped_column(String(128))
    config_path: Mapped[str | None] = mapped_column(Text)
    host: Mapped[str | None] = mapped_column(String(255))
    summary: Mapped[dict[str, Any] | None]
    # Migration 2: who ran it, so a later start can tell a crashed run from a live one.
    pid: Mapped[int | None]
    process_start: Mapped[str | None] = mapped_column(String(96))   # see runs.process_start
    status: Mapped[str] = mapped_column(String(16), server_default="running")
    exit_code: Mapped[int | None]
    progress: Mapped[dict[str, Any] | None]      # latest counters from note_progress
    progress_at: Mapped[float | None]


class DefectRow(Base):
    """A frame judged DEFECT or UNKNOWN."""

    __tablename__ = "defects"

    id: Mapped[int] = mapped_column(ID, primary_key=True, autoincrement=False)  # writer-assigned
    run_id: Mapped[int | None] = mapped_column(ID, ForeignKey("runs.id"), index=True)
    time: Mapped[float] = mapped_column(index=True)
    source_id: Mapped[str] = mapped_column(String(128), index=True)
    seq: Mapped[int] = mapped_column(BigInteger)
    part_id: Mapped[int | None] = mapped_column(BigInteger)
    encoder: Mapped[int | None] = mapped_column(BigInteger)
    raw_score: Mapped[float | None]
    calibrated_score: Mapped[float | None]
    threshold: Mapped[float | None]
    verdict: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str] = mapped_column(Text)
    x0: Mapped[int | None]
    y0: Mapped[int | None]
    x1: Mapped[int | None]
    y1: Mapped[int | None]
    area_px: Mapped[int] = mapped_column(default=0)
    frame_path: Mapped[str | None] = mapped_column(Text)
    heatmap_path: Mapped[str | None] = mapped_column(Text)
    acknowledged: Mapped[bool] = mapped_column(default=False, index=True)
    # Migration 3: whether the rules decided to reject the part (NULL: logged before v3).
    reject: Mapped[bool | None]
    # Migration 4: the latest operator judgement (ack | false_positive; NULL: none yet), who
    # gave it and when, and how many judgements there were (every one is in operator_actions).
    judgement: Mapped[str | None] = mapped_column(String(16))
    judged_by: Mapped[str | None] = mapped_column(String(128))
    judged_at: Mapped[float | None]
    judgements: Mapped[int] = mapped_column(server_default="0")

    # Migration 4: the defect browser's pages (migrations._V4_PAGE_INDEXES).
    __table_args__ = (Index("ix_defects_time_id", "time", "id"),
                      Index("ix_defects_source_page", "source_id", "time", "id"),
                      Index("ix_defects_run_page", "run_id", "time", "id"),
                      Index("ix_defects_verdict_page", "verdict", "time", "id"),
                      Index("ix_defects_judgement_page", "judgement", "time", "id"))


class RejectEventRow(Base):
    """A reject: fired (and which sinks took it), missed, or unconfirmed after a crash."""

    __tablename__ = "reject_events"

    id: Mapped[int] = mapped_column(ID, primary_key=True, autoincrement=False)  # writer-assigned
    run_id: Mapped[int | None] = mapped_column(ID, ForeignKey("runs.id"))
    defect_id: Mapped[int | None] = mapped_column(ID, ForeignKey("defects.id"), index=True)
    source_id: Mapped[str] = mapped_column(String(128))
    part_id: Mapped[int | None] = mapped_column(BigInteger)
    issued_at: Mapped[float]
    due_encoder: Mapped[int | None] = mapped_column(BigInteger)
    due_time: Mapped[float | None]
    fired_at: Mapped[float | None]
    sinks_ok: Mapped[list[str]]
    sinks_failed: Mapped[list[str]]
    acknowledged_at: Mapped[float | None]
    # Migration 3.
    outcome: Mapped[str] = mapped_column(String(16), server_default="fired")
    reason: Mapped[str | None] = mapped_column(Text)


class AlarmRow(Base):
    """Something the line raised for a person: a missed reject, a camera down, ... (migration 3)."""

    __tablename__ = "alarms"

    id: Mapped[int] = mapped_column(ID, primary_key=True, autoincrement=False)  # writer-assigned
    run_id: Mapped[int | None] = mapped_column(ID, ForeignKey("runs.id"), index=True)
    time: Mapped[float] = mapped_column(index=True)
    source_id: Mapped[str | None] = mapped_column(String(128))
    kind: Mapped[str] = mapped_column(String(64))
    message: Mapped[str] = mapped_column(Text)


class OperatorActionRow(Base):
    __tablename__ = "operator_actions"
    __table_args__ = (
        CheckConstraint("action IN ('ack', 'false_positive', 'comment')", name="known_action"),
    )

    id: Mapped[int] = mapped_column(ID, primary_key=True)
    defect_id: Mapped[int] = mapped_column(ID, ForeignKey("defects.id"), index=True)
    time: Mapped[float]
    operator: Mapped[str] = mapped_column(String(128))
    action: Mapped[str] = mapped_column(String(16))
    comment: Mapped[str | None] = mapped_column(Text)
    # Migration 4: where it was given (cli, station and the client's address), and for a
    # judgement that follows an earlier one on the same defect, that one's id.
    via: Mapped[str | None] = mapped_column(String(128))
    previous_id: Mapped[int | None] = mapped_column(ID)


# Judgements change a defect's state; a comment does not.
JUDGEMENTS = ("ack", "false_positive")


class AuditRow(Base):
    """Every operator action, whatever it touched: a judgement, a comment, a saved ROI
    (migration 4). Nothing updates or deletes these rows."""

    __tablename__ = "audit"

    id: Mapped[int] = mapped_column(primary_key=True)
    time: Mapped[float] = mapped_column(index=True)
    operator: Mapped[str] = mapped_column(String(128))
    via: Mapped[str] = mapped_column(String(128))
    action: Mapped[str] = mapped_column(String(32))
    target: Mapped[str] = mapped_column(Text)          # "defect 12", "edge.yaml sources[0].roi"
    detail: Mapped[dict[str, Any] | None]


class KeptFrameRow(Base):
    """A good frame whose score fell near the threshold, kept for retraining (migration 4)."""

    __tablename__ = "kept_frames"

    id: Mapped[int] = mapped_column(ID, primary_key=True, autoincrement=False)  # writer-assigned
    run_id: Mapped[int | None] = mapped_column(ID, ForeignKey("runs.id"), index=True)
    time: Mapped[float] = mapped_column(index=True)
    source_id: Mapped[str] = mapped_column(String(128))
    seq: Mapped[int] = mapped_column(BigInteger)
    part_id: Mapped[int | None] = mapped_column(BigInteger)
    raw_score: Mapped[float]
    threshold: Mapped[float]
    truth: Mapped[int | None]                 # what the source knew (synthetic line); else NULL
    frame_path: Mapped[str | None] = mapped_column(Text)


class SchemaMigrationRow(Base):
    __tablename__ = "schema_migrations"

    version: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    applied_at: Mapped[float]
    description: Mapped[str | None] = mapped_column(Text)
