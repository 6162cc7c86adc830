"""`grad-edge serve` in a process of its own, reading a running line (another real process)
only through the line's published metrics port."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import yaml

from tests.station.conftest import line_yaml


def wait_for(pattern: str, log: Path, proc: subprocess.Popen, timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = re.search(pattern, log.read_text())
        if found:
            return found[1]
        assert proc.poll() is None, log.read_text()[-3000:]
        time.sleep(0.1)
    raise AssertionError(f"{pattern!r} never appeared: " + log.read_text()[-3000:])


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_serve_shows_a_line_running_in_another_process_through_its_metrics_port(
        tiny_checkpoint, synthetic_threshold, short_dir):
    config = line_yaml(short_dir, tiny_checkpoint, synthetic_threshold,
                       metrics={"port": 0})
    line_log, station_log = short_dir / "line.log", short_dir / "station.log"
    with open(line_log, "wb") as out:
        line = subprocess.Popen([sys.executable, "-m", "edge.cli", "run", str(config)],
                                cwd=short_dir, stdout=out, stderr=subprocess.STDOUT)
    station = None
    try:
        metrics = wait_for(r"metrics: (http://127\.0\.0\.1:\d+)/metrics", line_log, line)
        served = yaml.safe_load(config.read_text())
        served["station"]["metrics_url"] = metrics + "/metrics"
        (short_dir / "station.yaml").write_text(yaml.safe_dump(served))
        with open(station_log, "wb") as out:
            station = subprocess.Popen([sys.executable, "-m", "edge.cli", "serve",
                                        str(short_dir / "station.yaml")], cwd=short_dir,
                                       stdout=out, stderr=subprocess.STDOUT)
        url = wait_for(r"station: (http://127\.0\.0\.1:\d+/)", station_log, station)
        deadline = time.monotonic() + 60
        while True:
            status, page = get(url + "fragment/line")
            frames = re.search(r'id="frames-belt">(\d+)<', page)
            if status == 200 and frames and int(frames[1]) > 0:
                break
            assert time.monotonic() < deadline, page[-2000:]
            time.sleep(0.5)
        assert f"from {metrics}" in page and 'id="state-belt">UP<' in page
        assert re.search(r'src="/live/belt/\d+\.jpg"', page)
        live = re.search(r'src="/live/belt/(\d+)\.jpg"', page)[1]
        with urllib.request.urlopen(f"{url}live/belt/{live}.jpg", timeout=10) as r:
            assert r.headers["content-type"] == "image/jpeg" and r.read(3) == b"\xff\xd8\xff"
        status, text = get(url + "metrics")
        assert status == 200 and "grad_edge_frames_total" in text
        assert get(url + "healthz")[0] == 200
    finally:
        for proc in (line, station):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    proc.kill()
    # Both stop on Ctrl-C: the line as interrupted (130), the station cleanly.
    assert line.returncode == 130 and station.returncode in (0, 130)
