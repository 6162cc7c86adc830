"""A whole line from a `LineConfig`: producer processes, the worker, the status display.

`Line.run()` is what `grad-edge run` and `grad-edge replay` call. It starts one process per
source (each pushes frames over ZeroMQ), runs the worker in this process, prints a status line
every `status_interval_s`, supervises the producers (a producer that dies without saying
end-of-stream is reported and its source closed), and stops cleanly on end of stream or on
Ctrl-C (SIGINT/SIGTERM set the stop event; producers get their own stop event and send EOS).
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import signal
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from camera_sources.base import SourceSpec, run_producer
from edge.config import LineConfig, SinkConfig, SourceConfig, SourceKind
from edge.defect_log import DefectLogWriter, ImageStore
from edge.protocol import default_endpoint
from edge.reject import (GpioSink, JsonlSink, ModbusCoilSink, RejectScheduler, RejectSink,
                         RejectTiming, ZmqPubSink)
from edge.rules import RuleConfig, RuleEngine
from edge.worker import SourceSetup, Worker

log = logging.getLogger(__name__)


def source_spec(s: SourceConfig) -> SourceSpec:
    """Config section -> the producer's constructor arguments."""
    enc = {"counts_per_frame": s.encoder.counts_per_frame,
           "frames_per_part": s.encoder.frames_per_part}
    if s.kind is SourceKind.SYNTHETIC:
        opts = {"seed": s.seed, "size": tuple(s.size), "defect_every": s.defect_every,
                "n_frames": s.frames, "fps": s.fps, **enc}
    elif s.kind is SourceKind.VIDEO:
        opts = {"path": s.path, "pace": s.pace.value, "fps": s.fps, "loop": s.loop, **enc}
    elif s.kind is SourceKind.FOLDER:
        opts = {"root": s.path, "fps": None if s.pace.value == "fast" else s.fps,
                "loop": s.loop, "label_from_path": True, **enc}
    else:
        device = int(s.device) if str(s.device).isdigit() else s.device
        opts = {"device": device}
    return SourceSpec(s.kind.value, s.id, opts)


def build_sink(cfg: SinkConfig) -> RejectSink:
    if cfg.kind == "jsonl":
        return JsonlSink(cfg.path)
    if cfg.kind == "zmq_pub":
        return ZmqPubSink(cfg.endpoint)
    if cfg.kind == "modbus":
        return ModbusCoilSink(cfg.host, cfg.port, unit=cfg.unit, coil=cfg.coil,
                              pulse_ms=cfg.pulse_ms)
    return GpioSink(cfg.chip, cfg.line, cfg.pulse_ms)


def rule_config(settings, latency_budget_ms) -> RuleConfig:
    return RuleConfig(threshold=settings.threshold, k=settings.k, n=settings.n,
                      min_area_px=settings.min_area_px, roi_mask=settings.roi_mask,
                      cooldown_s=settings.cooldown_s, unknown_rejects=settings.unknown_rejects,
                      latency_budget_ms=latency_budget_ms)


@dataclass(frozen=True)
class RunSummary:
    run_id: int
    seconds: float
    counters: dict
    database: str
    results: str


class Line:
    def __init__(self, cfg: LineConfig, runner, *, results_name: str = "results.jsonl"):
        self.cfg = cfg
        self.runner = runner
        self.run_dir = Path(cfg.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.results_path = self.run_dir / results_name
        self.stop_event = threading.Event()
        self._mp = mp.get_context("spawn")  # fresh interpreters: no forked torch/zmq state
        self._producer_stop = self._mp.Event()
        self.procs: dict[str, mp.Process] = {}

    def _status(self, worker: Worker) -> None:
        interval = self.cfg.status_interval_s
        while interval > 0 and not self.stop_event.wait(interval):
            c = worker.counters()
            p50 = "-" if c["latency_p50_ms"] is None else f"{c['latency_p50_ms']:.1f}"
            p99 = "-" if c["latency_p99_ms"] is None else f"{c['latency_p99_ms']:.1f}"
            silent = f" silent={','.join(c['silent_sources'])}" if c["silent_sources"] else ""
            log.info("status: %d frames %.1f fps latency p50 %s ms p99 %s ms dropped %d "
                     "defects %d unknown %d rejects %d%s", c["frames"], c["fps"], p50, p99,
                     c["dropped"] + c["producer_dropped"], c["defects"], c["unknown"],
                     c["rejects"], silent)
            self._supervise(worker)

    def _supervise(self, worker: Worker) -> None:
        """A producer that died without end-of-stream would leave the run waiting forever."""
        for sid, proc in self.procs.items():
            inbox = next(i for i in worker.inboxes if i.source_id == sid)
            if not proc.is_alive() and not inbox.stats.ended:
                if proc.exitcode not in (0, None):
                    log.error("producer %s died (exit code %s) without end of stream; "
                              "closing that source", sid, proc.exitcode)
                    worker.end_source(sid)

    def run(self) -> RunSummary:
        cfg = self.cfg
        card = self.runner.card
        if cfg.worker.torch_threads:
            torch.set_num_threads(cfg.worker.torch_threads)
        # Everything a bad config can break is built before a run is opened in the log, so a
        # failed start leaves no half-open run behind. Endpoints first: a run_dir too long for
        # a socket path is the most common of those failures.
        setups = [SourceSetup(s.id, default_endpoint(f"src-{s.id}", self.run_dir), s.drop_policy,
                              s.queue_size, s.roi) for s in cfg.sources]
        rules = RuleEngine(rule_config(cfg.rules.default, cfg.worker.latency_budget_ms),
                           {k: rule_config(v, cfg.worker.latency_budget_ms)
                            for k, v in cfg.rules.per_source.items()},
                           checkpoint_threshold=card.calibration.threshold,
                           source_thresholds={s.id: card.calibration_for(s.product).threshold
                                              for s in cfg.sources if s.product is not None})
        images = ImageStore(cfg.defect_log.images, cfg.defect_log.retention_days,
                            cfg.defect_log.retention_gb)
        images.enforce_retention()
        scheduler = RejectScheduler([build_sink(s) for s in cfg.reject.sinks],
                                    default_timing=RejectTiming(
                                        cfg.reject.camera_to_ejector_counts, cfg.reject.delay_s))
        writer = DefectLogWriter(cfg.defect_log.url)
        writer.start()
        run_id = writer.begin_run(model_hash=card.model_hash, config_hash=cfg.config_hash,
                                  config_path=cfg.source_file, host=socket.gethostname())
        worker: Worker | None = None
        previous = {}
        start = time.monotonic()
        try:
            worker = Worker(self.runner, setups, rules, scheduler, writer, images,
                            max_batch=cfg.worker.max_batch, max_wait_ms=cfg.worker.max_wait_ms,
                            latency_budget_ms=cfg.worker.latency_budget_ms,
                            heartbeat_timeout_s=cfg.worker.heartbeat_timeout_s,
                            results_path=self.results_path, run_id=run_id)
            worker.stop_event = self.stop_event
            # The first model call pays for thread pools and allocations; pay it before the
            # producers start, so the first parts are not judged late.
            self.runner.run(np.zeros((1, *card.config.input_hw, 3), np.uint8))
            for s in cfg.sources:
                proc = self._mp.Process(
                    target=run_producer, name=f"producer-{s.id}",
                    args=(source_spec(s), worker.endpoints[s.id], self._producer_stop),
                    kwargs={"policy": s.drop_policy}, daemon=True)
                proc.start()
                self.procs[s.id] = proc
            log.info("run %d: %d source(s), results -> %s, defects -> %s", run_id,
                     len(self.procs), self.results_path, cfg.defect_log.url)
            if threading.current_thread() is threading.main_thread():
                for sig in (signal.SIGINT, signal.SIGTERM):
                    previous[sig] = signal.signal(sig, lambda *_: self.stop_event.set())
            threading.Thread(target=self._status, args=(worker,), daemon=True).start()
            start = time.monotonic()
            worker.run()
        finally:
            self.stop_event.set()
            self._producer_stop.set()
            for proc in self.procs.values():
                proc.join(timeout=5)
                if proc.is_alive():
                    log.warning("producer %s did not stop in 5 s; terminating it", proc.name)
                    proc.terminate()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            scheduler.close()
            counters = worker.counters() if worker is not None else {"error": "failed to start"}
            writer.end_run(run_id, counters)
            writer.stop()
        summary = RunSummary(run_id, time.monotonic() - start, counters, cfg.defect_log.url,
                             str(self.results_path))
        (self.run_dir / "summary.json").write_text(json.dumps(summary.__dict__, indent=2))
        return summary


def format_summary(s: RunSummary) -> str:
    c = s.counters
    lat = ("-" if c["latency_p50_ms"] is None else
           f"p50 {c['latency_p50_ms']:.1f} ms, p99 {c['latency_p99_ms']:.1f} ms")
    return (f"run {s.run_id}: {c['frames']} frames in {s.seconds:.1f}s ({c['fps']:.1f} fps), "
            f"latency {lat}\n"
            f"  OK {c['ok']}, DEFECT {c['defects']}, UNKNOWN {c['unknown']}, rejects fired "
            f"{c['rejects']}, dropped {c['dropped'] + c['producer_dropped']}, corrupt "
            f"{c['corrupt']}\n"
            f"  defect log: {s.database}\n  per-frame results: {s.results}")
