"""Artifact metadata: round trip, compatibility refusals that name the mismatch, export."""

import dataclasses

import pytest
import torch

from deploy.artifact import (ArtifactError, Environment, check_compatible, current_environment,
                             new_meta, read_meta, write_meta)
from deploy.export import export
from edge.cli import main as grad_edge


def trt_meta(**env_changes):
    here = current_environment()
    built_on = dataclasses.replace(here, **env_changes)
    meta = new_meta("abc123", "tensorrt", "fp16", (8, 1, 32), (1080, 1920), 256)
    return dataclasses.replace(meta, environment=built_on)


def test_artifact_meta_round_trips_when_written_and_read(tmp_path):
    meta = new_meta("abc123", "cudagraph", "fp16", (32, 1, 8), (1080, 1920), 256,
                    note="captured at load")
    write_meta(tmp_path, meta)
    back = read_meta(tmp_path)
    assert back == meta
    assert back.batch_sizes == (1, 8, 32)          # sorted on the way in
    assert back.environment.torch == torch.__version__


def test_check_compatible_names_the_gpu_when_built_on_another_gpu():
    meta = trt_meta(gpu="NVIDIA H200")
    here = Environment(meta.environment.torch, meta.environment.torch_tensorrt,
                       meta.environment.cuda, "NVIDIA A10")
    with pytest.raises(ArtifactError, match="other GPU: built with NVIDIA H200, this machine "
                                            "has NVIDIA A10"):
        check_compatible(meta, "abc123", env=here)


def test_check_compatible_names_versions_when_torch_and_tensorrt_differ():
    meta = trt_meta(torch="2.99.0", torch_tensorrt="9.9.0", cuda="99.0")
    with pytest.raises(ArtifactError) as err:
        check_compatible(meta, "abc123")
    text = str(err.value)
    assert "other torch version: built with 2.99.0" in text
    assert "other torch_tensorrt version: built with 9.9.0" in text
    assert "other CUDA version: built with 99.0" in text
    assert "Re-export it on this machine" in text


def test_check_compatible_names_the_model_when_hash_differs():
    meta = trt_meta()
    with pytest.raises(ArtifactError, match="exported from model abc123, the checkpoint is "
                                            "model fff000"):
        check_compatible(meta, "fff000")
    check_compatible(meta, "abc123")               # same model, same machine: fine


def test_check_compatible_ignores_the_gpu_when_backend_captures_at_load():
    meta = dataclasses.replace(new_meta("abc123", "cudagraph", "fp16", (1,), (64, 64), 64),
                               environment=Environment("0.0", None, "1.0", "Other GPU"))
    check_compatible(meta, "abc123")               # nothing device-specific is serialized


def test_read_meta_fails_when_engine_files_are_missing(tmp_path):
    write_meta(tmp_path, new_meta("abc123", "tensorrt", "fp16", (1,), (64, 64), 64,
                                  engines={"1": "engine_b1.ep"}))
    with pytest.raises(ArtifactError, match="engine files that are not there"):
        read_meta(tmp_path)
    with pytest.raises(ArtifactError, match="no artifact.json"):
        read_meta(tmp_path / "nowhere")


def test_export_records_model_and_shapes_when_backend_is_cudagraph(checkpoint, tmp_path):
    meta = export(checkpoint, "cudagraph", (8, 1), (480, 640), out_dir=tmp_path)
    back = read_meta(tmp_path)
    assert back == meta
    assert meta.batch_sizes == (1, 8) and meta.frame_shape == (480, 640)
    assert meta.image_size == 64 and meta.precision == "fp16" and meta.engines == {}
    assert "cannot be serialized" in meta.note


def test_export_refuses_tensorrt_with_reason_when_cuda_is_absent(checkpoint, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA; the refusal is for machines without it")
    with pytest.raises(RuntimeError, match="TensorRT engines are built on the GPU"):
        export(checkpoint, "tensorrt", (1,), (64, 64), out_dir=tmp_path)
    assert not (tmp_path / "artifact.json").exists()


def test_export_command_writes_artifact_when_run_from_grad_edge(checkpoint, tmp_path, capsys):
    code = grad_edge(["export", "--model", str(checkpoint), "--backend", "eager",
                      "--batch-sizes", "1", "4", "--frame-shape", "120", "160",
                      "--out", str(tmp_path / "art")])
    assert code == 0
    assert "exported eager artifact" in capsys.readouterr().out
    assert read_meta(tmp_path / "art").frame_shape == (120, 160)
