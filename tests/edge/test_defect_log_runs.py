"""Runs left open by a crash are closed at the next start, as crashed, with what is known;
runs whose process still lives (or that belong to another host) are left alone. Real
processes, killed for real; on a SQLite file and on a PostgreSQL server (`log_target`)."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from sqlalchemy import create_engine, update
from sqlalchemy.pool import NullPool

from edge.defect_log import (DefectLogReader, DefectLogWriter, format_runs_table, process_alive,
                             RunRow, database_url, process_start)

# Opens a run, logs a defect with a reject decided (never fired) and a progress snapshot,
# then waits; `stop_writer` lets the writer go (its lock too) while the process lives on.
CHILD = textwrap.dedent("""
    import sys, time
    from edge.defect_log import DefectLogReader, DefectLogWriter, DefectRecord

    db, stop_writer = sys.argv[1], sys.argv[2] == "1"
    writer = DefectLogWriter(db).start()
    run_id = writer.begin_run(model_hash="m", started_at=1000.0)
    writer.submit(DefectRecord(source_id="cam0", seq=7, time=1010.0, verdict="DEFECT",
                               reason="r", run_id=run_id, reject=True))
    writer.note_progress(run_id, {"frames": 42, "defects": 1}, at=1020.0)
    with DefectLogReader(db) as reader:
        while reader.list_runs()[0].progress_at != 1020.0:
            time.sleep(0.01)
    if stop_writer:
        writer.stop()
    print(run_id, flush=True)
    time.sleep(120)
""")


@pytest.fixture
def run_child(tmp_path):
    """Start the child on `db`; returns (process, run id) once its run is open."""
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    children: list[subprocess.Popen] = []

    def start(db: Path | str, *, stop_writer: bool = False) -> tuple[subprocess.Popen, int]:
        child = subprocess.Popen([sys.executable, str(script), str(db), "1" if stop_writer else "0"],
                                 stdout=subprocess.PIPE, text=True)
        children.append(child)
        line = child.stdout.readline()
        assert line.strip(), f"child exited with {child.wait()}"
        return child, int(line)

    yield start
    for child in children:
        if child.poll() is None:
            child.kill()
        child.wait()
        child.stdout.close()


def test_defect_log_closes_a_run_as_crashed_with_its_last_snapshot_when_its_process_was_killed(
        log_target, run_child):
    db = log_target
    child, run_id = run_child(db)
    with DefectLogReader(db) as reader:
        assert reader.list_runs()[0].process_alive is True
    child.send_signal(signal.SIGKILL)
    child.wait()
    with DefectLogReader(db) as reader:     # an operator sees it before the next start
        (gone,) = reader.list_runs()
    assert (gone.status, gone.process_alive) == ("running", False)
    assert "running (process gone)" in format_runs_table([gone])

    writer = DefectLogWriter(db)
    writer.stop()

    assert writer.recovered_runs == [run_id]
    with DefectLogReader(db) as reader:
        (run,) = reader.list_runs()
        (reject,) = reader.list_rejects()
    assert (run.status, run.exit_code, run.pid) == ("crashed", None, child.pid)
    assert run.stopped_at == 1020.0                       # its last known record: the snapshot
    assert run.summary["frames"] == 42 and run.summary["defects"] == 1
    assert run.summary["crash_recovery"]["unconfirmed_rejects"] == 1
    # The reject was decided but never recorded as fired: it may or may not have fired.
    assert reject.outcome == "unconfirmed" and "not known" in reject.reason


def test_defect_log_leaves_a_run_open_when_its_process_is_still_alive(log_target, run_child):
    db = log_target
    child, run_id = run_child(db, stop_writer=True)

    writer = DefectLogWriter(db)
    writer.stop()
    assert writer.recovered_runs == []
    with DefectLogReader(db) as reader:
        assert reader.list_runs()[0].status == "running"

    child.kill()
    child.wait()
    again = DefectLogWriter(db)
    again.stop()
    assert again.recovered_runs == [run_id]


def test_defect_log_closes_a_run_whose_pid_now_belongs_to_another_process(log_target,
                                                                          run_child):
    db = log_target
    child, run_id = run_child(db, stop_writer=True)
    child.kill()
    child.wait()
    # Pids are reused: give the dead run's row the pid of a process that is alive now.
    stranger = subprocess.Popen(["sleep", "60"])
    try:
        engine = create_engine(database_url(db), poolclass=NullPool)
        with engine.begin() as conn:
            conn.execute(update(RunRow).where(RunRow.id == run_id).values(pid=stranger.pid))
        engine.dispose()
        assert process_alive(stranger.pid, process_start(stranger.pid))

        writer = DefectLogWriter(db)
        writer.stop()
    finally:
        stranger.kill()
        stranger.wait()
    assert writer.recovered_runs == [run_id]


def test_defect_log_leaves_runs_of_other_hosts_open_when_it_recovers(log_target):
    db = log_target
    with DefectLogWriter(db) as writer:
        other = writer.begin_run(host="line-7-pc", pid=999_999_999)
    writer = DefectLogWriter(db)
    writer.stop()
    assert writer.recovered_runs == []
    with DefectLogReader(db) as reader:
        assert [(r.id, r.status) for r in reader.list_runs()] == [(other, "running")]
