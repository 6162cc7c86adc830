"""The line's published state (edge.metrics) on real runs: `grad-edge run` as a real process
scraped over HTTP while it runs, a real camera stall, a real write lock on the defect log."""

from __future__ import annotations

import json
import re
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from camera_sources.synthetic import SyntheticLine
from edge.defect_log import DefectRecord
from edge.metrics import LineCollector

SIZE = 64


def samples(text: str) -> dict[tuple, float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def fetch(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@pytest.fixture(scope="module")
def threshold(eager_runner) -> float:
    line = SyntheticLine(seed=3, size=(SIZE, SIZE), defect_every=5)
    scores = sorted(float(eager_runner.run(line.render(s)[0][None]).scores[0])
                    for s in range(30))
    return (scores[14] + scores[15]) / 2


def line_yaml(folder: Path, model: Path, threshold: float, port: int = 0, **source) -> Path:
    cfg = {"run_dir": "run",
           "model": {"path": str(model), "backend": "eager", "device": "cpu"},
           "sources": [{"id": "belt", "kind": "synthetic", "frames": 150, "fps": 15, "seed": 3,
                        "defect_every": 5, "size": [SIZE, SIZE], **source}],
           "worker": {"max_batch": 4, "max_wait_ms": 5, "torch_threads": 1},
           "rules": {"default": {"threshold": threshold}},
           "defect_log": {"url": "sqlite:///run/defects.db", "images": "run/images"},
           "keep": {"band": 0.1, "max_per_minute": 120},
           "metrics": {"port": port}, "status_interval_s": 0}
    path = folder / "line.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def metrics_url(log: Path, proc: subprocess.Popen, timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = re.search(r"metrics: (http://127\.0\.0\.1:\d+)/metrics", log.read_text())
        if found:
            return found[1]
        assert proc.poll() is None, log.read_text()[-3000:]
        time.sleep(0.1)
    raise AssertionError("the line never said where its metrics are")


def test_line_publishes_metrics_and_healthz_fails_while_its_camera_is_down_when_scraped(
        tiny_checkpoint, threshold, short_dir):
    # The camera delivers nothing for 4 s from frame 40: DOWN after max_frame_gap_s 1.
    config = line_yaml(short_dir, tiny_checkpoint, threshold, stall=[40, 4.0],
                       max_frame_gap_s=1.0)
    log = short_dir / "line.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "edge.cli", "run", str(config)],
                                cwd=short_dir, stdout=out, stderr=subprocess.STDOUT)
    try:
        base = metrics_url(log, proc)
        seen_frames, health = [], []
        while proc.poll() is None:
            try:
                status, body = fetch(base + "/metrics")
                if status == 200 and body:
                    s = samples(body.decode())
                    seen_frames.append(s.get(("grad_edge_frames_total", (("source", "belt"),)),
                                             0))
                status, body = fetch(base + "/healthz")
                health.append((status, json.loads(body)))
            except (OSError, ValueError):
                continue                     # the run is ending: its server stops
            time.sleep(0.1)
        out_text = log.read_text()
        assert proc.wait(60) == 0, out_text[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert seen_frames and seen_frames[-1] > seen_frames[0] >= 0       # counted live
    downs = [h for status, h in health if status == 503]
    assert any("source belt is DOWN" in p for h in downs for p in h["problems"]), health[-5:]
    assert health[0][0] == 200 or "not running" in health[0][1]["problems"][0]
    first_down = next(i for i, (status, _) in enumerate(health) if status == 503
                      and "DOWN" in health[i][1]["problems"][0])
    assert any(status == 200 for status, _ in health[first_down:]), "never healthy again"

    summary = json.loads((short_dir / "run" / "summary.json").read_text())
    rows = [json.loads(x) for x in (short_dir / "run" / "results-1.jsonl").read_text()
            .splitlines()]
    # The summary scores itself against the source's truth, as the results file does.
    t = summary["counters"]["truth"]["belt"]
    assert t["defective"] == sum(r["truth"] == 1 for r in rows) > 0
    assert t["found"] == sum(r["truth"] == 1 and r["verdict"] == "DEFECT" for r in rows)
    assert t["false_rejects"] == sum(r["truth"] == 0 and r["reject"] for r in rows)
    assert t["unknown_good"] == sum(r["truth"] == 0 and r["verdict"] == "UNKNOWN" for r in rows)
    assert f"injected defects found {t['found']} of {t['defective']}" in out_text
    # Near-threshold good frames were kept, logged and saved as PNG.
    db = sqlite3.connect(short_dir / "run" / "defects.db")
    kept = db.execute("SELECT seq, raw_score, threshold, frame_path FROM kept_frames").fetchall()
    assert kept and summary["counters"]["kept_frames"]["belt"] == len(kept)
    by_seq = {r["seq"]: r for r in rows}
    for seq, score, thr, path in kept:
        assert by_seq[seq]["verdict"] == "OK" and thr * 0.9 <= score < thr
        assert Path(path).suffix == ".png" and Path(path).is_file()
    assert db.execute("SELECT count(*) FROM alarms WHERE kind = 'source_down'").fetchone()[0] >= 1


def test_line_metrics_count_what_the_worker_judged_when_a_run_ends(tiny_checkpoint, threshold,
                                                                   short_dir):
    from deploy.runner import open_runner
    from edge.config import load_config
    from edge.line import Line

    cfg = load_config(line_yaml(short_dir, tiny_checkpoint, threshold, port=None, frames=40))
    line = Line(cfg, open_runner(str(tiny_checkpoint), backend="eager", device="cpu"))
    summary = line.run()
    s = samples(line.publisher.metrics_text().decode())
    belt = (("source", "belt"),)
    assert s[("grad_edge_frames_total", belt)] == summary.counters["frames"] == 40
    assert s[("grad_edge_latency_ms_count", belt)] == 40
    assert sum(v for (name, labels), v in s.items() if name == "grad_edge_verdicts_total") == 40
    assert s[("grad_edge_verdicts_total", (("source", "belt"), ("verdict", "DEFECT")))] == \
        summary.counters["defects"]
    assert s[("grad_edge_accounting_frames", (("fate", "unaccounted"), ("source", "belt")))] == 0
    assert s[("grad_edge_accounting_frames", (("fate", "captured"), ("source", "belt")))] == 40
    assert s[("grad_edge_missed_rejects_total", belt)] == summary.counters["missed_rejects"]
    info = [labels for (name, labels) in s if name == "grad_edge_model_info"][0]
    assert dict(info)["model_hash"] == line.runner.card.model_hash
    health = line.publisher.health()
    assert not health["ok"] and health["problems"] == ["the line is not running (ended)"]


def test_line_refuses_to_start_naming_metrics_port_when_the_port_is_taken(
        tiny_checkpoint, threshold, short_dir):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    try:
        config = line_yaml(short_dir, tiny_checkpoint, threshold, port=taken.getsockname()[1])
        r = subprocess.run([sys.executable, "-m", "edge.cli", "run", str(config)],
                           cwd=short_dir, capture_output=True, text=True, timeout=120)
    finally:
        taken.close()
    assert r.returncode == 2, (r.stdout, r.stderr[-2000:])
    lines = [x for x in r.stderr.splitlines() if "error" in x]
    assert len(lines) == 1 and "metrics.port" in lines[0] and "Traceback" not in r.stderr
    db = short_dir / "run" / "defects.db"
    assert not db.exists() or sqlite3.connect(db).execute(
        "SELECT count(*) FROM runs").fetchone() == (0,)


def test_healthz_says_the_writer_is_stuck_while_the_database_stays_locked(worker_rig, wait_until):
    rig = worker_rig([("cam0", "every_frame", 8)]).start()
    collector = LineCollector(rig.worker, rig.writer, writer_stuck_s=1.0)
    assert collector.health()["ok"]
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sqlite3, time\n"
        f"con = sqlite3.connect({str(rig.db)!r}, isolation_level=None)\n"
        "con.execute('BEGIN IMMEDIATE'); print('locked', flush=True); time.sleep(6)\n")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        rig.writer.submit(DefectRecord(source_id="cam0", seq=1, time=time.time(),
                                       verdict="DEFECT", reason="r", run_id=rig.worker.run_id))
        assert wait_until(lambda: not collector.health()["ok"], timeout=5.0)
        problems = collector.health()["problems"]
        assert len(problems) == 1 and problems[0].startswith("defect log writer stuck: 1 record")
    finally:
        holder.kill()
        holder.wait()
    assert wait_until(lambda: collector.health()["ok"], timeout=15.0)
