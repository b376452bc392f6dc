"""The tracking session: models loaded once, prompts turned into masks, videos tracked to files.

`Tracker` is the one entry point the CLI, the web app and scripts share:

    tracker = Tracker(device="auto")
    result = tracker.track("clip.mp4", [ObjectPrompt(1, points=[(320, 180)], labels=[1])],
                           output="output/clip_tracked.mp4", masks="output/clip_masks.zip")
"""
from __future__ import annotations

import errno
import itertools
import logging
import tempfile
import threading
import time
import traceback
import warnings
import weakref
from collections import deque
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator, Mapping, Protocol, Sequence

import numpy as np
import torch

from XMem.inference.inference_core import DEFAULT_CONFIG
from XMem.model.network import XMem, dims_from_state_dict

from . import weights
from .errors import Cancelled, TrackerError, VideoError
from .options import CutoutKind, TrackOptions
from .pipeline import (IDLE_GRAPHS, ProgressFn, ThreadedSink, TrackedFrame, frame_graphs, resolve_precision,
                       stepping_network, track_frames, working_size)
from .prompts import ObjectPrompt, check_prompts, needs_sam
from .render import MaskZipReader, MaskZipWriter, copy_masks_until, encoder_picture, encoder_picture_bytes
from .sam import (EmbeddingStopped, ImageEmbedding, SamBackend, load_sam, mask_to_logits, ready_backends,
                  resolve_device, segment)
from .transfer import Download
from .video import (H264_CONTAINERS, MASKS_ENDING, TRACKED_ENDING, VideoInfo, VideoWriter, check_writable_folder,
                    coded_fields, colour_note, make_clip, output_file, probe, read_frame, truncation_note,
                    written_notes)

log = logging.getLogger(__name__)

LOSSLESS_WARNING = ("crf 0 makes lossless H.264 (High 4:4:4 Predictive profile), which browsers and many players "
                    "cannot play; crf 1 or more plays everywhere")
# Below this working resolution (shorter side) XMem's stride-16 features are a handful of cells across.
SMALL_WORKING_SIZE = 96


def option_warnings(options: TrackOptions, info: VideoInfo, writes_video: bool) -> list[str]:
    """What the chosen options will cost the result (known before tracking: the CLI says it at the start too)."""
    warnings = [LOSSLESS_WARNING] if writes_video and options.crf == 0 else []
    if 0 < options.size < min(SMALL_WORKING_SIZE, info.width, info.height):
        warnings.append(f"the working resolution {options.size} px (shorter side) is very small: the masks are "
                        f"coarse; {TrackOptions().size} suits most videos")
    return warnings


WaitFn = Callable[[int], None]  # told the number of jobs ahead while a job waits for the device


class DeviceTurns:
    """The device, one job at a time, in the order the jobs asked for it.

    A plain lock wakes any of its waiters, so with several users a job that came later could go first, again
    and again. Here each job takes a place in line and is told how many are ahead of it while it waits.
    Used as a context manager it is a job that waits as long as it takes (tests and scripts).
    """

    def __init__(self):
        self._changed = threading.Condition()
        self._line: deque[int] = deque()  # tickets in the order asked; the first holds the device
        self._tickets = itertools.count()
        self.holder: int | None = None  # the thread whose job holds the device

    def locked(self) -> bool:
        return bool(self._line)

    def acquire(self, cancel: threading.Event | None = None, waiting: WaitFn | None = None) -> None:
        """Wait for this job's turn; a cancel ends the wait at once (`Cancelled`), leaving the line.

        `waiting` is told the number of jobs ahead each time it changes, and 0 when a wait ends in the turn.
        """
        with self._changed:
            ticket = next(self._tickets)
            self._line.append(ticket)
        told = None  # the place in line last told
        try:
            while True:
                with self._changed:
                    ahead = self._line.index(ticket)
                    if ahead and ahead == told:
                        self._changed.wait(0.05)
                        if cancel is not None and cancel.is_set():
                            raise Cancelled("tracking was cancelled")
                        continue
                if waiting is not None and (ahead or told is not None):  # outside the line's lock: it may take time
                    waiting(ahead)
                if not ahead:
                    break
                told = ahead
        except BaseException:
            with self._changed:
                self._line.remove(ticket)
                self._changed.notify_all()
            raise
        self.holder = threading.get_ident()

    def release(self) -> None:
        with self._changed:
            self.holder = None
            self._line.popleft()
            self._changed.notify_all()

    def __enter__(self) -> DeviceTurns:
        self.acquire()
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()


def load_xmem(checkpoint: Path, device: torch.device) -> XMem:
    """XMem with the checkpoint's weights, strictly checked against the official layout."""
    state = weights.load_checkpoint(checkpoint)
    weights.verify_layout(state, "xmem", source=checkpoint)
    network = XMem(dict(DEFAULT_CONFIG, **dims_from_state_dict(state)))
    network.load_weights(state)
    return network.to(device).eval()


def smaller_size(size: int) -> int:
    """A working size to suggest after running out of memory at `size` (0 = original resolution)."""
    return 360 if size == 0 else max(120, size * 3 // 4 // 8 * 8)


@contextmanager
def user_facing_resource_errors(options: TrackOptions) -> Iterator[None]:
    """Out of GPU memory and failed file writes become errors that say what to do.

    The frames of an out-of-memory traceback are cleared first: their locals
    hold the job's tensors, which `empty_cache` could not release otherwise.
    """
    try:
        yield
    except torch.OutOfMemoryError as exc:
        traceback.clear_frames(exc.__traceback__)
        IDLE_GRAPHS.clear()  # graphs kept for the next video hold memory too
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        raise TrackerError(f"the GPU ran out of memory at working size {options.size or 'original'}; try a "
                           f"smaller working size, {smaller_size(options.size)} (the CLI's --size, the app's "
                           "Processing resolution) or close other GPU jobs") from None
    except OSError as exc:
        folder = Path(exc.filename).parent if exc.errno == errno.ENOENT and exc.filename is not None else None
        if folder is not None and not folder.exists():  # the page's session closed, say
            raise VideoError(f"writing the output failed: the folder {folder} was removed while the job wrote "
                             "there") from exc
        advice = "free some disk space" if exc.errno == errno.ENOSPC else "choose a folder you can write to"
        raise VideoError(f"writing the output failed: {exc.strerror or exc}; {advice} and try again") from exc


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.samefile(b)
    except OSError:  # one of them does not exist yet
        return a.resolve() == b.resolve()


def _check_output_name(path: Path, what: str, suffixes: Sequence[str]) -> None:
    endings = ", ".join(suffixes[:-1]) + " or " + suffixes[-1] if len(suffixes) > 1 else suffixes[0]
    if path.is_dir():
        raise TrackerError(f"the {what} {path} is a folder; give a file name ending in {endings}")
    if path.exists() and not path.is_file():  # a device such as /dev/null or a pipe: the finished file replaces it
        raise TrackerError(f"the {what} {path} is not a regular file (a device or a pipe); "
                           f"give a file name ending in {endings}")
    if not path.suffix and path.name.lower() in suffixes:  # ".mp4" is a hidden file's whole name, no ending
        raise TrackerError(f"the {what} {path.name} has no name before its ending: name it, as in clip{path.name}")
    if not path.suffix:
        raise TrackerError(f"the {what} {path.name} has no ending: end its name in {endings} (or, for a new "
                           f"folder to hold it, end the name in a slash: {path.name}/)")
    if path.suffix.lower() not in suffixes:
        raise TrackerError(f"the {what} {path.name} would be misnamed: end its name in {endings}")


def check_output_paths(video: str | Path, output: str | Path | None, masks: str | Path | None) -> None:
    """Refuse outputs that are folders, misnamed (a .avi name on an MP4), or would overwrite the input
    video or each other, or lie under a file or a folder that cannot be written, before anything is written."""
    if output is None and masks is None:
        raise TrackerError("nothing to write: give an output video path and/or a masks zip path")
    if output is not None and _same_file(Path(output), Path(video)):
        raise TrackerError(f"the output video {output} is the input video; choose another path "
                           "(the input is never overwritten)")
    if masks is not None and _same_file(Path(masks), Path(video)):
        raise TrackerError(f"the masks zip {masks} is the input video; choose another path")
    if output is not None and masks is not None and _same_file(Path(output), Path(masks)):
        raise TrackerError(f"the output video and the masks zip are both {output}; give them different paths")
    if output is not None:
        _check_output_name(Path(output), "output video", list(H264_CONTAINERS))
        check_writable_folder(Path(output))
    if masks is not None:
        _check_output_name(Path(masks), "masks zip", (".zip",))
        check_writable_folder(Path(masks))


def check_file_output(output: Path, what: str, endings: Sequence[str], sources: Mapping[str, str | Path]) -> None:
    """Refuse an output that is one of its `sources` (name -> path), a folder, misnamed or unwritable, before any
    work."""
    for name, source in sources.items():
        if _same_file(output, Path(source)):
            raise TrackerError(f"the {what} {output} is the {name}; choose another path")
    _check_output_name(output, what, endings)
    check_writable_folder(output)


def check_cutout_path(video: str | Path, masks: str | Path, output: Path, kind: CutoutKind) -> None:
    """`check_file_output` for a cut-out of `video` from `masks`, in the container of its kind."""
    check_file_output(output, "cut-out", kind.endings, {"input video": video, "masks zip": masks})


def check_job(video: str | Path, prompts: Sequence[ObjectPrompt], output: str | Path | None,
              masks: str | Path | None, options: TrackOptions | None = None
              ) -> tuple[VideoInfo, Path | None, Path | None]:
    """The video's facts and the output files (a folder given: `<video name>_tracked.mp4` and
    `<video name>_masks.zip` in it), once the paths, options, video and prompts are found fit for a run."""
    output, masks = output_file(output, video, TRACKED_ENDING), output_file(masks, video, MASKS_ENDING)
    check_output_paths(video, output, masks)
    return check_input(video, prompts, options), output, masks


def check_input(video: str | Path, prompts: Sequence[ObjectPrompt], options: TrackOptions | None) -> VideoInfo:
    """The video's facts, once the options, the video and the prompts are found fit for a run."""
    if options is not None and not isinstance(options, TrackOptions):
        raise TrackerError(f"options must be a TrackOptions (from tracker import TrackOptions), "
                           f"not a {type(options).__name__}")
    info = probe(video)
    check_prompts(prompts, info.width, info.height, info.frame_count, info.present_frames)
    return info


@dataclass(frozen=True)
class PreviousRun:
    """A finished run to build on: frames before `from_frame` keep its masks, tracking restarts there.

    With `backward`, frames before `from_frame` are tracked again too, backward from it: for a frame at or
    before the first prompt, whose earlier frames that run tracked backward through it. They are kept after
    all when an object absent on `from_frame` shows on one of them (tracking back from there would lose it).
    Otherwise XMem first remembers the kept masks of the prompts' frames before `from_frame` and of
    `corrected`, the frames before it whose masks in `masks` are corrections: the user's masks, as a run
    from the start remembers them (the earliest for good).
    """

    masks: Path  # its masks zip
    from_frame: int
    backward: bool = False
    corrected: tuple[int, ...] = ()


SAM_NOT_USED = "masks given (SAM not used)"  # said of a run whose every prompt is a mask


@dataclass
class TrackResult:
    """What a tracking run produced and how fast."""

    frames: int
    expected_frames: int
    seconds: float
    device: str
    sam_backend: str | None  # None: every prompt was a mask, so SAM did not run
    peak_gpu_bytes: int | None = None
    kept_frames: int = 0  # written with a previous run's masks (see PreviousRun), not tracked again
    output: Path | None = None
    masks: Path | None = None
    warnings: list[str] = field(default_factory=list)
    # A run of several passes (corrections: see `combined`): the frames its passes tracked, a frame again in
    # each pass that re-tracks it.
    passes: int = 1
    tracked_frames: int | None = None
    # A cancel that kept the frames done (`Tracker.track`'s `keep_on_cancel`): the last frame written.
    stopped_at: int | None = None
    working_size: tuple[int, int] | None = None  # (width, height) XMem tracked at

    @property
    def fps(self) -> float:
        return self.frames / self.seconds if self.seconds > 0 else 0.0

    @property
    def lost_frames(self) -> int:
        return 0 if self.stopped_at is not None else max(0, self.expected_frames - self.frames)

    def summary(self) -> str:
        if self.passes > 1:
            tracked = self.tracked_frames
            kept = f"{self.kept_frames} kept as they were, " if self.kept_frames else ""
            rate = fps_text(tracked / self.seconds if self.seconds > 0 else 0.0)
            return ", ".join([f"{self.frames} frames in {self.passes} passes ({kept}{tracked} tracked in "
                              f"{self.seconds:.1f} s, {rate}: the frames from a correction on are tracked again)",
                              *self.details()])
        if self.kept_frames:  # the rate of the frames tracked: the kept ones only cost their writing
            tracked = self.frames - self.kept_frames
            done = (f"{tracked} tracked again at {fps_text(tracked / self.seconds if self.seconds > 0 else 0.0)}, "
                    f"{self.kept_frames} kept as they were")
        else:
            done = fps_text(self.fps)
        rate = f"{self.frames} frame{'s' * (self.frames != 1)} in {self.seconds:.1f} s ({done})"
        return ", ".join([rate, *self.details()])

    def details(self) -> list[str]:
        """The summary's parts after the rate: where and at what resolution it ran, and what the file lost."""
        parts = [f"device {self.device}", f"SAM backend {self.sam_backend}" if self.sam_backend else SAM_NOT_USED]
        if self.stopped_at is not None:
            parts.insert(0, f"cancelled after frame {self.stopped_at}: the frames after it are not tracked")
        if self.working_size is not None:
            parts.append("XMem at {}x{}".format(*self.working_size))
        if self.peak_gpu_bytes is not None:
            parts.append(f"peak GPU memory {self.peak_gpu_bytes / 2**30:.2f} GiB")
        if self.lost_frames:
            parts.append(f"{self.lost_frames} of {self.expected_frames} frames could not be decoded (damaged file)")
        return parts


def combined(results: Sequence[TrackResult]) -> TrackResult:
    """One result for the passes of a run: the last pass's files and warnings; the frames no pass tracked (the
    first pass kept them from a run before), the frames tracked and the time over all the passes."""
    if len(results) == 1:
        return results[0]
    first, last = results[0], results[-1]
    peaks = [r.peak_gpu_bytes for r in results if r.peak_gpu_bytes is not None]
    return replace(last, seconds=sum(r.seconds for r in results), peak_gpu_bytes=max(peaks) if peaks else None,
                   kept_frames=first.kept_frames, passes=len(results),
                   sam_backend=next((r.sam_backend for r in results if r.sam_backend), None),
                   tracked_frames=sum(r.frames - r.kept_frames for r in results))


def fps_text(fps: float) -> str:
    """'12.3 FPS', or '0.04 FPS' for a slow run (never '0.0 FPS')."""
    return f"{fps:.{1 if fps >= 1 else 2}f} FPS"


class UntrainedWeightsWarning(UserWarning):
    """The loaded checkpoints are untrained: masks are meaningless (only the plumbing can be checked)."""


class ClickQueue(Protocol):
    """A web page's clicks as `Tracker.clicks_ahead` counts them (`EditSession` is one)."""

    def clicks_said(self) -> int:
        """The clicks made on the page and not yet segmented."""


class Tracker:
    """SAM and XMem, loaded once and shared; one tracking job runs on the device at a time."""

    def __init__(self, sam_checkpoint: str | Path | None = None, xmem_checkpoint: str | Path | None = None, *,
                 device: str = "auto", sam_backend: str = "auto", sam_precision: str = "auto", download: bool = True):
        self.device = resolve_device(device)
        paths = weights.resolve_checkpoints({"sam": sam_checkpoint, "xmem": xmem_checkpoint}, download=download)
        sam_path, xmem_path = paths["sam"], paths["xmem"]
        self.weights_status = {"sam": weights.checkpoint_status(sam_path, "sam_vit_b"),
                               "xmem": weights.checkpoint_status(xmem_path, "xmem")}
        self.sam: SamBackend = load_sam(sam_path, str(self.device), sam_backend, precision=sam_precision)
        self._sam_path, self._sam_precision = sam_path, sam_precision
        self._sam_backends: dict[str, SamBackend] = {}  # the others, loaded when a session asks for one
        self._sam_loading = threading.Lock()
        self.xmem = load_xmem(xmem_path, self.device)
        self.lock = DeviceTurns()  # the device's: one job at a time, first come first served
        self._held_for_calls = False  # `device_held`: the holder's calls take no turn of their own
        self._clicks = threading.Condition()  # clicks' SAM work under way (see `click_work`)
        self._clicks_running = 0
        self._pages: weakref.WeakSet[ClickQueue] = weakref.WeakSet()  # the web app's edit sessions (see `clicks_ahead`)
        self._pages_lock = threading.Lock()
        if self.untrained:  # scripts see it too, not only the CLI's and the app's users
            warnings.warn(weights.UNTRAINED_WARNING, UntrainedWeightsWarning, stacklevel=2)

    @property
    def untrained(self) -> bool:
        return "untrained" in self.weights_status.values()

    @property
    def device_name(self) -> str:
        if self.device.type == "cuda":
            return f"cuda ({torch.cuda.get_device_name(self.device)})"
        return "cpu"

    def sam_choices(self) -> list[str]:
        """The SAM backends that can run this checkpoint here, the one loaded at start first."""
        ready = ready_backends(self._sam_path, self.device)
        return [self.sam.name] + [name for name in ready if name != self.sam.name]

    def sam_backend(self, name: str) -> SamBackend:
        """A SAM backend by name, loaded on first use and then shared (`self.sam` is the one chosen at start)."""
        if name == self.sam.name:
            return self.sam
        with self._sam_loading:
            if name not in self._sam_backends:
                choices = self.sam_choices()
                if name not in choices:
                    raise TrackerError(f"SAM backend {name!r} cannot run here; choose one of: {', '.join(choices)}")
                self._sam_backends[name] = load_sam(self._sam_path, str(self.device), name,
                                                    precision=self._sam_precision)
            return self._sam_backends[name]

    def segment(self, embedding: ImageEmbedding, prompt: ObjectPrompt, sam: SamBackend | None = None,
                prior: np.ndarray | None = None) -> np.ndarray:
        """The HxW bool mask SAM (`sam`, default `self.sam`) gives for one object's clicks/box on an embedded frame;
        with `prior` (a correction's tracked mask), the clicks correct that mask."""
        points = np.asarray(prompt.points, dtype=np.float32).reshape(-1, 2)
        labels = np.asarray(prompt.labels, dtype=np.int64)
        box = np.asarray(prompt.box, dtype=np.float32) if prompt.box is not None else None
        mask_input = mask_to_logits(prior) if prior is not None and prior.any() else None
        mask, _ = segment(sam or self.sam, embedding, points, labels, box=box, mask_input=mask_input)
        return mask

    def correct(self, labels: np.ndarray, embedding: ImageEmbedding, corrections: Sequence[ObjectPrompt],
                sam: SamBackend | None = None, applied: Mapping[int, np.ndarray] | None = None
                ) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray]]:
        """Apply one frame's corrections on its tracked `labels`, in place; returns each object's corrected mask
        and the mask its correction applied on: the tracked one, or where given `applied`'s (object id -> the
        mask from before a correction that `labels` already holds)."""
        fixed, bases = {}, {}
        for prompt in corrections:
            object_id = prompt.object_id
            base = (applied or {}).get(object_id)
            bases[object_id] = labels == object_id if base is None else base
            fixed[object_id] = self.segment(embedding, prompt, sam=sam, prior=bases[object_id])
            labels[labels == object_id] = 0
            labels[fixed[object_id]] = object_id
        return fixed, bases

    def correct_masks(self, masks: Path, frame: int, embedding: ImageEmbedding, corrections: Sequence[ObjectPrompt],
                      destination: Path, sam: SamBackend, applied: Mapping[int, np.ndarray] | None = None
                      ) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray]]:
        """`correct` on `frame`'s labels in the masks zip `masks`, written to `destination` after the frames before
        it (the zip a pass from `frame` goes on from); the page and `track` share it, so that both correct alike."""
        with MaskZipReader(masks) as reader:
            labels = np.array(reader[frame], dtype=np.uint8)
        fixed, bases = self.correct(labels, embedding, corrections, sam, applied)
        copy_masks_until(masks, frame, labels, destination)
        return fixed, bases

    def prompt_masks(self, info: VideoInfo, prompts: Sequence[ObjectPrompt], sam: SamBackend | None = None, *,
                     embeddings: Mapping[int, ImageEmbedding] | None = None,
                     cancel: threading.Event | None = None) -> dict[int, dict[int, np.ndarray]]:
        """Frame -> object id -> mask: SAM's for clicks and boxes, one embedding per frame clicked; a prompt's
        own mask as it is. Each frame's objects are in the order of their ids, whatever the prompts' order: where
        two masks overlap the higher id wins, as on the page.

        `embeddings` (frame -> `sam`'s embedding of it) are used instead of
        embedding those frames again: on a CPU each embedding takes seconds.
        """
        sam = sam or self.sam
        keyframes: dict[int, dict[int, np.ndarray]] = {}
        for frame_index in sorted({p.frame for p in prompts}):
            on_frame = sorted((p for p in prompts if p.frame == frame_index), key=lambda p: p.object_id)
            keyframes[frame_index] = {p.object_id: p.mask for p in on_frame if p.mask is not None}
            clicked = [p for p in on_frame if p.mask is None]
            if not clicked:
                continue
            embedding = _frame_embedding(sam, info, frame_index, embeddings, cancel)
            keyframes[frame_index].update({p.object_id: self.segment(embedding, p, sam=sam) for p in clicked})
            keyframes[frame_index] = dict(sorted(keyframes[frame_index].items()))
        return keyframes

    def iter_tracked(self, video: str | Path, prompts: Sequence[ObjectPrompt], options: TrackOptions | None = None,
                     *, cancel: threading.Event | None = None,
                     progress: ProgressFn | None = None) -> Iterator[TrackedFrame]:
        """Every frame of the video with its object-id map, in order, streamed.

        A bad video or prompts are reported by this call, before the first frame is asked for. The device is
        this job's until the iteration ends (or the iterator is closed): jobs take turns on it. Corrections
        need the tracking before them, so they are `track`'s only.
        """
        info = check_input(video, prompts, options)
        if corrected := [p for p in prompts if p.correct]:
            raise TrackerError(f"object {corrected[0].object_id}'s prompt on frame {corrected[0].frame} is a "
                               "correction, which applies on the tracked mask: iter_tracked streams one pass, so "
                               "track() (which writes files) takes corrections")
        return self._stream(info, prompts, options or TrackOptions(), cancel, progress)

    def _stream(self, info: VideoInfo, prompts: Sequence[ObjectPrompt], options: TrackOptions,
                cancel: threading.Event | None, progress: ProgressFn | None) -> Iterator[TrackedFrame]:
        with user_facing_resource_errors(options), self._device_turn(cancel):
            keyframes = self.prompt_masks(info, prompts, cancel=cancel)
            yield from track_frames(self.xmem, info, keyframes, options, self.device,
                                    cancel=cancel, progress=progress, between_frames=self._clicks_first(cancel))

    def add_page(self, page: ClickQueue) -> None:
        """Count a page's clicks in `clicks_ahead` while the page lives."""
        with self._pages_lock:
            self._pages.add(page)

    def clicks_ahead(self) -> int:
        """The clicks said on all pages and not yet segmented: the page's SAM queue takes them one at a time
        (seconds each on a CPU), so a new click waits for them."""
        with self._pages_lock:
            pages = list(self._pages)
        return sum(page.clicks_said() for page in pages)

    @contextmanager
    def click_work(self) -> Iterator[None]:
        """Mark a click's SAM work: on a CPU a job pauses between its frames until the click is done.

        The click and the job share the cores (a click beside a job took 32 s where it takes 5 s alone), and
        the person clicking waits on the page, where a job's frames go unseen until it ends.
        """
        with self._clicks:
            self._clicks_running += 1
        try:
            yield
        finally:
            with self._clicks:
                self._clicks_running -= 1
                self._clicks.notify_all()

    def _clicks_first(self, cancel: threading.Event | None) -> Callable[[], None] | None:
        """What a job runs between its frames: on a CPU, wait while clicks' SAM work runs (a cancel ends the
        wait). On a GPU clicks take milliseconds beside a job."""
        if self.device.type != "cpu":
            return None

        def wait() -> None:
            with self._clicks:
                while self._clicks_running and not (cancel is not None and cancel.is_set()):
                    self._clicks.wait(0.05)

        return wait

    @contextmanager
    def _device_turn(self, cancel: threading.Event | None, waiting: WaitFn | None = None) -> Iterator[None]:
        """Hold the device for one job, once the jobs that asked before it (or the warm-up) are done.

        A cancel while waiting ends the wait at once, so Cancel and a closed
        tab stay prompt however long the job ahead takes. A thread whose own
        earlier job still holds the device is told so rather than left waiting.
        """
        if self.lock.holder == threading.get_ident():
            if self._held_for_calls:
                yield
                return
            raise TrackerError("this thread's earlier job still holds the device: an iter_tracked stream that was "
                               "neither finished nor closed; finish it or call its close() first")
        self.lock.acquire(cancel, waiting)
        try:
            yield
        finally:
            self.lock.release()

    @contextmanager
    def device_held(self, cancel: threading.Event | None = None, waiting: WaitFn | None = None) -> Iterator[None]:
        """The device for one job of several `track` calls (the page's passes of one Track), which then take no
        turn of their own: a job that asks meanwhile comes after all of them, not between two."""
        with self._device_turn(cancel, waiting):
            self._held_for_calls = True
            try:
                yield
            finally:
                self._held_for_calls = False

    def warm_up(self, options: TrackOptions | None = None, frame_size: tuple[int, int] = (1280, 720)) -> float:
        """Track a short generated clip of `frame_size` (w, h) end to end; returns the seconds it took.

        On CUDA a process's first job pays once for cuDNN's algorithm search,
        Triton's kernel builds and the CUDA graph captures (on an H200 a
        first 200-frame 720p video took 4.5 s, the next ones 0.9 s; the
        warm-up itself took 21.7 s where Triton's disk cache was empty). Warmed
        up at start, the first user does not wait for that, and the first
        video of this working size takes over the graphs XMem captured here.
        A CPU has only XMem's inference copy to make (and in fp32 its
        Winograd weights: a few seconds on 2 cores), so nothing is tracked there.
        """
        began = time.perf_counter()
        width, height = frame_size
        if self.device.type != "cuda":
            with stepping_network(self.xmem, self.device, options or TrackOptions(), (height, width)):
                return time.perf_counter() - began
        with tempfile.TemporaryDirectory(prefix="tracker-warm-up-") as tmp:
            clip = make_clip(Path(tmp) / "clip.mp4", width, height, frames=12)
            self.track(clip, [ObjectPrompt(1, 0, [(width * 0.2, height / 2)], [1])], output=Path(tmp) / "out.mp4",
                       options=options)
        return time.perf_counter() - began

    def warm_up_in_background(self, options: TrackOptions | None = None) -> threading.Thread:
        """`warm_up` in a thread (jobs wait for it; a failure is logged, as the first job would meet it)."""
        def run() -> None:
            try:
                seconds = self.warm_up(options)
            except Exception:  # never take the server down: the first job reports the problem properly
                log.warning("warming up failed; the first job will pay the start-up costs", exc_info=True)
            else:
                if seconds:
                    log.info("warmed up in %.1f s", seconds)

        thread = threading.Thread(target=run, name="warm-up", daemon=True)
        thread.start()
        return thread

    def track(self, video: str | Path, prompts: Sequence[ObjectPrompt], *, output: str | Path | None = None,
              masks: str | Path | None = None, options: TrackOptions | None = None,
              cancel: threading.Event | None = None, progress: ProgressFn | None = None,
              previous: PreviousRun | None = None, sam: SamBackend | None = None,
              embeddings: Mapping[int, ImageEmbedding] | None = None, waiting: WaitFn | None = None,
              shown: Callable[[TrackedFrame], None] | None = None, keep_on_cancel: bool = False) -> TrackResult:
        """Track the prompted objects through the video and write the overlay MP4 and/or the masks zip.

        Files appear at their paths only once complete; on any error or cancel
        nothing is left behind, except that with `keep_on_cancel` a cancel once
        a frame is written finishes the files with the frames written so far
        (the video and its sound end there) and returns their result,
        `stopped_at` naming the last (with corrections, in the last pass only). With `previous`, only frames from
        `previous.from_frame` on are tracked again (a correction there becomes
        a new memory frame); earlier frames keep the previous masks, unless
        `previous.backward`. Corrections (prompts with `correct`) are
        applied as the page applies them: the other prompts are tracked, then
        the video again from each corrected frame on, one pass each. `sam`
        (default `self.sam`) turns the prompts into masks, from `embeddings`
        of the prompted frames where given (see `prompt_masks`). Jobs take turns on the device in the order
        they asked; while this one waits, `waiting` is told how many jobs are ahead of it. `shown` is called
        with each frame as it is written (the page draws one a second while the job runs).
        """
        sam = sam or self.sam
        info, output, masks = check_job(video, prompts, output, masks, options)
        options = options or TrackOptions()
        if any(p.correct for p in prompts):
            return self._track_corrected(info, prompts, output, masks, options, cancel, progress, previous, sam,
                                         embeddings, waiting, shown, keep_on_cancel)
        with user_facing_resource_errors(options), self._device_turn(cancel, waiting), ExitStack() as stack, \
                ExitStack() as opened:
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.device)
            began = time.perf_counter()
            keyframes, earlier, anchors = self._plan(info, prompts, previous, sam, embeddings, cancel, opened)
            sinks = self._open_sinks(info, output, masks, options, stack)
            video_sink, zip_sink = sinks
            frames, last_written, stopped_at = 0, -1, None
            graphs = frame_graphs(self.device, options)
            interlaced = coded_fields(info, "libx264") is not None  # `_open_sinks`' writer codes fields
            try:
                for tracked in track_frames(self.xmem, info, keyframes, options, self.device, cancel=cancel,
                                            progress=progress, earlier=earlier, anchors=anchors, graphs=graphs,
                                            between_frames=self._clicks_first(cancel)):
                    if video_sink is not None:
                        picture = encoder_picture(tracked.image, tracked.labels, alpha=options.alpha,
                                                  outline=options.outline, interlaced=interlaced, graphs=graphs)
                        video_sink.put(picture, tracked.pts, tracked.time)
                    if zip_sink is not None:
                        zip_sink.put(tracked.index, Download(tracked.labels))
                    if shown is not None:
                        shown(tracked)
                    frames, last_written = frames + 1, tracked.index
            except Cancelled:
                if not keep_on_cancel or last_written < 0:
                    raise
                stopped_at = last_written
            if video_sink is not None:
                video_sink.close(stopped_at is not None)
            if zip_sink is not None:
                zip_sink.close()
            stack.pop_all()
            peak = torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else None
            result = TrackResult(frames=frames, expected_frames=info.frame_count,
                                 seconds=time.perf_counter() - began, device=self.device_name,
                                 sam_backend=sam.name if needs_sam(prompts) else None, peak_gpu_bytes=peak,
                                 kept_frames=0 if earlier is None else min(previous.from_frame, frames),
                                 output=Path(output) if output else None, masks=Path(masks) if masks else None,
                                 stopped_at=stopped_at,
                                 working_size=working_size(info.width, info.height, options.size))
        result.warnings.extend(option_warnings(options, info, output is not None))
        if output is not None:  # what the tracked video could not keep (an odd size, say), not only in the log
            result.warnings.extend(written_notes(info, "libx264"))
        if info.cut_short is not None:  # a truncated file with its index says so in the summary (lost frames)
            result.warnings.append(truncation_note(info))
        if (note := colour_note(info)) is not None:
            result.warnings.append(note)
        if self.untrained:
            result.warnings.append(weights.UNTRAINED_WARNING)
        return result

    def _track_corrected(self, info: VideoInfo, prompts: Sequence[ObjectPrompt], output: Path | None,
                         masks: Path | None, options: TrackOptions, cancel: threading.Event | None,
                         progress: ProgressFn | None, previous: PreviousRun | None, sam: SamBackend,
                         embeddings: Mapping[int, ImageEmbedding] | None, waiting: WaitFn | None,
                         shown: Callable[[TrackedFrame], None] | None, keep_on_cancel: bool) -> TrackResult:
        """`track` with corrections: a pass for the other prompts, then one from each corrected frame on, the
        frames before it kept (or tracked backward again from it: see `retracks_backward`)."""
        plain = [p for p in prompts if not p.correct]
        frames = sorted({p.frame for p in prompts if p.correct})
        prompt_frames = [p.frame for p in plain]
        first_total: list[int] = []  # the first pass's frames (more when it tracks backward first)

        def report(index: int) -> ProgressFn | None:
            def passed(done: int, total: int) -> None:
                if index == 0:
                    first_total[:] = [total]
                done_before = (first_total[0] + (index - 1) * info.frame_count) if index else 0
                progress(done_before + done, (first_total or [total])[0] + len(frames) * info.frame_count)

            return None if progress is None else passed

        results = []
        with user_facing_resource_errors(options), self.device_held(cancel, waiting), \
                tempfile.TemporaryDirectory(prefix="tracker-passes-") as tmp:
            began = time.perf_counter()  # the corrections' SAM work between the passes counts too
            tracked = Path(tmp) / "pass-0.zip"
            results.append(self.track(info.path, plain, masks=tracked, options=options, cancel=cancel,
                                      progress=report(0), previous=previous, sam=sam, embeddings=embeddings,
                                      shown=shown))
            for index, frame in enumerate(frames, 1):
                embedding = _frame_embedding(sam, info, frame, embeddings, cancel)
                corrections = sorted((p for p in prompts if p.correct and p.frame == frame), key=lambda p: p.object_id)
                corrected = Path(tmp) / f"corrected-{index}.zip"
                self.correct_masks(tracked, frame, embedding, corrections, corrected, sam)
                final = index == len(frames)
                tracked = masks if final else Path(tmp) / f"pass-{index}.zip"
                results.append(self.track(
                    info.path, plain, output=output if final else None, masks=tracked, options=options,
                    cancel=cancel, progress=report(index), sam=sam, embeddings=embeddings, shown=shown,
                    previous=PreviousRun(corrected, frame, retracks_backward(frame, prompt_frames, frames),
                                         corrected=(*(previous.corrected if previous else ()), *frames[:index - 1])),
                    keep_on_cancel=keep_on_cancel and final))  # the passes before write no video to keep
            seconds = time.perf_counter() - began
        return replace(combined(results), seconds=seconds)

    def _plan(self, info: VideoInfo, prompts: Sequence[ObjectPrompt], previous: PreviousRun | None, sam: SamBackend,
              embeddings: Mapping[int, ImageEmbedding] | None, cancel: threading.Event | None, opened: ExitStack
              ) -> tuple[dict[int, dict[int, np.ndarray]], Callable[[int], np.ndarray] | None,
                         dict[int, dict[int, np.ndarray]]]:
        """Keyframe masks; where frames before the first keyframe get their labels from (a previous
        run's masks, open until `opened` closes); the masks XMem remembers before it (see PreviousRun)."""
        start = 0 if previous is None else previous.from_frame
        keyframes = self.prompt_masks(info, [p for p in prompts if p.frame >= start], sam, embeddings=embeddings,
                                      cancel=cancel)
        if previous is None:
            return keyframes, None, {}
        earlier = opened.enter_context(MaskZipReader(previous.masks))

        def kept_masks(frame: int) -> dict[int, np.ndarray]:
            """The previous run's masks on `frame`, of each object present there or prompted before it (an
            object absent there, erased by a correction say, is given as empty: a frame without any object
            is then no error)."""
            labels = earlier[frame]
            objects = {p.object_id for p in prompts if p.frame < frame} | {int(o) for o in np.unique(labels) if o}
            return {o: labels == o for o in sorted(objects)}

        keyframes[start] = dict(sorted({**kept_masks(start), **keyframes.get(start, {})}.items()))
        if not keyframes[start]:
            raise TrackerError(f"frame {start} has no object to track from; add a prompt there")
        present = {object_id for object_id, mask in keyframes[start].items() if mask.any()}
        if previous.backward and not _appear_before(earlier, start, present):
            return keyframes, None, {}
        remembered = {p.frame for p in prompts if p.frame < start} | {f for f in previous.corrected if f < start}
        return keyframes, earlier.__getitem__, {frame: kept_masks(frame) for frame in sorted(remembered)}

    def _open_sinks(self, info: VideoInfo, output: str | Path | None, masks: str | Path | None,
                    options: TrackOptions, stack: ExitStack) -> list[ThreadedSink | None]:
        """The video and zip writers, each aborted by `stack` on failure (the zip failing to open included)."""
        video_sink = zip_sink = None
        if output is not None:
            writer = VideoWriter(output, info, audio_from=info.path if info.has_audio else None,
                                 crf=options.crf, preset=options.preset)
            video_sink = ThreadedSink("encode", writer.write, writer.close, writer.abort,
                                      item_bytes=encoder_picture_bytes(self.device, info.width, info.height))
            stack.callback(video_sink.abort)
        if masks is not None:
            zipper = MaskZipWriter(masks)
            zip_sink = ThreadedSink("masks", zipper.write, zipper.close, zipper.abort,
                                    item_bytes=info.width * info.height)
            stack.callback(zip_sink.abort)
        return [video_sink, zip_sink]


def _frame_embedding(sam: SamBackend, info: VideoInfo, frame: int, embeddings: Mapping[int, ImageEmbedding] | None,
                     cancel: threading.Event | None) -> ImageEmbedding:
    """SAM's embedding of a prompted frame: the one in `embeddings`, else made now; a cancel stops that
    between the encoder's blocks on a CPU, where it takes seconds."""
    if cancel is not None and cancel.is_set():
        raise Cancelled("tracking was cancelled")
    embedding = (embeddings or {}).get(frame)
    if embedding is None:
        try:
            embedding = sam.embed(read_frame(info.path, frame, info.size).image,
                                  stop=None if cancel is None else cancel.is_set)
        except EmbeddingStopped:
            raise Cancelled("tracking was cancelled") from None
    return embedding


def retracks_backward(start: int | None, prompt_frames: Sequence[int], correction_frames: Sequence[int]) -> bool:
    """Whether a pass from `start` re-tracks the frames before it too: when no prompt comes before it, the run
    or pass before tracked those frames backward through it (from it, or from a later first prompt), so a
    change there reaches them; a correction before it is kept as it is, as in any pass."""
    return bool(start and prompt_frames and start <= min(prompt_frames)
                and all(frame >= start for frame in correction_frames))


def _appear_before(masks: MaskZipReader, start: int, objects: set[int]) -> bool:
    """Whether an object other than `objects` shows on a frame before `start` in a run's masks."""
    return any(not set(np.unique(masks[index])) <= {0, *objects} for index in range(start) if index in masks)


def track_video(video: str | Path, prompts: Sequence[ObjectPrompt], *, output: str | Path | None = None,
                masks: str | Path | None = None, options: TrackOptions | None = None, device: str = "auto",
                sam_checkpoint: str | Path | None = None, xmem_checkpoint: str | Path | None = None,
                sam_backend: str = "auto", sam_precision: str = "auto", download: bool = True) -> TrackResult:
    """One call from a script: load the models, track, write the files.

    The video, prompts, options and output paths are checked first: a mistake there is not worth loading the
    weights. `download=False` fails on a missing checkpoint instead of fetching it (as the CLI's `--no-download`).
    """
    check_job(video, prompts, output, masks, options)
    resolve_precision(resolve_device(device), (options or TrackOptions()).precision)  # fp16 on a CPU, say
    tracker = Tracker(sam_checkpoint, xmem_checkpoint, device=device, sam_backend=sam_backend,
                      sam_precision=sam_precision, download=download)
    return tracker.track(video, prompts, output=output, masks=masks, options=options)
