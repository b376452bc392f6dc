"""TensorRT engines: metadata that refuses stale or foreign engines, the graph TensorRT builds, and the backend.

TensorRT cannot be installed here: tests that need it (and a CUDA GPU) skip
with the reason; everything that decides whether an engine may be used is
plain Python and runs everywhere.
"""
from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from tracker import sam_onnx, sam_tensorrt
from tracker.errors import TrackerError
from tracker.sam import (ImageEmbedding, TorchSam, available_backends, load_model, load_sam, prepare_prompt,
                         resized_shape)
from tracker.sam_tensorrt import EngineMetadata, StaleEngineError

ROOT = Path(__file__).resolve().parents[1]
HAVE_TENSORRT = sam_tensorrt.tensorrt_installed()
requires_tensorrt_gpu = pytest.mark.skipif(not (HAVE_TENSORRT and torch.cuda.is_available()),
                                           reason="tensorrt is not installed" if not HAVE_TENSORRT
                                           else "no CUDA GPU")
requires_no_tensorrt = pytest.mark.skipif(HAVE_TENSORRT, reason="checks the message shown without tensorrt")

BUILT = EngineMetadata(tensorrt_version="10.3.0", gpu_name="NVIDIA H100 80GB HBM3", compute_capability="9.0",
                       precision="fp16", onnx_sha256="a" * 64)


@pytest.fixture(scope="module")
def decoder_onnx(untrained_checkpoints, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("sam_trt") / "sam_vit_b_decoder.onnx"
    sam_onnx.export_decoder(load_model(untrained_checkpoints["sam"]), path)
    return path


@pytest.fixture
def engine(tmp_path) -> Path:
    """An engine file as the builder leaves it, with the metadata of BUILT."""
    path = tmp_path / "sam_vit_b_encoder.engine"
    path.write_bytes(b"serialized engine")
    sam_tensorrt.write_metadata(path, BUILT)
    return path


def test_metadata_round_trips_through_json(engine):
    assert sam_tensorrt.metadata_path(engine).name == "sam_vit_b_encoder.engine.json"
    assert sam_tensorrt.read_metadata(engine) == BUILT
    assert EngineMetadata.from_json(BUILT.to_json()) == BUILT


@pytest.mark.parametrize("text", ["not json", "[]", '{"tensorrt_version": "10.3.0"}',
                                  BUILT.to_json().replace('"fp16"', "16")])
def test_unreadable_metadata_refuses_the_engine(engine, text):
    sam_tensorrt.metadata_path(engine).write_text(text)
    assert sam_tensorrt.read_metadata(engine) is None
    with pytest.raises(StaleEngineError, match="has no readable metadata file beside it"):
        sam_tensorrt.check_engine(engine, BUILT)


def test_matching_engine_is_accepted(engine):
    sam_tensorrt.check_engine(engine, BUILT)
    assert sam_tensorrt.stale_reason(BUILT, BUILT) is None


@pytest.mark.parametrize(("change", "reason"), [
    (dict(gpu_name="NVIDIA A100-SXM4-80GB", compute_capability="8.0"),
     r"was built for NVIDIA H100 80GB HBM3 \(compute capability 9\.0\), this GPU is NVIDIA A100-SXM4-80GB "
     r"\(compute capability 8\.0\)"),
    (dict(compute_capability="8.9"), "compute capability 9.0.*compute capability 8.9"),
    (dict(tensorrt_version="10.7.0"), r"was built with TensorRT 10\.3\.0, this is TensorRT 10\.7\.0"),
    (dict(onnx_sha256="b" * 64), "was built from a different ONNX file"),
    (dict(precision="fp32"), "is fp16, fp32 was asked for"),
])
def test_foreign_or_stale_engine_is_refused_with_the_reason(engine, change, reason):
    wanted = dataclasses.replace(BUILT, **change)
    with pytest.raises(StaleEngineError, match=reason) as refused:
        sam_tensorrt.check_engine(engine, wanted)
    assert str(engine) in str(refused.value) and "--engine" in str(refused.value)


def test_any_precision_accepts_an_fp32_engine_but_nothing_else_different():
    fp32 = dataclasses.replace(BUILT, precision="fp32")
    assert sam_tensorrt.stale_reason(fp32, BUILT, any_precision=True) is None
    other_gpu = dataclasses.replace(fp32, gpu_name="NVIDIA L4")
    assert "NVIDIA L4" in sam_tensorrt.stale_reason(other_gpu, BUILT, any_precision=True)


def test_missing_engine_is_refused(tmp_path):
    with pytest.raises(StaleEngineError, match="does not exist"):
        sam_tensorrt.check_engine(tmp_path / "sam_vit_b_decoder.engine", BUILT)


def test_engine_and_timing_cache_paths():
    onnx_path = Path("models/sam_vit_b_decoder.onnx")
    assert sam_tensorrt.engine_path(onnx_path) == Path("models/sam_vit_b_decoder.engine")
    cache = sam_tensorrt.timing_cache_path(Path("models"), BUILT)
    assert cache == Path("models/tensorrt-10.3.0-nvidia-h100-80gb-hbm3.timing-cache")
    assert cache != sam_tensorrt.timing_cache_path(Path("models"), dataclasses.replace(BUILT, gpu_name="NVIDIA L4"))


def test_engine_decoder_graph_drops_the_value_dependent_upscale(decoder_onnx):
    """What TensorRT builds: no orig_im_size, no masks output, and no op whose output shape depends on values."""
    import onnxruntime as ort

    pruned = onnx.load_from_string(sam_tensorrt.engine_decoder_graph(decoder_onnx))
    onnx.checker.check_model(pruned)
    assert [i.name for i in pruned.graph.input] == list(sam_tensorrt.ENGINE_DECODER_INPUTS)
    assert [o.name for o in pruned.graph.output] == list(sam_tensorrt.ENGINE_DECODER_OUTPUTS)
    assert not {"Resize", "OneHot", "NonZero"} & {node.op_type for node in pruned.graph.node}

    full = ort.InferenceSession(str(decoder_onnx), providers=["CPUExecutionProvider"])
    part = ort.InferenceSession(pruned.SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    for clicks in (1, 3, 10):
        emb = ImageEmbedding(torch.from_numpy(rng.standard_normal((1, 256, 64, 64), np.float32)), (480, 640),
                             resized_shape(480, 640))
        prompt = prepare_prompt(rng.uniform((0, 0), (640, 480), (clicks, 2)), rng.integers(0, 2, clicks), None,
                                None, emb.original_size)
        feed = {k: v.numpy() for k, v in sam_onnx.decoder_inputs(emb, prompt).items()}
        _, want_scores, want_low_res = full.run(None, feed)
        del feed["orig_im_size"]
        got_scores, got_low_res = part.run(None, feed)
        np.testing.assert_array_equal(got_scores, want_scores)
        np.testing.assert_array_equal(got_low_res, want_low_res)


@requires_no_tensorrt
def test_without_tensorrt_the_backend_says_how_to_install_it(untrained_checkpoints):
    with pytest.raises(TrackerError, match=r"tensorrt is not installed: pip install -r requirements-tensorrt.txt"):
        sam_tensorrt.require_tensorrt()
    reason = sam_tensorrt.engines_ready(untrained_checkpoints["sam"], torch.device("cuda"))
    assert reason.startswith("tensorrt is not installed")
    assert "tensorrt" not in available_backends("cpu")


@requires_no_tensorrt
def test_export_cli_engine_option_fails_fast_without_tensorrt(untrained_checkpoints, tmp_path):
    output = tmp_path / "decoder.onnx"
    result = subprocess.run([sys.executable, "export_sam_decoder.py", "--checkpoint",
                             str(untrained_checkpoints["sam"]), "--output", str(output), "--engine"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "error: tensorrt is not installed" in result.stderr
    assert not output.exists()


@pytest.fixture(scope="module")
def exported_checkpoint(untrained_checkpoints, tmp_path_factory) -> Path:
    """An untrained checkpoint with both graphs exported beside it (only built where TensorRT can run)."""
    link = tmp_path_factory.mktemp("sam_trt_backend") / untrained_checkpoints["sam"].name
    link.symlink_to(untrained_checkpoints["sam"])
    for graph in ("encoder", "decoder"):
        assert sam_onnx.export_checked(graph, link, sam_onnx.onnx_paths(link)[graph == "decoder"]).passed
    return link


@requires_tensorrt_gpu
def test_tensorrt_backend_matches_torch(exported_checkpoint):
    backend = load_sam(exported_checkpoint, "cuda", "tensorrt")
    assert backend.name == "tensorrt"
    assert sam_tensorrt.engines_ready(exported_checkpoint, torch.device("cuda")) is None
    reference = TorchSam(load_model(exported_checkpoint), "cuda")
    image = np.random.default_rng(0).integers(0, 256, (360, 640, 3), dtype=np.uint8)
    got, want = backend.embed(image), reference.embed(image)
    assert (got.features - want.features).abs().max() <= 2e-2 * want.features.std()  # fp16 engine
    for clicks in (1, 3, 10):
        points = np.random.default_rng(clicks).uniform((0, 0), (640, 360), (clicks, 2))
        labels = [1] * clicks
        for multimask in (False, True):
            a = backend.decode(want, points, labels, multimask=multimask)
            b = reference.decode(want, points, labels, multimask=multimask)
            assert a.masks.shape == b.masks.shape
            np.testing.assert_allclose(a.scores, b.scores, atol=1e-2)


@requires_tensorrt_gpu
def test_stale_engine_is_rebuilt(exported_checkpoint):
    onnx_path = sam_onnx.onnx_paths(exported_checkpoint)[1]
    engine = sam_tensorrt.ensure_engine(onnx_path)
    real = sam_tensorrt.read_metadata(engine)
    sam_tensorrt.write_metadata(engine, dataclasses.replace(real, gpu_name="Some Other GPU"))
    assert "Some Other GPU" in sam_tensorrt.engines_ready(exported_checkpoint, torch.device("cuda"))
    messages = []
    sam_tensorrt.ensure_engine(onnx_path, log=messages.append)
    assert any("was built for Some Other GPU" in m for m in messages)
    assert sam_tensorrt.read_metadata(engine) == real
