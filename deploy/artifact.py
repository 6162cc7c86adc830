"""A runtime artifact: a directory with `artifact.json` and, for TensorRT, the engine files.

    artifact/
      artifact.json          ArtifactMeta below, written last (its presence means "complete")
      engine_b1.ep           TensorRT only: one serialized Torch-TensorRT program per batch size
      engine_b8.ep
      ...

A TensorRT engine is built for one GPU model, one TensorRT version and one CUDA version; loaded
anywhere else it fails in obscure ways or, worse, runs with other numerics. So the metadata names
the machine it was built on, and `check_compatible` compares that with the machine loading it
and refuses with the exact mismatch. CUDA graphs and torch.compile graphs cannot be serialized
(a CUDA graph holds raw device pointers of the process that captured it), so for those backends
the artifact is the metadata alone: the graphs are captured when the runner starts, and only the
model hash has to match.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch

META_FILE = "artifact.json"
FORMAT = "grad-edge/artifact"
VERSION = 1

BACKENDS = ("tensorrt", "cudagraph", "compile", "eager")
# Backends whose artifact holds device code built for one machine: the environment must match.
SERIALIZED_BACKENDS = ("tensorrt",)


class ArtifactError(ValueError):
    """The directory is not an artifact this code can load, or does not fit this machine."""


@dataclass(frozen=True)
class Environment:
    """What a serialized engine depends on. None means "absent on this machine"."""

    torch: str
    torch_tensorrt: str | None
    cuda: str | None
    gpu: str | None


def current_environment() -> Environment:
    try:
        import torch_tensorrt  # noqa: PLC0415  (optional, GPU machines only)
        trt = torch_tensorrt.__version__
    except ImportError:
        trt = None
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return Environment(torch.__version__, trt, torch.version.cuda, gpu)


@dataclass(frozen=True)
class ArtifactMeta:
    model_hash: str                 # the checkpoint's model_hash: which trained model this is
    backend: str                    # one of BACKENDS
    precision: str                  # "fp32" or "fp16": the network's compute precision
    batch_sizes: tuple[int, ...]    # the static shapes prepared, ascending
    frame_shape: tuple[int, int]    # (H, W) of the uint8 frames the engines take
    image_size: int | tuple[int, int]  # the model input: S (square) or (H, W)
    environment: Environment        # where it was built
    created: str                    # ISO 8601, UTC
    engines: dict[str, str] = field(default_factory=dict)  # str(batch size) -> file name
    model_path: str = ""            # the checkpoint it came from, for the record
    note: str = ""
    map_shape: tuple[int, ...] = ()  # (h, w) of the anomaly map for frame_shape; () if unknown

    def to_json(self) -> str:
        d = asdict(self)
        d["batch_sizes"] = list(self.batch_sizes)
        d["frame_shape"] = list(self.frame_shape)
        d["map_shape"] = list(self.map_shape)
        if not isinstance(self.image_size, int):
            d["image_size"] = list(self.image_size)
        return json.dumps({"format": FORMAT, "version": VERSION, **d}, indent=2)

    @classmethod
    def from_json(cls, text: str, source: str = "artifact.json") -> "ArtifactMeta":
        d = json.loads(text)
        if d.pop("format", None) != FORMAT:
            raise ArtifactError(f"{source} is not a grad-edge artifact (format field missing): "
                                "create one with `grad-edge export`")
        version = d.pop("version")
        if version > VERSION:
            raise ArtifactError(f"{source} has artifact version {version}, this code reads up "
                                f"to {VERSION}: upgrade grad-edge or re-export")
        d["batch_sizes"] = tuple(d["batch_sizes"])
        d["frame_shape"] = tuple(d["frame_shape"])
        d["map_shape"] = tuple(d.get("map_shape", ()))
        if isinstance(d["image_size"], list):
            d["image_size"] = tuple(d["image_size"])
        d["environment"] = Environment(**d["environment"])
        return cls(**d)


def new_meta(model_hash: str, backend: str, precision: str, batch_sizes, frame_shape,
             image_size: int | tuple[int, int], engines: dict[str, str] | None = None,
             model_path: str = "", note: str = "",
             map_shape: tuple[int, int] | tuple[()] = ()) -> ArtifactMeta:
    """Metadata for an artifact built now, on this machine."""
    if backend not in BACKENDS:
        raise ArtifactError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    return ArtifactMeta(
        model_hash=model_hash, backend=backend, precision=precision,
        batch_sizes=tuple(sorted(int(b) for b in batch_sizes)),
        frame_shape=(int(frame_shape[0]), int(frame_shape[1])),
        image_size=image_size if isinstance(image_size, int) else tuple(image_size),
        environment=current_environment(),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        engines=dict(engines or {}), model_path=model_path, note=note,
        map_shape=tuple(int(v) for v in map_shape))


def write_meta(out_dir: str | Path, meta: ArtifactMeta) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / META_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(meta.to_json())
    tmp.replace(path)  # written last and atomically: a half-built artifact has no metadata
    return path


def read_meta(artifact_dir: str | Path) -> ArtifactMeta:
    path = Path(artifact_dir) / META_FILE
    if not path.is_file():
        raise ArtifactError(f"no {META_FILE} in {artifact_dir}: not an artifact, or its export "
                            "did not finish; run `grad-edge export` again")
    meta = ArtifactMeta.from_json(path.read_text(), str(path))
    missing = [f for f in meta.engines.values() if not (Path(artifact_dir) / f).is_file()]
    if missing:
        raise ArtifactError(f"{artifact_dir} lists engine files that are not there: {missing}; "
                            "copy the whole artifact directory, or re-export")
    return meta


def is_artifact(path: str | Path) -> bool:
    return (Path(path) / META_FILE).is_file()


def check_compatible(meta: ArtifactMeta, model_hash: str | None = None,
                     env: Environment | None = None) -> None:
    """Raise ArtifactError naming every mismatch between the artifact and this machine/model.

    `model_hash` is the checkpoint being served (None skips that check); `env` defaults to the
    current machine. The environment matters only for backends with serialized device code.
    """
    problems = []
    if model_hash is not None and model_hash != meta.model_hash:
        problems.append(f"other model: the artifact was exported from model {meta.model_hash}, "
                        f"the checkpoint is model {model_hash}")
    if meta.backend in SERIALIZED_BACKENDS:
        env = env or current_environment()
        built = meta.environment
        checks = (("GPU", built.gpu, env.gpu), ("torch version", built.torch, env.torch),
                  ("torch_tensorrt version", built.torch_tensorrt, env.torch_tensorrt),
                  ("CUDA version", built.cuda, env.cuda))
        for what, then, now in checks:
            if then != now:
                problems.append(f"other {what}: built with {then or 'none'}, "
                                f"this machine has {now or 'none'}")
    if problems:
        raise ArtifactError(
            f"the {meta.backend} artifact (created {meta.created}) does not fit here: "
            + "; ".join(problems)
            + ". Re-export it on this machine with `grad-edge export --backend "
            + f"{meta.backend}` from the checkpoint being served.")
