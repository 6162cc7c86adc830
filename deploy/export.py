"""Checkpoint -> runtime artifact (`grad-edge export`).

    tensorrt   builds one Torch-TensorRT engine per batch size (dynamo frontend, fp16, static
               shapes) and serializes it, so the line loads engines in seconds instead of
               rebuilding them for minutes at every start-up
    cudagraph  metadata only: a CUDA graph holds device pointers of the process that captured
    compile    it and cannot be serialized, and inductor's graphs are cached by torch itself;
    eager      both are captured/compiled when the runner starts, for the batch sizes and frame
               shape recorded here

The engine takes exactly what the line sends: uint8 (B, H, W, 3) BGR frames at `frame_shape`.
After exporting, run `grad-edge verify --artifact DIR` on the same machine.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from torch import nn

from deploy.artifact import BACKENDS, ArtifactMeta, new_meta, write_meta
from deploy.inference import InferenceModel
from deploy.runner import DEFAULT_BATCH_SIZES, cuda_missing_reason, import_torch_tensorrt
from grad.checkpoint import load_checkpoint, read_card
from grad.model import GRAD
from grad.preprocess import Preprocess

log = logging.getLogger(__name__)

PRECISION = {"tensorrt": "fp16", "cudagraph": "fp16", "compile": "fp16", "eager": "fp32"}
UNSERIALIZABLE = ("the graphs are captured/compiled when the runner starts: CUDA graphs hold "
                  "the capturing process's device pointers and cannot be serialized")


def engine_name(batch: int) -> str:
    return f"engine_b{batch}.ep"


class EngineModule(nn.Module):
    """InferenceModel with a plain (anomaly_map, score) tuple out: what gets exported.

    An exported program stores its output structure with it, and torch.export.save refuses a
    NamedTuple output (GRADOutput) unless the class is registered through a private torch API
    (torch.utils._pytree._register_namedtuple). Engines therefore return the same two tensors
    in GRADOutput's field order, and `TensorRTRunner` reads them by position.
    """

    def __init__(self, inference: InferenceModel):
        super().__init__()
        self.inference = inference

    def forward(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # TensorRT takes uint8 only into cast layers, so the engine casts first (the same
        # numbers: uint8 -> float32 is exact, and Preprocess's own cast is then a no-op).
        out = self.inference(frames.to(torch.float32))      # uint8 (B, H, W, 3) BGR
        return out.anomaly_map, out.score                   # (B, mh, mw), (B,) float32


def export_program(model: GRAD, batch: int, frame_shape: tuple[int, int],
                   dtype: torch.dtype = torch.float16, device: str = "cuda"):
    """torch.export of the engine module for uint8 (batch, H, W, 3) frames, static shapes.

    The first step of the TensorRT build, and the one step of it that also runs on a CPU (the
    tests export, save, load and run the program there). Static shapes: one engine per batch
    size is both the fastest engine and what the runner pads to.
    """
    module = EngineModule(InferenceModel(model, dtype=dtype)).to(device).eval()
    example = torch.zeros((batch, *frame_shape, 3), dtype=torch.uint8, device=device)
    return torch.export.export(module, (example,)), example


def compile_tensorrt(model: GRAD, batch: int, frame_shape: tuple[int, int],
                     device: str = "cuda"):
    """A Torch-TensorRT GraphModule of the fp16 engine module for one batch size.

    Written to the Torch-TensorRT docs, never run in this repository (TensorRT cannot be
    installed on its machines; see deploy/README.md):
    https://docs.pytorch.org/TensorRT/user_guide/compilation/dynamo_export.html
    - the exported program goes to torch_tensorrt.dynamo.compile;
    - precision is explicit: the network's weights are fp16 (InferenceModel(dtype=float16),
      the same module the CUDA-graph backend runs), resize and the anomaly map float32, and
      `use_explicit_typing=True` makes TensorRT keep exactly those types. `enabled_precisions`
      (TensorRT's deprecated weak typing) is not passed: recent Torch-TensorRT rejects it
      together with explicit typing.
    Ops without a TensorRT converter (possibly the antialiased resize) run in PyTorch inside
    the same program (partial compilation, the dynamo default).
    """
    torch_tensorrt = import_torch_tensorrt()
    program, example = export_program(model, batch, frame_shape, torch.float16, device)
    trt_gm = torch_tensorrt.dynamo.compile(program, arg_inputs=[example],
                                           use_explicit_typing=True)
    return trt_gm, example


def build_tensorrt(model: GRAD, batch: int, frame_shape: tuple[int, int], path: Path,
                   device: str = "cuda") -> None:
    """Compile for one batch size and serialize as an ExportedProgram, loaded without rebuild by
    torch_tensorrt.load(path).module()
    (https://docs.pytorch.org/TensorRT/user_guide/runtime_performance/saving_models.html)."""
    trt_gm, example = compile_tensorrt(model, batch, frame_shape, device)
    torch_tensorrt = import_torch_tensorrt()
    torch_tensorrt.save(trt_gm, str(path), output_format="exported_program",
                        arg_inputs=[example])


def export(model_path: str | Path, backend: str,
           batch_sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES,
           frame_shape: tuple[int, int] = (1080, 1920), *, out_dir: str | Path) -> ArtifactMeta:
    """Build the artifact for `backend` in `out_dir` and return its metadata."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    batch_sizes = tuple(sorted({int(b) for b in batch_sizes}))
    if not batch_sizes or batch_sizes[0] < 1:
        raise ValueError(f"batch sizes must be positive integers, got {batch_sizes}")
    h, w = (int(v) for v in frame_shape)
    if h < 1 or w < 1:
        raise ValueError(f"frame shape must be H W in pixels, got {frame_shape}")
    out_dir = Path(out_dir)
    card, _ = read_card(model_path)   # validates the checkpoint before any long build
    log.info("export: model %s (%s), backend %s, batch sizes %s, frames %dx%d -> %s",
             card.model_hash, card.config.backbone, backend, batch_sizes, h, w, out_dir)

    engines: dict[str, str] = {}
    note = ""
    if backend == "tensorrt":
        if (reason := cuda_missing_reason()) is not None:
            raise RuntimeError(f"TensorRT engines are built on the GPU that will run them; "
                               f"{reason}. Export on the line's machine.")
        import_torch_tensorrt()  # fail before loading anything if it is missing
        model, _ = load_checkpoint(model_path)
        out_dir.mkdir(parents=True, exist_ok=True)
        for b in batch_sizes:
            start = time.perf_counter()
            log.info("export: building TensorRT engine for batch %d (takes minutes)", b)
            build_tensorrt(model, b, (h, w), out_dir / engine_name(b))
            engines[str(b)] = engine_name(b)
            log.info("export: batch %d built in %.0f s", b, time.perf_counter() - start)
    elif backend in ("cudagraph", "compile"):
        note = UNSERIALIZABLE
        log.info("export: %s artifacts are metadata only; %s", backend, UNSERIALIZABLE)

    map_shape = Preprocess.for_config(card.config).plan(h, w).scaled_hw
    meta = new_meta(card.model_hash, backend, PRECISION[backend], batch_sizes, (h, w),
                    card.image_size, engines=engines, model_path=str(model_path), note=note,
                    map_shape=map_shape)
    path = write_meta(out_dir, meta)
    log.info("export: wrote %s; check it with `grad-edge verify --model %s --artifact %s "
             "--images ...`", path, model_path, out_dir)
    return meta
