"""`grad-edge run CONFIG` as a real process: a synthetic producer process, ZeroMQ over ipc://,
the worker on a tiny real checkpoint, the SQLite defect log, a JSONL reject sink; and Ctrl-C."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from camera_sources.synthetic import SyntheticLine

REPO = Path(__file__).resolve().parents[2]
FRAMES = 20
SIZE = 64


def line_yaml(folder: Path, model: Path, *, frames: int | None = FRAMES,
              threshold: float | None = None, train_demo: bool = False) -> Path:
    cfg = {
        "run_dir": "run",
        "model": {"path": str(model), "backend": "eager", "device": "cpu",
                  "train_demo_if_missing": train_demo},
        "sources": [{"id": "belt", "kind": "synthetic", "frames": frames, "fps": 50, "seed": 3,
                     "defect_every": 5, "size": [SIZE, SIZE], "drop_policy": "every_frame"}],
        "worker": {"max_batch": 4, "max_wait_ms": 5, "heartbeat_timeout_s": 5},
        "rules": {"default": {"threshold": threshold}},
        "defect_log": {"url": "sqlite:///run/defects.db", "images": "run/images"},
        "reject": {"sinks": [{"kind": "jsonl", "path": "run/rejects.jsonl"}]},
        "status_interval_s": 0.5,
    }
    path = folder / "line.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def grad_edge_run(config: Path, cwd: Path, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edge.cli", "run", str(config)], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


def results(run_dir: Path) -> list[dict]:
    path = run_dir / "results.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line] \
        if path.exists() else []


@pytest.fixture(scope="module")
def expected_scores(eager_runner) -> list[float]:
    """Offline scores of the synthetic line's frames (same seed and size as the config)."""
    line = SyntheticLine(seed=3, size=(SIZE, SIZE), defect_every=5)
    return [float(eager_runner.run(line.render(seq)[0][None]).scores[0]) for seq in range(FRAMES)]


def test_run_command_judges_logs_and_rejects_every_frame_when_the_source_ends(
        tiny_checkpoint, short_dir, expected_scores):
    # A threshold between two scores, well away from both: some frames must be defects.
    ordered = sorted(expected_scores)
    threshold = (ordered[FRAMES // 2 - 1] + ordered[FRAMES // 2]) / 2
    flagged = sorted(i for i, s in enumerate(expected_scores) if s >= threshold)
    assert 0 < len(flagged) < FRAMES

    config = line_yaml(short_dir, tiny_checkpoint, threshold=threshold)
    r = grad_edge_run(config, cwd=short_dir)
    assert r.returncode == 0, r.stderr[-3000:]
    run_dir = short_dir / "run"

    # The summary line counts every frame.
    assert f"run 1: {FRAMES} frames in" in r.stdout, r.stdout
    assert "dropped 0" in r.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    c = summary["counters"]
    assert c["frames"] == FRAMES and c["dropped"] == 0 and c["corrupt"] == 0
    assert c["ok"] + c["defects"] + c["unknown"] == FRAMES
    assert summary["results"] == str(run_dir / "results-1.jsonl")      # one file per run
    assert (run_dir / "results.jsonl").resolve() == run_dir / "results-1.jsonl"
    assert json.loads((run_dir / "summary-1.json").read_text()) == summary

    # One result per frame, scored as offline, with the producer's encoder and truth.
    rows = results(run_dir)
    assert sorted(row["seq"] for row in rows) == list(range(FRAMES))
    for row in rows:
        assert row["raw_score"] == pytest.approx(expected_scores[row["seq"]], rel=1e-4, abs=1e-4)
        assert row["encoder"] == row["seq"] * 100
        assert row["truth"] == (1 if row["seq"] % 5 == 4 else 0)

    # Defects logged (with images) and rejected for exactly the frames over the threshold.
    db = sqlite3.connect(run_dir / "defects.db")
    defects = db.execute("SELECT seq, verdict, frame_path, heatmap_path FROM defects "
                         "ORDER BY seq").fetchall()
    assert [d[0] for d in defects] == flagged
    assert all(d[1] == "DEFECT" and Path(d[2]).is_file() and Path(d[3]).is_file()
               for d in defects)
    assert c["defects"] == len(flagged)
    fired = [json.loads(line) for line in (run_dir / "rejects.jsonl").read_text().splitlines()]
    assert sorted(e["seq"] for e in fired) == flagged

    # The run is recorded, closed, with its summary.
    runs = db.execute("SELECT id, stopped_at, model_hash, config_path, summary FROM runs"
                      ).fetchall()
    assert len(runs) == 1
    run_id, stopped_at, model_hash, config_path, stored = runs[0]
    assert run_id == 1 and stopped_at is not None and model_hash
    assert config_path == str(config)
    assert json.loads(stored)["frames"] == FRAMES


def test_run_command_stops_cleanly_accounts_for_every_frame_and_exits_130_when_sent_sigint(tiny_checkpoint, short_dir):
    config = line_yaml(short_dir, tiny_checkpoint, frames=None, threshold=1e9)  # endless line
    run_dir = short_dir / "run"
    proc = subprocess.Popen([sys.executable, "-m", "edge.cli", "run", str(config)],
                            cwd=short_dir, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.monotonic() + 120
        while len(results(run_dir)) < 5:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no results within 120 s"
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, err[-3000:]          # interrupted, and it says so
    assert "Traceback" not in err

    summary = json.loads((run_dir / "summary.json").read_text())
    frames = summary["counters"]["frames"]
    assert frames >= 5 and summary["outcome"] == "interrupted"
    assert f"run 1: {frames} frames in" in out, out
    # Every frame the producer captured is accounted for: judged, dropped or unjudged.
    acc = summary["counters"]["accounting"]["belt"]
    assert acc["unaccounted"] == 0 and acc["judged"] == frames
    assert acc["captured"] == acc["judged"] + acc["dropped"] + acc["unjudged_at_stop"]
    assert f"captured {acc['captured']} = judged {frames}" in out
    # Every frame the worker judged is in the results file: nothing half-written.
    assert sorted(row["seq"] for row in results(run_dir)) == list(range(frames))
    db = sqlite3.connect(run_dir / "defects.db")
    assert db.execute("SELECT stopped_at IS NOT NULL FROM runs").fetchall() == [(1,)]
    # The producer heard the stop and ended its stream: the run did not wait for a timeout.
    assert "did not stop" not in err


def test_run_command_exits_2_telling_how_to_fix_it_when_the_model_is_missing(short_dir):
    missing = short_dir / "models" / "none.pt"
    config = line_yaml(short_dir, missing, train_demo=False)
    r = grad_edge_run(config, cwd=short_dir, timeout=120)
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert str(missing) in lines[0]
    assert "grad-edge train" in lines[0] and "train_demo_if_missing" in lines[0]
    assert not missing.exists() and not (short_dir / "run" / "defects.db").exists()


def test_run_command_runs_when_the_run_dir_is_deeper_than_a_socket_path_may_be(
        tiny_checkpoint, tmp_path):
    # Sockets live in a short private folder of their own, so a deep run folder is fine.
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    r = grad_edge_run(line_yaml(deep, tiny_checkpoint, threshold=1e9), cwd=deep, timeout=180)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-2000:])
    assert len(results(deep / "run")) == FRAMES
