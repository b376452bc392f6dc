"""The streaming tracking loop: frames in, XMem at working resolution, label maps out.

Nothing here holds a whole video: frames are decoded in a background thread,
each is resized and normalised on the compute device, stepped through XMem,
and turned into a full-resolution label map that the caller renders and
writes before the next frame arrives. Frames before the first prompted one are
tracked backwards from it through a disk cache.
"""
from __future__ import annotations

import collections
import contextlib
import copy
import errno
import os
import queue
import tempfile
import threading
import weakref
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from XMem.inference.graph_cache import GraphCache
from XMem.inference.graphed_network import GraphedXMem
from XMem.inference.inference_core import InferenceCore
from XMem.model.fusion import inference_copy
from XMem.model.network import FINE_MODULES
from XMem.model.winograd import use_winograd

from . import colour
from .errors import Cancelled, TrackerError, VideoError, whole_number
from .options import TrackOptions
from .render import MaskZipReader, MaskZipWriter
from .transfer import Download, pinned, upload
from .video import Frame, VideoInfo, iter_frames

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

ProgressFn = Callable[[int, int], None]


PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# What "auto" means. bf16/fp16 run without overflow, but whether their masks
# match fp32 can only be judged with trained weights (untrained ones give
# near-uniform probabilities whose argmax flips with any rounding), so fp32
# stays the default until that is measured.
FAST_PRECISION = "fp32"
# On the CPU in fp32, 3x3 convolutions with this many input channels or more run as Winograd's (F(4x4, 3x3),
# F(6x6, 3x3) in the network's FINE_MODULES): narrower ones gain too little from a quarter of the
# multiplications to pay for the transforms (64 channels: no faster at 240p, see the README's Speed section).
WINOGRAD_MIN_CHANNELS = 128


def resolve_precision(device: torch.device, precision: str) -> torch.dtype | None:
    """XMem's autocast type for `precision` on `device` (None: fp32).

    CUDA takes bf16 and fp16; a CPU takes bf16 (fast where it has bf16
    instructions: AVX-512 BF16 or AMX), which PyTorch's CPU convolutions run.
    """
    if precision == "auto":
        precision = FAST_PRECISION
    if precision not in PRECISIONS:
        raise TrackerError(f"unknown precision {precision!r}; use auto, fp32, bf16 or fp16")
    dtype = PRECISIONS[precision]
    if device.type != "cuda" and dtype == torch.float16:
        raise TrackerError("fp16 runs on CUDA GPUs only; on the CPU use bf16 or fp32")
    return dtype


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX-512 BF16 or AMX), so that bf16 pays there."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a PyTorch build without oneDNN
        return False


def autocast_for(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Mixed precision for the network (the memory's similarity and softmax stay fp32 inside it)."""
    dtype = resolve_precision(device, precision)
    if dtype is None:
        return contextlib.nullcontext()
    # No cast cache: CUDA graphs captured inside must not point at cached weight copies freed on exit.
    return torch.autocast(device.type, dtype=dtype, cache_enabled=False)


@contextlib.contextmanager
def stepping_network(network: torch.nn.Module, device: torch.device, options: TrackOptions,
                     work_size: tuple[int, int]) -> Iterator[torch.nn.Module]:
    """The network XMem's inference core calls, for one video at working size `work_size` (h, w).

    Its inference copy (batch norms folded, residual blocks fused,
    channels-last, weights stored in the autocast type) on CUDA, replaying
    CUDA graphs; on the CPU in bf16 (oneDNN's bf16 convolutions want
    channels-last: 96 against 136 ms a step at 240p with AMX), and in fp32
    with its wide 3x3 convolutions as Winograd's (see `WINOGRAD_MIN_CHANNELS`).
    With `cuda_graphs` off, fp32 runs the network as it is (the plain path).

    A graphed network that saw its video to the end waits for the next video
    of the same working size (see `IdleGraphs`); one that stopped on an error
    or a cancel is dropped.
    """
    dtype = resolve_precision(device, options.precision)
    if device.type == "cuda" and options.cuda_graphs:
        graphed = IDLE_GRAPHS.take(network, dtype, work_size) or GraphedXMem(_inference_copy(network, dtype))
        yield graphed
        IDLE_GRAPHS.keep(network, dtype, work_size, graphed)
    elif device.type != "cuda" and (dtype is not None or options.cuda_graphs):
        yield _inference_copy(network, dtype)
    else:
        yield network


_INFERENCE_COPIES: "weakref.WeakKeyDictionary[torch.nn.Module, dict]" = weakref.WeakKeyDictionary()
_INFERENCE_COPIES_LOCK = threading.Lock()


def _inference_copy(network: torch.nn.Module, autocast_dtype: torch.dtype | None) -> torch.nn.Module:
    """The network's fast inference copy for one autocast type, made once and shared by every video and session."""
    with _INFERENCE_COPIES_LOCK:
        copies = _INFERENCE_COPIES.setdefault(network, {})
        if autocast_dtype not in copies:
            fast = inference_copy(network, autocast_dtype)
            if autocast_dtype is None and next(network.parameters()).device.type == "cpu":
                use_winograd(fast, WINOGRAD_MIN_CHANNELS, FINE_MODULES)
            copies[autocast_dtype] = fast
        return copies[autocast_dtype]


class IdleGraphs:
    """Graphed networks between videos: the latest finished one of each network and precision, with its graphs.

    A video captures about twenty CUDA graphs (the network's stages, then
    its memory reads as memory grows): some 0.2 s at 480p on an H200, paid
    again by every video without this (a re-run after a correction, the next
    upload). One graphed network is kept per network and autocast type, for
    the working size it last ran at, holding its graphs' GPU memory until it
    is taken or `clear`ed.
    """

    def __init__(self):
        self._lock = threading.Lock()
        # network -> autocast type -> (working size, graphed network); the graphed one holds the network's
        # inference copy, not the network, so a dropped network takes its entries with it.
        self._idle: "weakref.WeakKeyDictionary[torch.nn.Module, dict]" = weakref.WeakKeyDictionary()

    def take(self, network: torch.nn.Module, dtype: torch.dtype | None,
             work_size: tuple[int, int]) -> GraphedXMem | None:
        """The idle graphed network for `network` in `dtype` if it last ran at `work_size`; it stops being idle."""
        with self._lock:
            size, graphed = self._idle.get(network, {}).pop(dtype, (None, None))
        return graphed if size == work_size else None

    def keep(self, network: torch.nn.Module, dtype: torch.dtype | None, work_size: tuple[int, int],
             graphed: GraphedXMem) -> None:
        with self._lock:
            self._idle.setdefault(network, {})[dtype] = (work_size, graphed)

    def clear(self) -> None:
        """Drop every idle graphed network (their graphs' memory goes back to PyTorch's cache)."""
        with self._lock:
            self._idle.clear()

    def __len__(self) -> int:
        with self._lock:
            return sum(len(kept) for kept in self._idle.values())


IDLE_GRAPHS = IdleGraphs()


def working_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(w, h) with the shorter side scaled down to `size`; never upscaled."""
    short = min(width, height)
    if size == 0 or short <= size:
        return width, height
    scale = size / short
    return max(1, round(width * scale)), max(1, round(height * scale))


def frame_graphs(device: torch.device, options: TrackOptions) -> GraphCache:
    """CUDA graphs for one video's per-frame work around XMem (conversions, resizing, labels, drawing).

    Each of those is dozens of small kernels launched from the tracking loop's
    thread, which bounds the pipeline; their shapes are fixed for a video.
    """
    return GraphCache(enabled=options.cuda_graphs and device.type == "cuda")


class FramePrep:
    """Uploads a frame and makes XMem's input from it on the compute device.

    The frame is resized to the working size as 8-bit pixels (as the reference
    does through PIL) so that a cached resized frame gives exactly the same
    network input as a freshly decoded one.
    """

    def __init__(self, device: torch.device, work_size: tuple[int, int], dtype: torch.dtype = torch.float32,
                 graphs: GraphCache | None = None):
        self.device = device
        self.work_w, self.work_h = work_size
        self.mean = torch.tensor(IMAGENET_MEAN, device=device, dtype=dtype).view(3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD, device=device, dtype=dtype).view(3, 1, 1)
        self.dtype = dtype
        self.graphs = GraphCache(enabled=False) if graphs is None else graphs

    @property
    def planes(self) -> bool:
        """Ask the decoder for YUV planes: they are converted to RGB here, on the device."""
        return colour.colour_on_device(self.device)

    def stage(self, frame: Frame) -> Frame:
        """The frame with its pixels copied into pinned memory for the GPU (on CUDA; other devices: as it is).

        Run where frames are decoded (see `prefetch`), so that the tracking
        loop, which bounds the pipeline, only queues the copy to the GPU.
        """
        if self.device.type != "cuda":
            return frame
        if frame.yuv is None:
            return replace(frame, image=pinned(frame.image))
        return replace(frame, yuv=replace(frame.yuv, planes=pinned(frame.yuv.planes)))

    def upload(self, frame: Frame) -> torch.Tensor:
        """The frame as HxWx3 uint8 RGB on the device."""
        to_rgb, _, pixels = self._source(frame)
        return to_rgb(pixels)

    def _source(self, frame: Frame) -> tuple[Callable[[torch.Tensor], torch.Tensor], tuple, torch.Tensor]:
        """(how the uploaded pixels become RGB, what that depends on besides them: the picture's every other
        field, the pixels on the device)."""
        if frame.yuv is None:
            return (lambda image: image), (), upload(frame.image, self.device)
        picture = frame.yuv
        return ((lambda planes: colour.yuv420_to_rgb(replace(picture, planes=planes))),
                (replace(picture, planes=None),), upload(picture.planes, self.device))

    def resize(self, image: torch.Tensor) -> torch.Tensor:
        """HxWx3 uint8 -> hxwx3 uint8 at the working size."""
        if image.shape[:2] == (self.work_h, self.work_w):
            return image
        chw = image.permute(2, 0, 1).unsqueeze(0).float()
        small = F.interpolate(chw, size=(self.work_h, self.work_w), mode="bilinear",
                              align_corners=False, antialias=True)
        return small.round_().clamp_(0, 255).to(torch.uint8)[0].permute(1, 2, 0)

    def normalise(self, small: torch.Tensor) -> torch.Tensor:
        """hxwx3 uint8 -> 3xhxw ImageNet-normalised float."""
        return (small.permute(2, 0, 1).to(self.dtype) / 255 - self.mean) / self.std

    def prepare(self, frame: Frame) -> tuple[torch.Tensor, torch.Tensor]:
        """(the frame as HxWx3 uint8 RGB, XMem's input from it), both on the device; one graph replay on CUDA."""
        to_rgb, meta, pixels = self._source(frame)

        def image_and_input(data: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            image = to_rgb(data)
            return image, self.normalise(self.resize(image))

        return self.graphs.run("prepare", meta, image_and_input, [pixels])


class Propagator:
    """Steps XMem through frames in one direction, feeding prompt masks where they exist.

    Objects get XMem channels 1..K in the order they first appear in this pass;
    an object joins at its first keyframe (the reference's ``valid_labels``), and
    a later keyframe for a known object replaces its mask there (a correction).
    """

    def __init__(self, network: torch.nn.Module, config: dict, keyframes: Mapping[int, Mapping[int, torch.Tensor]],
                 order: list[int]):
        self.core = InferenceCore(network, copy.deepcopy(config))
        self.keyframes = keyframes
        self.channel: dict[int, int] = {}
        for index in order:
            for object_id in keyframes.get(index, {}):
                self.channel.setdefault(object_id, len(self.channel) + 1)
        self.object_ids = [0] + list(self.channel)  # channel -> object id
        self.seen: list[int] = []

    def step(self, index: int, image: torch.Tensor, end: bool) -> torch.Tensor:
        """(K+1)xhxw probabilities for this frame (K = objects seen so far in this pass)."""
        prompts = self.keyframes.get(index)
        if not prompts:
            if not self.seen:
                raise RuntimeError("propagation must start on a prompted frame")
            return self.core.step(image, end=end)
        for object_id in prompts:
            if object_id not in self.seen:
                self.seen.append(object_id)
        labels = [self.channel[o] for o in self.seen]
        self.core.set_all_labels(labels)
        mask = image.new_zeros((len(labels),) + tuple(image.shape[-2:]))
        for object_id, object_mask in prompts.items():
            mask[self.channel[object_id] - 1] = object_mask.to(mask)
        valid = sorted(self.channel[o] for o in prompts)
        return self.core.step(image, mask, valid, end=end)

    def lookup(self, device: torch.device) -> torch.Tensor:
        """Channel index -> object id, as a uint8 lookup table."""
        return torch.tensor(self.object_ids, dtype=torch.uint8, device=device)


def labels_at(prob: torch.Tensor, size: tuple[int, int], lookup: torch.Tensor) -> torch.Tensor:
    """Probabilities at working size -> HxW uint8 object ids at `size` (h, w)."""
    if tuple(prob.shape[-2:]) != size:
        prob = F.interpolate(prob.unsqueeze(0).float(), size=size, mode="bilinear", align_corners=False)[0]
    # PyTorch's CPU argmax across the first dimension is a slow strided reduction (20 ms a frame at 240p, 0.4 s at
    # 1080p, on 2 cores); max's indices are the same (the first of equal values) in well under a millisecond.
    return lookup[prob.max(0).indices if prob.device.type == "cpu" else prob.argmax(0)]


def stamp(labels: torch.Tensor, masks: Mapping[int, torch.Tensor]) -> torch.Tensor:
    """Put full-resolution prompt masks over tracked labels on a keyframe."""
    for object_id, mask in masks.items():
        mask = mask.to(labels.device)
        labels = torch.where(labels == object_id, torch.zeros_like(labels), labels)
        labels = torch.where(mask, torch.full_like(labels, object_id), labels)
    return labels


@dataclass
class TrackedFrame:
    """One output frame: the decoded picture and its object-id map, on the compute device."""

    index: int
    pts: int | None
    time: float
    image: torch.Tensor = field(repr=False)  # HxWx3 uint8
    labels: torch.Tensor = field(repr=False)  # HxW uint8, 0 = background
    objects: frozenset[int] = field(default=frozenset(), repr=False)  # the run's object ids (empty: not known)

    def mask(self, object_id: int) -> np.ndarray:
        """Boolean HxW mask of one object (ids 1..255; 0 is the background) of those the run tracks."""
        object_id = whole_number(object_id, "an object id")
        if not 0 <= object_id <= 255:
            raise TrackerError(f"object ids are 1 to 255 (0 is the background), not {object_id}")
        if self.objects and object_id not in self.objects and object_id != 0:  # a wrong id is no empty mask
            raise TrackerError(f"object {object_id} is not tracked in this run "
                               f"(its objects: {', '.join(map(str, sorted(self.objects)))})")
        return (self.labels == object_id).cpu().numpy()


def prefetch(items: Iterable, depth: int, stop: threading.Event, stage: Callable | None = None) -> Iterator:
    """Run an iterator in a background thread, `depth` items ahead (decode overlaps compute).

    `stage(item)`, if given, runs in that thread too, and its result is what comes out.
    """
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()

    def offer(item: object) -> bool:
        """Queue `item` unless the consumer has left meanwhile (then nothing would ever take it)."""
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def worker() -> None:
        try:
            for item in items:
                if not offer(item if stage is None else stage(item)):
                    return
            offer(done)
        except BaseException as exc:  # handed to the consumer, which re-raises
            offer(exc)

    thread = threading.Thread(target=worker, name="decode", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join(timeout=5)


def shrink_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A full-resolution bool mask at the working size (h, w), as 0/1 floats."""
    if tuple(mask.shape) == size:
        return mask.float()
    small = F.interpolate(mask[None, None].float(), size=size, mode="bilinear", align_corners=False, antialias=True)
    return (small[0, 0] >= 0.5).float()


def track_frames(
    network: torch.nn.Module,
    info: VideoInfo,
    keyframes: Mapping[int, Mapping[int, np.ndarray]],
    options: TrackOptions,
    device: torch.device,
    *,
    cancel: threading.Event | None = None,
    progress: ProgressFn | None = None,
    earlier: Callable[[int], np.ndarray] | None = None,
    anchors: Mapping[int, Mapping[int, np.ndarray]] | None = None,
    graphs: GraphCache | None = None,
    between_frames: Callable[[], None] | None = None,
) -> Iterator[TrackedFrame]:
    """Yield every frame of the video, in order, with its tracked label map.

    `keyframes` maps frame index -> object id -> full-resolution bool mask (from
    SAM). Tracking starts at the earliest keyframe, runs backwards to frame 0
    (through a disk cache, never all frames in RAM) and then forwards to the end.
    With `earlier` (frame index -> label map of a previous run), frames before
    the first keyframe keep those labels instead of being tracked backwards;
    `anchors` (frames before it -> their masks, as `keyframes`: the user's own
    on those frames) may then go into XMem's memory first, in order, so that the
    tracking from the first keyframe remembers what was prompted before it,
    the first of them for good, as an uninterrupted run remembers its first.
    `graphs` (see `frame_graphs`) may be shared with whatever draws the frames.
    `between_frames` runs after each frame (it may wait: see `Tracker.click_work`).
    """
    cancel = cancel or threading.Event()
    full_size = (info.height, info.width)
    graphs = frame_graphs(device, options) if graphs is None else graphs
    prep = FramePrep(device, working_size(info.width, info.height, options.size), graphs=graphs)
    work_size = (prep.work_h, prep.work_w)
    config = options.memory.xmem_config(network)

    def on_device(masks: Mapping[int, Mapping[int, np.ndarray]]) -> dict[int, dict[int, torch.Tensor]]:
        return {f: {o: torch.from_numpy(np.asarray(m, dtype=bool)).to(device) for o, m in objs.items()}
                for f, objs in sorted(masks.items())}

    def at_work_size(masks: Mapping[int, Mapping[int, torch.Tensor]]) -> dict[int, dict[int, torch.Tensor]]:
        return {f: {o: shrink_mask(m, work_size) for o, m in objs.items()} for f, objs in masks.items()}

    full_masks = on_device(keyframes)
    work_masks = at_work_size(full_masks)
    start = min(keyframes)
    if anchors and (earlier is None or max(anchors) >= start):
        raise ValueError(f"anchors come with `earlier`, before the first keyframe ({start}); got {sorted(anchors)}")
    anchor_masks = at_work_size(on_device(anchors or {}))
    total = (0 if earlier else start) + info.frame_count
    done = 0

    def tick() -> None:
        nonlocal done
        if cancel.is_set():
            raise Cancelled("tracking was cancelled")
        done += 1
        if progress is not None:
            progress(done, total)
        if between_frames is not None:
            between_frames()
            if cancel.is_set():  # while it waited
                raise Cancelled("tracking was cancelled")

    with tempfile.TemporaryDirectory(prefix="tracker-") as tmp, contextlib.ExitStack() as opened, \
            torch.inference_mode(), autocast_for(device, options.precision), \
            stepping_network(network, device, options, work_size) as network:
        if earlier is None and start > 0:
            backward = _track_backward(network, config, info, prep, start, work_masks[start], Path(tmp), tick, cancel)
            earlier = opened.enter_context(backward).__getitem__
        forward = Propagator(network, config, {**anchor_masks, **work_masks}, order=[*anchor_masks, *work_masks])
        _remember(forward, prep, info, list(anchor_masks), cancel)
        lookup = forward.lookup(device)
        objects = frozenset(forward.object_ids[1:])
        last = info.frame_count - 1
        pace = LaunchPacer(device)
        prompted = sorted(work_masks)
        decoded = iter_frames(info.path, yuv=prep.planes, size=info.size)
        for frame in prefetch(decoded, depth=4, stop=threading.Event(), stage=prep.stage):
            while prompted and prompted[0] <= frame.index:
                if prompted[0] < frame.index:
                    raise TrackerError(lost_prompt_frame(prompted[0]))
                prompted.pop(0)
            pace()
            if frame.index < start:
                image = prep.upload(frame)
                labels = torch.from_numpy(np.asarray(earlier(frame.index))).to(device)
            else:
                image, net_input = prep.prepare(frame)
                prob = forward.step(frame.index, net_input, end=frame.index >= last)
                labels = graphs.run("labels", full_size, lambda p, table: labels_at(p, full_size, table),
                                    [prob, lookup])
                if frame.index in full_masks:
                    labels = stamp(labels, full_masks[frame.index])
            tick()
            yield TrackedFrame(frame.index, frame.pts, frame.time, image, labels, objects)


def _remember(propagator: Propagator, prep: FramePrep, info: VideoInfo, frames: Sequence[int],
              cancel: threading.Event) -> None:
    """Step `propagator` through `frames` (its keyframes, in order) for their memory alone."""
    for index in frames:
        if cancel.is_set():
            raise Cancelled("tracking was cancelled")
        frame = next(iter_frames(info.path, index, index + 1, yuv=prep.planes, size=info.size), None)
        if frame is None:
            raise TrackerError(lost_prompt_frame(index))
        _, net_input = prep.prepare(prep.stage(frame))
        propagator.step(index, net_input, end=False)


class LaunchPacer:
    """Keeps the loop at most `lead` frames ahead of the GPU, waiting without the GIL.

    Unchecked, the loop queues kernels until CUDA's launch queue is full and then
    blocks inside a launch while holding the GIL, which starves the decode and
    encode threads. Call once per frame, before queueing its work.
    """

    def __init__(self, device: torch.device, lead: int = 2):
        self.enabled = device.type == "cuda"
        self.lead = lead
        self.events: collections.deque = collections.deque()

    def __call__(self) -> None:
        if not self.enabled:
            return
        event = torch.cuda.Event(blocking=True)  # waited for asleep, not spinning on a core the codecs need
        event.record()
        self.events.append(event)
        if len(self.events) > self.lead:
            self.events.popleft().synchronize()


def lost_prompt_frame(index: int) -> str:
    """Why a prompt on a frame that the video's decoding loses cannot be used, and what to do."""
    return (f"frame {index}, where a prompt is, does not decode in sequence (the video is damaged there); "
            "put the prompt on another frame")


def _disk_array(path: Path, shape: tuple[int, ...]) -> np.ndarray:
    """A uint8 array in a file, its disk space reserved at once: a write to a memory map on a full disk is a
    SIGBUS that kills the process without a word, a reservation that fails is an error to report."""
    try:
        array = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=shape)
        if hasattr(os, "posix_fallocate"):  # Linux; elsewhere the map stays sparse
            with open(path, "r+b") as file:
                try:
                    os.posix_fallocate(file.fileno(), 0, os.fstat(file.fileno()).st_size)
                except OSError as exc:
                    if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # a file system that cannot reserve
                        raise
    except OSError as exc:
        raise VideoError(f"the frames before the first prompt ({np.prod(shape) / 2**20:.1f} MiB) could not be "
                         f"cached in the temporary folder {path.parent.parent}: {exc.strerror or exc}; free some "
                         "disk space there, or point TMPDIR at a folder with room") from exc
    return array


def _track_backward(network: torch.nn.Module, config: dict, info: VideoInfo, prep: FramePrep, start: int,
                    masks: Mapping[int, torch.Tensor], tmp: Path, tick: Callable[[], None],
                    cancel: threading.Event) -> MaskZipReader:
    """Label maps of frames 0..start-1, tracked from `start` towards frame 0, in a masks zip in `tmp`.

    The frames wait at working resolution in a disk cache (read forwards, tracked backwards); the label maps
    go into the zip as PNGs, a few KB each where full-resolution arrays would take the disk's gigabytes.
    """
    frames = _disk_array(tmp / "frames.npy", (start + 1, prep.work_h, prep.work_w, 3))
    present: list[int] = []  # frames lost to damage leave gaps, as in the forward pass
    decoded = iter_frames(info.path, 0, start + 1, yuv=prep.planes, size=info.size)
    for frame in prefetch(decoded, depth=4, stop=threading.Event(), stage=prep.stage):
        if cancel.is_set():
            raise Cancelled("tracking was cancelled")
        frames[frame.index] = prep.resize(prep.upload(frame)).cpu().numpy()
        present.append(frame.index)
    if not present or present[-1] != start:
        raise TrackerError(lost_prompt_frame(start))
    writer = MaskZipWriter(tmp / "backward.zip")
    sink = ThreadedSink("backward-masks", writer.write, writer.close, writer.abort)
    try:
        propagator = Propagator(network, config, {start: masks}, order=[start])
        lookup = propagator.lookup(prep.device)
        for index in reversed(present):
            image = prep.normalise(torch.from_numpy(np.array(frames[index])).to(prep.device))
            prob = propagator.step(index, image, end=index == present[0])
            if index < start:
                sink.put(index, Download(labels_at(prob, (info.height, info.width), lookup)))
                tick()
        sink.close()
    except BaseException:
        sink.abort()
        raise
    return MaskZipReader(writer.path)


# Host memory a writer's queue may fill. libx264's frame threads take frames
# unevenly, and with 8 frames queued the tracking loop waited on a full queue
# for a fifth of a 720p run.
WRITER_QUEUE_BYTES = 128 * 2**20


def writer_queue_depth(item_bytes: int) -> int:
    """How many items of `item_bytes` a writer's queue holds: as many as fit `WRITER_QUEUE_BYTES`, 8 to 64."""
    return max(8, min(64, WRITER_QUEUE_BYTES // max(item_bytes, 1)))


class ThreadedSink:
    """Feeds a writer from its own thread so encoding overlaps tracking.

    `consume(item)` runs in the thread, with any `Download` in the item
    replaced by its result; an exception there is re-raised by the next `put`
    or by `close`. `finish` runs in the thread after the last item, `discard`
    cleans up after a failure. With `item_bytes` (the host memory an item
    holds) the queue is as deep as `writer_queue_depth` allows, else 8 deep.
    """

    def __init__(self, name: str, consume: Callable, finish: Callable[..., None], discard: Callable[[], None],
                 item_bytes: int | None = None):
        self._queue: queue.Queue = queue.Queue(maxsize=8 if item_bytes is None else writer_queue_depth(item_bytes))
        self._consume, self._finish, self._discard = consume, finish, discard
        self._finish_args: tuple = ()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    _END = object()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is self._END:
                break
            if self._error is None:
                try:
                    self._consume(*(part.result() if isinstance(part, Download) else part for part in item))
                except BaseException as exc:  # handed to the producer
                    self._error = exc
        if self._error is None:
            try:
                self._finish(*self._finish_args)
            except BaseException as exc:
                self._error = exc

    def put(self, *item) -> None:
        if self._error is not None:
            raise self._error
        self._queue.put(item)

    def close(self, *finish_args) -> None:
        """Wait for every item to be written and the file finished (`finish(*finish_args)`); re-raise a writer
        error."""
        self._finish_args = finish_args
        self._queue.put(self._END)
        self._thread.join()
        if self._error is not None:
            self._discard()
            raise self._error

    def abort(self) -> None:
        """Stop without finishing; the partial output is removed."""
        self._error = self._error or Cancelled("aborted")
        self._queue.put(self._END)
        self._thread.join()
        self._discard()
