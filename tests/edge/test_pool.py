"""Several worker processes for one line, as real processes: each judges its own sources with
its own model, a killed worker is restarted, the summary adds them up."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from edge.config import ConfigError, load_config
from edge.pool import default_workers


def pool_yaml(folder: Path, model: Path, frames: int | None, **extra) -> Path:
    cfg = {
        "run_dir": "run",
        "model": {"path": str(model), "backend": "eager", "device": "cpu"},
        "sources": [{"id": sid, "kind": "synthetic", "frames": frames, "fps": 10, "seed": i,
                     "defect_every": 5, "size": [64, 64]} for i, sid in enumerate("abc")],
        "workers": [{"id": "w0", "sources": ["a", "c"]}, {"id": "w1", "sources": ["b"]}],
        "rules": {"default": {"threshold": 1e9}},
        "defect_log": {"url": "sqlite:///run/defects.db", "images": "run/images"},
        "reject": {"sinks": [{"kind": "jsonl", "path": "run/rejects.jsonl"}]},
        "status_interval_s": 0.5,
        **extra,
    }
    path = folder / "line.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def worker_pids(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()
            if b"spawn_main" in Path(f"/proc/{p}/cmdline").read_bytes()]


def test_two_workers_judge_their_own_sources_and_the_summary_adds_them_up(tiny_checkpoint,
                                                                          short_dir):
    config = pool_yaml(short_dir, tiny_checkpoint, frames=12)
    r = subprocess.run([sys.executable, "-m", "edge.cli", "run", str(config)], cwd=short_dir,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    run = short_dir / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["outcome"] == "completed" and summary["totals"]["frames"] == 36
    assert set(summary["totals"]["accounting"]) == {"a", "b", "c"}
    assert all(a["unaccounted"] == 0 for a in summary["totals"]["accounting"].values())
    # Each worker judged exactly its sources, into its own folder and its own SQLite file.
    for wid, sources in (("w0", {"a", "c"}), ("w1", {"b"})):
        rows = [json.loads(x) for x in (run / wid / "results.jsonl").read_text().splitlines()]
        assert {r["source_id"] for r in rows} == sources and len(rows) == 12 * len(sources)
        db = sqlite3.connect(run / f"defects.{wid}.db")
        assert db.execute("SELECT status FROM runs").fetchall() == [("completed",)]
    assert "2 workers:" in r.stdout and "all: 36 frames" in r.stdout


def test_a_killed_worker_is_restarted_with_back_off_and_the_others_go_on(tiny_checkpoint,
                                                                         short_dir):
    config = pool_yaml(short_dir, tiny_checkpoint, frames=None)
    proc = subprocess.Popen([sys.executable, "-m", "edge.cli", "run", str(config)],
                            cwd=short_dir, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    run = short_dir / "run"

    def judged(wid: str) -> int:
        path = run / wid / "results.jsonl"
        return len(path.read_text().splitlines()) if path.exists() else 0
    try:
        deadline = time.monotonic() + 180
        while judged("w1") < 3 or judged("w0") < 3:
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        pids = worker_pids(proc.pid)
        assert len(pids) == 2
        before = {wid: judged(wid) for wid in ("w0", "w1")}
        files = {wid: os.readlink(run / wid / "results.jsonl") for wid in ("w0", "w1")}
        os.kill(pids[0], signal.SIGKILL)      # one of them; the summary says which restarted

        def judging_again(wid: str) -> bool:
            # The survivor goes on in its run's file; the restarted worker has opened a new run
            # (results.jsonl points at a new file) and judged in it. Stopping sooner raced it
            # on a slow machine, where its back-off and model load take seconds.
            if os.readlink(run / wid / "results.jsonl") != files[wid]:
                return judged(wid) > 0
            return judged(wid) > before[wid]
        while len(worker_pids(proc.pid)) < 2 or not all(map(judging_again, ("w0", "w1"))):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        time.sleep(3)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, err[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    restarted = [wid for wid, w in summary["workers"].items() if w["restarts"]]
    assert len(restarted) == 1 and "RESTARTED 1x" in out
    assert "worker_died" in err and "restarting worker" in err
    # The restarted worker opened a new run; the killed one was closed as crashed.
    db = sqlite3.connect(run / f"defects.{restarted[0]}.db")
    assert [s for (s,) in db.execute("SELECT status FROM runs ORDER BY id")] == [
        "crashed", "interrupted"]


def test_workers_config_is_refused_when_a_source_is_judged_twice_or_not_at_all(tmp_path,
                                                                              tiny_checkpoint):
    twice = pool_yaml(tmp_path, tiny_checkpoint, 5,
                      workers=[{"id": "w0", "sources": ["a", "b"]},
                               {"id": "w1", "sources": ["b", "c"]}])
    with pytest.raises(ConfigError, match=r"workers\[1\].sources: source 'b' is already judged"):
        load_config(twice)
    none = pool_yaml(tmp_path, tiny_checkpoint, 5, workers=[{"id": "w0", "sources": ["a"]}])
    with pytest.raises(ConfigError, match="no worker judges source"):
        load_config(none)
    shared_pub = pool_yaml(tmp_path, tiny_checkpoint, 5, reject={"sinks": [
        {"kind": "zmq_pub", "endpoint": "tcp://127.0.0.1:5599"}]})
    with pytest.raises(ConfigError, match="cannot be bound by 2 worker processes"):
        load_config(shared_pub)


def test_default_workers_are_one_per_gpu_with_sources_dealt_round_robin(tmp_path,
                                                                       tiny_checkpoint):
    cfg = load_config(pool_yaml(tmp_path, tiny_checkpoint, 5, workers=None))
    assert default_workers(cfg, gpus=0) is None and default_workers(cfg, gpus=1) is None
    two = default_workers(cfg, gpus=2)
    assert [(w.id, w.device, w.sources) for w in two] == [
        ("gpu0", "cuda:0", ["a", "c"]), ("gpu1", "cuda:1", ["b"])]
