"""What is made from a finished run's masks: cut-out videos, the overlay with another look, and the objects'
bounding boxes.

Cut-outs keep only the chosen objects, the background removed.

Four kinds (options.CUTOUT_KINDS): on transparency, a WebM (VP9, yuva420p)
that browsers and FFmpeg read, and a ProRes 4444 MOV that editing programs
read; an H.264 MP4 on chroma-key green for those that read no alpha; and the
objects' black-and-white matte as an H.264 MP4, which editors use as a track
matte over the original video. Each keeps the source's size, odd sides
included (H.264 then in 4:4:4). Frames and masks stream one at a time, as in
tracking.
"""
from __future__ import annotations

import csv
import logging
import threading
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch

from .errors import Cancelled, PromptError, TrackerError
from .options import CUTOUT_KINDS
from .render import MaskZipReader, cutout, overlay
from .session import check_cutout_path, check_file_output
from .video import (MASKS_ENDING, VideoInfo, VideoWriter, iter_frames, move_into_place, output_file, probe,
                    release_temporary, temporary_path_beside)

log = logging.getLogger(__name__)

BOXES_ENDING = "_boxes.csv"
BOXES_HEADER = ("frame", "object", "x", "y", "width", "height", "area")


def export_cutout(video: str | Path, masks: str | Path, object_ids: Iterable[int], output: str | Path,
                  kind: str = "transparent", *, cancel: threading.Event | None = None,
                  progress: Callable[[int, int], None] | None = None, until: int | None = None) -> Path:
    """Write the chosen objects of `video` (their masks from a run's masks zip) to `output`; audio kept.

    The file appears only once complete; on an error or cancel nothing is left. `until`: the video ends after
    that frame, its sound too (a run stopped there).
    """
    if kind not in CUTOUT_KINDS:
        raise TrackerError(f"unknown cut-out kind {kind!r}; use one of {', '.join(CUTOUT_KINDS)}")
    chosen = sorted({int(o) for o in object_ids})
    if not chosen:
        raise PromptError("choose at least one object to keep in the cut-out")
    spec = CUTOUT_KINDS[kind]
    output = output_file(output, video, f"_{spec.filename}")  # a folder: `<video name>_<kind's name>` in it
    check_cutout_path(video, masks, output, spec)
    present = np.zeros(256, dtype=bool)  # the objects seen on some frame

    def draw(image: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        present[torch.unique(labels).numpy()] = True
        return cutout(image, labels, chosen, background=spec.background)

    def check_chosen() -> None:  # before the file is kept: a cut-out of nothing is a wrong --objects
        if not present[chosen].any():
            if not present[1:].any():
                raise PromptError(f"{Path(masks).name} holds no object on any frame: the cut-out would be empty (a "
                                  "run whose objects were all lost?)")
            held = ", ".join(str(i) for i in np.flatnonzero(present[1:]) + 1)
            raise PromptError(f"{Path(masks).name} has no pixel of object{'s' * (len(chosen) > 1)} "
                              f"{', '.join(map(str, chosen))} on any frame (its objects: {held}): the cut-out "
                              "would be empty; choose objects it holds")

    return _draw_from_masks(video, masks, output, draw, "the cut-out", cancel, progress, codec=spec.codec,
                            crf=spec.crf, exact_size=True, before_keeping=check_chosen, until=until)


def boxes_named_after(masks: str | Path) -> Path:
    """What a boxes file is named after: the masks zip's name without `_masks` (clip_masks.zip: clip)."""
    masks = Path(masks)
    return masks.with_name(masks.name.removesuffix(MASKS_ENDING).removesuffix(".zip") + ".zip")


def export_boxes(masks: str | Path, output: str | Path) -> Path:
    """Each object's bounding box and area on every frame of a run's masks zip, as CSV (BOXES_HEADER): frames
    counted from 0, (x, y) the box's top-left pixel, width and height in pixels, the area the mask's pixel
    count. A frame where an object is absent has no row for it. The file appears only once complete."""
    output = output_file(output, boxes_named_after(masks), BOXES_ENDING)  # a folder: `<name>_boxes.csv` in it
    check_file_output(output, "boxes file", (".csv",), sources={"masks zip": masks})
    temp = temporary_path_beside(output)
    moved = False
    try:
        with MaskZipReader(masks) as reader, temp.open("w", newline="") as file:
            writer = csv.writer(file)
            writer.writerow(BOXES_HEADER)
            for index in reader.frames():
                labels = reader[index]
                for object_id in np.unique(labels[labels > 0]):
                    mask = labels == object_id
                    rows, columns = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
                    writer.writerow((index, int(object_id), columns[0], rows[0], columns[-1] - columns[0] + 1,
                                     rows[-1] - rows[0] + 1, int(mask.sum())))
        move_into_place(temp, output)
        moved = True
    finally:
        release_temporary(temp, moved=moved)
    return output


def export_overlay(video: str | Path, masks: str | Path, output: str | Path, *, alpha: float, outline: int,
                   crf: int, preset: str, cancel: threading.Event | None = None,
                   progress: Callable[[int, int], None] | None = None, until: int | None = None) -> Path:
    """The tracked video drawn again from a run's masks with another look or encoding: no tracking needed.
    `until`: the video ends after that frame, its sound too (a run stopped there)."""
    return _draw_from_masks(video, masks, output, lambda image, labels: overlay(image, labels, alpha=alpha,
                                                                               outline=outline),
                            "the redrawing", cancel, progress, until=until, codec="libx264", crf=crf, preset=preset)


def _draw_from_masks(video: str | Path, masks: str | Path, output: str | Path,
                     draw: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], what: str,
                     cancel: threading.Event | None, progress: Callable[[int, int], None] | None,
                     before_keeping: Callable[[], None] | None = None, until: int | None = None,
                     **writer_options) -> Path:
    """Each frame of `video` drawn with its labels from the masks zip, written to `output` with the audio."""
    info = probe(video)
    output = Path(output)
    with MaskZipReader(masks) as reader:
        held = reader.frames()
        if held and held[-1] >= info.frame_count:  # a longer video's
            raise TrackerError(f"{reader.path.name} holds masks for {held[-1] + 1} frames, and {info.path.name} "
                               f"has {info.frame_count}: use the masks zip tracked from this video")
        with VideoWriter(output, info, audio_from=info.path if info.has_audio else None, **writer_options) as writer:
            unmasked = _draw_frames(info, reader, writer, draw, what, cancel, progress, until)
            if before_keeping is not None:  # raised here, the writer removes its unfinished file
                before_keeping()
            writer.close(stopped=until is not None)
    if unmasked:
        log.warning("%s holds no masks for %d of the %d frames of %s (%s): %s shows them with no object; a "
                    "run that tracks them gives them masks", reader.path.name, len(unmasked), info.frame_count,
                    info.path.name, _frame_spans(unmasked), output.name)
    return output


def _frame_spans(indices: list[int]) -> str:
    """Rising frame indices as runs: `frames 3, 7 to 9`."""
    spans, start = [], indices[0]
    for previous, index in zip(indices, indices[1:] + [None]):
        if index != previous + 1:
            spans.append(str(start) if start == previous else f"{start}, {previous}" if previous == start + 1
                         else f"{start} to {previous}")
            start = index
    return f"frame{'s' * (len(indices) > 1)} {', '.join(spans)}"


def _draw_frames(info: VideoInfo, reader: MaskZipReader, writer: VideoWriter,
                 draw: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], what: str,
                 cancel: threading.Event | None, progress: Callable[[int, int], None] | None,
                 until: int | None = None) -> list[int]:
    """Each frame drawn with its labels into `writer` (up to frame `until` where given), a frame the zip has no
    mask for with none (a run's zip skips only frames the video lost, which do not decode here either); a cancel
    is seen between frames. Returns the frames drawn without a mask."""
    unmasked = []
    total = info.frame_count if until is None else min(until + 1, info.frame_count)
    for frame in iter_frames(info.path, size=info.size):
        if until is not None and frame.index > until:
            break
        if cancel is not None and cancel.is_set():
            raise Cancelled(f"{what} was cancelled")
        if frame.index in reader:
            labels = reader[frame.index]
        else:
            labels = np.zeros(frame.image.shape[:2], np.uint8)
            unmasked.append(frame.index)
        if labels.shape != frame.image.shape[:2]:
            raise TrackerError(f"{reader.path.name} holds {labels.shape[1]}x{labels.shape[0]} masks, and "
                               f"{info.path.name} is {info.width}x{info.height}: use the masks zip tracked "
                               "from this video")
        picture = draw(torch.from_numpy(frame.image), torch.from_numpy(labels))
        writer.write(picture.numpy(), frame.pts, frame.time)
        if progress is not None:
            progress(frame.index + 1, total)
    return unmasked
