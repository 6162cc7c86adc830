"""`edge.yaml`: the line's configuration, validated on load.

Every section is a frozen dataclass whose fields carry a one-line description (`doc`). The
loader walks the YAML against those dataclasses: unknown keys, wrong types and bad values are
rejected with the file, the key's path and what was expected, e.g.

    edge.yaml: sources[0].drop_policy: 'lates' is not one of: every_frame, latest

Relative paths in the file are relative to the file's folder, so a config can be run from
anywhere.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from edge.protocol import DropPolicy, check_source_id
from edge.security import ClientKeys, KeyFileError, ServerKeys, load_public, load_secret


class ConfigError(ValueError):
    """A config file that can't be used, with where and why."""


def doc(text: str, default=dataclasses.MISSING, factory=dataclasses.MISSING):
    """A dataclass field with its description (shown by `describe()` and in errors)."""
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata={"doc": text})
    return field(default=default, metadata={"doc": text})


class SourceKind(enum.Enum):
    SYNTHETIC = "synthetic"
    VIDEO = "video"
    CAMERA = "camera"
    FOLDER = "folder"


class Pace(enum.Enum):
    FILE = "file"     # the file's own frame rate
    FIXED = "fixed"   # `fps` frames per second
    FAST = "fast"     # as fast as the worker takes them (replay)


class Transport(enum.Enum):
    IPC = "ipc"   # the line starts the producer; frames over a private unix socket
    SHM = "shm"   # the same, the pixels in a shared-memory frame ring (edge.ring)
    TCP = "tcp"   # the producer runs on a camera host (`grad-edge produce`), over CURVE


class EncoderKind(enum.Enum):
    SIMULATED = "simulated"   # a belt at fps * counts_per_frame (synthetic, paced video/folder)
    MODBUS = "modbus"         # a real counter in two PLC holding registers (cameras)
    NONE = "none"             # no encoder: rejects timed by reject.delay_s after capture


@dataclass(frozen=True)
class EncoderConfig:
    kind: EncoderKind = doc("simulated | modbus | none: where the belt position comes from, "
                            "read live for reject timing", EncoderKind.SIMULATED)
    counts_per_frame: int = doc("simulated: encoder counts the belt moves between frames", 100)
    frames_per_part: int = doc("frames per part (part_id = seq // frames_per_part)", 1)
    host: str | None = doc("modbus: address of the PLC or counter module", None)
    port: int = doc("modbus: TCP port", 502)
    unit: int = doc("modbus: unit (slave) id", 1)
    register: int = doc("modbus: first of two holding registers holding the 32-bit count", 0)
    counts_per_part: int | None = doc("modbus: encoder counts from one part to the next", None)


@dataclass(frozen=True)
class SourceConfig:
    id: str = doc("source id, unique on the line; appears in every record")
    kind: SourceKind = doc("synthetic | video | camera | folder")
    drop_policy: DropPolicy = doc("every_frame (backpressure, nothing dropped) or latest "
                                  "(bounded queue, oldest dropped and counted)",
                                  DropPolicy.EVERY_FRAME)
    queue_size: int = doc("frames buffered in the worker for this source", 8)
    roi: list[int] | None = doc("[x0, y0, x1, y1] crop of the frame that the model sees", None)
    product: str | None = doc("the product this source sees: a unified model judges it by that "
                              "product's calibrated threshold (null = the model's default)", None)
    path: str | None = doc("video file (video) or image folder (folder)", None)
    device: str | None = doc("camera index, RTSP/HTTP URL or GStreamer pipeline (camera)", None)
    pace: Pace = doc("file | fixed | fast: how a video or folder is paced", Pace.FILE)
    fps: float | None = doc("frame rate for pace: fixed, and for the synthetic line", None)
    loop: bool = doc("start the video/folder again at its end", False)
    frames: int | None = doc("synthetic line: frames to produce (null = endless)", None)
    seed: int = doc("synthetic line: random seed (same frames every run)", 0)
    defect_every: int | None = doc("synthetic line: inject a defect every N frames", 10)
    size: list[int] = doc("synthetic line: [height, width] of a frame", factory=lambda: [256, 256])
    stall: list[float] | None = doc("synthetic line, fault drill: [frame, seconds]: from that "
                                    "frame the camera delivers nothing for that long", None)
    encoder: EncoderConfig = doc("the conveyor encoder this source's parts ride on",
                                 factory=EncoderConfig)
    max_frame_gap_s: float | None = doc("a source that delivers no frame for this long is "
                                        "shown as down and raises an alarm (null: never)", 5.0)
    open_attempts: int = doc("start-up check: tries to get a first frame (cameras wait "
                             "0.5 s, 1 s, 2 s, ... between tries)", 3)
    restart: bool | None = doc("restart the producer with back-off when it dies; null: yes "
                               "for camera and synthetic, no for video and folder (their "
                               "source fails)", None)
    transport: Transport = doc("ipc | shm | tcp: how frames reach the worker. ipc: the line "
                               "starts the producer, frames over a private unix socket; shm: "
                               "the same with the pixels in a shared-memory frame ring (large "
                               "frames on one host); tcp: the producer runs on a camera host "
                               "(`grad-edge produce`) and connects over the network with "
                               "CURVE (see network)", Transport.IPC)
    port: int | None = doc("tcp: the worker's port for this source (null: any free port; "
                           "producers learn it from the hello socket)", None)
    key: str | None = doc("tcp: the public certificate (NAME.key, `grad-edge keys`) of the "
                          "producer allowed to feed this source; `grad-edge produce` signs "
                          "with the NAME.key_secret beside it", None)
    ring_slots: int = doc("shm: frames the shared-memory ring holds (each slot the size of "
                          "a frame); at least worker.max_batch, or batches wait "
                          "worker.max_wait_ms for frames that cannot come", 8)


@dataclass(frozen=True)
class ModelConfig:
    path: str = doc("GRAD checkpoint (.pt) written by `grad-edge train`")
    backend: str = doc("auto | tensorrt | cudagraph | compile | eager", "auto")
    artifact: str | None = doc("exported artifact folder (`grad-edge export`), if any", None)
    device: str | None = doc("torch device; null picks cuda when present, else cpu", None)
    train_demo_if_missing: bool = doc("train the small demo model on synthetic normal parts "
                                      "when `path` does not exist", False)


@dataclass(frozen=True)
class WorkerConfig:
    max_batch: int = doc("largest micro-batch sent to the model", 8)
    max_wait_ms: float = doc("longest a frame waits for its batch to fill", 5.0)
    heartbeat_timeout_s: float = doc("a source silent this long is reported", 3.0)
    latency_budget_ms: float | None = doc("a result later than this after capture is late "
                                          "(verdict UNKNOWN); null: the time from camera to "
                                          "ejector at the line's speed less "
                                          "reject.decision_margin_ms (no budget without an "
                                          "ejector)", None)
    torch_threads: int | None = doc("CPU threads for the model; null = torch's default. On a "
                                    "small CPU shared with the producers, 1 is often fastest",
                                    None)
    product_check_every: int = doc("with a unified model: check that a source with a "
                                   "`product:` still sees it, on its first frame and every "
                                   "this many after (one more backbone pass each; "
                                   "edge.products); 0 = never", 100)


@dataclass(frozen=True)
class RuleSettings:
    threshold: float | None = doc("raw-score threshold; null = the checkpoint's calibrated one", None)
    k: int = doc("frames over threshold needed ...", 1)
    n: int = doc("... among the last n frames of the source", 1)
    min_area_px: int = doc("smallest region (frame pixels) above threshold that counts", 0)
    roi_mask: str | None = doc("PNG mask in frame pixels, white = inspect", None)
    cooldown_s: float = doc("no second reject from a source within this time", 0.0)
    unknown_rejects: bool = doc("reject parts whose result is late or failed (fail-safe)", True)


@dataclass(frozen=True)
class RulesConfig:
    default: RuleSettings = doc("rules for every source", factory=RuleSettings)
    per_source: dict[str, RuleSettings] = doc("overrides by source id", factory=dict)


@dataclass(frozen=True)
class DefectLogConfig:
    url: str = doc("database URL: sqlite:///path.db (one file per line) or "
                   "postgresql+psycopg://USER@HOST:PORT/DB (one for the plant; password "
                   "from ~/.pgpass or PGPASSWORD)", "sqlite:///defects.db")
    images: str = doc("folder for saved frames and heatmap overlays", "images")
    retention_days: float | None = doc("delete saved images older than this", 30.0)
    retention_gb: float | None = doc("keep saved images under this size", 5.0)
    journal_fsync: bool = doc("fsync the defect journal before a verdict goes on (a record "
                              "survives a power cut; ~4 ms per record on a slow disk). "
                              "false: it still survives a crash of the process", True)


@dataclass(frozen=True)
class SinkConfig:
    kind: str = doc("jsonl | zmq_pub | modbus | gpio")
    path: str | None = doc("jsonl: file to append to", None)
    endpoint: str | None = doc("zmq_pub: endpoint to bind (tcp://127.0.0.1:PORT or ipc://)", None)
    host: str | None = doc("modbus: PLC address", None)
    port: int = doc("modbus: TCP port", 502)
    unit: int = doc("modbus: unit (slave) id", 1)
    coil: int = doc("modbus: coil address", 0)
    chip: str | None = doc("gpio: chip path, e.g. /dev/gpiochip0", None)
    line: int = doc("gpio: line offset", 0)
    pulse_ms: int = doc("modbus/gpio: how long the output stays on", 100)
    alarm_coil: int | None = doc("modbus: coil latched on by an alarm (missed reject, source "
                                 "down); reset on the PLC", None)


@dataclass(frozen=True)
class RejectConfig:
    camera_to_ejector_counts: int | None = doc("encoder counts from camera to ejector", None)
    delay_s: float = doc("when a source has no encoder: fire this long after capture", 0.0)
    tolerance_counts: int | None = doc("how far past its due count the ejector still hits "
                                       "the part; later is a missed reject (null: half a "
                                       "part)", None)
    tolerance_ms: float = doc("the same for delay-timed rejects", 20.0)
    decision_margin_ms: float = doc("the default latency budget leaves this much time "
                                    "between a verdict and its part reaching the ejector", 50.0)
    stop_line_on_missed: bool = doc("stop the run (exit 1) at the first missed reject", False)
    sinks: list[SinkConfig] = doc("where reject signals go", factory=list)


@dataclass(frozen=True)
class WorkerAssignment:
    id: str = doc("worker id: names its folder, its SQLite file and its log lines")
    sources: list[str] = doc("ids of the sources this worker judges (each source in one worker)")
    device: str | None = doc("torch device for its model (cuda:0, cuda:1, cpu); null: "
                             "model.device", None)
    sinks: list[SinkConfig] | None = doc("reject sinks of this worker's sources; null: "
                                         "reject.sinks (a zmq_pub endpoint cannot be shared)",
                                         None)


@dataclass(frozen=True)
class MetricsConfig:
    port: int | None = doc("serve the line's Prometheus /metrics and /healthz on this port, "
                           "for the plant's monitoring and for `grad-edge serve` in another "
                           "process (null: off; `run --serve` serves them on the station's "
                           "port either way)", None)
    bind: str = doc("address the metrics port listens on (0.0.0.0: every interface)",
                    "127.0.0.1")
    live_frames: int = doc("latest judged frames kept in memory per source for the station's "
                           "line view", 6)
    live_per_s: float = doc("at most this many of them per second per source (each is "
                            "encoded as JPEG off the worker's thread)", 2.0)


@dataclass(frozen=True)
class StationConfig:
    bind: str = doc("address the operator station listens on; anything but a loopback "
                    "address needs token_file", "127.0.0.1")
    port: int = doc("the station's port (0: any free port, logged at start)", 8080)
    token_file: str | None = doc("file holding the token operators enter before acting "
                                 "(judgements, ROI); required when bind is not loopback",
                                 None)
    metrics_url: str | None = doc("where `grad-edge serve` reads the line's state (its "
                                  "/metrics); null: http://<metrics.bind>:<metrics.port>", None)
    shifts: list[str] = doc("local start times of the shifts, for the shift report",
                            factory=lambda: ["06:00", "14:00", "22:00"])
    page_size: int = doc("defects per page in the defect browser", 50)


@dataclass(frozen=True)
class KeepConfig:
    band: float = doc("keep good (OK) frames whose score is at least threshold x (1 - band), "
                      "i.e. within this fraction below the threshold, as training material "
                      "for `grad-edge dataset` (0: keep none)", 0.0)
    max_per_minute: float = doc("at most this many kept frames per minute per source (PNG "
                                "files beside the defect images, under the same retention)",
                                2.0)


@dataclass(frozen=True)
class NetworkConfig:
    listen: str = doc("run: the address the worker's tcp sockets bind to (0.0.0.0: every "
                      "interface; 127.0.0.1 keeps them on this host)", "127.0.0.1")
    worker: str | None = doc("produce: the worker's host name or address, as the camera "
                             "hosts reach it", None)
    hello_port: int = doc("the worker's hello socket, where remote producers learn the run "
                          "token and their source's port (run binds it, produce asks it)", 5600)
    worker_key: str | None = doc("the worker's public certificate (NAME.key, `grad-edge "
                                 "keys`): produce checks the worker with it; run needs the "
                                 "NAME.key_secret beside it", None)


@dataclass(frozen=True)
class LineConfig:
    model: ModelConfig = doc("the model and how it runs")
    sources: list[SourceConfig] = doc("frame producers, one process each")
    run_dir: str = doc("folder for sockets, results and logs of a run", "runs")
    worker: WorkerConfig = doc("batching and timing", factory=WorkerConfig)
    rules: RulesConfig = doc("when a frame is a defect", factory=RulesConfig)
    defect_log: DefectLogConfig = doc("where defects are recorded", factory=DefectLogConfig)
    reject: RejectConfig = doc("reject signals", factory=RejectConfig)
    status_interval_s: float = doc("seconds between live status lines (0 = off)", 1.0)
    workers: list[WorkerAssignment] | None = doc(
        "model workers, one process each with its own model, restarted with back-off when one "
        "dies; null: one worker per visible GPU (sources dealt round-robin), or one worker in "
        "the line's own process when there is at most one GPU", None)
    metrics: MetricsConfig = doc("Prometheus metrics and live frames the line publishes",
                                 factory=MetricsConfig)
    station: StationConfig = doc("the operator station (`grad-edge serve`, `run --serve`)",
                                 factory=StationConfig)
    keep: KeepConfig = doc("near-threshold good frames kept for retraining",
                           factory=KeepConfig)
    network: NetworkConfig = doc("remote producers (sources with transport: tcp): where the "
                                 "worker listens, how camera hosts reach it, its key",
                                 factory=NetworkConfig)
    # Filled by the loader, not the file:
    source_file: str = field(default="", metadata={"internal": True})
    config_hash: str = field(default="", metadata={"internal": True})


# --- loading -------------------------------------------------------------------------------

def _convert(value, tp, where: str):
    """Check/convert one YAML value against a type annotation; raise ConfigError otherwise."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(value, inner[0], where)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, where)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        choices = [m.value for m in tp]
        if value not in choices:
            raise ConfigError(f"{where}: {value!r} is not one of: {', '.join(choices)}")
        return tp(value)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_convert(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        _, item = typing.get_args(tp)
        return {str(k): _convert(v, item, f"{where}.{k}") for k, v in value.items()}
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # camera index 0 or a numeric id read as a number
    if tp in (int, str, bool) and isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"{where}: expected {getattr(tp, '__name__', tp)}, got {value!r}")


def _build(cls, data: dict, where: str):
    hints = typing.get_type_hints(cls)
    public = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    unknown = sorted(set(data) - set(public), key=str)
    if unknown:
        paths = ", ".join(f"{where}.{k}" if where else str(k) for k in unknown)
        raise ConfigError(f"{paths}: unknown key{'s' if len(unknown) > 1 else ''}; known "
                          f"{'in ' + where if where else 'at the top level'}: "
                          f"{', '.join(public)}")
    kwargs = {}
    for name, f in public.items():
        key = f"{where}.{name}" if where else name
        if name in data:
            kwargs[name] = _convert(data[name], hints[name], key)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{key}: required ({f.metadata.get('doc', '')})")
    return cls(**kwargs)


def _validate(cfg: LineConfig, path: str) -> None:
    ids = [s.id for s in cfg.sources]
    if not ids:
        raise ConfigError(f"{path}: sources: at least one source is needed")
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise ConfigError(f"{path}: sources: duplicate id {', '.join(dup)}")
    for i, s in enumerate(cfg.sources):
        where = f"{path}: sources[{i}]"
        try:
            check_source_id(s.id)   # it travels on the wire and names files
        except ValueError as exc:
            raise ConfigError(f"{where}.id: {exc}") from None
        if s.kind in (SourceKind.VIDEO, SourceKind.FOLDER) and not s.path:
            raise ConfigError(f"{where}.path: required for kind {s.kind.value}")
        if s.kind is SourceKind.CAMERA and s.device is None:
            raise ConfigError(f"{where}.device: required for kind camera")
        if s.roi is not None and (len(s.roi) != 4 or s.roi[0] >= s.roi[2] or s.roi[1] >= s.roi[3]):
            raise ConfigError(f"{where}.roi: expected [x0, y0, x1, y1] with x0 < x1, y0 < y1, "
                              f"got {s.roi}")
        if s.queue_size < 1:
            raise ConfigError(f"{where}.queue_size: must be >= 1")
        if s.open_attempts < 1:
            raise ConfigError(f"{where}.open_attempts: must be >= 1")
        if s.max_frame_gap_s is not None and s.max_frame_gap_s <= 0:
            raise ConfigError(f"{where}.max_frame_gap_s: must be > 0, or null for never")
        enc = s.encoder
        if enc.counts_per_frame < 0 or enc.frames_per_part < 1:
            raise ConfigError(f"{where}.encoder: counts_per_frame must be >= 0 and "
                              "frames_per_part >= 1")
        if enc.kind is EncoderKind.MODBUS:
            if s.kind is not SourceKind.CAMERA:
                raise ConfigError(f"{where}.encoder.kind: modbus is for cameras; "
                                  f"{s.kind.value} sources run on a simulated belt")
            if not enc.host or not enc.counts_per_part:
                raise ConfigError(f"{where}.encoder: kind modbus needs host and counts_per_part")
        if s.stall is not None and (len(s.stall) != 2 or s.stall[0] < 0 or s.stall[1] <= 0):
            raise ConfigError(f"{where}.stall: expected [frame >= 0, seconds > 0], got {s.stall}")
        if s.kind is SourceKind.SYNTHETIC and enc.kind is EncoderKind.SIMULATED and not s.fps:
            raise ConfigError(f"{where}.fps: the synthetic line needs fps (its belt speed)")
        _validate_transport(s, where, path)
    _validate_network(cfg, path)
    for name in cfg.rules.per_source:
        if name not in ids:
            raise ConfigError(f"{path}: rules.per_source.{name}: no source with that id "
                              f"(sources: {', '.join(ids)})")
    _validate_sinks(cfg.reject.sinks, f"{path}: reject.sinks")
    if cfg.workers is not None:
        _validate_workers(cfg, path, ids)
    if cfg.model.backend not in ("auto", "tensorrt", "cudagraph", "compile", "eager"):
        raise ConfigError(f"{path}: model.backend: {cfg.model.backend!r} is not one of: "
                          "auto, tensorrt, cudagraph, compile, eager")
    if cfg.worker.max_batch < 1:
        raise ConfigError(f"{path}: worker.max_batch: must be >= 1")
    if cfg.worker.product_check_every < 0:
        raise ConfigError(f"{path}: worker.product_check_every: must be >= 0 (0 = never)")
    if not 0.0 <= cfg.keep.band < 1.0:
        raise ConfigError(f"{path}: keep.band: must be in [0, 1), got {cfg.keep.band}")
    if cfg.keep.max_per_minute <= 0:
        raise ConfigError(f"{path}: keep.max_per_minute: must be > 0")
    for name, port in (("metrics.port", cfg.metrics.port), ("station.port", cfg.station.port)):
        if port is not None and not 0 <= port <= 65535:
            raise ConfigError(f"{path}: {name}: {port} is not a port (0..65535)")
    if cfg.metrics.live_frames < 1 or cfg.metrics.live_per_s <= 0:
        raise ConfigError(f"{path}: metrics: live_frames must be >= 1 and live_per_s > 0")
    for i, start in enumerate(cfg.station.shifts):
        try:
            hh, mm = (int(x) for x in start.split(":"))
            assert 0 <= hh < 24 and 0 <= mm < 60
        except (ValueError, AssertionError):
            raise ConfigError(f"{path}: station.shifts[{i}]: {start!r} is not a time of day "
                              "HH:MM") from None
    if cfg.station.page_size < 1:
        raise ConfigError(f"{path}: station.page_size: must be >= 1")


def _validate_sinks(sinks: list[SinkConfig], where: str) -> None:
    needs = {"jsonl": "path", "zmq_pub": "endpoint", "modbus": "host", "gpio": "chip"}
    for i, sink in enumerate(sinks):
        if sink.kind not in needs:
            raise ConfigError(f"{where}[{i}].kind: {sink.kind!r} is not one of: "
                              f"{', '.join(needs)}")
        if getattr(sink, needs[sink.kind]) is None:
            raise ConfigError(f"{where}[{i}].{needs[sink.kind]}: required for kind {sink.kind}")


def _validate_workers(cfg: LineConfig, path: str, ids: list[str]) -> None:
    if not cfg.workers:
        raise ConfigError(f"{path}: workers: give at least one worker, or leave it out")
    seen: dict[str, str] = {}
    for i, w in enumerate(cfg.workers):
        try:
            check_source_id(w.id)          # it names a folder and a file
        except ValueError as exc:
            raise ConfigError(f"{path}: workers[{i}].id: {exc}") from None
        for sid in w.sources:
            if sid not in ids:
                raise ConfigError(f"{path}: workers[{i}].sources: no source {sid!r} "
                                  f"(sources: {', '.join(ids)})")
            if sid in seen:
                raise ConfigError(f"{path}: workers[{i}].sources: source {sid!r} is already "
                                  f"judged by worker {seen[sid]!r}")
            seen[sid] = w.id
        if w.sinks is not None:
            _validate_sinks(w.sinks, f"{path}: workers[{i}].sinks")
    missing = [sid for sid in ids if sid not in seen]
    if missing:
        raise ConfigError(f"{path}: workers: no worker judges source(s) {', '.join(missing)}")
    wids = [w.id for w in cfg.workers]
    if len(set(wids)) != len(wids):
        raise ConfigError(f"{path}: workers: duplicate worker id")
    if len(cfg.workers) > 1 and any(s.kind == "zmq_pub" for s in cfg.reject.sinks) and any(
            w.sinks is None for w in cfg.workers):
        raise ConfigError(f"{path}: reject.sinks: a zmq_pub endpoint cannot be bound by "
                          f"{len(cfg.workers)} worker processes; give each worker its own "
                          "under workers[].sinks")
    # The hello socket (network.hello_port) is bound by the worker that judges the tcp
    # sources; two workers binding it would collide, and a camera host asks one address.
    tcp = {s.id for s in cfg.sources if s.transport is Transport.TCP}
    serving = [w.id for w in cfg.workers if tcp & set(w.sources)]
    if len(serving) > 1:
        raise ConfigError(f"{path}: workers: the tcp sources ({', '.join(sorted(tcp))}) are "
                          f"split over workers {', '.join(serving)}; put them all in one "
                          "worker (it binds network.hello_port, which camera hosts ask)")


def _validate_transport(s: SourceConfig, where: str, path: str) -> None:
    if s.transport is not Transport.TCP:
        for key in ("port", "key"):
            if getattr(s, key) is not None:
                raise ConfigError(f"{where}.{key}: only for transport tcp (this source is "
                                  f"{s.transport.value})")
    if not 1 <= s.ring_slots <= 1024:
        raise ConfigError(f"{where}.ring_slots: must be 1-1024, got {s.ring_slots}")
    if s.transport is not Transport.TCP:
        return
    if s.port is not None and not 1 <= s.port <= 65535:
        raise ConfigError(f"{where}.port: must be 1-65535 (or null for any free port), got "
                          f"{s.port}")
    if not s.key:
        raise ConfigError(f"{where}.key: required for transport tcp: the public certificate "
                          "(NAME.key from `grad-edge keys`) of the producer that feeds it")
    if s.encoder.kind is EncoderKind.SIMULATED and s.encoder.counts_per_frame > 0:
        raise ConfigError(f"{where}.encoder.kind: a remote source cannot share a simulated belt "
                          "with the worker (its clock is another host's); use none (rejects "
                          "by reject.delay_s after capture) or modbus (a real encoder)")


def _validate_network(cfg: LineConfig, path: str) -> None:
    net = cfg.network
    remote = [s for s in cfg.sources if s.transport is Transport.TCP]
    if not 1 <= net.hello_port <= 65535:
        raise ConfigError(f"{path}: network.hello_port: must be 1-65535, got {net.hello_port}")
    if not remote:
        return
    if not net.worker_key:
        raise ConfigError(f"{path}: network.worker_key: required when a source has transport "
                          "tcp: the worker's public certificate (NAME.key from `grad-edge "
                          "keys`)")
    ports = [s.port for s in remote if s.port is not None] + [net.hello_port]
    dup = sorted({p for p in ports if ports.count(p) > 1})
    if dup:
        raise ConfigError(f"{path}: sources[].port / network.hello_port: port {dup[0]} is "
                          "used twice; every tcp source and the hello socket need their own")


def _resolve_paths(cfg: LineConfig, base: Path) -> LineConfig:
    """Make file paths relative to the config file's folder absolute."""
    def p(value: str | None) -> str | None:
        if value is None or "://" in value:
            return value
        return str((base / value).resolve())

    def url(value: str) -> str:
        prefix = "sqlite:///"
        if value.startswith(prefix) and not value[len(prefix):].startswith("/") \
                and value[len(prefix):] != ":memory:":
            return prefix + str((base / value[len(prefix):]).resolve())
        return value

    sources = [dataclasses.replace(s, path=p(s.path), key=p(s.key)) for s in cfg.sources]
    rules = dataclasses.replace(cfg.rules, default=dataclasses.replace(
        cfg.rules.default, roi_mask=p(cfg.rules.default.roi_mask)), per_source={
        k: dataclasses.replace(v, roi_mask=p(v.roi_mask)) for k, v in cfg.rules.per_source.items()})
    sinks = [dataclasses.replace(s, path=p(s.path)) for s in cfg.reject.sinks]
    workers = None if cfg.workers is None else [
        dataclasses.replace(w, sinks=None if w.sinks is None else [
            dataclasses.replace(s, path=p(s.path)) for s in w.sinks]) for w in cfg.workers]
    return dataclasses.replace(
        cfg, station=dataclasses.replace(cfg.station, token_file=p(cfg.station.token_file)),
        sources=sources, rules=rules, run_dir=p(cfg.run_dir),
        model=dataclasses.replace(cfg.model, path=p(cfg.model.path), artifact=p(cfg.model.artifact)),
        defect_log=dataclasses.replace(cfg.defect_log, url=url(cfg.defect_log.url),
                                       images=p(cfg.defect_log.images)),
        reject=dataclasses.replace(cfg.reject, sinks=sinks), workers=workers,
        network=dataclasses.replace(cfg.network, worker_key=p(cfg.network.worker_key)))


def load_config(path: str | Path) -> LineConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    text = path.read_text()
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        # One line: PyYAML's own message spans several, with a snippet of the file.
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or " ".join(str(exc).split())
        raise ConfigError(f"{path}: not valid YAML{at}: {problem}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    try:
        cfg = _build(LineConfig, data, "")
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    _validate(cfg, str(path))
    cfg = _resolve_paths(cfg, path.parent.resolve())
    _check_public_keys(cfg, str(path))
    return dataclasses.replace(cfg, source_file=str(path),
                               config_hash=hashlib.sha256(text.encode()).hexdigest()[:16])


def type_name(tp) -> str:
    """A config type as a person writes it in YAML: `float or null`, `list of int`, ..."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        name = " or ".join(type_name(a) for a in args)
        return f"{name} or null" if len(args) < len(typing.get_args(tp)) else name
    if origin is list:
        return f"list of {type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return f"mapping of {type_name(typing.get_args(tp)[1])}"
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return " | ".join(m.value for m in tp)
    if dataclasses.is_dataclass(tp):
        return "section"
    return {int: "int", float: "float", str: "string", bool: "bool"}.get(tp, str(tp))


def default_text(f: dataclasses.Field) -> str:
    """The default of a field as YAML would show it; `required` when there is none."""
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
        if dataclasses.is_dataclass(value):
            return ""
    else:
        return "required"
    if isinstance(value, enum.Enum):
        value = value.value
    return "default " + yaml.safe_dump(value, default_flow_style=True).strip().removesuffix(
        "\n...").strip()


# --- CURVE keys: both hosts hold the public ones; each role needs its own secret -------------

def _check_public_keys(cfg: LineConfig, path: str) -> None:
    for i, s in enumerate(cfg.sources):
        if s.key is not None:
            _key(lambda: load_public(s.key), f"{path}: sources[{i}].key")
    if cfg.network.worker_key is not None and any(
            s.transport is Transport.TCP for s in cfg.sources):
        _key(lambda: load_public(cfg.network.worker_key), f"{path}: network.worker_key")


def _key(load, where: str):
    try:
        return load()
    except KeyFileError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def worker_keys(cfg: LineConfig) -> tuple[dict[str, ServerKeys], ServerKeys | None]:
    """`grad-edge run`: each tcp source's server keys (the worker's pair, that source's
    producer key) and the hello socket's (every tcp source's key); ({}, None) without any."""
    remote = [(i, s) for i, s in enumerate(cfg.sources) if s.transport is Transport.TCP]
    if not remote:
        return {}, None
    path = cfg.source_file or "config"
    public, secret = _key(lambda: load_secret(cfg.network.worker_key),
                          f"{path}: network.worker_key (run needs the worker's secret key "
                          "beside it)")
    per_source = {s.id: ServerKeys(public, secret, frozenset({_key(
        lambda: load_public(s.key), f"{path}: sources[{i}].key")})) for i, s in remote}
    every = frozenset().union(*(k.allowed for k in per_source.values()))
    return per_source, ServerKeys(public, secret, every)


def producer_keys(cfg: LineConfig, source_id: str) -> ClientKeys:
    """`grad-edge produce`: the source's producer key pair and the worker's public key."""
    path = cfg.source_file or "config"
    i, s = next((i, s) for i, s in enumerate(cfg.sources) if s.id == source_id)
    public, secret = _key(lambda: load_secret(s.key),
                          f"{path}: sources[{i}].key (produce needs the producer's secret key "
                          "beside it)")
    server = _key(lambda: load_public(cfg.network.worker_key), f"{path}: network.worker_key")
    return ClientKeys(public, secret, server)


def describe(cls=LineConfig, prefix: str = "") -> list[str]:
    """Every key with its type, default and description, for `grad-edge run
    --describe-config`, e.g. `worker.max_batch (int, default 8): largest micro-batch ...`."""
    lines = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.metadata.get("internal"):
            continue
        key = f"{prefix}{f.name}"
        tp = hints[f.name]
        inner = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)]
        target = tp if dataclasses.is_dataclass(tp) else (inner[0] if inner else None)
        what = ", ".join(x for x in (type_name(tp), default_text(f)) if x)
        lines.append(f"{key} ({what}): {f.metadata.get('doc', '')}")
        if target is not None:
            suffix = "[]." if typing.get_origin(tp) is list else \
                ".<id>." if typing.get_origin(tp) is dict else "."
            lines.extend(describe(target, key + suffix))
    return lines
