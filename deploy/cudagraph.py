"""The CUDA graph backend: InferenceModel (fp16, channels_last) captured once per batch size and
frame shape and replayed, with two pinned slots per graph so that one batch's copy to the device
overlaps the previous batch's replay. Opened by `deploy.runner.open_runner` (backend
"cudagraph", picked on a CUDA machine without TensorRT); the interface is `deploy.runner.Runner`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from deploy.inference import InferenceModel
from deploy.runner import (DEFAULT_BATCH_SIZES, Pending, Runner, RunnerOutput, check_frames,
                           cuda_missing_reason, load_model, padded_batch)
from grad.model import GRAD

log = logging.getLogger(__name__)


def capture_graph(fn, static_input: torch.Tensor, warmup: int = 3):
    """Capture fn(static_input) into a CUDA graph; returns (graph, static outputs).

    As documented for whole-network capture
    (https://docs.pytorch.org/docs/stable/notes/cuda.html#whole-network-capture): warm up on a
    side stream first, so lazy initialisation (cuDNN/cuBLAS handles, autotuning, allocator
    growth) happens outside the capture; then capture. torch.cuda.graph sets its own side
    stream as the current stream while capturing
    (https://docs.pytorch.org/docs/stable/generated/torch.cuda.graph.html). Afterwards, refill
    `static_input` in place and call graph.replay(); the outputs are rewritten in place.
    """
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn(static_input)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = fn(static_input)
    return graph, outputs


@dataclass
class Slot:
    """One batch's way through the bus. Two per graph, used in turn, so batch k+1 is copied to
    the device while batch k's graph runs; a slot is reused only after its batch is collected."""

    host_in: torch.Tensor      # (b, H, W, 3) uint8, pinned: where the frames are staged
    staging: torch.Tensor      # (b, H, W, 3) uint8 on the GPU: the copy stream's target
    host_maps: torch.Tensor    # (b, mh, mw) float32, pinned: the results land here
    host_scores: torch.Tensor  # (b,) float32, pinned
    copied: torch.cuda.Event   # the frames are on the device (recorded on the copy stream)
    started: torch.cuda.Event  # timing: the copy began
    done: torch.cuda.Event     # timing and completion: results are in the host buffers
    pending: Pending | None = None   # the batch using this slot, until it is collected


@dataclass
class CapturedBatch:
    """Everything one captured graph reads and writes; the addresses must never change."""

    graph: torch.cuda.CUDAGraph
    device_in: torch.Tensor    # (b, H, W, 3) uint8 on the GPU: the graph's static input
    maps: torch.Tensor         # (b, mh, mw) float32 on the GPU: the graph's static output
    scores: torch.Tensor       # (b,) float32 on the GPU
    slots: list[Slot]
    turn: int = 0              # the slot the next batch uses


class CudaGraphRunner(Runner):
    """fp16, channels_last InferenceModel replayed from one CUDA graph per batch and shape.

    Per batch (`submit`): frames -> the slot's pinned host buffer -> async copy to the slot's
    device buffer on a copy stream -> (compute stream waits for that copy) device-to-device copy
    into the graph's static input -> replay -> async copies of the outputs to the slot's pinned
    host buffers -> `done` event. `submit` returns there; `Pending.result()` waits for `done`.
    With two slots the host-to-device copy of batch k+1 runs on the copy engine while batch k's
    graph runs: submit the next batch before collecting the last. Only the n real frames cross
    the bus; padding rows keep whatever they held. The device-to-device copy (~3 TB/s on an
    H200) is what lets one graph serve both slots, instead of capturing each graph twice.

    `device_ms` runs from the start of the batch's copy to its results on the host, so with a
    batch ahead of it on the GPU it includes the wait behind that batch.

    Each graph gets its own memory pool (the default): graphs sharing a pool must be replayed
    in capture order, which a worker seeing mixed batch sizes cannot promise. The cost is memory:
    at 1080p the float copy of a batch of 32 frames is ~0.8 GB per graph, so on a small GPU
    prepare fewer batch sizes.
    """

    backend = "cudagraph"
    static_shapes = True
    overlaps = True
    slots_per_graph = 2

    def __init__(self, model: str | Path | GRAD, device: str = "cuda",
                 batch_sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES,
                 frame_shape: tuple[int, int] | None = None, warmup: int = 3):
        if not torch.cuda.is_available():
            raise RuntimeError(f"the cudagraph backend needs a CUDA GPU; {cuda_missing_reason()}."
                               " Use backend 'eager' on this machine.")
        if torch.device(device).type != "cuda":
            raise ValueError(f"the cudagraph backend runs on a CUDA device, not {device!r}")
        grad, card = load_model(model)
        super().__init__(card, grad.cfg.image_size, device, batch_sizes, grad.cfg.fit,
                         grad.cfg.tile_overlap)
        self.warmup = warmup
        # Shapes never change inside a graph, so let cuDNN time its algorithms for each conv
        # during the warm-up before capture; the graph then replays the winners. Process-wide.
        torch.backends.cudnn.benchmark = True
        self.inference = InferenceModel(grad, dtype=torch.float16,
                                        channels_last=True).to(device).eval()
        self.copy_stream = torch.cuda.Stream(device=self.device)
        self.graphs: dict[tuple[int, int, int], CapturedBatch] = {}
        if frame_shape is not None:
            for b in self.batch_sizes:
                self.captured(b, *frame_shape)

    def _slot(self, b: int, h: int, w: int) -> Slot:
        mh, mw = self.map_hw((h, w))
        return Slot(
            host_in=torch.zeros((b, h, w, 3), dtype=torch.uint8, pin_memory=True),
            # Only [:n] is ever read, after being written: no fill to race the copy stream.
            staging=torch.empty((b, h, w, 3), dtype=torch.uint8, device=self.device),
            host_maps=torch.empty((b, mh, mw), dtype=torch.float32, pin_memory=True),
            host_scores=torch.empty((b,), dtype=torch.float32, pin_memory=True),
            copied=torch.cuda.Event(), started=torch.cuda.Event(enable_timing=True),
            done=torch.cuda.Event(enable_timing=True))

    @torch.inference_mode()
    def captured(self, b: int, h: int, w: int) -> CapturedBatch:
        """The graph for batch b and h x w frames, captured on first use (logged: it takes
        a few hundred ms and allocates the graph's memory)."""
        key = (b, h, w)
        if key in self.graphs:
            return self.graphs[key]
        start = time.perf_counter()
        device_in = torch.zeros((b, h, w, 3), dtype=torch.uint8, device=self.device)
        graph, out = capture_graph(self.inference, device_in, self.warmup)
        entry = CapturedBatch(graph=graph, device_in=device_in, maps=out.anomaly_map,
                              scores=out.score,
                              slots=[self._slot(b, h, w) for _ in range(self.slots_per_graph)])
        self.graphs[key] = entry
        # Whatever the compute stream queued while setting up (allocations, the capture's
        # warm-up) is done before the copy stream first touches these buffers.
        self.copy_stream.wait_stream(torch.cuda.current_stream(self.device))
        log.info("cudagraph: captured batch %d for %dx%d frames in %.0f ms", b, h, w,
                 1000 * (time.perf_counter() - start))
        return entry

    @torch.inference_mode()
    def submit(self, frames: np.ndarray) -> Pending:
        check_frames(frames, self.max_batch)
        frames = np.ascontiguousarray(frames)
        n, h, w = frames.shape[:3]
        g = self.captured(padded_batch(n, self.batch_sizes), h, w)
        slot = g.slots[g.turn]
        g.turn = (g.turn + 1) % len(g.slots)
        if slot.pending is not None:
            # Its batch must be off the slot's buffers first: collecting it waits for `done`,
            # after which its host-to-device copy, replay and copies out have all finished.
            slot.pending.result()
        slot.host_in[:n].copy_(torch.from_numpy(frames))      # host memcpy into pinned memory
        compute = torch.cuda.current_stream(self.device)
        # The copy stream must not overwrite `staging` before the compute stream has read the
        # slot's previous batch out of it: that read happened before `done`, collected above.
        with torch.cuda.stream(self.copy_stream):
            slot.started.record()
            # Pinned source + non_blocking: a DMA on the copy engine, concurrent with compute.
            slot.staging[:n].copy_(slot.host_in[:n], non_blocking=True)
            slot.copied.record()
        compute.wait_event(slot.copied)
        g.device_in[:n].copy_(slot.staging[:n])               # device to device, in order
        g.graph.replay()
        slot.host_maps.copy_(g.maps, non_blocking=True)
        slot.host_scores.copy_(g.scores, non_blocking=True)
        slot.done.record()
        pending = Pending(lambda: self._collect(slot, n))
        slot.pending = pending
        return pending

    def _collect(self, slot: Slot, n: int) -> RunnerOutput:
        slot.done.synchronize()
        out = RunnerOutput(scores=slot.host_scores[:n].numpy().copy(),
                           maps=slot.host_maps[:n].numpy().copy(),
                           device_ms=slot.started.elapsed_time(slot.done))
        slot.pending = None
        return out

    def run(self, frames: np.ndarray) -> RunnerOutput:
        return self.submit(frames).result()

    def _run(self, frames: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError("CudaGraphRunner runs through submit()")
