"""Faults a plant meets, injected for real into the whole line; every frame accounted for.

    python benchmarks/faults.py                      # every fault, ~10 min on 2 cores
    python benchmarks/faults.py --quick              # fewer frames: checks the code paths
    python benchmarks/faults.py --only corrupt_1pct producer_sigkill
    python benchmarks/faults.py --minutes 30         # plus the soak (RSS, open fds per minute)

Each row runs `edge.line.Line` as `grad-edge run` builds it (a synthetic line on a belt that
moves on its own, producer processes, ZeroMQ, the worker with the tiny model, the SQLite
defect log, a JSONL reject sink), injects one fault while it runs, and then audits what the
line left behind, independently of the line's own counters where it can:

    produced    frames the source captured (counted by the producer in shared memory)
    judged      rows in results.jsonl (each frame's verdict)
    dropped     frames dropped and counted by a queue (latest policy)
    missed      rejects not fired because the verdict came after the part passed the ejector
    unaccounted produced - judged - dropped - unjudged at stop - lost (the line's own
                equation; must be 0), plus results rows that disagree with the judged counter
    lost_recs   DEFECT/UNKNOWN verdicts in results.jsonl without exactly one defect-log row,
                and fired rejects without exactly one reject row (must be 0)
    phantom     rejects fired for a frame this run did not decide to reject (must be 0)
    wrong_part  rejects fired outside their part's window at the ejector: fired_position not
                in [due, due + tolerance] (must be 0)
    recover_s   seconds from the end of the fault to the line working again (row-specific)

Every frame is made a defect (threshold 0): the most records and rejects per second, so a
lost record or a wrong reject has the most chances to show. Absolute times are this machine's;
the columns that must be 0 are the point. Prints a table and writes
benchmarks/results/faults.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import platform
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

log = logging.getLogger("faults-bench")
ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
SIZE = 64
FPS = 20.0                  # the belt: 20 parts/s, 100 counts per part
EJECTOR_COUNTS = 1000       # the ejector 10 parts (0.5 s) downstream of the camera
TOLERANCE = 50              # half a part


# --------------------------------------------------------------------------- set-up


def tiny_model(folder: Path) -> Path:
    """The tiny GRAD with real backbone weights (untrained head): timing, not accuracy."""
    import torch

    from grad.checkpoint import Calibration, save_checkpoint
    from grad.config import get_config
    from grad.model import GRAD

    path = folder / "tiny.pt"
    torch.manual_seed(0)
    save_checkpoint(path, GRAD(get_config("tiny")).eval(),
                    Calibration(mean=0.0, std=1.0, threshold=1.0, n_images=20, rule="bench"))
    return path


def line_config(run_dir: Path, model: Path, *, frames: int | None, fps: float = FPS,
                policy: str = "every_frame", db_url: str | None = None, belt: bool = True,
                ejector_counts: int = EJECTOR_COUNTS, **source_kw):
    from edge.config import (DefectLogConfig, EncoderConfig, EncoderKind, LineConfig,
                             ModelConfig, RejectConfig, RuleSettings, RulesConfig, SinkConfig,
                             SourceConfig, SourceKind, WorkerConfig)
    from edge.protocol import DropPolicy

    source = SourceConfig(id="belt", kind=SourceKind.SYNTHETIC, frames=frames, fps=fps, seed=0,
                          defect_every=1, size=[SIZE, SIZE], drop_policy=DropPolicy(policy),
                          max_frame_gap_s=2.0, encoder=EncoderConfig(
                              kind=EncoderKind.SIMULATED if belt else EncoderKind.NONE),
                          **source_kw)
    return LineConfig(
        model=ModelConfig(path=str(model), backend="eager", device="cpu"), sources=[source],
        run_dir=str(run_dir), worker=WorkerConfig(max_batch=4, max_wait_ms=5.0),
        rules=RulesConfig(default=RuleSettings(threshold=0.0)),
        defect_log=DefectLogConfig(url=db_url or f"sqlite:///{run_dir / 'defects.db'}",
                                   images=str(run_dir / "images"), retention_days=None,
                                   retention_gb=None),
        reject=RejectConfig(camera_to_ejector_counts=ejector_counts, tolerance_counts=TOLERANCE,
                            sinks=[SinkConfig(kind="jsonl", path=str(run_dir / "rejects.jsonl"))]),
        status_interval_s=0.0, source_file="benchmarks/faults.py", config_hash="faults")


class Running:
    """A Line running on a thread of this process, watched every 20 ms."""

    def __init__(self, cfg, runner, *, sample: bool = True):
        from edge.line import Line

        self.line = Line(cfg, runner)
        self._sample_on = sample      # off for the soak: the samples would grow this process
        self.summary = None
        self.error: BaseException | None = None
        self.samples: list[tuple[float, int, int]] = []   # (t, judged, received)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._watch = threading.Thread(target=self._sample, daemon=True)

    def _run(self) -> None:
        try:
            self.summary = self.line.run()
        except BaseException as exc:     # noqa: BLE001 - reported by the row
            self.error = exc

    def _sample(self) -> None:
        while self._sample_on and self._thread.is_alive():
            w = self.line.worker
            if w is not None:
                self.samples.append((time.monotonic(), w.stats.frames,
                                     sum(i.stats.received for i in w.inboxes)))
            time.sleep(0.02)

    def start(self) -> "Running":
        self._thread.start()
        self._watch.start()
        return self

    def wait_judged(self, n: int, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while self.line.worker is None or self.line.worker.stats.frames < n:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the line judged fewer than {n} frames: {self.error!r}")
            time.sleep(0.02)

    def join(self, timeout: float = 300.0):
        self._thread.join(timeout)
        if self._thread.is_alive():
            self.line.request_stop()
            self.line.request_stop()
            self._thread.join(30)
        if self.error is not None:
            raise self.error
        return self.summary

    def first_after(self, t: float, field: int = 1) -> float | None:
        """The first sample time after `t` at which the counter `field` grew."""
        before = None
        for when, *counts in self.samples:
            if when <= t:
                before = counts[field - 1]
            elif before is not None and counts[field - 1] > before:
                return when
        return None


# --------------------------------------------------------------------------- the audit


def audit(run_dir: Path, summary, db_path: Path | None = None) -> dict:
    """What the line left behind, checked against itself (see the module docstring)."""
    results = [json.loads(x) for x in (run_dir / "results.jsonl").read_text().splitlines() if x]
    lines = [json.loads(x) for x in (run_dir / "rejects.jsonl").read_text().splitlines()
             if x] if (run_dir / "rejects.jsonl").exists() else []
    fired = [x for x in lines if "alarm" not in x]
    acc = summary.counters["accounting"]
    produced = sum(a["captured"] for a in acc.values())
    judged = sum(a["judged"] for a in acc.values())
    unaccounted = sum(a["unaccounted"] for a in acc.values()) + abs(len(results) - judged)
    db = sqlite3.connect(db_path or run_dir / "defects.db")
    run_id = summary.run_id
    defect_ids = [r["defect_id"] for r in results if r["verdict"] != "OK"]
    rows = dict(db.execute("SELECT id, COUNT(*) FROM defects WHERE run_id = ? GROUP BY id",
                           (run_id,)).fetchall())
    lost = sum(1 for d in defect_ids if d is None or rows.get(d) != 1)
    rejected = {(r["source_id"], r["seq"]) for r in results if r["reject"]}
    phantom = sum(1 for x in fired if (x["source_id"], x["seq"]) not in rejected)
    wrong = sum(1 for x in fired if x.get("due_encoder") is not None and not (
        0 <= x["fired_position"] - x["due_encoder"] <= TOLERANCE))
    reject_rows = db.execute("SELECT COUNT(*) FROM reject_events WHERE run_id = ?",
                             (run_id,)).fetchone()[0]
    db.close()
    return {
        "produced": produced, "judged": judged,
        "dropped": sum(a["dropped"] for a in acc.values()),
        "missed": summary.counters["missed_rejects"],
        "unjudged_at_stop": sum(a["unjudged_at_stop"] for a in acc.values()),
        "lost": sum(a["lost"] for a in acc.values()),
        "unaccounted": unaccounted, "records_lost": lost,
        "reject_rows_missing": max(0, len(fired) - reject_rows),
        "phantom_rejects": phantom, "wrong_part_rejects": wrong,
        "rejects_fired": len(fired), "corrupt": summary.counters["corrupt"],
        "parts_not_captured": sum(a["parts_not_captured"] for a in acc.values()),
        "outcome": summary.outcome.name.lower(),
    }


# --------------------------------------------------------------------------- the faults


def producer_sigkill(folder: Path, model: Path, runner, quick: bool) -> dict:
    """SIGKILL the producer mid-run; the line restarts it (the belt kept moving)."""
    run = Running(line_config(folder, model, frames=None), runner).start()
    run.wait_judged(20)
    state = run.line.supervisor.producers["belt"]
    received = run.line.worker.inboxes[0].stats.received
    killed_at = time.monotonic()
    os.kill(state.proc.pid, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while (state.restarts == 0 or run.line.worker.inboxes[0].stats.received <= received + 5) \
            and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(2.0 if quick else 5.0)
    run.line.request_stop(signal.SIGINT)
    summary = run.join()
    row = audit(folder, summary)
    row["recover_s"] = _first_new_frame_s(run, killed_at, state)
    row["note"] = f"restarts {state.restarts}"
    return row


def _first_new_frame_s(run: Running, killed_at: float, state) -> float | None:
    # The restarted producer's frames jump in seq (the belt moved on); the first judged
    # frame after the kill whose seq jumped is the new producer's.
    results = [json.loads(x) for x in
               (Path(run.line.results_path)).read_text().splitlines() if x]
    seqs = [r["seq"] for r in results]
    jump = next((i for i in range(1, len(seqs)) if seqs[i] - seqs[i - 1] > 1), None)
    if jump is None:
        return None
    # Sample i where judged first exceeded `jump`.
    for when, judged, _ in run.samples:
        if when > killed_at and judged > jump:
            return round(when - killed_at, 2)
    return None


def camera_stall(folder: Path, model: Path, runner, quick: bool) -> dict:
    """The camera delivers nothing for 5 s while its producer lives (heartbeats go on)."""
    frames = 140 if quick else 240
    run = Running(line_config(folder, model, frames=frames, stall=[40, 5.0]), runner).start()
    summary = run.join()
    row = audit(folder, summary)
    # The longest pause between judged frames, less the 5 s the camera was stalled.
    times = [t for t, j, _ in _increments(run.samples)]
    gaps = np.diff(times) if len(times) > 1 else np.array([0.0])
    row["recover_s"] = round(float(gaps.max()) - 5.0, 2)
    alarms = [a for a in run.line.worker.alarms if a.kind == "source_down"]
    row["note"] = f"DOWN alarms {len(alarms)}"
    return row


def _increments(samples):
    last = -1
    for when, judged, received in samples:
        if judged > last:
            yield when, judged, received
            last = judged


def corrupt_1pct(folder: Path, model: Path, runner, quick: bool) -> dict:
    """One garbage message per hundred frames, pushed into the source's live socket."""
    import msgpack
    import zmq

    from edge import protocol

    frames = 150 if quick else 400
    run = Running(line_config(folder, model, frames=frames), runner).start()
    run.wait_judged(1)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 1000)
    sock.connect(run.line.plans[0].endpoint)
    rng = np.random.default_rng(0)
    sent = 0
    good = msgpack.unpackb(bytes(protocol.encode(
        protocol.Heartbeat("belt", 0, 1, 0, 0, 0, 0), run_id=run.line.token)[0]))
    # One per hundred frames, while the line still has most of its frames to judge: garbage
    # sent into a stream that is ending may never be read, which would say nothing.
    while run.line.worker.stats.frames < 0.7 * frames and sent < frames // 100 + 1:
        kind = sent % 3
        if kind == 0:
            parts = [rng.integers(0, 256, 64, np.uint8).tobytes()]        # not msgpack
        elif kind == 1:
            parts = [msgpack.packb({**good, "seq": "seven"})]             # a field mistyped
        else:
            parts = [msgpack.packb(good), b"unexpected second part"]      # wrong part count
        sock.send_multipart(parts)
        sent += 1
        time.sleep(100 / FPS)                                             # one per 100 frames
    summary = run.join()
    sock.close()
    ctx.term()
    row = audit(folder, summary)
    row["recover_s"] = 0.0
    row["note"] = f"injected {sent}, counted corrupt {summary.counters['corrupt']}"
    return row


def overload(folder: Path, model: Path, runner, quick: bool, policy: str, rate: float) -> dict:
    """The belt at twice what the worker can judge, under one drop policy; the ejector still
    half a second downstream (further in counts: the belt is faster)."""
    seconds = 6 if quick else 15
    cfg = line_config(folder, model, frames=int(rate * seconds), fps=rate, policy=policy,
                      ejector_counts=int(0.5 * rate * 100))
    summary = Running(cfg, runner).start().join()
    row = audit(folder, summary)
    row["recover_s"] = None
    row["note"] = f"belt {rate:.0f} parts/s"
    return row


class LateRunner:
    """The real runner, made late on purpose: every 50th call waits 0.7 s first (a stalled
    device). The frames captured early in the stall get their verdicts after their parts
    passed the ejector (0.5 s away); the line catches up between stalls."""

    def __init__(self, inner):
        self.inner, self.calls = inner, 0
        self.card, self.overlaps = inner.card, False
        self.backend = getattr(inner, "backend", "eager")

    def run(self, frames):
        return self.inner.run(frames)

    def submit(self, frames):
        self.calls += 1
        if self.calls % 50 == 0:
            time.sleep(0.7)
        return self.inner.submit(frames)


def late_verdict(folder: Path, model: Path, runner, quick: bool) -> dict:
    cfg = line_config(folder, model, frames=120 if quick else 300)
    cfg = dataclasses.replace(cfg, worker=dataclasses.replace(cfg.worker, max_batch=1,
                                                              latency_budget_ms=10_000.0))
    summary = Running(cfg, LateRunner(runner)).start().join()
    row = audit(folder, summary)
    row["recover_s"] = None
    row["note"] = "every 50th model call stalls 0.7 s; ejector 0.5 s away"
    return row


def main_sigkill(folder: Path, model: Path, runner, quick: bool) -> dict:
    """SIGKILL `grad-edge run` itself mid-run, then start it again on the same folder."""
    import yaml

    cfg = {"run_dir": "run", "model": {"path": str(model), "backend": "eager", "device": "cpu"},
           "sources": [{"id": "belt", "kind": "synthetic", "frames": None, "fps": FPS,
                        "seed": 0, "defect_every": 1, "size": [SIZE, SIZE]}],
           "worker": {"max_batch": 4, "max_wait_ms": 5},
           "rules": {"default": {"threshold": 0.0}},
           "defect_log": {"url": "sqlite:///run/defects.db", "images": "run/images"},
           "reject": {"camera_to_ejector_counts": EJECTOR_COUNTS, "tolerance_counts": TOLERANCE,
                      "sinks": [{"kind": "jsonl", "path": "run/rejects.jsonl"}]},
           "status_interval_s": 0}
    (folder / "line.yaml").write_text(yaml.safe_dump(cfg))
    run_dir = folder / "run"
    cmd = [sys.executable, "-m", "edge.cli", "run", str(folder / "line.yaml")]

    def judged() -> list[dict]:
        # Every run's results-<run id>.jsonl (results.jsonl points at the latest only).
        return [json.loads(x) for path in sorted(run_dir.glob("results-*.jsonl"))
                for x in path.read_text().splitlines() if x.endswith("}")]

    first = subprocess.Popen(cmd, cwd=folder, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while len(judged()) < 30 and time.monotonic() < deadline:
        time.sleep(0.05)
    first.kill()
    first.wait()
    killed_rows = judged()
    restarted = time.monotonic()
    second = subprocess.Popen(cmd, cwd=folder, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
    while len(judged()) <= len(killed_rows) and time.monotonic() < restarted + 120:
        time.sleep(0.02)
    recover = time.monotonic() - restarted
    time.sleep(3.0)
    second.send_signal(signal.SIGINT)
    out, err = second.communicate(timeout=120)
    summary_json = json.loads((run_dir / "summary.json").read_text())
    db = sqlite3.connect(run_dir / "defects.db")
    columns = {row[1] for row in db.execute("PRAGMA table_info(runs)")}
    runs = db.execute("SELECT id, " + ("status" if "status" in columns else "stopped_at")
                      + " FROM runs ORDER BY id").fetchall()
    # The killed run: every DEFECT it wrote to results.jsonl has exactly one row.
    lost = 0
    for r in killed_rows:
        if r["verdict"] != "OK":
            n = db.execute("SELECT COUNT(*) FROM defects WHERE id = ?",
                           (r["defect_id"],)).fetchone()[0]
            lost += n != 1
    db.close()
    second_rows = judged()[len(killed_rows):]
    fired = [json.loads(x) for x in (run_dir / "rejects.jsonl").read_text().splitlines()
             if x and "alarm" not in x]
    rejected2 = {(r["source_id"], r["seq"]) for r in second_rows if r["reject"]}
    rejected1 = {(r["source_id"], r["seq"]) for r in killed_rows if r["reject"]}
    phantom = sum(1 for x in fired if (x["source_id"], x["seq"]) not in rejected1 | rejected2)
    wrong = sum(1 for x in fired if not 0 <= x["fired_position"] - x["due_encoder"] <= TOLERANCE)
    acc = summary_json["counters"]["accounting"]["belt"]
    return {
        "produced": acc["captured"], "judged": acc["judged"], "dropped": acc["dropped"],
        "missed": summary_json["counters"]["missed_rejects"],
        "unjudged_at_stop": acc["unjudged_at_stop"], "lost": acc["lost"],
        "unaccounted": acc["unaccounted"] + abs(len(second_rows) - acc["judged"]),
        "records_lost": lost, "phantom_rejects": phantom, "wrong_part_rejects": wrong,
        "rejects_fired": len(fired), "corrupt": summary_json["counters"]["corrupt"],
        "outcome": summary_json["outcome"], "recover_s": round(recover, 2),
        "note": f"killed run judged {len(killed_rows)}; runs {runs}; second run exit "
                f"{second.returncode}",
    }


def db_locked(folder: Path, model: Path, runner, quick: bool) -> dict:
    """Another process holds the database's write lock for 10 s mid-run (an operator's
    long export, a backup): the line goes on, the writer keeps every record and catches up."""
    frames = 200 if quick else 400
    run = Running(line_config(folder, model, frames=frames), runner).start()
    run.wait_judged(20)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sqlite3, sys, time\n"
        "db = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=30)\n"
        "db.execute('BEGIN EXCLUSIVE')\n"
        "print('locked', flush=True)\n"
        "time.sleep(10)\n"
        "db.execute('COMMIT')\n"), str(folder / "defects.db")], stdout=subprocess.PIPE,
        text=True)
    holder.stdout.readline()
    judged_at_lock = run.line.worker.stats.frames
    holder.wait(60)
    released = time.monotonic()
    writer = run.line.writer
    while writer.pending and time.monotonic() < released + 60:
        time.sleep(0.02)
    caught_up = time.monotonic() - released
    summary = run.join()
    row = audit(folder, summary)
    row["recover_s"] = round(caught_up, 2)
    row["note"] = (f"judged {summary.counters['frames'] - judged_at_lock} frames while locked "
                   "or after; writer caught up in recover_s")
    return row


def disk_full(folder: Path, model: Path, runner, quick: bool) -> dict:
    """The defect log's disk fills up mid-run (a real 8 MiB tmpfs, filled by a file), stays
    full for 5 s, then space is freed: no record may be lost."""
    disk = folder / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(disk)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        return {"error": f"cannot mount a tmpfs here ({mounted.stderr.strip()}); run as root"}
    try:
        frames = 200 if quick else 400
        cfg = line_config(folder, model, frames=frames, db_url=f"sqlite:///{disk / 'defects.db'}")
        cfg = dataclasses.replace(cfg, defect_log=dataclasses.replace(
            cfg.defect_log, images=str(disk / "images")))
        run = Running(cfg, runner).start()
        run.wait_judged(20)
        filler = disk / "filler"
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT)    # fill every free byte
        try:
            while True:
                os.write(fd, b"\0" * 65536)
        except OSError:
            pass
        finally:
            os.close(fd)
        time.sleep(5.0)
        filler.unlink()
        freed = time.monotonic()
        writer = run.line.writer
        while writer.pending and time.monotonic() < freed + 60:
            time.sleep(0.02)
        caught_up = time.monotonic() - freed
        summary = run.join()
        row = audit(folder, summary, db_path=disk / "defects.db")
        row["recover_s"] = round(caught_up, 2)
        row["note"] = "disk full 5 s under the defect log and the saved images"
        return row
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


FAULTS = {
    "producer_sigkill": producer_sigkill,
    "main_sigkill_restart": main_sigkill,
    "camera_stall_5s": camera_stall,
    "database_locked_10s": db_locked,
    "disk_full": disk_full,
    "corrupt_1pct": corrupt_1pct,
    "overload_2x_every_frame": None,     # filled in main(): they need the measured rate
    "overload_2x_latest": None,
    "late_verdict": late_verdict,
}


# --------------------------------------------------------------------------- soak


def soak(folder: Path, model: Path, runner, minutes: float) -> dict:
    """An endless line for `minutes`: RSS and open files of the line and its producer, each
    minute, and their slopes (a leak shows as a steady climb)."""
    run = Running(line_config(folder, model, frames=None, fps=10.0), runner,
                  sample=False).start()
    run.wait_judged(10)
    samples = []
    start = time.monotonic()
    while time.monotonic() - start < minutes * 60:
        procs = [os.getpid()] + [s.proc.pid for s in run.line.supervisor.producers.values()
                                 if s.proc is not None and s.proc.is_alive()]
        samples.append({"minute": round((time.monotonic() - start) / 60, 2),
                        "rss_mb": round(sum(_rss_kb(p) for p in procs) / 1024, 1),
                        "open_fds": sum(len(os.listdir(f"/proc/{p}/fd")) for p in procs),
                        "judged": run.line.worker.stats.frames})
        log.info("soak: %s", samples[-1])
        time.sleep(min(60.0, max(1.0, minutes * 60 / 10)))
    run.line.request_stop(signal.SIGINT)
    summary = run.join()
    minutes_x = np.array([s["minute"] for s in samples])
    slope = (lambda k: float(np.polyfit(minutes_x, [s[k] for s in samples], 1)[0])
             if len(samples) > 1 else None)
    return {"minutes": minutes, "samples": samples, "rss_mb_per_min": slope("rss_mb"),
            "fds_per_min": slope("open_fds"), "audit": audit(folder, summary)}


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


# --------------------------------------------------------------------------- main


COLUMNS = ("produced", "judged", "dropped", "missed", "unaccounted", "records_lost",
           "phantom_rejects", "wrong_part_rejects", "recover_s")


def print_table(rows: dict) -> None:
    heads = ("fault", "produced", "judged", "dropped", "missed", "unacc", "rec lost",
             "phantom", "wrong", "recover s")
    print(f"{heads[0]:<26}" + "".join(f"{h:>10}" for h in heads[1:]))
    for name, row in rows.items():
        if "error" in row:
            print(f"{name:<26}  ERROR {row['error']}")
            continue
        cells = [row.get(c) for c in COLUMNS]
        print(f"{name:<26}" + "".join(f"{'-' if v is None else v:>10}" for v in cells)
              + f"   {row.get('note', '')}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer frames per fault")
    ap.add_argument("--only", nargs="*", choices=sorted(FAULTS),
                    help="run these faults only (none: just the soak)")
    ap.add_argument("--minutes", "--soak-minutes", dest="soak_minutes", type=float, default=0.0,
                    help="also run the soak for this many minutes (30 for the record)")
    ap.add_argument("--out", type=Path, default=RESULTS / "faults.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("edge", "camera_sources", "deploy", "grad"):
        logging.getLogger(noisy).setLevel(logging.CRITICAL)

    from deploy.runner import open_runner

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gefaults-") as tmp:
        tmp = Path(tmp)
        model = tiny_model(tmp)
        runner = open_runner(model, backend="eager", device="cpu")
        rate = measure_rate(tmp / "rate", model, runner)
        log.info("the worker judges %.1f frames/s here; overload runs the belt at %.0f",
                 rate, 2 * rate)
        faults = dict(FAULTS)
        faults["overload_2x_every_frame"] = lambda f, m, r, q: overload(
            f, m, r, q, "every_frame", 2 * rate)
        faults["overload_2x_latest"] = lambda f, m, r, q: overload(f, m, r, q, "latest", 2 * rate)
        rows = {}
        for name in list(faults) if args.only is None else args.only:
            folder = tmp / name
            folder.mkdir()
            log.info("fault: %s", name)
            t = time.perf_counter()
            try:
                rows[name] = faults[name](folder, model, runner, args.quick)
            except Exception as exc:      # a fault row that breaks is reported, not hidden
                log.exception("fault %s failed", name)
                rows[name] = {"error": f"{type(exc).__name__}: {exc}"}
            rows[name]["seconds"] = round(time.perf_counter() - t, 1)
        soak_result = soak(tmp / "soak", model, runner, args.soak_minutes) \
            if args.soak_minutes > 0 else None
    print_table(rows)
    if soak_result:
        print(f"soak {soak_result['minutes']:g} min: RSS slope "
              f"{soak_result['rss_mb_per_min']:.3f} MB/min, open fds slope "
              f"{soak_result['fds_per_min']:.3f}/min")
    must_be_zero = ("unaccounted", "records_lost", "phantom_rejects", "wrong_part_rejects")
    failures = {n: {k: r[k] for k in must_be_zero if r.get(k)} for n, r in rows.items()
                if "error" in r or any(r.get(k) for k in must_be_zero)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "command": " ".join(["python"] + sys.argv), "quick": args.quick,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform()},
        "worker_rate_fps": rate, "belt_fps": FPS, "ejector_counts": EJECTOR_COUNTS,
        "tolerance_counts": TOLERANCE, "rows": rows, "soak": soak_result,
        "must_be_zero_failures": failures,
        "total_minutes": round((time.perf_counter() - started) / 60, 1),
    }, indent=2))
    print(f"wrote {args.out}")
    return 1 if failures else 0


def measure_rate(folder: Path, model: Path, runner) -> float:
    """Frames/s the worker judges with the belt far faster than it: the overload baseline."""
    folder.mkdir()
    cfg = line_config(folder, model, frames=80, fps=1000.0, belt=False)
    run = Running(cfg, runner).start()
    run.join()
    inc = list(_increments(run.samples))
    if len(inc) < 2:
        return 10.0
    (t0, j0, _), (t1, j1, _) = inc[len(inc) // 4], inc[-1]
    return (j1 - j0) / max(t1 - t0, 1e-9)


if __name__ == "__main__":
    sys.exit(main())
