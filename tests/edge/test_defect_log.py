"""The defect log on real SQLite files and a real PostgreSQL server (`log_target`: the same test
on both where it holds for both): one writer thread, readers beside it, nothing lost."""

from __future__ import annotations

import csv
import dataclasses
import json
import socket
import sqlite3
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from sqlalchemy import create_engine, inspect, text
from sqlalchemy.pool import NullPool

from edge.defect_log import (
    AlarmRecord,
    Base,
    DefectFilter,
    DefectLogReader,
    DefectLogWriter,
    DefectNotFoundError,
    DefectRecord,
    ImageStore,
    RejectRecord,
    SchemaTooNewError,
    WriterBusyError,
    format_alarms_table,
    format_defect_table,
    format_rejects_table,
    migrate,
)
from edge.defect_log.engine import create_db_engine, database_url
from edge.reject import RejectEvent
from edge.results import Decision, FrameResult, Verdict


def defect(seq: int, *, source_id: str = "cam0", run_id: int | None = None,
           when: float = 1_700_000_000.0) -> DefectRecord:
    result = FrameResult(
        source_id=source_id, seq=seq, part_id=1000 + seq, encoder=50 * seq, wall_time=when + seq,
        capture_mono_ns=0, frame_shape=(480, 640), raw_score=3.0 + seq / 100,
        calibrated_score=4.0, threshold=2.5, box=(10, 20, 30, 40), area_px=400,
    )
    decision = Decision(result, Verdict.DEFECT, True, f"score {result.raw_score:.3g} >= 2.5")
    return DefectRecord.from_decision(decision, run_id=run_id, frame_path=f"/img/{seq}.jpg")


def wait_until(predicate, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def count_defects(db: Path | str) -> int:
    with DefectLogReader(db) as reader:
        return len(reader.list_defects(limit=None))


def sql(target: Path | str, statement: str, **params) -> list[tuple]:
    """Run one statement on the database itself (not through the defect log); its rows."""
    engine = create_engine(database_url(target), poolclass=NullPool)
    try:
        with engine.begin() as conn:
            result = conn.execute(text(statement), params)
            return [tuple(row) for row in result] if result.returns_rows else []
    finally:
        engine.dispose()


@pytest.fixture
def db(tmp_path) -> Path:
    return tmp_path / "line" / "defects.db"


# --- opening ------------------------------------------------------------------------------


def test_defect_log_writer_runs_sqlite_in_wal_mode_when_opened(db):
    writer = DefectLogWriter(db)
    try:
        with sqlite3.connect(db) as plain:
            assert plain.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        with writer.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
            assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 1   # NORMAL
    finally:
        writer.stop()


def test_defect_log_records_migrations_when_database_is_new(log_target):
    DefectLogWriter(log_target).stop()
    DefectLogWriter(log_target).stop()     # opening again applies nothing twice
    versions = sql(log_target, "SELECT version FROM schema_migrations ORDER BY version")
    engine = create_engine(database_url(log_target), poolclass=NullPool)
    tables = set(inspect(engine).get_table_names())
    engine.dispose()
    assert versions == [(1,), (2,), (3,), (4,)]
    assert {"runs", "defects", "reject_events", "operator_actions", "alarms", "audit",
            "kept_frames"} <= tables


def test_defect_log_refuses_to_open_when_database_is_newer_than_code(log_target):
    DefectLogWriter(log_target).stop()
    sql(log_target, "INSERT INTO schema_migrations (version, applied_at) VALUES (99, 0)")
    with pytest.raises(SchemaTooNewError, match="schema version 99.*upgrade grad-edge"):
        DefectLogWriter(log_target)


def test_defect_log_migrations_build_exactly_the_models_columns_when_applied_in_order(
        log_target):
    DefectLogWriter(log_target).stop()
    engine = create_engine(database_url(log_target), poolclass=NullPool)
    try:
        found = inspect(engine)
        for table in Base.metadata.sorted_tables:
            columns = {c["name"]: c["nullable"] for c in found.get_columns(table.name)}
            assert columns == {c.name: c.nullable for c in table.columns}, table.name
            indexes = {tuple(i["column_names"]) for i in found.get_indexes(table.name)}
            assert indexes == {tuple(c.name for c in i.columns) for i in table.indexes}, \
                table.name
    finally:
        engine.dispose()


def test_defect_log_upgrades_a_version_1_database_keeping_its_rows_when_opened(log_target):
    engine = create_db_engine(database_url(log_target))
    migrate(engine, up_to=1)
    engine.dispose()
    host = socket.gethostname()
    # Rows as the version-1 writer left them.
    sql(log_target, "INSERT INTO runs (id, started_at, stopped_at, host) VALUES (1, 10, 20, :h)",
        h=host)
    sql(log_target, "INSERT INTO runs (id, started_at, host) VALUES (2, 30, :h)", h=host)
    sql(log_target, "INSERT INTO defects (id, run_id, time, source_id, seq, verdict, reason, "
        "area_px, acknowledged) VALUES (1, 2, 31, 'cam0', 5, 'DEFECT', 'r', 0, :no)", no=False)
    sql(log_target, "INSERT INTO reject_events (id, run_id, defect_id, source_id, issued_at, "
        "fired_at, sinks_ok, sinks_failed) VALUES (1, 2, 1, 'cam0', 31, 32, "
        "'[\"jsonl\"]', '[]')")

    writer = DefectLogWriter(log_target)
    writer.stop()

    assert writer.recovered_runs == [2]     # open, no pid to check: closed as crashed
    with DefectLogReader(log_target) as reader:
        runs = {r.id: r for r in reader.list_runs()}
        (reject,) = reader.list_rejects()
        detail = reader.get_defect(1)
    assert runs[1].status == "completed" and runs[1].stopped_at == 20
    assert runs[2].status == "crashed" and runs[2].stopped_at == 32   # its last known record
    assert reject.outcome == "fired" and reject.sinks_ok == ("jsonl",)
    assert detail.defect.reject is None and detail.defect.seq == 5


def test_defect_log_writer_refuses_a_second_writer_when_one_holds_the_database(db):
    with DefectLogWriter(db):
        with pytest.raises(WriterBusyError, match="another grad-edge writer"):
            DefectLogWriter(db)
    DefectLogWriter(db).stop()              # free again once the first has stopped


def test_defect_log_reader_refuses_when_database_file_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="no defect log"):
        DefectLogReader(tmp_path / "nowhere.db")


# --- writing and reading ------------------------------------------------------------------


def test_defect_log_writer_inserts_every_record_when_fed_from_queue(log_target):
    db = log_target
    with DefectLogWriter(db, batch_size=16) as writer:
        run_id = writer.begin_run(model_hash="abc123", config_hash="cfg1",
                                  config_path="line.yaml")
        ids = [writer.submit(defect(i, run_id=run_id)) for i in range(50)]
        reject_id = writer.submit(RejectRecord(source_id="cam0", issued_at=1.0, defect_id=ids[3],
                                               fired_at=2.0, sinks_ok=("jsonl",),
                                               sinks_failed=("plc",), run_id=run_id))
        # A reader sees the rows while the writer is still open.
        assert wait_until(lambda: count_defects(db) == 50)
        writer.end_run(run_id, {"frames": 5000, "defects": 50})

    assert ids == list(range(1, 51)) and reject_id == 1
    with DefectLogReader(db) as reader:
        newest = reader.list_defects(limit=5)
        detail = reader.get_defect(ids[3])
        cam1 = reader.list_defects(source="cam1")
    assert [d.seq for d in newest] == [49, 48, 47, 46, 45]
    assert detail.defect.box == (10, 20, 30, 40) and detail.defect.part_id == 1003
    assert detail.reject_events[0].sinks_ok == ("jsonl",)
    assert detail.reject_events[0].sinks_failed == ("plc",)
    assert cam1 == []
    ((stopped_at, summary),) = sql(db, "SELECT stopped_at, summary FROM runs")
    summary = json.loads(summary) if isinstance(summary, str) else summary   # SQLite: text
    assert stopped_at is not None and summary == {"frames": 5000, "defects": 50}


def test_defect_log_reader_records_operator_actions_when_acknowledged(log_target):
    db = log_target
    with DefectLogWriter(db) as writer:
        first, second, third = (writer.submit(defect(i)) for i in range(3))
        writer.submit(RejectRecord(source_id="cam0", issued_at=1.0, defect_id=first))
        assert wait_until(lambda: count_defects(db) == 3)

        with DefectLogReader(db) as reader:
            reader.acknowledge(first, "maria", "pulled the part, scratch confirmed")
            reader.mark_false_positive(second, "maria", "reflection")
            reader.comment(third, "jon", "watch this camera")
            unacked = reader.list_defects(unacked_only=True)
            detail = reader.get_defect(first)
            fp = reader.get_defect(second)
            with pytest.raises(DefectNotFoundError, match="no defect with id 999"):
                reader.acknowledge(999, "maria")

    assert [d.id for d in unacked] == [third]
    assert detail.defect.acknowledged
    assert [(a.operator, a.action, a.comment) for a in detail.actions] == [
        ("maria", "ack", "pulled the part, scratch confirmed")]
    assert detail.reject_events[0].acknowledged_at is not None
    assert fp.actions[0].action == "false_positive" and fp.defect.acknowledged


def test_defect_log_reader_exports_matching_rows_when_asked_for_csv_and_jsonl(log_target,
                                                                               tmp_path):
    db = log_target
    with DefectLogWriter(db) as writer:
        for i in range(4):
            writer.submit(defect(i, source_id="cam0" if i % 2 == 0 else "cam1"))
        assert wait_until(lambda: count_defects(db) == 4)

    with DefectLogReader(db) as reader:
        n_csv = reader.export(tmp_path / "out.csv", DefectFilter(source="cam0"))
        n_jsonl = reader.export(tmp_path / "out.jsonl")
        table = format_defect_table(reader.list_defects())

    with open(tmp_path / "out.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert n_csv == 2 and [r["seq"] for r in rows] == ["0", "2"]
    assert rows[0]["source_id"] == "cam0" and rows[0]["frame_path"] == "/img/0.jpg"
    assert rows[0]["time_iso"].startswith("2023-11-14")
    lines = (tmp_path / "out.jsonl").read_text().splitlines()
    assert n_jsonl == 4 and json.loads(lines[-1])["seq"] == 3
    assert "cam1" in table and "DEFECT" in table and table.count("\n") == 5


def test_defect_log_writer_names_a_defect_before_it_is_submitted_when_reserving_an_id(log_target):
    db = log_target
    with DefectLogWriter(db) as writer:
        reserved = writer.reserve_defect_id()
        other = writer.submit(defect(2))                 # submitted first, gets the next id
        kept = writer.submit(dataclasses.replace(defect(1), id=reserved))
        assert wait_until(lambda: count_defects(db) == 2)
    with DefectLogReader(db) as reader:
        assert reader.get_defect(reserved).defect.seq == 1
    assert (reserved, other, kept) == (1, 2, 1)


def test_defect_log_lists_missed_rejects_and_alarms_when_the_line_reports_them(log_target):
    db = log_target
    with DefectLogWriter(db) as writer:
        run_id = writer.begin_run(model_hash="m")
        defect_id = writer.submit(defect(3, run_id=run_id))
        event = RejectEvent(source_id="cam0", seq=3, part_id=1003, encoder=150,
                            due_encoder=400, due_time=None, verdict="DEFECT", raw_score=3.0,
                            reason="r", defect_id=defect_id)
        missed_id = writer.submit(RejectRecord.missed(
            event, "verdict 120 ms late: part passed the ejector at encoder 400", run_id=run_id))
        fired_id = writer.submit(RejectRecord.from_fired(event, ["plc"], [], run_id=run_id))
        alarm_id = writer.submit(AlarmRecord(run_id, 1_700_000_100.0, "cam0", "missed_reject",
                                             "reject for part 1003 missed"))
        writer.submit(AlarmRecord(run_id, 1_700_000_200.0, None, "line_stopped", "stopped"))
        writer.end_run(run_id, {"frames": 9}, status="failed", exit_code=1)

    with DefectLogReader(db) as reader:
        missed = reader.list_rejects(outcome="missed")
        both = reader.get_defect(defect_id).reject_events
        alarms = reader.list_alarms()
        cam_alarms = reader.list_alarms(kind="missed_reject")
        (run,) = reader.list_runs()
    assert [(r.id, r.fired_at, r.sinks_ok, r.run_id) for r in missed] == [
        (missed_id, None, (), run_id)]
    assert "late" in missed[0].reason
    assert {r.outcome for r in both} == {"missed", "fired"} and fired_id == missed_id + 1
    assert [a.kind for a in alarms] == ["line_stopped", "missed_reject"]   # newest first
    assert [(a.id, a.source_id) for a in cam_alarms] == [(alarm_id, "cam0")]
    assert (run.status, run.exit_code, run.summary) == ("failed", 1, {"frames": 9})
    assert "missed" in format_rejects_table(missed) and "line_stopped" in \
        format_alarms_table(alarms)


def test_defect_log_records_refuse_what_cannot_be_logged_when_built():
    with pytest.raises(ValueError, match="only DEFECT and UNKNOWN"):
        dataclasses.replace(defect(1), verdict="OK")
    with pytest.raises(ValueError, match="needs a reason"):
        RejectRecord(source_id="cam0", issued_at=1.0, outcome="missed")
    with pytest.raises(ValueError, match="outcome 'late'"):
        RejectRecord(source_id="cam0", issued_at=1.0, outcome="late", reason="x")


def test_defect_log_writer_stores_the_latest_counters_when_progress_is_noted(log_target):
    db = log_target
    with DefectLogWriter(db) as writer:
        run_id = writer.begin_run()
        writer.note_progress(run_id, {"frames": 10}, at=100.0)
        writer.note_progress(run_id, {"frames": 25, "fps": np.float32(12.5)}, at=105.0)
        with DefectLogReader(db) as reader:
            assert wait_until(lambda: reader.list_runs()[0].progress_at == 105.0)
            (run,) = reader.list_runs()
    assert run.progress == {"frames": 25, "fps": 12.5} and run.status == "running"


# --- never lost ---------------------------------------------------------------------------


def hold_write_lock(db: Path) -> sqlite3.Connection:
    """Another process's connection holding the write lock, so the writer's inserts time out."""
    other = sqlite3.connect(db, isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    return other


def test_defect_log_writer_retries_and_lands_record_when_database_becomes_writable(db):
    with DefectLogWriter(db, busy_timeout_ms=50, retry_max_s=0.1) as writer:
        lock = hold_write_lock(db)
        defect_id = writer.submit(defect(7))
        time.sleep(0.5)                                  # several failed attempts
        assert count_defects(db) == 0 and writer.pending == 1
        lock.execute("ROLLBACK")
        lock.close()
        assert wait_until(lambda: count_defects(db) == 1)

    with DefectLogReader(db) as reader:
        assert reader.get_defect(defect_id).defect.seq == 7


def test_defect_log_writer_keeps_records_in_journal_then_replays_them_when_database_stays_unwritable(db):
    writer = DefectLogWriter(db, busy_timeout_ms=50, retry_max_s=0.05).start()
    lock = hold_write_lock(db)
    defect_id = writer.submit(defect(11))
    writer.submit(RejectRecord(source_id="cam0", issued_at=1.0, defect_id=defect_id))
    writer.stop(timeout=0.3)
    lock.execute("ROLLBACK")
    lock.close()

    journal = db.with_name(db.name + ".journal.jsonl")
    assert len(journal.read_bytes().splitlines()) == 2
    assert count_defects(db) == 0
    assert not db.with_name(db.name + ".spool.jsonl").exists()   # in the journal already

    with DefectLogWriter(db) as again:
        assert again.replayed == 2 and count_defects(db) == 1     # replayed at open
        next_id = again.submit(defect(12))               # ids continue after the replayed one
    with DefectLogReader(db) as reader:
        detail = reader.get_defect(defect_id)
    assert detail.defect.seq == 11 and len(detail.reject_events) == 1
    assert next_id == defect_id + 1
    assert journal.read_bytes() == b""                   # all committed: emptied at stop


def test_defect_log_writer_without_journal_spools_then_reimports_when_database_stays_unwritable(db):
    writer = DefectLogWriter(db, journal=False, busy_timeout_ms=50, retry_max_s=0.05).start()
    lock = hold_write_lock(db)
    defect_id = writer.submit(defect(11))
    writer.submit(RejectRecord(source_id="cam0", issued_at=1.0, defect_id=defect_id))
    writer.stop(timeout=0.3)
    lock.execute("ROLLBACK")
    lock.close()

    spool = db.with_name(db.name + ".spool.jsonl")
    assert len(spool.read_text().splitlines()) == 2 and writer.spooled == 2
    assert count_defects(db) == 0

    with DefectLogWriter(db, journal=False) as again:
        assert wait_until(lambda: count_defects(db) == 1)
        next_id = again.submit(defect(12))               # ids continue after the spooled one
    with DefectLogReader(db) as reader:
        detail = reader.get_defect(defect_id)
    assert detail.defect.seq == 11 and len(detail.reject_events) == 1
    assert next_id == defect_id + 1
    assert not spool.exists() and not spool.with_name(spool.name + ".importing").exists()


def test_defect_log_writer_sets_record_aside_and_keeps_others_when_database_refuses_one(
        log_target):
    db = log_target
    with DefectLogWriter(db) as writer:
        writer.submit(defect(1))
        writer.submit(defect(2, run_id=12345))           # no such run: foreign key fails
        writer.submit(defect(3))
        assert wait_until(lambda: count_defects(db) == 2)

    if isinstance(db, Path):                             # SQLite: beside the database
        assert writer.failed_path == db.with_name(db.name + ".failed.jsonl")
    failed = writer.failed_path.read_text().splitlines()
    assert len(failed) == 1 and json.loads(failed[0])["record"]["seq"] == 2
    assert "foreign key" in json.loads(failed[0])["error"].lower()


# --- saved images -------------------------------------------------------------------------


def test_image_store_writes_frame_and_heatmap_named_by_run_and_defect_when_saving(tmp_path):
    store = ImageStore(tmp_path / "images")
    frame = np.full((120, 160, 3), 100, np.uint8)
    amap = np.zeros((30, 40), np.float32)
    amap[10:20, 10:20] = 1.0
    when = time.mktime((2024, 3, 5, 12, 0, 0, 0, 0, -1))

    saved = store.save("line 1/cam0", 42, frame, amap, when=when, run_id=3, defect_id=17)

    assert saved.frame_path == str(tmp_path / "images" / "2024-03-05" /
                                   "r3_d17_line_1_cam0_42_frame.jpg")
    assert saved.heatmap_path.endswith("2024-03-05/r3_d17_line_1_cam0_42_heatmap.jpg")
    heatmap = cv2.imread(saved.heatmap_path)
    assert heatmap.shape == (120, 160, 3)
    # Hot region red-ish, cold region blue-ish (JET), both blended over the grey frame.
    assert heatmap[60, 60, 2] > heatmap[60, 60, 0] and heatmap[5, 5, 0] > heatmap[5, 5, 2]


def test_image_store_never_overwrites_a_file_when_the_same_name_comes_again(tmp_path):
    # Two defect logs sharing one image folder can hand out the same run and defect ids.
    store = ImageStore(tmp_path / "images", image_format="png")
    first = store.save("cam0", 1, np.zeros((8, 8), np.uint8), when=0.0, run_id=1, defect_id=1)
    second = store.save("cam0", 1, np.full((8, 8), 255, np.uint8), when=0.0, run_id=1,
                        defect_id=1)

    assert first.frame_path != second.frame_path
    assert second.frame_path.endswith("r1_d1_cam0_1_2_frame.png")
    assert cv2.imread(first.frame_path).max() == 0 and cv2.imread(second.frame_path).min() == 255


def test_image_store_returns_none_paths_when_write_fails(tmp_path):
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("in the way")
    saved = ImageStore(not_a_folder).save("cam0", 1, np.zeros((8, 8), np.uint8),
                                          np.zeros((4, 4), np.float32))
    assert saved.frame_path is None and saved.heatmap_path is None


def _fill_day(root: Path, day: str, n: int, size: int = 1000) -> None:
    (root / day).mkdir(parents=True)
    for i in range(n):
        (root / day / f"cam0_{i}_frame.jpg").write_bytes(b"x" * size)


def test_image_store_deletes_oldest_day_first_when_over_size_limit(tmp_path):
    root = tmp_path / "images"
    _fill_day(root, "2024-01-01", 3)
    _fill_day(root, "2024-01-02", 3)
    store = ImageStore(root, retention_gb=4000 / 1024**3)   # room for 4 of the 6 files

    deleted = store.enforce_retention()

    assert deleted == 2
    assert len(list((root / "2024-01-01").iterdir())) == 1
    assert len(list((root / "2024-01-02").iterdir())) == 3


def test_image_store_deletes_day_folders_when_older_than_retention_days(tmp_path):
    root = tmp_path / "images"
    now = time.mktime((2024, 6, 30, 12, 0, 0, 0, 0, -1))
    _fill_day(root, "2024-06-01", 2)
    _fill_day(root, "2024-06-29", 2)

    deleted = ImageStore(root, retention_days=7).enforce_retention(now=now)

    assert deleted == 2
    assert sorted(p.name for p in root.iterdir()) == ["2024-06-29"]
