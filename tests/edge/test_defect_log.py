"""The defect log on real SQLite files: one writer thread, readers beside it, nothing lost."""

from __future__ import annotations

import csv
import json
import sqlite3
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from edge.defect_log import (
    DefectLogReader,
    DefectLogWriter,
    DefectNotFoundError,
    DefectRecord,
    ImageStore,
    RejectRecord,
    SchemaTooNewError,
    format_defect_table,
)
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


def count_defects(db: Path) -> int:
    with DefectLogReader(db) as reader:
        return len(reader.list_defects(limit=None))


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


def test_defect_log_records_migrations_when_database_is_new(db):
    DefectLogWriter(db).stop()
    DefectLogWriter(db).stop()             # opening again applies nothing twice
    with sqlite3.connect(db) as plain:
        versions = plain.execute("SELECT version FROM schema_migrations").fetchall()
        tables = {row[0] for row in plain.execute("SELECT name FROM sqlite_master "
                                                  "WHERE type = 'table'")}
    assert versions == [(1,)]
    assert {"runs", "defects", "reject_events", "operator_actions"} <= tables


def test_defect_log_refuses_to_open_when_database_is_newer_than_code(db):
    DefectLogWriter(db).stop()
    with sqlite3.connect(db) as plain:
        plain.execute("INSERT INTO schema_migrations (version, applied_at) VALUES (99, 0)")
    with pytest.raises(SchemaTooNewError, match="schema version 99.*upgrade grad-edge"):
        DefectLogWriter(db)


def test_defect_log_reader_refuses_when_database_file_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="no defect log"):
        DefectLogReader(tmp_path / "nowhere.db")


# --- writing and reading ------------------------------------------------------------------


def test_defect_log_writer_inserts_every_record_when_fed_from_queue(db):
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
    with sqlite3.connect(db) as plain:
        stopped_at, summary = plain.execute("SELECT stopped_at, summary FROM runs").fetchone()
    assert stopped_at is not None and json.loads(summary) == {"frames": 5000, "defects": 50}


def test_defect_log_reader_records_operator_actions_when_acknowledged(db):
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


def test_defect_log_reader_exports_matching_rows_when_asked_for_csv_and_jsonl(db, tmp_path):
    with DefectLogWriter(db) as writer:
        for i in range(4):
            writer.submit(defect(i, source_id="cam0" if i % 2 == 0 else "cam1"))
        assert wait_until(lambda: count_defects(db) == 4)

    with DefectLogReader(db) as reader:
        n_csv = reader.export_csv(tmp_path / "out.csv", source="cam0")
        n_jsonl = reader.export_jsonl(tmp_path / "out.jsonl")
        table = format_defect_table(reader.list_defects())

    with open(tmp_path / "out.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert n_csv == 2 and [r["seq"] for r in rows] == ["0", "2"]
    assert rows[0]["source_id"] == "cam0" and rows[0]["frame_path"] == "/img/0.jpg"
    assert rows[0]["time_iso"].startswith("2023-11-14")
    lines = (tmp_path / "out.jsonl").read_text().splitlines()
    assert n_jsonl == 4 and json.loads(lines[-1])["seq"] == 3
    assert "cam1" in table and "DEFECT" in table and table.count("\n") == 5


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


def test_defect_log_writer_spools_then_reimports_record_when_database_stays_unwritable(db):
    writer = DefectLogWriter(db, busy_timeout_ms=50, retry_max_s=0.05).start()
    lock = hold_write_lock(db)
    defect_id = writer.submit(defect(11))
    writer.submit(RejectRecord(source_id="cam0", issued_at=1.0, defect_id=defect_id))
    writer.stop(timeout=0.3)
    lock.execute("ROLLBACK")
    lock.close()

    spool = db.with_name(db.name + ".spool.jsonl")
    assert len(spool.read_text().splitlines()) == 2
    assert count_defects(db) == 0

    with DefectLogWriter(db) as again:
        assert wait_until(lambda: count_defects(db) == 1)
        next_id = again.submit(defect(12))               # ids continue after the spooled one
    with DefectLogReader(db) as reader:
        detail = reader.get_defect(defect_id)
    assert detail.defect.seq == 11 and len(detail.reject_events) == 1
    assert next_id == defect_id + 1
    assert not spool.exists() and not spool.with_name(spool.name + ".importing").exists()


def test_defect_log_writer_sets_record_aside_and_keeps_others_when_database_refuses_one(db):
    with DefectLogWriter(db) as writer:
        writer.submit(defect(1))
        writer.submit(defect(2, run_id=12345))           # no such run: foreign key fails
        writer.submit(defect(3))
        assert wait_until(lambda: count_defects(db) == 2)

    failed = db.with_name(db.name + ".failed.jsonl").read_text().splitlines()
    assert len(failed) == 1 and json.loads(failed[0])["record"]["seq"] == 2
    assert "FOREIGN KEY" in json.loads(failed[0])["error"]


# --- saved images -------------------------------------------------------------------------


def test_image_store_writes_frame_and_heatmap_when_saving_a_defect(tmp_path):
    store = ImageStore(tmp_path / "images")
    frame = np.full((120, 160, 3), 100, np.uint8)
    amap = np.zeros((30, 40), np.float32)
    amap[10:20, 10:20] = 1.0
    when = time.mktime((2024, 3, 5, 12, 0, 0, 0, 0, -1))

    saved = store.save("line 1/cam0", 42, frame, amap, when=when)

    assert saved.frame_path == str(tmp_path / "images" / "2024-03-05" / "line_1_cam0_42_frame.jpg")
    assert saved.heatmap_path.endswith("2024-03-05/line_1_cam0_42_heatmap.jpg")
    heatmap = cv2.imread(saved.heatmap_path)
    assert heatmap.shape == (120, 160, 3)
    # Hot region red-ish, cold region blue-ish (JET), both blended over the grey frame.
    assert heatmap[60, 60, 2] > heatmap[60, 60, 0] and heatmap[5, 5, 0] > heatmap[5, 5, 2]


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
