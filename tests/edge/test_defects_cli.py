"""`grad-edge defects list | show | ack | false-positive | comment | export` as real processes
on a real SQLite defect log written by the line's one writer."""

from __future__ import annotations

import csv
import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from edge.defect_log import DefectLogWriter, DefectRecord, RejectRecord
from edge.reject import RejectEvent

WHEN = 1_700_000_000.0


def grad_edge(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edge.cli", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture
def db(tmp_path) -> Path:
    """Three defects (two sources; one UNKNOWN), one reject fired for the first."""
    path = tmp_path / "line" / "defects.db"
    writer = DefectLogWriter(path).start()
    run_id = writer.begin_run(model_hash="abc123", config_hash="cfg")
    ids = []
    for seq, source, verdict, score in ((4, "cam0", "DEFECT", 3.25), (9, "cam1", "DEFECT", 4.5),
                                        (14, "cam0", "UNKNOWN", None)):
        ids.append(writer.submit(DefectRecord(
            source_id=source, seq=seq, time=WHEN + seq, verdict=verdict,
            reason=f"seq {seq} reason", part_id=100 + seq, encoder=seq * 100, raw_score=score,
            threshold=2.5, box=(1, 2, 30, 40), area_px=300, run_id=run_id)))
    event = RejectEvent(source_id="cam0", seq=4, part_id=104, encoder=400, due_encoder=900,
                        due_time=None, verdict="DEFECT", raw_score=3.25, reason="r",
                        defect_id=ids[0])
    writer.submit(RejectRecord.from_fired(event, ["jsonl"], [], run_id=run_id))
    writer.end_run(run_id, {"frames": 20})
    writer.stop()
    assert ids == [1, 2, 3]
    return path


def test_defects_list_prints_every_row_when_the_log_has_defects(db, tmp_path):
    r = grad_edge("defects", "--db", str(db), "list", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    rows = [line.split() for line in r.stdout.splitlines()[2:] if line.strip()]
    assert sorted(int(row[0]) for row in rows) == [1, 2, 3]
    assert {row[0]: row[3] for row in rows} == {"1": "cam0", "2": "cam1", "3": "cam0"}
    assert "UNKNOWN" in r.stdout and "3.25" in r.stdout

    only = grad_edge("defects", "--db", str(db), "list", "--source", "cam1", cwd=tmp_path)
    assert only.returncode == 0, only.stderr
    assert [line.split()[0] for line in only.stdout.splitlines()[2:] if line.strip()] == ["2"]


def test_defects_ack_shows_in_show_and_in_operator_actions_when_an_operator_acks(db, tmp_path):
    r = grad_edge("defects", "--db", str(db), "ack", "1", "--operator", "maria",
                  "--comment", "burr on the edge", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "defect 1 acknowledged by maria" in r.stdout

    shown = grad_edge("defects", "--db", str(db), "show", "1", cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    fields = {line.split(":", 1)[0].strip(): line.split(":", 1)[1].strip()
              for line in shown.stdout.splitlines() if ":" in line}
    assert fields["id"] == "1" and fields["seq"] == "4" and fields["source_id"] == "cam0"
    assert fields["acknowledged"] == "True"
    assert "maria" in fields["action"] and "'ack'" in fields["action"]
    assert "burr on the edge" in fields["action"]
    assert "'jsonl'" in fields["reject"] and "due_encoder': 900" in fields["reject"]

    con = sqlite3.connect(db)
    assert con.execute("SELECT defect_id, operator, action, comment FROM operator_actions"
                       ).fetchall() == [(1, "maria", "ack", "burr on the edge")]
    assert con.execute("SELECT acknowledged FROM defects WHERE id = 1").fetchone() == (1,)
    # The fired reject is acknowledged with its defect.
    assert con.execute("SELECT acknowledged_at FROM reject_events").fetchone()[0] is not None
    unacked = grad_edge("defects", "--db", str(db), "list", "--unacked", cwd=tmp_path)
    assert sorted(line.split()[0] for line in unacked.stdout.splitlines()[2:]) == ["2", "3"]


def test_defects_false_positive_and_comment_are_recorded_when_an_operator_gives_them(
        db, tmp_path):
    r = grad_edge("defects", "--db", str(db), "false-positive", "2", "--operator", "li",
                  cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = grad_edge("defects", "--db", str(db), "comment", "3", "--operator", "li",
                  "--comment", "camera fogged", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    con = sqlite3.connect(db)
    assert con.execute("SELECT defect_id, action, comment FROM operator_actions ORDER BY id"
                       ).fetchall() == [(2, "false_positive", None), (3, "comment", "camera fogged")]
    # A false positive counts as looked at; a comment does not.
    assert con.execute("SELECT id, acknowledged FROM defects ORDER BY id").fetchall() == [
        (1, 0), (2, 1), (3, 0)]


def test_defects_export_writes_one_csv_row_per_defect_when_asked(db, tmp_path):
    out = tmp_path / "out.csv"
    r = grad_edge("defects", "--db", str(db), "export", str(out), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "wrote 3 defect(s)" in r.stdout
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [row["id"] for row in rows] == ["1", "2", "3"]          # oldest first
    assert [row["verdict"] for row in rows] == ["DEFECT", "DEFECT", "UNKNOWN"]
    assert rows[0]["x1"] == "30" and rows[0]["source_id"] == "cam0"

    jsonl = tmp_path / "out.jsonl"
    r = grad_edge("defects", "--db", str(db), "export", str(jsonl), "--source", "cam0",
                  cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert [json.loads(line)["seq"] for line in jsonl.read_text().splitlines()] == [4, 14]


@pytest.mark.parametrize("action", [["show", "99"], ["ack", "99", "--operator", "maria"]])
def test_defects_exits_2_with_a_clear_message_when_the_id_is_unknown(db, tmp_path, action):
    r = grad_edge("defects", "--db", str(db), *action, cwd=tmp_path)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "no defect with id 99" in lines[0], r.stderr
    assert sqlite3.connect(db).execute("SELECT count(*) FROM operator_actions").fetchone() == (0,)


def test_defects_exits_2_naming_the_file_when_the_database_does_not_exist(tmp_path):
    missing = tmp_path / "nowhere" / "defects.db"
    r = grad_edge("defects", "--db", str(missing), "list", cwd=tmp_path)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert str(missing) in r.stderr and "Traceback" not in r.stderr
    assert not missing.exists()
