"""The exported program behind TensorRT artifacts, on the CPU: torch.export of the engine
module, saved and loaded the way `torch_tensorrt.save/load` do it (torch.export.save/load of an
ExportedProgram), gives the eager scores. TensorRT itself cannot run here; this checks every
step of its build that does not need it."""

import numpy as np
import pytest
import torch

from deploy.export import EngineModule, export_program
from deploy.inference import InferenceModel


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_exported_program_round_trips_and_matches_eager_when_saved_and_loaded(
        tiny_model, bgr_frames, tmp_path, dtype):
    program, example = export_program(tiny_model, 2, (80, 96), dtype=dtype, device="cpu")
    assert example.dtype == torch.uint8 and tuple(example.shape) == (2, 80, 96, 3)
    path = tmp_path / "engine_b2.ep"
    torch.export.save(program, path)     # fails on a NamedTuple output: why EngineModule exists
    loaded = torch.export.load(path).module()

    frames = torch.from_numpy(bgr_frames(2))
    maps, scores = loaded(frames)
    with torch.inference_mode():
        ref = InferenceModel(tiny_model, dtype=dtype)(frames)
    assert maps.dtype == torch.float32 and scores.dtype == torch.float32
    assert maps.shape == (2, 64, 64) and scores.shape == (2,)
    np.testing.assert_allclose(scores.detach().numpy(), ref.score.numpy(), rtol=1e-5)
    np.testing.assert_allclose(maps.detach().numpy(), ref.anomaly_map.numpy(), rtol=1e-4,
                               atol=1e-4)


def test_exported_program_is_static_in_batch_when_given_another_batch_size(tiny_model,
                                                                           bgr_frames):
    # One engine per batch size: the runner pads to a prepared size, never feeds another.
    program, _ = export_program(tiny_model, 2, (80, 96), dtype=torch.float32, device="cpu")
    with pytest.raises(Exception, match="(?i)shape|size|expected"):
        program.module()(torch.from_numpy(bgr_frames(3)))


def test_engine_module_returns_grad_output_fields_in_order(tiny_model, bgr_frames):
    frames = torch.from_numpy(bgr_frames(1))
    inference = InferenceModel(tiny_model)
    with torch.inference_mode():
        maps, score = EngineModule(inference)(frames)
        ref = inference(frames)
    assert type((maps, score)) is tuple
    torch.testing.assert_close(maps, ref.anomaly_map)
    torch.testing.assert_close(score, ref.score)
