"""The runner interface the line's worker calls: uint8 BGR frames in, scores and maps out.

    runner = open_runner("model.pt")             # picks the best backend this machine has
    out = runner.run(frames)                     # frames: uint8 (B, H, W, 3) BGR, as OpenCV
    out.scores, out.maps, out.device_ms          #   and ZeroMQ deliver them

    pending = runner.submit(frames)              # or: hand a batch over and come back later,
    ...                                          #   so the next batch's copy (and the caller's
    out = pending.result()                       #   own work) overlaps this batch's compute

Backends, from the simplest to the fastest (all wrap `deploy.inference.InferenceModel`):

    eager       plain PyTorch, fp32, any batch size; what the line runs on a CPU
    compile     torch.compile (inductor); fp16 + channels_last on CUDA, fp32 on CPU
    cudagraph   fp16, channels_last, one captured CUDA graph per (batch size, frame shape):
                one launch per batch instead of hundreds of small kernels
    tensorrt    a Torch-TensorRT engine per batch size, loaded from an exported artifact

Static-shape backends (compile, cudagraph, tensorrt) are prepared for `batch_sizes`; a batch of
B frames runs at the smallest prepared size >= B (padded, and the result sliced back to B), so
the worker may send any B up to the largest one without triggering a recompile or a capture.
"""

from __future__ import annotations

import importlib
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from deploy.artifact import ArtifactError, ArtifactMeta, check_compatible, read_meta
from deploy.inference import InferenceModel, fast_whiten_dtype
from grad.checkpoint import ModelCard, load_checkpoint, read_card
from grad.model import GRAD
from grad.tiling import plan_tiles

log = logging.getLogger(__name__)

DEFAULT_BATCH_SIZES = (1, 8, 32)


@dataclass(frozen=True)
class RunnerOutput:
    scores: np.ndarray   # (B,) float32 raw image scores (compare with card.calibration.threshold)
    maps: np.ndarray     # (B, mh, mw) float32 anomaly maps, same units as the scores;
                         # (mh, mw) = runner.map_hw(frame shape): the model input (H, W),
                         # or the aspect-kept scaled frame when the model tiles
    device_ms: float     # from handing the batch to the device to results back on the host


class Pending:
    """A batch handed to a runner; `result()` waits for it and returns its RunnerOutput.

    Runners whose `overlaps` is True return from `submit` before the batch is done: the CUDA
    graph runner while the copy and replay run on the GPU, the eager runner with overlap=True
    while a background thread runs the model. The others hand back a finished Pending. A failed
    batch raises its error from `result()`, every time it is asked.
    """

    def __init__(self, wait: Callable[[], RunnerOutput]):
        self._wait = wait
        self._out: RunnerOutput | None = None

    @classmethod
    def finished(cls, out: RunnerOutput) -> "Pending":
        pending = cls(lambda: out)
        pending._out = out
        return pending

    def result(self) -> RunnerOutput:
        if self._out is None:
            self._out = self._wait()
        return self._out


def load_model(model: str | Path | GRAD) -> tuple[GRAD, ModelCard | None]:
    """A checkpoint path (the line) or an in-memory GRAD (benchmarks, tests; no card then)."""
    if isinstance(model, GRAD):
        return model.eval(), None
    grad, card = load_checkpoint(model)
    return grad, card


def check_frames(frames: np.ndarray, max_batch: int | None) -> None:
    """Reject anything but uint8 (B, H, W, 3) with 1 <= B <= max_batch, saying what was wrong."""
    if not isinstance(frames, np.ndarray):
        raise TypeError(f"frames must be a numpy array, got {type(frames).__name__}")
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 (B, H, W, 3) BGR, got {frames.dtype} "
                         f"{frames.shape}: stack single frames with np.stack, convert "
                         "grayscale with cv2.cvtColor(..., cv2.COLOR_GRAY2BGR)")
    if len(frames) == 0:
        raise ValueError("frames is an empty batch: send at least one frame")
    if max_batch is not None and len(frames) > max_batch:
        raise ValueError(f"batch of {len(frames)} frames is larger than the largest prepared "
                         f"batch size {max_batch}: split it, or open the runner with a larger "
                         "batch size in batch_sizes")


def padded_batch(n: int, batch_sizes: tuple[int, ...]) -> int:
    """The smallest prepared batch size that holds n frames."""
    for b in batch_sizes:
        if b >= n:
            return b
    raise ValueError(f"no prepared batch size holds {n} frames (prepared: {batch_sizes})")


class Runner(ABC):
    """One loaded model on one device with one backend. Not thread-safe: one worker calls it."""

    backend: str = ""
    static_shapes: bool = False   # True: pads each batch to a prepared batch size
    overlaps: bool = False        # True: submit() returns before the batch is done

    def __init__(self, card: ModelCard | None, image_size: int | tuple[int, int], device: str,
                 batch_sizes: tuple[int, ...], fit: str = "stretch", tile_overlap: float = 0.25):
        if not batch_sizes or min(batch_sizes) < 1:
            raise ValueError(f"batch_sizes must be positive integers, got {batch_sizes}")
        self.card = card              # None only for an in-memory model (benchmarks)
        self.image_size = image_size  # the config's: S, or (H, W) for a non-square input
        self.fit = fit
        self.tile_overlap = tile_overlap
        self.device = str(device)
        self.batch_sizes = tuple(sorted({int(b) for b in batch_sizes}))

    @property
    def input_hw(self) -> tuple[int, int]:
        """(H, W) of one model input."""
        s = self.image_size
        return (s, s) if isinstance(s, int) else (int(s[0]), int(s[1]))

    def map_hw(self, frame_hw: tuple[int, int]) -> tuple[int, int]:
        """(h, w) of the anomaly maps this runner returns for frames of `frame_hw` (H, W)."""
        return plan_tiles(frame_hw, self.input_hw, self.fit, self.tile_overlap).scaled_hw

    @property
    def max_batch(self) -> int | None:
        return self.batch_sizes[-1] if self.static_shapes else None

    def run(self, frames: np.ndarray) -> RunnerOutput:
        """uint8 (B, H, W, 3) BGR frames -> scores (B,), maps (B, mh, mw)."""
        check_frames(frames, self.max_batch)
        n = len(frames)
        start = time.perf_counter()
        maps, scores = self._run(np.ascontiguousarray(frames))  # on the host, >= n rows
        device_ms = 1000 * (time.perf_counter() - start)
        # Copies: static-shape runners hand back views of buffers the next batch overwrites.
        return RunnerOutput(scores=scores[:n].numpy().astype(np.float32, copy=True),
                            maps=maps[:n].numpy().astype(np.float32, copy=True),
                            device_ms=device_ms)

    def route(self, frames: np.ndarray) -> np.ndarray | None:
        """uint8 (B, H, W, 3) BGR frames -> each one's product group (B,) in a unified model,
        the index of its product in `card.product_groups`; None when the model serves one
        product or this runner holds no PyTorch model to ask (TensorRT). Runs the backbone
        eagerly, outside any compiled or captured graph: the line calls it now and then, not
        per frame (edge.products)."""
        inference = getattr(self, "inference", None)
        whiten = inference.model.whiten if inference is not None else None
        if whiten is None or whiten.groups == 1:
            return None
        check_frames(frames, None)
        with torch.inference_mode():
            # a copy: the line's frames are read-only views of their message's buffer
            x = torch.from_numpy(np.array(frames)).to(self.device)
            return inference.route(x).cpu().numpy()

    def submit(self, frames: np.ndarray) -> Pending:
        """Hand a batch over; the result comes from `.result()`. Runners that do not overlap
        run it here and now. The caller must not modify `frames` until the result is in."""
        return Pending.finished(self.run(frames))

    @abstractmethod
    def _run(self, frames: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Host float32 tensors (maps (b, mh, mw), scores (b,)) with b >= len(frames)."""

    def close(self) -> None:
        """Release device memory. The runner is unusable afterwards."""
        if torch.cuda.is_available():
            torch.cuda.synchronize()   # batches still in flight must not lose their buffers
        for name in list(vars(self)):
            if isinstance(getattr(self, name), (torch.nn.Module, dict)):
                setattr(self, name, None)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def __enter__(self) -> "Runner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        model = self.card.model_hash if self.card else "in-memory model"
        return (f"{type(self).__name__}({model}, device={self.device}, "
                f"batch_sizes={self.batch_sizes})")


def _pad_on_device(x: torch.Tensor, b: int) -> torch.Tensor:
    """Repeat the last frame up to b rows; padding on the device keeps the bus at n frames."""
    n = len(x)
    return x if n == b else torch.cat([x, x[-1:].expand(b - n, *x.shape[1:])])


# ---------------------------------------------------------------------------------------------
# eager


class EagerRunner(Runner):
    """Plain PyTorch under inference_mode. Any batch size; fp32 unless told otherwise; on a CPU
    the backbone channels_last with its BatchNorms folded, and the whitening factor in bfloat16
    where the CPU has native bf16 (`whiten_bf16=False` keeps every step float32).

    overlap=True runs each submitted batch on one background thread: PyTorch releases the GIL
    inside its kernels, so the caller's Python work (receiving the next frames, rules, the
    defect log) proceeds while the model computes. One thread: batches still run in order.
    It pays only with a core to spare: on the 2-core box, busy with a producer too, it ran the
    line at 0.86x (benchmarks/results/pipeline.json), so the line does not use it there.
    """

    backend = "eager"

    def __init__(self, model: str | Path | GRAD, device: str = "cpu",
                 batch_sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES,
                 dtype: torch.dtype = torch.float32, overlap: bool = False,
                 whiten_bf16: bool | None = None):
        grad, card = load_model(model)
        super().__init__(card, grad.cfg.image_size, device, batch_sizes, grad.cfg.fit,
                         grad.cfg.tile_overlap)
        self.dtype = dtype
        # On a CPU the backbone runs channels_last with its BatchNorms and padding folded:
        # oneDNN's depthwise convolutions want NHWC, and each fold is one pass over a map
        # fewer; with the bf16 whitening factor, 0.67-0.73x the plain model's time at batch 1
        # (benchmarks/results/cpu_speed.json).
        on_cpu = torch.device(device).type == "cpu"
        whiten_dtype = (fast_whiten_dtype(device) if whiten_bf16 is None
                        else torch.bfloat16 if whiten_bf16 else torch.float32)
        self.inference = InferenceModel(
            grad, dtype=dtype, channels_last=on_cpu, fold_backbone=on_cpu,
            whiten_dtype=whiten_dtype).to(device).eval()
        self.overlaps = overlap
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="eager-runner") if overlap \
            else None

    def submit(self, frames: np.ndarray) -> Pending:
        if self._thread is None:
            return super().submit(frames)
        check_frames(frames, self.max_batch)   # a bad batch fails in the caller, at once
        return Pending(self._thread.submit(self.run, frames).result)

    def close(self) -> None:
        if self._thread is not None:
            self._thread.shutdown(wait=True)
        super().close()

    @torch.inference_mode()
    def _run(self, frames: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.inference(torch.from_numpy(frames).to(self.device))
        return out.anomaly_map.cpu(), out.score.cpu()


# ---------------------------------------------------------------------------------------------
# torch.compile


# Graphs this process's compile runners have asked dynamo for (see make_room_for_graphs).
_compiled_graphs = 0


def make_room_for_graphs(n: int) -> None:
    """Let dynamo compile n more graphs of InferenceModel.forward in this process.

    Every compile runner compiles that same function, once per batch size and frame shape
    (dynamic=False), and dynamo counts the recompiles of a function per process: past
    torch._dynamo.config.recompile_limit (8) it runs the function eagerly from then on, with
    one warning and no error. A process with several runners (a benchmark timing six models,
    a verifier) would then serve the eager model as "compile" (seen in
    benchmarks/cpu_speed.py, whose last two "compile" rows timed eager). So each runner
    raises the limit by the graphs it will need, with room for a second frame shape each.
    """
    global _compiled_graphs
    _compiled_graphs += 2 * n
    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, _compiled_graphs)


class CompileRunner(Runner):
    """torch.compile (inductor) of InferenceModel, one specialised graph per batch size.

    On CUDA: fp16, channels_last, mode "max-autotune-no-cudagraphs" (autotuned kernels, the
    launches left to us) or "reduce-overhead" (inductor captures CUDA graphs itself). On CPU:
    the eager runner's model (fp32, folded, channels_last, bf16 whitening factor where the CPU
    has it) and the default mode, which needs a C++ compiler (inductor emits C++/OpenMP kernels).
    `dynamic=False` specialises to each shape; padding to prepared batch sizes bounds the number
    of recompiles. Compiling takes tens of seconds per shape, so pass `frame_shape` to compile
    every batch size at start-up rather than on the first production batch.
    """

    backend = "compile"
    static_shapes = True

    def __init__(self, model: str | Path | GRAD, device: str = "cuda",
                 batch_sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES,
                 frame_shape: tuple[int, int] | None = None, mode: str | None = None):
        grad, card = load_model(model)
        super().__init__(card, grad.cfg.image_size, device, batch_sizes, grad.cfg.fit,
                         grad.cfg.tile_overlap)
        on_cuda = torch.device(device).type == "cuda"
        if on_cuda and not torch.cuda.is_available():
            raise RuntimeError(f"device {device!r} asked for, but CUDA is not available: "
                               "use device='cpu'")
        self.mode = mode or ("max-autotune-no-cudagraphs" if on_cuda else "default")
        dtype = torch.float16 if on_cuda else torch.float32
        # On a CPU, the eager runner's model (folded, channels_last, bf16 whitening where the
        # CPU has it): inductor compiles the graph it is given, and from the plain model it
        # ran slower than the eager runner (benchmarks/results/cpu_speed.json).
        self.inference = InferenceModel(
            grad, dtype=dtype, channels_last=True, fold_backbone=not on_cuda,
            whiten_dtype=fast_whiten_dtype(device)).to(device)
        make_room_for_graphs(len(self.batch_sizes))
        self.compiled = torch.compile(self.inference, mode=self.mode, dynamic=False)
        if frame_shape is not None:
            self.warm_up(frame_shape)

    def warm_up(self, frame_shape: tuple[int, int]) -> None:
        """Compile every prepared batch size for frames of `frame_shape` (H, W)."""
        for b in self.batch_sizes:
            start = time.perf_counter()
            self._run(np.zeros((b, *frame_shape, 3), np.uint8))
            log.info("compile: batch %d, frames %dx%d compiled in %.1f s (mode %s)", b,
                     *frame_shape, time.perf_counter() - start, self.mode)

    @torch.inference_mode()
    def _run(self, frames: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        b = padded_batch(len(frames), self.batch_sizes)
        x = _pad_on_device(torch.from_numpy(frames).to(self.device, non_blocking=True), b)
        out = self.compiled(x)
        # .cpu() also copies out before the next call: with mode "reduce-overhead" inductor's
        # own CUDA graphs overwrite their outputs on the next replay.
        return out.anomaly_map.cpu(), out.score.cpu()


# ---------------------------------------------------------------------------------------------
# TensorRT


def import_torch_tensorrt():
    """torch_tensorrt, imported only when asked for (it needs CUDA and takes seconds)."""
    try:
        return importlib.import_module("torch_tensorrt")
    except ImportError as exc:
        raise RuntimeError(
            f"the tensorrt backend needs torch_tensorrt, which is not installed ({exc}). On a "
            f"machine with an NVIDIA GPU install the build matching torch {torch.__version__} "
            "(pip install torch-tensorrt), or use backend 'cudagraph'.") from exc


class TensorRTRunner(Runner):
    """Torch-TensorRT programs from an exported artifact, one per batch size, no rebuild.

    Loading follows https://docs.pytorch.org/TensorRT/user_guide/saving_models.html: an
    ExportedProgram saved by torch_tensorrt.save loads with torch_tensorrt.load (or
    torch.export.load) and runs through .module(). The artifact fixes the frame shape.
    """

    backend = "tensorrt"
    static_shapes = True

    def __init__(self, model: str | Path | None, artifact_dir: str | Path,
                 device: str = "cuda"):
        meta = read_meta(artifact_dir)
        if meta.backend != "tensorrt":
            raise ArtifactError(f"{artifact_dir} is a {meta.backend} artifact, not a TensorRT "
                                "one: export with `grad-edge export --backend tensorrt`")
        card = read_card(model)[0] if model is not None else None
        check_compatible(meta, card.model_hash if card else None)
        torch_tensorrt = import_torch_tensorrt()
        if not torch.cuda.is_available():
            raise RuntimeError(f"the tensorrt backend needs a CUDA GPU; {cuda_missing_reason()}")
        super().__init__(card, meta.image_size, device, meta.batch_sizes,
                         *((card.config.fit, card.config.tile_overlap) if card else ()))
        self.meta = meta
        self.frame_shape = meta.frame_shape
        self.programs = {}
        for b in self.batch_sizes:
            loaded = torch_tensorrt.load(str(Path(artifact_dir) / meta.engines[str(b)]))
            if isinstance(loaded, torch.export.ExportedProgram):
                loaded = loaded.module()
            self.programs[b] = loaded
            log.info("tensorrt: loaded batch %d engine from %s", b, meta.engines[str(b)])

    def map_hw(self, frame_hw: tuple[int, int]) -> tuple[int, int]:
        if tuple(frame_hw) == self.frame_shape and self.meta.map_shape:
            return self.meta.map_shape   # recorded at export: right even without the card
        return super().map_hw(frame_hw)

    @torch.inference_mode()
    def _run(self, frames: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        if frames.shape[1:3] != self.frame_shape:
            raise ValueError(f"this TensorRT artifact was built for {self.frame_shape[0]}x"
                             f"{self.frame_shape[1]} frames, got {frames.shape[1]}x"
                             f"{frames.shape[2]}: re-export with --frame-shape "
                             f"{frames.shape[1]} {frames.shape[2]}")
        b = padded_batch(len(frames), self.batch_sizes)
        x = _pad_on_device(torch.from_numpy(frames).to(self.device, non_blocking=True), b)
        out = self.programs[b](x)   # GRADOutput, or a plain tuple after export: same order
        return out[0].float().cpu(), out[1].float().cpu()


# ---------------------------------------------------------------------------------------------
# choosing


def cuda_missing_reason(device: str | None = None) -> str | None:
    """Why CUDA cannot be used here, in words; None when it can."""
    if device is not None and torch.device(device).type != "cuda":
        return f"device {device!r} was asked for"
    if torch.version.cuda is None:
        return f"this torch build has no CUDA (torch {torch.__version__})"
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible (check nvidia-smi and CUDA_VISIBLE_DEVICES)"
    return None


def tensorrt_missing_reason(device: str | None, meta: ArtifactMeta | None) -> str | None:
    if (reason := cuda_missing_reason(device)) is not None:
        return reason
    try:
        import_torch_tensorrt()
    except RuntimeError:
        return "torch_tensorrt is not installed"
    if meta is None:
        return "no artifact was given (build one with `grad-edge export --backend tensorrt`)"
    if meta.backend != "tensorrt":
        return f"the artifact given is a {meta.backend} artifact, not a TensorRT one"
    return None


def pick_backend(device: str | None, meta: ArtifactMeta | None) -> tuple[str, dict[str, str]]:
    """The best backend available and, for each better one, why it was not.

    compile is never picked on its own: it compiles for minutes at start-up and, on CUDA, is
    no faster than a captured graph for this model; ask for it by name.
    """
    skipped = {}
    for backend, reason in (("tensorrt", tensorrt_missing_reason(device, meta)),
                            ("cudagraph", cuda_missing_reason(device))):
        if reason is None:
            return backend, skipped
        skipped[backend] = reason
    return "eager", skipped


def open_runner(model_path: str | Path, backend: str = "auto", device: str | None = None,
                batch_sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES,
                artifact: str | Path | None = None) -> Runner:
    """The runner the line uses. `artifact` (from `grad-edge export`) fixes the batch sizes and
    frame shape it was exported for, so graphs are captured or compiled at start-up."""
    meta = read_meta(artifact) if artifact is not None else None
    if backend == "auto":
        backend, skipped = pick_backend(device, meta)
        why = "; ".join(f"not {b}: {r}" for b, r in skipped.items())
        log.info("runner: picked %s%s", backend, f" ({why})" if why else "")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    frame_shape = None
    if meta is not None:
        if backend != "tensorrt":  # the TensorRT runner checks its own artifact fully
            check_compatible(meta, read_card(model_path)[0].model_hash)
        batch_sizes, frame_shape = meta.batch_sizes, meta.frame_shape
    if backend == "eager":
        return EagerRunner(model_path, device=device, batch_sizes=batch_sizes)
    if backend == "compile":
        return CompileRunner(model_path, device=device, batch_sizes=batch_sizes,
                             frame_shape=frame_shape)
    if backend == "cudagraph":
        from deploy.cudagraph import CudaGraphRunner   # it builds on this module's Runner
        return CudaGraphRunner(model_path, device=device, batch_sizes=batch_sizes,
                               frame_shape=frame_shape)
    if backend == "tensorrt":
        if artifact is None:
            raise ValueError("the tensorrt backend loads prebuilt engines: pass artifact=DIR "
                             "from `grad-edge export --backend tensorrt`")
        return TensorRTRunner(model_path, artifact, device=device)
    raise ValueError(f"unknown backend {backend!r}; choose auto, tensorrt, cudagraph, compile "
                     "or eager")
