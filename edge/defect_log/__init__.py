"""The defect log: every DEFECT / UNKNOWN, every reject (fired or missed), every alarm, every
run and how it ended, every operator action.

The writer (`writer.DefectLogWriter`) journals each record durably before `submit` returns,
so a record survives SIGKILL, then inserts it from its own thread. Operators read and
acknowledge through `reader.DefectLogReader`, in short sessions of their own.

The database is SQLite (a file per line; one writer owns it; WAL mode, so readers never block
the writer) or PostgreSQL (one for the plant, `postgresql+psycopg://...`; one writer per run,
many runs and hosts at once, ids from the database's sequences). The same code, migrations
and records serve both; the differences are in engine.py, ids.py and local_files.py.

Read in this order:
  tables.py      the tables (as the latest migration leaves them)
  engine.py      URLs, the engine and its pragmas; errors as one line (DefectLogError)
  migrations.py  numbered schema migrations; open_database
  records.py     the frozen records the writer takes, and their JSON form
  journal.py     the fsynced journal the writer replays after a crash
  spool.py       files for records in no journal, and for records the database refused
  inserts.py     how a batch lands: one transaction, ids already there skipped
  ids.py         who numbers records: max + 1 (SQLite), sequences and pools (PostgreSQL)
  local_files.py a PostgreSQL writer's journal on its host; taking over those of dead ones
  runs.py        runs left open by a crash: process identity, closing them as crashed
  writer.py      the writer: journal, queue, thread, retries
  images.py      saved frames and heatmaps (named by run and defect), retention
  reader.py      the operators' side: list, browse (keyset pages), show, counts
  judgements.py  operator actions: ack, false positive, comment, second judgements, audit
  exports.py     CSV / JSONL exports with judgements, operators, comments and run ids
  formatting.py  plain-text tables and the readable `show` for the terminal

Everything other modules use is importable from `edge.defect_log` itself.
"""

from edge.defect_log.engine import (DefectLogError, create_db_engine, database_url, explain,
                                    is_server, sqlite_path)
from edge.defect_log.exports import EXPORT_COLUMNS, export_format
from edge.defect_log.formatting import (format_alarms_table, format_audit_table,
                                        format_defect_detail,
                                        format_defect_table, format_rejects_table,
                                        format_runs_table)
from edge.defect_log.images import ImageStore, SavedImages, heatmap_overlay
from edge.defect_log.journal import Journal, WriterBusyError
from edge.defect_log.migrations import (LATEST_SCHEMA, MIGRATIONS, Migration, SchemaTooNewError,
                                        migrate, open_database, schema_version)
from edge.defect_log.judgements import ActionResult, DefectNotFoundError
from edge.defect_log.reader import (AlarmView, AuditView, DefectDetail, DefectFilter,
                                    DefectLogReader, DefectPage, DefectView, KeptFrameView,
                                    OperatorActionView, RejectEventView, RunView)
from edge.defect_log.records import (AlarmRecord, DefectRecord, KeptFrameRecord, LogRecord,
                                     ProgressRecord, RejectRecord, RunEndRecord)
from edge.defect_log.runs import process_alive, process_start
from edge.defect_log.tables import (JUDGEMENTS, OPERATOR_ACTIONS, REJECT_OUTCOMES, RUN_STATUSES,
                                    AlarmRow, AuditRow, Base, DefectRow, KeptFrameRow,
                                    OperatorActionRow, RejectEventRow, RunRow, SchemaMigrationRow)
from edge.defect_log.writer import DefectLogWriter

__all__ = [
    "JUDGEMENTS", "ActionResult", "AuditRow", "AuditView", "DefectFilter", "DefectPage",
    "KeptFrameRecord", "KeptFrameRow", "KeptFrameView", "export_format",
    "format_audit_table", "format_defect_detail", "EXPORT_COLUMNS", "LATEST_SCHEMA", "MIGRATIONS", "OPERATOR_ACTIONS", "REJECT_OUTCOMES",
    "RUN_STATUSES", "AlarmRecord", "AlarmRow", "AlarmView", "Base", "DefectDetail",
    "DefectLogError", "DefectLogReader", "DefectLogWriter", "DefectNotFoundError",
    "DefectRecord", "DefectRow", "DefectView", "ImageStore", "Journal", "LogRecord",
    "Migration", "OperatorActionRow", "OperatorActionView", "ProgressRecord", "RejectEventRow",
    "RejectEventView", "RejectRecord", "RunEndRecord", "RunRow", "RunView", "SavedImages",
    "SchemaMigrationRow", "SchemaTooNewError", "WriterBusyError", "create_db_engine",
    "database_url", "explain", "format_alarms_table", "format_defect_table",
    "format_rejects_table", "format_runs_table", "heatmap_overlay", "is_server", "migrate",
    "open_database", "process_alive", "process_start", "schema_version", "sqlite_path",
]
