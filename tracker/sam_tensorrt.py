"""TensorRT 10 engines for SAM ViT-B, built from the ONNX graphs, and a backend that runs them.

An engine runs only on the GPU model and TensorRT version it was built with,
and only means something for the ONNX file it was built from. So each engine
has a metadata JSON file beside it, and an engine whose metadata does not
match this machine and its ONNX file is refused with the reason and rebuilt.

The decoder engine covers the prompt encoder and mask decoder (outputs
`iou_predictions` and `low_res_masks`). The graph's full-resolution `masks`
output has a size given by the *values* of `orig_im_size`, for which TensorRT
cannot plan memory, so that upscale runs in PyTorch on the GPU, with the same
function as every other backend.

`tensorrt` is imported only when needed: this module imports (and says
"not available") where it is not installed.
"""
from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch

from tracker.errors import PromptError, TrackerError, WeightsError
from tracker.sam import ImageEmbedding, Prompt, SamBackend, SamPrediction, preprocess, register_backend
from tracker.sam_onnx import (
    DECODER_INPUTS,
    ENCODER_INPUTS,
    ENCODER_OUTPUTS,
    META_GRAPH,
    check_export,
    decoder_inputs,
    onnx_paths,
    read_graph_metadata,
    select_prediction,
    warn_unused,
)
from tracker.weights import file_sha256

TENSORRT_REQUIREMENT = "tensorrt>=10,<11"
PRECISIONS = ("fp16", "fp32")
MAX_POINTS = 64  # the decoder profile: 1..64 rows of point_coords (clicks + padding or box corners)
OPT_POINTS = 4  # the shape TensorRT tunes the decoder for: a few clicks
WORKSPACE_BYTES = 4 << 30
ENGINE_DECODER_INPUTS = tuple(name for name in DECODER_INPUTS if name != "orig_im_size")
ENGINE_DECODER_OUTPUTS = ("iou_predictions", "low_res_masks")

_log = logging.getLogger(__name__)


class StaleEngineError(WeightsError):
    """An engine built for another GPU, TensorRT version, precision or ONNX file."""


def engine_path(onnx_path: str | Path) -> Path:
    """Where the engine of an ONNX graph lives: beside it, `.engine` for `.onnx`."""
    return Path(onnx_path).with_suffix(".engine")


def metadata_path(engine: str | Path) -> Path:
    """The JSON file that says what an engine was built for."""
    engine = Path(engine)
    return engine.with_name(engine.name + ".json")


@dataclass(frozen=True)
class EngineMetadata:
    """What an engine was built with and for; any difference makes it unusable or stale."""

    tensorrt_version: str
    gpu_name: str
    compute_capability: str  # "8.9"
    precision: str  # "fp16" or "fp32"
    onnx_sha256: str

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> EngineMetadata:
        """Parse metadata; ValueError when it is not a JSON object with every field as a string."""
        data = json.loads(text)
        names = [field.name for field in fields(cls)]
        if not isinstance(data, dict) or not all(isinstance(data.get(name), str) for name in names):
            raise ValueError(f"expected a JSON object with string fields {', '.join(names)}")
        return cls(**{name: data[name] for name in names})


def read_metadata(engine: str | Path) -> EngineMetadata | None:
    """The metadata beside an engine; None when it is missing or unreadable (either way the engine is refused)."""
    try:
        return EngineMetadata.from_json(metadata_path(engine).read_text())
    except (OSError, ValueError):
        return None


def write_metadata(engine: str | Path, metadata: EngineMetadata) -> None:
    _write_atomic(metadata_path(engine), metadata.to_json().encode())


def stale_reason(found: EngineMetadata | None, wanted: EngineMetadata, *, any_precision: bool = False) -> str | None:
    """Why an engine with metadata `found` cannot serve `wanted`, or None when it can.

    any_precision accepts an engine of either precision (a user may have built
    fp32 on purpose); the other fields must match exactly.
    """
    if found is None:
        return "has no readable metadata file beside it"
    if found.tensorrt_version != wanted.tensorrt_version:
        return f"was built with TensorRT {found.tensorrt_version}, this is TensorRT {wanted.tensorrt_version}"
    if (found.gpu_name, found.compute_capability) != (wanted.gpu_name, wanted.compute_capability):
        return (f"was built for {found.gpu_name} (compute capability {found.compute_capability}), this GPU is "
                f"{wanted.gpu_name} (compute capability {wanted.compute_capability})")
    if found.onnx_sha256 != wanted.onnx_sha256:
        return "was built from a different ONNX file (the ONNX was exported again since)"
    if not any_precision and found.precision != wanted.precision:
        return f"is {found.precision}, {wanted.precision} was asked for"
    return None


def check_engine(engine: str | Path, wanted: EngineMetadata, *, any_precision: bool = False) -> None:
    """Raise StaleEngineError, naming the reason and the fix, unless `engine` serves `wanted`."""
    engine = Path(engine)
    reason = "does not exist" if not engine.is_file() else stale_reason(read_metadata(engine), wanted,
                                                                         any_precision=any_precision)
    if reason is not None:
        raise StaleEngineError(f"TensorRT engine {engine} {reason}: rebuild it with the export script's --engine "
                               "option (export_sam_encoder.py / export_sam_decoder.py), or delete it")


def tensorrt_installed() -> bool:
    """Whether `import tensorrt` works here."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False
    return True


def require_tensorrt(device: str | torch.device = "cuda") -> torch.device:
    """The CUDA device engines are built and run on; TrackerError when TensorRT or the GPU is missing."""
    if not tensorrt_installed():
        raise TrackerError(f"tensorrt is not installed: pip install -r requirements-tensorrt.txt "
                           f"({TENSORRT_REQUIREMENT}, from NVIDIA's package index)")
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        raise TrackerError(f"TensorRT engines need a CUDA GPU (device {device}, PyTorch sees "
                           f"{torch.cuda.device_count()} GPUs): use the torch or onnx backend")
    return device


def wanted_metadata(onnx_path: str | Path, precision: str, device: torch.device) -> EngineMetadata:
    """The metadata an engine of `onnx_path` must have on this machine."""
    import tensorrt as trt

    major, minor = torch.cuda.get_device_capability(device)
    return EngineMetadata(tensorrt_version=trt.__version__, gpu_name=torch.cuda.get_device_name(device),
                          compute_capability=f"{major}.{minor}", precision=precision,
                          onnx_sha256=file_sha256(onnx_path))


def timing_cache_path(folder: Path, metadata: EngineMetadata) -> Path:
    """One timing cache per GPU model and TensorRT version, shared by the engines of a folder."""
    gpu = "".join(c if c.isalnum() else "-" for c in metadata.gpu_name).strip("-").lower()
    return folder / f"tensorrt-{metadata.tensorrt_version}-{gpu}.timing-cache"


def ensure_engine(onnx_path: str | Path, *, precision: str = "fp16", device: str | torch.device = "cuda",
                  any_precision: bool = True, log: Callable[[str], None] | None = None) -> Path:
    """The engine of an ONNX graph, (re)built when it is missing or stale.

    Progress goes to `log` when given, else a rebuild (and its reason) is
    logged as a warning, since it takes minutes.
    """
    device = require_tensorrt(device)
    engine = engine_path(onnx_path)
    wanted = wanted_metadata(onnx_path, precision, device)
    try:
        check_engine(engine, wanted, any_precision=any_precision)
    except StaleEngineError as exc:
        say = log or _log.warning
        say(f"{exc}; building it now (this takes minutes)")
        build_engine(onnx_path, engine, wanted, device, log=say)
    else:
        if log is not None:
            log(f"TensorRT engine {engine} is up to date")
    return engine


def build_engine(onnx_path: str | Path, engine: Path, metadata: EngineMetadata, device: torch.device, *,
                 log: Callable[[str], None] = _log.warning) -> None:
    """Build `engine` from an ONNX graph with TensorRT, then write its metadata.

    The decoder gets an optimisation profile for 1..MAX_POINTS points and is
    built from its graph without the full-resolution upscale (see the module
    docstring). The shared timing cache makes rebuilds on the same GPU quick.
    """
    import tensorrt as trt

    if metadata.precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {metadata.precision!r}")
    onnx_path = Path(onnx_path)
    is_decoder = read_graph_metadata(onnx_path).get(META_GRAPH) == "decoder"
    start = time.monotonic()
    with torch.cuda.device(device):
        logger = trt.Logger(trt.Logger.WARNING)
        builder = trt.Builder(logger)
        network = builder.create_network(0)  # explicit batch: the only mode in TensorRT 10
        parser = trt.OnnxParser(network, logger)
        parsed = parser.parse(engine_decoder_graph(onnx_path)) if is_decoder else parser.parse_from_file(str(onnx_path))
        if not parsed:
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise TrackerError(f"TensorRT cannot parse {onnx_path} ({errors}): use the torch or onnx backend")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
        if metadata.precision == "fp16":
            config.set_flag(trt.BuilderFlag.FP16)
        cache_file = timing_cache_path(engine.parent, metadata)
        cache = config.create_timing_cache(cache_file.read_bytes() if cache_file.is_file() else b"")
        if not config.set_timing_cache(cache, False):  # a cache from another device or build: start afresh
            config.set_timing_cache(config.create_timing_cache(b""), False)
        if is_decoder:
            profile = builder.create_optimization_profile()
            for name, tail in (("point_coords", (2,)), ("point_labels", ())):
                profile.set_shape(name, (1, 1, *tail), (1, OPT_POINTS, *tail), (1, MAX_POINTS, *tail))
            config.add_optimization_profile(profile)
        log(f"building a {metadata.precision} TensorRT engine from {onnx_path} on {metadata.gpu_name} ...")
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise TrackerError(f"TensorRT failed to build an engine from {onnx_path} (see its log above): "
                               "use the torch or onnx backend")
        _write_atomic(cache_file, bytes(config.get_timing_cache().serialize()))
    metadata_path(engine).unlink(missing_ok=True)  # never leave new metadata beside an old engine
    _write_atomic(engine, bytes(serialized))
    write_metadata(engine, metadata)
    log(f"wrote {engine} ({engine.stat().st_size / 2**20:.1f} MiB, {time.monotonic() - start:.0f} s)")


def engine_decoder_graph(onnx_path: str | Path) -> bytes:
    """The decoder graph TensorRT builds: every input but orig_im_size, outputs iou_predictions and low_res_masks."""
    import onnx

    model = onnx.load(str(onnx_path))
    pruned = onnx.utils.Extractor(model).extract_model(list(ENGINE_DECODER_INPUTS), list(ENGINE_DECODER_OUTPUTS))
    return pruned.SerializeToString()


_TORCH_DTYPES = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT8": torch.int8,
                 "UINT8": torch.uint8, "INT32": torch.int32, "INT64": torch.int64, "BOOL": torch.bool}


class EngineRunner:
    """One engine and its execution context, fed and read with CUDA tensors on PyTorch's current stream."""

    def __init__(self, engine: str | Path, device: str | torch.device = "cuda"):
        import tensorrt as trt

        self.device = torch.device(device)
        self._logger = trt.Logger(trt.Logger.WARNING)
        with torch.cuda.device(self.device):
            self._runtime = trt.Runtime(self._logger)
            self.engine = self._runtime.deserialize_cuda_engine(Path(engine).read_bytes())
            if self.engine is None:
                raise StaleEngineError(f"TensorRT cannot load the engine {engine} (see its log above): delete it "
                                       "and it is rebuilt")
            self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = tuple(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
        self.outputs = tuple(n for n in names if n not in self.inputs)
        self._dtypes = {n: _TORCH_DTYPES[self.engine.get_tensor_dtype(n).name] for n in names}

    def max_shape(self, name: str) -> tuple[int, ...]:
        """The largest shape of an input in the engine's (first) optimisation profile."""
        return tuple(self.engine.get_tensor_profile_shape(name, 0)[2])

    def __call__(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Run on PyTorch's current CUDA stream; outputs are new tensors, ordered after the run on that stream."""
        with torch.cuda.device(self.device):
            return self._run(inputs)

    def _run(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        staged = {name: inputs[name].to(self.device, self._dtypes[name]).contiguous() for name in self.inputs}
        for name, tensor in staged.items():
            if not self.context.set_input_shape(name, tuple(tensor.shape)):
                raise ValueError(f"input {name} of shape {tuple(tensor.shape)} is outside the engine's profile")
            self.context.set_tensor_address(name, tensor.data_ptr())
        outputs = {}
        for name in self.outputs:
            outputs[name] = torch.empty(tuple(self.context.get_tensor_shape(name)), dtype=self._dtypes[name],
                                        device=self.device)
            self.context.set_tensor_address(name, outputs[name].data_ptr())
        if not self.context.execute_async_v3(torch.cuda.current_stream(self.device).cuda_stream):
            raise RuntimeError("TensorRT failed to enqueue the engine (see its log above)")
        return outputs


class TensorRTSam(SamBackend):
    """SAM through two TensorRT engines on one CUDA GPU."""

    name = "tensorrt"

    def __init__(self, encoder_engine: str | Path, decoder_engine: str | Path, device: str | torch.device = "cuda"):
        self.device = torch.device(device)
        self.encoder = EngineRunner(encoder_engine, self.device)
        self.decoder = EngineRunner(decoder_engine, self.device)
        self.max_points = self.decoder.max_shape("point_coords")[1]

    def _embed(self, image: np.ndarray) -> ImageEmbedding:
        with torch.inference_mode():
            x, input_size = preprocess(image, method="torch", device=self.device)
            features = self.encoder({ENCODER_INPUTS[0]: x})[ENCODER_OUTPUTS[0]]
        return ImageEmbedding(features.float(), (image.shape[0], image.shape[1]), input_size)

    def _decode(self, emb: ImageEmbedding, prompt: Prompt, multimask: bool) -> SamPrediction:
        rows = len(prompt.points) + (2 if prompt.box is not None else 1)
        if rows > self.max_points:
            raise PromptError(f"{len(prompt.points)} clicks are more than the TensorRT decoder takes "
                              f"({self.max_points - 2} with a box, {self.max_points - 1} without): use fewer clicks")
        on_gpu = ImageEmbedding(emb.features.to(self.device), emb.original_size, emb.input_size)
        with torch.inference_mode():
            outputs = self.decoder(decoder_inputs(on_gpu, prompt))
            return select_prediction(outputs["low_res_masks"], outputs["iou_predictions"], on_gpu, multimask)


def engines_ready(checkpoint: str | Path, device: torch.device) -> str | None:
    """Why the TensorRT backend cannot start right now without building, or None when it can.

    What backend "auto" asks: TensorRT only when both engines are there and
    were built for this GPU, this TensorRT and the ONNX files of this checkpoint.
    """
    graphs = onnx_paths(checkpoint)
    try:
        device = require_tensorrt(device)
        for onnx_path, graph in zip(graphs, ("encoder", "decoder")):
            check_export(checkpoint, onnx_path, graph)
            check_engine(engine_path(onnx_path), wanted_metadata(onnx_path, "fp16", device), any_precision=True)
    except TrackerError as exc:
        if torch.device(device).type == "cuda":
            warn_unused([engine_path(path) for path in graphs], "SAM's TensorRT engines", exc)
        return str(exc)
    return None


def load_tensorrt_backend(checkpoint: Path, device: torch.device, dtype: torch.dtype = torch.float32) -> TensorRTSam:
    """The TensorRT backend for a checkpoint, building missing or stale engines from the ONNX graphs beside it.

    The engines' own precision applies, so `dtype` is not used.
    """
    device = require_tensorrt(device)
    engines = []
    for onnx_path, graph in zip(onnx_paths(checkpoint), ("encoder", "decoder")):
        check_export(checkpoint, onnx_path, graph)
        engines.append(ensure_engine(onnx_path, device=device))
    return TensorRTSam(*engines, device)


def _write_atomic(path: Path, data: bytes) -> None:
    partial = path.with_name(path.name + ".partial")
    try:
        partial.write_bytes(data)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


register_backend("tensorrt", load_tensorrt_backend,
                 available=lambda device: device.type == "cuda" and tensorrt_installed(), priority=20,
                 ready=engines_ready, needs="a CUDA GPU, the tensorrt package and SAM's ONNX graphs")
