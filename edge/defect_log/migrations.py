"""Numbered schema migrations, and `open_database`: an engine on a migrated database.

Each migration freezes its own DDL (Core tables in a MetaData of its own, or ALTERs), so a
new database goes through exactly the steps an old one went through; the models in tables.py
describe the end result, and a test checks the two agree. Add a migration at the end; never
change what one that has shipped does to a database it has already run on.

  1  runs, defects, reject_events, operator_actions
  2  runs: pid, process_start, status, exit_code, progress, progress_at (crashed-run closing)
  3  reject_events: outcome, reason; defects: reject; the alarms table
  4  operator judgements: defects.judgement/judged_by/judged_at/judgements, operator_actions
     .via/previous_id, the audit table (every operator action), kept_frames (near-threshold
     good frames kept for training)

The same migrations run on SQLite and PostgreSQL. What PostgreSQL needs beyond SQLite was
added to them when PostgreSQL support came, before any PostgreSQL database existed, and leaves
their SQLite DDL as it was: ids and references to them are BIGINT there (`_ID`), and
migrations 1, 3 and 4 also create the sequences the writers draw ids from (ids.py), one per
writer-numbered table, plus one numbering the writers themselves.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import (JSON, BigInteger, Boolean, CheckConstraint, Column, Connection, Double,
                        Engine, ForeignKey, Index, Integer, MetaData, String, Table, Text, func,
                        insert, inspect, select, text)
from sqlalchemy.schema import CreateColumn

from edge.defect_log.engine import DefectLogError, begin_exclusive, create_db_engine, explain
from edge.defect_log.tables import SchemaMigrationRow

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Migration:
    version: int
    description: str
    apply: Callable[[Connection], None]


# An id or a reference to one: INTEGER on SQLite (as shipped), BIGINT on PostgreSQL.
_ID = Integer().with_variant(BigInteger(), "postgresql")


def _create_id_sequences(conn: Connection, *tables: str) -> None:
    """PostgreSQL only: the sequence each table's writer-assigned ids are drawn from (ids.py),
    started after any id already there."""
    if conn.dialect.name != "postgresql":
        return
    for table in tables:
        conn.exec_driver_sql(f"CREATE SEQUENCE {table}_id_seq AS BIGINT")
        conn.exec_driver_sql(f"SELECT setval('{table}_id_seq', "
                             f"(SELECT COALESCE(MAX(id), 0) + 1 FROM {table}), false)")


# --- 1: the first tables (frozen as shipped) --------------------------------------------------

_v1 = MetaData()
Table("runs", _v1,
      Column("id", _ID, primary_key=True),
      Column("started_at", Double, nullable=False),
      Column("stopped_at", Double),
      Column("model_hash", String(128)),
      Column("config_hash", String(128)),
      Column("config_path", Text),
      Column("host", String(255)),
      Column("summary", JSON))
Table("defects", _v1,
      Column("id", _ID, primary_key=True, autoincrement=False),
      Column("run_id", _ID, ForeignKey("runs.id"), index=True),
      Column("time", Double, nullable=False, index=True),
      Column("source_id", String(128), nullable=False, index=True),
      Column("seq", BigInteger, nullable=False),
      Column("part_id", BigInteger),
      Column("encoder", BigInteger),
      Column("raw_score", Double),
      Column("calibrated_score", Double),
      Column("threshold", Double),
      Column("verdict", String(16), nullable=False),
      Column("reason", Text, nullable=False),
      Column("x0", Integer), Column("y0", Integer), Column("x1", Integer), Column("y1", Integer),
      Column("area_px", Integer, nullable=False),
      Column("frame_path", Text),
      Column("heatmap_path", Text),
      Column("acknowledged", Boolean, nullable=False, index=True))
Table("reject_events", _v1,
      Column("id", _ID, primary_key=True, autoincrement=False),
      Column("run_id", _ID, ForeignKey("runs.id")),
      Column("defect_id", _ID, ForeignKey("defects.id"), index=True),
      Column("source_id", String(128), nullable=False),
      Column("part_id", BigInteger),
      Column("issued_at", Double, nullable=False),
      Column("due_encoder", BigInteger),
      Column("due_time", Double),
      Column("fired_at", Double),
      Column("sinks_ok", JSON, nullable=False),
      Column("sinks_failed", JSON, nullable=False),
      Column("acknowledged_at", Double))
Table("operator_actions", _v1,
      Column("id", _ID, primary_key=True),
      Column("defect_id", _ID, ForeignKey("defects.id"), nullable=False, index=True),
      Column("time", Double, nullable=False),
      Column("operator", String(128), nullable=False),
      Column("action", String(16), nullable=False),
      Column("comment", Text),
      CheckConstraint("action IN ('ack', 'false_positive', 'comment')", name="known_action"))


def _v1_tables(conn: Connection) -> None:
    _v1.create_all(conn)
    _create_id_sequences(conn, "defects", "reject_events")
    if conn.dialect.name == "postgresql":
        # Numbers each writer that opens the database: its offline id range (ids.py).
        conn.exec_driver_sql("CREATE SEQUENCE defect_log_writers AS BIGINT")


# --- 2 and 3: columns added, a table added ------------------------------------------------------


def _add_column(conn: Connection, table: str, column: Column) -> None:
    """ALTER TABLE ... ADD COLUMN, the column's DDL compiled for this database."""
    Table(table, MetaData(), column)             # CreateColumn wants the column in a table
    ddl = CreateColumn(column).compile(dialect=conn.dialect)
    conn.exec_driver_sql(f"ALTER TABLE {table} ADD COLUMN {ddl}")


def _v2_run_lifecycle(conn: Connection) -> None:
    for column in (Column("pid", Integer),
                   Column("process_start", String(96)),
                   Column("status", String(16), nullable=False, server_default="running"),
                   Column("exit_code", Integer),
                   Column("progress", JSON),
                   Column("progress_at", Double)):
        _add_column(conn, "runs", column)
    # Runs closed before this migration ended one way or another; v1 did not say which.
    # Open ones stay `running`: the next writer's crash check closes them.
    conn.execute(text("UPDATE runs SET status = 'completed' WHERE stopped_at IS NOT NULL"))


_v3 = MetaData()
_alarms_v3 = Table(
    "alarms", _v3,
    Column("id", _ID, primary_key=True, autoincrement=False),
    Column("run_id", _ID, ForeignKey("runs.id")),
    Column("time", Double, nullable=False),
    Column("source_id", String(128)),
    Column("kind", String(64), nullable=False),
    Column("message", Text, nullable=False),
    Index("ix_alarms_run_id", "run_id"),
    Index("ix_alarms_time", "time"))
Table("runs", _v3, Column("id", _ID, primary_key=True))   # for the foreign key only


def _v3_outcomes_and_alarms(conn: Connection) -> None:
    _add_column(conn, "reject_events",
                Column("outcome", String(16), nullable=False, server_default="fired"))
    _add_column(conn, "reject_events", Column("reason", Text))
    _add_column(conn, "defects", Column("reject", Boolean))
    _alarms_v3.create(conn)
    _create_id_sequences(conn, "alarms")


_v4 = MetaData()
_audit_v4 = Table(
    "audit", _v4,
    Column("id", Integer, primary_key=True),
    Column("time", Double, nullable=False),
    Column("operator", String(128), nullable=False),
    Column("via", String(128), nullable=False),
    Column("action", String(32), nullable=False),
    Column("target", Text, nullable=False),
    Column("detail", JSON),
    Index("ix_audit_time", "time"))
_kept_v4 = Table(
    "kept_frames", _v4,
    Column("id", _ID, primary_key=True, autoincrement=False),
    Column("run_id", _ID, ForeignKey("runs.id")),
    Column("time", Double, nullable=False),
    Column("source_id", String(128), nullable=False),
    Column("seq", BigInteger, nullable=False),
    Column("part_id", BigInteger),
    Column("raw_score", Double, nullable=False),
    Column("threshold", Double, nullable=False),
    Column("truth", Integer),
    Column("frame_path", Text),
    Index("ix_kept_frames_run_id", "run_id"),
    Index("ix_kept_frames_time", "time"))
Table("runs", _v4, Column("id", _ID, primary_key=True))   # for the foreign key only


_V4_PAGE_INDEXES = {
    "ix_defects_time_id": ("time", "id"),
    "ix_defects_source_page": ("source_id", "time", "id"),
    "ix_defects_run_page": ("run_id", "time", "id"),
    "ix_defects_verdict_page": ("verdict", "time", "id"),
    "ix_defects_judgement_page": ("judgement", "time", "id"),
}


def _v4_judgements_audit_kept(conn: Connection) -> None:
    # The latest judgement on each defect, kept on its row so the station filters 100,000
    # rows by it through an index; every judgement stays in operator_actions.
    _add_column(conn, "defects", Column("judgement", String(16)))
    _add_column(conn, "defects", Column("judged_by", String(128)))
    _add_column(conn, "defects", Column("judged_at", Double))
    _add_column(conn, "defects", Column("judgements", Integer, nullable=False,
                                        server_default="0"))
    # The browser's pages: newest first by keyset (time, id), whole or filtered by source,
    # run, verdict or judgement; each filter has an index that walks in page order, so a
    # page reads 50 index entries, not every match (benchmarks/station.py).
    for name, columns in _V4_PAGE_INDEXES.items():
        conn.exec_driver_sql(f"CREATE INDEX {name} ON defects ({', '.join(columns)})")
    _add_column(conn, "operator_actions", Column("via", String(128)))
    _add_column(conn, "operator_actions", Column("previous_id", _ID))
    # Judgements given before this migration: the latest one per defect, and how many.
    conn.exec_driver_sql(
        "UPDATE defects SET "
        "judgements = (SELECT COUNT(*) FROM operator_actions a WHERE a.defect_id = defects.id "
        "AND a.action IN ('ack', 'false_positive')), "
        "judgement = (SELECT a.action FROM operator_actions a WHERE a.defect_id = defects.id "
        "AND a.action IN ('ack', 'false_positive') ORDER BY a.id DESC LIMIT 1), "
        "judged_by = (SELECT a.operator FROM operator_actions a WHERE a.defect_id = defects.id "
        "AND a.action IN ('ack', 'false_positive') ORDER BY a.id DESC LIMIT 1), "
        "judged_at = (SELECT a.time FROM operator_actions a WHERE a.defect_id = defects.id "
        "AND a.action IN ('ack', 'false_positive') ORDER BY a.id DESC LIMIT 1)")
    _v4.create_all(conn, tables=[_audit_v4, _kept_v4])
    _create_id_sequences(conn, "kept_frames")


MIGRATIONS: list[Migration] = [
    Migration(1, "create runs, defects, reject_events, operator_actions", _v1_tables),
    Migration(2, "runs: pid, process_start, status, exit_code, progress, progress_at",
              _v2_run_lifecycle),
    Migration(3, "reject_events: outcome, reason; defects: reject; alarms table",
              _v3_outcomes_and_alarms),
    Migration(4, "defects: judgement, judged_by, judged_at, judgements; operator_actions: via, "
                 "previous_id; audit and kept_frames tables", _v4_judgements_audit_kept),
]
LATEST_SCHEMA = MIGRATIONS[-1].version


# --- applying them ------------------------------------------------------------------------------


class SchemaTooNewError(DefectLogError):
    """The database was written by a newer grad-edge than this one."""


def schema_version(conn: Connection) -> int:
    if not inspect(conn).has_table(SchemaMigrationRow.__tablename__):
        return 0
    return conn.execute(select(func.max(SchemaMigrationRow.version))).scalar() or 0


def migrate(engine: Engine, *, up_to: int = LATEST_SCHEMA) -> int:
    """Bring the database up to `up_to` (default: the latest); returns the version it is at."""
    with engine.connect() as conn:
        current = schema_version(conn)
        _check_not_too_new(current, engine)
        if current >= up_to:
            return current          # nothing to do: no write lock, so read-only DBs open

    with engine.connect() as conn:
        # One opener migrates; the others wait, then see it done.
        begin_exclusive(conn, "migrate")
        SchemaMigrationRow.__table__.create(conn, checkfirst=True)
        current = schema_version(conn)
        _check_not_too_new(current, engine)
        for migration in MIGRATIONS:
            if migration.version <= current or migration.version > up_to:
                continue
            migration.apply(conn)
            conn.execute(insert(SchemaMigrationRow).values(
                version=migration.version, applied_at=time.time(),
                description=migration.description))
            logger.info("defect log %s: applied migration %d (%s)", engine.url,
                        migration.version, migration.description)
        conn.commit()
    return max(current, up_to)


def _check_not_too_new(current: int, engine: Engine) -> None:
    if current > LATEST_SCHEMA:
        raise SchemaTooNewError(
            f"defect log {engine.url.render_as_string(hide_password=True)} is at schema "
            f"version {current}, but this grad-edge only knows up to {LATEST_SCHEMA}; "
            "upgrade grad-edge, or point the defect log at another database"
        )


def open_database(url: str, *, busy_timeout_ms: int = 5000) -> Engine:
    """Engine for `url`, migrated to the latest schema.

    Raises :class:`DefectLogError` (one line: what is wrong, how to fix it) when the path is
    a directory, not a database, not writable, on a full disk, or locked too long.
    """
    try:
        engine = create_db_engine(url, busy_timeout_ms=busy_timeout_ms)
    except DefectLogError:
        raise
    except Exception as exc:        # its folder could not be made; no driver; a bad URL
        raise explain(exc, url) from exc
    try:
        migrate(engine)
    except Exception as exc:
        engine.dispose()
        if isinstance(exc, DefectLogError):
            raise
        raise explain(exc, url) from exc
    return engine
