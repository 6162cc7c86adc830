"""A whole line from a `LineConfig`: sources checked, producers supervised, the worker, the
reject scheduler on the live belt, the status display, and a summary that accounts for every
frame.

`Line.run()` is what `grad-edge run` and `grad-edge replay` call. In order:

1. **Start-up checks.** Every source is probed (a missing or undecodable video, an empty
   folder, a camera that does not answer within its retry policy): one error naming the key
   and the file, and no run is opened.
2. **Plan.** Per source: an ipc endpoint in a private socket folder made for this run (and
   the run's token in every message's header), the belt it rides on (a
   simulated belt shared with its producer, or a Modbus encoder), its reject timing, and its
   latency budget (by default the time from camera to ejector at the belt's speed, less a
   margin).
3. **Run.** The defect log opens the run (closing any run a crashed line left open), the
   reject scheduler watches the belts on its own thread, the producers start (they die with
   this process), and the worker judges until every source has ended.
4. **Stop.** Ctrl-C or SIGTERM: the producers stop capturing and send end-of-stream; the
   worker judges what has arrived for up to ``drain_s``; a second signal stops at once.
   Pending rejects fire as their parts reach the ejector, or are missed.
5. **Account.** Per source: captured = judged + dropped + unjudged at stop (+ lost with a
   killed producer). The exit code says how the run ended (:class:`RunOutcome`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing as mp
import shutil
import signal
import socket
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from camera_sources.base import SourceSpec
from camera_sources.encoder import EncoderInput, ModbusEncoder, SimulatedBelt
from camera_sources.probe import SourceInfo, SourceUnavailable, probe_source
from edge.config import (ConfigError, EncoderKind, LineConfig, Pace, SinkConfig, SourceConfig,
                         SourceKind, Transport, worker_keys)
from edge.defect_log import DefectLogWriter, ImageStore
from edge.defect_log.engine import display_name
from edge.keep import NearThresholdKeeper
from edge.live import LiveFrames
from edge.metrics import LineCollector, LinePublisher, MetricsServer
from edge.products import ProductCheck
from edge.hello import HelloService
from edge.protocol import default_endpoint, new_run_id
from edge.reject import RejectScheduler, RejectTiming
from edge.rules import RuleConfig, RuleEngine
from edge.sinks import GpioSink, JsonlSink, ModbusCoilSink, RejectSink, ZmqPubSink
from edge.summary import RunOutcome, RunSummary, account
from edge.supervisor import ProducerSupervisor
from edge.worker import SourceSetup, Worker

log = logging.getLogger(__name__)


# --- 1. start-up checks -----------------------------------------------------------------------

def check_sources(cfg: LineConfig) -> dict[str, SourceInfo]:
    """Probe every source; a source that cannot deliver a frame is a config error."""
    infos = {}
    for i, s in enumerate(cfg.sources):
        if s.transport is Transport.TCP:
            continue          # on a camera host: `grad-edge produce` probes it there
        key = {SourceKind.VIDEO: "path", SourceKind.FOLDER: "path",
               SourceKind.CAMERA: "device"}.get(s.kind)
        try:
            infos[s.id] = probe_source(source_spec(s), attempts=s.open_attempts)
        except SourceUnavailable as exc:
            where = f"sources[{i}]" + (f".{key}" if key else "")
            raise ConfigError(f"{cfg.source_file or 'config'}: {where} (source {s.id!r}): "
                              f"{exc}") from None
    return infos


# --- 2. the plan ------------------------------------------------------------------------------

@dataclass(frozen=True)
class SourcePlan:
    """How one source is wired for this run."""

    config: SourceConfig
    spec: SourceSpec                 # what its producer process builds
    endpoint: str                    # where its producer pushes (unique to the run)
    encoder: EncoderInput | None     # the live belt position, for the reject scheduler
    timing: RejectTiming
    latency_budget_ms: float | None
    restartable: bool

    @property
    def time_to_ejector_s(self) -> float | None:
        if isinstance(self.encoder, SimulatedBelt) and self.timing.camera_to_ejector_counts:
            return self.timing.camera_to_ejector_counts / self.encoder.counts_per_s
        if self.timing.camera_to_ejector_counts is None and self.timing.delay_s > 0:
            return self.timing.delay_s
        return None


def source_spec(s: SourceConfig, belt: SimulatedBelt | None = None) -> SourceSpec:
    """Config section -> the producer's constructor arguments."""
    enc = {"counts_per_frame": s.encoder.counts_per_frame,
           "frames_per_part": s.encoder.frames_per_part}
    if belt is not None:
        enc["belt"] = belt
    if s.kind is SourceKind.SYNTHETIC:
        opts = {"seed": s.seed, "size": tuple(s.size), "defect_every": s.defect_every,
                "n_frames": s.frames, "fps": s.fps, "stall": s.stall, **enc}
    elif s.kind is SourceKind.VIDEO:
        opts = {"path": s.path, "pace": s.pace.value, "fps": s.fps, "loop": s.loop, **enc}
    elif s.kind is SourceKind.FOLDER:
        opts = {"root": s.path, "fps": None if s.pace is Pace.FAST else s.fps,
                "loop": s.loop, "label_from_path": True, **enc}
    else:
        device = int(s.device) if str(s.device).isdigit() else s.device
        opts = {"device": device}
        if s.encoder.kind is EncoderKind.MODBUS:
            opts["encoder"] = _modbus_spec(s)
            opts["counts_per_part"] = s.encoder.counts_per_part
    return SourceSpec(s.kind.value, s.id, opts)


def _modbus_spec(s: SourceConfig):
    from camera_sources.encoder import EncoderSpec

    e = s.encoder
    return EncoderSpec("modbus", {"host": e.host, "port": e.port, "unit": e.unit,
                                  "register": e.register})


def _belt_fps(s: SourceConfig, info: SourceInfo | None) -> float | None:
    """Frames per second of a source that rides a simulated belt; None when it has none."""
    if s.encoder.kind is not EncoderKind.SIMULATED or s.encoder.counts_per_frame <= 0:
        return None
    if s.kind is SourceKind.SYNTHETIC:
        return s.fps
    if s.kind in (SourceKind.VIDEO, SourceKind.FOLDER) and s.pace is not Pace.FAST:
        return s.fps if s.pace is Pace.FIXED or s.kind is SourceKind.FOLDER else (
            info.fps if info else None)
    return None      # a replay (pace fast): the footage is the belt; a camera: no simulation


def plan_sources(cfg: LineConfig, sockets: Path, infos: dict[str, SourceInfo],
                 ctx) -> list[SourcePlan]:
    plans = []
    r = cfg.reject
    for s in cfg.sources:
        fps = _belt_fps(s, infos.get(s.id))
        belt = SimulatedBelt(fps * s.encoder.counts_per_frame, ctx=ctx) if fps else None
        live: EncoderInput | None = belt
        pitch = s.encoder.counts_per_frame * s.encoder.frames_per_part
        if s.encoder.kind is EncoderKind.MODBUS:
            e = s.encoder
            live = ModbusEncoder(e.host, e.port, e.unit, e.register)
            pitch = e.counts_per_part
        timed_by_counts = (r.camera_to_ejector_counts is not None
                           and s.encoder.kind is not EncoderKind.NONE)
        timing = RejectTiming(
            r.camera_to_ejector_counts if timed_by_counts else None, r.delay_s,
            tolerance_counts=r.tolerance_counts if r.tolerance_counts is not None else pitch // 2,
            tolerance_s=r.tolerance_ms / 1000.0)
        restartable = s.restart if s.restart is not None else s.kind in (
            SourceKind.CAMERA, SourceKind.SYNTHETIC)
        endpoint = (f"tcp://{cfg.network.listen}:{s.port or '*'}"
                    if s.transport is Transport.TCP else default_endpoint(f"src-{s.id}", sockets))
        plan = SourcePlan(s, source_spec(s, belt), endpoint, live, timing, None,
                          restartable and s.transport is not Transport.TCP)
        plans.append(_with_budget(plan, cfg))
    return plans


def _with_budget(plan: SourcePlan, cfg: LineConfig) -> SourcePlan:
    """The latency budget: configured, or the time to the ejector less the margin."""
    import dataclasses

    if cfg.worker.latency_budget_ms is not None:
        return dataclasses.replace(plan, latency_budget_ms=cfg.worker.latency_budget_ms)
    to_ejector = plan.time_to_ejector_s
    if to_ejector is None:
        return plan
    budget = 1000.0 * to_ejector - cfg.reject.decision_margin_ms
    if budget <= 0:
        raise ConfigError(
            f"{cfg.source_file or 'config'}: reject: the ejector is {1000 * to_ejector:.0f} ms "
            f"from source {plan.config.id!r}'s camera, which leaves no time to decide after "
            f"decision_margin_ms {cfg.reject.decision_margin_ms:.0f}; move the ejector "
            "further (camera_to_ejector_counts / delay_s) or slow the belt")
    return dataclasses.replace(plan, latency_budget_ms=budget)


def build_sink(cfg: SinkConfig) -> RejectSink:
    if cfg.kind == "jsonl":
        return JsonlSink(cfg.path)
    if cfg.kind == "zmq_pub":
        return ZmqPubSink(cfg.endpoint)
    if cfg.kind == "modbus":
        return ModbusCoilSink(cfg.host, cfg.port, unit=cfg.unit, coil=cfg.coil,
                              pulse_ms=cfg.pulse_ms, alarm_coil=cfg.alarm_coil)
    return GpioSink(cfg.chip, cfg.line, cfg.pulse_ms)


def rule_config(settings, latency_budget_ms) -> RuleConfig:
    return RuleConfig(threshold=settings.threshold, k=settings.k, n=settings.n,
                      min_area_px=settings.min_area_px, roi_mask=settings.roi_mask,
                      cooldown_s=settings.cooldown_s, unknown_rejects=settings.unknown_rejects,
                      latency_budget_ms=latency_budget_ms)


def _close_all(sinks: list[RejectSink]) -> None:
    for sink in sinks:
        try:
            sink.close()
        except Exception:
            log.exception("reject sink %s failed to close", sink.name)


def socket_dir() -> Path:
    """A fresh folder for this run's ipc sockets: short (a unix socket path must stay under
    107 bytes, whatever the run folder), private (mode 0700: only this user can push frames)
    and new for every run (a producer left over from another run cannot reach this one)."""
    return Path(tempfile.mkdtemp(prefix="grad-edge-"))


# --- 3-5. the run -----------------------------------------------------------------------------

class Line:
    def __init__(self, cfg: LineConfig, runner, *, results_name: str = "results.jsonl",
                 drain_s: float = 5.0):
        self.cfg = cfg
        self.runner = runner
        self.run_dir = Path(cfg.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        # Each run writes results-<run id>.jsonl; `results_name` always points at the latest.
        self.results_name = results_name
        self.results_path = self.run_dir / results_name
        self.drain_s = drain_s
        self.stop_event = threading.Event()       # the worker stops judging
        self._mp = mp.get_context("spawn")         # fresh interpreters: no forked torch/zmq
        self._producer_stop = self._mp.Event()
        self.token = new_run_id()                  # this run, in every message's header
        self.sockets: Path | None = None           # this run's private ipc folder
        self.signal: int | None = None             # the signal that stopped the run
        self.stop_reason: str | None = None        # why the line stopped itself
        self.supervisor: ProducerSupervisor | None = None
        self.hello: HelloService | None = None     # remote producers ask it for the run
        # The run's parts, for a caller watching it from another thread (benchmarks/faults.py).
        self.worker: Worker | None = None
        self.writer: DefectLogWriter | None = None
        self.plans: list[SourcePlan] = []
        self.product_check: ProductCheck | None = None   # a unified model's (edge.products)
        # What the line publishes (metrics, health, live frames): for the metrics port and
        # the operator station; attached once the run's worker exists.
        self.publisher = LinePublisher()
        self.metrics: LineCollector | None = None
        self.metrics_server: MetricsServer | None = None

    # -- stopping

    def request_stop(self, signum: int | None = None, reason: str | None = None) -> None:
        """First call: producers stop, the worker drains for ``drain_s``. Second: stop now.
        Safe from a signal handler (sets events, starts one timer)."""
        if self._producer_stop.is_set():
            self.stop_event.set()
            return
        self.signal = self.signal or signum
        self.stop_reason = self.stop_reason or reason
        if self.supervisor is not None:
            self.supervisor.stopping = True
        if self.hello is not None:
            self.hello.state = "stopping"          # remote producers stop at their next hello
        self._producer_stop.set()
        timer = threading.Timer(self.drain_s, self.stop_event.set)
        timer.daemon = True
        timer.start()

    # -- the watch thread: status line, producers, progress

    def _watch(self, worker: Worker, writer: DefectLogWriter, run_id: int) -> None:
        interval = self.cfg.status_interval_s
        next_status = time.monotonic() + (interval or 1.0)
        next_progress = time.monotonic() + 2.0
        inboxes = {i.source_id: i for i in worker.inboxes}
        while not self.stop_event.wait(0.2):
            for sid, what in self.supervisor.check(inboxes):
                worker.source_alarm("producer_died", sid, what)
                if self.supervisor.producers[sid].failed:
                    worker.end_source(sid)
            for sid, state in self.supervisor.producers.items():
                if state.restarts and sid not in worker.down_sources:
                    self.supervisor.healthy_again(sid)
                # A producer that gave up delivering its end-of-stream (the worker was too far
                # behind to read it) has exited: once its queue is judged, its stream is over.
                # Stopping, at once (no need to wait out the drain time); otherwise only for
                # one that finished its stream (exit code 0: not restarted, see the
                # supervisor) and after a second with nothing more from it.
                inbox = inboxes[sid]
                if (state.proc is not None and not state.proc.is_alive()
                        and inbox.end is None and not inbox.stats.ended
                        and not inbox.queue.qsize()
                        and (self.supervisor.stopping
                             or (state.proc.exitcode == 0
                                 and time.monotonic() - inbox.stats.last_seen > 1.0))):
                    if not self.supervisor.stopping:
                        log.warning("source %s: its producer finished, but its end-of-stream "
                                    "never reached the worker; the stream is taken as ended",
                                    sid)
                    worker.end_source(sid)
            if (self.cfg.reject.stop_line_on_missed and worker.stats.rejects_missed
                    and self.stop_reason is None):
                self.request_stop(reason="stopped at the first missed reject "
                                         "(reject.stop_line_on_missed)")
            now = time.monotonic()
            if interval > 0 and now >= next_status:
                counters = worker.counters()
                log.info("status: %s", status_line(counters))
                self._write_status(counters)
                next_status = now + interval
            if now >= next_progress:
                writer_progress(writer, run_id, worker)
                next_progress = now + 2.0

    def run(self) -> RunSummary:
        cfg = self.cfg
        if cfg.worker.torch_threads:
            import torch   # here, not at the top: `grad-edge produce` imports this module

            torch.set_num_threads(cfg.worker.torch_threads)
        # Everything a bad config or a blind source can break is checked and built before a
        # run is opened in the log, so a failed start leaves no half-open run behind; what was
        # built by then (sockets folder, sinks, encoders, the writer) is released.
        infos = check_sources(cfg)
        self._curve, self._hello_keys = worker_keys(cfg)
        with contextlib.ExitStack() as built:
            self.sockets = socket_dir()
            built.callback(shutil.rmtree, self.sockets, ignore_errors=True)
            plans = plan_sources(cfg, self.sockets, infos, self._mp)
            for p in plans:
                if p.encoder is not None:
                    built.callback(p.encoder.close)
            # The default rule carries the sources' budget when they share one (what the
            # station shows as the line's budget); per-source rules always carry their own.
            budgets = {p.latency_budget_ms for p in plans}
            rules = RuleEngine(rule_config(cfg.rules.default,
                                           budgets.pop() if len(budgets) == 1 else None),
                               {p.config.id: rule_config(cfg.rules.per_source.get(
                                   p.config.id, cfg.rules.default), p.latency_budget_ms)
                                for p in plans},
                               checkpoint_threshold=self.runner.card.calibration.threshold,
                               # A unified model keeps a calibration per product; each source
                               # is judged against its own product's threshold.
                               source_thresholds={
                                   s.id: self.runner.card.calibration_for(s.product).threshold
                                   for s in cfg.sources if s.product is not None})
            if cfg.metrics.port is not None:   # a port in use is a start-up error, like a source
                try:
                    self.metrics_server = MetricsServer(self.publisher, bind=cfg.metrics.bind,
                                                        port=cfg.metrics.port).start()
                except OSError as exc:
                    raise ConfigError(f"{cfg.source_file or 'config'}: metrics.port "
                                      f"{cfg.metrics.port}: {exc}") from None
                built.callback(self.metrics_server.stop)
            images = ImageStore(cfg.defect_log.images, cfg.defect_log.retention_days,
                                cfg.defect_log.retention_gb)
            images.enforce_retention()
            sinks: list[RejectSink] = []
            built.callback(_close_all, sinks)
            for sink_cfg in cfg.reject.sinks:
                sinks.append(build_sink(sink_cfg))
            scheduler = RejectScheduler(
                sinks, per_source={p.config.id: p.timing for p in plans},
                encoders={p.config.id: p.encoder for p in plans if p.encoder is not None})
            writer = DefectLogWriter(cfg.defect_log.url,
                                     journal_fsync=cfg.defect_log.journal_fsync)
            writer.start()
            built.callback(writer.stop)
            run_id = writer.begin_run(model_hash=self.runner.card.model_hash,
                                      config_hash=cfg.config_hash, config_path=cfg.source_file,
                                      host=socket.gethostname())
            return self._run(run_id, plans, rules, images, scheduler, writer)

    def _run(self, run_id: int, plans: list[SourcePlan], rules: RuleEngine, images: ImageStore,
             scheduler: RejectScheduler, writer: DefectLogWriter) -> RunSummary:
        cfg = self.cfg
        setups = [SourceSetup(p.config.id, p.endpoint, p.config.drop_policy,
                              p.config.queue_size, p.config.roi, run_id=self.token,
                              max_frame_gap_s=p.config.max_frame_gap_s,
                              curve=self._curve.get(p.config.id),
                              ring=p.config.transport is Transport.SHM,
                              product=p.config.product) for p in plans]
        self.supervisor = ProducerSupervisor(self._mp, self._producer_stop, run_id=self.token)
        for p in plans:
            if p.config.transport is Transport.SHM:
                self.supervisor.add(p.spec, p.endpoint, p.config.drop_policy, p.restartable,
                                    ring_slots=p.config.ring_slots)
            elif p.config.transport is Transport.IPC:
                self.supervisor.add(p.spec, p.endpoint, p.config.drop_policy, p.restartable)
        worker: Worker | None = None
        keeper = live = None
        previous = {}
        start = time.monotonic()
        self.results_path = self.run_dir / f"results-{run_id}.jsonl"
        try:
            point_latest(self.run_dir / self.results_name, self.results_path)
            worker = Worker(self.runner, setups, rules, scheduler, writer, images,
                            max_batch=cfg.worker.max_batch, max_wait_ms=cfg.worker.max_wait_ms,
                            heartbeat_timeout_s=cfg.worker.heartbeat_timeout_s,
                            results_path=self.results_path, run_id=run_id)
            worker.stop_event = self.stop_event
            self.worker, self.writer, self.plans = worker, writer, plans
            keeper, live = self._publish(worker, writer, run_id)
            self.product_check = ProductCheck.for_line(self.runner, setups,
                                                       worker.source_alarm,
                                                       cfg.worker.product_check_every)
            if self.product_check is not None:
                worker.observers.append(self.product_check.observe)
                worker.after_batch.append(self.product_check.after_batch)
            # The first model call at each batch size pays for thread pools and allocations;
            # pay it before the producers start, so the first parts are not judged late.
            hw = self.runner.card.config.input_hw
            for batch in sorted({1, cfg.worker.max_batch}):
                self.runner.run(np.zeros((batch, *hw, 3), np.uint8))
            if self.product_check is not None:   # its first check comes with the first frame
                self.runner.route(np.zeros((1, *hw, 3), np.uint8))
            scheduler.start()
            if self._hello_keys is not None:
                self.hello = self._hello(worker, self._hello_keys)
            self.supervisor.start_all()
            log.info("run %d (%s): %d source(s), results -> %s, defects -> %s", run_id,
                     self.token, len(plans), self.results_path, display_name(cfg.defect_log.url))
            for p in plans:
                log.info("source %s: %s", p.config.id, describe_plan(p))
            if threading.current_thread() is threading.main_thread():
                for sig in (signal.SIGINT, signal.SIGTERM):
                    previous[sig] = signal.signal(sig, lambda signum, _: self.request_stop(signum))
            threading.Thread(target=self._watch, args=(worker, writer, run_id),
                             name="line-watch", daemon=True).start()
            start = time.monotonic()
            worker.run()
        finally:
            self.stop_event.set()
            self.supervisor.stop()
            if self.hello is not None:
                self.hello.close()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            # The belt keeps moving: rejects still pending fire when their part arrives.
            scheduler.close(drain_s=max([p.time_to_ejector_s or 0.0 for p in plans] + [0.0])
                            + 0.5)
            for part in (keeper, live):     # kept frames are logged before the run closes
                if part is not None:
                    part.stop()
            outcome = self._outcome(worker)
            counters = worker.counters() if worker is not None else {"error": "failed to start"}
            if worker is not None:
                counters["accounting"] = account(worker, self.supervisor)
            if self.metrics is not None:
                counters["truth"] = self.metrics.truth_score()
                counters["kept_frames"] = keeper.counts() if keeper is not None else {}
            counters["outcome"] = outcome.name.lower()
            counters["stop_reason"] = self.stop_reason
            writer.end_run(run_id, counters, status=outcome.run_status,
                           exit_code=outcome.exit_code)
            writer.stop()
            self.publisher.state = "ended"
        # display_name: a password in a database URL never reaches a log or summary.json.
        summary = RunSummary(run_id, time.monotonic() - start, counters,
                             display_name(cfg.defect_log.url),
                             str(self.results_path), outcome)
        text = json.dumps(summary.to_dict(), indent=2)
        (self.run_dir / f"summary-{run_id}.json").write_text(text)
        (self.run_dir / "summary.json").write_text(text)      # the latest run's
        return summary

    def _write_status(self, counters: dict) -> None:
        # The live counters as a file too: a supervisor of several worker processes adds
        # them up (edge.pool), and a plant's monitoring can read it.
        tmp = self.run_dir / "status.json.tmp"
        try:
            tmp.write_text(json.dumps({"time": time.time(), **counters}))
            tmp.replace(self.run_dir / "status.json")
        except OSError as exc:
            log.warning("could not write %s: %s", self.run_dir / "status.json", exc)

    def _publish(self, worker: Worker, writer: DefectLogWriter, run_id: int):
        """Metrics, live frames and the near-threshold keeper: the worker's observers."""
        cfg = self.cfg
        keeper = None
        if cfg.keep.band > 0:
            keeper = NearThresholdKeeper(
                writer, cfg.defect_log.images, band=cfg.keep.band,
                max_per_minute=cfg.keep.max_per_minute, run_id=run_id,
                retention_days=cfg.defect_log.retention_days,
                retention_gb=cfg.defect_log.retention_gb).start()
        live = LiveFrames(cfg.metrics.live_frames, cfg.metrics.live_per_s).start()
        self.metrics = LineCollector(
            worker, writer, supervisor=self.supervisor, run_id=run_id, run_token=self.token,
            model_hash=self.runner.card.model_hash, backend=getattr(self.runner, "backend", None),
            extra_counts={"kept": keeper.counts} if keeper is not None else None)
        worker.observers += [self.metrics.observe, live.observe]
        if keeper is not None:
            worker.observers.append(keeper.observe)
        self.publisher.attach(self.metrics, live)
        return keeper, live

    def _hello(self, worker: Worker, keys) -> HelloService:
        """The hello socket, once the tcp sources' sockets are bound (it tells their ports)."""
        ports = {sid: int(ep.rsplit(":", 1)[1]) for sid, ep in worker.endpoints.items()
                 if ep.startswith("tcp://")}
        net = self.cfg.network
        try:
            # The worker's context: one ZAP handler (CurveGate) serves all its CURVE sockets.
            inboxes = {i.source_id: i for i in worker.inboxes}
            hello = HelloService(worker._ctx, f"tcp://{net.listen}:{net.hello_port}",
                                 self.token, ports, keys,
                                 keys={sid: k.allowed for sid, k in self._curve.items()},
                                 ended=lambda sid: inboxes[sid].end is not None)
        except ValueError as exc:
            raise ConfigError(f"{self.cfg.source_file or 'config'}: network.hello_port: "
                              f"{exc}") from None
        return hello.start()

    def _outcome(self, worker: Worker | None) -> RunOutcome:
        if self.signal == signal.SIGINT:
            return RunOutcome.INTERRUPTED
        if self.signal == signal.SIGTERM:
            return RunOutcome.TERMINATED
        if worker is None or self.stop_reason or worker.failed_sources or any(
                s.failed for s in self.supervisor.producers.values()):
            return RunOutcome.FAILED
        return RunOutcome.COMPLETED


def describe_plan(p: SourcePlan) -> str:
    if p.config.transport is Transport.TCP:
        return (f"remote producer (grad-edge produce) over {p.endpoint} with CURVE, "
                + describe_timing(p))
    ring = "frame ring in shared memory, " if p.config.transport is Transport.SHM else ""
    belt = ("simulated belt %.0f counts/s" % p.encoder.counts_per_s
            if isinstance(p.encoder, SimulatedBelt) else
            "Modbus encoder" if p.encoder is not None else "no live encoder")
    return (f"{ring}{belt}, {describe_timing(p)}, "
            f"{'restarts' if p.restartable else 'fails'} if it dies")


def describe_timing(p: SourcePlan) -> str:
    if p.timing.camera_to_ejector_counts is not None:
        when = f"rejects {p.timing.camera_to_ejector_counts} counts after capture"
    else:
        when = f"rejects {p.timing.delay_s:.3f} s after capture"
    budget = ("no latency budget" if p.latency_budget_ms is None
              else f"latency budget {p.latency_budget_ms:.0f} ms")
    return f"{when}, {budget}"


def status_line(c: dict) -> str:
    p50 = "-" if c["latency_p50_ms"] is None else f"{c['latency_p50_ms']:.1f}"
    p99 = "-" if c["latency_p99_ms"] is None else f"{c['latency_p99_ms']:.1f}"
    flags = ""
    if c["down_sources"]:
        flags += f" DOWN={','.join(c['down_sources'])}"
    if c["silent_sources"]:
        flags += f" silent={','.join(c['silent_sources'])}"
    if c.get("refused_connections"):
        flags += f" REFUSED {c['refused_connections']}"
    return (f"{c['frames']} frames {c['fps']:.1f} fps latency p50 {p50} ms p99 {p99} ms "
            f"dropped {c['dropped'] + c['producer_dropped']} defects {c['defects']} unknown "
            f"{c['unknown']} rejects {c['rejects']} MISSED {c['missed_rejects']}{flags}")


def point_latest(link: Path, target: Path) -> None:
    """Make `link` (results.jsonl) a symlink to this run's file, atomically. A plain file of
    that name (written by an older grad-edge, every run appended) is kept, renamed."""
    if link.exists() and not link.is_symlink():
        kept = link.with_name(f"{link.stem}-before-run-files{link.suffix}")
        link.rename(kept)
        log.warning("%s held the results of earlier runs; kept as %s", link, kept)
    tmp = link.with_name(f".{link.name}.{target.stem}.tmp")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target.name)
    tmp.replace(link)


def writer_progress(writer: DefectLogWriter, run_id: int, worker: Worker) -> None:
    """The run's latest counters on its row, so a crash leaves what was known."""
    try:
        writer.note_progress(run_id, worker.counters())
    except Exception:
        log.exception("could not note the run's progress in the defect log")
