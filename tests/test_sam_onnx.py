"""ONNX export of SAM ViT-B: the CLIs, the graphs against PyTorch, and the ONNX Runtime backend.

The encoder is exported once per session (through its CLI, which is the slow
part on a CPU) from untrained weights in the official layout.
"""
from __future__ import annotations

import copy
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from tracker import sam_onnx
from tracker.errors import TrackerError, WeightsError
from tracker.sam import ImageEmbedding, TorchSam, load_model, load_sam, prepare_prompt, resized_shape

ROOT = Path(__file__).resolve().parents[1]


def run_cli(script: str, *args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, script, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=900)


@pytest.fixture(scope="session")
def checkpoint(untrained_checkpoints, tmp_path_factory) -> Path:
    """The untrained SAM checkpoint, linked into a folder of its own so its exports stay out of other tests."""
    link = tmp_path_factory.mktemp("sam_onnx") / untrained_checkpoints["sam"].name
    link.symlink_to(untrained_checkpoints["sam"])
    return link


@pytest.fixture(scope="session")
def model(checkpoint):
    return load_model(checkpoint)


@pytest.fixture(scope="session")
def encoder_cli(checkpoint) -> subprocess.CompletedProcess:
    """export_sam_encoder.py with its default output (beside the checkpoint, where the backends look)."""
    return run_cli("export_sam_encoder.py", "--checkpoint", checkpoint)


@pytest.fixture(scope="session")
def decoder_cli(checkpoint) -> subprocess.CompletedProcess:
    return run_cli("export_sam_decoder.py", "--checkpoint", checkpoint)


@pytest.fixture(scope="session")
def onnx_backend(checkpoint, encoder_cli, decoder_cli) -> sam_onnx.OnnxSam:
    assert encoder_cli.returncode == 0, encoder_cli.stderr
    assert decoder_cli.returncode == 0, decoder_cli.stderr
    return load_sam(checkpoint, "cpu", "onnx")


def graph_io(path: Path) -> dict[str, list[int | str]]:
    graph = onnx.load(str(path), load_external_data=False).graph
    return {value.name: [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
            for value in [*graph.input, *graph.output]}


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.logical_and(a, b).sum() / max(np.logical_or(a, b).sum(), 1))


def test_encoder_cli_writes_a_verified_fixed_shape_graph(checkpoint, encoder_cli):
    assert encoder_cli.returncode == 0, encoder_cli.stderr
    assert "onnx.checker: ok" in encoder_cli.stdout
    line = next(line for line in encoder_cli.stdout.splitlines() if line.startswith("encoder: max abs error"))
    assert line.endswith(": ok") and "limit 0.001" in line
    encoder, _ = sam_onnx.onnx_paths(checkpoint)
    assert graph_io(encoder) == {"image": [1, 3, 1024, 1024], "image_embeddings": [1, 256, 64, 64]}
    metadata = sam_onnx.read_graph_metadata(encoder)
    assert metadata[sam_onnx.META_GRAPH] == "encoder" and metadata[sam_onnx.META_PRECISION] == "fp32"
    assert metadata[sam_onnx.META_CHECKPOINT_SHA256] == sam_onnx.file_sha256(checkpoint)


def test_decoder_cli_writes_sams_interface_with_dynamic_points(checkpoint, decoder_cli):
    assert decoder_cli.returncode == 0, decoder_cli.stderr
    case_lines = [line for line in decoder_cli.stdout.splitlines() if line.startswith("decoder ")]
    assert len(case_lines) == 4 and all(line.endswith(": ok") for line in case_lines)
    assert "decoder: ok" in decoder_cli.stdout
    io = graph_io(sam_onnx.onnx_paths(checkpoint)[1])
    assert list(io) == [*sam_onnx.DECODER_INPUTS, *sam_onnx.DECODER_OUTPUTS]
    assert io["image_embeddings"] == [1, 256, 64, 64]
    assert io["point_coords"][0] == 1 and isinstance(io["point_coords"][1], str) and io["point_coords"][2] == 2
    assert io["point_labels"][1] == io["point_coords"][1]
    assert io["mask_input"] == [1, 1, 256, 256] and io["has_mask_input"] == [1] and io["orig_im_size"] == [2]


def test_cli_reports_a_missing_checkpoint(tmp_path):
    result = run_cli("export_sam_decoder.py", "--checkpoint", tmp_path / "absent.pth")
    assert result.returncode == 2
    assert "absent.pth does not exist; for the official one, download https://dl.fbaipublicfiles.com/" \
        in result.stderr and "375042383 bytes" in result.stderr  # the remedy, as the tracker gives it
    assert not list(tmp_path.iterdir())


PROMPTS = {  # frame pixels of a 480x640 frame: dynamic N (1, 3, 10 clicks), boxes, prior masks
    "one click": dict(points=[[320, 240]], labels=[1]),
    "three clicks": dict(points=[[100, 100], [300, 200], [500, 400]], labels=[1, 0, 1]),
    "ten clicks": dict(points=[[60 * i + 10, 40 * i + 20] for i in range(10)], labels=[1, 0] * 5),
    "clicks + box": dict(points=[[200, 200], [250, 220]], labels=[1, 0], box=[150, 120, 420, 360]),
    "box only": dict(points=None, labels=None, box=[10, 20, 600, 470]),
    "click + mask": dict(points=[[320, 240]], labels=[1], mask=True),
}


@pytest.mark.parametrize("multimask", [False, True], ids=["single", "multimask"])
@pytest.mark.parametrize("name", PROMPTS)
def test_onnx_decode_matches_torch(onnx_backend, model, name, multimask):
    torch_backend = TorchSam(model, "cpu")
    rng = np.random.default_rng(len(name))
    emb = ImageEmbedding(torch.from_numpy(rng.standard_normal((1, 256, 64, 64), np.float32)), (480, 640),
                         resized_shape(480, 640))
    prompt = dict(PROMPTS[name])
    mask = rng.normal(0, 4, (1, 256, 256)).astype(np.float32) if prompt.pop("mask", False) else None
    got = onnx_backend.decode(emb, **prompt, mask_input=mask, multimask=multimask)
    want = torch_backend.decode(emb, **prompt, mask_input=mask, multimask=multimask)
    assert got.masks.shape == want.masks.shape == (3 if multimask else 1, 480, 640)
    assert got.masks.dtype == bool
    assert min(mask_iou(g, w) for g, w in zip(got.masks, want.masks)) >= 0.99
    np.testing.assert_allclose(got.scores, want.scores, atol=1e-3)
    np.testing.assert_allclose(got.low_res_logits, want.low_res_logits, atol=1e-3)


def test_padding_point_is_labelled_minus_one(onnx_backend, model):
    """SAM pads clicks without a box with (0, 0) labelled -1; labelling it 0 (a background click) changes masks."""
    emb = ImageEmbedding(torch.randn(1, 256, 64, 64, generator=torch.Generator().manual_seed(1)), (480, 640),
                         resized_shape(480, 640))
    prompt = prepare_prompt([[320, 240]], [1], None, None, emb.original_size)
    feed = {k: v.numpy() for k, v in sam_onnx.decoder_inputs(emb, prompt).items()}
    np.testing.assert_array_equal(feed["point_labels"], [[1, -1]])
    np.testing.assert_array_equal(feed["point_coords"][0, -1], [0, 0])
    masks, scores, _ = onnx_backend.decoder.run(None, feed)
    want = TorchSam(model, "cpu").decode(emb, [[320, 240]], [1], multimask=True)
    np.testing.assert_allclose(scores[0, 1:], want.scores, atol=1e-3)
    feed["point_labels"] = np.array([[1, 0]], np.float32)
    _, wrong_scores, _ = onnx_backend.decoder.run(None, feed)
    assert np.abs(wrong_scores[0, 1:] - want.scores).max() > 1e-2


def test_onnx_embed_matches_torch(onnx_backend, model):
    image = np.random.default_rng(0).integers(0, 256, (90, 160, 3), dtype=np.uint8)
    got = onnx_backend.embed(image)
    want = TorchSam(model, "cpu").embed(image)
    assert (got.original_size, got.input_size) == (want.original_size, want.input_size) == ((90, 160), (576, 1024))
    assert got.features.shape == (1, 256, 64, 64)
    assert (got.features - want.features).abs().max() <= 1e-3 * want.features.std()


def test_using_onnx_runtime_leaves_nothing_in_tmpdir(checkpoint, onnx_backend, tmp_path):
    """Its import writes a `.ses` file into TMPDIR; a fresh process that runs the graphs leaves the folder empty."""
    temp_dir = tmp_path / "tmp"
    temp_dir.mkdir()
    code = ("import sys, numpy as np; from tracker.sam_onnx import OnnxSam; "
            "sam = OnnxSam(sys.argv[1], sys.argv[2]); sam.embed(np.zeros((64, 64, 3), np.uint8))")
    done = subprocess.run([sys.executable, "-c", code, *map(str, sam_onnx.onnx_paths(checkpoint))], cwd=ROOT,
                          capture_output=True, text=True, env={**os.environ, "TMPDIR": str(temp_dir)})
    assert done.returncode == 0, done.stderr
    assert list(temp_dir.iterdir()) == []


def test_onnx_backend_is_registered_and_ready_on_cpu(checkpoint, onnx_backend):
    assert onnx_backend.name == "onnx"
    assert onnx_backend.providers == ["CPUExecutionProvider"]
    assert sam_onnx.onnx_ready(checkpoint, torch.device("cpu")) is None
    assert "PyTorch" in sam_onnx.onnx_ready(checkpoint, torch.device("cuda"))


def test_onnx_backend_needs_exports_of_this_checkpoint(checkpoint, onnx_backend, tmp_path):
    lone = tmp_path / "sam.pth"
    lone.symlink_to(checkpoint)
    with pytest.raises(WeightsError, match=r"no ONNX encoder .*python export_sam_encoder.py --checkpoint"):
        load_sam(lone, "cpu", "onnx")
    assert "export_sam_encoder.py" in sam_onnx.onnx_ready(lone, torch.device("cpu"))
    assert load_sam(lone, "cpu").name == "torch"  # auto: no exports, so PyTorch
    assert load_sam(checkpoint, "cpu").name == "onnx"  # auto: exports present, the fastest CPU path
    encoder, decoder = sam_onnx.onnx_paths(checkpoint)
    with pytest.raises(WeightsError, match="exported from other weights"):
        sam_onnx.OnnxSam(encoder, decoder, checkpoint_sha256="0" * 64)
    with pytest.raises(WeightsError, match="is not a SAM decoder"):
        sam_onnx.OnnxSam(encoder, encoder)


def test_auto_says_why_graphs_in_place_are_passed_over(checkpoint, onnx_backend, tmp_path, caplog):
    other = tmp_path / "sam.pth"
    other.write_bytes(b"other weights")
    for graph in sam_onnx.onnx_paths(checkpoint):
        (tmp_path / graph.name).symlink_to(graph)
    with caplog.at_level(logging.WARNING, logger="tracker.sam_onnx"):
        reason = sam_onnx.onnx_ready(other, torch.device("cpu"))
    assert "exported from other weights" in reason
    assert "SAM's ONNX graphs beside the checkpoint are not used" in caplog.text and reason in caplog.text
    with pytest.raises(WeightsError, match=f"re-export it: python export_sam_encoder.py --checkpoint {other} "):
        load_sam(other, "cpu", "onnx")  # the command names the checkpoint in use, ready to paste
    caplog.clear()
    (tmp_path / "sam_vit_b_decoder.onnx").unlink()  # not a whole export: nothing to explain
    assert "exported from other weights" in sam_onnx.onnx_ready(other, torch.device("cpu"))
    assert caplog.text == ""


def test_a_sam_precision_the_onnx_backend_cannot_follow_is_said(checkpoint, onnx_backend, caplog):
    with caplog.at_level(logging.WARNING, logger="tracker.sam"):
        assert load_sam(checkpoint, "cpu", "onnx", precision="bf16").name == "onnx"
        assert load_sam(checkpoint, "cpu", "onnx", precision="fp16").name == "onnx"  # the torch encoder's refusal
    assert "SAM precision bf16 is the PyTorch encoder's; the onnx backend runs its own" in caplog.text
    assert "SAM precision fp16 is the PyTorch encoder's; the onnx backend runs its own" in caplog.text
    with pytest.raises(TrackerError, match="unknown SAM precision 'fp8'"):
        load_sam(checkpoint, "cpu", "onnx", precision="fp8")


def test_export_cli_refuses_what_it_cannot_write_before_exporting(checkpoint, tmp_path):
    for args, message in ((["--output", tmp_path / "graph.txt"], "would be a misnamed ONNX file"),
                          (["--output", tmp_path / "graph.onnx", "--engine-precision", "fp32"],
                           "--engine-precision is the engine's: add --engine")):
        result = run_cli("export_sam_decoder.py", "--checkpoint", checkpoint, *args)
        assert result.returncode == 2 and message in result.stderr, result.stderr
        assert "exporting" not in result.stdout
    assert list(tmp_path.iterdir()) == []
    default = Path("models/sam_vit_b_decoder.onnx")  # a folder gets the graph's usual name
    assert sam_onnx._export_path(str(tmp_path), default) == tmp_path / default.name
    assert sam_onnx._export_path(f"{tmp_path}/new/", default) == tmp_path / "new" / default.name
    assert sam_onnx.export_command("encoder", Path("/my graphs/e.onnx"), Path("/w/sam.pth")) == \
        "python export_sam_encoder.py --checkpoint /w/sam.pth --output '/my graphs/e.onnx'"  # ready to paste


def test_an_opset_the_exporters_cannot_write_is_one_line_of_error(checkpoint, tmp_path, monkeypatch):
    """Not argparse's usage block, not the hundreds of lines of TorchScript IR the exporter prints as it fails,
    and not a graph left at another opset than the one asked for."""
    result = run_cli("export_sam_decoder.py", "--checkpoint", checkpoint, "--output", tmp_path / "d.onnx",
                     "--opset", "6")
    assert (result.returncode, result.stderr) == (2, "error: --opset 6: PyTorch's exporters write opset 7 and later "
                                                     "(default 18) (see export_sam_decoder.py --help)\n")
    result = run_cli("export_sam_decoder.py", "--checkpoint", checkpoint, "--output", tmp_path / "new" / "d.onnx",
                     "--opset", "7")  # and the folder it made for the graph goes again
    assert result.returncode == 2 and result.stdout.splitlines() == [
        f"exporting the SAM ViT-B decoder of {checkpoint} (opset 7) ..."]
    assert result.stderr.splitlines()[-1].startswith("error: exporting at opset 7 failed (OnnxExporterError: ONNX "
                                                     "export failed on expand_as"), result.stderr
    monkeypatch.setattr(sam_onnx, "graph_opset", lambda path: 18)  # as the encoder's exporter does below opset 18
    with pytest.raises(TrackerError, match=r"^the exporter cannot write the decoder at opset 16 \(its graph stayed "
                                           r"at opset 18\); the default opset 18 works$"):
        sam_onnx.export_checked("decoder", checkpoint, tmp_path / "a" / "b" / "d.onnx", opset=16,
                                log=lambda line: None)
    assert list(tmp_path.iterdir()) == []


def test_an_export_from_a_checkpoint_of_another_network_is_refused_without_a_trace(untrained_checkpoints, tmp_path):
    """Its layout is the error, said once: no untrained-weights warning as if it were taken, no folder left."""
    result = run_cli("export_sam_encoder.py", "--checkpoint", untrained_checkpoints["xmem"],
                     "--output", f"{tmp_path}/graphs/")
    assert result.returncode == 2 and "UNTRAINED" not in result.stderr, result.stderr
    [line] = result.stderr.splitlines()
    assert line.startswith(f"error: checkpoint {untrained_checkpoints['xmem']} is not in the SAM ViT-B layout")
    assert "it looks like XMem weights given in place of SAM ViT-B weights" in line
    assert list(tmp_path.iterdir()) == []


def test_best_mask_decoder_follows_sams_rule_and_is_refused_by_backends(checkpoint, encoder_cli, tmp_path):
    """--no-multimask is SAM's own variant: best of three for a lone click (+ padding), else the single mask."""
    output = tmp_path / "best.onnx"
    report = sam_onnx.export_checked("decoder", checkpoint, output, multimask=False, log=lambda line: None)
    assert report.passed, report.lines()
    assert {case.num_points for case in report.cases} == {2, 5, 11}
    assert graph_io(output)["iou_predictions"][1] == 1
    with pytest.raises(WeightsError, match="--no-multimask"):
        sam_onnx.OnnxSam(sam_onnx.onnx_paths(checkpoint)[0], output)


def test_decoder_verification_fails_for_other_weights(checkpoint, model, decoder_cli):
    other = copy.deepcopy(model)
    with torch.no_grad():
        for parameter in other.mask_decoder.iou_prediction_head.parameters():
            parameter.add_(0.05)
    report = sam_onnx.verify_decoder(other, sam_onnx.onnx_paths(checkpoint)[1])
    assert not report.passed
    assert "FAILED" in "\n".join(report.lines())


def test_a_graph_that_fails_verification_is_not_written(checkpoint, tmp_path, monkeypatch):
    failing = sam_onnx.DecoderReport((sam_onnx.DecoderCaseResult("x", 2, (4, 4), mask_iou=0.5, score_error=0.0),))
    monkeypatch.setattr(sam_onnx, "verify_decoder", lambda model, path: failing)
    output = tmp_path / "decoder.onnx"
    assert not sam_onnx.export_checked("decoder", checkpoint, output, log=lambda line: None).passed
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("error", "passed"), [(0.9e-3, True), (1.1e-3, False)])
def test_encoder_report_limit_is_relative_to_output_std(error, passed):
    report = sam_onnx.EncoderReport(max_abs_error=2 * error, output_std=2.0, limit=1e-3)
    assert report.passed is passed
    assert report.lines()[0].endswith(": ok" if passed else ": FAILED")


@pytest.mark.parametrize(("iou", "score_error", "passed"), [(0.995, 5e-4, True), (0.98, 0.0, False),
                                                             (1.0, 2e-3, False)])
def test_decoder_report_limits(iou, score_error, passed):
    report = sam_onnx.DecoderReport((sam_onnx.DecoderCaseResult("case", 2, (480, 640), iou, score_error),))
    assert report.passed is passed
