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

from edge.protocol import DropPolicy


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


@dataclass(frozen=True)
class EncoderConfig:
    counts_per_frame: int = doc("simulated encoder counts the belt moves between frames", 100)
    frames_per_part: int = doc("frames per part (part_id = seq // frames_per_part)", 1)


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
    encoder: EncoderConfig = doc("simulated conveyor encoder (video, folder, synthetic)",
                                 factory=EncoderConfig)


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
                                          "(verdict UNKNOWN)", None)
    torch_threads: int | None = doc("CPU threads for the model; null = torch's default. On a "
                                    "small CPU shared with the producers, 1 is often fastest",
                                    None)


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
    url: str = doc("SQLAlchemy database URL (sqlite:///path.db; postgresql://... later)",
                   "sqlite:///defects.db")
    images: str = doc("folder for saved frames and heatmap overlays", "images")
    retention_days: float | None = doc("delete saved images older than this", 30.0)
    retention_gb: float | None = doc("keep saved images under this size", 5.0)


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


@dataclass(frozen=True)
class RejectConfig:
    camera_to_ejector_counts: int | None = doc("encoder counts from camera to ejector", None)
    delay_s: float = doc("when a source has no encoder: fire this long after capture", 0.0)
    sinks: list[SinkConfig] = doc("where reject signals go", factory=list)


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
        if s.kind in (SourceKind.VIDEO, SourceKind.FOLDER) and not s.path:
            raise ConfigError(f"{where}.path: required for kind {s.kind.value}")
        if s.kind is SourceKind.CAMERA and s.device is None:
            raise ConfigError(f"{where}.device: required for kind camera")
        if s.roi is not None and (len(s.roi) != 4 or s.roi[0] >= s.roi[2] or s.roi[1] >= s.roi[3]):
            raise ConfigError(f"{where}.roi: expected [x0, y0, x1, y1] with x0 < x1, y0 < y1, "
                              f"got {s.roi}")
        if s.queue_size < 1:
            raise ConfigError(f"{where}.queue_size: must be >= 1")
    for name in cfg.rules.per_source:
        if name not in ids:
            raise ConfigError(f"{path}: rules.per_source.{name}: no source with that id "
                              f"(sources: {', '.join(ids)})")
    for i, sink in enumerate(cfg.reject.sinks):
        needs = {"jsonl": "path", "zmq_pub": "endpoint", "modbus": "host", "gpio": "chip"}
        if sink.kind not in needs:
            raise ConfigError(f"{path}: reject.sinks[{i}].kind: {sink.kind!r} is not one of: "
                              f"{', '.join(needs)}")
        if getattr(sink, needs[sink.kind]) is None:
            raise ConfigError(f"{path}: reject.sinks[{i}].{needs[sink.kind]}: required for "
                              f"kind {sink.kind}")
    if cfg.model.backend not in ("auto", "tensorrt", "cudagraph", "compile", "eager"):
        raise ConfigError(f"{path}: model.backend: {cfg.model.backend!r} is not one of: "
                          "auto, tensorrt, cudagraph, compile, eager")
    if cfg.worker.max_batch < 1:
        raise ConfigError(f"{path}: worker.max_batch: must be >= 1")


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

    sources = [dataclasses.replace(s, path=p(s.path)) for s in cfg.sources]
    rules = dataclasses.replace(cfg.rules, default=dataclasses.replace(
        cfg.rules.default, roi_mask=p(cfg.rules.default.roi_mask)), per_source={
        k: dataclasses.replace(v, roi_mask=p(v.roi_mask)) for k, v in cfg.rules.per_source.items()})
    sinks = [dataclasses.replace(s, path=p(s.path)) for s in cfg.reject.sinks]
    return dataclasses.replace(
        cfg, sources=sources, rules=rules, run_dir=p(cfg.run_dir),
        model=dataclasses.replace(cfg.model, path=p(cfg.model.path), artifact=p(cfg.model.artifact)),
        defect_log=dataclasses.replace(cfg.defect_log, url=url(cfg.defect_log.url),
                                       images=p(cfg.defect_log.images)),
        reject=dataclasses.replace(cfg.reject, sinks=sinks))


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
    return dataclasses.replace(cfg, source_file=str(path),
                               config_hash=hashlib.sha256(text.encode()).hexdigest()[:16])


def describe(cls=LineConfig, prefix: str = "") -> list[str]:
    """Every key with its description, for `grad-edge run --describe-config`."""
    lines = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.metadata.get("internal"):
            continue
        key = f"{prefix}{f.name}"
        tp = hints[f.name]
        inner = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)]
        target = tp if dataclasses.is_dataclass(tp) else (inner[0] if inner else None)
        lines.append(f"{key}: {f.metadata.get('doc', '')}")
        if target is not None:
            suffix = "[]." if typing.get_origin(tp) is list else \
                ".<id>." if typing.get_origin(tp) is dict else "."
            lines.extend(describe(target, key + suffix))
    return lines
