"""The line under the faults a plant meets, as real processes: a missing or corrupt video, a
killed line, a killed producer, SIGTERM, a file that breaks off, verdicts too late to reject."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import yaml

SIZE = 64


def write_config(folder: Path, model: Path, sources: list[dict], **sections) -> Path:
    cfg = {
        "run_dir": "run",
        "model": {"path": str(model), "backend": "eager", "device": "cpu"},
        "sources": sources,
        "worker": {"max_batch": 4, "max_wait_ms": 5, "heartbeat_timeout_s": 5},
        "rules": {"default": {"threshold": 1e9}},
        "defect_log": {"url": "sqlite:///run/defects.db", "images": "run/images"},
        "reject": {"sinks": [{"kind": "jsonl", "path": "run/rejects.jsonl"}]},
        "status_interval_s": 0.5,
    }
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
    path = folder / "line.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def synthetic(frames: int | None, fps: float = 30, **kw) -> dict:
    return {"id": "belt", "kind": "synthetic", "frames": frames, "fps": fps, "seed": 3,
            "defect_every": 5, "size": [SIZE, SIZE], **kw}


def start(config: Path, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "edge.cli", "run", str(config)], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run(config: Path, cwd: Path, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edge.cli", "run", str(config)], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


def results(run_dir: Path) -> list[dict]:
    path = run_dir / "results.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines() if x] if path.exists() else []


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        if time.monotonic() > deadline:
            # What the line was doing is the only clue to why it stalled: its log, not "timed out".
            proc.kill()
            raise AssertionError(f"timed out after {timeout:.0f} s; the line's stderr ends:\n"
                                 f"{proc.communicate()[1][-3000:]}")
        time.sleep(0.1)


def producers(pid: int) -> list[int]:
    """The line's producer processes (spawned children; not multiprocessing's tracker)."""
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True)
    found = []
    for child in map(int, out.stdout.split()):
        try:
            if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes():
                found.append(child)
        except FileNotFoundError:
            pass
    return found


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"           # a zombie has died
    except FileNotFoundError:
        return False


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


# --- start-up checks ------------------------------------------------------------------------


def test_run_exits_2_naming_the_key_and_opens_no_run_when_the_video_is_missing(
        tiny_checkpoint, short_dir):
    missing = short_dir / "line.mp4"
    config = write_config(short_dir, tiny_checkpoint,
                          [{"id": "cam", "kind": "video", "path": "line.mp4"}])
    r = run(config, short_dir)
    assert r.returncode == 2, r.stderr[-3000:]
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert "sources[0].path" in lines[0] and str(missing) in lines[0] and "line.yaml" in lines[0]
    assert not (short_dir / "run" / "defects.db").exists()


def test_run_exits_2_and_opens_no_run_when_the_video_is_random_bytes(tiny_checkpoint, short_dir):
    (short_dir / "line.mp4").write_bytes(os.urandom(300_000))
    config = write_config(short_dir, tiny_checkpoint,
                          [{"id": "cam", "kind": "video", "path": "line.mp4"}])
    r = run(config, short_dir)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "sources[0].path" in r.stderr and "OpenCV cannot open" in r.stderr
    assert not (short_dir / "run" / "defects.db").exists()


# --- crashes and restarts ---------------------------------------------------------------------


def test_killing_the_line_with_sigkill_leaves_no_producer_running(tiny_checkpoint, short_dir):
    config = write_config(short_dir, tiny_checkpoint, [synthetic(None)])
    proc = start(config, short_dir)
    try:
        wait_for(lambda: len(results(short_dir / "run")) >= 3, proc)
        pids = producers(proc.pid)
        assert len(pids) == 1, "the line runs its producer in a process of its own"
        proc.kill()
        proc.wait(10)
        deadline = time.monotonic() + 5
        while any(alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(alive(p) for p in pids), "an orphan producer survived the line"
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def test_a_killed_camera_producer_is_restarted_and_every_frame_is_still_accounted_for(
        tiny_checkpoint, short_dir):
    config = write_config(short_dir, tiny_checkpoint, [synthetic(None, fps=20)])
    proc = start(config, short_dir)
    try:
        wait_for(lambda: len(results(short_dir / "run")) >= 5, proc)
        (producer,) = producers(proc.pid)
        os.kill(producer, signal.SIGKILL)
        # A new producer comes up and its frames get judged: the belt kept moving while no
        # producer watched (back-off, start-up), so its first seq jumps over the parts that
        # passed meanwhile.
        def jumped() -> bool:
            seqs = [r["seq"] for r in results(short_dir / "run")]
            return any(b - a > 1 for a, b in zip(seqs, seqs[1:]))
        wait_for(jumped, proc)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, err[-3000:]
    assert "restarting producer belt" in err and "died (exit code -9)" in err
    acc = summary(short_dir / "run")["counters"]["accounting"]["belt"]
    assert acc["producer_restarts"] == 1 and acc["unaccounted"] == 0
    assert acc["captured"] == (acc["judged"] + acc["dropped"] + acc["unjudged_at_stop"]
                               + acc["lost"])
    assert acc["parts_not_captured"] > 0          # the parts that passed meanwhile, counted
    # No part judged twice, in belt order.
    seqs = [r["seq"] for r in results(short_dir / "run")]
    assert len(seqs) == len(set(seqs)) == acc["judged"] and seqs == sorted(seqs)


def test_a_killed_video_producer_fails_its_source_and_the_run_exits_1(tiny_checkpoint, short_dir):
    video = short_dir / "line.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 10, (SIZE, SIZE))
    for i in range(300):
        writer.write(np.full((SIZE, SIZE, 3), i % 256, np.uint8))
    writer.release()
    config = write_config(short_dir, tiny_checkpoint,
                          [{"id": "cam", "kind": "video", "path": "line.avi", "pace": "file"}])
    proc = start(config, short_dir)
    try:
        wait_for(lambda: len(results(short_dir / "run")) >= 3, proc)
        (producer,) = producers(proc.pid)
        os.kill(producer, signal.SIGKILL)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 1, err[-3000:]
    assert "source failed" in err and "failed (exit 1)" in out
    assert summary(short_dir / "run")["outcome"] == "failed"


def test_a_video_that_breaks_off_mid_file_fails_its_source_and_the_run_exits_1(
        tiny_checkpoint, short_dir):
    video = short_dir / "line.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 10, (SIZE, SIZE))
    rng = np.random.default_rng(0)
    for _ in range(40):
        writer.write(rng.integers(0, 256, (SIZE, SIZE, 3), np.uint8))
    writer.release()
    data = video.read_bytes()
    video.write_bytes(data[: len(data) // 2])
    config = write_config(short_dir, tiny_checkpoint,
                          [{"id": "cam", "kind": "video", "path": "line.avi", "pace": "fast"}])
    r = run(config, short_dir)
    assert r.returncode == 1, r.stderr[-3000:]
    assert "SOURCE FAILED" in r.stderr and "unreadable from frame" in r.stderr
    acc = summary(short_dir / "run")["counters"]["accounting"]["cam"]
    assert 0 < acc["judged"] < 40 and acc["unaccounted"] == 0


def test_sigterm_stops_the_line_with_a_summary_and_exit_code_143(tiny_checkpoint, short_dir):
    config = write_config(short_dir, tiny_checkpoint, [synthetic(None)])
    proc = start(config, short_dir)
    try:
        wait_for(lambda: len(results(short_dir / "run")) >= 3, proc)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 143, err[-3000:]
    assert "terminated (exit 143)" in out and "unaccounted 0" in out
    db = sqlite3.connect(short_dir / "run" / "defects.db")
    assert db.execute("SELECT status, exit_code FROM runs").fetchall() == [("interrupted", 143)]


# --- late verdicts ----------------------------------------------------------------------------


def test_verdicts_too_late_for_the_ejector_are_missed_and_no_reject_hits_another_part(
        tiny_checkpoint, short_dir):
    # Two belts, the same 200 counts from camera to ejector. On `near` the belt runs so fast
    # (500,000 counts/s) that the part is at the ejector 0.4 ms after capture: no verdict
    # can make it through the socket and the model, so every reject is missed, however fast
    # or slow the machine. On `far` (100 counts/s) the part needs 2 s to get there: every
    # verdict is in time and its reject must fire while that part, not a neighbour, is at the
    # ejector. (One belt at a middling speed made the outcome hang on this CPU's load: a
    # faster model once left nothing late.) Every frame is a defect (threshold 0); the
    # latency budget is out of reach (10 minutes) so that no frame is UNKNOWN for lateness:
    # what is late here is the ejector, not the verdict.
    sources = [synthetic(30, fps=25, defect_every=1, id="near",
                         encoder={"counts_per_frame": 20_000}),
               synthetic(30, fps=25, defect_every=1, id="far", seed=4,
                         encoder={"counts_per_frame": 4})]
    config = write_config(
        short_dir, tiny_checkpoint, sources,
        rules={"default": {"threshold": 0.0}}, worker={"latency_budget_ms": 600_000},
        reject={"camera_to_ejector_counts": 200, "tolerance_counts": 50})
    r = run(config, short_dir)
    assert r.returncode == 0, r.stderr[-3000:]
    c = summary(short_dir / "run")["counters"]
    lines = [json.loads(x) for x in (short_dir / "run/rejects.jsonl").read_text().splitlines()]
    fired = [x for x in lines if "alarm" not in x]
    alarms = [x["alarm"] for x in lines if "alarm" in x]
    judged = {k: v["judged"] for k, v in c["accounting"].items()}
    # (A busy producer can capture a frame late and so let a part pass unseen; the run
    # counts it in parts_not_captured. What is judged is what must be rejected.)
    assert min(judged.values()) >= 20 and c["defects"] == sum(judged.values()), c
    missed = {k: v["missed_rejects"] for k, v in c["accounting"].items()}
    assert missed["near"] == judged["near"], c
    # On `far` (4 counts a frame at 25 frames/s: 100 counts/s, so the part reaches the
    # ejector 2 s after capture and leaves its 50-count window 0.5 s later) every verdict is
    # in time on an idle machine. On one starved by other work (seen: p50 latency 1.4-8.6 s
    # beside two compute jobs on 2 cores) some come after their part passed: those must be
    # missed and counted, never fired at a later part. So: fired + missed = judged, every
    # verdict under 2 s fired, none over 2.5 s did (0.1 s of slack for the clocks).
    assert c["rejects"] == len(fired) == judged["far"] - missed["far"], c
    far = [x["latency_ms"] for x in results(short_dir / "run") if x["source_id"] == "far"]
    assert sum(ms < 1900 for ms in far) <= len(fired) <= sum(ms < 2600 for ms in far), far
    assert {x["source_id"] for x in fired} == {"far"}, c
    assert c["missed_rejects"] == sum(missed.values())
    assert [a["kind"] for a in alarms] == ["missed_reject"] * c["missed_rejects"]
    # Every reject that fired, fired while its own part was at the ejector.
    assert all(0 <= x["fired_position"] - x["due_encoder"] <= 50 for x in fired)
    assert "MISSED REJECT" in r.stderr and f"MISSED rejects {c['missed_rejects']}" in r.stdout
    # The defect log has each reject with its outcome, and each alarm.
    db = sqlite3.connect(short_dir / "run" / "defects.db")
    outcomes = dict(db.execute("SELECT outcome, COUNT(*) FROM reject_events GROUP BY outcome"))
    assert (outcomes.get("fired", 0), outcomes["missed"]) == (c["rejects"], c["missed_rejects"])
    reasons = [r for (r,) in db.execute("SELECT reason FROM reject_events WHERE outcome = 'missed'")]
    assert all("passed the ejector" in r for r in reasons)
    assert db.execute("SELECT COUNT(*) FROM alarms WHERE kind = 'missed_reject'").fetchone()[0] \
        == c["missed_rejects"]


def test_a_line_too_slow_for_its_budget_says_its_good_parts_were_rejected_as_unknown(
        tiny_checkpoint, short_dir):
    # A latency budget no verdict can meet (0.01 ms): every result is late, so every part
    # is UNKNOWN and, fail-safe, rejected. The truth line must say that the good parts went
    # out as UNKNOWN, not let it read as a model that rejects good parts (seen: "good parts
    # rejected 260 of 270" from a line starved of CPU, its model never at fault).
    config = write_config(short_dir, tiny_checkpoint, [synthetic(10, fps=20)],
                          worker={"latency_budget_ms": 0.01})
    r = run(config, short_dir)
    assert r.returncode == 0, r.stderr[-3000:]
    t = summary(short_dir / "run")["counters"]["truth"]["belt"]
    rows = results(short_dir / "run")
    assert rows and all(x["verdict"] == "UNKNOWN" for x in rows)
    good = sum(x["truth"] == 0 for x in rows)
    assert t["good"] == t["false_rejects"] == t["unknown_good"] == good > 0, t
    assert f"good parts rejected {good} of {good} ({good} UNKNOWN)" in r.stdout


def test_a_stalled_camera_is_reported_down_and_the_parts_it_missed_are_counted(
        tiny_checkpoint, short_dir):
    config = write_config(short_dir, tiny_checkpoint,
                          [synthetic(90, fps=10, stall=[3, 6.0], max_frame_gap_s=1.0)])
    r = run(config, short_dir)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "SOURCE DOWN: belt delivered no frame" in r.stderr and "producer is alive" in r.stderr
    acc = summary(short_dir / "run")["counters"]["accounting"]["belt"]
    # 6 s at 10 parts/s passed the camera unseen; the run says so. (The stall comes early so
    # that even a slow, loaded worker has judged the frames before it well within the stall:
    # frames waiting in the queue mean the source delivers and is not down.)
    assert 55 <= acc["parts_not_captured"] <= 68 and acc["unaccounted"] == 0
    assert "PARTS NOT CAPTURED" in r.stdout


def test_the_line_stops_with_exit_1_at_the_first_missed_reject_when_configured_to(
        tiny_checkpoint, short_dir):
    # The part is at the ejector 0.4 ms after capture (200 counts on a 500,000 counts/s
    # belt), so the first verdict is already too late on any machine.
    config = write_config(
        short_dir, tiny_checkpoint,
        [synthetic(None, fps=25, defect_every=1, encoder={"counts_per_frame": 20_000})],
        rules={"default": {"threshold": 0.0}}, worker={"latency_budget_ms": 600_000},
        reject={"camera_to_ejector_counts": 200, "tolerance_counts": 50,
                "stop_line_on_missed": True})
    r = run(config, short_dir)          # an endless source: only the missed reject stops it
    assert r.returncode == 1, r.stderr[-3000:]
    s = summary(short_dir / "run")
    assert s["outcome"] == "failed" and s["counters"]["missed_rejects"] >= 1
    assert "stopped at the first missed reject" in r.stdout
    assert s["counters"]["accounting"]["belt"]["unaccounted"] == 0


def test_run_exits_2_in_one_line_when_the_defect_database_is_a_directory(tiny_checkpoint,
                                                                         short_dir):
    (short_dir / "run" / "defects.db").mkdir(parents=True)
    config = write_config(short_dir, tiny_checkpoint, [synthetic(5)])
    r = run(config, short_dir)
    assert r.returncode == 2, r.stderr[-3000:]
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert "defects.db" in lines[0] and "directory" in lines[0]
