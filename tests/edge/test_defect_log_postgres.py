"""The defect log as the plant's one PostgreSQL database: many writers at once with ids that
never collide, the server stopped and started under running writers, writers SIGKILLed with
records only in their journals, and one clear line when the server cannot be used. A real
server (the session's throwaway cluster), real processes, real kills."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

from edge.defect_log import (AlarmRecord, DefectLogError, DefectLogReader, DefectLogWriter,
                             DefectRecord, RejectRecord)
from edge.defect_log.ids import OFFLINE_BASE


def defect(seq: int, run_id: int | None = None, source_id: str = "cam0") -> DefectRecord:
    return DefectRecord(source_id=source_id, seq=seq, time=1_700_000_000.0 + seq,
                        verdict="DEFECT", reason="score above threshold", run_id=run_id,
                        reject=True)


def rows(url: str, statement: str) -> list[tuple]:
    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            return [tuple(r) for r in conn.execute(text(statement))]
    finally:
        engine.dispose()


def wait_until(predicate, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return bool(predicate())


def writer_files(state: Path) -> list[str]:
    """Every writer's local file under a test's state folder (local_files.py)."""
    return sorted(p.name for p in state.rglob("*") if p.is_file())


# --- many writers ---------------------------------------------------------------------------


def test_defect_log_writers_of_four_runs_share_one_postgres_database_when_writing_at_once(
        postgres_url):
    """Four runs write at full speed at once, with pools so small that their writers keep
    going back to the sequences between each other's draws (and run dry, numbering from their
    offline ranges meanwhile): every record lands, under the id its writer gave it, and no id
    is handed out twice."""
    writers = [DefectLogWriter(postgres_url, id_pool=8, journal_fsync=False).start()
               for _ in range(4)]
    runs = [w.begin_run(model_hash=f"line{i}") for i, w in enumerate(writers)]
    given: dict[int, list[tuple[int, int, int]]] = {}
    go = threading.Barrier(len(writers))

    def line(writer: DefectLogWriter, run_id: int) -> None:
        go.wait()
        mine = given.setdefault(run_id, [])
        for seq in range(150):
            defect_id = writer.submit(defect(seq, run_id))
            reject_id = writer.submit(RejectRecord(source_id="cam0", issued_at=1.0,
                                                   defect_id=defect_id, fired_at=2.0,
                                                   run_id=run_id))
            mine.append((seq, defect_id, reject_id))
            if seq % 10 == 0:
                writer.submit(AlarmRecord(run_id, 1.0, "cam0", "test", f"alarm {seq}"))

    threads = [threading.Thread(target=line, args=(w, r)) for w, r in zip(writers, runs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for writer, run_id in zip(writers, runs):
        writer.end_run(run_id, {"frames": 150})
        writer.stop()

    assert all(w.set_aside == 0 and w.written == 150 * 2 + 15 + 1 for w in writers)
    defect_rows = {d: (run, seq) for d, run, seq in rows(
        postgres_url, "SELECT id, run_id, seq FROM defects")}
    reject_rows = {r: d for r, d in rows(postgres_url, "SELECT id, defect_id FROM reject_events")}
    for run_id, mine in given.items():
        for seq, defect_id, reject_id in mine:
            assert defect_rows[defect_id] == (run_id, seq)
            assert reject_rows[reject_id] == defect_id
    all_defect_ids = [d for mine in given.values() for _, d, _ in mine]
    assert len(set(all_defect_ids)) == len(all_defect_ids) == len(defect_rows) == 600
    assert len(reject_rows) == 600
    assert rows(postgres_url, "SELECT count(*), count(DISTINCT id) FROM alarms") == [(60, 60)]
    with DefectLogReader(postgres_url) as reader:
        assert {r.status for r in reader.list_runs()} == {"completed"}


# --- the server going away ------------------------------------------------------------------


def test_defect_log_keeps_a_running_writer_going_when_postgres_is_stopped_and_started_again(
        postgres_server, postgres_url, tmp_path):
    with DefectLogWriter(postgres_url, retry_max_s=0.2) as writer:
        run_id = writer.begin_run()
        before = [writer.submit(defect(seq, run_id)) for seq in range(5)]
        assert wait_until(lambda: writer.pending == 0)

        postgres_server.stop()
        during = [writer.submit(defect(seq, run_id)) for seq in range(5, 25)]
        time.sleep(1.0)                                  # several failed attempts
        assert writer.pending == 20
        assert writer.journal_path.read_bytes().count(b"\n") >= 20   # safe meanwhile
        with pytest.raises(DefectLogError, match="cannot reach the PostgreSQL server") as err:
            DefectLogReader(postgres_url)                # an operator asks meanwhile
        assert "\n" not in str(err.value)

        postgres_server.start()
        assert wait_until(lambda: writer.pending == 0)
        writer.end_run(run_id)

    assert before + during == list(range(1, 26))         # numbering never stopped
    assert rows(postgres_url, "SELECT count(*), min(seq), max(seq) FROM defects "
                              f"WHERE run_id = {run_id}") == [(25, 0, 24)]
    assert writer_files(tmp_path / "state") == []        # all landed: no trace left


def test_defect_log_numbers_from_offline_ranges_when_postgres_is_away_longer_than_the_id_pools(
        postgres_server, postgres_url, tmp_path):
    """Two writers, each with four ids of a kind in hand, lose the server for twenty records:
    they go on numbering from their own offline ranges, stop with the records in their
    journals, and the next writer lands them all, no two with one id."""
    writers = [DefectLogWriter(postgres_url, id_pool=4, retry_max_s=0.1).start()
               for _ in range(2)]
    runs = [w.begin_run() for w in writers]
    postgres_server.stop()
    given = []
    for writer, run_id in zip(writers, runs):
        for seq in range(10):
            defect_id = writer.submit(defect(seq, run_id))
            writer.submit(RejectRecord(source_id="cam0", issued_at=1.0, defect_id=defect_id,
                                       run_id=run_id))
            given.append(defect_id)
        writer.stop(timeout=0.5)
    assert [w.offline_ids for w in writers] == [12, 12]   # 6 defects + 6 rejects each
    assert len(set(given)) == 20 and sum(d >= OFFLINE_BASE for d in given) == 12
    assert len(writer_files(tmp_path / "state")) == 4     # a journal and a lock each

    postgres_server.start()
    again = DefectLogWriter(postgres_url)
    again.stop()

    assert again.replayed == 40
    landed = rows(postgres_url, "SELECT d.id FROM defects d JOIN reject_events r "
                                "ON r.defect_id = d.id")
    assert sorted(d for (d,) in landed) == sorted(given)
    assert writer_files(tmp_path / "state") == []


# --- writers that die -----------------------------------------------------------------------

# A line's writer: opens a run, says so, then on each line of stdin submits a defect and its
# reject and says their ids once submit has returned (acknowledged).
CHILD = textwrap.dedent("""
    import sys
    from edge.defect_log import DefectLogWriter, DefectRecord, RejectRecord

    writer = DefectLogWriter(sys.argv[1], retry_max_s=0.2).start()
    run_id = writer.begin_run(model_hash="child", started_at=900.0)
    print("run", run_id, flush=True)
    for seq, _ in enumerate(sys.stdin):
        did = writer.submit(DefectRecord(source_id="cam0", seq=seq, time=1000.0 + seq,
                                         verdict="DEFECT", reason="r", run_id=run_id,
                                         reject=True))
        rid = writer.submit(RejectRecord(source_id="cam0", issued_at=1000.0 + seq,
                                         defect_id=did, fired_at=1001.0 + seq, run_id=run_id))
        print("acked", did, rid, flush=True)
""")


@pytest.fixture
def child_writer(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    children: list[subprocess.Popen] = []

    def start(url: str) -> tuple[subprocess.Popen, int]:
        child = subprocess.Popen([sys.executable, str(script), url], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True)
        children.append(child)
        first = child.stdout.readline().split()
        assert first[:1] == ["run"], f"child exited with {child.wait()}"
        return child, int(first[1])

    yield start
    for child in children:
        if child.poll() is None:
            child.kill()
        child.wait()


def test_defect_log_lands_a_killed_writers_journal_when_the_next_writer_on_its_host_opens(
        postgres_server, postgres_url, child_writer, tmp_path):
    child, run_id = child_writer(postgres_url)
    postgres_server.stop()
    acked = []
    for _ in range(15):                      # the server is away: journal only
        child.stdin.write("go\n")
        child.stdin.flush()
        acked.append(tuple(map(int, child.stdout.readline().split()[1:])))
    child.send_signal(signal.SIGKILL)
    child.wait()
    postgres_server.start()
    assert rows(postgres_url, "SELECT count(*) FROM defects") == [(0,)]

    writer = DefectLogWriter(postgres_url)      # another run's writer on this host
    writer.stop()

    assert writer.replayed == 30 and writer.recovered_runs == [run_id]
    assert sorted(rows(postgres_url, "SELECT id, defect_id FROM reject_events")) == \
        sorted(acked)
    with DefectLogReader(postgres_url) as reader:
        (run,) = reader.list_runs()
    assert run.status == "crashed" and run.stopped_at == 1001.0 + 14   # its last reject
    assert writer_files(tmp_path / "state") == []


def test_defect_log_leaves_a_live_writers_journal_to_it_when_another_writer_opens(
        postgres_server, postgres_url, tmp_path):
    first = DefectLogWriter(postgres_url, retry_initial_s=2.0, retry_max_s=2.0).start()
    run_id = first.begin_run()
    postgres_server.stop()
    mine = [first.submit(defect(seq, run_id)) for seq in range(3)]
    postgres_server.start()                  # `first` sleeps out its 2 s back-off meanwhile

    second = DefectLogWriter(postgres_url)
    second.stop()
    assert second.replayed == 0                              # not its records to take
    assert first.journal_path.read_bytes().count(b"\n") == 3
    first.stop()
    assert first.written == 3 and first.set_aside == 0
    assert rows(postgres_url, "SELECT id FROM defects ORDER BY id") == [(i,) for i in mine]


def test_defect_log_keeps_every_acknowledged_record_when_two_writers_are_sigkilled_again_and_again(
        postgres_server, postgres_url, child_writer, tmp_path):
    """Two lines on one host, killed at random moments, eight times, the server stopped under
    them half of the time: every defect and reject a writer acknowledged is in the database
    exactly once, every run is closed as crashed, and no writer's file is left behind."""
    rng = random.Random(11)
    acked: list[tuple[int, int]] = []
    run_ids = []
    for round_ in range(8):
        pair = [child_writer(postgres_url) for _ in range(2)]
        run_ids += [run_id for _, run_id in pair]
        server_away = round_ % 2 == 1
        for step in range(rng.randint(5, 25)):
            if server_away and step == 3:
                postgres_server.stop("immediate" if round_ % 4 == 3 else "fast")
            for child, _ in pair:
                child.stdin.write("go\n")
                child.stdin.flush()
            for child, _ in pair:
                acked.append(tuple(map(int, child.stdout.readline().split()[1:])))
        time.sleep(rng.uniform(0.0, 0.3))
        for child, _ in pair:
            child.send_signal(signal.SIGKILL)
            child.wait()
        postgres_server.start()

    writer = DefectLogWriter(postgres_url)
    writer.stop()

    landed = rows(postgres_url, "SELECT r.id, r.defect_id, r.outcome FROM reject_events r")
    fired = {(r, d) for r, d, outcome in landed if outcome == "fired"}
    assert set(acked) <= fired, f"lost {sorted(set(acked) - fired)[:10]}"
    per_defect = rows(postgres_url, "SELECT defect_id, count(*) FROM reject_events "
                                    "GROUP BY defect_id HAVING count(*) > 1")
    assert per_defect == []
    assert len({d for _, d in acked}) == len(acked)
    statuses = rows(postgres_url, "SELECT id, status FROM runs ORDER BY id")
    assert statuses == [(r, "crashed") for r in sorted(run_ids)]
    assert writer_files(tmp_path / "state") == []


# --- errors a person reads ------------------------------------------------------------------


@pytest.mark.parametrize("case", ["refused", "no_database", "no_user", "unsupported", "garbled"])
def test_defect_log_says_in_one_line_what_is_wrong_when_postgres_cannot_be_used(
        postgres_server, case):
    port = postgres_server.port
    url, expected = {
        "refused": (f"postgresql+psycopg://u:s3cret@127.0.0.1:{_closed_port()}/plant",
                    "cannot reach the PostgreSQL server 127.0.0.1:"),
        "no_database": (f"postgresql+psycopg://postgres:s3cret@127.0.0.1:{port}/nosuchdb",
                        "has no database 'nosuchdb'"),
        "no_user": (f"postgresql://nobody:s3cret@127.0.0.1:{port}/postgres",
                    "refused the login of user 'nobody'"),
        "unsupported": ("mysql://u:s3cret@db/plant", "unsupported database mysql"),
        "garbled": ("postgresql+psycopg://u:s3cret@db:port/plant", "unsupported database"),
    }[case]
    with pytest.raises(DefectLogError) as caught:
        DefectLogWriter(url)
    message = str(caught.value)
    assert expected in message and "\n" not in message and "s3cret" not in message, message


def _closed_port() -> int:
    import socket

    with socket.socket() as s:          # bound, never listening: connections are refused
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
