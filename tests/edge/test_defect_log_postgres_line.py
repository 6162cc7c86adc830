"""Real lines writing to the plant's one PostgreSQL database: two `grad-edge run` processes
at once (producer processes, ZeroMQ, worker, tiny real model, JSONL reject sink), and a run
whose database server is stopped mid-run and started again. Every DEFECT/UNKNOWN a line
reported and every reject it fired is in the database exactly once, under its own id."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

from camera_sources.synthetic import SyntheticLine

SEED = 5
SIZE = 64


@pytest.fixture(scope="module")
def low_threshold(eager_runner) -> float:
    """A threshold at the first quartile of the synthetic line's scores: about three frames in
    four are defects, whatever this untrained model thinks of them."""
    line = SyntheticLine(seed=SEED, size=(SIZE, SIZE), defect_every=2)
    scores = [float(eager_runner.run(line.render(seq)[0][None]).scores[0]) for seq in range(16)]
    return float(np.quantile(scores, 0.25))


def line_folder(root: Path, name: str, model: Path, threshold: float, url: str,
                frames: int) -> Path:
    """A line's folder with its config: one synthetic camera at 10 fps, the defect log at `url`."""
    folder = root / name
    folder.mkdir()
    cfg = {
        "run_dir": "run",
        "model": {"path": str(model), "backend": "eager", "device": "cpu",
                  "train_demo_if_missing": False},
        "sources": [{"id": f"{name}-cam", "kind": "synthetic", "frames": frames, "fps": 10,
                     "seed": SEED, "defect_every": 2, "size": [SIZE, SIZE],
                     "drop_policy": "every_frame"}],
        # Late results are UNKNOWN (and rejected): on a loaded machine some frames are.
        "worker": {"max_batch": 4, "max_wait_ms": 5, "heartbeat_timeout_s": 5,
                   "latency_budget_ms": 1500},
        "rules": {"default": {"threshold": threshold}},
        "defect_log": {"url": url, "images": "run/images"},
        "reject": {"camera_to_ejector_counts": 1000,
                   "sinks": [{"kind": "jsonl", "path": "run/rejects.jsonl"}]},
        "status_interval_s": 0.5,
    }
    (folder / "line.yaml").write_text(yaml.safe_dump(cfg))
    return folder


def start_line(folder: Path) -> subprocess.Popen:
    log = open(folder / "line.log", "wb")
    return subprocess.Popen([sys.executable, "-m", "edge.cli", "run", "line.yaml"],
                            cwd=folder, stdout=log, stderr=subprocess.STDOUT)


def finish(proc: subprocess.Popen, folder: Path, timeout: float = 240) -> None:
    try:
        code = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError((folder / "line.log").read_text()[-3000:])
    assert code == 0, (folder / "line.log").read_text()[-3000:]


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] \
        if path.exists() else []


def query(url: str, statement: str) -> list[tuple]:
    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            return [tuple(r) for r in conn.execute(text(statement))]
    finally:
        engine.dispose()


def audit(url: str, folder: Path) -> tuple[int, int, int]:
    """Every DEFECT/UNKNOWN of the line in `folder` has its row, in its run, once; every
    reject it decided has exactly one row (fired, or missed when its verdict came after the
    part had passed), and every one the sink fired says fired. Returns (run id, defects,
    rejects)."""
    run_id = json.loads((folder / "run" / "summary.json").read_text())["run_id"]
    logged = [r for r in jsonl(folder / "run" / "results.jsonl")
              if r["verdict"] in ("DEFECT", "UNKNOWN")]
    rows = {row[0]: row[1:] for row in query(
        url, f"SELECT id, run_id, source_id, seq, verdict FROM defects WHERE run_id = {run_id}")}
    assert sorted(rows) == sorted(r["defect_id"] for r in logged), folder
    for r in logged:
        assert rows[r["defect_id"]] == (run_id, r["source_id"], r["seq"], r["verdict"]), r
    fired = [e for e in jsonl(folder / "run" / "rejects.jsonl") if "alarm" not in e]
    rejects: dict[int, list[str]] = {}
    for defect_id, outcome in query(url, "SELECT defect_id, outcome FROM reject_events "
                                         f"WHERE run_id = {run_id}"):
        rejects.setdefault(defect_id, []).append(outcome)
    decided = [r["defect_id"] for r in logged if r["reject"]]
    assert sorted(rejects) == sorted(decided)
    assert all(len(outcomes) == 1 and outcomes[0] in ("fired", "missed")
               for outcomes in rejects.values()), rejects
    for event in fired:
        assert rejects.get(event["defect_id"]) == ["fired"], event
    return run_id, len(logged), len(decided)


def test_two_lines_write_one_postgres_database_at_once_and_every_record_lands_once(
        tiny_checkpoint, low_threshold, postgres_url, short_dir):
    folders = [line_folder(short_dir, name, tiny_checkpoint, low_threshold, postgres_url, 40)
               for name in ("a", "b")]
    procs = [start_line(folder) for folder in folders]
    for proc, folder in zip(procs, folders):
        finish(proc, folder)

    (run_a, defects_a, rejects_a), (run_b, defects_b, rejects_b) = (
        audit(postgres_url, folder) for folder in folders)
    assert run_a != run_b and min(defects_a, defects_b, rejects_a, rejects_b) >= 10
    total = query(postgres_url, "SELECT count(*), count(DISTINCT id) FROM defects")
    assert total == [(defects_a + defects_b,) * 2]       # nothing else, no id twice
    runs = query(postgres_url, "SELECT status, started_at, stopped_at FROM runs ORDER BY id")
    assert [r[0] for r in runs] == ["completed", "completed"]
    (_, start_1, stop_1), (_, start_2, stop_2) = runs
    assert start_1 < stop_2 and start_2 < stop_1         # they did write at the same time
    # Each line's saved images carry its own run and defect ids.
    for folder, run_id in zip(folders, (run_a, run_b)):
        names = [p.name for p in (folder / "run" / "images").rglob("*.jpg")]
        assert names and all(n.startswith(f"r{run_id}_d") for n in names)


def test_line_loses_nothing_when_its_postgres_server_is_stopped_mid_run_and_started_again(
        tiny_checkpoint, low_threshold, postgres_server, postgres_url, short_dir):
    folder = line_folder(short_dir, "c", tiny_checkpoint, low_threshold, postgres_url, 80)
    proc = start_line(folder)
    results = folder / "run" / "results.jsonl"
    deadline = time.monotonic() + 120
    while len(jsonl(results)) < 5:                       # the line judges frames
        assert proc.poll() is None and time.monotonic() < deadline, \
            (folder / "line.log").read_text()[-3000:]
        time.sleep(0.05)
    postgres_server.stop()
    away_from = len(jsonl(results))
    time.sleep(3.0)                                      # ~30 frames judged meanwhile
    judged_while_away = len(jsonl(results)) - away_from
    postgres_server.start()
    finish(proc, folder)

    run_id, defects, _ = audit(postgres_url, folder)
    assert judged_while_away >= 10 and defects >= 20, (judged_while_away, defects)
    log = (folder / "line.log").read_text()
    assert "cannot reach the PostgreSQL server" in log   # it noticed, said so, and went on
    (status,) = query(postgres_url, f"SELECT status FROM runs WHERE id = {run_id}")
    assert status == ("completed",)
