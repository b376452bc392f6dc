"""SAM ViT-B as two ONNX graphs: export, verification against PyTorch, and an ONNX Runtime backend.

The encoder graph takes the already normalised and padded 1x3x1024x1024 input:
preprocessing stays in Python (shared with every backend in `tracker.sam`), so
the graph, and a TensorRT engine built from it, has one fixed shape.

The decoder graph has the inputs and outputs of SAM's own ONNX export, so
tools written for that export can use it. By default it returns all four mask
candidates (SAM's single-mask token first, then its three multimask tokens):
the backends pick the ones a request asks for, exactly as SAM's predictor
does. `multimask=False` exports SAM's "best mask" variant instead, for other
consumers.

Both graphs carry metadata naming the checkpoint they came from, so a backend
never pairs an export with other weights.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import logging
import os
import shlex
import sys
import tempfile
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tracker.cli import Parser
from tracker.errors import TrackerError, WeightsError
from tracker.sam import (
    IMAGE_SIZE,
    LOW_RES_SIZE,
    MASK_THRESHOLD,
    ImageEmbedding,
    Prompt,
    SamBackend,
    SamPrediction,
    TorchSam,
    load_model,
    prepare_prompt,
    preprocess,
    register_backend,
    resized_shape,
    upscale_masks,
)
from tracker.segment_anything_compat import Sam, SamOnnxModel
from tracker.weights import checkpoint_warning, default_path, file_sha256, resolve_checkpoint

log = logging.getLogger(__name__)

Graph = Literal["encoder", "decoder"]

ENCODER_INPUTS = ("image",)
ENCODER_OUTPUTS = ("image_embeddings",)
DECODER_INPUTS = ("image_embeddings", "point_coords", "point_labels", "mask_input", "has_mask_input", "orig_im_size")
DECODER_OUTPUTS = ("masks", "iou_predictions", "low_res_masks")
DEFAULT_OPSET = 18
MIN_OPSET = 7  # the oldest any of PyTorch's ONNX exporters writes
NUM_MASK_TOKENS = 4  # SAM's single-mask token, then its three multimask tokens

# Pass/fail limits of the checks against PyTorch. fp16 graphs round every
# weight and activation to 11 significant bits, hence the looser limit.
ENCODER_ERROR_LIMITS = {"fp32": 1e-3, "fp16": 2e-2}  # max abs error / std of PyTorch's output
MASK_IOU_LIMIT = 0.99
SCORE_ERROR_LIMIT = 1e-3

# Keys of the metadata written into each graph.
META_GRAPH = "tracker.graph"
META_CHECKPOINT_SHA256 = "tracker.checkpoint_sha256"
META_PRECISION = "tracker.precision"
META_DECODER_MASKS = "tracker.decoder_masks"  # "all" or "best"


def onnx_paths(checkpoint: str | Path) -> tuple[Path, Path]:
    """Where the export CLIs put the encoder and decoder of a checkpoint by default: beside it."""
    folder = Path(checkpoint).parent
    return folder / "sam_vit_b_encoder.onnx", folder / "sam_vit_b_decoder.onnx"


class _HalfEncoder(nn.Module):
    """The image encoder computing in float16 behind float32 inputs and outputs."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = copy.deepcopy(encoder).half()

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.encoder(image.half()).float()


class DecoderGraph(SamOnnxModel):
    """SAM's ONNX decoder wrapper made exportable with dynamic sizes and a TensorRT-friendly graph.

    Two changes to the wrapper in segment_anything, same maths: (1) the crop of
    the padding is sliced with tensors, because the original converts them to
    Python ints, which tracing freezes into constants of the example input, so
    any other `orig_im_size` got a wrong crop; (2) the masks are predicted for
    the single image-and-prompt pair we ever pass, without the batch
    `repeat_interleave` whose exported form TensorRT cannot build.
    """

    def __init__(self, model: Sam, multimask: bool = True):
        super().__init__(model, return_single_mask=not multimask)

    def forward(self, image_embeddings, point_coords, point_labels, mask_input, has_mask_input, orig_im_size):
        sparse = self._embed_points(point_coords, point_labels)
        dense = self._embed_masks(mask_input, has_mask_input)
        masks, scores = self._predict_masks(image_embeddings, sparse, dense)
        if self.return_single_mask:
            masks, scores = self.select_masks(masks, scores, point_coords.shape[1])
        return self.mask_postprocessing(masks, orig_im_size), scores, masks

    def _predict_masks(self, image_embeddings: torch.Tensor, sparse: torch.Tensor,
                       dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        decoder = self.model.mask_decoder
        channels = decoder.transformer_dim
        height, width = self.model.prompt_encoder.image_embedding_size
        output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
        tokens = torch.cat([output_tokens.unsqueeze(0), sparse], dim=1)
        src = image_embeddings + dense
        hs, src = decoder.transformer(src, self.model.prompt_encoder.get_dense_pe(), tokens)
        iou_token, mask_tokens = hs[:, 0, :], hs[:, 1 : 1 + decoder.num_mask_tokens, :]
        upscaled = decoder.output_upscaling(src.transpose(1, 2).reshape(1, channels, height, width))
        hyper_in = torch.stack([mlp(mask_tokens[:, i, :]) for i, mlp in enumerate(decoder.output_hypernetworks_mlps)],
                               dim=1)
        up_channels, up_height, up_width = upscaled.shape[1:]
        masks = (hyper_in @ upscaled.reshape(1, up_channels, up_height * up_width)).reshape(
            1, -1, up_height, up_width)
        return masks, decoder.iou_prediction_head(iou_token)

    def mask_postprocessing(self, masks: torch.Tensor, orig_im_size: torch.Tensor) -> torch.Tensor:
        masks = F.interpolate(masks, size=(self.img_size, self.img_size), mode="bilinear", align_corners=False)
        resized = self.resize_longest_image_size(orig_im_size, self.img_size)
        masks = masks[..., : resized[0], : resized[1]]
        size = orig_im_size.to(torch.int64)
        return F.interpolate(masks, size=(size[0], size[1]), mode="bilinear", align_corners=False)


def export_encoder(model: Sam, output: str | Path, *, opset: int = DEFAULT_OPSET, fp16: bool = False,
                   metadata: dict[str, str] | None = None) -> None:
    """Write the image encoder: `image` float32 1x3x1024x1024 -> `image_embeddings` 1x256x64x64.

    fp16 computes in float16 inside the graph; inputs and outputs stay float32.
    """
    encoder = _HalfEncoder(model.image_encoder) if fp16 else model.image_encoder
    example = torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE)
    # torch.export (the dynamo exporter) specialises the fixed shapes, so the
    # graph has static shapes throughout and no shape arithmetic left to fold.
    with _quiet_export():
        torch.onnx.export(encoder.eval(), (example,), str(output), input_names=list(ENCODER_INPUTS),
                          output_names=list(ENCODER_OUTPUTS), opset_version=opset, dynamo=True,
                          external_data=False, verbose=False)
    _write_metadata(output, {META_GRAPH: "encoder", META_PRECISION: "fp16" if fp16 else "fp32", **(metadata or {})})


def export_decoder(model: Sam, output: str | Path, *, opset: int = DEFAULT_OPSET, multimask: bool = True,
                   metadata: dict[str, str] | None = None) -> None:
    """Write the prompt encoder + mask decoder with SAM's ONNX interface; the number of points is dynamic."""
    embed_dim = model.prompt_encoder.embed_dim
    embed_h, embed_w = model.prompt_encoder.image_embedding_size
    example = (
        torch.randn(1, embed_dim, embed_h, embed_w),
        torch.randint(0, IMAGE_SIZE, (1, 5, 2), dtype=torch.float32),
        torch.randint(-1, 4, (1, 5), dtype=torch.float32),
        torch.randn(1, 1, LOW_RES_SIZE, LOW_RES_SIZE),
        torch.tensor([1.0]),
        torch.tensor([1500.0, 2250.0]),
    )
    dynamic_axes = {"point_coords": {1: "num_points"}, "point_labels": {1: "num_points"}}
    # The TorchScript exporter: the crop depends on the values of orig_im_size,
    # which torch.export cannot express without data-dependent shapes.
    with _quiet_export():
        torch.onnx.export(DecoderGraph(model, multimask).eval(), example, str(output),
                          input_names=list(DECODER_INPUTS), output_names=list(DECODER_OUTPUTS),
                          dynamic_axes=dynamic_axes, opset_version=opset, dynamo=False)
    _write_metadata(output, {META_GRAPH: "decoder", META_PRECISION: "fp32",
                             META_DECODER_MASKS: "all" if multimask else "best", **(metadata or {})})


def check_graph(path: str | Path) -> None:
    """onnx.checker on a written graph (by path, so graphs over 2 GB work too)."""
    import onnx

    onnx.checker.check_model(str(path))


def graph_opset(path: str | Path) -> int:
    """The ONNX operator set version a written graph declares."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return next(entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx"))


def read_graph_metadata(path: str | Path) -> dict[str, str]:
    """The key/value metadata of an ONNX file (the weights are read too; inline data cannot be skipped)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return {prop.key: prop.value for prop in model.metadata_props}


@dataclass(frozen=True)
class EncoderReport:
    """ONNX Runtime against PyTorch on one random input."""

    max_abs_error: float
    output_std: float
    limit: float  # on max_abs_error / output_std

    @property
    def relative_error(self) -> float:
        return self.max_abs_error / self.output_std

    @property
    def passed(self) -> bool:
        return self.relative_error <= self.limit

    def lines(self) -> list[str]:
        verdict = "ok" if self.passed else "FAILED"
        return [f"encoder: max abs error {self.max_abs_error:.3g} = {self.relative_error:.3g} x output std "
                f"{self.output_std:.3g} (limit {self.limit:g}): {verdict}"]


@dataclass(frozen=True)
class DecoderCaseResult:
    """One prompt: the worst mask IoU and score error over the masks the graph returns."""

    name: str
    num_points: int  # rows of point_coords, padding and box corners included
    frame_size: tuple[int, int]
    mask_iou: float
    score_error: float

    @property
    def passed(self) -> bool:
        return self.mask_iou >= MASK_IOU_LIMIT and self.score_error <= SCORE_ERROR_LIMIT


@dataclass(frozen=True)
class DecoderReport:
    """ONNX Runtime against PyTorch over a set of prompts."""

    cases: tuple[DecoderCaseResult, ...]

    @property
    def passed(self) -> bool:
        return all(case.passed for case in self.cases)

    def lines(self) -> list[str]:
        lines = []
        for case in self.cases:
            height, width = case.frame_size
            lines.append(f"decoder {case.name} ({case.num_points} points, {width}x{height}): mask IoU "
                         f"{case.mask_iou:.5f}, iou_predictions error {case.score_error:.2g}: "
                         f"{'ok' if case.passed else 'FAILED'}")
        lines.append(f"decoder: {'ok' if self.passed else 'FAILED'} (limits: mask IoU >= {MASK_IOU_LIMIT}, "
                     f"iou_predictions error <= {SCORE_ERROR_LIMIT:g})")
        return lines


def verify_encoder(model: Sam, path: str | Path, *, seed: int = 0) -> EncoderReport:
    """Run the encoder graph on the CPU and PyTorch's float32 encoder on the same random input."""
    image = torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(seed))
    with torch.inference_mode():
        expected = model.image_encoder(image).numpy()
    session = _session(path, ["CPUExecutionProvider"])
    got = session.run(None, {ENCODER_INPUTS[0]: image.numpy()})[0]
    precision = _metadata_of(session).get(META_PRECISION, "fp32")
    return EncoderReport(float(np.abs(got - expected).max()), float(expected.std()), ENCODER_ERROR_LIMITS[precision])


@dataclass(frozen=True)
class _Case:
    name: str
    frame_size: tuple[int, int]  # (H, W)
    clicks: int
    box: bool = False
    mask_input: bool = False


# Dynamic N (1, 3 and 10 clicks), clicks with and without a box, a box alone,
# prior mask logits, portrait and landscape frames.
_DECODER_CASES = (
    _Case("one click", (480, 640), clicks=1),
    _Case("three clicks + box", (1080, 1920), clicks=3, box=True),
    _Case("box only", (333, 211), clicks=0, box=True),
    _Case("ten clicks + mask", (600, 600), clicks=10, mask_input=True),
)


def verify_decoder(model: Sam, path: str | Path, *, seed: int = 0) -> DecoderReport:
    """Run the decoder graph on the CPU and SAM's PyTorch prompt encoder + decoder on random prompts.

    The reference is `TorchSam` (SAM's own modules, given the prompt as SAM's
    predictor takes it); the graph gets the same prompt packed the ONNX way (box
    corners labelled 2/3, else a padding point labelled -1), so the check covers
    that packing too.
    """
    session = _session(path, ["CPUExecutionProvider"])
    returns_all = _metadata_of(session).get(META_DECODER_MASKS, "all") == "all"
    reference = TorchSam(model, "cpu")
    rng = np.random.default_rng(seed)
    results = []
    for case in _DECODER_CASES:
        emb, clicks, labels, box, mask = _random_prompt(case, model, rng)
        prompt = prepare_prompt(clicks, labels, box, mask, emb.original_size)
        num_points = prompt.point_prompt()[0].shape[1]
        masks, scores, _ = session.run(None, _numpy_feed(decoder_inputs(emb, prompt)))
        single = reference.decode(emb, clicks, labels, box, mask, multimask=False)
        multi = reference.decode(emb, clicks, labels, box, mask, multimask=True)
        want_masks = np.concatenate([single.masks, multi.masks])
        want_scores = np.concatenate([single.scores, multi.scores])
        if not returns_all:  # SAM's rule: a lone click (+ padding) is ambiguous, take the best multimask
            best = 1 + int(np.argmax(multi.scores)) if num_points <= 2 else 0
            want_masks, want_scores = want_masks[best : best + 1], want_scores[best : best + 1]
        ious = [_mask_iou(got > MASK_THRESHOLD, want) for got, want in zip(masks[0], want_masks)]
        results.append(DecoderCaseResult(case.name, num_points, case.frame_size, min(ious),
                                         float(np.abs(scores[0] - want_scores).max())))
    return DecoderReport(tuple(results))


def _random_prompt(case: _Case, model: Sam, rng: np.random.Generator):
    """A random embedding and a random prompt (frame pixels) of the kind `case` describes."""
    height, width = case.frame_size
    embedding_shape = (1, model.prompt_encoder.embed_dim, *model.prompt_encoder.image_embedding_size)
    features = torch.from_numpy(rng.standard_normal(embedding_shape, np.float32))
    clicks = rng.uniform((0, 0), (width, height), size=(case.clicks, 2))
    labels = rng.integers(0, 2, size=case.clicks)
    box = None
    if case.box:
        x0, y0 = rng.uniform((0, 0), (width / 2, height / 2))
        box = (x0, y0, rng.uniform(x0 + 1, width), rng.uniform(y0 + 1, height))
    mask = rng.normal(0, 4, (1, LOW_RES_SIZE, LOW_RES_SIZE)).astype(np.float32) if case.mask_input else None
    emb = ImageEmbedding(features, case.frame_size, resized_shape(height, width))
    return emb, clicks, labels, box, mask


def _mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


Report = EncoderReport | DecoderReport


def export_checked(graph: Graph, checkpoint: str | Path, output: str | Path, *, opset: int = DEFAULT_OPSET,
                   fp16: bool = False, multimask: bool = True,
                   log: Callable[[str], None] = print) -> Report:
    """Export one graph of a checkpoint, check it and compare it with PyTorch; keep it only if it passes.

    The graph is written under a temporary name and renamed over `output` once
    onnx.checker and the comparison pass, so a backend never finds a graph that
    failed (or half a graph).
    """
    output = Path(output)
    model = load_model(checkpoint)
    metadata = {META_CHECKPOINT_SHA256: file_sha256(checkpoint)}
    partial = output.with_name(output.name + ".partial")
    made = [folder for folder in (output.parent, *output.parent.parents) if not folder.exists()]  # deepest first
    output.parent.mkdir(parents=True, exist_ok=True)
    try:
        log(f"exporting the SAM ViT-B {graph} of {checkpoint} (opset {opset}) ...")
        try:
            if graph == "encoder":
                export_encoder(model, partial, opset=opset, fp16=fp16, metadata=metadata)
            else:
                export_decoder(model, partial, opset=opset, multimask=multimask, metadata=metadata)
        except Exception as exc:  # the exporters' many error types; at the default opset it is a bug: raised
            if opset == DEFAULT_OPSET:
                raise
            raise TrackerError(f"exporting at opset {opset} failed ({type(exc).__name__}: "
                               f"{str(exc).splitlines()[0] if str(exc) else ''}); the default opset "
                               f"{DEFAULT_OPSET} works") from None
        written = graph_opset(partial)
        if written != opset:  # the dynamo exporter writes opset 18 and converts it down where it can
            raise TrackerError(f"the exporter cannot write the {graph} at opset {opset} (its graph stayed at opset "
                               f"{written}); the default opset {DEFAULT_OPSET} works")
        check_graph(partial)
        log("onnx.checker: ok")
        log("comparing onnxruntime (CPU) with PyTorch on random inputs ...")
        report = verify_encoder(model, partial) if graph == "encoder" else verify_decoder(model, partial)
        for line in report.lines():
            log(line)
        if report.passed:
            os.replace(partial, output)
            log(f"wrote {output} ({output.stat().st_size / 2**20:.1f} MiB)")
        return report
    finally:
        partial.unlink(missing_ok=True)
        if not output.exists():  # nothing written: no empty folders left either
            for folder in made:
                with contextlib.suppress(OSError):
                    folder.rmdir()


def export_cli(graph: Graph, argv: Sequence[str] | None = None) -> int:
    """The export_sam_{encoder,decoder}.py command line; returns the exit status.

    0: written and verified; 1: the graph does not match PyTorch (nothing is
    written); 2: a problem the user can fix (message on stderr).
    """
    parser = Parser(
        prog=f"export_sam_{graph}.py",
        description=f"Export the SAM ViT-B {graph} to ONNX, check it against PyTorch and optionally build a "
                    "TensorRT engine from it.")
    parser.add_argument("--checkpoint", type=Path,
                        help=f"SAM ViT-B checkpoint in the official layout (default: {default_path('sam')}, "
                             "downloaded on first use)")
    parser.add_argument("--output",
                        help=f"ONNX file, or folder, to write (default: sam_vit_b_{graph}.onnx beside the checkpoint, "
                             "where the onnx and tensorrt backends look)")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help="ONNX opset (default: %(default)s)")
    if graph == "encoder":
        parser.add_argument("--fp16", action="store_true",
                            help="compute in float16 inside the graph (inputs and outputs stay float32)")
    else:
        parser.add_argument("--multimask", action=argparse.BooleanOptionalAction, default=True,
                            help="return all four mask candidates, as the backends need (default); "
                                 "--no-multimask returns SAM's single best mask")
    parser.add_argument("--engine", action="store_true",
                        help="also build a TensorRT engine beside the ONNX file (needs tensorrt and a CUDA GPU)")
    parser.add_argument("--engine-precision", choices=("fp16", "fp32"),
                        help="TensorRT engine precision, with --engine (default: fp16)")
    args = parser.parse_args(argv)
    if args.engine_precision is not None and not args.engine:
        parser.error("--engine-precision is the engine's: add --engine")
    if args.opset < MIN_OPSET:
        parser.error(f"--opset {args.opset}: PyTorch's exporters write opset {MIN_OPSET} and later "
                     f"(default {DEFAULT_OPSET})")
    try:
        checkpoint = resolve_checkpoint("sam", args.checkpoint)
        output = _export_path(args.output, onnx_paths(checkpoint)[0 if graph == "encoder" else 1])
        if args.engine:
            from tracker.sam_tensorrt import require_tensorrt

            if graph == "decoder" and not args.multimask:
                raise TrackerError("--engine needs the decoder with all mask candidates: drop --no-multimask")
            device = require_tensorrt()
        warning = checkpoint_warning(checkpoint, "sam_vit_b")
        if warning:
            print(warning, file=sys.stderr)
        report = export_checked(graph, checkpoint, output, opset=args.opset, fp16=getattr(args, "fp16", False),
                                multimask=getattr(args, "multimask", True))
        if not report.passed:
            print(f"error: the exported {graph} does not match PyTorch within the limits above; "
                  f"{output} was not written", file=sys.stderr)
            return 1
        if args.engine:
            from tracker.sam_tensorrt import ensure_engine

            ensure_engine(output, precision=args.engine_precision or "fp16", device=device, any_precision=False,
                          log=print)
    except TrackerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def _export_path(given: str | None, default: Path) -> Path:
    """--output as a file (an .onnx name) or a folder (one that exists, or a name ending in a slash), which gets
    the default graph's name in it."""
    if given is None:
        return default
    path = Path(given)
    if given.endswith(("/", os.sep)) or path.is_dir():
        return path / default.name
    if path.suffix.lower() != ".onnx":
        raise TrackerError(f"--output {given} would be a misnamed ONNX file: give a name ending in .onnx "
                           "or a folder")
    return path


@contextlib.contextmanager
def _quiet_export() -> Iterator[None]:
    """Export without the exporters' chatter: tracer warnings, notes on decompositions, progress logs, the
    version converter's tracebacks (`export_checked` says what came of it), and the TorchScript IR that the
    TorchScript exporter prints to the process's standard output when it fails (hundreds of lines)."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "onnxscript")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    sys.stdout.flush()
    stdout = os.dup(1)
    try:
        with open(os.devnull, "w") as nowhere, warnings.catch_warnings(), torch.no_grad():
            os.dup2(nowhere.fileno(), 1)
            warnings.simplefilter("ignore")
            yield
    finally:
        sys.stdout.flush()
        os.dup2(stdout, 1)
        os.close(stdout)
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _write_metadata(path: str | Path, metadata: dict[str, str]) -> None:
    import onnx

    model = onnx.load(str(path))
    for key, value in metadata.items():
        prop = model.metadata_props.add()
        prop.key, prop.value = key, value
    onnx.save(model, str(path))


_ONNXRUNTIME_IMPORT = threading.Lock()


def onnxruntime():
    """ONNX Runtime, imported with TMPDIR set to a folder of its own that is removed after: its import writes
    a `.ses` file into TMPDIR, which no run should leave behind."""
    with _ONNXRUNTIME_IMPORT:
        if "onnxruntime" not in sys.modules:
            saved = os.environ.get("TMPDIR")
            with tempfile.TemporaryDirectory(prefix="onnxruntime-") as scratch:
                os.environ["TMPDIR"] = scratch
                try:
                    importlib.import_module("onnxruntime")
                finally:
                    if saved is None:
                        del os.environ["TMPDIR"]
                    else:
                        os.environ["TMPDIR"] = saved
        return sys.modules["onnxruntime"]


def _session(path: str | Path, providers: Sequence[str | tuple[str, dict]]):
    return onnxruntime().InferenceSession(str(path), providers=list(providers))


def _metadata_of(session) -> dict[str, str]:
    return dict(session.get_modelmeta().custom_metadata_map)


def decoder_inputs(emb: ImageEmbedding, prompt: Prompt) -> dict[str, torch.Tensor]:
    """The decoder graph's inputs for a checked prompt, SAM's ONNX conventions, on the embedding's device."""
    coords, labels = prompt.point_prompt()
    has_mask = prompt.mask_input is not None
    mask = prompt.mask_input[None] if has_mask else np.zeros((1, 1, LOW_RES_SIZE, LOW_RES_SIZE), np.float32)
    host = {
        "point_coords": coords,
        "point_labels": labels,
        "mask_input": mask,
        "has_mask_input": np.array([float(has_mask)], np.float32),
        "orig_im_size": np.array(emb.original_size, np.float32),
    }
    device = emb.features.device
    return {"image_embeddings": emb.features.float(),
            **{name: torch.from_numpy(value).to(device) for name, value in host.items()}}


def _numpy_feed(inputs: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {name: value.detach().cpu().numpy() for name, value in inputs.items()}


def select_prediction(low_res: torch.Tensor, scores: torch.Tensor, emb: ImageEmbedding,
                      multimask: bool) -> SamPrediction:
    """All four candidates of a decoder graph -> what SAM's predictor returns for `multimask`.

    Only the chosen masks are upscaled to the frame, with the same function as
    the PyTorch backend, so backends differ only by their networks' numerics.
    """
    chosen = slice(1, NUM_MASK_TOKENS) if multimask else slice(0, 1)
    low = low_res[:, chosen].float()
    masks = upscale_masks(low, emb.input_size, emb.original_size) > MASK_THRESHOLD
    return SamPrediction(masks[0].cpu().numpy(), scores[0, chosen].float().cpu().numpy(), low[0].cpu().numpy())


def onnx_providers(device: str | torch.device) -> list[str | tuple[str, dict]]:
    """ONNX Runtime providers for a device: CUDA when asked for and installed, else the CPU."""
    device = torch.device(device)
    if device.type == "cuda" and "CUDAExecutionProvider" in onnxruntime().get_available_providers():
        return [("CUDAExecutionProvider", {"device_id": device.index or 0}), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class OnnxSam(SamBackend):
    """SAM through ONNX Runtime, from the two graphs the export CLIs write."""

    name = "onnx"

    def __init__(self, encoder: str | Path, decoder: str | Path, device: str | torch.device = "cpu", *,
                 checkpoint_sha256: str | None = None, checkpoint: Path | None = None):
        """checkpoint_sha256, when given, refuses graphs exported from other weights (`checkpoint`, their file,
        is named in the command that exports them again)."""
        providers = onnx_providers(device)
        self.encoder = _session(encoder, providers)
        self.decoder = _session(decoder, providers)
        self.providers: list[str] = self.encoder.get_providers()
        for path, session, graph in ((encoder, self.encoder, "encoder"), (decoder, self.decoder, "decoder")):
            _check_graph_metadata(Path(path), _metadata_of(session), graph, checkpoint_sha256, checkpoint)

    def _embed(self, image: np.ndarray) -> ImageEmbedding:
        x, input_size = preprocess(image)
        features = self.encoder.run(None, {ENCODER_INPUTS[0]: x.numpy()})[0]
        return ImageEmbedding(torch.from_numpy(features), (image.shape[0], image.shape[1]), input_size)

    def _decode(self, emb: ImageEmbedding, prompt: Prompt, multimask: bool) -> SamPrediction:
        scores, low_res = self.decoder.run(["iou_predictions", "low_res_masks"],
                                          _numpy_feed(decoder_inputs(emb, prompt)))
        return select_prediction(torch.from_numpy(low_res), torch.from_numpy(scores), emb, multimask)


def _check_graph_metadata(path: Path, metadata: dict[str, str], graph: Graph, checkpoint_sha256: str | None,
                          checkpoint: Path | None = None) -> None:
    """Refuse a graph that is not the expected half, or not from the checkpoint in use."""
    export = export_command(graph, path, checkpoint)
    found = metadata.get(META_GRAPH)
    if found != graph:
        raise WeightsError(f"{path} is not a SAM {graph} written by export_sam_{graph}.py "
                           f"(it says {found or 'nothing'}); re-export it: {export}")
    if graph == "decoder" and metadata.get(META_DECODER_MASKS) != "all":
        raise WeightsError(f"{path} was exported with --no-multimask and returns one mask; the backends need "
                           f"all four: re-export it without that option: {export}")
    if checkpoint_sha256 is not None and metadata.get(META_CHECKPOINT_SHA256) != checkpoint_sha256:
        raise WeightsError(f"{path} was exported from other weights than the checkpoint in use; "
                           f"re-export it: {export}")


def export_command(graph: Graph, path: Path, checkpoint: Path | None) -> str:
    """The command that writes `path` from `checkpoint`, ready to paste into a shell."""
    source = shlex.quote(str(checkpoint)) if checkpoint is not None else "CHECKPOINT"
    return f"python export_sam_{graph}.py --checkpoint {source} --output {shlex.quote(str(path))}"


def check_export(checkpoint: str | Path, path: str | Path, graph: Graph) -> None:
    """Raise WeightsError unless `path` is the `graph` exported from `checkpoint` (what the backends accept)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"no ONNX {graph} at {path}: export it with {export_command(graph, path, Path(checkpoint))}")
    _check_graph_metadata(path, read_graph_metadata(path), graph, file_sha256(checkpoint), Path(checkpoint))


def onnxruntime_installed() -> bool:
    """Whether the ONNX backend can run at all here. Found, not imported: a run that never uses it should not
    pay for the import (see `onnxruntime`)."""
    return importlib.util.find_spec("onnxruntime") is not None


def onnx_ready(checkpoint: str | Path, device: torch.device) -> str | None:
    """Why backend "auto" should not pick ONNX Runtime here, or None when it should.

    ONNX Runtime is the fastest CPU path (about 1.5x PyTorch for the encoder on
    two cores), so "auto" takes it on the CPU when both graphs of this
    checkpoint are exported; on a GPU, PyTorch (or TensorRT) is preferred.
    """
    if device.type != "cpu":
        return f"on {device.type}, PyTorch runs SAM at least as fast"
    if not onnxruntime_installed():
        return "onnxruntime is not installed"
    paths = onnx_paths(checkpoint)
    try:
        for path, graph in zip(paths, ("encoder", "decoder")):
            check_export(checkpoint, path, graph)
    except WeightsError as exc:
        warn_unused(paths, "SAM's ONNX graphs", exc)
        return str(exc)
    return None


def warn_unused(paths: Sequence[Path], what: str, reason: Exception) -> None:
    """Say why exported files that are all in place are passed over by backend "auto" (they look meant to be used)."""
    if all(Path(path).is_file() for path in paths):
        log.warning("%s beside the checkpoint are not used: %s", what, reason)


def load_onnx_backend(checkpoint: Path, device: torch.device, dtype: torch.dtype = torch.float32) -> OnnxSam:
    """The ONNX backend for a checkpoint, from the graphs beside it (`onnx_paths`).

    The precision is the graphs' own (export with --fp16 for float16), so `dtype` is not used.
    """
    encoder, decoder = onnx_paths(checkpoint)
    for path, graph in ((encoder, "encoder"), (decoder, "decoder")):
        if not path.is_file():
            check_export(checkpoint, path, graph)  # raises, naming the export command
    return OnnxSam(encoder, decoder, device, checkpoint_sha256=file_sha256(checkpoint), checkpoint=checkpoint)


register_backend("onnx", load_onnx_backend, available=lambda device: onnxruntime_installed(), priority=10,
                 ready=onnx_ready, needs="SAM's ONNX graphs: export_sam_encoder.py and export_sam_decoder.py")
