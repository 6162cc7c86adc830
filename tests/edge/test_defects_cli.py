"""`grad-edge defects list | show | ack | false-positive | comment | export` as real processes
on a real SQLite defect log written by the line's one writer."""

from __future__ import annotations

import csv
import datetime
import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from edge.defect_log import AlarmRecord, DefectLogError, DefectLogWriter, DefectRecord, RejectRecord
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
    assert r.stdout.split()[:4] == ["id", "run", "time", "source"]
    assert sorted(int(row[0]) for row in rows) == [1, 2, 3]
    # id, run, date, local time, source
    assert {row[0]: (row[1], row[4]) for row in rows} == {
        "1": ("1", "cam0"), "2": ("1", "cam1"), "3": ("1", "cam0")}
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
    assert fields["defect"] == "1 (DEFECT) of run 1"
    assert fields["source"] == "cam0, frame 4, part 104, encoder 400"
    assert fields["score"].startswith("3.25 against threshold 2.5")
    local = datetime.datetime.fromtimestamp(WHEN + 4).strftime("%Y-%m-%d %H:%M:%S")
    assert fields["time"] == local                                   # local time, not epoch
    assert fields["judged"].startswith("ack maria at ")
    assert "maria acknowledged: burr on the edge" in fields["action"]
    assert "fired" in fields["reject"] and "jsonl" in fields["reject"]
    assert "due at count 900" in fields["reject"]
    # Read as a person would: no epoch seconds, no Python reprs.
    assert str(int(WHEN)) not in shown.stdout and "{" not in shown.stdout
    assert "'" not in shown.stdout

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
    assert "()" not in lines[0] and "grad-edge defects list" in lines[0]   # no function names
    assert sqlite3.connect(db).execute("SELECT count(*) FROM operator_actions").fetchone() == (0,)


def test_defects_exits_2_naming_the_file_when_the_database_does_not_exist(tmp_path):
    missing = tmp_path / "nowhere" / "defects.db"
    r = grad_edge("defects", "--db", str(missing), "list", cwd=tmp_path)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert str(missing) in r.stderr and "Traceback" not in r.stderr
    assert not missing.exists()


def test_defects_lists_runs_rejects_and_alarms_when_asked(db, tmp_path):
    writer = DefectLogWriter(db).start()
    run_id = writer.begin_run(model_hash="abc123")
    defect_id = writer.submit(DefectRecord(source_id="cam1", seq=30, time=WHEN + 30,
                                           verdict="DEFECT", reason="r", run_id=run_id))
    event = RejectEvent(source_id="cam1", seq=30, part_id=130, encoder=3000, due_encoder=3500,
                        due_time=None, verdict="DEFECT", raw_score=5.0, reason="r",
                        defect_id=defect_id)
    writer.submit(RejectRecord.missed(event, "verdict 80 ms after the part passed the ejector",
                                      run_id=run_id))
    writer.submit(AlarmRecord(run_id, WHEN + 31, "cam1", "missed_reject",
                              "part 130 passed the ejector unrejected"))
    writer.end_run(run_id, {"frames": 31}, status="interrupted", exit_code=130)
    writer.stop()

    runs = grad_edge("defects", "--db", str(db), "runs", cwd=tmp_path)
    assert runs.returncode == 0, runs.stderr
    rows = [line.split() for line in runs.stdout.splitlines()[2:]]
    assert [(r[0], r[5], r[6]) for r in rows] == [("2", "interrupted", "130"),
                                                  ("1", "completed", "-")]
    missed = grad_edge("defects", "--db", str(db), "rejects", "--outcome", "missed",
                       cwd=tmp_path)
    assert missed.returncode == 0, missed.stderr
    (row,) = missed.stdout.splitlines()[2:]
    assert row.split()[:5] == ["2", str(defect_id), "cam1", "130", "missed"]
    assert "passed the ejector" in row
    alarms = grad_edge("defects", "--db", str(db), "alarms", cwd=tmp_path)
    assert alarms.returncode == 0, alarms.stderr
    assert "missed_reject" in alarms.stdout and "part 130" in alarms.stdout


def one_error_line(r: subprocess.CompletedProcess) -> str:
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    return lines[0]


def test_defects_exits_2_in_one_line_when_the_database_path_is_a_directory(tmp_path):
    folder = tmp_path / "runs"
    folder.mkdir()
    line = one_error_line(grad_edge("defects", "--db", str(folder), "list", cwd=tmp_path))
    assert f"{folder} is a directory" in line and str(folder / "defects.db") in line


def test_defects_exits_2_in_one_line_when_the_file_is_not_a_database(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("shift notes: camera 2 fogged at 14:00\n" * 50)
    line = one_error_line(grad_edge("defects", "--db", str(notes), "list", cwd=tmp_path))
    assert f"{notes} is not a defect log database" in line and "move the file away" in line
    assert notes.read_text().startswith("shift notes")          # untouched


@pytest.fixture
def read_only_copy(db, tmp_path):
    """The fixture's database on a filesystem mounted read-only (we run as root, for whom
    file permissions do not stop a write); skips where mounting is refused."""
    mount = tmp_path / "ro"
    mount.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip()}); needs root")
    try:
        (mount / "defects.db").write_bytes(db.read_bytes())
        subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)
        yield mount / "defects.db"
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_defects_exits_2_in_one_line_when_the_database_is_not_writable(read_only_copy, tmp_path):
    line = one_error_line(grad_edge("defects", "--db", str(read_only_copy), "ack", "1",
                                    "--operator", "maria", cwd=tmp_path))
    assert f"defect log {read_only_copy} is not writable" in line
    assert "mounted read-write" in line


def test_defect_log_writer_refuses_in_one_line_when_the_database_is_not_writable(read_only_copy):
    with pytest.raises(DefectLogError, match="is not writable") as caught:
        DefectLogWriter(read_only_copy).begin_run()
    assert "\n" not in str(caught.value)


# --- the plant's PostgreSQL database, by URL --------------------------------------------------


def test_defects_lists_shows_and_acks_a_postgres_defect_log_when_given_its_url(
        postgres_url, tmp_path):
    with DefectLogWriter(postgres_url) as writer:
        run_id = writer.begin_run(model_hash="abc123")
        ids = [writer.submit(DefectRecord(source_id=source, seq=seq, time=WHEN + seq,
                                          verdict="DEFECT", reason=f"seq {seq} reason",
                                          raw_score=3.25, run_id=run_id))
               for seq, source in ((4, "cam0"), (9, "cam1"))]
        writer.end_run(run_id)

    listed = grad_edge("defects", "--db", postgres_url, "list", cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    rows = [line.split() for line in listed.stdout.splitlines()[2:] if line.strip()]
    # id, run, local date and time, source, ...
    assert sorted((int(row[0]), row[4]) for row in rows) == [(ids[0], "cam0"), (ids[1], "cam1")]
    acked = grad_edge("defects", "--db", postgres_url, "ack", str(ids[1]), "--operator", "maria",
                      cwd=tmp_path)
    assert acked.returncode == 0, acked.stderr
    shown = grad_edge("defects", "--db", postgres_url, "show", str(ids[1]), cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert "seq 9 reason" in shown.stdout and "maria acknowledged" in shown.stdout


@pytest.mark.parametrize("case", ["server_down", "no_database"])
def test_defects_exits_2_in_one_line_when_the_postgres_server_cannot_be_used(
        postgres_server, tmp_path, case):
    if case == "server_down":                   # a port nothing listens on
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            url = f"postgresql+psycopg://postgres:pw@127.0.0.1:{s.getsockname()[1]}/plant"
            line = one_error_line(grad_edge("defects", "--db", url, "list", cwd=tmp_path))
        assert "cannot reach the PostgreSQL server 127.0.0.1:" in line
    else:
        url = postgres_server.url("no_such_db").replace("postgres@", "postgres:pw@")
        line = one_error_line(grad_edge("defects", "--db", url, "list", cwd=tmp_path))
        assert "has no database 'no_such_db'" in line and "createdb" in line
    assert ":pw@" not in line                   # never print the password


def test_defects_records_a_second_judgement_beside_the_first_when_another_operator_judges(
        db, tmp_path):
    first = grad_edge("defects", "--db", str(db), "ack", "1", "--operator", "maria",
                      cwd=tmp_path)
    assert first.returncode == 0 and "second" not in first.stdout
    second = grad_edge("defects", "--db", str(db), "false-positive", "1", "--operator", "li",
                       "--comment", "oil stain, part is good", cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    assert "defect 1 marked false positive by li (a second judgement" in second.stdout
    assert "maria acknowledged it at" in second.stdout
    con = sqlite3.connect(db)
    actions = con.execute("SELECT id, operator, action, via, previous_id FROM operator_actions "
                          "ORDER BY id").fetchall()
    assert actions == [(1, "maria", "ack", "cli", None), (2, "li", "false_positive", "cli", 1)]
    assert con.execute("SELECT judgement, judged_by, judgements, acknowledged FROM defects "
                       "WHERE id = 1").fetchone() == ("false_positive", "li", 2, 1)
    audit = con.execute("SELECT operator, action, target FROM audit ORDER BY id").fetchall()
    assert audit == [("maria", "ack", "defect 1"), ("li", "false_positive", "defect 1")]
    listed = grad_edge("defects", "--db", str(db), "list", "--false-positive", cwd=tmp_path)
    (row,) = listed.stdout.splitlines()[2:]
    assert row.split()[0] == "1" and "FP li (2x)" in row


def test_defects_export_carries_judgements_operators_comments_and_runs_when_asked(db, tmp_path):
    grad_edge("defects", "--db", str(db), "ack", "1", "--operator", "maria", cwd=tmp_path)
    grad_edge("defects", "--db", str(db), "false-positive", "1", "--operator", "li",
              "--comment", "oil stain", cwd=tmp_path)
    grad_edge("defects", "--db", str(db), "comment", "2", "--operator", "jon",
              "--comment", "recheck", cwd=tmp_path)
    out = tmp_path / "out.jsonl"
    r = grad_edge("defects", "--db", str(db), "export", str(out), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    rows = {row["id"]: row for row in map(json.loads, out.read_text().splitlines())}
    assert rows[1]["run_id"] == 1 and rows[1]["judgement"] == "false_positive"
    assert rows[1]["judged_by"] == "li" and rows[1]["judgements"] == 2
    assert [(a["operator"], a["action"], a["second_judgement"]) for a in rows[1]["actions"]] == [
        ("maria", "ack", False), ("li", "false_positive", True)]
    assert rows[1]["comments"] == "li: oil stain"
    assert rows[2]["judgement"] is None and rows[2]["comments"] == "jon: recheck"
    csv_out = tmp_path / "out.csv"
    assert grad_edge("defects", "--db", str(db), "export", str(csv_out), "--false-positive",
                     cwd=tmp_path).returncode == 0
    with open(csv_out, newline="") as f:
        (row,) = list(csv.DictReader(f))
    assert row["id"] == "1" and row["judged_by"] == "li" and row["run_id"] == "1"
    assert json.loads(row["actions"])[1]["comment"] == "oil stain"


def test_defects_export_refuses_in_one_line_when_the_suffix_names_no_format(db, tmp_path):
    line = one_error_line(grad_edge("defects", "--db", str(db), "export",
                                    str(tmp_path / "out.txt"), cwd=tmp_path))
    assert "'.txt'" in line and ".csv or .jsonl" in line
    assert not (tmp_path / "out.txt").exists()


def test_defects_list_shows_only_that_run_when_filtered_by_run(db, tmp_path):
    writer = DefectLogWriter(db).start()
    run_id = writer.begin_run()
    writer.submit(DefectRecord(source_id="cam0", seq=50, time=WHEN + 50, verdict="DEFECT",
                               reason="r", run_id=run_id))
    writer.end_run(run_id)
    writer.stop()
    r = grad_edge("defects", "--db", str(db), "list", "--run", str(run_id), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert [line.split()[:2] for line in r.stdout.splitlines()[2:]] == [["4", str(run_id)]]


def test_grad_edge_prints_its_version_when_asked(tmp_path):
    from importlib.metadata import version

    r = subprocess.run([sys.executable, "-m", "edge.cli", "--version"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == f"grad-edge {version('grad-edge')}"


def test_every_option_of_the_line_and_station_commands_has_help_when_listed():
    """Every option and positional of run, replay, defects, serve and dataset says what it
    is for. (train/eval/predict/export/verify belong to trainer/ and deploy/.)"""
    import argparse

    from edge.cli import build_parser

    def walk(parser, path):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, child in action.choices.items():
                    if path or name in ("run", "replay", "defects", "serve", "dataset"):
                        yield from walk(child, path + [name])
            elif path and not isinstance(action, argparse._HelpAction):
                yield path, action

    missing = [(" ".join(p), a.dest) for p, a in walk(build_parser(), []) if not a.help]
    assert not missing
    commands = {tuple(p[:1]) for p, _ in walk(build_parser(), [])}
    assert {("run",), ("replay",), ("defects",), ("serve",), ("dataset",)} <= commands
