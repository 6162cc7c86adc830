"""Fixtures for the station's tests: a tiny real checkpoint, a real line (`grad-edge run
--serve`, a real process), a real defect log, a station served by uvicorn on a real socket,
and a real headless Chromium driven by selenium (Debian's chromium and chromium-driver)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
SIZE = 64


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """The `tiny` GRAD with real backbone weights and an untrained head (scores ~100)."""
    import torch

    from grad.checkpoint import Calibration, save_checkpoint
    from grad.config import get_config
    from grad.model import GRAD

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "tiny.pt"
    save_checkpoint(path, GRAD(get_config("tiny")).eval(),
                    Calibration(mean=0.0, std=1.0, threshold=1.0, n_images=10, rule="test"))
    return path


@pytest.fixture(scope="session")
def synthetic_threshold(tiny_checkpoint) -> float:
    """A threshold that flags about a third of the synthetic line's frames (seed 3, 64 px)."""
    from camera_sources.synthetic import SyntheticLine
    from deploy.runner import EagerRunner

    runner = EagerRunner(tiny_checkpoint, device="cpu")
    line = SyntheticLine(seed=3, size=(SIZE, SIZE), defect_every=5)
    scores = sorted(float(runner.run(line.render(s)[0][None]).scores[0]) for s in range(30))
    return (scores[19] + scores[20]) / 2


def line_yaml(folder: Path, model: Path, threshold: float, **extra) -> Path:
    cfg = {
        "run_dir": "run",
        "model": {"path": str(model), "backend": "eager", "device": "cpu"},
        "sources": [{"id": "belt", "kind": "synthetic", "frames": None, "fps": 15, "seed": 3,
                     "defect_every": 5, "size": [SIZE, SIZE], "max_frame_gap_s": 5}],
        "worker": {"max_batch": 4, "max_wait_ms": 5, "torch_threads": 1},
        "rules": {"default": {"threshold": threshold}},
        "defect_log": {"url": "sqlite:///run/defects.db", "images": "run/images"},
        "reject": {"sinks": [{"kind": "jsonl", "path": "run/rejects.jsonl"}]},
        "keep": {"band": 0.05, "max_per_minute": 60},
        "station": {"port": 0},
        "status_interval_s": 0,
        **extra,
    }
    path = folder / "line.yaml"
    path.write_text("# the line the station tests watch\n" + yaml.safe_dump(cfg))
    return path


class RunningLine:
    """`grad-edge run line.yaml --serve` as a real process; `url` is its station."""

    def __init__(self, config: Path, cwd: Path):
        self.config, self.cwd = config, cwd
        self.log = cwd / "line.log"
        self._log = open(self.log, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "edge.cli", "run", str(config),
                                      "--serve"], cwd=cwd, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self.url = self._wait_for_url()

    def _wait_for_url(self, timeout: float = 120) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = re.search(r"station: (http://127\.0\.0\.1:\d+/)", self.log.read_text())
            if found:
                return found[1]
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            time.sleep(0.1)
        raise AssertionError(f"no station URL within {timeout} s: " + self.log.read_text()[-3000:])

    @property
    def db(self) -> Path:
        return self.cwd / "run" / "defects.db"

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


@pytest.fixture
def short_dir():
    """A short folder under /tmp: ipc:// socket paths must stay under 107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="ge-st-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def running_line(tiny_checkpoint, synthetic_threshold):
    """One endless synthetic line with its station, shared by a module's browser tests."""
    folder = Path(tempfile.mkdtemp(prefix="ge-st-"))       # short: ipc socket paths
    line = RunningLine(line_yaml(folder, tiny_checkpoint, synthetic_threshold), folder)
    yield line
    line.stop()
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def browser():
    """A real headless Chromium (fresh profile, no network services) through selenium."""
    if not (CHROMIUM and CHROMEDRIVER):
        why = ("chromium and chromedriver not found: apt-get install -y chromium "
               "chromium-driver (.ci/run does)")
        if os.environ.get("CI"):
            pytest.fail(why)             # CI installs them: missing there is a broken CI
        pytest.skip(why)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="ge-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
                "--window-size=1280,1000"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


class ServedStation:
    """A station (create_app) on uvicorn in a thread, on a real socket."""

    def __init__(self, settings, port: int = 0):
        from station.server import StationServer

        self.server = StationServer(settings, port).start()
        self.url = f"http://127.0.0.1:{self.server.port}"
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.server.port), 1).close()
                break
            except OSError:
                time.sleep(0.05)

    def stop(self) -> None:
        self.server.stop()


@pytest.fixture
def serve_station():
    served: list[ServedStation] = []

    def start(settings, port: int = 0) -> ServedStation:
        served.append(ServedStation(settings, port))
        return served[-1]

    yield start
    for s in served:
        s.stop()


def write_jpeg(path: Path, seed: int = 0) -> Path:
    """A small real JPEG on disk."""
    import cv2

    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    cv2.imwrite(str(path), rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    return path
