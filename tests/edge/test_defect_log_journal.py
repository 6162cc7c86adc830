"""The defect log keeps every record `submit` acknowledged: through SIGKILL of the writing
process at random moments, a write cut in half, a full queue, and a full disk (a real small
filesystem mounted for the test)."""

from __future__ import annotations

import logging
import os
import random
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from edge.defect_log import DefectLogReader, DefectLogWriter, DefectRecord, RejectRecord
from edge.defect_log.journal import encode_line

KILLS = 20

# A line's defect log at full speed: a defect, then its fired reject, each acknowledged (the
# id written to `acked`) only after submit returned.
CHILD = textwrap.dedent("""
    import os, sys, time
    from edge.defect_log import DefectLogWriter, DefectRecord, RejectRecord

    db, acked = sys.argv[1], sys.argv[2]
    writer = DefectLogWriter(db).start()
    run_id = writer.begin_run(model_hash="kill-test")
    out = os.open(acked, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    os.write(out, f"run {run_id}\\n".encode())
    seq = 0
    while True:
        now = time.time()
        did = writer.submit(DefectRecord(source_id="cam0", seq=seq, time=now, verdict="DEFECT",
                                         reason="kill test", run_id=run_id, reject=True))
        os.write(out, f"D {did}\\n".encode())
        rid = writer.submit(RejectRecord(source_id="cam0", issued_at=now, defect_id=did,
                                         fired_at=time.time(), sinks_ok=("jsonl",),
                                         run_id=run_id))
        os.write(out, f"R {rid} {did}\\n".encode())
        if seq % 20 == 0:
            writer.note_progress(run_id, {"frames": seq})
        seq += 1
""")


def acknowledged(path: Path) -> tuple[list[int], dict[int, int], list[int]]:
    """Defect ids, reject id -> defect id, and run ids the children acknowledged."""
    defects, rejects, runs = [], {}, []
    for line in path.read_text().splitlines():
        parts = line.split()
        if parts[:1] == ["D"] and len(parts) == 2:
            defects.append(int(parts[1]))
        elif parts[:1] == ["R"] and len(parts) == 3:
            rejects[int(parts[1])] = int(parts[2])
        elif parts[:1] == ["run"] and len(parts) == 2:
            runs.append(int(parts[1]))
    return defects, rejects, runs


def test_defect_log_keeps_every_acknowledged_record_when_its_process_is_sigkilled_20_times(
        tmp_path):
    db, acked = tmp_path / "defects.db", tmp_path / "acked.txt"
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    rng = random.Random(20260)
    for _ in range(KILLS):
        child = subprocess.Popen([sys.executable, str(script), str(db), str(acked)],
                                 stderr=subprocess.PIPE)
        # From the start (about 1 s of imports): some kills land while the next writer
        # replays the journal, most while this one writes.
        time.sleep(rng.uniform(0.6, 2.0))
        assert child.poll() is None, child.communicate()[1].decode()[-2000:]
        child.send_signal(signal.SIGKILL)
        child.wait()
        child.stderr.close()

    writer = DefectLogWriter(db)                # the next start: replay, close crashed runs
    writer.stop()

    defect_ids, rejects, run_ids = acknowledged(acked)
    assert len(defect_ids) > 100 and len(run_ids) >= 5, (len(defect_ids), run_ids)
    plain = sqlite3.connect(db)
    in_db = {row[0] for row in plain.execute("SELECT id FROM defects")}
    assert set(defect_ids) <= in_db, f"lost {sorted(set(defect_ids) - in_db)[:10]}"
    fired = dict(plain.execute("SELECT id, defect_id FROM reject_events WHERE outcome = 'fired'"))
    assert all(fired.get(rid) == did for rid, did in rejects.items())
    # Exactly one reject row per defect: a replayed reject is not doubled, and a defect whose
    # reject was never recorded gets one `unconfirmed` row from crash recovery.
    per_defect = dict(plain.execute("SELECT defect_id, count(*) FROM reject_events "
                                    "GROUP BY defect_id"))
    assert set(per_defect) == in_db and set(per_defect.values()) == {1}
    runs = plain.execute("SELECT id, status, stopped_at, started_at, summary FROM runs").fetchall()
    assert {r[0] for r in runs} >= set(run_ids)
    assert {r[1] for r in runs} == {"crashed"}, runs
    assert all(r[2] >= r[3] for r in runs)
    assert db.with_name(db.name + ".journal.jsonl").read_bytes() == b""


def test_defect_log_journal_skips_a_torn_line_and_keeps_the_rest_when_a_write_was_cut(
        tmp_path, caplog):
    db = tmp_path / "defects.db"
    DefectLogWriter(db).stop()
    whole = DefectRecord(source_id="cam0", seq=1, time=1.0, verdict="DEFECT", reason="r", id=1)
    torn = encode_line(DefectRecord(source_id="cam0", seq=2, time=2.0, verdict="DEFECT",
                                    reason="r", id=2))
    journal = db.with_name(db.name + ".journal.jsonl")
    journal.write_bytes(encode_line(whole) + torn[: len(torn) // 2])

    with caplog.at_level(logging.ERROR), DefectLogWriter(db) as writer:
        assert writer.replayed == 1
        third = writer.submit(DefectRecord(source_id="cam0", seq=3, time=3.0, verdict="DEFECT",
                                           reason="r"))
    assert "partial line" in caplog.text
    with DefectLogReader(db) as reader:
        assert sorted(d.seq for d in reader.list_defects()) == [1, 3] and third == 2


def test_defect_log_writer_keeps_order_through_the_journal_when_its_queue_overflows(tmp_path):
    db = tmp_path / "defects.db"
    writer = DefectLogWriter(db, queue_size=2, batch_size=4, busy_timeout_ms=50,
                             retry_max_s=0.05).start()
    lock = sqlite3.connect(db, isolation_level=None)
    lock.execute("BEGIN EXCLUSIVE")
    ids = []
    for seq in range(30):
        did = writer.submit(DefectRecord(source_id="cam0", seq=seq, time=float(seq),
                                         verdict="DEFECT", reason="r"))
        # A reject names its defect: it must never land first (the foreign key would refuse).
        writer.submit(RejectRecord(source_id="cam0", issued_at=float(seq), defect_id=did))
        ids.append(did)
    assert writer.overflowed > 40
    lock.execute("ROLLBACK")
    lock.close()
    writer.stop()

    plain = sqlite3.connect(db)
    assert [r[0] for r in plain.execute("SELECT id FROM defects ORDER BY id")] == ids
    assert plain.execute("SELECT count(*) FROM reject_events").fetchone() == (30,)
    assert writer.set_aside == 0 and not writer.failed_path.exists()
    assert writer.journal_path.read_bytes() == b""


# --- a full disk: a real small filesystem ---------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs mounted for the test (we run as root); skips where mounting is refused."""
    mount = tmp_path / "disk"
    mount.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here to fill it ({r.stderr.strip()}); "
                    "the full-disk tests need root or CAP_SYS_ADMIN")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(disk: Path) -> Path:
    """Fill the disk to the last byte; returns the filler file (delete it to free the disk)."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        for chunk in (65536, 512, 1):            # big writes, then what is left of a block
            try:
                while os.write(fd, b"\0" * chunk):
                    pass
            except OSError:
                pass
    finally:
        os.close(fd)
    return filler


def test_defect_log_writer_keeps_records_and_says_disk_full_when_its_disk_fills(
        small_disk, caplog, wait_until):
    db = small_disk / "defects.db"
    writer = DefectLogWriter(db, retry_max_s=0.1).start()
    run_id = writer.begin_run()
    filler = fill(small_disk)
    with caplog.at_level(logging.ERROR):
        ids = [writer.submit(DefectRecord(source_id="cam0", seq=seq, time=float(seq),
                                          verdict="DEFECT", reason="r", run_id=run_id))
               for seq in range(5)]
        time.sleep(0.5)
    # Neither the journal nor the database could take them: kept in memory, each record in
    # an ERROR line, the failures counted, and the database error says "disk full" plainly.
    assert writer.journal_failures == 5 and writer.pending == 5
    assert sum(f'"seq": {seq}' in caplog.text for seq in range(5)) == 5
    assert "disk full: the disk holding the defect log" in caplog.text
    filler.unlink()
    assert wait_until(lambda: writer.pending == 0, timeout=10)
    writer.stop()
    with DefectLogReader(db) as reader:
        assert sorted(d.id for d in reader.list_defects()) == ids


def test_defect_log_writer_keeps_records_in_a_journal_on_another_disk_when_the_database_disk_is_full(
        small_disk, tmp_path):
    db = small_disk / "defects.db"
    journal = tmp_path / "elsewhere" / "defects.journal.jsonl"
    writer = DefectLogWriter(db, journal_path=journal, retry_max_s=0.1).start()
    filler = fill(small_disk)
    ids = [writer.submit(DefectRecord(source_id="cam0", seq=seq, time=float(seq),
                                      verdict="DEFECT", reason="r")) for seq in range(5)]
    writer.stop(timeout=0.5)                     # still full: they stay in the journal
    assert writer.journal_failures == 0 and len(journal.read_bytes().splitlines()) == 5
    filler.unlink()

    with DefectLogWriter(db, journal_path=journal) as again:
        assert again.replayed == 5
    with DefectLogReader(db) as reader:
        assert sorted(d.id for d in reader.list_defects()) == ids


def test_grad_edge_defects_says_disk_full_in_one_line_when_the_disk_is_full(small_disk):
    db = small_disk / "defects.db"
    with DefectLogWriter(db) as writer:
        defect_id = writer.submit(DefectRecord(source_id="cam0", seq=1, time=1.0,
                                               verdict="DEFECT", reason="r"))
    fill(small_disk)
    r = subprocess.run([sys.executable, "-m", "edge.cli", "defects", "--db", str(db), "ack",
                        str(defect_id), "--operator", "maria"], capture_output=True, text=True,
                       timeout=120, cwd=small_disk.parent)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert len(lines) == 1 and "disk full" in lines[0] and str(db) in lines[0], r.stderr
    assert "Traceback" not in r.stderr


def test_defect_log_survives_sigkill_of_a_writer_that_was_mid_replay(tmp_path):
    """A crash during the replay itself loses nothing: the journal is emptied only after
    everything in it has landed."""
    db = tmp_path / "defects.db"
    journal = db.with_name(db.name + ".journal.jsonl")
    writer = DefectLogWriter(db)
    writer.stop()
    lines = b"".join(encode_line(DefectRecord(source_id="cam0", seq=i, time=float(i),
                                              verdict="DEFECT", reason="r", id=i + 1))
                     for i in range(3000))
    journal.write_bytes(lines)
    replay = subprocess.Popen([sys.executable, "-c", "import sys\n"
                               "from edge.defect_log import DefectLogWriter\n"
                               "DefectLogWriter(sys.argv[1], batch_size=8).stop()", str(db)])
    deadline = time.monotonic() + 60
    while sqlite3.connect(db).execute("SELECT count(*) FROM defects").fetchone()[0] == 0:
        assert time.monotonic() < deadline and replay.poll() is None
        time.sleep(0.005)
    os.kill(replay.pid, signal.SIGKILL)
    replay.wait()
    landed = sqlite3.connect(db).execute("SELECT count(*) FROM defects").fetchone()[0]

    DefectLogWriter(db).stop()
    assert 0 < landed < 3000                    # it was killed mid-way
    count = sqlite3.connect(db).execute("SELECT count(*) FROM defects").fetchone()[0]
    assert count == 3000 and journal.read_bytes() == b""
