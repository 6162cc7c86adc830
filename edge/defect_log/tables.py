"""The defect log's tables (SQLAlchemy models).

Times are float seconds since the epoch, the clock of FrameResult.wall_time: no time zones to
get wrong, and they sort. These models describe the schema the latest migration leaves; the
migrations themselves (migrations.py) never build tables from them.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import JSON, BigInteger, CheckConstraint, ForeignKey, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[str]: JSON}


class RunRow(Base):
    """One start-to-stop of the line software, with what it ran."""

    __tablename__ = "runs"

    id: Mapped[int] = mapped_column(primary_key=True)
    started_at: Mapped[float]
    stopped_at: Mapped[float | None]
    model_hash: Mapped[str | None] = mapped_column(String(128))
    config_hash: Mapped[str | None] = mapped_column(String(128))
    config_path: Mapped[str | None] = mapped_column(Text)
    host: Mapped[str | None] = mapped_column(String(255))
    summary: Mapped[dict[str, Any] | None]


class DefectRow(Base):
    """A frame judged DEFECT or UNKNOWN."""

    __tablename__ = "defects"

    # Handed out by the writer at submit time (not by the database), so a reject can name
    # its defect before the row has landed, and re-importing a spool is idempotent.
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    run_id: Mapped[int | None] = mapped_column(ForeignKey("runs.id"), index=True)
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


class RejectEventRow(Base):
    """A reject signal that was fired, and which sinks took it."""

    __tablename__ = "reject_events"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)  # writer-assigned
    run_id: Mapped[int | None] = mapped_column(ForeignKey("runs.id"))
    defect_id: Mapped[int | None] = mapped_column(ForeignKey("defects.id"), index=True)
    source_id: Mapped[str] = mapped_column(String(128))
    part_id: Mapped[int | None] = mapped_column(BigInteger)
    issued_at: Mapped[float]
    due_encoder: Mapped[int | None] = mapped_column(BigInteger)
    due_time: Mapped[float | None]
    fired_at: Mapped[float | None]
    sinks_ok: Mapped[list[str]]
    sinks_failed: Mapped[list[str]]
    acknowledged_at: Mapped[float | None]


OPERATOR_ACTIONS = ("ack", "false_positive", "comment")


class OperatorActionRow(Base):
    __tablename__ = "operator_actions"
    __table_args__ = (
        CheckConstraint("action IN ('ack', 'false_positive', 'comment')", name="known_action"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    defect_id: Mapped[int] = mapped_column(ForeignKey("defects.id"), index=True)
    time: Mapped[float]
    operator: Mapped[str] = mapped_column(String(128))
    action: Mapped[str] = mapped_column(String(16))
    comment: Mapped[str | None] = mapped_column(Text)


class SchemaMigrationRow(Base):
    __tablename__ = "schema_migrations"

    version: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    applied_at: Mapped[float]
    description: Mapped[str | None] = mapped_column(Text)

