"""Runners on the real tiny GRAD: eager parity with GRAD, padding, backend choice, compile on
CPU, CUDA graphs (GPU only), and the GPU benchmark's dry run."""

import copy
import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from deploy.artifact import new_meta, write_meta
from deploy.export import export
from deploy.inference import InferenceModel, cpu_has_bf16
from deploy.cudagraph import CudaGraphRunner
from deploy.runner import (CompileRunner, EagerRunner, RunnerOutput, TensorRTRunner, open_runner,
                           padded_batch)
from grad.config import get_config
from grad.model import GRAD
from grad.preprocess import Preprocess

REPO = Path(__file__).resolve().parents[2]
needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs a CUDA GPU: CUDA graphs are captured and replayed on the device")


def reference(tiny_model, frames: np.ndarray):
    """The training/eval path: frames flipped to RGB on the host, then Preprocess + GRAD."""
    rgb = torch.from_numpy(np.ascontiguousarray(frames[..., ::-1]))
    with torch.inference_mode():
        return tiny_model(Preprocess(tiny_model.cfg.image_size)(rgb))


def test_eager_runner_gives_grad_scores_when_frames_are_bgr_uint8(checkpoint, tiny_model,
                                                                 bgr_frames):
    frames = bgr_frames(3)
    with EagerRunner(checkpoint) as runner:
        out = runner.run(frames)
    ref = reference(tiny_model, frames)
    assert isinstance(out, RunnerOutput)
    assert out.scores.dtype == np.float32 and out.scores.shape == (3,)
    assert out.maps.shape == (3, 64, 64)
    # The runner's backbone is channels_last with its BatchNorms folded (same arithmetic,
    # another order of float operations): equal to ~1e-6 relative, not bit for bit.
    np.testing.assert_allclose(out.scores, ref.score.numpy(), rtol=1e-5)
    np.testing.assert_allclose(out.maps, ref.anomaly_map.numpy(), rtol=1e-5, atol=1e-4)
    assert out.scores[0] != out.scores[1]   # different frames, different scores
    assert out.device_ms > 0
    assert runner.card.model_hash and runner.image_size == 64


def test_eager_runner_rejects_frames_when_not_uint8_bgr(checkpoint, bgr_frames):
    runner = EagerRunner(checkpoint)
    with pytest.raises(ValueError, match="uint8 \\(B, H, W, 3\\)"):
        runner.run(bgr_frames(2).astype(np.float32))
    with pytest.raises(ValueError, match="uint8"):
        runner.run(bgr_frames(1)[0])            # a single frame, not a batch


def test_fp16_scores_stay_finite_when_squared_residuals_exceed_fp16_range(tiny_model,
                                                                          bgr_frames):
    # A residual scale of 1e-2 multiplies the squared residuals by 1e4: their channel sum is
    # far past fp16's 65504, as a strong defect's can come close to on a real model. The map
    # is computed in float32, so fp16 must still agree with fp32 instead of reading inf.
    loud = copy.deepcopy(tiny_model)
    loud.residual_scale.fill_(1e-2)
    frames = torch.from_numpy(bgr_frames(2))
    with torch.inference_mode():
        ref = InferenceModel(loud)(frames)
        half = InferenceModel(loud, dtype=torch.float16)(frames)
    assert ref.score.min() ** 2 > 65504          # score = sqrt(sum of squares): past fp16
    assert torch.isfinite(half.score).all() and torch.isfinite(half.anomaly_map).all()
    np.testing.assert_allclose(half.score.numpy(), ref.score.numpy(), rtol=2e-2)


def test_fp16_channels_last_matches_fp32_when_grids_are_full_size(bgr_frames):
    # The CUDA-graph runner's layout, at the edge config's real grid sizes (the tiny config's
    # small grids do not show it): a channels_last fp16 grid made grid_sample return NaN.
    # Minimal repro on torch 2.13 CPU:
    #   grid = torch.randn(1, 152, 32, 32).half().contiguous(memory_format=torch.channels_last)
    #   uv = torch.rand(2, 32, 32, 2).half() * 2 - 1
    #   F.grid_sample(grid.expand(2, -1, -1, -1), uv, align_corners=False).isnan().any()  # True
    from grad.config import get_config
    from grad.model import GRAD

    torch.manual_seed(0)
    edge = GRAD(get_config("edge")).eval()
    frames = torch.from_numpy(bgr_frames(2, 96, 128))
    with torch.inference_mode():
        ref = InferenceModel(edge)(frames)
        half = InferenceModel(edge, dtype=torch.float16, channels_last=True)(frames)
    assert torch.isfinite(half.score).all() and torch.isfinite(half.anomaly_map).all()
    np.testing.assert_allclose(half.score.numpy(), ref.score.numpy(), rtol=1e-2)


def test_eager_runner_hands_back_results_in_order_when_batches_overlap(checkpoint, bgr_frames):
    frames = [bgr_frames(2, seed=i) for i in range(3)]
    with EagerRunner(checkpoint) as plain:
        expected = [plain.run(f).scores for f in frames]
    with EagerRunner(checkpoint, overlap=True) as runner:
        assert runner.overlaps
        pending = [runner.submit(f) for f in frames]      # all three handed over first
        got = [p.result().scores for p in pending]
        assert pending[0].result() is pending[0].result()  # collected once, kept
    for g, e in zip(got, expected):
        np.testing.assert_array_equal(g, e)


def test_overlapping_runner_raises_a_failed_batch_from_result_and_a_bad_one_at_submit(
        checkpoint, bgr_frames):
    class Failing(EagerRunner):
        def _run(self, frames):
            raise RuntimeError("device fell over")

    with Failing(checkpoint, overlap=True) as runner:
        pending = runner.submit(bgr_frames(1))             # returns: the failure is on the thread
        with pytest.raises(RuntimeError, match="device fell over"):
            pending.result()
        with pytest.raises(ValueError, match="uint8"):
            runner.submit(bgr_frames(1).astype(np.float32))


def test_padded_batch_picks_smallest_prepared_size_when_batch_is_smaller():
    assert padded_batch(1, (1, 8, 32)) == 1
    assert padded_batch(5, (1, 8, 32)) == 8
    assert padded_batch(32, (1, 8, 32)) == 32
    with pytest.raises(ValueError, match="no prepared batch size"):
        padded_batch(33, (1, 8, 32))


def test_open_runner_picks_eager_and_logs_why_when_cuda_is_absent(checkpoint, caplog):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA, so auto does not fall back to eager")
    with caplog.at_level(logging.INFO, logger="deploy.runner"):
        runner = open_runner(checkpoint)
    assert isinstance(runner, EagerRunner) and runner.device == "cpu"
    text = caplog.text
    assert "picked eager" in text
    assert "not tensorrt:" in text and "not cudagraph:" in text
    assert "CUDA" in text


def test_open_runner_takes_artifact_batch_sizes_when_given_an_artifact(checkpoint, tmp_path):
    meta = export(checkpoint, "eager", (2, 4), (80, 96), out_dir=tmp_path / "art")
    runner = open_runner(checkpoint, backend="eager", device="cpu", artifact=tmp_path / "art")
    assert runner.batch_sizes == meta.batch_sizes == (2, 4)


def test_tensorrt_runner_says_how_to_install_when_torch_tensorrt_is_absent(checkpoint, tmp_path):
    try:
        import torch_tensorrt  # noqa: F401
        pytest.skip("torch_tensorrt is installed here")
    except ImportError:
        pass
    from grad.checkpoint import read_card
    card, _ = read_card(checkpoint)
    write_meta(tmp_path, new_meta(card.model_hash, "tensorrt", "fp16", (1,), (80, 96), 64))
    with pytest.raises(RuntimeError, match="pip install torch-tensorrt"):
        TensorRTRunner(checkpoint, tmp_path, device="cpu")


def inductor_cpu_works() -> bool:
    return shutil.which("g++") is not None or shutil.which("c++") is not None


@pytest.mark.slow  # inductor's first compile: 20-60 s on 2 busy cores
@pytest.mark.skipif(not inductor_cpu_works(), reason="inductor on CPU needs a C++ compiler")
def test_compile_runner_matches_eager_and_pads_when_batch_is_below_prepared(
        checkpoint, tiny_model, bgr_frames):
    # One prepared size and frames at the model's size (no resize to compile): one compile,
    # ~20-30 s cold on 2 cores, seconds with inductor's on-disk cache.
    frames = bgr_frames(3, 64, 64)
    runner = CompileRunner(checkpoint, device="cpu", batch_sizes=(4,))
    out = runner.run(frames)
    ref = reference(tiny_model, frames)
    assert out.scores.shape == (3,) and out.maps.shape == (3, 64, 64)   # padded 3 -> 4 -> 3
    np.testing.assert_allclose(out.scores, ref.score.numpy(), rtol=1e-4)
    np.testing.assert_allclose(out.maps, ref.anomaly_map.numpy(), rtol=1e-4, atol=1e-3)
    with pytest.raises(ValueError, match="larger than the largest prepared batch size 4"):
        runner.run(bgr_frames(5))


@needs_cuda
def test_cudagraph_runner_matches_eager_within_fp16_when_replayed(checkpoint, bgr_frames):
    frames = bgr_frames(3)
    runner = CudaGraphRunner(checkpoint, batch_sizes=(1, 4), frame_shape=(80, 96))
    assert set(runner.graphs) == {(1, 80, 96), (4, 80, 96)}
    ref = EagerRunner(checkpoint, device="cuda").run(frames)
    out = runner.run(frames)
    again = runner.run(frames)          # replays reuse the buffers: same answer twice
    assert out.scores.shape == (3,)
    np.testing.assert_allclose(out.scores, ref.scores, rtol=1e-2)
    np.testing.assert_array_equal(out.scores, again.scores)
    single = runner.run(frames[1:2])
    # Another graph (batch 1): cuDNN may time other algorithms for it, so fp16's tolerance.
    np.testing.assert_allclose(single.scores[0], out.scores[1], rtol=1e-2)


@needs_cuda
def test_cudagraph_runner_gives_run_results_when_batches_are_submitted_before_collected(
        checkpoint, bgr_frames):
    batches = [bgr_frames(3, seed=i) for i in range(5)]
    runner = CudaGraphRunner(checkpoint, batch_sizes=(4,), frame_shape=(80, 96))
    one_by_one = [runner.run(b) for b in batches]
    # One in flight while the next is copied, as the worker does; the third submit reuses the
    # first slot, which must first hand over its batch's results.
    got, pending = [], None
    for b in batches:
        nxt = runner.submit(b)
        if pending is not None:
            got.append(pending.result())
        pending = nxt
    got.append(pending.result())
    for g, e in zip(got, one_by_one):
        np.testing.assert_array_equal(g.scores, e.scores)
        np.testing.assert_array_equal(g.maps, e.maps)
        assert g.device_ms > 0
    burst = [runner.submit(b) for b in batches]       # more in flight than slots
    for p, e in zip(burst, one_by_one):
        np.testing.assert_array_equal(p.result().scores, e.scores)


@needs_cuda
def test_open_runner_picks_cudagraph_when_cuda_is_there_without_tensorrt(checkpoint, caplog):
    with caplog.at_level(logging.INFO, logger="deploy.runner"):
        runner = open_runner(checkpoint, batch_sizes=(1,))
    assert runner.backend in ("cudagraph", "tensorrt")
    assert f"picked {runner.backend}" in caplog.text


def test_gpu_benchmark_runs_its_code_paths_when_dry_run_on_cpu(checkpoint, tmp_path):
    out = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu.py"), "--dry-run",
                           "--model", str(checkpoint), "--out", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["dry_run"] is True
    rows = result["rows"]
    kinds = {r["kind"] for r in rows}
    assert {"model", "end_to_end", "backbone"} <= kinds
    measured = [r for r in rows if r.get("median_ms") is not None]
    assert measured and all(r["images_per_s"] > 0 for r in measured)
    assert result["agreement"]["tiny"]["score_rel_max"] < 5e-2
    assert result["complete"] is True
    trained = result["verify_trained"]         # fp16 vs fp32 on the checkpoint, via verify()
    assert trained["n_images"] == 6 and 0 < trained["score_rel_max"] < 5e-2
    assert trained["map_corr_min"] > 0.9 and trained["auroc_reference"] is not None
    assert "images/s" in proc.stdout


def test_eager_runner_whitens_in_bf16_on_a_cpu_that_has_it_within_a_percent_of_float32(
        bgr_frames):
    """The CPU line stores the whitening factor in bfloat16 where the CPU multiplies it
    natively; scores stay within 1% of the all-float32 path, which whiten_bf16=False keeps."""
    torch.manual_seed(0)
    model = GRAD(get_config("tiny", whiten=True, refine_k=None)).eval()
    with torch.no_grad():
        model.whiten.fit(model.pool(model.backbone(torch.randn(12, 3, 64, 64))))
    frames = bgr_frames(4)
    auto, exact = EagerRunner(model), EagerRunner(model, whiten_bf16=False)
    bf16 = EagerRunner(model, whiten_bf16=True)
    factor = {r: r.inference.model.whiten.factor.dtype for r in (auto, exact, bf16)}
    assert factor[exact] == torch.float32 and factor[bf16] == torch.bfloat16
    assert factor[auto] == (torch.bfloat16 if cpu_has_bf16() else torch.float32)
    assert model.whiten.factor.dtype == torch.float32        # the caller's model untouched
    a, b = exact.run(frames), bf16.run(frames)
    ref = reference(model, frames)
    np.testing.assert_allclose(a.scores, ref.score.numpy(), rtol=1e-5)
    np.testing.assert_allclose(b.scores, a.scores, rtol=1e-2)
    assert not np.array_equal(b.scores, a.scores)            # bf16 really ran
    assert np.corrcoef(b.maps.ravel(), a.maps.ravel())[0, 1] > 0.999


def test_runners_run_the_local_memory_as_the_model_does_and_batches_score_as_frames_alone(
        bgr_frames):
    """A model with a local memory (grad.memory) through the eager runner (bank in float32 and
    bf16) and the compiled graph: the reference's scores, and a batch scores as its frames one
    by one (the search must not mix the frames of a batch)."""
    torch.manual_seed(0)
    model = GRAD(get_config("tiny", whiten=True, refine_k=None, local_memory=0.3)).eval()
    with torch.no_grad():
        train = Preprocess.for_config(model.cfg, bgr=True)(torch.from_numpy(bgr_frames(8,
                                                                                    seed=3)))
        feats = model.features(train)
        model.whiten.fit(model.pool(model.backbone(train)))
        model.memory.fit(model.features(train), size=5)
        model.memory.scale.fill_(2.0)
    assert not torch.equal(feats, model.features(train))     # fitted on whitened features
    frames = bgr_frames(3, seed=4)
    ref = reference(model, frames)
    bf16 = EagerRunner(model, whiten_bf16=True)
    assert bf16.inference.model.memory.bank.dtype == torch.bfloat16
    assert model.memory.bank.dtype == torch.float32          # the caller's model untouched
    for runner, rtol in ((EagerRunner(model, whiten_bf16=False), 1e-5), (bf16, 1e-2),
                         # (the compiled graph is built from the eager runner's model: bf16
                         # where the CPU has it)
                         (CompileRunner(model, device="cpu", batch_sizes=(3,)), 1e-2)):
        out = runner.run(frames)
        np.testing.assert_allclose(out.scores, ref.score.numpy(), rtol=rtol)
        alone = np.concatenate([runner.run(f[None]).scores for f in frames])
        np.testing.assert_allclose(out.scores, alone, rtol=2e-3)


def test_runners_run_the_global_memory_as_the_model_does_and_batches_score_as_frames_alone(
        bgr_frames):
    """A model with a global memory (PatchCore's search on the raw backbone features) through
    the eager runner (bank in float32 and bf16) and the compiled graph: the reference's
    scores, and a batch scores as its frames one by one."""
    torch.manual_seed(0)
    model = GRAD(get_config("tiny", whiten=True, refine_k=None, global_memory=0.8)).eval()
    with torch.no_grad():
        train = Preprocess.for_config(model.cfg, bgr=True)(torch.from_numpy(bgr_frames(8,
                                                                                    seed=3)))
        model.whiten.fit(model.pool(model.backbone(train)))
        model.global_memory.fit(model.backbone(train), ratio=0.25)
        model.global_memory.scale.fill_(2.0)
    frames = bgr_frames(3, seed=4)
    ref = reference(model, frames)
    bf16 = EagerRunner(model, whiten_bf16=True)
    assert bf16.inference.model.global_memory.bank.dtype == torch.bfloat16
    assert model.global_memory.bank.dtype == torch.float32   # the caller's model untouched
    for runner, rtol in ((EagerRunner(model, whiten_bf16=False), 1e-5), (bf16, 1e-2),
                         (CompileRunner(model, device="cpu", batch_sizes=(3,)), 1e-2)):
        out = runner.run(frames)
        np.testing.assert_allclose(out.scores, ref.score.numpy(), rtol=rtol)
        alone = np.concatenate([runner.run(f[None]).scores for f in frames])
        np.testing.assert_allclose(out.scores, alone, rtol=2e-3)


def test_runners_route_each_frame_of_a_unified_model_to_its_products_whitening(bgr_frames):
    """Two products' statistics in one model: a batch mixing them scores as each frame alone,
    through the eager runner (bf16 and fp32 whitening) and the compiled graph."""
    torch.manual_seed(0)
    model = GRAD(get_config("tiny", whiten=True, refine_k=None, whiten_groups=2)).eval()
    dark, bright = bgr_frames(3, seed=1) // 4, bgr_frames(3, seed=2) // 4 + 180
    with torch.no_grad():
        x = Preprocess.for_config(model.cfg, bgr=True)(
            torch.from_numpy(np.concatenate([dark, bright])))
        model.whiten.fit(model.pool(model.backbone(x)), torch.tensor([0] * 3 + [1] * 3))
        assert model.whiten.route(model.pool(model.backbone(x))).tolist() == [0] * 3 + [1] * 3
    mixed = np.concatenate([dark[:1], bright[:1], dark[1:2]])
    ref = reference(model, mixed)
    for runner in (EagerRunner(model, whiten_bf16=False), EagerRunner(model, whiten_bf16=True),
                   CompileRunner(model, device="cpu", batch_sizes=(3,))):
        out = runner.run(mixed)
        alone = np.concatenate([runner.run(f[None]).scores for f in mixed])
        np.testing.assert_allclose(out.scores, ref.score.numpy(), rtol=1e-2)
        # (bf16 rounds a batch of 3 and a batch of 1 a little differently: 5e-4 measured; a
        # frame whitened by the other product's statistics scores far off)
        np.testing.assert_allclose(out.scores, alone, rtol=2e-3)
        # The line's product check asks the same runner which product each frame looks like.
        assert runner.route(mixed).tolist() == [0, 1, 0]


def test_runner_route_is_none_for_one_product_and_a_tiled_frame_routes_as_one(bgr_frames,
                                                                              tiny_model):
    """A model of one product (whitened or not) has nothing to route (None); a tiling unified
    model routes each frame once, by its tiles' distances to each product together."""
    one = GRAD(get_config("tiny", whiten=True, refine_k=None)).eval()
    assert EagerRunner(tiny_model).route(bgr_frames(2)) is None
    assert EagerRunner(one).route(bgr_frames(2)) is None
    torch.manual_seed(0)
    model = GRAD(get_config("tiny", whiten=True, refine_k=None, whiten_groups=2,
                            fit="tile")).eval()
    dark, bright = bgr_frames(2, 64, 192, seed=1) // 4, bgr_frames(2, 64, 192, seed=2) // 4 + 180
    frames = np.concatenate([dark, bright])
    pre = Preprocess.for_config(model.cfg, bgr=True)
    with torch.no_grad():
        x = pre(torch.from_numpy(frames))
        n = pre.plan(64, 192).n
        assert n > 1 and len(x) == 4 * n
        model.whiten.fit(model.pool(model.backbone(x)), torch.tensor([0] * 2 * n + [1] * 2 * n))
    runner = EagerRunner(model, whiten_bf16=False)
    assert runner.route(frames).tolist() == [0, 0, 1, 1]
    # Frames whose last tile shows the other product: their tiles disagree, the rest win.
    mostly_dark, mostly_bright = dark[:1].copy(), bright[:1].copy()
    mostly_dark[:, :, -48:], mostly_bright[:, :, -48:] = bright[:1, :, -48:], dark[:1, :, -48:]
    mixed = np.concatenate([mostly_dark, mostly_bright])
    with torch.no_grad():
        tiles = model.whiten.route(model.pool(model.backbone(pre(torch.from_numpy(mixed)))))
    assert tiles.view(2, n).tolist() == [[0] * (n - 1) + [1], [1] * (n - 1) + [0]]
    assert runner.route(mixed).tolist() == [0, 1]


def test_folded_channels_last_model_matches_plain_and_leaves_the_callers_model_alone(
        tiny_model, bgr_frames):
    """InferenceModel folds BatchNorm on a copy: the caller's model keeps its layers and
    weights; fp32 matches the plain model, fp16 stays close, tiled frames too."""
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    frames = torch.from_numpy(bgr_frames(2))
    long = torch.from_numpy(np.ascontiguousarray(np.concatenate([bgr_frames(2)] * 3, axis=2)))
    tiled = copy.deepcopy(tiny_model)
    tiled.cfg = type(tiled.cfg).from_dict({**tiled.cfg.to_dict(), "fit": "tile"})
    with torch.inference_mode():
        for model, x in ((tiny_model, frames), (tiled, long)):
            plain = InferenceModel(model)(x)
            folded = InferenceModel(model, channels_last=True, fold_backbone=True)(x)
            half = InferenceModel(model, dtype=torch.float16, fold_backbone=True)(x)
            torch.testing.assert_close(folded.score, plain.score, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(folded.anomaly_map, plain.anomaly_map, rtol=1e-4,
                                       atol=1e-4)
            torch.testing.assert_close(half.score, plain.score, rtol=2e-2, atol=1e-2)
            assert plain.anomaly_map.shape[-1] > plain.anomaly_map.shape[-2] or model is tiny_model
    after = tiny_model.state_dict()
    assert after.keys() == before.keys()          # no BatchNorm folded away in the caller's
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in tiny_model.modules())
    # fp16 networks, float32 constants bit for bit (never rounded through fp16 and back)
    half = InferenceModel(tiny_model, dtype=torch.float16).model
    assert half.backbone.blocks[0]._depthwise_conv.weight.dtype == torch.float16
    for name in ("residual_scale", "smooth_upsample.py", "smooth_upsample.px_t", "blur.ky"):
        ours, theirs = half.get_buffer(name), tiny_model.get_buffer(name)
        assert ours.dtype == torch.float32 and torch.equal(ours, theirs), name


def test_every_compile_runner_in_a_process_compiles_past_dynamos_recompile_limit(
        checkpoint, bgr_frames, monkeypatch):
    # Every compile runner compiles the same InferenceModel.forward, and dynamo counts its
    # recompiles per process: past the limit it runs eagerly with no error, and a "compile"
    # runner serves the eager model (seen: cpu_speed.py's sixth compiled model). The limit is
    # set to 1 here so that the second runner would already be past it.
    from torch._dynamo.utils import counters
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 1)
    frames = bgr_frames(2, 64, 64)
    compiled = []
    for b in (2, 3):
        before = counters["frames"]["ok"]
        CompileRunner(checkpoint, device="cpu", batch_sizes=(b,)).run(frames)
        compiled.append(counters["frames"]["ok"] - before)
    assert compiled[0] > 0 and compiled[1] == compiled[0], compiled
