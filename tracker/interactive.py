"""Per-user editing behind the web app: a video, objects, clicks and boxes per frame, SAM previews, re-tracking.

Each browser session owns one `EditSession` (its own directory, prompts and
results); `SessionStore` maps the web framework's session key to it and
removes the files of sessions that end or go idle. Nothing here imports the
UI toolkit, so the whole editing flow is testable without a browser.

Corrections: a click on a frame where an object already has a tracked mask
refines that mask (SAM gets it as `mask_input`). Re-tracking then starts at
the earliest changed frame: earlier frames keep the previous result, the
corrected frame becomes a new memory frame, and corrections on later frames
are applied again on top of the new tracking, one pass each.
"""
from __future__ import annotations

import contextlib
import filecmp
import hashlib
import math
import secrets
import shutil
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

from .errors import Cancelled, ClickDropped, PromptError, TrackerError, VideoError
from .exports import CUTOUT_KINDS, export_cutout, export_overlay
from .options import TrackOptions
from .pipeline import TrackedFrame
from .prompts import (NEGATIVE, POSITIVE, PROMPTS_ENDING, ObjectPrompt, check_prompts, frame_problem, load_prompts,
                      object_mask, prompts_from_text, write_prompts)
from .render import MaskZipReader, overlay, overlay_colours
from .prefetch import EmbeddingPrefetch
from .sam import EmbeddingStopped, ImageEmbedding, SamBackend
from .session import LOSSLESS_WARNING, PreviousRun, Tracker, TrackResult, combined, retracks_backward
from .video import (MASKS_ENDING, TRACKED_ENDING, Frame, VideoInfo, colour_note, probe, read_frame,
                    truncation_note, written_notes)

# What cameras, phones and editors write; all decode through FFmpeg (the result is always an H.264 MP4).
VIDEO_SUFFIXES = (".mp4", ".mov", ".m4v", ".webm", ".mkv", ".avi", ".3gp", ".mts", ".m2ts", ".ts", ".mpg", ".mpeg",
                  ".wmv", ".flv", ".ogv")
POINT_MODES = ("positive", "negative", "box")
MAX_OBJECT_ID = 255
DISPLAY_LONG_SIDE = (640, 1280)  # frames are shown with their longer side in this range; clicks map back
EMBEDDING_CACHE_SIZE = 3  # SAM embeddings kept per session (about 4 MB each)
CLOSED_KEYS_KEPT = 10_000  # closed pages' session keys remembered (see SessionStore)
PREVIEWS_KEPT = 8  # the latest frame pictures written for the page, which may still be fetching them
LIVE_SECONDS = 1.0  # a running job's latest frame is drawn for the page this often
# A click said on the page whose SAM work has not come this long after is taken as lost (the tab went away).
CLICK_LOST_SECONDS = 180.0

Key = tuple[int, int]  # (frame, object id)
ProgressReport = Callable[[float, str], None]  # (fraction 0..1, description)
TRIMMED_UPLOAD = "video.mp4"  # the name of the file Gradio's video widget uploads when it trims a video


@dataclass(frozen=True)
class Limits:
    """What the app accepts; None means no limit."""

    max_frames: int | None = None
    max_seconds: float | None = None
    max_pixels: int | None = None

    def check(self, info: VideoInfo) -> None:
        """Refuse a video above a limit, naming the limit."""
        if self.max_frames is not None and info.frame_count > self.max_frames:
            raise VideoError(f"the video has {info.frame_count} frames; this app accepts at most "
                             f"{self.max_frames} (--max-frames): trim it and upload again")
        if self.max_seconds is not None and info.duration > self.max_seconds:
            raise VideoError(f"the video lasts {info.duration:.1f} s; this app accepts at most "
                             f"{self.max_seconds:g} s (--max-seconds): trim it and upload again")
        if self.max_pixels is not None and info.width * info.height > self.max_pixels:
            raise VideoError(f"the video is {info.width}x{info.height} ({info.width * info.height} pixels); "
                             f"this app accepts at most {self.max_pixels} pixels per frame (--max-pixels): "
                             "scale it down and upload again")


@dataclass(frozen=True)
class MaskPicture:
    """A mask loaded from a picture, compared by a digest of its pixels: runs compare their prompts cheaply,
    and the same mask loaded again changes nothing."""

    pixels: np.ndarray = field(compare=False, repr=False)  # HxW bool, at the video's size
    digest: str

    @classmethod
    def of(cls, pixels: np.ndarray) -> MaskPicture:
        shape = np.asarray(pixels.shape, dtype=np.int64).tobytes()
        return cls(pixels, hashlib.sha256(shape + np.packbits(pixels).tobytes()).hexdigest())


@dataclass(frozen=True)
class Clicks:
    """One object's clicks and box on one frame, plus the first corner of a box being drawn; or a loaded mask,
    which clicks then refine (SAM is given it as the prior, as a correction is given the tracked mask)."""

    points: tuple[tuple[float, float], ...] = ()
    labels: tuple[int, ...] = ()
    box: tuple[float, float, float, float] | None = None
    corner: tuple[float, float] | None = None
    mask: MaskPicture | None = None

    def with_point(self, xy: tuple[float, float], label: int) -> Clicks:
        """A point; a box left half drawn (the user switched to points) is dropped."""
        return replace(self, points=self.points + (xy,), labels=self.labels + (label,), corner=None)

    def with_corner(self, xy: tuple[float, float]) -> Clicks:
        """The first click of a box keeps a corner; the second makes the box."""
        if self.corner is None:
            return replace(self, corner=xy)
        (x0, y0), (x1, y1) = self.corner, xy
        if abs(x1 - x0) < 1 or abs(y1 - y0) < 1:
            raise PromptError("the two box corners are on the same row or column: click two opposite corners")
        return replace(self, box=(min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)), corner=None)

    @property
    def clicked(self) -> bool:
        """Whether there are points or a box for SAM (a pending corner alone is not one)."""
        return bool(self.points) or self.box is not None

    @property
    def selects(self) -> bool:
        """Whether these give a mask: SAM's from clicks, or a loaded one."""
        return self.clicked or self.mask is not None

    @property
    def tracked_part(self) -> tuple:
        """What tracking sees; a pending corner is not part of it."""
        return self.points, self.labels, self.box, self.mask

    def prompt(self, object_id: int, frame: int) -> ObjectPrompt:
        return ObjectPrompt(object_id, frame, list(self.points), list(self.labels), self.box)


@dataclass(frozen=True)
class PendingClick:
    """A click said on the page and waiting for SAM: where it was made, and on what."""

    frame: int
    display_xy: tuple[float, float]
    mode: str
    video_loads: int
    object_id: int | None


@dataclass
class Edit:
    """Clicks for one object on one frame, how to read them, and SAM's mask for them.

    `refine` is set when the object already had a tracked mask on the frame when
    the first click came: the clicks then correct that mask instead of making
    one from nothing. A loaded mask starts an edit of its own, never a
    correction, which keeps the one it `replaced` for Undo to bring back.
    """

    refine: bool
    clicks: Clicks = field(default_factory=Clicks)
    history: list[Clicks] = field(default_factory=list)
    mask: np.ndarray | None = None
    replaced: Edit | None = None


@dataclass
class RunRecord:
    """A finished tracking run and the prompts it used."""

    overlay: Path
    masks: Path
    summary: str
    warnings: list[str]
    prompts: dict[Key, tuple]  # key -> Clicks.tracked_part
    objects: frozenset[int]
    passes: list[int | None] = field(default_factory=lambda: [None])
    backward: bool = False  # the first pass, from a frame, re-tracked the frames before it too (retracks_backward)
    options: TrackOptions | None = None
    repeated: bool = False  # Track found nothing changed since this run: it was not run again
    redrawn: bool = False  # only the look changed: the last run's masks were drawn again
    sam_backend: str = ""  # the backend that turned the prompts into masks
    # The run a partial one was built on, its files kept: taking the change back (Undo) brings it back at once.
    base: RunRecord | None = None
    restored: bool = False  # this is such a base, brought back
    first_prompt: int = 0  # the earliest frame with a prompt (corrections aside): where the run began
    prompts_file: Path | None = None  # `prompts` as a prompts file, a download to track them again from the CLI
    mask_pictures: tuple[Path, ...] = ()  # the masks the prompts file names, beside it (downloads too)
    # Each correction's object mask from before it was applied on its frame (key -> HxW bool): a correction
    # changed later (a click taken back) is applied again on this, not on the mask that holds the old one.
    corrected_from: dict[Key, np.ndarray] = field(default_factory=dict)
    corrections: frozenset[Key] = frozenset()  # the keys of `prompts` that are corrections
    # A cancel kept the frames done: the last frame with masks (the files end there). `prompts` then holds only the
    # prompts those frames took in; the next Track goes on from this frame (see plan_passes).
    stopped_at: int | None = None
    # Frames kept from the runs it was built on were tracked with other tracking settings (a size, say).
    mixed_settings: bool = False

    @property
    def went_on(self) -> bool:
        """The first pass started where the run built on had stopped."""
        return self.passes[0] is not None and self.base is not None and self.base.stopped_at == self.passes[0]

    def describe(self) -> str:
        """What the run did, in the user's words."""
        if self.restored:
            done = "drawn again with the new look" if self.redrawn else "nothing was tracked"
            return f"the prompts are again those of the run before the last change, so its masks are back ({done})"
        if self.redrawn:
            return "drew the tracked video again with the new look; the masks are those of the last run"
        first, *later = self.passes
        stopped = self.stopped_at is not None  # then what the run was doing
        if first is None:
            text = "tracking the whole video" if stopped else "tracked the whole video"
        elif self.went_on:
            text = f"{'going' if stopped else 'went'} on from frame {first}, where the cancelled run stopped" + \
                ("; frames before it kept their masks" if first > 0 else "")
        else:
            text = f"{'re-tracking' if stopped else 're-tracked'} from frame {first}" + (
                ", forward and backward (no prompt comes before it)" if self.backward else
                "; frames before it kept their masks" if first > 0 else "")
        if later:
            text += f"; corrections on frame{'s' * (len(later) > 1)} {', '.join(map(str, later))} applied on top"
        if self.stopped_at is not None:
            return (f"stopped after frame {self.stopped_at}, the frames up to it kept with their masks ({text}); "
                    f"Track goes on from frame {self.stopped_at}")
        return text


def plan_passes(prompts: Mapping[Key, tuple], refine_frames: Sequence[int], objects: frozenset[int],
                last: RunRecord | None, full: bool, sam_backend: str = "") -> list[int | None]:
    """The tracking passes for a Track press: None = the whole video, n = from frame n on a previous result.

    A partial re-run starts at the earliest frame whose prompts changed since
    `last`, or where `last` stopped (a cancel kept its frames up to there), if
    earlier; each later frame with corrections gets its own pass so that those
    corrections refine the new tracking. An object added joins there too (the
    frames before its prompts never held it), unless the run would then start
    earlier than the last one did. A removed object (the last run's masks
    still hold it), a prompt taken away (likewise), or another SAM backend (it
    made every prompt's mask) needs the whole video.
    """
    whole = [None, *sorted(set(refine_frames))]
    if last is None or full or not last.objects <= objects or sam_backend != last.sam_backend \
            or last.prompts.keys() - prompts.keys():
        return whole
    changed = {key for key in prompts.keys() | last.prompts.keys() if prompts.get(key) != last.prompts.get(key)}
    starts = [frame for frame, _ in changed] + ([last.stopped_at] if last.stopped_at is not None else [])
    if not starts:
        return whole
    start = min(starts)
    if objects != last.objects and start < last.first_prompt:
        return whole  # the whole video starts at the new object's prompt: earlier than the last run's first frame
    return [start, *sorted({frame for frame in refine_frames if frame > start})]


def applied_prompts(prompts: Mapping[Key, tuple], corrections: frozenset[Key], passes: Sequence[int | None],
                    stopped_at: int | None) -> dict[Key, tuple]:
    """The prompts a run's masks took in, of those it read (`prompts`, `corrections` among them) for `passes`,
    the passes it ran: all of them, unless a cancel stopped it after frame `stopped_at`. Then a prompt on a later
    frame is not in, nor a correction whose pass did not start (one before the first pass is in: the run
    kept it from the run it was built on)."""
    if stopped_at is None:
        return dict(prompts)
    first = passes[0] if passes[0] is not None else 0
    started = {start for start in passes if start is not None}
    return {key: value for key, value in prompts.items() if key[0] <= stopped_at
            and not (key in corrections and key[0] >= first and key[0] not in started)}


def format_seconds(seconds: float) -> str:
    """0:07, 1:05:09."""
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def upload_message(info: VideoInfo, trimmed: bool = False) -> str:
    """What the page says about a video it took (`trimmed`: the trim made in the page's video widget)."""
    count = info.present_frames  # a truncated file's note gives the count (and length) its index promised
    frames = "1 frame" if count == 1 else f"{count} frames"
    length = info.duration if info.truncated_to is None else float(count / info.fps)
    seconds = f"{length:.2f}" if length < 0.1 else f"{length:.1f}"  # a frame or two
    rate = f"{float(info.rounded_rate or info.fps):.4g} fps"  # 23.98, 29.97, 59.94
    if info.variable_rate:
        rate = f"a variable frame rate ({rate} on average)"
    elif not info.evenly_timed:
        rate = f"{rate} on average (some frames last two or more intervals: dropped frames, or frames held)"
    fields = {"tff": ", interlaced (top field first)", "bff": ", interlaced (bottom field first)"}
    text = (f"Loaded {'the trimmed video, ' if trimmed else ''}"
            f"{info.width}x{info.height}, {frames}, {seconds} s, {rate}{fields.get(info.field_order, '')}. "
            "Click the object to track.")
    notes = [note for note in (truncation_note(info), colour_note(info)) if note]
    return "".join([text, *(f"\n⚠ {note}." for note in notes)])


def untyped_file_message(name: str, mime: str, loaded: VideoInfo | None) -> str:
    """What the page says of a file the browser does not type as a video (`mime`), which the video widget drops;
    `loaded`: the video the page had before, which stays."""
    return (f"{name} was not taken: the browser reads it as {mime or 'an unknown type'}, not as a video; choose a "
            "video file (an MPEG-TS .ts file goes in renamed .m2ts)"
            + ("; the video loaded before stays" if loaded is not None else ""))


def oversize_message(name: str, size: int, limit_mb: float, kind: str) -> str:
    """What the page says of a file over the server's upload limit, which the browser keeps back unsent; `kind`:
    what it was chosen as ("video", "prompts file" or "mask picture")."""
    if kind not in ("video", "prompts file", "mask picture"):
        raise ValueError(f"unknown kind of upload {kind!r}")
    return (f"{name} is {math.ceil(size / 2**20 * 10) / 10:.1f} MB, over this server's upload limit of "
            f"{limit_mb:g} MB: choose a smaller {kind}, or ask the server's operator to raise the limit "
            "(python app.py --max-upload-mb)")


def frame_caption(index: int, info: VideoInfo, time_s: float) -> str:
    """'Frame 12 / 299 · 0:00.480' (frames counted from 0; the time from the first frame's, where the
    tracked video has it)."""
    minutes, secs = divmod(max(0.0, time_s - info.start), 60)
    return f"Frame {index} / {info.present_frames - 1} · {int(minutes)}:{secs:06.3f}"


STARTING = "Starting: SAM turns the clicks into masks…"


def device_wait_line(ahead: int) -> str:
    """What a job says while jobs that asked before it (the start-up warm-up on a GPU, other users' jobs) hold
    or wait for the device; once none is ahead, that it starts."""
    if not ahead:
        return STARTING
    jobs = "1 job is" if ahead == 1 else f"{ahead} jobs are"
    return f"Waiting for the device: {jobs} ahead of this one (one runs at a time; at start-up, the warm-up)…"


class ProgressClock:
    """Turns per-pass (done, total) frame counts into one fraction and a line with an ETA.

    A pass's count runs over the frames tracked backward from its first prompt (`total` beyond the video's
    `frames`), then over every frame of the video, and the line names the frame at hand in either.
    """

    def __init__(self, passes: int, report: ProgressReport, frames: int):
        self.passes = passes
        self.report = report
        self.frames = frames
        # The rate is taken from the first frame on: waiting for the device and SAM's masks come before it.
        self.first: tuple[float, float] | None = None  # (time, fraction) at the first update

    def update(self, index: int, done: int, total: int) -> None:
        fraction = (index + done / max(total, 1)) / self.passes
        now = time.perf_counter()
        if self.first is None:
            self.first = (now, fraction)
        began, base = self.first
        rate = (fraction - base) / (now - began) if fraction > base and now > began else 0.0
        eta = f"ETA {format_seconds((1 - fraction) / rate)}" if rate > 0 else "ETA …"
        which = f"pass {index + 1}/{self.passes}: " if self.passes > 1 else ""
        backward = total - self.frames
        where = f"backward, frame {backward - done}" if done <= backward else \
            f"frame {done - backward - 1} / {self.frames - 1}"
        self.report(fraction, f"Tracking {which}{where} · {eta}")


@dataclass(frozen=True)
class Style:
    """How masks are drawn over frames."""

    alpha: float = 0.5
    outline: int = 2


def mask_edit(mask: np.ndarray, replaced: Edit | None = None) -> Edit:
    """A loaded mask as an object's prompt on a frame (`replaced`: the edit it takes the place of, for Undo)."""
    return Edit(refine=False, clicks=Clicks(mask=MaskPicture.of(mask)), history=[Clicks()], mask=mask,
                replaced=replaced)


def upload_paths(files: str | Path | Sequence[str | Path]) -> list[Path]:
    """The files of one upload: one file, or several chosen together."""
    return [Path(files)] if isinstance(files, (str, Path)) else [Path(file) for file in files]


def prompts_upload(paths: Sequence[Path]) -> tuple[Path, list[Path]]:
    """The prompts file among files chosen together, and the others: the mask pictures it names."""
    chosen = [path for path in paths if path.suffix.lower() == ".json"]
    names = ", ".join(path.name for path in paths) or "nothing"
    if not chosen:
        raise PromptError(f"no prompts file (.json) among the files chosen ({names}): choose a prompts file, with "
                          "the mask pictures it names if any")
    if len(chosen) > 1:
        raise PromptError(f"choose one prompts file at a time, with the mask pictures it names if any (chosen: "
                          f"{names})")
    return chosen[0], [path for path in paths if path is not chosen[0]]


class EditSession:
    """One user's video, objects, clicks, previews and results, in a directory of its own.

    Methods lock the session, except that a tracking job holds the lock only to
    read the prompts at its start and to store its result at its end, so the
    page stays usable (and Cancel reachable) while it runs.
    """

    def __init__(self, directory: Path, tracker: Tracker, upload_folder: Path | None = None,
                 prefetch: EmbeddingPrefetch | None = None):
        self.directory = directory
        self.tracker = tracker
        self.upload_folder = upload_folder.resolve() if upload_folder is not None else None
        self._prefetch = prefetch  # embeds the frame shown before it is clicked (a CPU's SAM takes seconds)
        self.lock = threading.RLock()
        self._clicking = threading.Lock()  # one click at a time; its SAM work runs outside `lock`
        # When each click said on the page (`click_wait`) and not yet segmented was said: Track waits for them.
        self._announced: deque[float] = deque()
        self._pending: deque[PendingClick] = deque()  # clicks queued by `queue_click`, oldest first
        self._loading: str | None = None  # the prompts file whose masks SAM is making, as the page names it
        self._files_announced: set[str] = set()  # prompts files `prompts_file_wait` said, not yet loaded
        self._clicks_settled = threading.Condition()
        self.job_ended = threading.Condition(self.lock)
        self.cancel = threading.Event()
        self._closing = False  # the page went: a cancelled job keeps nothing
        self.job_running = False
        self._job_objects: frozenset[int] | None = frozenset()  # what the running job tracks; None: not read yet
        self.last_used = time.monotonic()
        self.video: Path | None = None
        self.uploaded_from: Path | None = None  # the upload the video was taken from, as the page names it
        self.shown_frame = 0  # the frame last drawn for the page
        self.video_loads = 0  # counts videos taken and dropped
        self.info: VideoInfo | None = None
        self.objects: list[int] = []
        self.current: int | None = None
        self.edits: dict[Key, Edit] = {}
        self.result: RunRecord | None = None
        self.cutouts: dict[str, Path] = {}
        self._look_moved = False  # the last look note said the frame's look is not the tracked video's
        self._result_reader: MaskZipReader | None = None
        self._embeddings: OrderedDict[int, ImageEmbedding] = OrderedDict()
        self.sam = tracker.sam  # this session's SAM backend
        tracker.add_page(self)
        self._decoded: Frame | None = None
        self._runs = 0
        self._previews = 0  # frame pictures written for the page
        self._live: tuple[int, Path] | None = None  # a running job's latest frame drawn, until the page takes it
        self._uploads: dict[Path, tuple[int, int]] = {}  # files taken from `upload_folder` -> (device, inode)
        directory.mkdir(parents=True, exist_ok=True)

    # -- video -----------------------------------------------------------
    def open_trimmed_video(self, upload: str | Path, limits: Limits) -> VideoInfo | None:
        """Take the file the page's video widget uploads when it trims the open video, named after the user's
        upload (`clip_trimmed.mp4`); None when the trim kept the whole video (the widget sends it unchanged)."""
        upload = Path(upload)
        with self.lock:
            self.require_video()
            video = self.video
        if filecmp.cmp(upload, video, shallow=False):
            return None
        stem = video.stem.removesuffix("_trimmed")
        return self.open_video(upload, limits, f"{stem}_trimmed{upload.suffix}")

    def open_video(self, upload: str | Path, limits: Limits, name: str | None = None) -> VideoInfo:
        """Take an uploaded file (linked or copied in, under `name` or its own) and start editing it from scratch."""
        upload = Path(upload)
        suffix = upload.suffix.lower()
        if suffix not in VIDEO_SUFFIXES:
            raise VideoError(f"{suffix or 'a file without extension'} is not a video this app takes; "
                             f"upload one of: {', '.join(VIDEO_SUFFIXES)}")
        with self.lock:
            self._require_idle()
            self._forget_video()
            self.video = self.directory / "video" / (name or upload.name)  # messages and downloads name it
            self.video.parent.mkdir(exist_ok=True)
            try:
                _link_or_copy(upload, self.video)
            except FileNotFoundError:
                self.video = None
                raise VideoError("the uploaded file is gone (the server removes uploads whose sessions ended); "
                                 "upload it again") from None
            if self.upload_folder is not None and upload.resolve().is_relative_to(self.upload_folder):
                taken = upload.stat()
                self._uploads[upload] = (taken.st_dev, taken.st_ino)
            try:
                info = probe(self.video)
                limits.check(info)
            except TrackerError:
                self._forget_video()
                raise
            self.info, self.uploaded_from = info, upload
            self.objects, self.current = [1], 1
            self.video_loads += 1  # a click made while this video was being read was on the one before
            return info

    def set_sam_backend(self, name: str) -> str:
        """Use another SAM backend for this session's clicks and jobs (loaded on first use, shared by sessions).

        A job already running keeps the backend it started with.
        """
        backend = self.tracker.sam_backend(name)
        with self.lock:
            if backend is not self.sam:
                self.sam = backend
                self._embeddings.clear()  # embeddings belong to the backend that made them
        return f"SAM backend {name}: clicks and the next Track use it"

    def _forget_video(self) -> None:
        self.video_loads += 1  # clicks made on the video before stay with it (see `click`)
        if self.video is not None:
            shutil.rmtree(self.video.parent, ignore_errors=True)
        self._set_result(None)
        self.video = self.info = self._decoded = self.uploaded_from = None
        self.objects, self.current, self.edits = [], None, {}
        self._embeddings.clear()
        shutil.rmtree(self.directory / "runs", ignore_errors=True)

    def _set_result(self, record: RunRecord | None) -> None:
        """Make `record` the current result; the previous one's files (and cut-outs made from it) go, but for
        the run `record` was built on."""
        if self._result_reader is not None:
            self._result_reader.close()
        kept = {run.masks.parent for run in (record, record and record.base) if run is not None}
        for old in (self.result, self.result and self.result.base):
            if old is not None and old.masks.parent not in kept:
                shutil.rmtree(old.masks.parent, ignore_errors=True)
        shutil.rmtree(self.directory / "cutouts", ignore_errors=True)
        self.result, self.cutouts, self._look_moved = record, {}, False
        self._result_reader = MaskZipReader(record.masks) if record is not None else None

    def reset(self) -> None:
        """Forget the video and everything made from it (the upload was removed)."""
        with self.lock:
            self._require_idle()
            self._forget_video()

    def has_work(self) -> bool:
        """Whether closing the page would lose something the user made: clicks (also those waiting for SAM), a
        result, or a job under way. Read without the lock, which an edit holds through seconds of SAM work."""
        return self.job_running or self.result is not None or bool(self.edits) or self.clicks_waiting()

    def require_video(self) -> VideoInfo:
        if self.info is None:
            raise TrackerError("upload a video first")
        return self.info

    def _require_idle(self) -> None:
        if self.job_running:
            raise TrackerError("a tracking job is running: wait for it or press Cancel first")

    def _require_prompts_unread(self) -> None:
        """Every object may be replaced unless a job tracks them: one that has not read its prompts yet waits for
        announced clicks (`_await_clicks`), and so tracks what replaces them."""
        if self.job_running and self._job_objects is not None:
            raise TrackerError("the tracking job under way has taken the clicks it tracks: load the prompts file "
                               "once it is done, or press Cancel first")

    # -- objects ---------------------------------------------------------
    def add_object(self) -> int:
        """A new object with the next free id (and so its own colour); it becomes the current one. Past the
        largest id, the smallest that neither an object nor the last result holds."""
        with self.lock:
            self.require_video()
            used = set(self.objects) | (set(self.result.objects) if self.result else set())
            new_id = max(used, default=0) + 1
            if new_id > MAX_OBJECT_ID:
                new_id = min(set(range(1, MAX_OBJECT_ID + 1)) - used, default=None)
            if new_id is None:
                raise PromptError(f"at most {MAX_OBJECT_ID} objects can be tracked at once")
            self.objects.append(new_id)
            self.current = new_id
            return new_id

    def select_object(self, object_id: int) -> None:
        with self.lock:
            if object_id not in self.objects:
                raise PromptError(f"object {object_id} does not exist; pick one from the list")
            self.current = object_id

    def remove_object(self, object_id: int) -> str:
        """Drop an object and all its clicks; it disappears from the display. Says what the next Track
        does: it brings the kept run back when the object came after it, else it reruns all.

        Not while a job that tracks it runs: its result would bring it back.
        """
        with self.lock:
            if self.job_running and (self._job_objects is None or object_id in self._job_objects):
                raise TrackerError(f"object {object_id} is in the tracking job under way: remove it once the job "
                                   "is done, or press Cancel first")
            if object_id not in self.objects:
                raise PromptError(f"object {object_id} does not exist")
            if len(self.objects) == 1:
                raise PromptError("the last object cannot be removed; clear its clicks instead")
            self.objects.remove(object_id)
            self.edits = {key: edit for key, edit in self.edits.items() if key[1] != object_id}
            if self.current == object_id:
                self.current = self.objects[-1]
            if self.job_running:  # the next Track's work depends on the running job's result, not the last one
                return f"object {object_id} removed (the tracking job under way does not track it)"
            if self.result is None:
                return f"object {object_id} removed"
            if self._tracked_from(self.result, self._prompts()[2]):
                return f"object {object_id} removed; the clicks are those of the last run again, which Track keeps"
            return f"object {object_id} removed{self._restore_hint() or '; the next Track re-runs the whole video'}"

    # -- clicks ----------------------------------------------------------
    def queue_click(self, frame: int, display_xy: tuple[float, float], mode: str) -> str:
        """Take a click as the page makes it, for `click_next` to segment in turn; says it at once (`click_wait`).

        The page's events for clicks wait for SAM one after another (seconds each on a CPU): what a click was,
        on which frame and object, is kept here when it is made, not read when its event's turn comes.
        """
        with self._clicks_settled:
            self._pending.append(PendingClick(frame, display_xy, mode, self.video_loads, self.current))
        return self.click_wait(frame)

    def clicks_queued(self) -> bool:
        """Whether a click `queue_click` took waits for `click_next`: its own wait message is the page's latest
        word, which an earlier click's late reply should not replace."""
        with self._clicks_settled:
            return bool(self._pending)

    def click_next(self) -> str | None:
        """Segment the oldest click `queue_click` took (None when none waits): as `click`."""
        with self._clicks_settled:
            if not self._pending:
                return None
            pending = self._pending.popleft()
        return self.click(pending.frame, pending.display_xy, pending.mode, pending.video_loads, pending.object_id)

    def click(self, frame: int, display_xy: tuple[float, float], mode: str, video_loads: int | None = None,
              object_id: int | None = None) -> str:
        """A click on the displayed frame: add a point (or a box corner) to an object (by default the current
        one), update its mask.

        `video_loads`, when given, is the count at the moment of the click: a click made on a video replaced or
        cleared since then (it waited for SAM) raises ClickDropped instead of landing on the new one; so does a
        click for an object removed since.
        """
        try:
            return self._click(frame, display_xy, mode, video_loads, object_id)
        finally:
            self._settled()

    def _announce(self) -> None:
        """Clicks are on their way from now on: a Track pressed meanwhile waits for them (`_await_clicks`)."""
        with self._clicks_settled:
            self._announced.append(time.monotonic())

    def _settled(self) -> None:
        """The oldest announced click has its mask, or failed."""
        with self._clicks_settled:
            if self._announced:
                self._announced.popleft()
            self._clicks_settled.notify_all()

    def _click(self, frame: int, display_xy: tuple[float, float], mode: str, video_loads: int | None,
               object_id: int | None) -> str:
        if mode not in POINT_MODES:
            raise PromptError(f"unknown click mode {mode!r}; use one of {', '.join(POINT_MODES)}")
        self._sam_needed(frame)
        with self._clicking:
            with self.lock:
                if video_loads not in (None, self.video_loads):
                    raise ClickDropped("the click was made on a video that has been replaced since")
                loads = self.video_loads
                info = self._check_frame(frame)
                if self.current is None:
                    raise PromptError("add an object first")
                if object_id is not None and object_id not in self.objects:
                    raise ClickDropped(f"object {object_id} was removed after the click")
                object_id = self.current if object_id is None else object_id
                xy = self._to_frame_xy(display_xy, info)
                key = (frame, object_id)
                existed = key in self.edits
                edit = self.edits.get(key) or Edit(refine=self._tracked_mask(frame, object_id).any())
                before = edit.clicks
                if mode == "box":
                    clicks = edit.clicks.with_corner(xy)
                else:
                    clicks = edit.clicks.with_point(xy, POSITIVE if mode == "positive" else NEGATIVE)
                prior = self._prior(frame, object_id, clicks, edit.refine)
                embedding = self._embeddings.get(frame)
                image = self._frame(frame).image if embedding is None and clicks.clicked else None
            # SAM's image encoder takes seconds on a CPU (where a job under way pauses for it): outside the
            # session's lock, so that Cancel, Undo and the page's redraws are not held up behind it.
            with self.tracker.click_work():
                if image is not None:
                    try:  # a page closed or a video replaced meanwhile: others need SAM more
                        embedding = self.sam.embed(image, stop=lambda: self._closing or self.video_loads != loads)
                    except EmbeddingStopped:
                        raise ClickDropped("the page closed, or its video was replaced, while SAM worked on the "
                                           "click") from None
                mask = self._segment(frame, object_id, clicks, prior, embedding) if clicks.clicked else \
                    self._mask(frame, object_id, clicks, edit.refine)  # a loaded mask's own, or none: no SAM
            with self.lock:
                if self.video_loads != loads:
                    raise ClickDropped("the video was replaced while SAM worked on the click")
                if object_id not in self.objects:  # removed while SAM worked: its click must not bring it back
                    raise ClickDropped(f"object {object_id} was removed while SAM worked on the click")
                unchanged = (self.edits.get(key) is edit) if existed else key not in self.edits
                if not unchanged or edit.clicks is not before:
                    raise PromptError("the video or this object's clicks changed while SAM worked on the click; "
                                      "click again")
                if embedding is not None:
                    self._remember_embedding(frame, embedding)
                edit.mask = mask
                # A click after a pending corner takes the corner's place in the history: Undo takes back the
                # whole box, or the point and the corner it dropped (which would pair with the next box click).
                if before.corner is None:
                    edit.history.append(before)
                edit.clicks = clicks
                self.edits[key] = edit
                text = self._describe(frame, object_id, edit)
                if clicks.corner is None:
                    return text
                # A box is drawn on one frame for one object at a time: a first corner left elsewhere would pair
                # with a click there, however long after.
                dropped = self._drop_corners(keep=key)
                return text + (f" (the first corner left for {corners_named(dropped)} is dropped)" if dropped else "")

    def undo(self, frame: int) -> str:
        """Take back the current object's last click on this frame."""
        with self.lock:
            self._check_frame(frame)
            key = (frame, self.current)
            edit = self.edits.get(key)
            if edit is None:
                return f"nothing to undo for object {self.current} on frame {frame}"
            if len(edit.history) == 1:
                if edit.replaced is None:
                    del self.edits[key]
                    taken = "the loaded mask is taken back; " if edit.clicks.mask is not None else ""
                    return f"{taken}object {self.current} has no clicks on frame {frame}{self._restore_hint()}"
                # A loaded mask taken back: the clicks it replaced come back, their mask made on today's result.
                edit = self.edits[key] = edit.replaced
                edit.mask = self._mask(frame, self.current, edit.clicks, edit.refine)
                return f"the loaded mask is taken back; {self._describe(frame, self.current, edit)}" + \
                    self._restore_hint()
            edit.mask = self._mask(frame, self.current, edit.history[-1], edit.refine)
            edit.clicks = edit.history.pop()
            return self._describe(frame, self.current, edit) + self._restore_hint()

    def load_mask(self, frame: int, path: str | Path) -> str:
        """A mask picture, read as a prompts file's "mask" is, as the current object's prompt on `frame`, in place
        of its clicks there (Undo brings them back). Track tracks it as it is; clicks on it refine it."""
        path = Path(path)
        try:
            with self.lock:
                info = self._check_frame(frame)
                if self.current is None:
                    raise PromptError("add an object first")
                object_id, key = self.current, (frame, self.current)
                prompt = ObjectPrompt(object_id, frame, mask=object_mask(path, object_id, path.name))
                try:
                    prompt.check(info.width, info.height, info.frame_count, info.present_frames)
                except PromptError as exc:
                    raise PromptError(f"the mask {path.name} cannot be used: {exc}") from None
                replaced = self.edits.get(key)
                self.edits[key] = mask_edit(prompt.mask, replaced)
        finally:
            if self.upload_folder is not None and path.resolve().is_relative_to(self.upload_folder):
                path.unlink(missing_ok=True)  # read once: the server's copy of the upload has served
        return (f"loaded {path.name} as object {object_id}'s mask on frame {frame}"
                + (" in place of its clicks there (Undo brings them back)" if replaced is not None else "")
                + "; clicks on it refine it, and Track tracks it")

    def clear(self, frame: int) -> str:
        """Remove all of the current object's clicks on this frame."""
        with self.lock:
            self._check_frame(frame)
            if self.edits.pop((frame, self.current), None) is None:
                return f"object {self.current} has no clicks on frame {frame}: nothing to clear"
            return f"cleared object {self.current} on frame {frame}{self._restore_hint()}"

    def _prompts(self) -> tuple[dict[Key, Clicks], dict[Key, Clicks], dict[Key, tuple]]:
        """The clicks a Track would use: first prompts, corrections, and both as a run records them."""
        plain = {key: edit.clicks for key, edit in self.edits.items() if not edit.refine and edit.clicks.selects}
        refine = {key: edit.clicks for key, edit in self.edits.items() if edit.refine and edit.clicks.selects}
        return plain, refine, {key: clicks.tracked_part for key, clicks in {**plain, **refine}.items()}

    def _tracked_from(self, record: RunRecord | None, snapshot: Mapping[Key, tuple]) -> bool:
        """Whether `record` was tracked from these prompts (`_prompts`' third part, which also names its
        objects) with this session's SAM backend, to the end: a Track would keep it, or bring it back (a run a
        cancel stopped, it goes on with)."""
        return record is not None and record.stopped_at is None and \
            (snapshot, self.sam.name) == (record.prompts, record.sam_backend)

    def _restore_hint(self) -> str:
        """After an Undo or a Clear that takes the prompts back to those of the kept run (see RunRecord.base)."""
        base = self.result.base if self.result is not None else None
        if not self._tracked_from(base, self._prompts()[2]):
            return ""
        return ("; Track brings back the run from before the change at once (nothing to track, unless the "
                "tracking settings changed since)")

    def drop_corners(self) -> str | None:
        """Take back boxes' first corners left pending (the user switched to points): each is drawn and would
        pair with the next box click on its frame, however long after."""
        with self.lock:
            pending = self._drop_corners()
            if not pending:
                return None
            here = (self.shown_frame, self.current)
            left = f"; {self._describe(*here, self.edits[here])}" if here in self.edits else \
                f"; object {self.current} has no clicks on frame {self.shown_frame}" if here in pending else ""
            return f"the box's first corner is dropped ({corners_named(pending)}){left}"

    def _drop_corners(self, keep: Key | None = None) -> list[Key]:
        """Take back every pending first corner but `keep`'s; the keys they were on."""
        pending = sorted(key for key, edit in self.edits.items() if edit.clicks.corner is not None and key != keep)
        for key in pending:
            edit = self.edits[key]
            edit.clicks = edit.history.pop()
            if not edit.history:
                del self.edits[key]
        return pending

    def click_wait(self, frame: int) -> str:
        """What to show while a click on `frame` waits for its mask (said before the click runs, without the
        session's lock). The click counts as made from now on: a Track pressed before its mask comes waits for it.
        """
        ahead = self.tracker.clicks_ahead()  # this page's and others': the SAM queue takes them in turn
        self._announce()
        self._sam_needed(frame)
        # On a CPU a job under way pauses between its frames for the click (`Tracker.click_work`); on a GPU the
        # click runs beside it in milliseconds.
        shared = (" A tracking job (this page's or another's) is under way on this machine's CPU: it pauses for "
                  "the click.") if self.tracker.device.type == "cpu" and self.tracker.lock.locked() else ""
        if ahead:
            shared += (f" {ahead} click{'s' if ahead > 1 else ''} made before this one (this page's or other "
                       f"users') {'are' if ahead > 1 else 'is'} segmented first.")
        if frame in self._embeddings:
            return "Segmenting…" + shared
        return (f"Segmenting: SAM's image encoder reads frame {frame} first (a moment on a GPU, seconds on a "
                f"CPU; further clicks on this frame only run its mask decoder)…{shared}")

    def clicks_waiting(self) -> bool:
        """Whether a click said on the page still waits for its mask (SAM may take seconds more on a CPU)."""
        return self.clicks_said() > 0

    def clicks_said(self) -> int:
        """How many clicks said on the page still wait for their masks (none once the page closes)."""
        with self._clicks_settled:
            if self._closing:
                return 0
            return sum(time.monotonic() - said <= CLICK_LOST_SECONDS for said in self._announced)

    def _mask(self, frame: int, object_id: int, clicks: Clicks, refine: bool) -> np.ndarray | None:
        """The mask the clicks give: a loaded mask as it is, or SAM's, refining a loaded mask or (when asked) the
        tracked one; None while they select nothing, and for a correction before any run (one loaded from a
        prompts file then gets its mask from Track)."""
        if not clicks.clicked:
            return None if clicks.mask is None else clicks.mask.pixels
        if refine and self.result is None:
            return None
        return self._segment(frame, object_id, clicks, self._prior(frame, object_id, clicks, refine))

    def _prior(self, frame: int, object_id: int, clicks: Clicks, refine: bool) -> np.ndarray | None:
        """The mask SAM refines with the clicks: a loaded one, or for a correction the tracked one."""
        if clicks.mask is not None:
            return clicks.mask.pixels
        return self._refine_base(frame, object_id) if refine else None

    def _segment(self, frame: int, object_id: int, clicks: Clicks, prior: np.ndarray | None,
                 embedding: ImageEmbedding | None = None, sam: SamBackend | None = None) -> np.ndarray:
        if embedding is None:
            embedding = self._embedding(frame)
        return self.tracker.segment(embedding, clicks.prompt(object_id, frame), sam=sam or self.sam, prior=prior)

    def _embedding(self, frame: int) -> ImageEmbedding:
        """SAM's embedding of a frame, cached so that further clicks there only run the decoder."""
        if frame in self._embeddings:
            self._embeddings.move_to_end(frame)
            return self._embeddings[frame]
        embedding = self.sam.embed(self._frame(frame).image)  # needed now: an embedding made ahead yields to it
        self._remember_embedding(frame, embedding)
        return embedding

    def _sam_needed(self, frame: int | None) -> None:
        """SAM is needed now, for a click on `frame` (None: other work): an embedding made ahead yields to it,
        unless it is that frame's or a click waits for it already."""
        if self._prefetch is not None:
            self._prefetch.yield_to(self, frame)

    def embed_ahead(self, frame: int, stop: Callable[[], bool], ahead: Callable[[], bool]) -> bool:
        """Make SAM's embedding of `frame` before a click asks for it (`tracker.prefetch`), unless a job runs,
        the page shows another frame or has the embedding; given up when `stop` says so, or for a call that
        needs SAM while `ahead()` (a click meanwhile on this frame waits for it instead). False when it is to
        be asked again: a click or a prompts file is at SAM, or other work stopped it while the page still
        shows the frame."""
        if self._closing:
            return True
        if self._pending or not self._clicking.acquire(blocking=False):
            return False
        try:
            with self.lock:
                if self.info is None or frame != self.shown_frame or frame in self._embeddings \
                        or self.job_running:
                    return True
                sam, loads = self.sam, self.video_loads
                image = self._frame(frame).image
            try:
                embedding = sam.embed(image, stop=lambda: stop() or self._closing or self.video_loads != loads,
                                      ahead=ahead)
            except EmbeddingStopped:
                return self._closing or self.video_loads != loads or frame != self.shown_frame
            with self.lock:
                if self.video_loads == loads and self.sam is sam:
                    self._remember_embedding(frame, embedding)
            return True
        finally:
            self._clicking.release()

    def _remember_embedding(self, frame: int, embedding: ImageEmbedding) -> None:
        """Keep a frame's embedding; the oldest of the others goes when there are too many, one of a frame
        without clicks first (frames only looked at must not push out those a Track will need again)."""
        self._embeddings[frame] = embedding
        self._embeddings.move_to_end(frame)
        while len(self._embeddings) > EMBEDDING_CACHE_SIZE:
            clicked = {at for at, _ in self.edits}
            others = list(self._embeddings)[:-1]
            del self._embeddings[next((at for at in others if at not in clicked), others[0])]

    def _frame(self, index: int) -> Frame:
        """A decoded frame; the last one is kept, as clicks redraw the same frame again and again."""
        if self._decoded is None or self._decoded.index != index:
            self._decoded = read_frame(self.video, index, self.info.size)
        return self._decoded

    def _describe(self, frame: int, object_id: int, edit: Edit) -> str:
        clicks = edit.clicks
        what = "correcting object" if edit.refine else "object"
        count = len(clicks.points)
        parts = (["a loaded mask"] if clicks.mask is not None else []) + \
            ([f"{count} point{'s' * (count != 1)}"]
             if count or (clicks.corner is None and not clicks.box and clicks.mask is None) else []) + \
            (["a box"] if clicks.box else []) + (["a box's first corner"] if clicks.corner is not None else [])
        text = f"{what} {object_id} on frame {frame}: {', '.join(parts)}"
        if clicks.corner is not None:
            return text + "; click the opposite corner of the box"
        if not edit.refine and clicks.mask is None and clicks.box is None and POSITIVE not in clicks.labels:
            return text + "; negative points alone select nothing: add a positive point or a box"
        return text

    def _check_frame(self, frame: int) -> VideoInfo:
        info = self.require_video()
        if problem := frame_problem(frame, info.frame_count, info.present_frames):
            raise PromptError(problem)
        return info

    @staticmethod
    def _to_frame_xy(display_xy: tuple[float, float], info: VideoInfo) -> tuple[float, float]:
        scale = display_scale(info)
        x = min(max(display_xy[0] / scale, 0.0), info.width - 1.0)
        y = min(max(display_xy[1] / scale, 0.0), info.height - 1.0)
        return x, y

    def _tracked_mask(self, frame: int, object_id: int) -> np.ndarray:
        return self._tracked_labels(frame) == object_id

    def _refine_base(self, frame: int, object_id: int) -> np.ndarray:
        """The tracked mask a correction's clicks apply on: the result's, from before its own correction there."""
        base = self.result.corrected_from.get((frame, object_id)) if self.result is not None else None
        return base if base is not None else self._tracked_mask(frame, object_id)

    def _tracked_labels(self, frame: int) -> np.ndarray:
        info = self.require_video()
        if self._result_reader is None or frame not in self._result_reader:  # not tracked (lost to damage)
            return np.zeros((info.height, info.width), dtype=np.uint8)
        labels = np.asarray(self._result_reader[frame])
        return np.where(np.isin(labels, self.objects), labels, 0).astype(np.uint8)

    # -- display ---------------------------------------------------------
    def labels(self, frame: int) -> np.ndarray:
        """The frame's object ids as the user should see them: tracked masks, overridden by clicked ones."""
        with self.lock:
            labels = self._tracked_labels(frame)
            for (edit_frame, object_id), edit in self.edits.items():
                if edit_frame == frame and edit.mask is not None:
                    labels[labels == object_id] = 0
                    labels[edit.mask] = object_id
            return labels

    def render(self, frame: int, style: Style = Style()) -> tuple[np.ndarray, float]:
        """The frame with masks, clicks and boxes drawn, at display size, and its time in seconds."""
        with self.lock:
            info = self._check_frame(frame)
            self.shown_frame = frame
            decoded = self._frame(frame)
            labels = self.labels(frame)
            clicks = {object_id: edit.clicks for (f, object_id), edit in self.edits.items() if f == frame}
            if self._prefetch is not None and self.sam.stoppable and frame not in self._embeddings \
                    and not self.job_running:
                self._prefetch.want(self, frame)
        drawn = drawn_at_display_size(decoded.image, labels, info, style)
        return draw_clicks(drawn, clicks, display_scale(info)), decoded.time

    def preview_file(self, image: np.ndarray) -> Path | None:
        """`image` written as the page's next frame picture, into this session's folder, so that it goes with the
        session (handed to the framework as pixels, each picture stayed in its cache, fetchable by its URL,
        for hours after the page closed). None once the session is closed."""
        with self.lock:  # `close` removes the folder under it: nothing lands there after
            return self._write_preview(image)

    def _write_preview(self, image: np.ndarray) -> Path | None:
        folder = self.directory / "previews"
        self._previews += 1
        try:
            folder.mkdir(exist_ok=True)  # not the session's folder: a handler finishing after the page closed
            path = folder / f"{self._previews}.webp"
            Image.fromarray(image).save(path, format="WEBP")
        except FileNotFoundError:
            return None
        (folder / f"{self._previews - PREVIEWS_KEPT}.webp").unlink(missing_ok=True)
        return path

    def _live_drawer(self, style: Style) -> Callable[[TrackedFrame], None]:
        """What a job calls with each frame it writes: once a second the frame is drawn with its masks, for the
        page to show while the job runs (`live_frame`). Skipped while a click holds the session (SAM work):
        the job does not wait on it."""
        info, drawn_at = self.info, -math.inf

        def show(tracked: TrackedFrame) -> None:
            nonlocal drawn_at
            if time.monotonic() - drawn_at < LIVE_SECONDS:
                return
            drawn_at = time.monotonic()
            picture = drawn_at_display_size(tracked.image.cpu().numpy(), tracked.labels.cpu().numpy(), info, style)
            if self.lock.acquire(blocking=False):
                try:
                    path = self._write_preview(picture)
                    if path is not None:
                        self._live = (tracked.index, path)
                finally:
                    self.lock.release()

        return show

    def live_frame(self) -> tuple[int, Path] | None:
        """The latest frame a running job drew (its index and picture), once: None until it draws another."""
        with self.lock:
            live, self._live = self._live, None
            return live

    def look_note(self, style: Style) -> str | None:
        """What to say when the opacity or outline moves away from (or back to) the tracked video's: the frame
        shows the new look at once, the video only once Track draws it again. None while a job runs, before
        a run, and for a look that was never said to differ (the status keeps the run's summary)."""
        with self.lock:
            record = self.result
            if record is None or record.options is None or self.job_running:
                return None
            differs = (style.alpha, style.outline) != (record.options.alpha, record.options.outline)
            said_it_differs, self._look_moved = self._look_moved, differs
            if not differs:
                return "The look is again that of the tracked video below." if said_it_differs else None
            if record.stopped_at is not None:  # a cancel kept part of the video: Track goes on tracking
                return ("The frame shows the new look; the tracked video below keeps the old one until Track, which "
                        f"goes on from frame {record.stopped_at}, draws it again (the frames up to it keep their "
                        "masks).")
            return ("The frame shows the new look; the tracked video below keeps the old one until Track draws it "
                    "again (its masks are kept: nothing is tracked).")

    # -- tracking --------------------------------------------------------
    def begin_job(self) -> None:
        """Mark a job as wanted (before it waits in the queue) so that Cancel can reach it."""
        with self.lock:
            self.require_video()
            self._require_idle()
            self.cancel.clear()
            self.job_running = True
            self._job_objects = None  # until the job has read its prompts

    @property
    def closed(self) -> bool:
        """The page went: its files are being removed, so what a job made has nowhere to go."""
        return self._closing

    def end_job(self) -> None:
        with self.lock:
            self._live = None
            self.job_running = False
            self._job_objects = frozenset()
            self.cancel.clear()
            self.job_ended.notify_all()

    def request_cancel(self) -> bool:
        """Stop the running job at its next frame; False when nothing runs."""
        with self.lock:
            if self.job_running:
                self.cancel.set()
            return self.job_running

    def track(self, options: TrackOptions, *, full: bool = False, progress: ProgressReport | None = None,
              sam_backend: str | None = None) -> RunRecord:
        """Track every object through the video (or re-track from the earliest change) and keep the result.

        `sam_backend`: the backend chosen on the page, taken first (its own switch may still be on its way).
        On an error nothing of this run stays, the previous result kept; so on a cancel before the run tracked a
        frame of its own. A later cancel keeps the frames done as the result (see RunRecord.stopped_at), as the
        XMem, Cutie and SAM 2 tools keep what their propagation reached.
        """
        if sam_backend is not None:
            self.set_sam_backend(sam_backend)
        self._await_clicks(progress)
        with self.lock:
            self.require_video()
            plain, refine, snapshot = self._prompts()
            # A loaded mask is tracked as the preview shows it: refined by any clicks on it.
            given = {key: self.edits[key].mask for key, clicks in plain.items() if clicks.mask is not None}
            objects = frozenset(object_id for _, object_id in snapshot)
            self._job_objects = objects
            sam = self.sam
            prompt_frames, correction_frames = [frame for frame, _ in plain], [frame for frame, _ in refine]
            previous = self.result
            same_prompts = not full and self._tracked_from(previous, snapshot)
            if same_prompts and options == previous.options:
                return replace(previous, repeated=True)
            base = previous.base if previous is not None and not full else None
            back_to_base = self._tracked_from(base, snapshot)
            if back_to_base and options == base.options:
                record = replace(base, base=replace(previous, base=None), restored=True, redrawn=False,
                                 summary=f"{self._frames_of(base)} frames, none tracked")
                self._set_result(record)
                return record
            passes = plan_passes(snapshot, correction_frames, objects, previous, full, sam.name)
            built_on = previous
            if passes[0] is None and base is not None:  # a correction taken back and another made, say
                on_base = plan_passes(snapshot, correction_frames, objects, base, full, sam.name)
                if on_base[0] is not None:
                    passes, built_on = on_base, base
            embeddings = dict(self._embeddings)  # the clicked frames' embeddings: SAM need not run on them again
            self._runs += 1
            run_dir = self.directory / "runs" / str(self._runs)
        if same_prompts and options.tracks_like(previous.options):
            return self._redraw(previous, options, run_dir, progress, previous.base)
        if back_to_base and options.tracks_like(base.options):
            return self._redraw(base, options, run_dir, progress, replace(previous, base=None), restored=True)
        if not plain:
            raise PromptError("click an object first: no object has a click or a box on any frame")
        prompts = [ObjectPrompt(object_id, frame, mask=given[frame, object_id]) if (frame, object_id) in given
                   else clicks.prompt(object_id, frame) for (frame, object_id), clicks in sorted(plain.items())]
        clock = ProgressClock(len(passes), progress or (lambda fraction, text: None), self.info.frame_count)
        if not self.tracker.lock.locked():  # else the wait for the device says the job's place in line
            clock.report(0.0, STARTING)
        run_dir.mkdir(parents=True)
        results: list[TrackResult] = []
        try:
            # One turn on the device for all the passes: a job started meanwhile comes after them, not between.
            with self.tracker.device_held(self.cancel, lambda ahead: clock.report(0.0, device_wait_line(ahead))):
                began = time.perf_counter()  # the corrections' SAM work between the passes counts too
                masks = built_on.masks if built_on is not None else None
                shown = self._live_drawer(Style(options.alpha, options.outline))
                corrected: dict[Key, np.ndarray] = {}
                # Corrections kept from the run built on (before its first pass), and the bases of those applied now.
                corrected_from = {key: base for key, base in built_on.corrected_from.items() if key[0] < passes[0]} \
                    if passes[0] is not None else {}
                for index, start in enumerate(passes):
                    if self.cancel.is_set():
                        raise Cancelled("tracking was cancelled")
                    last = index == len(passes) - 1
                    earlier = None
                    if start is not None:
                        fixes = {object_id: clicks for (frame, object_id), clicks in sorted(refine.items())
                                 if frame == start}  # by id, as the CLI takes them: the higher id wins an overlap
                        base = masks
                        if fixes:
                            # The first pass's frame holds the run built on's corrections there, if any.
                            applied = built_on.corrected_from if index == 0 else {}
                            base, fixed, bases = self._correct(masks, start, fixes, run_dir / f"corrected-{index}.zip",
                                                               sam, applied)
                            corrected.update({(start, object_id): mask for object_id, mask in fixed.items()})
                            corrected_from.update({(start, object_id): mask for object_id, mask in bases.items()})
                        earlier = PreviousRun(base, start,
                                              backward=retracks_backward(start, prompt_frames, correction_frames),
                                              corrected=tuple(sorted({f for f in correction_frames if f < start})))
                    output = run_dir / f"{self.video.stem}{TRACKED_ENDING}" if last else None
                    results.append(self.tracker.track(
                        self.video, prompts, output=output, masks=run_dir / f"masks-{index}.zip", options=options,
                        cancel=self.cancel, progress=lambda done, total, i=index: clock.update(i, done, total),
                        previous=earlier, sam=sam, embeddings=embeddings, shown=shown, keep_on_cancel=True))
                    masks = run_dir / f"masks-{index}.zip"
                    if results[-1].stopped_at is not None:
                        break
                seconds = time.perf_counter() - began
            stopped_at = results[-1].stopped_at
            # The page went (nobody to keep the frames for), or the frames written are all from before the first
            # this job changes (a previous run's), or end at that frame, whose masks are SAM's, not tracked: the
            # last result stands.
            first_changed = passes[0] if passes[0] is not None else min(prompt_frames)
            own = results[0].frames - results[0].kept_frames  # frames the first pass wrote of its own
            if stopped_at is not None and (self._closing or stopped_at < first_changed or (
                    len(results) == 1 and stopped_at == first_changed and own <= 1)):
                raise Cancelled("tracking was cancelled")
            overlay = results[-1].output
            if overlay is None:  # a pass before the last stopped: the tracked video of its frames, drawn now
                overlay = export_overlay(
                    self.video, masks, run_dir / f"{self.video.stem}{TRACKED_ENDING}", alpha=options.alpha,
                    outline=options.outline, crf=options.crf, preset=options.preset, until=stopped_at,
                    progress=lambda done, total: clock.report(
                        done / total, f"Cancelled: drawing the tracked video of frames 0 to {stopped_at} "
                                      f"({done}/{total})"))
        except BaseException:
            shutil.rmtree(run_dir, ignore_errors=True)
            raise
        final_masks = masks.rename(run_dir / f"{self.video.stem}{MASKS_ENDING}")  # downloads named after the video
        for index in range(len(passes)):
            for stale in (f"masks-{index}.zip", f"corrected-{index}.zip"):
                (run_dir / stale).unlink(missing_ok=True)
        summary = replace(combined(results), seconds=seconds).summary()
        done = passes[:len(results)]
        applied = applied_prompts(snapshot, frozenset(refine), done, stopped_at)
        corrections = frozenset(refine) & applied.keys()
        prompts_file, *mask_pictures = self._write_prompts(applied, corrections, given, run_dir)
        record = RunRecord(overlay=overlay, masks=final_masks, summary=summary,
                           warnings=list(results[-1].warnings), prompts=applied,
                           objects=frozenset(object_id for _, object_id in applied), passes=done,
                           backward=bool(passes[0]) and results[0].kept_frames == 0, options=options,
                           sam_backend=sam.name, base=replace(built_on, base=None) if passes[0] is not None else None,
                           first_prompt=min(prompt_frames), corrections=corrections,
                           prompts_file=prompts_file, mask_pictures=tuple(mask_pictures),
                           corrected_from=corrected_from, stopped_at=stopped_at,
                           mixed_settings=passes[0] is not None and (built_on.mixed_settings or
                                                                     not options.tracks_like(built_on.options)))
        if record.mixed_settings and passes[0] > 0:
            record.warnings.append(f"the frames before frame {passes[0]} keep masks that an earlier run tracked with "
                                   "other tracking settings; tick \"Full re-run\" and Track to track the whole "
                                   "video with these")
        with self.lock:  # objects added, clicked or removed during the run count
            clicked = {object_id for (_, object_id), edit in self.edits.items() if edit.clicks.selects}
            now = self._prompts()[2]
            changed = sorted(key for key in now.keys() | snapshot.keys()
                             if key[1] in objects and now.get(key) != snapshot.get(key))
            record.warnings[:0] = [
                f"object {object_id} was clicked during the run, after it began: the next Track tracks it"
                if object_id in clicked else f"object {object_id} has no click or box on any frame: it was not tracked"
                for object_id in self.objects if object_id not in objects] + [
                f"object {object_id}'s clicks on frame {frame} changed during the run, after it began: this result "
                "is without the change, the next Track takes it in" for frame, object_id in changed]
            self._set_result(record)
            for key, mask in corrected.items():
                if key in self.edits and key not in changed:  # a changed one keeps the mask of its new clicks
                    self.edits[key].mask = mask
        return record

    def _redraw(self, previous: RunRecord, options: TrackOptions, run_dir: Path, progress: ProgressReport | None,
                base: RunRecord | None, restored: bool = False) -> RunRecord:
        """Only the look changed since the last run, or since the run a change taken back was built on
        (`restored`): draw its masks again; `base` is the run kept beside the new one (see RunRecord.base)."""
        run_dir.mkdir(parents=True)
        began = time.perf_counter()
        try:
            drawn = export_overlay(
                self.video, previous.masks, run_dir / previous.overlay.name, alpha=options.alpha,
                outline=options.outline, crf=options.crf, preset=options.preset, cancel=self.cancel,
                until=previous.stopped_at, progress=None if progress is None else
                lambda done, total: progress(done / total, f"Drawing frame {done}/{total} with the new look"))
            for kept in (previous.masks, previous.prompts_file, *previous.mask_pictures):
                _link_or_copy(kept, run_dir / kept.name)  # the previous run's folder goes with it
        except BaseException:
            shutil.rmtree(run_dir, ignore_errors=True)
            raise
        seconds = time.perf_counter() - began
        warnings = [w for w in previous.warnings if w != LOSSLESS_WARNING] + [LOSSLESS_WARNING] * (options.crf == 0)
        record = replace(previous, overlay=drawn, masks=run_dir / previous.masks.name, options=options, redrawn=True,
                         restored=restored, base=base, warnings=warnings,
                         prompts_file=run_dir / previous.prompts_file.name,
                         mask_pictures=tuple(run_dir / picture.name for picture in previous.mask_pictures),
                         summary=f"{self._frames_of(previous)} frames drawn again in {seconds:.1f} s, none tracked")
        with self.lock:
            self._set_result(record)
        return record

    def frame_note(self, frame: int) -> str:
        """What the frame view adds for a frame after where a cancelled run stopped: it has no masks yet."""
        with self.lock:
            stopped = self.result.stopped_at if self.result is not None else None
        if stopped is None or frame <= stopped:
            return ""
        return f" · not tracked yet: the last run stopped after frame {stopped}"

    def _frames_of(self, record: RunRecord) -> int:
        """The frames a run's files hold: a stopped run's end where it stopped."""
        return self.info.present_frames if record.stopped_at is None else record.stopped_at + 1

    def _write_prompts(self, prompts: Mapping[Key, tuple], corrections: frozenset[Key],
                       masks: Mapping[Key, np.ndarray], run_dir: Path) -> list[Path]:
        """A run's clicks and boxes as a prompts file (frame pixels), named after the video, and its loaded masks
        (`masks`, as tracked) as pictures beside it: `--prompts` of the CLI and the app's API (the file alone,
        without masks) take it, and track it as this page did, corrections as corrections."""
        return write_prompts(run_dir / f"{self.video.stem}{PROMPTS_ENDING}", [
            ObjectPrompt(object_id, frame, mask=masks[frame, object_id]) if (frame, object_id) in masks else
            ObjectPrompt(object_id, frame, list(points), list(labels), box, correct=(frame, object_id) in corrections)
            for (frame, object_id), (points, labels, box, _) in sorted(prompts.items())],
            (self.info.width, self.info.height))

    def _await_clicks(self, progress: ProgressReport | None) -> None:
        """Let the clicks made before Track was pressed finish: SAM may still be reading their frame (seconds on a
        CPU), and the run must include them, not say that nothing changed or that nothing was clicked."""
        with self._clicks_settled:
            while not self.cancel.is_set():
                while self._announced and time.monotonic() - self._announced[0] > CLICK_LOST_SECONDS:
                    self._announced.popleft()
                if not self._announced:
                    return
                if progress is not None:
                    progress(0.0, "Waiting for the last click to be segmented…" if self._loading is None else
                             f"Waiting for the masks of {self._loading}…")
                self._clicks_settled.wait(0.5)
        raise Cancelled("tracking was cancelled")

    def track_prompts(self, upload: str | Path, prompts_json: str, limits: Limits, options: TrackOptions,
                      progress: ProgressReport | None = None) -> RunRecord:
        """A whole job in one call (the app's API): take the video, read the prompts JSON, track, keep the result.

        The prompts replace any clicks, as if the user had made them on the page.
        """
        info = self.open_video(upload, limits)  # first, so that the session owns (and later removes) the upload
        if prompts_json.strip().lower().endswith(".json"):  # a client that sent a file's name for its text
            raise PromptError(f"the prompts text {prompts_json.strip()[:80]!r} is a file name: send the file's "
                              "JSON text itself")
        prompts = prompts_from_text(prompts_json, "the prompts text")
        check_prompts(prompts, info.width, info.height, info.frame_count, info.present_frames)
        with self.lock:
            self._take_prompts(prompts, {})
            self.begin_job()
        try:
            return self.track(options, progress=progress)
        finally:
            self.end_job()

    def prompts_file_wait(self, files: str | Path | Sequence[str | Path]) -> str:
        """What to show while a prompts file waits for `load_prompts_file` (said before it runs, as `click_wait`
        says a click): a Track pressed from now on waits for the load and tracks its prompts. Refused at once
        while a job tracks the clicks it has taken (read without the lock, as `has_work` reads)."""
        self._require_prompts_unread()
        path, _ = prompts_upload(upload_paths(files))
        with self._clicks_settled:
            self._files_announced.add(str(path))
            self._announce()
        return (f"Loading prompts file {path.name}: SAM reads the frames of its prompts (a moment on a GPU, "
                "seconds a frame on a CPU)…")

    def load_prompts_file(self, files: str | Path | Sequence[str | Path], progress: ProgressReport | None = None
                          ) -> tuple[str, int]:
        """Take a prompts file (the app's download, or one written for the CLI) in place of every object and
        click, as if clicked here: the clicks of a closed tab come back. `files`: the prompts file, or it and the
        mask pictures it names, chosen together. Each prompt gets its mask, SAM's encoder running once a frame
        (outside the session's lock, as for a click). Returns what was loaded and the earliest prompt's frame,
        for the page to show.

        The prompts are taken as the CLI reads them: first prompts, masks, and corrections of the tracked masks
        (shown applied on the result of the moment, if any). A tracked result stays, and Track re-runs what
        they change. A Track pressed meanwhile waits for them.
        """
        uploads = upload_paths(files)
        try:
            path, pictures = prompts_upload(uploads)
            source = f"prompts file {path.name}"  # an upload keeps the user's file name
            with self._clicks_settled:
                if str(path) in self._files_announced:
                    self._files_announced.discard(str(path))
                else:
                    self._announce()
            try:
                # Only the pictures chosen with it, by name: a name it gives as a path reads no file of the server.
                prompts = load_prompts(path, path.name, pictures={picture.name: picture for picture in pictures})
                self._loading = source
                frames, tracked_meanwhile, unchanged = self._load_prompts(prompts, source, progress)
            finally:
                self._loading = None
                self._settled()
        finally:
            for upload in uploads:
                if self.upload_folder is not None and upload.resolve().is_relative_to(self.upload_folder):
                    upload.unlink(missing_ok=True)  # read once: the server's copy of the upload has served
        objects = sorted({prompt.object_id for prompt in prompts})
        message = (f"loaded {source}: {len(prompts)} prompt{'s' * (len(prompts) > 1)} for "
                   f"object{'s' * (len(objects) > 1)} {', '.join(map(str, objects))} on "
                   f"frame{'s' * (len(frames) > 1)} {', '.join(map(str, frames))}, in place of the clicks before; "
                   + ("the Track pressed meanwhile tracks them" if tracked_meanwhile else
                      "they are the last run's clicks, so its result stands (Track would change nothing)" if unchanged
                      else "press Track"))
        return message, frames[0]

    def _load_prompts(self, prompts: Sequence[ObjectPrompt], source: str,
                      progress: ProgressReport | None) -> tuple[list[int], bool, bool]:
        """`load_prompts_file`'s SAM work and taking the prompts; returns the prompts' frames, in order, whether
        a job waits to track them, and whether they are the last run's (a Track would keep its result)."""
        self._sam_needed(None)
        with self._clicking:  # one click at a time, and a load counts as clicks
            with self.lock:
                self._require_prompts_unread()
                info = self.require_video()
                try:
                    check_prompts(prompts, info.width, info.height, info.frame_count, info.present_frames)
                except PromptError as exc:
                    raise PromptError(f"{source} cannot be used on {self.video.name} ({info.width}x{info.height}, "
                                      f"{info.present_frames} frames): {exc}") from None
                loads = self.video_loads
            frames = sorted({prompt.frame for prompt in prompts})
            masks: dict[Key, np.ndarray] = {(p.frame, p.object_id): p.mask for p in prompts if p.mask is not None}
            clicked = sorted({prompt.frame for prompt in prompts if prompt.mask is None})  # a mask needs no SAM
            for done, frame in enumerate(clicked):
                if progress is not None:
                    progress(done / len(clicked), f"SAM reads frame {frame} ({done + 1} of {len(clicked)})")
                with self.lock:
                    if self.video_loads != loads:
                        raise ClickDropped("the video was replaced while the prompts file was loading")
                    embedding = self._embeddings.get(frame)
                    image = self._frame(frame).image if embedding is None else None
                    # A correction's preview applies on the result shown; without one, Track makes its mask.
                    priors = {p.object_id: self._refine_base(frame, p.object_id) for p in prompts
                              if p.frame == frame and p.correct and self.result is not None}
                with self.tracker.click_work():
                    if image is not None:
                        embedding = self.sam.embed(image)
                    for prompt in prompts:
                        if prompt.frame == frame and prompt.mask is None and \
                                (not prompt.correct or prompt.object_id in priors):
                            masks[frame, prompt.object_id] = self.tracker.segment(
                                embedding, prompt, sam=self.sam, prior=priors.get(prompt.object_id))
                with self.lock:
                    self._remember_embedding(frame, embedding)
            with self.lock:
                if self.video_loads != loads:
                    raise ClickDropped("the video was replaced while the prompts file was loading")
                self._require_prompts_unread()
                self._take_prompts(prompts, masks)
                return frames, self.job_running, self._tracked_from(self.result, self._prompts()[2])

    def _take_prompts(self, prompts: Sequence[ObjectPrompt], masks: Mapping[Key, np.ndarray]) -> None:
        """Make `prompts` the objects and clicks: a first prompt as clicked on a frame not tracked yet, a correction
        as clicked on a tracked mask. Each is taken as clicked box first, then point by point, so that Undo takes
        back its last point."""
        self.objects = sorted({prompt.object_id for prompt in prompts})
        self.current = self.objects[0]
        self.edits = {}
        for prompt in prompts:
            key = (prompt.frame, prompt.object_id)
            if prompt.mask is not None:
                self.edits[key] = mask_edit(prompt.mask)
                continue
            steps = [Clicks()] + [Clicks(box=prompt.box)] * (prompt.box is not None)
            for xy, label in zip(prompt.points, prompt.labels):
                steps.append(steps[-1].with_point(xy, label))
            self.edits[key] = Edit(refine=prompt.correct, clicks=steps[-1], history=steps[:-1], mask=masks.get(key))

    def _correct(self, masks: Path, frame: int, fixes: Mapping[int, Clicks], destination: Path, sam: SamBackend,
                 applied: Mapping[Key, np.ndarray]) -> tuple[Path, dict[int, np.ndarray], dict[int, np.ndarray]]:
        """A masks zip for frames 0..frame whose `frame` has the corrections applied on the tracked masks there,
        by the job's SAM backend (the session's may have changed since the job began); the corrected masks, and
        the masks they were applied on. `applied`: corrections `masks` already holds (key -> the mask before)."""
        with self.lock:  # shares the embedding cache with clicks
            embedding = self._embedding(frame) if sam is self.sam else sam.embed(self._frame(frame).image)
        fixed, bases = self.tracker.correct_masks(
            masks, frame, embedding, [clicks.prompt(object_id, frame) for object_id, clicks in fixes.items()],
            destination, sam, {object_id: mask for (at, object_id), mask in applied.items() if at == frame})
        return destination, fixed, bases

    # -- outputs ---------------------------------------------------------
    def result_files(self) -> list[str]:
        """What the user can download: the overlay video, the masks zip, the prompts file and any cut-outs of the
        last run."""
        with self.lock:
            if self.result is None:
                return []
            return [str(path) for path in (self.result.overlay, self.result.masks, self.result.prompts_file,
                                           *self.result.mask_pictures, *self.cutouts.values()) if path is not None]

    def cutout_notes(self, kind: str) -> list[str]:
        """What a cut-out of this kind cannot keep of the video (the transparent WebM: its pixel aspect, its
        fields), or which players it loses to keep it (H.264 in 4:4:4 for an odd size)."""
        with self.lock:
            info = self.info
        if info is None or kind not in CUTOUT_KINDS:
            return []
        return written_notes(info, CUTOUT_KINDS[kind].codec, exact_size=True)

    def cutout_choices(self) -> list[int]:
        """The objects a cut-out can keep: those of the last run that have not been removed since."""
        with self.lock:
            return [] if self.result is None else sorted(self.result.objects & set(self.objects))

    def export_cutout(self, object_ids: Sequence[int], kind: str,
                      progress: ProgressReport | None = None) -> Path:
        """A cut-out video of the chosen objects of the last run (see tracker.exports); `cutout_notes` says
        what it could not keep."""
        with self.lock:
            record = self.result
            if record is None:
                raise TrackerError("track the video first; the cut-out is made from the tracked masks")
            removed = sorted(set(object_ids) & record.objects - set(self.objects))
            if removed:
                raise PromptError(f"object {removed[0]} was removed since the last run; keep the others, or add "
                                  "it back and Track")
            if kind not in CUTOUT_KINDS:
                raise TrackerError(f"unknown cut-out kind {kind!r}; use one of {', '.join(CUTOUT_KINDS)}")
            folder = self.directory / "cutouts"
            folder.mkdir(exist_ok=True)
            video = self.video
        report = progress or (lambda fraction, text: None)
        path = export_cutout(video, record.masks, object_ids, folder / f"{video.stem}_{CUTOUT_KINDS[kind].filename}",
                             kind, cancel=self.cancel, until=record.stopped_at,
                             progress=lambda done, total: report(done / total, f"Cut-out: frame {done}/{total}"))
        with self.lock:
            if self.result is record:
                self.cutouts[kind] = path
        return path

    def close(self, wait: float = 30) -> None:
        """Stop any job (waiting up to `wait` s for it to let go) and remove everything the session wrote or took in."""
        self._closing = True
        self.cancel.set()
        if self._prefetch is not None:
            self._prefetch.drop(self)
        with self.lock:
            self.job_ended.wait_for(lambda: not self.job_running, timeout=wait)
            self._forget_video()
            shutil.rmtree(self.directory, ignore_errors=True)
            for upload, taken in self._uploads.items():
                # The framework stores identical uploads at one path: leave it when another session links the
                # file this one took, or when a newer upload has replaced it there.
                with contextlib.suppress(OSError):
                    now = upload.stat()
                    if (now.st_dev, now.st_ino) == taken and now.st_nlink == 1:
                        upload.unlink()
                        upload.parent.rmdir()
            self._uploads.clear()


def corners_named(keys: Sequence[Key]) -> str:
    """'object 1 on frame 3, object 2 on frame 5'."""
    return ", ".join(f"object {object_id} on frame {frame}" for frame, object_id in keys)


def drawn_at_display_size(image: np.ndarray, labels: np.ndarray, info: VideoInfo, style: Style) -> np.ndarray:
    """A frame with its masks drawn, at the size the page shows it."""
    size = display_size(info)
    image = np.array(Image.fromarray(image).resize(size, Image.BILINEAR))
    small = np.array(Image.fromarray(labels).resize(size, Image.NEAREST))
    return overlay(torch.from_numpy(image), torch.from_numpy(small), alpha=style.alpha, outline=style.outline).numpy()


def display_scale(info: VideoInfo) -> float:
    """Display pixels per frame pixel: large frames shrink, small ones grow (to be easy to click)."""
    shortest, longest = DISPLAY_LONG_SIDE
    side = max(info.width, info.height)
    return min(longest / side, max(1.0, shortest / side))


def display_size(info: VideoInfo) -> tuple[int, int]:
    scale = display_scale(info)
    return max(1, round(info.width * scale)), max(1, round(info.height * scale))


def draw_clicks(image: np.ndarray, clicks: Mapping[int, Clicks], scale: float) -> np.ndarray:
    """Points, boxes and a pending box corner drawn in display pixels, in their object's colour. A positive point
    is a disc of that colour with a white plus, a negative one a black disc ringed in it with a white minus: the
    kind of a point is never a colour, which an object may have (object 1 is red, object 2 green)."""
    picture = Image.fromarray(image)
    draw = ImageDraw.Draw(picture)
    radius = max(4, round(max(image.shape[:2]) / 100))
    ring, arm, stroke = max(2, radius // 3), radius // 2, max(2, radius // 4)
    colours = overlay_colours()
    for object_id, object_clicks in clicks.items():
        colour = tuple(int(c) for c in colours[object_id])
        if object_clicks.box is not None:
            x0, y0, x1, y1 = (v * scale for v in object_clicks.box)
            draw.rectangle((x0, y0, x1, y1), outline=colour, width=max(2, radius // 2))
            draw.rectangle((x0 + 1, y0 + 1, x1 - 1, y1 - 1), outline=(255, 255, 255), width=1)
        for (x, y), label in zip(object_clicks.points, object_clicks.labels):
            x, y = x * scale, y * scale
            disc = (x - radius, y - radius, x + radius, y + radius)
            if label == POSITIVE:
                draw.ellipse(disc, fill=colour, outline=(255, 255, 255), width=ring)
                draw.line((x, y - arm, x, y + arm), fill=(255, 255, 255), width=stroke)
            else:
                draw.ellipse(disc, fill=(0, 0, 0), outline=colour, width=ring)
            draw.line((x - arm, y, x + arm, y), fill=(255, 255, 255), width=stroke)  # the plus's bar, or the minus
        if object_clicks.corner is not None:
            x, y = (v * scale for v in object_clicks.corner)
            draw.line((x - 2 * radius, y, x + 2 * radius, y), fill=(255, 255, 255), width=2)
            draw.line((x, y - 2 * radius, x, y + 2 * radius), fill=(255, 255, 255), width=2)
    return np.asarray(picture)


def _link_or_copy(source: Path, destination: Path) -> None:
    """Hard-link when on the same file system (uploads can be large), copy otherwise."""
    destination.unlink(missing_ok=True)
    try:
        destination.hardlink_to(source)
    except OSError:
        shutil.copyfile(source, destination)


IDLE_SWEEP_SECONDS = 300  # the longest an idle session outstays `idle_seconds` with no request coming


def _duration(seconds: float) -> str:
    """4 h, 30 min, 20 s: an idle limit as a user reads it."""
    for unit, name in ((3600, "h"), (60, "min")):
        if seconds >= unit:
            return f"{seconds / unit:.3g} {name}"
    return f"{seconds:.3g} s"


class SessionStore:
    """Browser session key -> EditSession, each in a random directory under `root`.

    Sessions end when the page closes (the app calls `close`), when idle longer
    than `idle_seconds` with no job running (a page whose browser died never
    says it closed; a thread looks even while no request comes), or when the
    app stops (`close_all`).
    """

    def __init__(self, root: Path, tracker: Tracker, idle_seconds: float = 4 * 3600,
                 upload_folder: Path | None = None):
        self.root = root
        self.upload_folder = upload_folder  # where the web framework keeps uploads (each session removes its own)
        self.tracker = tracker
        self.idle_seconds = idle_seconds
        self._sessions: dict[str, EditSession] = {}
        # Keys of closed pages and ended sessions (the latest), with what their events are told: an event still
        # in flight from a closed page must not start a new session, whose folder nothing would remove until it
        # idled out, and a page left open past its session's end must not go on as an empty one.
        self._closed: OrderedDict[str, str] = OrderedDict()
        self._lock = threading.Lock()
        # On a CPU the frame each page shows is embedded while its user looks at it (`tracker.prefetch`).
        self.prefetch = EmbeddingPrefetch(tracker.lock.locked) if tracker.device.type == "cpu" else None
        root.mkdir(parents=True, exist_ok=True)
        self._stopped = threading.Event()
        threading.Thread(target=self._sweep, name="idle-sessions", daemon=True).start()

    def _sweep(self) -> None:
        while not self._stopped.wait(min(self.idle_seconds / 4, IDLE_SWEEP_SECONDS)):
            self.close_idle()

    def get(self, key: str | None, reopen: bool = False) -> EditSession:
        """The session for a key, created on first use; a closed page's key is refused, unless `reopen` (a
        script's client keeps its key across a lost connection, which ends the session)."""
        if not key:
            raise TrackerError("this request has no browser session; reload the page")
        self.close_idle()
        with self._lock:
            session = self._sessions.get(key)
            if session is None:
                if key in self._closed and not reopen:
                    raise TrackerError(self._closed[key])
                session = EditSession(self.root / secrets.token_hex(8), self.tracker, self.upload_folder,
                                      self.prefetch)
                self._sessions[key] = session
            session.last_used = time.monotonic()
            return session

    def close(self, key: str | None) -> None:
        with self._lock:
            session = self._sessions.pop(key, None) if key else None
            if key:
                self._remember_closed(key, "this page was closed; reload it")
        if session is not None:
            session.close()

    def close_idle(self) -> None:
        now = time.monotonic()
        with self._lock:
            idle = [key for key, session in self._sessions.items()
                    if not session.job_running and now - session.last_used > self.idle_seconds]
            stale = [self._sessions.pop(key) for key in idle]
            for key in idle:
                self._remember_closed(key, f"this page's session ended after {_duration(self.idle_seconds)} "
                                           "without use, and its files with it; reload the page (a prompts file "
                                           "you downloaded brings its clicks back)")
        for session in stale:
            session.close()

    def _remember_closed(self, key: str, message: str) -> None:
        self._closed[key] = message
        self._closed.move_to_end(key)
        while len(self._closed) > CLOSED_KEYS_KEPT:
            self._closed.popitem(last=False)

    def close_all(self) -> None:
        self._stopped.set()
        if self.prefetch is not None:
            self.prefetch.close()
        with self._lock:
            sessions = list(self._sessions.values())
            self._sessions.clear()
        for session in sessions:
            session.close()
        shutil.rmtree(self.root, ignore_errors=True)

    def __len__(self) -> int:
        return len(self._sessions)
