"""Segment Anything (ViT-B): clicks and boxes on a frame -> a full-resolution mask.

Backends (torch here; ONNX Runtime and TensorRT in their own modules) share
the preprocessing, prompt checks and transforms and mask upscaling defined
below, so they all feed the network exactly what SAM's own predictor does.

A backend module registers itself with `register_backend(name, load,
available, priority)` when imported; `load_sam` imports the optional backend
modules it knows of, and backend="auto" takes the available one of highest
priority. Such a module must import even when its runtime is missing and say
so through `available`.
"""
from __future__ import annotations

import contextlib
import contextvars
import importlib
import logging
import math
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import ArrayLike
from PIL import Image

from XMem.inference.graph_cache import GraphCache

from tracker.errors import PromptError, TrackerError
from tracker.sam_attention import use_fused_attention
from tracker.sam_encoder import half_precision_encoder, kernel_runs
from tracker.segment_anything_compat import Sam, SamOnnxModel
from tracker.transfer import Download, upload
from tracker.weights import build_model, load_checkpoint, verify_layout

log = logging.getLogger(__name__)

IMAGE_SIZE = 1024  # the encoder's square input
LOW_RES_SIZE = 256  # the decoder's mask logits (and mask_input) side
MASK_INPUT_LOGIT = 10.0  # |logit| SAM gets for "surely object" / "surely background" in a prior mask
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)
MASK_THRESHOLD = 0.0  # Sam.mask_threshold: logits above it are the object
# "torch" resizing differs from the reference "pil" resizing by at most this many
# grey levels per pixel and channel (about a fifth of the values differ by one).
RESIZE_TOLERANCE = 1


@dataclass
class ImageEmbedding:
    """The encoder's output for one frame plus the sizes needed to map masks back onto it."""

    features: torch.Tensor  # (1, 256, 64, 64)
    original_size: tuple[int, int]  # (H, W) of the frame
    input_size: tuple[int, int]  # (h, w) of the resized frame inside the 1024x1024 input


@dataclass
class SamPrediction:
    """K candidate masks at frame resolution, their predicted IoU and the logits for refinement."""

    masks: np.ndarray  # (K, H, W) bool
    scores: np.ndarray  # (K,) float32
    low_res_logits: np.ndarray  # (K, 256, 256) float32, usable as a later mask_input[None]


@dataclass(frozen=True)
class Prompt:
    """Checked prompts in the model's 1024-pixel input frame."""

    points: np.ndarray  # (N, 2) float32 x, y
    labels: np.ndarray  # (N,) int64: 1 object, 0 background
    box: np.ndarray | None  # (4,) float32 x0, y0, x1, y1
    mask_input: np.ndarray | None  # (1, 256, 256) float32 logits

    def point_prompt(self) -> tuple[np.ndarray, np.ndarray]:
        """Points and box as one (1, M, 2) coordinate / (1, M) label list, as SAM's ONNX decoder takes them.

        Box corners get labels 2 and 3; without a box a padding point labelled
        -1 is appended, which is what SAM's prompt encoder does internally.
        """
        if self.box is not None:
            extra_points, extra_labels = self.box.reshape(2, 2), np.array([2, 3])
        else:
            extra_points, extra_labels = np.zeros((1, 2)), np.array([-1])
        coords = np.concatenate([self.points, extra_points]).astype(np.float32)
        labels = np.concatenate([self.labels, extra_labels]).astype(np.float32)
        return coords[None], labels[None]


class EmbeddingStopped(Exception):
    """An embedding given up part way, because the `stop` it was made with said so."""


# The `stop` of the embedding this thread is making (`SamBackend.embed`), asked at its encoder's `stop_point`s.
_EMBEDDING_STOP: contextvars.ContextVar[Callable[[], bool] | None] = contextvars.ContextVar("embedding_stop",
                                                                                          default=None)


def stop_point() -> None:
    """Where a `stoppable` backend's embedding can be given up: raises `EmbeddingStopped` once its `stop` says so."""
    stop = _EMBEDDING_STOP.get()
    if stop is not None and stop():
        raise EmbeddingStopped


def _stop_before(module: torch.nn.Module, args: tuple) -> None:
    """A forward pre-hook making a `stop_point` of the encoder's blocks."""
    stop_point()


class SamBackend(ABC):
    """One way of running SAM. Subclasses implement `_embed` and `_decode`; checks live here."""

    name: ClassVar[str]
    # Whether `embed` gives up part way when its `stop` says so (between two of the encoder's blocks); backends
    # that cannot stop run to the end.
    stoppable: bool = False

    def __new__(cls, *args, **kwargs):
        # One call at a time: the web app's clicks and a running job share the
        # backend, and TensorRT execution contexts are not thread-safe.
        backend = super().__new__(cls)
        backend._lock = threading.Lock()
        backend._needed = 0  # calls not made ahead waiting for `_lock`: an embedding made ahead yields to them
        backend._needed_lock = threading.Lock()
        return backend

    @contextlib.contextmanager
    def _turn(self, needed: bool) -> Iterator[None]:
        """Hold the backend for one call; a `needed` one (not made ahead) says it waits while it does."""
        if needed:
            with self._needed_lock:
                self._needed += 1
        try:
            self._lock.acquire()
        finally:
            if needed:
                with self._needed_lock:
                    self._needed -= 1
        try:
            yield
        finally:
            self._lock.release()

    def embed(self, image: np.ndarray, stop: Callable[[], bool] | None = None,
              ahead: Callable[[], bool] | None = None) -> ImageEmbedding:
        """Encode an HxWx3 uint8 RGB frame (the expensive step, once per frame).

        A `stoppable` backend asks between the encoder's blocks whether to go
        on, and gives the embedding up (`EmbeddingStopped`) once `stop` returns
        True. One made ahead of need (`ahead` given) also gives way to any call
        that needs the backend meanwhile, while `ahead()` says it is still
        ahead (once a click waits for it, it goes on).
        """
        check_image(image)

        def stops() -> bool:
            return (stop is not None and stop()) or (ahead is not None and self._needed > 0 and ahead())

        with self._turn(needed=ahead is None):
            token = _EMBEDDING_STOP.set(None if stop is None and ahead is None else stops)
            try:
                return self._embed(image)
            finally:
                _EMBEDDING_STOP.reset(token)

    def decode(self, emb: ImageEmbedding, points: ArrayLike | None, labels: ArrayLike | None,
               box: ArrayLike | None = None, mask_input: ArrayLike | None = None,
               multimask: bool = False) -> SamPrediction:
        """Masks for clicks in frame pixels (label 1 object, 0 background), an optional box and prior logits.

        multimask=True returns SAM's three candidates, else one mask.
        """
        prompt = prepare_prompt(points, labels, box, mask_input, emb.original_size)
        with self._turn(needed=True):
            return self._decode(emb, prompt, multimask)

    @abstractmethod
    def _embed(self, image: np.ndarray) -> ImageEmbedding: ...

    @abstractmethod
    def _decode(self, emb: ImageEmbedding, prompt: Prompt, multimask: bool) -> SamPrediction: ...


SAM_PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def encoder_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The image encoder's autocast type: "auto" is fp16 on CUDA (tensor cores; autocast keeps the
    layer norms and softmax in fp32, and an overflow falls back to fp32) and fp32 on the CPU.

    fp16 is refused on the CPU, as it is for XMem (`resolve_precision`): there it runs far slower than fp32.
    """
    if precision == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if precision not in SAM_PRECISIONS:
        raise TrackerError(f"unknown SAM precision {precision!r}; use auto, {', '.join(SAM_PRECISIONS)}")
    if device.type != "cuda" and precision == "fp16":
        raise TrackerError("SAM precision fp16 runs on CUDA GPUs only; on the CPU use bf16 or fp32")
    return SAM_PRECISIONS[precision]


class TorchSam(SamBackend):
    """SAM in PyTorch: the reference, on CPU or CUDA.

    `dtype` other than float32 runs the image encoder in half precision
    (default: fp16 on CUDA, fp32 on the CPU): on CUDA with Triton a copy of it
    in that type with its attention as one kernel (`tracker.sam_encoder`),
    else under autocast; the decoder stays in float32. `resize` defaults to
    the reference PIL resize on the CPU and to the on-device resize elsewhere.
    `fused_attention` switches the model's encoder attention to the fused
    kernel of `tracker.sam_attention` (same maths; faster, far less memory).
    On CUDA, with `cuda_graphs`, the encoder and the prompt-to-mask step
    (prompt embedding, mask decoder, upscaling) replay CUDA graphs, one per
    prompt shape and frame size: a few launches instead of hundreds.
    """

    name = "torch"

    def __init__(self, model: Sam, device: str | torch.device = "cpu", *, dtype: torch.dtype | None = None,
                 resize: str | None = None, fused_attention: bool = False, cuda_graphs: bool = True):
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval()
        if fused_attention:
            use_fused_attention(self.model.image_encoder)
        self.dtype = dtype or encoder_dtype("auto", self.device)
        self.resize = resize or ("pil" if self.device.type == "cpu" else "torch")
        self._graphs = GraphCache(enabled=cuda_graphs and self.device.type == "cuda")
        self._onnx_prompts = SamOnnxModel(self.model, return_single_mask=False)
        self._half_encoder = None
        if self.device.type == "cuda" and self.dtype != torch.float32 and kernel_runs(self.model.image_encoder):
            self._half_encoder = half_precision_encoder(self.model.image_encoder, self.dtype)
        # On a CPU an embedding takes seconds, a block about a twelfth of them; on a GPU milliseconds, replayed
        # as a graph that runs no hooks.
        self.stoppable = self.device.type == "cpu"
        if self.stoppable:
            for block in self.model.image_encoder.blocks:
                block.register_forward_pre_hook(_stop_before)

    @property
    def cuda_graphs(self) -> bool:
        return self._graphs.enabled

    @cuda_graphs.setter
    def cuda_graphs(self, enabled: bool) -> None:
        self._graphs.enabled = enabled and self.device.type == "cuda"

    def _embed(self, image: np.ndarray) -> ImageEmbedding:
        with torch.inference_mode():
            x, input_size = preprocess(image, method=self.resize, device=self.device,
                                       pixel_mean=self.model.pixel_mean, pixel_std=self.model.pixel_std)
            features = self._encode(x, self.dtype)
            if self.dtype != torch.float32 and not torch.isfinite(features).all():
                features = self._encode(x, torch.float32)  # this frame overflowed half precision
        return ImageEmbedding(features.float(), (image.shape[0], image.shape[1]), input_size)

    def _encode(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        def encoder(batch: torch.Tensor) -> torch.Tensor:
            if dtype != torch.float32 and self._half_encoder is not None:
                return self._half_encoder(batch.to(dtype))
            # No cast cache: a graph captured inside must not point at cached weight copies freed on exit.
            with torch.autocast(self.device.type, dtype=dtype, enabled=dtype != torch.float32, cache_enabled=False):
                return self.model.image_encoder(batch)

        return self._graphs.run("SAM's encoder", (dtype,), encoder, [x])

    def _decode(self, emb: ImageEmbedding, prompt: Prompt, multimask: bool) -> SamPrediction:
        with torch.inference_mode():
            coords, labels = (upload(a, self.device) for a in prompt.point_prompt())
            inputs = [emb.features.to(self.device), coords, labels]
            if prompt.mask_input is not None:
                inputs.append(upload(prompt.mask_input[None], self.device))

            def prompt_to_masks(features: torch.Tensor, coords: torch.Tensor, labels: torch.Tensor,
                                mask_input: torch.Tensor | None = None):
                # SAM's sums without its boolean-mask assignments, whose host synchronisations a CUDA
                # graph cannot hold: the ONNX wrapper's form (the ONNX decoder's prompt embedding too).
                sparse = self._onnx_prompts._embed_points(coords, labels)
                dense = dense_embeddings(self.model.prompt_encoder, mask_input)
                low_res, scores = self.model.mask_decoder(
                    image_embeddings=features,
                    image_pe=self.model.prompt_encoder.get_dense_pe(),
                    sparse_prompt_embeddings=sparse,
                    dense_prompt_embeddings=dense,
                    multimask_output=multimask,
                )
                masks = upscale_masks(low_res, emb.input_size, emb.original_size) > MASK_THRESHOLD
                return masks[0], scores[0], low_res[0]

            flags = (multimask, emb.input_size, emb.original_size)
            downloads = [Download(t) for t in self._graphs.run("SAM's decoder", flags, prompt_to_masks, inputs)]
            return SamPrediction(*(download.result() for download in downloads))


def dense_embeddings(prompt_encoder: torch.nn.Module, mask_input: torch.Tensor | None) -> torch.Tensor:
    """SAM's dense prompt embedding: of the prior mask logits, or the learned no-mask embedding."""
    if mask_input is not None:
        return prompt_encoder._embed_masks(mask_input)
    return prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(1, -1, *prompt_encoder.image_embedding_size)


def segment(backend: SamBackend, emb: ImageEmbedding, points: ArrayLike | None, labels: ArrayLike | None,
            box: ArrayLike | None = None, mask_input: ArrayLike | None = None) -> tuple[np.ndarray, float]:
    """One mask for a prompt, with SAM's recommended policy.

    A single positive click is ambiguous (part or whole?), so SAM proposes three
    masks and the best-scoring one is kept; more clicks, a box or prior logits
    are specific enough for the single-mask output.
    """
    labels_list = [] if labels is None else np.asarray(labels).reshape(-1).tolist()
    multimask = box is None and mask_input is None and labels_list == [1]
    prediction = backend.decode(emb, points, labels, box, mask_input, multimask=multimask)
    best = int(np.argmax(prediction.scores))
    return prediction.masks[best], float(prediction.scores[best])


@dataclass(frozen=True)
class BackendEntry:
    """How to build a backend and whether it can run on a device."""

    load: Callable[[Path, torch.device, torch.dtype], SamBackend]
    available: Callable[[torch.device], bool]
    priority: int
    # For "auto" only: None when the backend's files for this checkpoint and device are in place, else why not.
    ready: Callable[[Path, torch.device], str | None] | None = None
    needs: str = ""  # what it needs beyond PyTorch, said where it is offered or refused


_BACKENDS: dict[str, BackendEntry] = {}
_OPTIONAL_BACKEND_MODULES = ("tracker.sam_onnx", "tracker.sam_tensorrt")


def register_backend(name: str, load: Callable[[Path, torch.device, torch.dtype], SamBackend],
                     available: Callable[[torch.device], bool], priority: int = 0,
                     ready: Callable[[Path, torch.device], str | None] | None = None, needs: str = "") -> None:
    """Make `name` selectable in `load_sam`; "auto" prefers the ready available backend of highest priority."""
    _BACKENDS[name] = BackendEntry(load, available, priority, ready, needs)


def available_backends(device: str | torch.device = "auto") -> list[str]:
    """Backends that can run on `device`, the one "auto" picks first."""
    _import_optional_backends()
    dev = resolve_device(device)
    usable = [(entry.priority, name) for name, entry in _BACKENDS.items() if entry.available(dev)]
    return [name for _, name in sorted(usable, reverse=True)]


def ready_backends(checkpoint: str | Path, device: str | torch.device = "auto") -> list[str]:
    """Backends that can run `checkpoint` on `device` now (their files in place), the one "auto" picks first."""
    dev = resolve_device(device)
    return [name for name in available_backends(dev)
            if _BACKENDS[name].ready is None or _BACKENDS[name].ready(Path(checkpoint), dev) is None]


def load_sam(checkpoint: str | Path, device: str | torch.device = "auto", backend: str = "auto", *,
             precision: str = "auto") -> SamBackend:
    """A ready SAM ViT-B backend for a checkpoint; device "auto" = CUDA when present, else CPU.

    `precision` is the PyTorch encoder's (see `encoder_dtype`); ONNX and TensorRT run their graphs' own.
    """
    dev = resolve_device(device)
    usable = available_backends(dev)
    if backend == "auto":
        backend = ready_backends(checkpoint, dev)[0]
    elif backend not in usable:
        entry = _BACKENDS.get(backend)
        what = "unknown" if entry is None else f"not available on {dev.type}" + _needs(entry)
        choices = ", ".join(name + _needs(_BACKENDS[name]) for name in usable)
        raise TrackerError(f"SAM backend {backend!r} is {what}; choose one of: auto, {choices}")
    dtype = backend_dtype(precision, dev, backend)
    if precision != "auto" and backend != "torch":
        log.warning("SAM precision %s is the PyTorch encoder's; the %s backend runs its own (%s)", precision,
                    backend, "the precision its graphs were exported in" if backend == "onnx" else "its engine's")
    return _BACKENDS[backend].load(Path(checkpoint), dev, dtype)


def backend_dtype(precision: str, device: torch.device, backend: str) -> torch.dtype:
    """`encoder_dtype` for the PyTorch backend ("auto" may become it); the others run their graphs' own
    precision, so any known one is taken for them (fp16 included on a CPU)."""
    if backend in ("auto", "torch"):
        return encoder_dtype(precision, device)
    if precision != "auto" and precision not in SAM_PRECISIONS:
        raise TrackerError(f"unknown SAM precision {precision!r}; use auto, {', '.join(SAM_PRECISIONS)}")
    return encoder_dtype("auto", device)


def _needs(entry: BackendEntry) -> str:
    return f" (it needs {entry.needs})" if entry.needs else ""


def resolve_device(device: str | torch.device) -> torch.device:
    """Turn "auto" into cuda when PyTorch sees a GPU, else cpu; asking for CUDA without one is a user error."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        dev = None
    if dev is None or dev.type not in ("cuda", "cpu"):
        raise TrackerError(f"unknown device {str(device)!r}: use auto, cpu or cuda")
    if dev.type == "cuda" and dev.index:  # streams, events and graphs here are the current device's: GPU 0's
        raise TrackerError(f"{dev} is not supported: this runs on the first GPU it sees; to use GPU {dev.index}, "
                           f"start it with CUDA_VISIBLE_DEVICES={dev.index} and device cuda")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise TrackerError("CUDA was requested but PyTorch sees no CUDA GPU: use device cpu or auto")
    return dev


def resized_shape(height: int, width: int, long_side: int = IMAGE_SIZE) -> tuple[int, int]:
    """(h, w) with the longer side scaled to `long_side`, rounded as SAM's ResizeLongestSide does."""
    scale = long_side * 1.0 / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def resize_image(image: np.ndarray, method: str = "pil", device: str | torch.device = "cpu") -> torch.Tensor:
    """Resize so the longer side is 1024 -> (1, 3, h, w) float32 on `device`, values 0..255.

    "pil" is SAM's reference (PIL bilinear on uint8, as torchvision's resize of a
    PIL image). "torch" resizes on the device with antialiased bilinear
    interpolation, rounded to whole grey levels: within RESIZE_TOLERANCE of "pil".
    """
    h, w = resized_shape(image.shape[0], image.shape[1])
    if method == "pil":
        resized = np.array(Image.fromarray(image).resize((w, h), Image.BILINEAR))
        return torch.as_tensor(resized, device=device).permute(2, 0, 1)[None].float()
    if method == "torch":
        x = upload(image, torch.device(device)).permute(2, 0, 1)[None].float()
        x = F.interpolate(x, (h, w), mode="bilinear", align_corners=False, antialias=True)
        return x.round_().clamp_(0, 255)
    raise ValueError(f"unknown resize method {method!r}; use 'pil' or 'torch'")


def normalize_and_pad(x: torch.Tensor, pixel_mean: Sequence[float] | torch.Tensor = PIXEL_MEAN,
                      pixel_std: Sequence[float] | torch.Tensor = PIXEL_STD) -> torch.Tensor:
    """(1, 3, h, w) 0..255 -> normalised and zero-padded bottom/right to (1, 3, 1024, 1024), as Sam.preprocess."""
    mean = torch.as_tensor(pixel_mean, dtype=x.dtype, device=x.device).reshape(-1, 1, 1)
    std = torch.as_tensor(pixel_std, dtype=x.dtype, device=x.device).reshape(-1, 1, 1)
    x = (x - mean) / std
    return F.pad(x, (0, IMAGE_SIZE - x.shape[-1], 0, IMAGE_SIZE - x.shape[-2]))


def preprocess(image: np.ndarray, *, method: str = "pil", device: str | torch.device = "cpu",
               pixel_mean: Sequence[float] | torch.Tensor = PIXEL_MEAN,
               pixel_std: Sequence[float] | torch.Tensor = PIXEL_STD) -> tuple[torch.Tensor, tuple[int, int]]:
    """An RGB frame -> the encoder's (1, 3, 1024, 1024) input and the (h, w) of the image inside it."""
    x = resize_image(image, method, device)
    return normalize_and_pad(x, pixel_mean, pixel_std), (x.shape[-2], x.shape[-1])


def to_model_coords(xy: ArrayLike, original_size: tuple[int, int]) -> np.ndarray:
    """Frame pixel coordinates (..., 2) -> the resized image's coordinates (float32)."""
    return _scale_xy(xy, original_size, inverse=False)


def to_frame_coords(xy: ArrayLike, original_size: tuple[int, int]) -> np.ndarray:
    """Inverse of `to_model_coords`."""
    return _scale_xy(xy, original_size, inverse=True)


def mask_to_logits(mask: np.ndarray, magnitude: float = MASK_INPUT_LOGIT) -> np.ndarray:
    """An HxW bool mask -> SAM's (1, 256, 256) `mask_input` logits.

    SAM's low-resolution grid covers the 1024x1024 padded input at a quarter of
    its resolution, with the resized frame in the top-left corner. The mask is
    resized onto that grid; each cell's object fraction maps linearly to
    [-magnitude, +magnitude], and the padding is surely background.
    """
    height, width = mask.shape
    resized_h, resized_w = resized_shape(height, width)
    scale = IMAGE_SIZE // LOW_RES_SIZE
    grid_h, grid_w = math.ceil(resized_h / scale), math.ceil(resized_w / scale)
    resized = Image.fromarray(np.asarray(mask, dtype=np.uint8) * 255).resize((resized_w, resized_h), Image.BILINEAR)
    padded = np.zeros((grid_h * scale, grid_w * scale), dtype=np.float32)
    padded[:resized_h, :resized_w] = np.asarray(resized, dtype=np.float32) / 255
    fraction = padded.reshape(grid_h, scale, grid_w, scale).mean(axis=(1, 3))
    logits = np.full((1, LOW_RES_SIZE, LOW_RES_SIZE), -magnitude, dtype=np.float32)
    logits[0, :grid_h, :grid_w] = (2 * fraction - 1) * magnitude
    return logits


def upscale_masks(low_res: torch.Tensor, input_size: tuple[int, int],
                  original_size: tuple[int, int]) -> torch.Tensor:
    """(B, K, 256, 256) logits -> (B, K, H, W) frame logits: to 1024, drop the padding, to the frame size."""
    x = F.interpolate(low_res, (IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    x = x[..., : input_size[0], : input_size[1]]
    return F.interpolate(x, original_size, mode="bilinear", align_corners=False)


def check_image(image: np.ndarray) -> None:
    """Backends take HxWx3 uint8 RGB frames and nothing else."""
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        described = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise ValueError(f"SAM needs an HxWx3 uint8 RGB image, got {described}")


def prepare_prompt(points: ArrayLike | None, labels: ArrayLike | None, box: ArrayLike | None,
                   mask_input: ArrayLike | None, original_size: tuple[int, int]) -> Prompt:
    """Check prompts against the frame and move them into the model's input frame."""
    height, width = original_size
    frame = f"the {width}x{height} frame"
    try:
        xy = np.asarray([] if points is None else points, dtype=np.float64).reshape(-1, 2)
        label_array = np.asarray([] if labels is None else labels, dtype=np.float64).reshape(-1)
    except ValueError:
        raise PromptError(f"clicks must be x,y pairs in pixels of {frame}") from None
    if len(label_array) != len(xy):
        raise PromptError(f"{len(xy)} clicks but {len(label_array)} labels: give one label per click")
    if not np.isin(label_array, (0, 1)).all():
        raise PromptError(f"click labels must be 1 (object) or 0 (background), got {label_array.tolist()}")
    for x, y in xy:
        if not (0 <= x < width and 0 <= y < height):
            raise PromptError(f"click ({x:g}, {y:g}) is outside {frame}: x must be in [0, {width}), "
                              f"y in [0, {height})")
    model_box = None
    if box is not None:
        model_box = to_model_coords(_checked_box(box, width, height), original_size).reshape(4)
    if len(xy) == 0 and model_box is None:
        raise PromptError("SAM needs at least one click or a box")
    mask = None
    if mask_input is not None:
        mask = np.asarray(mask_input, dtype=np.float32)
        if mask.shape != (1, LOW_RES_SIZE, LOW_RES_SIZE):
            raise PromptError(f"mask_input must be the 1x{LOW_RES_SIZE}x{LOW_RES_SIZE} logits of a previous "
                              f"prediction, got shape {mask.shape}")
    return Prompt(to_model_coords(xy, original_size), label_array.astype(np.int64), model_box, mask)


def _checked_box(box: ArrayLike, width: int, height: int) -> np.ndarray:
    try:
        x0, y0, x1, y1 = np.asarray(box, dtype=np.float64).reshape(4)
    except ValueError:
        raise PromptError(f"a box is x0,y0,x1,y1 in pixels of the {width}x{height} frame") from None
    text = f"box ({x0:g}, {y0:g}, {x1:g}, {y1:g})"
    if not (x0 < x1 and y0 < y1):
        raise PromptError(f"{text} has no area in the {width}x{height} frame: it needs x0 < x1 and y0 < y1")
    if not (0 <= x0 and 0 <= y0 and x1 <= width and y1 <= height):
        raise PromptError(f"{text} is outside the {width}x{height} frame: keep 0 <= x <= {width}, "
                          f"0 <= y <= {height}")
    return np.array([[x0, y0], [x1, y1]])


def _scale_xy(xy: ArrayLike, original_size: tuple[int, int], inverse: bool) -> np.ndarray:
    old_h, old_w = original_size
    new_h, new_w = resized_shape(old_h, old_w)
    coords = np.array(xy, dtype=np.float64)  # SAM scales in float64 before the model's float32
    sx, sy = (old_w / new_w, old_h / new_h) if inverse else (new_w / old_w, new_h / old_h)
    coords[..., 0] *= sx
    coords[..., 1] *= sy
    return coords.astype(np.float32)


def load_model(checkpoint: str | Path) -> Sam:
    """The PyTorch SAM ViT-B of a checkpoint (layout checked), on the CPU in eval mode."""
    state = load_checkpoint(checkpoint)
    model = build_model("sam_vit_b")
    verify_layout(state, "sam_vit_b", source=checkpoint, network=model)
    model.load_state_dict(state)
    return model.eval()


def _load_torch(checkpoint: Path, device: torch.device, dtype: torch.dtype) -> TorchSam:
    return TorchSam(load_model(checkpoint), device, dtype=dtype, fused_attention=True)


def _import_optional_backends() -> None:
    """Import the backend modules that exist, so they register themselves."""
    for module in _OPTIONAL_BACKEND_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise


register_backend("torch", _load_torch, available=lambda device: True, priority=0)
