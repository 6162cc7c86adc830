"""The defect log: every DEFECT / UNKNOWN, every reject fired, every operator action.

One writer owns the database (`writer.DefectLogWriter`); operators read and acknowledge
through `reader.DefectLogReader`, in short sessions of their own. SQLite runs in WAL mode so
those readers never block the writer.

Read in this order:
  tables.py      the tables
  engine.py      URLs, the engine and its pragmas
  migrations.py  numbered schema migrations; open_database
  records.py     the frozen records the writer takes, and their JSON form
  writer.py      the one writer: queue, thread, retries, spool
  images.py      saved frames and heatmaps, retention
  reader.py      the operators' side: list, show, acknowledge, export
  formatting.py  plain-text tables for the terminal

Everything other modules use is importable from `edge.defect_log` itself.
"""

from edge.defect_log.engine import create_db_engine, database_url, sqlite_path
from edge.defect_log.formatting import format_defect_table
from edge.defect_log.images import ImageStore, SavedImages, heatmap_overlay
from edge.defect_log.migrations import (LATEST_SCHEMA, MIGRATIONS, Migration, SchemaTooNewError,
                                        migrate, open_database, schema_version)
from edge.defect_log.reader import (EXPORT_COLUMNS, DefectDetail, DefectLogReader,
                                    DefectNotFoundError, DefectView, OperatorActionView,
                                    RejectEventView)
from edge.defect_log.records import DefectRecord, LogRecord, RejectRecord, RunEndRecord
from edge.defect_log.tables import (OPERATOR_ACTIONS, Base, DefectRow, OperatorActionRow,
                                    RejectEventRow, RunRow, SchemaMigrationRow)
from edge.defect_log.writer import DefectLogWriter

__all__ = [
    "EXPORT_COLUMNS", "LATEST_SCHEMA", "MIGRATIONS", "OPERATOR_ACTIONS", "Base", "DefectDetail",
    "DefectLogReader", "DefectLogWriter", "DefectNotFoundError", "DefectRecord", "DefectRow",
    "DefectView", "ImageStore", "LogRecord", "Migration", "OperatorActionRow",
    "OperatorActionView", "RejectEventRow", "RejectEventView", "RejectRecord", "RunEndRecord",
    "RunRow", "SavedImages", "SchemaMigrationRow", "SchemaTooNewError", "create_db_engine",
    "database_url", "format_defect_table", "heatmap_overlay", "migrate", "open_database",
    "schema_version", "sqlite_path",
]
