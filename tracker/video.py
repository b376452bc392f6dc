"""Video files in and out with PyAV (FFmpeg's libraries; no ffmpeg command needed).

Frames come out in display orientation (the container's rotation applied) as
8-bit RGB with their original timestamps, one at a time. `VideoWriter` puts
them back with the same timestamps, so frame count, frame rate, size and
duration of the output match the input, and copies the audio alongside.
"""
from __future__ import annotations

import bisect
import errno
import functools
import glob
import itertools
import logging
import os
import tempfile
import threading
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass, replace
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import av
import numpy as np

from .errors import VideoError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

UNSPECIFIED_COLORSPACE = 2  # AVCOL_SPC_UNSPECIFIED
HDR_TRANSFERS = {16: "PQ", 18: "HLG"}  # AVColorTransferCharacteristic: SMPTE ST 2084, ARIB STD-B67
# swscale's flags for decoded pictures: exact rounding, chroma interpolated to full width (SWS_ACCURATE_RND |
# SWS_FULL_CHR_H_INT), bilinear or (pictures scaled to another size) bicubic. Its default fast path makes the RGB
# of a YUV picture about one level darker, again each time a video goes through it (13 ms instead of 1 for
# a 1080p picture; GPU runs convert 8-bit 4:2:0 on the device, exactly, and use neither).
SWS_TO_RGB = 0x2 | 0x40000 | 0x2000
SWS_TO_RGB_SCALED = 0x4 | 0x40000 | 0x2000
SWS_TO_YUV = 0x4 | 0x40000  # RGB to be encoded: SWS_BICUBIC | SWS_ACCURATE_RND
# libx264's presets, fastest first. The default, "superfast", encodes one tracked object's
# overlay at about the rate a GPU tracks 720p (16 cores); "ultrafast" is about twice as fast
# but drops CABAC and deblocking, so its files are larger at the same crf.
X264_PRESETS = ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow")
DEFAULT_PRESET = "superfast"
X264_MAX_CRF = 51  # 8-bit H.264: 0 is lossless, 51 the coarsest

# Damaged tags must not stop the video. PyAV 19 decodes tags leniently by itself and
# no longer takes the option that PyAV 18 needs for that.
_LENIENT_TAGS = {"metadata_errors": "replace"} if int(av.__version__.split(".")[0]) < 19 else {}


@dataclass(frozen=True)
class YuvPicture:
    """An 8-bit 4:2:0 picture as planes: Y (H x W), then U and V (H/2 x W/2 each), flat as PyAV's yuv420p array.

    `rotation` is the clockwise turn (degrees) that brings it to display
    orientation; `matrix` and `full_range` say how its values map to RGB;
    `cosited` where its chroma samples sit (see `chroma_siting`).
    """

    planes: np.ndarray | torch.Tensor  # (H * 3 / 2, W) uint8: decoded on the CPU, converted on the device
    width: int
    height: int
    matrix: str = "bt709"
    full_range: bool = False
    rotation: int = 0
    cosited: tuple[bool, bool] = (False, False)  # (columns, rows): between pixel pairs (JPEG, VP9) unless so
    interlaced: bool = False  # each field has its own chroma rows


@dataclass(frozen=True)
class Join:
    """Where a recording joined to the one before it (`cat a.ts b.ts`) starts with its clock set back: its
    picture's first timestamp and where its bytes begin, and how much later its timestamps are moved."""

    first_pts: int  # the part's first picture, in the video stream's time base, as stored
    reach: int  # the part's first picture that decodes is stamped within this much after `first_pts`
    position: int  # byte offset of the part's first packet; -1 when the demuxer does not say
    after: int  # byte offset of the last video packet before it (the sound between them may be either part's)
    shift: int  # added to the part's timestamps (the video stream's time base; cumulative over the parts)
    seconds: Fraction  # the same in seconds


@dataclass(frozen=True)
class VideoInfo:
    """What the tracker needs to know about a video before decoding it.

    `width`/`height` are the display size (after rotation). `rotation` is the
    clockwise turn in degrees that decoding applies to the stored picture
    (a phone's portrait video is usually 90). `frame_count` is exact: video
    packets counted, or the container's complete index when it lists more
    (then the file is damaged and decoding stops early). `duration` runs from
    the first frame's timestamp to the last one's plus the typical frame
    interval; `fps` is frame_count / duration, exact for a constant rate.
    `truncated_to` is set for a truncated file: the frames from the start
    that it surely still holds (with B-frames one or two more may decode
    after them; the index lists `frame_count`). Where the
    index went with the cut (Matroska and WebM keep it at the end),
    `cut_short` is the length in seconds the header still declares, when
    every stream ends well before it: the frames present are all there is.
    `joins` are the points where the clock starts again (recordings joined
    end to end): the parts after them are moved to play one after the other.
    `start` is the first frame's time on the file's own clock (a broadcast
    recording's can be hours); written videos start there at 0.
    `pixel_aspect` is a displayed pixel's width over its height (anamorphic
    video: PAL widescreen 64:45, HDV 4:3); written videos keep it. `hdr`
    names a high-dynamic-range transfer ("PQ", "HLG"): written videos are
    standard range, not tone mapped (see `colour_note`). `timecode` is the
    first frame's SMPTE timecode (a camera's or an edit's), which written
    videos keep. `field_order` says which field of an interlaced video is
    shown first, as displayed ("tff" top, "bff" bottom; None for progressive
    frames): written H.264 is coded interlaced in that order. `rounded_rate`
    is the standard frame rate that a coarse clock rounds the frames' times
    of (29.97 in Matroska's milliseconds, as OBS records it): written videos
    are timed on that rate's exact grid. `variable_rate`: the frames' intervals
    differ by more than the clock's rounding (a phone in low light, a screen
    recording), so `fps` is their average; written videos keep each frame's time.
    `evenly_timed`: every interval is the typical one (no frame dropped either).
    """

    path: Path
    width: int
    height: int
    frame_count: int
    fps: Fraction
    duration: float
    time_base: Fraction
    rotation: int
    codec: str
    pix_fmt: str
    has_audio: bool
    truncated_to: int | None = None
    cut_short: float | None = None
    joins: tuple[Join, ...] = ()
    start: float = 0.0
    pixel_aspect: Fraction = Fraction(1)
    hdr: str | None = None
    timecode: str | None = None
    field_order: str | None = None
    rounded_rate: Fraction | None = None
    variable_rate: bool = False
    evenly_timed: bool = True

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) as displayed: every decoded frame's size (see `iter_frames`)."""
        return self.width, self.height

    @property
    def present_frames(self) -> int:
        """The frames whose data the file holds: all of them, unless it is truncated."""
        return self.frame_count if self.truncated_to is None else self.truncated_to


@dataclass(frozen=True)
class Frame:
    """One decoded frame: index in presentation order, picture, original timestamp.

    The picture is `image` (RGB), or with `iter_frames(..., yuv=True)` and an
    8-bit 4:2:0 stream, `yuv` (the decoded planes, converted where they are used).
    """

    index: int
    image: np.ndarray | None  # HxWx3 uint8 RGB, display orientation
    pts: int | None  # in VideoInfo.time_base
    time: float  # seconds
    yuv: YuvPicture | None = None


@dataclass(frozen=True)
class _Timeline:
    """The video packets of a file, from one demux pass (no decoding)."""

    pts: np.ndarray  # sorted presentation timestamps; empty when the container has none
    keyframes: np.ndarray  # (K, 2): presentation and decoding timestamp of each keyframe, sorted
    counted: int  # packets read
    complete: int  # packets read before the first damaged one (a cut-off last packet, say)
    declared: int  # frames the container's index lists (0 when it keeps none)
    length: Fraction  # seconds from the start of the first frame to the end of the last one
    leading: int = 0  # packets before the first keyframe, left out of the rest
    joins: tuple[Join, ...] = ()  # where the clock starts again (see `_JoinFinder`)
    # AVI keeps no presentation times: with B-frames its timestamps are decoding times, so frames are found
    # by counting from a keyframe and timed by their place in `pts`.
    decoding_order: bool = False
    open_keyframes: frozenset[int] = frozenset()  # keyframes (pts) not to count from (see `_counting_points`)
    rounded_rate: Fraction | None = None  # see `_rounded_rate`
    variable_rate: bool = False  # see `VideoInfo.variable_rate`
    evenly_timed: bool = True  # see `VideoInfo.evenly_timed`


def probe(path: str | Path) -> VideoInfo:
    """Read a video's properties, decoding only its first frame.

    Raises VideoError, with what to do, for anything the tracker cannot use.
    """
    path = Path(path)
    with _open(path) as container:
        stream = _video_stream(container, path)
        first = next(_past_frame_thread_failure(path, _decoded(container, stream, []), []), None)
        if first is None:
            raise VideoError(f"{path.name}: no frame of its video stream can be decoded; "
                             "the file is damaged (a cut that kept no keyframe, say) or uses an unsupported codec, "
                             "re-export it as H.264 MP4")
        rotation = _clockwise(first)
        height, width = (first.width, first.height) if rotation in (90, 270) else (first.height, first.width)
        codec, pix_fmt = stream.codec.canonical_name, first.format.name
        has_audio = bool(_audio_streams(container))
        stored_aspect = Fraction(stream.sample_aspect_ratio or 1)
        hdr = HDR_TRANSFERS.get(first.color_trc)
        field_order = _field_order(stream, first, rotation)
        timecode = next((value for tags in (stream.metadata, *(s.metadata for s in container.streams),
                                            container.metadata)
                         for key, value in tags.items() if key.lower() == "timecode"), None)  # Matroska: TIMECODE
        time_base = stream.time_base or Fraction(1, av.time_base)
        declared_seconds = container.duration / av.time_base if container.duration else 0.0
    timeline = _timeline_of(path)
    frame_count = max(timeline.counted, timeline.declared)
    cut_short = None
    if timeline.counted >= timeline.declared and declared_seconds - float(timeline.length) > CUT_SHORT_SECONDS:
        with _open(path) as container:  # the picture ends early: does the sound too?
            reach = _streams_end(container)
        if declared_seconds - reach > CUT_SHORT_SECONDS:
            cut_short = declared_seconds
    if timeline.joins:
        _warn_once(path, f"its clock starts again {len(timeline.joins)} time(s) (recordings joined end to end?); "
                         "the parts are timed one after the other")
    if timeline.leading:
        _warn_once(path, f"{timeline.leading} video packets come before the first keyframe (a recording cut "
                         "mid-GOP): the video starts at that keyframe")
    if timeline.counted < timeline.declared:
        _warn_once(path, f"only {timeline.complete} of the {timeline.declared} frames its index lists are present; "
                         "the file is truncated")
    fps = frame_count / timeline.length  # the average rate, exact for a constant one
    info = VideoInfo(path=path, width=width, height=height, frame_count=frame_count, fps=fps,
                     duration=float(timeline.length), time_base=Fraction(time_base), rotation=rotation, codec=codec,
                     pix_fmt=pix_fmt, has_audio=has_audio,
                     truncated_to=timeline.complete if timeline.counted < timeline.declared else None,
                     cut_short=cut_short, joins=timeline.joins,
                     start=float(timeline.pts[0] * time_base) if len(timeline.pts) else 0.0,
                     pixel_aspect=1 / stored_aspect if rotation in (90, 270) else stored_aspect, hdr=hdr,
                     timecode=timecode, field_order=field_order, rounded_rate=timeline.rounded_rate,
                     variable_rate=timeline.variable_rate, evenly_timed=timeline.evenly_timed)
    for note in (truncation_note(info) if cut_short is not None else None, hdr and colour_note(info)):
        if note:
            _warn_once(path, note)  # before a long run; its summary says it again
    return info


def _warn_once(path: Path, note: str) -> None:
    """Log a note about a video once while the file is unchanged: a job probes its video more than once."""
    _log_once(_file_version(path) or (path,), f"{path.name}: {note}")


@functools.lru_cache(maxsize=256)
def _log_once(version: tuple, message: str) -> None:
    log.warning(message)


def _file_version(path: Path) -> tuple[Path, int, int, int] | None:
    """What tells this file's content from another's without reading it (None: gone or unreadable)."""
    try:
        stat = path.stat()
    except OSError:
        return None
    return path.resolve(), stat.st_size, stat.st_mtime_ns, stat.st_ino


def truncation_note(info: VideoInfo) -> str | None:
    """What to tell the user about a truncated video (None for a whole one)."""
    if info.cut_short is not None:
        return (f"the file seems cut short or damaged (an unfinished download or copy?): its header says it lasts "
                f"{info.cut_short:.1f} s, but its frames end at {info.duration:.1f} s; the {info.frame_count} "
                "frames present are all that can be shown or tracked")
    if info.truncated_to is None:
        return None
    return (f"the file is truncated: only its first {info.truncated_to} of {info.frame_count} frames are present; "
            "the frames after them cannot be shown or tracked")


def colour_note(info: VideoInfo) -> str | None:
    """What to tell the user about colours the output cannot keep (None when it keeps them)."""
    if info.hdr is None:
        return None
    return (f"HDR video ({info.hdr}): the tracked video is standard-range BT.709 and is not tone mapped, so its "
            "highlights clip and its colours look flat")


def _streams_end(container: av.container.InputContainer) -> float:
    """Where the last packet of any stream ends, in seconds from the file's start (one demux pass)."""
    start = container.start_time / av.time_base if container.start_time else 0.0
    end = 0.0
    try:
        for packet in container.demux():
            if packet.pts is not None and packet.time_base:
                end = max(end, float((packet.pts + (packet.duration or 0)) * packet.time_base))
    except (av.FFmpegError, EOFError):
        pass
    return end - start


def iter_frames(path: str | Path, start: int = 0, stop: int | None = None, *, yuv: bool = False,
                size: tuple[int, int] | None = None) -> Iterator[Frame]:
    """Frames `start` .. `stop`-1 (all by default), decoded one at a time.

    A damaged tail ends the iteration quietly after the last good frame (a
    warning is logged); compare the count with `probe(path).frame_count`.
    Frames lost to damage in the middle leave gaps in the indices, so that an
    index names the same frame as in `read_frame` (and the app's slider).
    Starting later than frame 0 seeks to the keyframe before `start`.
    With `yuv`, 8-bit 4:2:0 frames of even size come as their planes
    (`Frame.yuv`) for conversion on the compute device; others still as RGB.
    Every frame comes at one display size, `size` (width, height; pass
    `probe`'s) or the first one's: a stream that changes size midway (joined
    recordings) has its other frames scaled to it, as FFmpeg does.
    """
    path = Path(path)
    if stop is not None and stop <= start:
        return
    with _open(path) as container:
        stream = _video_stream(container, path)
        skipped: list[int | None] = []  # packets the decoder refused, in file order (None: not known which)
        timeline = _timeline_of(path) if start or _maybe_in_decoding_order(container, stream) else None
        in_decoding_order = timeline is not None and timeline.decoding_order
        frames = _rejoined(_decoded(container, stream, skipped), path) if start == 0 else \
            _decoded_from(container, stream, path, start, skipped, timeline)
        frames = _past_frame_thread_failure(path, frames, skipped)
        fallback_rate = stream.average_rate or Fraction(25)
        time_base = stream.time_base  # the frames' own: those drained from the decoder at a cut-off end have none
        positions: dict[int, int] | None = None  # presentation timestamp -> index, read once damage shows
        # The chroma siting, read from the first frame with planes and again at a keyframe a second or more
        # later (recordings joined end to end can differ; every frame of all-intra video would cost 1 ms).
        siting: tuple[bool, bool] | None | object = _UNREAD
        sited_at = 0.0
        # The display matrix, read again only where the rotation changes: reading a frame's side data ties
        # the frame into a reference cycle, which only Python's cycle collector frees (GBs of frames pile up).
        rotation, (clockwise, mirrored) = None, (0, False)
        index = last = start - 1
        for frame in frames:
            index += 1
            if skipped and frame.pts is not None:
                positions = _positions(path) if positions is None else positions
                index = positions.get(frame.pts, index)
                if index <= last:  # after damage the decoder can let a frame out late, or again: it is dropped
                    index = index if in_decoding_order else last  # counted on from a keyframe's place there
                    continue
            if stop is not None and index >= stop:
                return
            last = index
            pts = int(timeline.pts[index]) if in_decoding_order and index < len(timeline.pts) else frame.pts
            time = float(pts * time_base) if pts is not None and time_base else float(index / fallback_rate)
            if frame.rotation != rotation:
                rotation, (clockwise, mirrored) = frame.rotation, _orientation(frame)
            turned = clockwise in (90, 270)
            shown = (frame.height, frame.width) if turned else (frame.width, frame.height)
            size = size or shown
            resized = shown != size
            if resized and path not in _RESIZED_TOLD:
                _RESIZED_TOLD.add(path)
                log.warning("%s: the picture changes size from %dx%d to %dx%d at frame %d; frames of another size "
                            "are scaled to %dx%d", path.name, *size, *shown, index, *size)
            planes = None
            if yuv and not resized and _has_planes(frame):
                if siting is _UNREAD or (frame.key_frame and time >= sited_at + 1):
                    siting, sited_at = chroma_siting(frame), time
                planes = _yuv_planes(frame, clockwise, siting, mirrored)
            if planes is not None:
                yield Frame(index, None, pts, time, planes)
            else:
                stored = (size[1], size[0]) if turned else size
                yield Frame(index, _display_rgb(frame, clockwise, stored if resized else None, mirrored), pts, time)
            if stop is not None and index + 1 >= stop:
                return


_RESIZED_TOLD: set[Path] = set()  # videos whose change of picture size was logged (once, not per frame read)


def _positions(path: Path) -> dict[int, int]:
    """Each frame's index by its presentation timestamp, from a demux pass over the whole file ({} when
    some packets have no timestamp). Timestamps in decoding order name only keyframes' places (a decoded
    picture carries its own packet's timestamp, and a keyframe is shown after every packet before it)."""
    timeline = _timeline_of(path)
    if len(timeline.pts) != timeline.counted:
        return {}
    if timeline.decoding_order:
        return {pts: place for place, pts, _ in _counting_points(timeline)}
    return {int(pts): index for index, pts in enumerate(timeline.pts)}


def _counting_points(timeline: _Timeline) -> list[tuple[int, int, int]]:
    """(frame index, pts, dts) of the keyframes that frames can be counted from, for timestamps in decoding
    order: the index is the number of packets before the keyframe, which holds where no picture after it is
    shown before it (an open GOP's keyframe is, after B-frames that a seek to it drops)."""
    places = np.searchsorted(timeline.pts, timeline.keyframes[:, 0]).tolist()
    return [(place, pts, dts) for place, (pts, dts) in zip(places, timeline.keyframes.tolist())
            if pts not in timeline.open_keyframes]


def _closes_gop(data: bytes, codec: str) -> bool:
    """Whether a keyframe's picture is an IDR one (H.264, HEVC: no picture shown before it needs one before it;
    HEVC's RADL pictures decode after a seek), read from its first slice's NAL unit type in an Annex B
    packet. Other codecs' keyframes are taken to be so."""
    if codec not in ("h264", "hevc"):
        return True
    start = data.find(b"\x00\x00\x01")
    while 0 <= start < len(data) - 3:
        header = data[start + 3]
        kind = header & 0x1F if codec == "h264" else (header >> 1) & 0x3F
        if codec == "h264" and 1 <= kind <= 5:
            return kind == 5
        if codec == "hevc" and kind < 32:
            return kind in (19, 20)  # IDR_W_RADL, IDR_N_LP
        start = data.find(b"\x00\x00\x01", start + 3)
    return False


# AVFieldOrder by the field displayed first: TT and BT show the top one first, BB and TB the bottom one.
_FIELD_SHOWN_FIRST = {2: "tff", 5: "tff", 3: "bff", 4: "bff"}


def _field_order(stream: av.VideoStream, first: av.VideoFrame, rotation: int) -> str | None:
    """The field shown first of an interlaced video as displayed ("tff", "bff"), None for progressive frames.
    A half turn swaps the fields (the top row goes to the bottom); turned a quarter the rows are no fields."""
    order = _FIELD_SHOWN_FIRST.get(stream.codec_context.field_order if stream.codec_context is not None else 0)
    if order is None and first.interlaced_frame:
        order = "tff"  # the stream does not say: HD's order
    if order is None or rotation in (90, 270):
        return None
    return {"tff": "bff", "bff": "tff"}[order] if rotation == 180 and first.height % 2 == 0 else order


def _timeline_of(path: Path) -> _Timeline:
    """The file's `_scan`, kept while the file is unchanged: probing, every preview and the tracking
    run read the same timeline, and each pass over a large file reads all of it."""
    version = _file_version(path)
    if version is None:  # gone or unreadable: `_open` says so
        return _read_timeline(path)
    return _cached_timeline(*version)


def _read_timeline(path: Path) -> _Timeline:
    with _open(path) as container:
        return _scan(container, _video_stream(container, path))


@functools.lru_cache(maxsize=16)
def _cached_timeline(path: Path, size: int, modified: int, inode: int) -> _Timeline:
    return _read_timeline(path)


def _maybe_in_decoding_order(container: av.container.InputContainer, stream: av.VideoStream) -> bool:
    """Whether the stream's timestamps may be decoding times (`_Timeline.decoding_order`, which `_scan`
    decides): AVI keeps no other, and they differ from presentation times where the decoder lets pictures
    out in another order than their packets (B-frames)."""
    return "avi" in container.format.name.split(",") and stream.codec_context is not None and \
        bool(stream.codec_context.has_b_frames)


def _rejoined(frames: Iterator[av.VideoFrame], path: Path, timeline: _Timeline | None = None
              ) -> Iterator[av.VideoFrame]:
    """Decoded frames (from the file's start) with each joined part's timestamps moved as `_scan` moves them.

    A part begins where the timestamps go back to its first picture's (or a little after it, when that
    one does not decode); the timeline is read (one demux pass) only when they first go back.
    """
    part, previous = 0, None
    for frame in frames:
        if frame.pts is not None:
            if previous is not None and frame.pts <= previous:
                timeline = timeline or _timeline_of(path)
                if part < len(timeline.joins) and \
                        0 <= frame.pts - timeline.joins[part].first_pts <= timeline.joins[part].reach:
                    part += 1
            previous = frame.pts
            if part:
                frame.pts += timeline.joins[part - 1].shift
        yield frame


def read_frame(path: str | Path, index: int, size: tuple[int, int] | None = None) -> Frame:
    """The frame `iter_frames` yields at `index`, found by seeking (exact with B-frames and VFR)."""
    frame = next(iter_frames(path, index, index + 1, size=size), None)
    if frame is None:
        raise VideoError(f"{Path(path).name}: frame {index} cannot be decoded (the video is shorter or damaged "
                         "there); choose another frame")
    return frame


# A folder of pictures is read as a video, one picture a frame in name order (a dataset's frames: DAVIS's
# JPEGImages/480p/bear/00000.jpg ...), at FFmpeg's own rate for pictures.
PICTURE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
PICTURES_RATE = 25


def _picture_pattern(folder: Path) -> str | None:
    """A glob of a folder's pictures for FFmpeg's image2 reader: those of its commonest ending (as written,
    since the match is case-sensitive); None where it holds none."""
    pictures = [p.name for p in folder.iterdir() if p.suffix.lower() in PICTURE_SUFFIXES and p.is_file()]
    endings = Counter(Path(name).suffix for name in pictures)
    if not endings:
        return None
    ending = max(sorted(endings), key=endings.__getitem__)  # a tie goes by name, not by the folder's order
    if left_out := sorted(name for name in pictures if not name.endswith(ending)):
        _say_once(folder, f"{len(left_out)} picture(s) not ending in {ending} left out of its frames "
                          f"({', '.join(left_out[:3])}{', ...' * (len(left_out) > 3)}): a folder's frames are the "
                          "pictures of its commonest ending, case included; rename them to have them all")
    stems = sorted(name[:-len(ending)] for name in pictures if name.endswith(ending))
    if all(stem.isdigit() for stem in stems) and stems != sorted(stems, key=int):
        _say_once(folder, f"its pictures are numbered without leading zeros, and frames go in name "
                          f"order ({', '.join(stems[:4])}{', ...' * (len(stems) > 4)}), not in number order; "
                          "pad the numbers with zeros (00001, 00002, ...) for that")
    return f"{glob.escape(str(folder))}/*{glob.escape(ending)}"


_said_folders: set[tuple[Path, str]] = set()  # a folder is opened several times in a run: each note said once


def _say_once(folder: Path, note: str) -> None:
    # One folder reaches here spelled several ways in a run (as the user gave it, then resolved).
    if (folder.resolve(), note) not in _said_folders:
        _said_folders.add((folder.resolve(), note))
        log.warning("%s: %s", folder, note)


def _open(path: Path) -> av.container.InputContainer:
    if path.is_dir():
        pattern = _picture_pattern(path)
        if pattern is None:
            raise VideoError(f"{path} is a folder, not a video file; give the video's own path, or a folder of "
                             f"pictures, one a frame ({', '.join(PICTURE_SUFFIXES)})")
        try:
            return av.open(pattern, "r", format="image2",
                           options={"pattern_type": "glob", "framerate": str(PICTURES_RATE)})
        except (av.FFmpegError, OSError) as exc:
            raise VideoError(f"the pictures in {path} cannot be read as frames ({exc})") from exc
    if path.exists() and not path.is_file():
        raise VideoError(f"{path} is not a file (a device or a pipe); give a video file")
    if not path.is_file():
        raise VideoError(f"{path}: no such video file; check the path")
    if path.stat().st_size == 0:
        raise VideoError(f"{path.name} is empty (0 bytes); upload or copy the video again")
    try:
        return av.open(str(path), "r", **_LENIENT_TAGS)
    except (av.FFmpegError, OSError) as exc:
        if _index_cut_off(path):
            raise VideoError(f"{path.name} is cut short: it is an MP4/MOV whose index (the 'moov' box, which it "
                             "keeps at its end) is missing or incomplete, so none of its frames can be found. The "
                             "recording, download or copy stopped early: copy or export the video again") from exc
        raise VideoError(f"{path.name} is not a video FFmpeg can read, or it is damaged; "
                         "use a common format such as MP4, MOV, MKV or WebM") from exc


def _index_cut_off(path: Path) -> bool:
    """Whether `path` is an ISO media file (MP4, MOV) with pictures ('mdat') whose index ('moov') is missing or
    runs past the end of the file: what a recording or transfer cut short leaves when the index comes last."""
    boxes, past_end = [], False
    try:
        with path.open("rb") as file:
            size = path.stat().st_size
            offset = 0
            while offset + 8 <= size and len(boxes) < 10_000:
                file.seek(offset)
                length, kind = int.from_bytes(file.read(4), "big"), file.read(4)
                if length == 1:
                    length = int.from_bytes(file.read(8), "big")
                elif length == 0:
                    length = size - offset  # the last box, to the end of the file
                if length < 8 or not kind.isalnum():
                    break
                boxes.append(kind)
                offset += length
                past_end = offset > size
    except OSError:
        return False
    return bool(boxes) and boxes[0] in (b"ftyp", b"wide", b"free", b"mdat") and b"mdat" in boxes \
        and (b"moov" not in boxes or past_end and boxes[-1] == b"moov")


def _video_stream(container: av.container.InputContainer, path: Path, frame_threads: bool = True) -> av.VideoStream:
    streams = [s for s in container.streams.video if not s.disposition & av.stream.Disposition.attached_pic]
    if not streams:
        what = "only audio" if container.streams.audio else "no video stream"
        raise VideoError(f"{path.name} has {what}; choose a file with a video track")
    # Where a file holds several, the one FFmpeg's conversions take: the largest picture, the first of equals.
    # A damaged header can leave a stream without a codec (no context): it comes last, and is refused below.
    stream = max(streams, key=lambda s: -1 if s.codec_context is None else
                 (s.codec_context.width or 0) * (s.codec_context.height or 0))
    if stream.codec_context is None:
        raise VideoError(f"{path.name} is damaged: its video stream's codec cannot be identified; "
                         "copy or export the video again")
    stream.thread_type = "AUTO" if frame_threads else "SLICE"
    return stream


class _FrameThreadsFailed(Exception):
    """The frame-threaded decoder refused a packet: it loses the frames its threads hold, often all that follow."""

    def __init__(self, last_pts: int | None):
        super().__init__(last_pts)
        self.last_pts = last_pts  # of the last frame the decoder let out


class _FramesMissing(_FrameThreadsFailed):
    """The frame-threaded decoder let out fewer frames than it took packets. PyAV returns the frames that came
    with an error and drops the error, so a failure while draining the threads (damage among the last
    packets, as many as there are threads) shows only so. Packets that make no picture (before a keyframe,
    after a seek into an open GOP) show so too."""


def _past_frame_thread_failure(path: Path, frames: Iterator[av.VideoFrame],
                               skipped: list[int | None]) -> Iterator[av.VideoFrame]:
    """`frames`, and after a frame-threaded decoder's failure on damage, the file decoded again without frame
    threads (which skip a damaged packet and go on) from the keyframe at or before the last frame the decoder
    let out (from the start in joined recordings, where a timestamp can name two frames). Frames let out
    already come again; `iter_frames` drops them (it numbers frames by timestamp then)."""
    try:
        yield from frames
        return
    except _FramesMissing as failure:
        timeline = _timeline_of(path)
        last_pts = failure.last_pts
        if last_pts is None or timeline.joins or timeline.decoding_order or not len(timeline.pts) or \
                last_pts >= timeline.pts[-1]:
            return  # nothing is missing after the last frame (or no timestamp tells)
        skipped.append(None)  # refused unseen: frames are numbered by timestamp from here on
    except _FrameThreadsFailed as failure:
        timeline, last_pts = None, failure.last_pts
    log.warning("%s: damage in the video; decoding it again from the last keyframe without frame threads",
                path.name)
    timeline = timeline or _timeline_of(path)
    if len(timeline.pts) != timeline.counted:
        return  # without timestamps the frames let out again could not be told apart
    with _open(path) as container:
        stream = _video_stream(container, path, frame_threads=False)
        if timeline.joins:
            yield from _rejoined(_decoded(container, stream, skipped), path, timeline)
            return
        if last_pts is not None:
            before = timeline.keyframes[timeline.keyframes[:, 0] <= last_pts]
            if len(before):
                container.seek(int(before[-1][1]), stream=stream, backward=True, any_frame=False)
        yield from _decoded(container, stream, skipped)


def _decoded(container: av.container.InputContainer, stream: av.VideoStream,
             skipped: list[int | None]) -> Iterator[av.VideoFrame]:
    """Decoded frames in presentation order, past damage: a packet the decoder refuses is skipped (the
    frames that follow decode with the decoder's concealment, and one may come out late), the file's end
    or a demuxer error ends it.

    The decoder still holds complete frames at the end (B-frame reordering,
    frame threads), so it is drained: a cut file keeps every frame it fully
    contains. A cut-off packet (flagged corrupt, and the last) is not decoded
    at all: with frame threads its error would also take the frames still in
    the decoder. One flagged corrupt in the middle is decoded as FFmpeg does
    (MPEG-TS flags the packet at a join of files copied end to end). The
    skipped packets' timestamps go to `skipped`. A frame-threaded decoder's
    failure raises `_FrameThreadsFailed` (see `_past_frame_thread_failure`).
    """
    decoded = sent = 0
    last_pts = None

    frame_threads = stream.codec_context is not None and \
        av.codec.context.ThreadType.FRAME in stream.codec_context.thread_type

    def decode(packet: av.Packet | None) -> list[av.VideoFrame]:
        nonlocal decoded, sent, last_pts
        try:
            frames = packet.decode() if packet is not None else stream.codec_context.decode(None)
        except av.FFmpegError:
            if packet is None:
                return []  # nothing more to recover
            skipped.append(packet.pts)
            if frame_threads:
                raise _FrameThreadsFailed(last_pts) from None
            return []
        sent += packet is not None and packet.size > 0
        decoded += len(frames)
        last_pts = next((frame.pts for frame in reversed(frames) if frame.pts is not None), last_pts)
        return frames

    held = None  # a packet flagged corrupt, decoded once a real packet follows it
    try:
        for packet in container.demux(stream):
            if held is not None:
                if packet.size:
                    yield from decode(held)
                else:  # the end of the file follows: it was cut off
                    skipped.append(held.pts)
                held = None
            if packet.is_corrupt and packet.size:
                held = packet
                continue
            yield from decode(packet)
    except (av.FFmpegError, EOFError) as exc:
        log.warning("%s: reading stopped after %d frames: %s", container.name, decoded, exc)
    if held is not None:
        skipped.append(held.pts)
    if skipped:
        log.warning("%s: %d damaged packet(s) skipped; the frames around them are kept", container.name,
                    len(skipped))
    if stream.codec_context is None:  # no decoder for the stream's codec: nothing was decoded
        return
    yield from decode(None)
    if frame_threads and decoded < sent:
        raise _FramesMissing(last_pts)


def _decoded_from(container: av.container.InputContainer, stream: av.VideoStream, path: Path,
                  index: int, skipped: list[int | None], timeline: _Timeline) -> Iterator[av.VideoFrame]:
    """Decoded frames from the one at `index` on, starting at the nearest keyframe that works.

    Frames are identified by timestamp, so B-frames and variable frame rates
    cannot shift the index; timestamps in decoding order name only keyframes,
    so there frames are counted from one. Without timestamps, with a clock that
    restarts (a timestamp can then name two frames), or when no seek lands
    before the frame, decoding starts at the beginning and counts.
    """
    if index >= timeline.counted:
        return
    if len(timeline.pts) == timeline.counted and not timeline.joins:
        seek = _counted_from_keyframe if timeline.decoding_order else _found_by_timestamp
        found = False
        for frame in seek(container, stream, timeline, index, skipped):
            found = True
            yield frame
        if found:
            return
        log.warning("%s: seeking to frame %d failed; decoding from the start", path.name, index)
    with _open(path) as fresh:
        frames = _rejoined(_decoded(fresh, _video_stream(fresh, path), skipped), path, timeline)
        yield from itertools.islice(frames, index, None)


def _seek(container: av.container.InputContainer, stream: av.VideoStream, dts: int) -> bool:
    """Seek to the keyframe with this decoding timestamp (MPEG-TS seeks past a presentation timestamp)."""
    try:
        container.seek(dts, stream=stream, backward=True, any_frame=False)
    except av.FFmpegError:
        return False
    return True


def _found_by_timestamp(container: av.container.InputContainer, stream: av.VideoStream, timeline: _Timeline,
                        index: int, skipped: list[int | None]) -> Iterator[av.VideoFrame]:
    """Frames from the one stamped as the `index`-th timestamp on, trying the three keyframes before it."""
    target = int(timeline.pts[index])
    before = timeline.keyframes[timeline.keyframes[:, 0] <= target]
    for _, dts in before[::-1][:3]:
        if not _seek(container, stream, int(dts)):
            return
        frames = _decoded(container, stream, skipped)
        for frame in frames:
            if frame.pts is None or frame.pts > target:
                break  # the target was skipped: try an earlier keyframe
            if frame.pts == target:
                yield frame
                yield from frames
                return


def _counted_from_keyframe(container: av.container.InputContainer, stream: av.VideoStream,
                           timeline: _Timeline, index: int, skipped: list[int | None]) -> Iterator[av.VideoFrame]:
    """Frames from the `index`-th on, counted from the keyframe before it, for timestamps in decoding order.
    The seek must land on that keyframe: the first picture out carries its timestamp."""
    for place, pts, dts in _counting_points(timeline)[::-1]:
        if place > index:
            continue
        if not _seek(container, stream, dts):
            return
        frames = _decoded(container, stream, skipped)
        first = next(frames, None)
        if first is not None and first.pts == pts:
            yield from itertools.islice(itertools.chain([first], frames), index - place, None)
        return


def _whole_prefix(pts: list[int], complete: int) -> int:
    """How many frames from the start, in display order, a damaged or truncated stream holds whole.

    `pts` are the packets read, in decoding order, the first `complete` of them whole. With B-frames
    decoding order runs ahead of display order, so the damaged packet, and those missing after the last
    read, may fall before frames that were read whole: the run ends at the first display position one of
    them can take. A packet missing after the last one read is displayed at most the reordering seen
    (packets decoded after frames they are shown before) ahead of its place in decoding order.
    """
    order = np.argsort(np.asarray(pts, dtype=np.int64), kind="stable")
    rank = np.empty(len(pts), dtype=np.int64)
    rank[order] = np.arange(len(pts))
    reordering = int(np.max(np.arange(len(pts)) - rank, initial=0))
    damaged = rank[complete:]  # read after the first damaged packet, it included: not whole
    return int(min(np.min(damaged, initial=len(pts)), max(len(pts) - reordering, 0)))


def _scan(container: av.container.InputContainer, stream: av.VideoStream) -> _Timeline:
    """Count the video packets and collect their timestamps: one demux pass, no decoding.

    The length runs from the first frame's timestamp to the last one's plus the
    typical frame interval; packet durations are not used because MP4 muxers
    store decoding-order gaps there. A truncated file keeps its declared length.
    Packets before the first keyframe (a recording cut mid-GOP) are not frames:
    nothing decodes them, so the video starts at that keyframe, as FFmpeg's does.
    """
    declared = sum(1 for entry in stream.index_entries if not entry.is_discard)
    pts: list[int | None] = []
    keyframes: list[tuple[int, int]] = []
    counted = 0
    complete: int | None = None
    leading: int | None = None  # packets before the first keyframe
    time_base = stream.time_base or Fraction(1, av.time_base)
    nominal = 1 / stream.average_rate if stream.average_rate else Fraction(1, 25)
    joins = _JoinFinder(time_base, max(round(nominal / time_base), 1))
    seen: list[int] = []  # each counted packet's number among all those seen (what `joins` counts in)
    maybe_in_decoding_order = _maybe_in_decoding_order(container, stream)
    codec = stream.codec_context.name if stream.codec_context is not None else ""
    open_keyframes: set[int] = set()
    try:
        for packet in container.demux(stream):
            if packet.size == 0:  # the end-of-stream marker
                continue
            joins.see(packet)
            if packet.is_corrupt and complete is None:
                complete = counted
            if packet.is_keyframe and packet.pts is not None:  # discarded ones too: a cut file starts there
                keyframes.append((packet.pts, packet.pts if packet.dts is None else packet.dts))
                leading = counted if leading is None else leading
                if maybe_in_decoding_order and not _closes_gop(bytes(packet), codec):
                    open_keyframes.add(packet.pts)
            if packet.is_discard:
                continue
            counted += 1
            pts.append(packet.pts)
            seen.append(joins.seen - 1)
    except (av.FFmpegError, EOFError) as exc:
        log.warning("%s: reading stopped after %d video packets: %s", container.name, counted, exc)
    if leading:  # none at all: a stream that does not flag its keyframes keeps every packet
        pts, seen, counted, declared = pts[leading:], seen[leading:], counted - leading, max(declared - leading, 0)
        complete = None if complete is None else max(complete - leading, 0)
    pts = [value + shift for value, shift in zip(pts, joins.shifts(seen)) if value is not None]
    if complete is not None or counted < declared:
        complete = _whole_prefix(pts, counted if complete is None else complete)
    stamped = np.asarray(pts, dtype=np.int64)
    decoding_order = maybe_in_decoding_order and len(stamped) == counted > 1 and not joins.found and \
        bool(np.all(np.diff(stamped) > 0))
    ordered = np.sort(stamped)
    if len(ordered) > 1:
        interval = int(round(float(np.median(np.diff(ordered))))) * time_base or nominal
        length = (int(ordered[-1]) - int(ordered[0])) * time_base + interval
    else:
        length = max(counted, 1) * nominal
    if counted < declared and stream.duration:
        length = max(length, stream.duration * time_base)
    # A truncated file's frames after its whole ones (B-frames' references, decoded but never shown) leave gaps
    # that are not the video's timing.
    whole = ordered if complete is None else ordered[:max(complete, 1)]
    rounded_rate = None if joins.found else _rounded_rate(whole, time_base, 1 / nominal)
    steps = np.diff(whole)
    variable_rate = _varies(steps, time_base)  # a rounded rate's jitter is within its tolerance
    evenly_timed = not _varies(steps, time_base, whole_multiples=False)
    return _Timeline(pts=ordered, keyframes=np.asarray(sorted(keyframes), dtype=np.int64).reshape(-1, 2),
                     counted=counted, complete=counted if complete is None else complete, declared=declared,
                     length=Fraction(length), leading=leading or 0, joins=tuple(joins.found),
                     decoding_order=decoding_order, open_keyframes=frozenset(open_keyframes),
                     rounded_rate=rounded_rate, variable_rate=variable_rate, evenly_timed=evenly_timed)


# The frame rates of cameras, screen recorders, webcams and broadcast, NTSC's beside their whole-number ones.
STANDARD_RATES = tuple(Fraction(rate) for rate in ("15", "24000/1001", "24", "25", "30000/1001", "30", "48", "50",
                                                   "60000/1001", "60", "100", "120000/1001", "120"))


def _rounded_rate(pts: np.ndarray, time_base: Fraction, declared: Fraction) -> Fraction | None:
    """The standard frame rate whose frame times the sorted timestamps are, each rounded to a clock tick
    that cannot hold its frame interval (29.97 in Matroska's milliseconds: 0, 33, 67, 100, ...), or None
    (a variable rate; a clock that holds the file's rate, as AVI's or a phone's 1/600 s holds 30).
    Frames missing from the grid (dropped) are allowed; most intervals must be one frame, of two ticks
    or more. Rates nearest the declared one are tried first: a short clip fits 29.97 and 30 alike."""
    if len(pts) < 3:
        return None
    steps = np.diff(pts)
    intervals = {rate: 1 / rate / time_base for rate in STANDARD_RATES}
    if any(interval.denominator == 1 and not np.any(steps % interval.numerator) for interval in intervals.values()):
        return None  # every step is a whole number of a standard rate's frames: nothing was rounded
    seconds = (pts - pts[0]).astype(np.float64) * float(time_base)
    for rate in sorted(STANDARD_RATES, key=lambda rate: abs(rate - declared)):
        if intervals[rate].denominator == 1 or intervals[rate] < 2:
            continue  # the clock holds the interval (nothing to round), or is too coarse to tell
        slots = np.round(seconds * float(rate))
        frames = np.diff(slots)
        if frames.min() >= 1 and np.median(frames) == 1 and \
                np.abs(seconds - slots / float(rate)).max() <= 1.01 * float(time_base):
            return rate
    return None


# How far a frame interval may stray from a whole number of typical ones and still be a constant rate: a
# millisecond clock's rounding, kept by a remux into a finer one (Matroska's 33/34 ms as MP4's 528/544 of 1/16000).
RATE_JITTER_SECONDS = 0.0015


def _varies(steps: np.ndarray, time_base: Fraction, whole_multiples: bool = True) -> bool:
    """Whether frame intervals (in clock ticks) vary beyond a constant rate's: a frame dropped here and there
    (an interval of two or three typical ones, unless not `whole_multiples`) and the clock's rounding do not
    count."""
    if len(steps) < 2:
        return False
    typical = float(np.median(steps))
    if typical <= 0:
        return False
    tolerance = max(1.0, RATE_JITTER_SECONDS / float(time_base))
    frames = np.maximum(np.round(steps / typical), 1) if whole_multiples else 1
    return bool(np.abs(steps - frames * typical).max() > tolerance)


class _JoinFinder:
    """Finds, packet by packet, where recordings joined end to end (`cat a.ts b.ts`) start with their clock
    set back, and moves each such part to follow the one before by one frame `step`.

    A part starts at a packet whose decoding and presentation timestamps are both behind those of the
    two packets before it (one recording's decoding timestamps only rise, and a packet shown earlier than
    both is no B-frame of theirs) and whose next packet goes on from it (after a timestamp damaged in
    transmission the next one is back on the old clock). The part's first picture is the earliest one
    among its first packets (an open GOP shows B-frames before its keyframe). FFmpeg moves only MPEG-TS
    jumps of more than 10 s and squeezes shorter ones into one instant.
    """

    OPENING = 16  # packets of a new part searched for a picture shown before its first

    def __init__(self, time_base: Fraction, step: int):
        self.time_base = time_base
        self.step = step  # one frame interval, in time_base ticks
        self.window = max(4 * step, round(Fraction(1, 2) / time_base))  # how far a part's second packet may go on
        self.found: list[Join] = []
        self.seen = 0  # packets seen
        self._starts: list[int] = []  # the number of each part's first packet
        self._shift = 0  # ticks added to the current part's timestamps
        self._recent: deque[tuple[int, int]] = deque(maxlen=16)  # (pts, dts) of the last packets, moved
        self._candidate: tuple[int, int, int, int, int, int] | None = None  # number, pts, dts, position, after, latest
        self._opening = 0  # packets of the newest part still searched for an earlier picture
        self._latest = 0  # the last picture before the newest part (moved)
        self._position = -1  # the last packet's byte offset

    def see(self, packet: av.Packet) -> None:
        number, self.seen = self.seen, self.seen + 1
        pts, dts, position = packet.pts, packet.dts, _position(packet)
        if self._candidate is not None:
            start, first_pts, first_dts, first_position, after, latest = self._candidate
            self._candidate = None
            if dts is not None and 0 < dts - first_dts <= self.window:
                self._starts.append(start)
                self.found.append(Join(first_pts, self.window, first_position, after, 0, Fraction(0)))
                self._latest, self._opening = latest, self.OPENING
                self._open_at(first_pts)
        if self._opening and pts is not None:
            self._opening -= 1
            if pts < self.found[-1].first_pts:
                self._open_at(pts)
        if pts is not None and dts is not None:
            recent = self._recent
            if len(recent) >= 2 and dts + self._shift < min(recent[-1][1], recent[-2][1]) and \
                    pts + self._shift <= min(recent[-1][0], recent[-2][0]):
                latest = sorted(p for p, _ in self._recent)[-2] + self.step  # one damaged timestamp is not it
                self._candidate = (number, pts, dts, position, self._position, latest)
            else:
                self._recent.append((pts + self._shift, dts + self._shift))
        self._position = position

    def _open_at(self, first_pts: int) -> None:
        """The newest part's first picture is stamped `first_pts`: it comes one step after the part before."""
        self._shift = self._latest + self.step - first_pts
        self.found[-1] = replace(self.found[-1], first_pts=first_pts, shift=self._shift,
                                 seconds=self._shift * self.time_base)

    def shifts(self, numbers: Sequence[int]) -> np.ndarray:
        """What to add to the timestamps of the packets with these numbers (see `seen`)."""
        part = np.searchsorted(np.asarray(self._starts, dtype=np.int64), np.asarray(numbers, dtype=np.int64),
                               side="right")
        return np.asarray([0] + [join.shift for join in self.found], dtype=np.int64)[part]


def _position(packet: av.Packet) -> int:
    return -1 if packet.pos is None else packet.pos


def _clockwise(frame: av.VideoFrame) -> int:
    """The display matrix's rotation as a clockwise quarter turn (PyAV reports counter-clockwise); a mirrored
    matrix's turn is the one that a left-right flip completes (see `_orientation`)."""
    return _orientation(frame)[0]


DISPLAYMATRIX = av.sidedata.sidedata.Type.DISPLAYMATRIX  # a frame's display matrix (rotation, mirror)


def _orientation(frame: av.VideoFrame) -> tuple[int, bool]:
    """(clockwise turn, then a left-right flip) that brings the stored picture to display, as FFmpeg's
    autorotate reads the display matrix, mirrored ones (a determinant below zero) included: av_display_rotation_get
    reads a mirror as a half turn, which would show a mirrored recording upside down."""
    clockwise = int(round(-frame.rotation / 90)) % 4 * 90
    try:
        matrix = frame.side_data.get(DISPLAYMATRIX)  # a mapping by type since PyAV 18.1.1
    except ValueError:  # PyAV cannot name some side data FFmpeg attaches (a JPEG's EXIF, say): no mirror read
        return clockwise, False
    if matrix is None or len(matrix := bytes(matrix)) < 36:
        return clockwise, False
    m = np.frombuffer(matrix[:36], dtype="<i4")
    if int(m[0]) * int(m[4]) - int(m[1]) * int(m[3]) >= 0:
        return clockwise, False  # a plain rotation
    # FFmpeg: 0 -> vflip; 90 -> transpose; 180 -> hflip or vflip; 270 -> anti-transpose. As a turn then a
    # left-right flip (a vertical flip is a half turn and a left-right flip):
    if clockwise == 0:
        return 180, True
    if clockwise == 180:
        return (0, True) if m[0] < 0 else (180, True)  # hflip, or vflip
    return clockwise, True


def _untagged_hd(frame: av.VideoFrame) -> bool:
    """No colour matrix tagged and HD: players assume BT.709 (SD: BT.601, swscale's default too). HD as mpv
    tells it: 1280 wide (a film cropped to 1280x536 is HD) or taller than PAL's 576."""
    return frame.colorspace == UNSPECIFIED_COLORSPACE and (frame.width >= 1280 or frame.height > 576)


def _display_rgb(frame: av.VideoFrame, clockwise: int, size: tuple[int, int] | None = None,
                 mirrored: bool = False) -> np.ndarray:
    """8-bit RGB turned `clockwise` (then flipped left to right where `mirrored`) into display orientation,
    whatever the stored pixel format and bit depth (scaled to the stored `size` where given)."""
    options = {"src_colorspace": "itu709"} if _untagged_hd(frame) else {}
    if size is not None:
        options.update(width=size[0], height=size[1])
    image = frame.to_ndarray(format="rgb24", interpolation=SWS_TO_RGB if size is None else SWS_TO_RGB_SCALED,
                             **options)
    turns = clockwise // 90
    image = np.rot90(image, k=-turns) if turns else image
    return np.ascontiguousarray(image[:, ::-1] if mirrored else image) if turns or mirrored else image


# Colour matrices (AVColorSpace) that the planes path converts; others go through swscale.
_PLANE_MATRICES = {1: "bt709", UNSPECIFIED_COLORSPACE: "bt601", 5: "bt601", 6: "bt601"}
_PLANE_FORMATS = {"yuv420p": False, "yuvj420p": True}  # -> full range
JPEG_RANGE = 2  # AVCOL_RANGE_JPEG


def _has_planes(frame: av.VideoFrame) -> bool:
    """Whether the frame's own planes can go to the device to be converted there (8-bit 4:2:0, even sides,
    fields of even height, a colour matrix `tracker.colour` has), not through swscale."""
    return frame.format.name in _PLANE_FORMATS and frame.colorspace in _PLANE_MATRICES and \
        not frame.width % 2 and not frame.height % (4 if frame.interlaced_frame else 2)


def _yuv_planes(frame: av.VideoFrame, clockwise: int, cosited: tuple[bool, bool] | None,
                mirrored: bool = False) -> YuvPicture | None:
    """The frame's own planes with how to turn them (`clockwise`) into RGB; None for a chroma siting that only
    swscale converts (see `chroma_siting`; an interlaced picture's chroma on its rows), and for a `mirrored`
    picture, which `_display_rgb` flips."""
    if cosited is None or frame.interlaced_frame and cosited[1] or mirrored:
        return None  # swscale's RGB (`_display_rgb`), which also mirrors
    matrix = "bt709" if _untagged_hd(frame) else _PLANE_MATRICES[frame.colorspace]
    full_range = _PLANE_FORMATS[frame.format.name] or frame.color_range == JPEG_RANGE
    return YuvPicture(frame.to_ndarray(), frame.width, frame.height, matrix, full_range, clockwise, cosited,
                      frame.interlaced_frame)


_UNREAD = object()


def chroma_siting(frame: av.VideoFrame) -> tuple[bool, bool] | None:
    """Whether the 4:2:0 frame's chroma samples sit on its even (columns, rows) rather than between pixel
    pairs, as swscale reads them from the frame's chroma location: H.264, HEVC and MPEG-2 put them on the
    columns and between the rows (unless the stream says otherwise), JPEG, VP9 and AV1 between both.
    PyAV does not show the location, so a small picture that carries the frame's tags is given one chroma
    impulse and converted; where its red goes says where the sample sits. None for a siting that only
    swscale converts (below the rows)."""
    side = 32 if (frame.width, frame.height) == (16, 16) else 16  # another size: a new picture, not the frame
    probe = frame.reformat(format="yuv420p", width=side, height=side)  # with the frame's tags
    lines = [np.full((side, side), 128, np.uint8), np.full((side // 2,) * 2, 128, np.uint8),
             np.full((side // 2,) * 2, 128, np.uint8)]
    lines[2][4, 4] = 160  # V, so red: about 57 levels at the sample, none beyond its neighbours
    for plane, values in zip(probe.planes, lines):
        padded = np.zeros((values.shape[0], plane.line_size), np.uint8)
        padded[:, :values.shape[1]] = values
        plane.update(padded.tobytes())
    probe.colorspace, probe.color_range = 1, 1
    red = probe.to_ndarray(format="rgb24", interpolation=SWS_TO_RGB)[:, :, 0].astype(int)
    red -= red[0, 0]  # the grey around the impulse
    # The sample's block is rows and columns 8 and 9. Below: the next line of its field, which an interlaced
    # picture's sample reaches 5/7 as much as its own line where a progressive one's reaches both alike;
    # a sample on a line reaches the next one half as much.
    own, right, below = red[8, 8], red[8, 9], red[10 if frame.interlaced_frame else 9, 8]
    if below > own + 2:
        return None
    return bool(own > right + 2), bool(below < 0.6 * own)


@dataclass(frozen=True)
class _Target:
    """Where one output codec goes: container format and how audio is carried."""

    format: str
    audio_copy: frozenset[str]  # audio codecs the container takes as they are
    audio_encoder: str  # what other audio is converted to


# Uncompressed audio that MOV and Matroska carry as it is (MP4 players do not take it).
_PCM = frozenset({"pcm_s16le", "pcm_s16be", "pcm_s24le", "pcm_s24be", "pcm_s32le", "pcm_s32be", "pcm_f32le", "pcm_u8"})
# Opus and FLAC are legal in MP4, but editors (Premiere, Final Cut) and older Safari refuse them there.
_MOV = _Target("mov", frozenset({"aac", "mp3", "alac", "ac3", "eac3"}) | _PCM, "aac")
_TARGETS = {
    "libx264": _Target("mp4", frozenset({"aac", "mp3", "alac", "ac3", "eac3"}), "aac"),
    "libvpx-vp9": _Target("webm", frozenset({"opus", "vorbis"}), "libopus"),
    "prores_ks": _MOV,  # ProRes 4444 with alpha in a QuickTime file: the transparent editing programs read
}
# H.264 goes in the container its file name asks for (MP4 without a known ending).
H264_CONTAINERS = {
    ".mp4": _TARGETS["libx264"],
    ".m4v": _TARGETS["libx264"],
    ".mov": _MOV,
    ".mkv": _Target("matroska", _TARGETS["libx264"].audio_copy | {"opus", "flac", "vorbis"} | _PCM, "aac"),
}

# QuickTime keeps a language only as an entry of its own table, which spells some languages with ISO 639-2's
# other code (German as "ger", not "deu"; French as "fra", not "fre"): FFmpeg leaves the other spelling out.
_MOV_LANGUAGES = {"sqi": "alb", "hye": "arm", "eus": "baq", "mya": "bur", "zho": "chi", "cze": "ces", "nld": "dut",
                  "fre": "fra", "kat": "geo", "deu": "ger", "ell": "gre", "isl": "ice", "mkd": "mac", "msa": "may",
                  "fas": "per", "rum": "ron", "slo": "slk", "bod": "tib", "cym": "wel"}

# A header declaring this much more than every stream holds: the file was cut short (a few frames' slack).
CUT_SHORT_SECONDS = 0.25

# BT.709, limited range: what players assume for untagged HD; tagged so nobody has to guess.
BT709 = 1
LIMITED_RANGE = 1


def encoder_threads(cores: int | None = None) -> int:
    """Threads for the video encoder: three quarters of the cores, the rest left to the decoder and the tracker.

    FFmpeg's default of one thread halves libx264's rate on a 16-core machine, but every core is too many
    there: beside the decoder's threads, 12 encoder threads ran 1080p file to file 6-25% faster than 16 on
    H100 hosts (720p 2-3%).
    """
    return max(1, (cores or os.cpu_count() or 1) * 3 // 4)


def _encoder_options(codec: str, crf: int, preset: str, field_order: str | None,
                     uneven: bool = False) -> dict[str, str]:
    # swscale and `colour.rgb_to_yuv420` both put chroma between pixel pairs; unsaid, H.264 is read as
    # having it on the even columns (half a pixel to the left).
    sited = {"chroma_sample_location": "center"}
    if codec == "libvpx-vp9":  # constant quality, fast enough to keep up with tracking
        return {"crf": str(crf), "b": "0", "deadline": "realtime", "cpu-used": "8", "row-mt": "1", **sited}
    if codec == "prores_ks":  # an intermediate codec: its own quality, near lossless, no rate control
        return {"profile": "4444", "vendor": "apl0"}
    # Interlaced pictures coded as such (each field's rows apart where they move), in their field order.
    fields = {"x264-params": f"{field_order}=1"} if field_order else {}
    # No B-frames where the frames' intervals differ: the decoding times (the encoder's trail the frames' times
    # by as many frames as it reorders, spaced as the first ones) then end where the video does, which is how
    # FFmpeg reads an MP4's duration.
    in_order = {"bf": "0"} if uneven else {}
    return {"crf": str(crf), "preset": preset, **sited, **fields, **in_order}


def _to_yuv(rgb: av.VideoFrame, pix_fmt: str) -> av.VideoFrame:
    """An RGB frame in the encoder's format: BT.709, limited range."""
    return rgb.reformat(format=pix_fmt, dst_colorspace="itu709", dst_color_range="MPEG", interpolation=SWS_TO_YUV)


def _yuv420_by_fields(image: np.ndarray) -> np.ndarray:
    """HxWx3 RGB (H a multiple of 4, W even) as packed yuv420p planes of an interlaced picture: each field
    converted on its own, so that its chroma comes from its own rows (a frame's would mix the two fields'
    moments: colour bleeding between them wherever something moves)."""
    height, width = image.shape[:2]
    fields = [_to_yuv(av.VideoFrame.from_ndarray(np.ascontiguousarray(image[first::2]), format="rgb24"),
                      "yuv420p").to_ndarray().reshape(-1) for first in (0, 1)]
    woven = []
    for start, end, rows in ((0, 4, height), (4, 5, height // 2), (5, 6, height // 2)):  # Y, U, V in 1/4 frames
        top, bottom = (field[start * field.size // 6:end * field.size // 6].reshape(rows // 2, -1) for field in fields)
        woven.append(np.stack([top, bottom], axis=1).reshape(rows, -1))
    return np.concatenate([plane.reshape(-1) for plane in woven]).reshape(-1, width)


def written_notes(info: VideoInfo, codec: str, exact_size: bool = False) -> list[str]:
    """What a video written with `codec` (`exact_size` as `VideoWriter`'s) cannot keep of the input's, with what
    to do, for the user to read (the writer logs them too)."""
    notes = []
    width, height = coded_size(codec, info.width, info.height, exact_size)
    if (width, height) != (info.width, info.height):
        sides = " and ".join(side for side, grown in (("column", width != info.width), ("row", height != info.height))
                             if grown)
        notes.append(f"written at {width}x{height}, the video's {info.width}x{info.height} with its last {sides} "
                     "repeated: 4:2:0 H.264, which browsers play, codes only even sides; crop it where the exact "
                     "size matters (the masks zip keeps it)")
    elif output_pix_fmt(codec, info.width, info.height, exact_size) == "yuv444p":
        notes.append(f"written as 4:4:4 H.264 (High 4:4:4 Predictive) to keep the video's odd size, "
                     f"{info.width}x{info.height} (4:2:0 codes only even sides): FFmpeg-based programs read it, "
                     "browsers and some editing programs do not")
    if info.pixel_aspect != 1 and codec == "libvpx-vp9":
        notes.append(f"written with square pixels; the video's are {info.pixel_aspect} wide to 1 high: stretch it "
                     f"to {round(info.width * info.pixel_aspect)}x{info.height} where it is used")
    if info.field_order and coded_fields(info, codec) is None:
        why = {"libvpx-vp9": "VP9 codes no fields", "prores_ks": "this ProRes codes no fields"}.get(
            codec, f"H.264 codes fields here in pictures of 4-row units, not {info.height} rows")
        notes.append(f"the interlaced video is written as progressive frames ({why}); deinterlace it where it is "
                     "used")
    return notes


def coded_fields(info: VideoInfo, codec: str) -> str | None:
    """The field order in which a written video codes the input's interlaced pictures, or None for
    progressive frames: VP9 codes no fields, and libx264's interlaced 4:2:0 pictures (each field's chroma
    made from its own rows) come in 4-row units."""
    return info.field_order if codec == "libx264" and info.height % 4 == 0 else None


def output_pix_fmt(codec: str, width: int, height: int, exact_size: bool = False) -> str:
    """The pixel format a writer uses: 4:2:0 H.264 that every browser plays, or with `exact_size` 4:4:4 H.264
    where a side is odd (4:2:0 codes only even sides); VP9 and ProRes 4444 carry alpha."""
    if codec == "libx264":
        return "yuv444p" if exact_size and (width % 2 or height % 2) else "yuv420p"
    return {"libvpx-vp9": "yuva420p", "prores_ks": "yuva444p10le"}[codec]


def coded_size(codec: str, width: int, height: int, exact_size: bool = False) -> tuple[int, int]:
    """The encoded (width, height).

    H.264 in 4:2:0 cannot code an odd width or height (chroma and cropping work
    in 2-pixel units), so an odd side gets one more row or column, a copy of the
    last one: the tracked video must play in the page, and browsers do not play
    4:4:4. With `exact_size` (cut-outs, laid over the source in editing programs)
    4:4:4 keeps the odd size. VP9 and ProRes 4444 code any size.
    """
    if output_pix_fmt(codec, width, height, exact_size) != "yuv420p":
        return width, height
    return width + width % 2, height + height % 2


class AtomicWriter:
    """`with` support for writers whose file appears only on `close()`: an error inside aborts instead."""

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class VideoWriter(AtomicWriter):
    """Encodes frames to a file that appears at `path` only once `close()` succeeds.

    Timestamps are the input's (shifted so the first frame is at 0), in the
    input's time base, so variable frame rates stay variable, and the video
    ends where the input does (see `_mux_video`). H.264 MP4s get
    `+faststart` (index before the data, so browsers start playing at once).
    Every audio track of `audio_from` (language and title kept) is copied
    packet by packet when the container takes its codec, otherwise re-encoded
    (AAC in MP4, Opus in WebM), to its own end (or, when frames are missing,
    cut where the video ends). `exact_size` keeps an odd width or height in
    H.264 (as 4:4:4, see `coded_size`). `libvpx-vp9`
    writes WebM with an alpha channel and takes RGBA images (cut-outs on a
    transparent background).

    One thread may `write` while another created the writer; calls are serialised.
    """

    def __init__(self, path: str | Path, info: VideoInfo, *, audio_from: str | Path | None = None, crf: int = 18,
                 preset: str = DEFAULT_PRESET, codec: str = "libx264", exact_size: bool = False):
        if codec not in _TARGETS:
            raise ValueError(f"unsupported codec {codec!r}; use one of {sorted(_TARGETS)}")
        self.path = Path(path)
        self.info = info
        self._exact_size = exact_size
        self._lock = threading.Lock()
        self._first_pts: int | None = None  # in the input's time base
        self._last_pts = -1  # in the output's
        rate = info.rounded_rate
        self._time_base = info.time_base if rate is None else Fraction(1, rate.numerator)
        self._frames = 0
        self._done = False
        self._container: av.container.OutputContainer | None = None
        self._audio: list[_AudioTrack] = []
        # Encoded packets waiting for the frame shown after theirs (see `_mux_video`), in decoding order, and
        # the output times of the frames written lately, in showing order (the encoder's reordering stays
        # within them).
        self._waiting: deque[av.Packet] = deque()
        self._stamps: deque[int] = deque(maxlen=256)
        target = H264_CONTAINERS.get(self.path.suffix.lower(), _TARGETS[codec]) if codec == "libx264" \
            else _TARGETS[codec]
        self._temp = temporary_path_beside(self.path)
        try:
            options = {"movflags": "+faststart"} if target.format in ("mp4", "mov") else {}
            self._container = av.open(str(self._temp), "w", format=target.format, options=options)
            self._fields = coded_fields(info, codec)
            for note in written_notes(info, codec, exact_size):
                log.warning("%s: %s", self.path.name, note)
            self._video = self._add_video(codec, _encoder_options(codec, crf, preset, self._fields,
                                                                     not info.evenly_timed))
            self._audio = _AudioTrack.all_of(Path(audio_from), self._container, target, info.joins) \
                if audio_from else []
            self._container.start_encoding()
        except BaseException as exc:
            self.abort()
            if isinstance(exc, (av.FFmpegError, OSError, ValueError)):
                raise VideoError(f"cannot start writing {self.path.name}: {exc}") from exc
            raise

    def _add_video(self, codec: str, options: dict[str, str]) -> av.VideoStream:
        rate = self.info.rounded_rate or self.info.fps.limit_denominator(1_000_000)
        stream = self._container.add_stream(codec, rate=rate, options=options)
        stream.width, stream.height = coded_size(codec, self.info.width, self.info.height, self._exact_size)
        stream.pix_fmt = output_pix_fmt(codec, self.info.width, self.info.height, self._exact_size)
        stream.codec_context.time_base = self._time_base
        stream.codec_context.colorspace = stream.codec_context.color_primaries = BT709
        stream.codec_context.color_trc = BT709
        stream.codec_context.color_range = LIMITED_RANGE
        if self.info.timecode:  # MP4 and MOV get a timecode track
            stream.metadata["timecode"] = self.info.timecode
        if self.info.pixel_aspect != 1:  # H.264 and ProRes carry it (MP4/MOV a box of their own); VP9 WebM cannot
            stream.codec_context.sample_aspect_ratio = self.info.pixel_aspect
        stream.codec_context.thread_count = encoder_threads()
        return stream

    def write(self, image: np.ndarray | YuvPicture, pts: int | None, time: float) -> None:
        """Encode one frame shown at `pts` (input time base) or `time`.

        `image` is HxWx3 RGB (or HxWx4 RGBA) uint8, or for H.264 a YuvPicture
        already in the output's format (BT.709 limited range, the coded size,
        planes in host memory), as `rgb_to_yuv420` makes on the compute device.
        """
        with self._lock:
            if self._done:
                raise VideoError(f"{self.path.name} is already closed")
            frame = self._video_frame(image)
            stamp = pts if pts is not None else round(time / self.info.time_base)
            if self._first_pts is None:
                self._first_pts = stamp
            stamp = self._output_stamp(stamp - self._first_pts)
            stamp = max(stamp, self._last_pts + 1)  # encoders need strictly rising times
            frame.pts, frame.time_base = stamp, self._time_base
            try:
                self._mux_video(self._video.encode(frame))
                for track in self._audio:
                    track.copy_until(self._seconds(stamp), self._start_seconds())
            except (av.FFmpegError, OSError) as exc:
                raise write_failed("writing", self.path, exc) from exc
            self._last_pts = stamp
            self._stamps.append(stamp)
            self._frames += 1

    def _video_frame(self, image: np.ndarray | YuvPicture) -> av.VideoFrame:
        """The encoder's frame for a picture, checked against the output's size and format."""
        if isinstance(image, YuvPicture):
            expected = (self._video.width, self._video.height, "bt709", False, 0, self._video.pix_fmt,
                        self._fields is not None)
            got = (image.width, image.height, image.matrix, image.full_range, image.rotation, "yuv420p",
                   image.interlaced)
            if got != expected:
                raise ValueError(f"expected a {expected[0]}x{expected[1]} BT.709 limited-range {expected[5]} "
                                 f"picture, interlaced {expected[6]}, got {got}")
            planes = np.ascontiguousarray(image.planes)
            if image.height % 4 == 0:  # PyAV takes the height as rows // 6 * 4, right only then
                return av.VideoFrame.from_numpy_buffer(planes, format="yuv420p")  # no copy under the GIL
            return av.VideoFrame.from_ndarray(planes, format="yuv420p")
        if image.shape[:2] != (self.info.height, self.info.width) or image.dtype != np.uint8:
            raise ValueError(f"expected a {self.info.height}x{self.info.width} uint8 image, "
                             f"got {image.shape} {image.dtype}")
        layout = "rgba" if image.shape[2] == 4 else "rgb24"
        extra_rows, extra_cols = self._video.height - image.shape[0], self._video.width - image.shape[1]
        if extra_rows or extra_cols:
            image = np.pad(image, ((0, extra_rows), (0, extra_cols), (0, 0)), mode="edge")
        if self._fields and self._video.pix_fmt == "yuv420p":  # 4:4:4 has no chroma rows shared by two fields
            return av.VideoFrame.from_ndarray(_yuv420_by_fields(image), format="yuv420p")
        return _to_yuv(av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format=layout), self._video.pix_fmt)

    def _mux_video(self, packets: list[av.Packet], end: int | None = None) -> None:
        """Mux encoded packets, each lasting until the next frame shows (`end`, the video's end in the output's
        ticks, for the last frame; a packet waits until its next frame is written, or for `close`).

        The muxers end a stream where a packet ends last (MP4: in showing order for the edit list, in decoding
        order for the track's length; Matroska: in showing order), so every packet must last exactly its
        frame's time: with the encoder's guess (1 / the stream's average rate), a variable-rate video ended
        before its last frame in an MP4, and after the input's end in a Matroska file.
        """
        self._waiting.extend(packets)
        while self._waiting:
            packet = self._waiting[0]
            after = bisect.bisect_right(self._stamps, packet.pts)  # the stamps rise
            later = self._stamps[after] if after < len(self._stamps) else end
            if later is None:
                return
            packet.duration = max(1, later - packet.pts)
            self._container.mux(self._waiting.popleft())

    def _output_stamp(self, ticks: int) -> int:
        """A time after the first frame, in the input's ticks, in the output's: on a rounded rate's exact grid
        (see `VideoInfo.rounded_rate`), one tick of 1 / its numerator seconds, frames its denominator apart."""
        rate = self.info.rounded_rate
        return ticks if rate is None else round(ticks * self.info.time_base * rate) * rate.denominator

    def _seconds(self, stamp: int) -> float:
        """An output timestamp in seconds from the first frame."""
        return float(stamp * self._time_base)

    def _start_seconds(self) -> float:
        """The first frame's time in the input, where the sound written with it begins."""
        return float((self._first_pts or 0) * self.info.time_base)

    def close(self, stopped: bool = False) -> None:
        """Flush the encoder, finish the audio, move the index to the front and rename into place.

        `stopped`: the video ends early on purpose (a cancelled job keeping the frames it did), its audio with it.
        """
        with self._lock:
            if self._done:
                return
            try:
                end = max(self._last_pts + 1, round(self._end_seconds() / self._time_base))
                self._mux_video(self._video.encode(), end)
                # The audio plays to its own end, as in the input (a voice-over may outlast the picture), also
                # past frames lost to damage; in a file cut short it stops with the last frame written.
                whole = self._frames >= self.info.frame_count or \
                    (not stopped and self.info.truncated_to is None and self.info.cut_short is None)
                audio_end = float("inf") if whole else self._end_seconds()
                for track in self._audio:
                    track.copy_until(audio_end, self._start_seconds(), final=True)
                self._container.close()
                move_into_place(self._temp, self.path)
                release_temporary(self._temp, moved=True)
            except (av.FFmpegError, OSError) as exc:
                self._discard()
                raise write_failed("finishing", self.path, exc) from exc
            except BaseException:
                self._discard()
                raise
            self._done = True

    def _end_seconds(self) -> float:
        """Where the video ends: the input's duration when every frame came, else one frame after the last."""
        if self._frames >= self.info.frame_count:
            return self.info.duration
        return self._seconds(self._last_pts) + float(1 / self.info.fps)

    def abort(self) -> None:
        """Stop and remove everything written so far (nothing appears at `path`)."""
        with self._lock:
            if not self._done:
                self._discard()

    def _discard(self) -> None:
        self._done = True
        if self._container is not None:
            try:
                self._container.close()
            except (av.FFmpegError, OSError):
                pass  # the file is deleted next; a failed trailer does not matter
        for track in self._audio:
            track.close()
        release_temporary(self._temp)


# The sampling rates AAC defines (192 kHz studio FLAC is not among them; Opus takes only 48 kHz here).
AAC_RATES = frozenset({96000, 88200, 64000, 48000, 44100, 32000, 24000, 22050, 16000, 12000, 11025, 8000, 7350})
AUDIO_BITS_PER_CHANNEL = 96_000  # per second: transparent for AAC and Opus
# Encoders reject layouts without a channel order (as Matroska stores PCM); more than 8 channels are mixed to 2.
_STANDARD_LAYOUTS = {1: "mono", 2: "stereo", 3: "3.0", 4: "quad", 5: "5.0", 6: "5.1", 7: "6.1", 8: "7.1"}


class _AudioTrack:
    """One audio stream of a file, copied or re-encoded into an output as the video advances."""

    @classmethod
    def all_of(cls, source: Path, output: av.container.OutputContainer, target: _Target,
               joins: Sequence[Join] = ()) -> list[_AudioTrack]:
        """A track for each audio stream of `source`, in its order; each reads the file on its own and moves
        its parts after joins by the picture's `joins`."""
        tracks: list[_AudioTrack] = []
        try:
            while True:
                container = _open(source)
                usable = _audio_streams(container)
                if len(usable) <= len(tracks):
                    container.close()
                    return tracks
                try:
                    tracks.append(cls(container, usable[len(tracks)], output, target, joins))
                except BaseException:
                    container.close()
                    raise
        except BaseException:
            for track in tracks:
                track.close()
            raise

    def __init__(self, container: av.container.InputContainer, source: av.AudioStream,
                 output: av.container.OutputContainer, target: _Target, joins: Sequence[Join] = ()):
        self._input = container
        self._source = source
        self._copy = self._source.codec.canonical_name in target.audio_copy
        if self._copy:
            self._stream = output.add_stream_from_template(self._source, opaque=True)
        else:
            rate = self._source.rate if target.audio_encoder == "aac" and self._source.rate in AAC_RATES else 48000
            layout = _STANDARD_LAYOUTS.get(self._source.layout.nb_channels, "stereo")
            self._stream = output.add_stream(target.audio_encoder, rate=rate, layout=layout)
            # FFmpeg's default (128 kb/s whatever the channels) is thin for lossless sources and surround.
            self._stream.bit_rate = AUDIO_BITS_PER_CHANNEL * self._stream.layout.nb_channels
        if "language" in source.metadata:
            language = source.metadata["language"]
            self._stream.metadata["language"] = _MOV_LANGUAGES.get(language, language) if target.format == "mov" \
                else language
        title = source.metadata.get("title") or source.metadata.get("name")  # MP4 and MOV read a track's as "name"
        if title:
            self._stream.metadata["title"] = title
        self._output = output
        self._packets = self._input.demux(self._source)
        self._pending: av.Packet | None = None
        self._joins = joins
        self._part = 0  # the joined part the last packet belongs to
        self._last_dts: int | None = None  # the last packet's, as stored
        self._floor: int | None = None  # the earliest (moved) decoding timestamp the next packet may have
        self._kept_end: int | None = None  # where the last packet written ends (moved)
        self._written = False
        self._preroll: av.Packet | None = None  # the last packet before a late first frame, written first
        self._damaged = False  # a damaged packet was left out (and said so)

    def copy_until(self, seconds: float, start: float, final: bool = False) -> None:
        """Write the audio before `seconds` of output time; with `final`, close the input."""
        try:
            while True:
                packet = self._pending or self._next_packet()
                self._pending = None
                if packet is None:
                    break
                if packet.pts is None:  # the end marker, or a packet that cannot be placed in time
                    continue
                if packet.is_corrupt:  # cut short (a truncated file's last) or damaged: decoders fail on it
                    if not self._damaged:
                        log.warning("%s: audio track %d has a damaged packet at %.2f s: such packets are left out",
                                    self._input.name, self._source.index, float(packet.pts * packet.time_base) - start)
                    self._damaged = True
                    continue
                begins = float(packet.pts * packet.time_base) - start
                if begins >= seconds:
                    self._pending = packet
                    break
                if start > 0 and begins + float(packet.duration * packet.time_base) <= 0:
                    self._preroll = packet  # sound before a first frame stamped late: the video starts there
                    continue
                if self._preroll is not None:  # the packet just before that frame primes the decoder (AAC's)
                    self._write(self._preroll, start)
                    self._preroll = None
                self._write(packet, start)  # earlier audio too: an AAC stream's priming packet comes first
                self._written = True
        except (av.FFmpegError, EOFError) as exc:
            log.warning("%s: audio stopped early: %s", self._input.name, exc)
            self._packets = iter(())
        if final:
            if not self._copy:
                self._output.mux(self._stream.encode(None))
            if self._preroll is not None and not self._written:
                log.warning("%s: audio track %d ends before the first frame: the output has none of it",
                            self._input.name, self._source.index)
            self.close()

    def _next_packet(self) -> av.Packet | None:
        """The next packet, moved as the picture's part it belongs to (`VideoInfo.joins`).

        A packet belongs to the part whose bytes it lies in; one between the last picture of a part and the
        next part's first keyframe, to the next part when its clock went back. Packets that would not come
        after those written (a damaged timestamp, the next part's sound overlapping a part whose sound
        outlasts its picture) are left out: the muxer takes no step back.
        """
        for packet in self._packets:
            if packet.pts is None:
                return packet
            dts = packet.pts if packet.dts is None else packet.dts
            position, part = _position(packet), self._part
            while part < len(self._joins) and 0 <= self._joins[part].position <= position:
                part += 1
            if part < len(self._joins) and position > self._joins[part].after and self._last_dts is not None \
                    and dts < self._last_dts:
                part += 1
            if part > self._part and self._kept_end is not None:
                self._floor = self._kept_end
            self._part, self._last_dts = part, dts
            shift = round(self._joins[part - 1].seconds / packet.time_base) if part else 0
            if self._floor is not None and dts + shift < self._floor:
                continue
            if shift:
                packet.pts += shift
                if packet.dts is not None:
                    packet.dts += shift
            self._floor, self._kept_end = dts + shift + 1, dts + shift + (packet.duration or 0)
            return packet
        return None

    def _write(self, packet: av.Packet, start: float) -> None:
        shift = round(start / packet.time_base)
        if self._copy:
            packet.pts -= shift
            if packet.dts is not None:
                packet.dts -= shift
            packet.stream = self._stream
            self._output.mux(packet)
            return
        for frame in packet.decode():
            frame.pts = None if frame.pts is None else frame.pts - shift
            self._output.mux(self._stream.encode(frame))

    def close(self) -> None:
        self._input.close()


def _audio_streams(container: av.container.InputContainer) -> list[av.AudioStream]:
    """The audio streams FFmpeg knows the codec and rate of (a damaged header can leave one unidentified, and
    a stream that starts late in a joined recording can go unprobed)."""
    return [s for s in container.streams.audio if s.codec_context is not None and s.rate]


TRACKED_ENDING, MASKS_ENDING = "_tracked.mp4", "_masks.zip"  # after the video's name, for outputs in a folder


def video_name(video: str | Path) -> str:
    """The name outputs are named after: a video file's name without its ending, or a folder of pictures' whole
    name (`shot.010`, not `shot`; `.` is the current folder's own name)."""
    path = Path(video)
    return path.resolve().name if path.is_dir() else path.stem


def output_file(given: str | Path | None, video: str | Path, ending: str) -> Path | None:
    """An output path as given, or for a folder (one that exists, or a name ending in a slash) the file
    `<video name><ending>` in it."""
    if given is None:
        return None
    if not str(given).strip():  # an unset shell variable, say: not the current folder
        raise VideoError(f"an output path is empty: give a file name (such as video{ending}) or a folder")
    path = Path(given)
    if str(given).endswith(("/", os.sep)) or path.is_dir():
        return path / f"{video_name(video)}{ending}"
    return path


def write_failed(doing: str, path: Path, exc: av.FFmpegError | OSError) -> VideoError:
    """The error for a failed write of `path`: a folder removed under the job (the page's session closed, the
    temporary folder cleaned) is no full disk, and is said as such."""
    if exc.errno == errno.ENOENT:
        return VideoError(f"{doing} {path.name} failed: its folder {path.parent} was removed while writing")
    return VideoError(f"{doing} {path.name} failed: {exc}; check the free disk space")


def _unwritable(path: Path, reason: object) -> VideoError:
    return VideoError(f"cannot write to {path}: {reason}; choose a folder you can write to")


def check_writable_folder(path: Path) -> None:
    """Refuse `path` before any work when its folder lies under a file or cannot be written (a missing
    folder is fine where its nearest existing ancestor is writable: it will be made)."""
    folder = path.absolute().parent
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        raise _unwritable(path, f"{existing} is a file, not a folder")
    try:  # a file made and dropped: os.access says yes to root wherever the file system would still refuse
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        raise _unwritable(path, f"no file can be made in the folder {existing} ({exc.strerror or exc})") from None


# Temporaries not yet moved into place or removed: an interrupt can land between a writer making its file and
# whoever would abort it taking hold of it, so the command line sweeps what is left here when it stops.
_unfinished: set[Path] = set()
# Folders writers made for their files, none of which has landed there yet: they go with the last temporary.
_made_folders: set[Path] = set()
# Reentrant: an interrupt in the thread that holds it sweeps under it.
_temporaries_lock = threading.RLock()
_swept = False  # the sweep ran: the process is ending


def temporary_path_beside(path: Path) -> Path:
    """An empty file next to `path`, so the final rename stays on one file system.

    Its owner calls `release_temporary` once the file is renamed into place or deleted.
    """
    with _temporaries_lock:
        if _swept:  # a writer thread starting its file after an interrupt's sweep would leave it behind
            raise VideoError(f"the run is stopping: {path.name} is not started")
        _made_folders.update(folder for folder in _normalised(path).parents if not folder.exists())
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
        except OSError as exc:
            _remove_made_folders(path)
            blocker = next((folder for folder in path.parents if folder.is_file()), None)
            raise _unwritable(path, f"{blocker} is a file, not a folder" if blocker else exc.strerror or exc) \
                from exc
        temp = Path(name)
        _unfinished.add(temp)  # before anything else can be interrupted
    os.close(handle)
    return temp


def _file_mode() -> int:
    """The mode `open` gives a new file under this process's umask (mkstemp's are private)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


_FILE_MODE = _file_mode()


def move_into_place(temp: Path, path: Path) -> None:
    """Rename a finished temporary file to `path`, with the permissions any new file of the user's gets."""
    temp.chmod(_FILE_MODE)
    os.replace(temp, path)


def release_temporary(temp: Path, *, moved: bool = False) -> None:
    """Stop tracking `temp`, deleting it unless it was `moved` into place (its name may be reused since)."""
    if moved:
        _made_folders.difference_update(_normalised(temp).parents)  # they hold a finished file now
    else:
        temp.unlink(missing_ok=True)
        _remove_made_folders(temp)
    _unfinished.discard(temp)


def _remove_made_folders(path: Path) -> None:
    """Remove the folders above `path` that a writer made, deepest first, while they are empty (another
    writer's file may still be in one: the last to go takes it)."""
    for folder in _normalised(path).parents:
        if folder not in _made_folders:
            return
        try:
            folder.rmdir()
        except FileNotFoundError:
            pass  # never made: its making failed further up
        except OSError:
            return
        _made_folders.discard(folder)


def _normalised(path: Path) -> Path:
    """The absolute path without `..` steps, as `tempfile` names its files."""
    return Path(os.path.abspath(path))


def remove_unfinished_temporaries() -> None:
    """Delete every temporary file no writer finished or aborted (after an interrupt), and start no other:
    for a process that is ending (the command line's), whose writer threads may still be opening files."""
    global _swept
    with _temporaries_lock:
        _swept = True
        for temp in list(_unfinished):
            release_temporary(temp)


def make_clip(path: Path, width: int, height: int, frames: int, fps: int = 30) -> Path:
    """An H.264 clip like camera footage: a smooth textured scene panning, a disc crossing it, an AAC tone.

    For the benchmark and the warm-up. (Random pixels would measure the encoder on content no camera records.)
    """
    yy, xx = np.mgrid[0:height, 0:width + frames * 2].astype(np.float32)
    scene = np.stack([90 + 60 * np.sin(xx / 37) + 25 * np.cos(yy / 23),
                      110 + 50 * np.sin((xx + yy) / 53) + 15 * np.sin(xx / 5.5),
                      120 + 40 * np.cos(yy / 31) + 30 * ((xx // 48 + yy // 48) % 2)], -1)
    scene = np.clip(scene, 0, 255).astype(np.uint8)
    disc_y, disc_x = np.mgrid[0:height, 0:width]
    with av.open(str(path), "w") as container:
        video = container.add_stream("libx264", rate=fps, options={"preset": "ultrafast", "crf": "20"})
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        audio = container.add_stream("aac", rate=48000)
        audio.layout = "mono"
        samples_per_frame = 48000 // fps
        for i in range(frames):
            image = scene[:, i * 2:i * 2 + width].copy()
            cx, cy = width * (0.2 + 0.6 * i / max(frames, 1)), height / 2
            image[(disc_x - cx) ** 2 + (disc_y - cy) ** 2 < (height / 6) ** 2] = (230, 60, 40)
            container.mux(video.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
            t = (np.arange(samples_per_frame) + i * samples_per_frame) / 48000
            tone = (0.2 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)[None]
            chunk = av.AudioFrame.from_ndarray(tone, format="fltp", layout="mono")
            chunk.sample_rate, chunk.pts = 48000, i * samples_per_frame
            container.mux(audio.encode(chunk))
        container.mux(video.encode())
        container.mux(audio.encode())
    return path
