"""The one module every backend runs: uint8 BGR frames in, anomaly map and score out.

    frames (B, h, w, 3) uint8 BGR  ->  Preprocess (flip to RGB, resize, normalise, tiles)
                                   ->  GRAD (backbone, two grids, refinement, map, stitch,
                                       blur, max)
                                   ->  GRADOutput(anomaly_map (B, mh, mw), score (B,))

The map is (H, W) of the model input for a stretched picture, or the aspect-kept scaled
picture when the config tiles (`map_hw` says which for a frame shape; `grad.tiling`).

A frame crosses the host-to-device bus once, as uint8 (a quarter of the bytes of float32), and
everything after that runs on the device: inside the captured CUDA graph, the compiled graph or
the TensorRT engine. Eager, torch.compile, CUDA graph and TensorRT all wrap exactly this class,
so the same frame gives the same score on every backend up to the precision each one runs at.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from grad.model import GRAD, GRADOutput
from grad.preprocess import Preprocess
from grad.tiling import TilePlan


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 matrices natively (oneDNN on AVX512-BF16 or AMX).

    Where it does, a bf16 whitening factor halves the whitening's time at batch 1 (8 -> 4 ms,
    256 x 256) and moved no metric in the fourth decimal (benchmarks/results/accuracy.json,
    the `bf16_*` entries). oneDNN's own bf16 check also says yes on AVX-512 CPUs without
    BF16 instructions (Skylake, Cascade Lake), where it emulates bf16: unmeasured there, so
    the CPU's instruction set is asked instead.
    """
    try:
        return bool(torch.backends.mkldnn.is_available()
                    and (torch.cpu._is_avx512_bf16_supported()
                         or torch.cpu._is_amx_tile_supported()))
    except (AttributeError, RuntimeError):   # private probes: absent in some builds
        return False


def fast_whiten_dtype(device: str | torch.device) -> torch.dtype:
    """The whitening factor's dtype for the CPU runners: bfloat16 on a CPU with native bf16,
    float32 anywhere else (a GPU runs its own precision; see the runners)."""
    on_cpu = torch.device(device).type == "cpu"
    return torch.bfloat16 if on_cpu and cpu_has_bf16() else torch.float32


class InferenceModel(nn.Module):
    """Preprocess(bgr=True) + GRAD, at a chosen compute precision and memory layout.

    `dtype` is the precision of the network (float32, or float16 on a GPU); resizing (in
    whole grey levels, `grad.preprocess`) and normalisation run before the cast, so 1080p
    pixels are averaged before any rounding to fp16. `channels_last` lays the network input
    out NHWC, which is what cuDNN's fp16 tensor-core convolutions want, and what oneDNN's
    depthwise convolutions want on a CPU.
    `fold_backbone` folds the frozen backbone's BatchNorms into its convolutions and its
    stride-2 SAME padding into their kernels (`LiteFeatures.fold_batchnorm`, `fold_padding`).
    `whiten_dtype` is what the whitening factor is stored and multiplied in: bfloat16 halves
    the bytes of the largest tensor read per frame (see `cpu_has_bf16`). A conversion works on
    a copy of `model`, so the caller's model (often shared, e.g. the eager reference in
    `deploy.verify`) is never altered.
    """

    def __init__(self, model: GRAD, dtype: torch.dtype = torch.float32,
                 channels_last: bool = False, fold_backbone: bool = False,
                 whiten_dtype: torch.dtype = torch.float32):
        super().__init__()
        if (dtype != torch.float32 or channels_last or fold_backbone
                or whiten_dtype != torch.float32):
            model = copy.deepcopy(model)
            if fold_backbone:
                # In float32, before any cast: the folded weights are products of two tensors.
                model.backbone.fold_batchnorm().fold_padding()
            # Only the networks run at `dtype`. The anomaly map is computed in float32
            # (grad.model.GRAD.anomaly), and its constants (residual scale, blur, upsampling
            # matrices) are never cast: a round trip through fp16 would round them (a small
            # trained residual scale to 0). Whitening stays float32 as well: it multiplies by
            # the inverse of a covariance, whose large entries fp16 would round; its output is
            # cast to the head's dtype. bfloat16 has float32's range: only the factor is
            # stored in it, if asked.
            model.backbone.to(dtype=dtype)
            model.head.to(dtype=dtype)
            if model.whiten is not None:
                model.whiten.factor.data = model.whiten.factor.data.to(whiten_dtype)
            if model.memory is not None:
                # The local memory's bank (grad.memory), the next largest read per frame, the
                # same way: centred, it keeps its distances to 4 decimals of the metrics.
                model.memory.bank.data = model.memory.bank.data.to(whiten_dtype)
            if model.global_memory is not None:
                # The global memory's bank alike (centred; metrics: benchmarks/accuracy.py's
                # bf16_* entries).
                model.global_memory.bank.data = model.global_memory.bank.data.to(whiten_dtype)
            if channels_last:
                # The backbone's convolutions only: converting the whole model would lay the
                # grids out NHWC too, and grid_sample on a channels_last fp16 grid returns NaN
                # on the CPU (torch 2.13; tests/deploy/test_runner.py) and gains nothing.
                model.backbone.to(memory_format=torch.channels_last)
        self.preprocess = Preprocess.for_config(model.cfg, bgr=True)
        self.model = model.eval()
        self.dtype = dtype
        self.channels_last = channels_last

    @property
    def input_hw(self) -> tuple[int, int]:
        return self.model.cfg.input_hw

    def map_hw(self, frame_hw: tuple[int, int]) -> tuple[int, int]:
        """(h, w) of the anomaly map for frames of `frame_hw` (H, W)."""
        return self.preprocess.plan(*frame_hw).scaled_hw

    def inputs(self, frames: torch.Tensor) -> tuple[torch.Tensor, TilePlan]:
        """uint8 frames (B, h, w, 3) -> the network's inputs (B*n, 3, H, W) and their plan."""
        plan = self.preprocess.plan(frames.shape[1], frames.shape[2])
        x = self.preprocess(frames).to(self.dtype)           # (B*n, 3, H, W)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, plan

    def route(self, frames: torch.Tensor) -> torch.Tensor:
        """Each frame's product group (B,) in a unified model (`GRAD.route`)."""
        return self.model.route(*self.inputs(frames))

    def forward(self, frames: torch.Tensor) -> GRADOutput:
        x, plan = self.inputs(frames)
        out = self.model(x, plan)
        # Results leave in float32 whatever the compute precision: the line compares scores to
        # a float32 threshold, and casting here keeps the cast inside the captured graph.
        return GRADOutput(out.anomaly_map.float(), out.score.float())  # (B, mh, mw), (B,)
