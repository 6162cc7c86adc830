"""Numbered schema migrations; `open_database` gives an engine on a migrated database."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import Connection, Engine, func, insert, inspect, select

from edge.defect_log.engine import _begin_write, create_db_engine
from edge.defect_log.tables import (Base, DefectRow, OperatorActionRow, RejectEventRow, RunRow,
                                    SchemaMigrationRow)

logger = logging.getLogger(__name__)

@dataclass(frozen=True)
class Migration:
    version: int
    description: str
    apply: Callable[[Connection], None]


def _create_tables_v1(conn: Connection) -> None:
    # Migration 1 builds the tables from the models. When a later migration changes a
    # table, first freeze the version-1 DDL here, or a new database would get the new
    # column twice (once here, once in the later migration).
    tables = [RunRow.__table__, DefectRow.__table__, RejectEventRow.__table__,
              OperatorActionRow.__table__]
    Base.metadata.create_all(conn, tables=tables)


MIGRATIONS: list[Migration] = [
    Migration(1, "create runs, defects, reject_events, operator_actions", _create_tables_v1),
]
LATEST_SCHEMA = MIGRATIONS[-1].version


class SchemaTooNewError(RuntimeError):
    """The database was written by a newer grad-edge than this one."""


def schema_version(conn: Connection) -> int:
    if not inspect(conn).has_table(SchemaMigrationRow.__tablename__):
        return 0
    return conn.execute(select(func.max(SchemaMigrationRow.version))).scalar() or 0


def migrate(engine: Engine) -> int:
    """Bring the database up to LATEST_SCHEMA; returns the version it is at."""
    with engine.connect() as conn:
        current = schema_version(conn)
        _check_not_too_new(current, engine)
        if current == LATEST_SCHEMA:
            return current          # nothing to do: no write lock, so read-only DBs open

    with engine.connect() as conn:
        _begin_write(conn)          # one opener migrates; the others wait, then see it done
        SchemaMigrationRow.__table__.create(conn, checkfirst=True)
        current = schema_version(conn)
        _check_not_too_new(current, engine)
        for migration in MIGRATIONS:
            if migration.version <= current:
                continue
            migration.apply(conn)
            conn.execute(insert(SchemaMigrationRow).values(
                version=migration.version, applied_at=time.time(),
                description=migration.description))
            logger.info("defect log %s: applied migration %d (%s)", engine.url,
                        migration.version, migration.description)
        conn.commit()
    return LATEST_SCHEMA


def _check_not_too_new(current: int, engine: Engine) -> None:
    if current > LATEST_SCHEMA:
        raise SchemaTooNewError(
            f"defect log {engine.url.render_as_string(hide_password=True)} is at schema "
            f"version {current}, but this grad-edge only knows up to {LATEST_SCHEMA}; "
            "upgrade grad-edge, or point the defect log at another database file"
        )


def open_database(url: str, *, busy_timeout_ms: int = 5000) -> Engine:
    """Engine for `url`, migrated to the latest schema."""
    engine = create_db_engine(url, busy_timeout_ms=busy_timeout_ms)
    migrate(engine)
    return engine

