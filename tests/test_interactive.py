"""The web app's editing logic without a browser: clicks, previews, objects, corrections, re-tracking, sessions.

SAM is replaced by `DiscSam` (a disc around each click, exactly predictable and
instant); XMem, the video I/O and the writers are the real ones on the CPU
with untrained weights.
"""
from __future__ import annotations

import json
import copy
import re
import shutil
import threading
import time
import zipfile
from dataclasses import replace
from fractions import Fraction
from pathlib import Path
from typing import Callable

import av
import numpy as np
import pytest
import torch
from PIL import Image

from media import make_clip, slowed, truncated_copy
from tracker.errors import Cancelled, ClickDropped, PromptError, TrackerError, VideoError
from tracker.interactive import (PREVIEWS_KEPT, Clicks, EditSession, Limits, ProgressClock, RunRecord, SessionStore,
                                 Style, device_wait_line, display_scale, display_size, draw_clicks, format_seconds,
                                 frame_caption, plan_passes, upload_message)
from tracker.options import TrackOptions
from tracker.prefetch import EmbeddingPrefetch
from tracker.session import LOSSLESS_WARNING, retracks_backward
from tracker.prompts import ObjectPrompt, load_prompts, prompts_to_text
from tracker.render import (CHROMA_GREEN, MaskZipReader, MaskZipWriter, copy_masks_until, overlay,
                           overlay_colours)
from tracker.sam import (ImageEmbedding, SamBackend, SamPrediction, mask_to_logits, resized_shape, stop_point,
                         to_frame_coords, upscale_masks)
from tracker.video import VideoInfo, iter_frames, probe, read_frame

W, H, FRAMES = 160, 120, 8
RADIUS = 12
OPTIONS = TrackOptions(size=0)


class DiscSam(SamBackend):
    """A stand-in for SAM: the prior mask, plus discs at positive clicks and the box, minus discs at negative ones."""

    name = "disc"

    def __init__(self):
        self.embedded: list[tuple[int, ...]] = []

    def _embed(self, image: np.ndarray) -> ImageEmbedding:
        self.embedded.append(image.shape)
        height, width = image.shape[:2]
        return ImageEmbedding(torch.zeros(1, 256, 64, 64), (height, width), resized_shape(height, width))

    def _decode(self, emb, prompt, multimask: bool) -> SamPrediction:
        height, width = emb.original_size
        yy, xx = np.mgrid[0:height, 0:width]
        mask = np.zeros((height, width), bool)
        if prompt.mask_input is not None:
            logits = upscale_masks(torch.from_numpy(prompt.mask_input)[None], emb.input_size, emb.original_size)
            mask = logits[0, 0].numpy() > 0
        if prompt.box is not None:
            (x0, y0), (x1, y1) = to_frame_coords(prompt.box.reshape(2, 2), emb.original_size)
            mask |= (xx >= x0) & (xx <= x1) & (yy >= y0) & (yy <= y1)
        for (x, y), label in zip(to_frame_coords(prompt.points, emb.original_size), prompt.labels):
            disc = (xx - x) ** 2 + (yy - y) ** 2 <= RADIUS ** 2
            mask = mask | disc if label == 1 else mask & ~disc
        count = 3 if multimask else 1
        return SamPrediction(np.repeat(mask[None], count, 0), np.linspace(0.9, 0.5, count, dtype=np.float32),
                             np.zeros((count, 256, 256), np.float32))


def disc(x: float, y: float, shape=(H, W), radius=RADIUS) -> np.ndarray:
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    return (xx - x) ** 2 + (yy - y) ** 2 <= radius ** 2


@pytest.fixture(scope="module")
def disc_tracker(cpu_tracker):
    """The real CPU tracker (XMem, writers) with DiscSam in place of SAM."""
    tracker = copy.copy(cpu_tracker)
    tracker.sam = DiscSam()
    return tracker


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    return make_clip(tmp_path_factory.mktemp("clips") / "clip.mp4", frames=FRAMES, width=W, height=H)


@pytest.fixture
def session(tmp_path, disc_tracker, clip) -> EditSession:
    edit = EditSession(tmp_path / "session", disc_tracker)
    edit.open_video(clip, Limits())
    return edit


def to_display(session: EditSession, x: float, y: float) -> tuple[float, float]:
    scale = display_scale(session.info)
    return x * scale, y * scale


def click(session: EditSession, frame: int, x: float, y: float, mode: str = "positive") -> str:
    return session.click(frame, to_display(session, x, y), mode)


def info_of(width: int, height: int, frames: int = 10, seconds: float = 1.0) -> VideoInfo:
    return VideoInfo(Path("x.mp4"), width, height, frames, Fraction(10), seconds, Fraction(1, 1000), 0, "h264",
                     "yuv420p", False)


# -- pure helpers ------------------------------------------------------------

@pytest.mark.parametrize("height, width", [(120, 160), (480, 270), (1080, 1920)])
def test_mask_to_logits_round_trips_through_sams_upscaling(height, width):
    mask = disc(width * 0.4, height * 0.6, (height, width), radius=min(height, width) / 4)
    logits = mask_to_logits(mask)
    assert logits.shape == (1, 256, 256) and logits.dtype == np.float32
    assert logits.max() == pytest.approx(10) and logits.min() == pytest.approx(-10)
    back = upscale_masks(torch.from_numpy(logits)[None], resized_shape(height, width), (height, width))[0, 0] > 0
    iou = (back.numpy() & mask).sum() / (back.numpy() | mask).sum()
    assert iou > 0.93
    # The padding beyond the resized frame is background.
    rows, cols = (np.array(resized_shape(height, width)) + 3) // 4
    assert (logits[0, rows:, :] < 0).all() and (logits[0, :, cols:] < 0).all()


def test_clicks_accumulate_points_and_make_boxes_from_two_corners():
    clicks = Clicks().with_point((5, 6), 1).with_point((7, 8), 0)
    assert clicks.points == ((5, 6), (7, 8)) and clicks.labels == (1, 0) and clicks.selects
    corner = clicks.with_corner((50, 10))
    assert corner.corner == (50, 10) and corner.box is None
    boxed = corner.with_corner((20, 40))
    assert boxed.box == (20, 10, 50, 40) and boxed.corner is None
    assert boxed.prompt(3, 4).box == (20, 10, 50, 40) and boxed.prompt(3, 4).frame == 4
    assert Clicks().with_corner((1, 1)).selects is False
    with pytest.raises(PromptError, match="opposite corners"):
        Clicks().with_corner((10, 10)).with_corner((10, 30))


def record(prompts: dict, objects=None, first_prompt: int | None = None) -> RunRecord:
    return RunRecord(Path("v.mp4"), Path("m.zip"), "", [], prompts,
                     frozenset(objects if objects is not None else {o for _, o in prompts}),
                     first_prompt=min(frame for frame, _ in prompts) if first_prompt is None else first_prompt)


def test_plan_passes():
    a, b, c = ("a",), ("b",), ("c",)
    everything = frozenset({1, 2})
    # No previous run, or asked for: the whole video, then each corrected frame on top.
    assert plan_passes({(0, 1): a}, [], frozenset({1}), None, full=False) == [None]
    assert plan_passes({(0, 1): a, (9, 1): b}, [9], frozenset({1}), record({(0, 1): a}), full=True) == [None, 9]
    last = record({(0, 1): a, (3, 2): b})
    # From the earliest change; later corrections get their own pass, earlier ones are kept as they are.
    assert plan_passes({(0, 1): a, (3, 2): b, (7, 1): c}, [7], everything, last, full=False) == [7]
    assert plan_passes({(0, 1): a, (3, 2): c, (7, 1): c, (2, 1): c}, [2, 7], everything,
                       record({(0, 1): a, (3, 2): b, (7, 1): c, (2, 1): c}), full=False) == [3, 7]
    # A prompt taken away: the last run's masks still hold it, so the whole video again (also for another backend).
    assert plan_passes({(0, 1): a, (3, 2): b}, [], everything, record({(0, 1): a, (3, 2): b, (5, 1): c}),
                       full=False) == [None]
    assert plan_passes({(0, 1): a, (3, 2): b, (7, 1): c}, [7], everything, last, full=False, sam_backend="onnx") \
        == [None, 7]
    # A new object joins from its first prompt (later corrections get their passes), unless that comes before
    # the last run's first prompt; a removed object, or nothing changed: the whole video again.
    assert plan_passes({(0, 1): a, (3, 2): b, (4, 3): c, (6, 1): c}, [6], frozenset({1, 2, 3}), last,
                       full=False) == [4, 6]
    assert plan_passes({(2, 1): a, (1, 2): b}, [], everything, record({(2, 1): a}), full=False) == [None]
    assert plan_passes({(2, 1): a, (2, 2): b}, [], everything, record({(2, 1): a}), full=False) == [2]
    # A correction is not where the last run began: its first prompt is.
    assert plan_passes({(10, 1): a, (3, 1): b, (5, 2): c}, [3], everything,
                       record({(10, 1): a, (3, 1): b}, first_prompt=10), full=False) == [None, 3]
    assert plan_passes({(0, 1): a}, [], frozenset({1}), last, full=False) == [None]
    assert plan_passes({(0, 1): a, (3, 2): b}, [], everything, last, full=False) == [None]


def test_a_first_pass_at_or_before_every_prompt_re_tracks_backward_unless_a_correction_comes_first():
    assert retracks_backward(2, [5, 7], [2])
    assert retracks_backward(5, [5, 7], [])
    assert not retracks_backward(6, [5, 7], [6])  # frames before 6 were tracked forward from 5
    assert not retracks_backward(5, [5], [3])  # the correction on frame 3 stays
    assert not retracks_backward(0, [0], []) and not retracks_backward(None, [4], [])


def test_a_points_kind_is_its_glyph_and_its_object_its_colour():
    """A negative point of object 2 must not look like a positive point of object 1 (red) or of object 2 (green)."""
    grey = np.full((800, 1000, 3), 128, np.uint8)
    radius = 10  # a hundredth of the picture's longer side
    clicks = {1: Clicks(points=((100, 100),), labels=(1,)), 2: Clicks(points=((300, 100),), labels=(0,))}
    drawn = draw_clicks(grey, clicks, scale=2.0)
    red, green = (tuple(int(c) for c in overlay_colours()[i]) for i in (1, 2))
    white, black = (255, 255, 255), (0, 0, 0)

    def at(x: int, y: int) -> tuple:
        return tuple(int(c) for c in drawn[y, x])

    # Object 1's positive point at (200, 200): its colour, a white plus, a white ring.
    assert at(200 + radius // 2, 200 - radius // 2) == red
    assert at(200, 200 - radius // 2) == white and at(200 - radius // 2, 200) == white
    assert at(200, 200 - radius + 1) == white
    # Object 2's negative point at (600, 200): black, ringed in its colour, a white minus and no upright stroke.
    assert at(600, 200 - radius + 1) == green and at(600 - radius + 1, 200 + 1) == green
    assert at(600, 200) == white and at(600 - radius // 2, 200) == white
    assert at(600, 200 - radius // 2) == black and at(600 + radius // 2, 200 + radius // 2) == black
    assert red not in {at(x, y) for x in range(590, 611) for y in range(190, 211)}


def test_limits_name_the_flag_that_refuses():
    Limits(max_frames=10, max_seconds=1, max_pixels=160 * 120).check(info_of(160, 120, 10, 1.0))
    with pytest.raises(VideoError, match="--max-frames"):
        Limits(max_frames=9).check(info_of(160, 120, 10))
    with pytest.raises(VideoError, match="--max-seconds"):
        Limits(max_seconds=0.5).check(info_of(160, 120, 10, 1.0))
    with pytest.raises(VideoError, match="--max-pixels"):
        Limits(max_pixels=160 * 119).check(info_of(160, 120))


def test_progress_clock_reports_overall_fraction_and_eta(monkeypatch):
    reports = []
    clock = ProgressClock(2, lambda fraction, text: reports.append((fraction, text)), frames=10)
    # The first frame comes after a long wait (the device, SAM): the ETA counts from that frame on.
    times = iter([100.0, 110.0, 111.0, 112.0, 113.0])
    monkeypatch.setattr("tracker.interactive.time.perf_counter", lambda: next(times))
    clock.update(0, 5, 10)
    clock.update(1, 0, 10)
    clock.update(1, 5, 10)
    assert reports[0][0] == pytest.approx(0.25) and "ETA …" in reports[0][1]
    assert reports[1][0] == pytest.approx(0.5) and reports[1][1].endswith("ETA 0:20")  # a quarter in 10 s
    assert reports[2][0] == pytest.approx(0.75)
    assert reports[2][1].startswith("Tracking pass 2/2: frame 4 / 9 · ETA ")
    # A pass from a prompt on frame 4 tracks frames 3..0 backward, then runs over all 10: 14 steps, never "14/14".
    clock = ProgressClock(1, lambda fraction, text: reports.append((fraction, text)), frames=10)
    clock.update(0, 1, 14)
    clock.update(0, 14, 14)
    assert reports[3][1].startswith("Tracking backward, frame 3 · ")
    assert reports[4][1].startswith("Tracking frame 9 / 9")
    assert format_seconds(7.4) == "0:07" and format_seconds(3909) == "1:05:09"


def test_frame_caption_and_display_scale():
    assert frame_caption(12, info_of(160, 120, frames=300), 0.48) == "Frame 12 / 299 · 0:00.480"
    # The time counts from the first frame, as in the tracked video (a recording's clock can start anywhere).
    late = replace(info_of(160, 120, frames=300), start=3600.5)
    assert frame_caption(12, late, 3600.98) == "Frame 12 / 299 · 0:00.480"
    assert display_scale(info_of(160, 120)) == 4.0  # small frames are shown larger, to be easy to click
    assert display_scale(info_of(1920, 1080)) == pytest.approx(1280 / 1920)
    assert display_scale(info_of(1000, 500)) == 1.0


# -- an editing session ------------------------------------------------------

def test_open_video_keeps_the_files_name_inside_the_session_and_checks_limits(tmp_path, disc_tracker, clip):
    session = EditSession(tmp_path / "s", disc_tracker)
    (tmp_path / "up").mkdir()
    upload = tmp_path / "up" / "../etc passwd; rm -rf.MP4"
    upload.write_bytes(clip.read_bytes())
    info = session.open_video(upload, Limits())
    assert session.video == tmp_path / "s" / "video" / "etc passwd; rm -rf.MP4" and info.frame_count == FRAMES
    assert session.objects == [1] and session.current == 1
    with pytest.raises(VideoError, match="--max-frames"):
        session.open_video(clip, Limits(max_frames=FRAMES - 1))
    assert session.info is None and not (tmp_path / "s" / "video" / clip.name).exists()
    notes = tmp_path / "holiday.mp4"
    notes.write_text("not a video")
    with pytest.raises(VideoError, match="^holiday.mp4 is not a video"):  # the user's name for it
        session.open_video(notes, Limits())
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(VideoError, match=r"\.txt is not a video"):
        session.open_video(text, Limits())
    with pytest.raises(TrackerError, match="upload a video first"):
        session.click(0, (1, 1), "positive")


def test_clicks_update_the_mask_from_one_embedding_per_frame(session, disc_tracker):
    embedded = len(disc_tracker.sam.embedded)
    assert "SAM's image encoder reads frame 0 first" in session.click_wait(0)  # the page says why it waits
    click(session, 0, 40, 60)
    assert np.array_equal(session.labels(0) == 1, disc(40, 60))
    assert session.click_wait(0) == "Segmenting…"
    with disc_tracker.lock:  # a job holds the device: on a CPU the click shares its cores
        assert session.click_wait(0).startswith("Segmenting… A tracking job (this page's or another's) is under way")
    click(session, 0, 60, 60)
    assert np.array_equal(session.labels(0) == 1, disc(40, 60) | disc(60, 60))
    message = click(session, 0, 50, 60, "negative")
    assert "3 points" in message
    assert np.array_equal(session.labels(0) == 1, (disc(40, 60) | disc(60, 60)) & ~disc(50, 60))
    assert len(disc_tracker.sam.embedded) == embedded + 1  # further clicks only decode
    image, time_s = session.render(0)
    assert image.shape == (H * 4, W * 4, 3) and time_s == 0.0
    session.undo(0)
    assert np.array_equal(session.labels(0) == 1, disc(40, 60) | disc(60, 60))
    session.undo(0)
    assert np.array_equal(session.labels(0) == 1, disc(40, 60))
    click(session, 0, 60, 60)
    assert session.clear(0) == "cleared object 1 on frame 0"
    assert not session.labels(0).any()
    assert "nothing to undo" in session.undo(0)
    assert session.clear(0) == "object 1 has no clicks on frame 0: nothing to clear"


def test_box_mode_negative_only_and_frame_checks(session):
    assert click(session, 2, 20, 20, "box") == \
        "object 1 on frame 2: a box's first corner; click the opposite corner of the box"
    assert not session.labels(2).any()
    assert click(session, 2, 60, 50, "box") == "object 1 on frame 2: a box"
    assert (session.labels(2) == 1).sum() == 41 * 31
    session.clear(2)
    assert "negative points alone select nothing" in click(session, 3, 20, 20, "negative")
    with pytest.raises(PromptError, match=f"frames 0..{FRAMES - 1}"):
        session.click(FRAMES, (1, 1), "positive")
    with pytest.raises(PromptError, match="unknown click mode"):
        session.click(0, (1, 1), "lasso")


def test_objects_have_their_own_ids_and_clicks(session):
    click(session, 0, 40, 60)
    assert session.add_object() == 2 and session.current == 2
    click(session, 0, 120, 40)
    labels = session.labels(0)
    assert np.array_equal(labels == 1, disc(40, 60)) and np.array_equal(labels == 2, disc(120, 40))
    session.select_object(1)
    click(session, 0, 40, 90)
    assert np.array_equal(session.labels(0) == 1, disc(40, 60) | disc(40, 90))
    assert session.remove_object(2) == "object 2 removed"  # nothing tracked yet: nothing to say of Track
    assert session.objects == [1] and not (session.labels(0) == 2).any()
    session.add_object()
    session.begin_job()  # the job tracks object 2: removing it now would not reach the result
    try:
        with pytest.raises(TrackerError, match="object 2 is in the tracking job under way"):
            session.remove_object(2)
    finally:
        session.end_job()
    session.remove_object(2)
    with pytest.raises(PromptError, match="last object"):
        session.remove_object(1)
    with pytest.raises(PromptError, match="does not exist"):
        session.select_object(2)
    assert session.add_object() == 2  # ids are reused only when no result holds them


def zip_members(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as archive:
        return {name: archive.read(name) for name in archive.namelist()}


def written_prompts(session: EditSession) -> list[ObjectPrompt]:
    """The session's clicks as the prompts file of its run should hold them: by frame, then object."""
    return [replace(edit.clicks.prompt(object_id, frame), correct=edit.refine)
            for (frame, object_id), edit in sorted(session.edits.items()) if edit.clicks.selects]


def test_track_then_correct_keeps_earlier_frames_and_uses_the_correction(session):
    click(session, 0, 45, 60)
    session.add_object()
    click(session, 0, 20, 100, "box")
    click(session, 0, 140, 115, "box")
    reports = []
    first = session.track(OPTIONS, progress=lambda fraction, text: reports.append(fraction))
    assert first.objects == {1, 2} and reports[-1] == pytest.approx(1.0)
    assert first.describe() == "tracked the whole video"
    assert session.result_files() == [str(first.overlay), str(first.masks), str(first.prompts_file)]
    assert first.prompts_file.name == f"{session.video.stem}_prompts.json"
    assert load_prompts(first.prompts_file) == written_prompts(session)  # the CLI's --prompts tracks them again
    assert probe(first.overlay).frame_count == FRAMES
    before = zip_members(first.masks)
    assert sorted(before) == [f"{i:05d}.png" for i in range(FRAMES)]
    with MaskZipReader(first.masks) as masks:
        assert np.array_equal(masks[0] == 1, disc(45, 60))  # the prompt frame holds SAM's masks
        assert set(np.unique(masks[0])) == {0, 1, 2}
        tracked = masks[4] == 1

    # A click on frame 4 corrects object 1's tracked mask there (SAM gets it as mask_input).
    session.select_object(1)
    click(session, 4, 100, 30)
    assert session.edits[(4, 1)].refine
    prior = upscale_masks(torch.from_numpy(mask_to_logits(tracked))[None], resized_shape(H, W), (H, W))[0, 0] > 0
    corrected = session.labels(4) == 1
    assert np.array_equal(corrected, prior.numpy() | disc(100, 30))

    # Another working resolution would change every tracked frame; only those from the correction on do.
    second = session.track(TrackOptions(size=64))
    assert second.describe() == "re-tracked from frame 4; frames before it kept their masks"
    assert second.mixed_settings and second.warnings[-1] == (
        'the frames before frame 4 keep masks that an earlier run tracked with other tracking settings; tick "Full '
        're-run" and Track to track the whole video with these')
    assert re.match(rf"{FRAMES} frames in [\d.]+ s \({FRAMES - 4} tracked again at [\d.]+ FPS, 4 kept as they were\)",
                    second.summary), second.summary
    assert first.masks.exists(), "the run it is built on is kept, for an Undo of the correction"
    after = zip_members(second.masks)
    assert sorted(after) == sorted(before)
    assert all(after[f"{i:05d}.png"] == before[f"{i:05d}.png"] for i in range(4)), "earlier frames keep their masks"
    assert any(after[f"{i:05d}.png"] != before[f"{i:05d}.png"] for i in range(5, FRAMES))
    with MaskZipReader(second.masks) as masks:
        assert np.array_equal(masks[4] == 1, corrected)  # the correction is the new memory frame
    assert session.result.prompts[(4, 1)] == session.edits[(4, 1)].clicks.tracked_part
    assert np.array_equal(session.labels(4) == 1, corrected)
    assert load_prompts(second.prompts_file) == written_prompts(session) and len(written_prompts(session)) == 3

    # Asked for, a full re-run tracks from the first prompts again and applies the correction on top.
    third = session.track(OPTIONS, full=True)
    assert third.describe() == "tracked the whole video; corrections on frame 4 applied on top"
    assert not third.mixed_settings and not any("other tracking settings" in w for w in third.warnings)
    assert re.match(rf"{FRAMES} frames in 2 passes \({2 * FRAMES - 4} tracked in [\d.]+ s, [\d.]+ FPS: the frames "
                    r"from a correction on are tracked again\), device cpu", third.summary), third.summary
    with MaskZipReader(third.masks) as masks:
        assert np.array_equal(masks[0] == 1, disc(45, 60))
        assert (masks[4] == 1)[disc(100, 30)].all()
    # The run's prompts file, the correction marked as one, tracks the same masks from the CLI or a script.
    assert [p.correct for p in load_prompts(third.prompts_file)] == [False, False, True]
    again = session.tracker.track(session.video, load_prompts(third.prompts_file), options=OPTIONS,
                                  masks=session.directory / "from-file.zip")
    assert again.passes == 2 and zip_members(again.masks) == zip_members(third.masks)

    # Track again with nothing changed: the result is current, nothing runs (Full re-run would).
    again = session.track(OPTIONS)
    assert again.repeated and again.overlay == third.overlay and third.overlay.exists()
    assert session.result is third and session._runs == 3

    # Only the look changed (opacity, outline, encoding): the page says the video below keeps the old look until
    # Track, which draws the last masks again and tracks nothing.
    assert session.look_note(Style(OPTIONS.alpha, OPTIONS.outline)) is None  # the status keeps the summary
    assert "keeps the old one until Track" in session.look_note(Style(alpha=0.9, outline=OPTIONS.outline))
    assert session.look_note(Style(OPTIONS.alpha, OPTIONS.outline)) == \
        "The look is again that of the tracked video below."
    masks_before = zip_members(third.masks)
    looks = session.track(replace(OPTIONS, alpha=0.9, outline=0, crf=0, preset="ultrafast"))
    assert looks.redrawn and looks.describe() == ("drew the tracked video again with the new look; the masks are "
                                                  "those of the last run")
    assert re.fullmatch(rf"{FRAMES} frames drawn again in [\d.]+ s, none tracked", looks.summary)
    assert zip_members(looks.masks) == masks_before and not third.masks.exists()
    assert looks.prompts_file.parent == looks.masks.parent and load_prompts(looks.prompts_file) == \
        written_prompts(session)
    assert LOSSLESS_WARNING in looks.warnings and probe(looks.overlay).frame_count == FRAMES
    with MaskZipReader(looks.masks) as masks:
        first_frame = next(iter_frames(looks.overlay)).image.astype(int)
        image, labels = torch.from_numpy(read_frame(session.video, 0).image), torch.from_numpy(masks[0])
        chosen, former = (overlay(image, labels, alpha=alpha, outline=outline).numpy()
                          for alpha, outline in ((0.9, 0), (OPTIONS.alpha, OPTIONS.outline)))
    assert np.abs(first_frame - chosen).mean() < 3 < np.abs(first_frame - former).mean()  # lossless, through 4:2:0
    assert session.track(replace(OPTIONS, alpha=0.9, outline=0, crf=0, preset="ultrafast")).repeated
    click(session, 4, 100, 40)
    assert not session.track(OPTIONS).repeated


def test_a_prompts_file_brings_back_the_clicks_of_a_closed_tab(session, tmp_path, disc_tracker, clip):
    click(session, 0, 45, 60)
    click(session, 0, 52, 66, "negative")
    session.add_object()
    click(session, 3, 20, 100, "box")
    click(session, 3, 140, 115, "box")
    click(session, 3, 100, 30)
    first = session.track(OPTIONS)

    assert load_prompts(first.prompts_file)[0].frame_size == (W, H)  # refused on a video of another size
    uploads = tmp_path / "uploads"  # where the page's upload of the file lands
    uploads.mkdir()
    upload = shutil.copy(first.prompts_file, uploads)
    again = EditSession(tmp_path / "new tab", disc_tracker, upload_folder=uploads)
    again.open_video(clip, Limits())
    click(again, 5, 80, 80)  # clicks made before the file is loaded are replaced by it
    encoded = len(disc_tracker.sam.embedded)
    reports = []
    message, frame = again.load_prompts_file(upload, lambda fraction, text: reports.append(text))
    assert not Path(upload).exists(), "the server's copy of the upload is removed once read"
    assert message == ("loaded prompts file clip_prompts.json: 2 prompts for objects 1, 2 on frames 0, 3, in place "
                       "of the clicks before; press Track")
    # Loaded where its run's result is shown, the file changes nothing to track, and says so.
    message, _ = session.load_prompts_file(shutil.copy(first.prompts_file, tmp_path / "same_prompts.json"))
    assert message.endswith("in place of the clicks before; they are the last run's clicks, so its result stands "
                            "(Track would change nothing)")
    assert session.track(OPTIONS).repeated
    assert frame == 0 and reports == ["SAM reads frame 0 (1 of 2)", "SAM reads frame 3 (2 of 2)"]
    assert len(disc_tracker.sam.embedded) == encoded + 2, "SAM's encoder runs once a frame"
    assert again.objects == [1, 2] and again.current == 1
    assert written_prompts(again) == load_prompts(first.prompts_file)
    for key, edit in session.edits.items():  # the same masks, but for the clicks' rounding to 0.001 px
        assert not again.edits[key].refine
        assert (again.edits[key].mask ^ edit.mask).sum() <= 4, key
    assert np.array_equal(again.labels(0), session.labels(0))
    # Undo takes back one point at a time, the box last, as if clicked here.
    again.select_object(2)
    assert again.undo(3) == "object 2 on frame 3: a box"
    assert np.array_equal(again.edits[3, 2].mask, disc_tracker.segment(
        again._embedding(3), ObjectPrompt(2, 3, box=(20, 100, 140, 115))))
    assert again.undo(3) == "object 2 has no clicks on frame 3"
    retracked = again.track(OPTIONS)
    assert retracked.describe() == "tracked the whole video"
    assert load_prompts(retracked.prompts_file) == [ObjectPrompt(1, 0, [(45, 60), (52, 66)], [1, 0])]


def test_a_prompts_file_that_does_not_fit_the_video_changes_nothing(session, tmp_path):
    click(session, 2, 45, 60)
    kept = {key: edit.clicks for key, edit in session.edits.items()}

    def load(name: str, text: str | None) -> str:
        path = tmp_path / name
        if text is not None:
            path.write_text(text)
        with pytest.raises(TrackerError) as refused:
            session.load_prompts_file(path)
        assert {key: edit.clicks for key, edit in session.edits.items()} == kept and session.objects == [1]
        return str(refused.value)

    assert load("wide.json", '{"objects": [{"id": 1, "points": [[300, 10]]}]}') == (
        "prompts file wide.json cannot be used on clip.mp4 (160x120, 8 frames): object 1: point (300, 10) is "
        "outside the 160x120 frame; x must be in 0..159 and y in 0..119")
    assert "cannot be used on clip.mp4 (160x120, 8 frames): object 2: prompt frame 8 is past the end" in \
        load("long.json", '{"objects": [{"id": 2, "frame": 8, "points": [[30, 10]]}]}')
    assert load("big_prompts.json", prompts_to_text([ObjectPrompt(1, 0, [(30, 10)])], (320, 240))) == (
        "prompts file big_prompts.json cannot be used on clip.mp4 (160x120, 8 frames): the prompts were made on a "
        "320x240 video, and this one is 160x120: the clicks would land elsewhere (the prompts of another video?)")
    assert load("notes.json", "points at 30,10").startswith("prompts file notes.json is not valid JSON")
    with (tmp_path / "film.json").open("wb") as big:  # a video picked by mistake
        big.truncate(40 * 2**20)
    assert load("film.json", None) == ("prompts file film.json is 40 MB: not a prompts file (those are a few KB); "
                                     "choose the *_prompts.json the app wrote")
    (tmp_path / "good.json").write_text('{"objects": [{"points": [[30, 10]]}]}')
    nothing = EditSession(tmp_path / "no video", session.tracker)
    with pytest.raises(TrackerError, match="^upload a video first$"):
        nothing.load_prompts_file(tmp_path / "good.json")


def held_encoder(session: EditSession, monkeypatch) -> tuple[threading.Event, threading.Event]:
    """SAM's encoder, as slow as a CPU's: it says when it has started, and returns once released."""
    started, release = threading.Event(), threading.Event()
    real_embed = session.sam._embed

    def slow_embed(image):
        started.set()
        assert release.wait(10)
        return real_embed(image)

    monkeypatch.setattr(session.sam, "_embed", slow_embed)
    return started, release


def test_a_track_pressed_while_a_prompts_file_loads_tracks_its_prompts(session, tmp_path, monkeypatch):
    """The load's SAM work takes seconds on a CPU: a Track pressed meanwhile waits for it, as for a click; a load
    while a job tracks its prompts is refused before any SAM work."""
    click(session, 0, 45, 60)
    loaded = [ObjectPrompt(2, 3, [(100.0, 30.0)], [1])]
    path = tmp_path / "later_prompts.json"
    path.write_text(prompts_to_text(loaded, (W, H)))
    started, release = held_encoder(session, monkeypatch)
    outcome, said, records = [], [], []
    # As the page does: the load is said at once, then waits its turn for SAM.
    assert session.prompts_file_wait(path) == ("Loading prompts file later_prompts.json: SAM reads the frames of "
                                               "its prompts (a moment on a GPU, seconds a frame on a CPU)…")
    loading = threading.Thread(target=lambda: outcome.append(session.load_prompts_file(path)))
    loading.start()
    assert started.wait(10)

    def track() -> None:
        session.begin_job()
        try:
            records.append(session.track(OPTIONS, progress=lambda fraction, text: said.append(text)))
        finally:
            session.end_job()

    tracking = threading.Thread(target=track)
    tracking.start()
    time.sleep(0.5)
    waiting = tracking.is_alive() and said and set(said) == {"Waiting for the masks of prompts file "
                                                             "later_prompts.json…"}
    release.set()
    loading.join(10)
    tracking.join(60)
    assert waiting, said
    assert outcome and outcome[0][0] == ("loaded prompts file later_prompts.json: 1 prompt for object 2 on frame "
                                         "3, in place of the clicks before; the Track pressed meanwhile tracks them")
    assert not session.clicks_waiting(), "the load was said once and settled once"
    assert records and records[0].objects == {2} and load_prompts(records[0].prompts_file) == loaded

    refused = []

    def load_midway(fraction: float, text: str) -> None:
        if "frame 2 / " in text and not refused:
            embedded = len(session.sam.embedded)
            with pytest.raises(TrackerError) as said_at_once:  # the page's first word on the file
                session.prompts_file_wait(path)
            with pytest.raises(TrackerError) as error:
                session.load_prompts_file(path)
            refused.extend((str(said_at_once.value), str(error.value)))
            assert len(session.sam.embedded) == embedded, "the refused load ran SAM"

    session._embeddings.clear()
    session.begin_job()
    try:
        session.track(OPTIONS, full=True, progress=load_midway)
    finally:
        session.end_job()
    assert refused == ["the tracking job under way has taken the clicks it tracks: load the prompts file once it "
                       "is done, or press Cancel first"] * 2
    assert not session.clicks_waiting(), "a refused load is not waited for"
    assert written_prompts(session) == loaded


def test_a_click_behind_other_pages_clicks_says_how_many_go_first(session, disc_tracker, clip, tmp_path):
    """The page's SAM queue takes clicks one at a time, seconds each on a CPU: a click made behind other pages'
    clicks says how many are ahead of it; a segmented one, or a closed page's, no longer counts."""
    other = EditSession(tmp_path / "other", disc_tracker)
    other.open_video(clip, Limits())
    assert "segmented first" not in session.click_wait(0)
    click(session, 0, 40, 60)  # the click said above gets its mask
    other.queue_click(0, to_display(other, 40, 60), "positive")
    other.queue_click(1, to_display(other, 60, 60), "positive")
    assert disc_tracker.clicks_ahead() == 2
    assert "2 clicks made before this one (this page's or other users') are segmented first." in \
        session.click_wait(0)
    assert disc_tracker.clicks_ahead() == 3  # that one too, until it has its mask
    click(session, 0, 50, 60)
    assert other.click_next() == "object 1 on frame 0: 1 point"
    assert other.clicks_queued()  # the page shows its second click's wait message, not this older reply
    assert disc_tracker.clicks_ahead() == 1
    assert "1 click made before this one (this page's or other users') is segmented first." in session.click_wait(0)
    assert other.click_next() == "object 1 on frame 1: 1 point" and not other.clicks_queued()
    other.queue_click(2, to_display(other, 60, 60), "positive")
    assert disc_tracker.clicks_ahead() == 2
    other.close()
    assert disc_tracker.clicks_ahead() == 1  # this page's, said above: a closed page's no longer count


def test_a_click_waiting_for_sams_encoder_leaves_the_session_usable(session, monkeypatch):
    """The encoder takes seconds on a CPU: meanwhile Cancel, redraws and Undo answer at once."""
    click(session, 0, 45, 60)
    started, release = held_encoder(session, monkeypatch)
    outcome = []
    assert not session.clicks_waiting()
    session.click_wait(3)  # the page says the click at once; the queue then runs it
    clicking = threading.Thread(target=lambda: outcome.append(click(session, 3, 45, 60)))
    clicking.start()
    assert started.wait(10)
    assert session.clicks_waiting()  # a Cancel said now tells that the click's mask is still to come
    began = time.monotonic()
    assert session.request_cancel() is False
    session.render(3)
    assert session.undo(0) == "object 1 has no clicks on frame 0"
    assert time.monotonic() - began < 1, "the session waited for SAM's encoder"
    release.set()
    clicking.join(10)
    assert outcome == ["object 1 on frame 3: 1 point"] and (3, 1) in session.edits
    assert not session.clicks_waiting()

    def refused_during_sam(meanwhile: Callable[[], object]) -> list[str]:
        """A click on frame 3 (SAM's encoder held), `meanwhile` done while it waits; what the click raised."""
        started.clear()
        release.clear()
        session._embeddings.clear()
        errors = []

        def late_click():
            try:
                click(session, 3, 80, 60)
            except TrackerError as exc:
                errors.append(str(exc))

        clicking = threading.Thread(target=late_click)
        clicking.start()
        assert started.wait(10)
        meanwhile()
        release.set()
        clicking.join(10)
        return errors

    # Clicks on the object's frame that change while SAM works: the late click is refused, not mixed in.
    errors = refused_during_sam(lambda: session.clear(3))
    assert errors and "changed while SAM worked on the click; click again" in errors[0]
    assert (3, 1) not in session.edits
    # An object removed while SAM works on its click stays removed: the click must not bring it back, hidden.
    session.add_object()
    assert refused_during_sam(lambda: session.remove_object(2)) == [
        "object 2 was removed while SAM worked on the click"]
    assert session.objects == [1] and (3, 2) not in session.edits


def cancel_at(session: EditSession, line: str) -> Callable[[float, str], None]:
    """A progress report that presses Cancel when the job's line holds `line` ("frame 4 / ", say)."""
    def report(fraction: float, text: str) -> None:
        if line in text:
            assert session.request_cancel()

    return report


def cancelled_run(session: EditSession, line: str) -> RunRecord:
    session.begin_job()
    try:
        return session.track(OPTIONS, progress=cancel_at(session, line))
    finally:
        session.end_job()


def test_a_cancel_before_the_run_tracks_a_frame_of_its_own_keeps_the_previous_result(session):
    """A re-track from frame 5 writes frames 0 to 4 as the last run had them: cancelled there, it leaves
    nothing, and the last result stands."""
    click(session, 0, 45, 60)
    first = session.track(OPTIONS)
    session.add_object()
    click(session, 5, 120, 40)
    with pytest.raises(Cancelled):
        cancelled_run(session, "frame 2 / ")
    assert session.result is first and first.masks.exists() and first.overlay.exists()
    assert sorted(p.name for p in (session.directory / "runs").iterdir()) == [first.masks.parent.name]
    assert session.request_cancel() is False  # nothing runs now: a stray Cancel changes nothing
    second = session.track(OPTIONS)
    assert second.objects == {1, 2} and second.passes == [5]


def test_a_cancel_once_only_the_prompted_frame_is_written_keeps_nothing(session):
    """The prompted frame's masks are SAM's: a job stopped right after writing it tracked nothing, so it keeps
    nothing, on a first run (no result then) as on a correction's run (the last result stands)."""
    click(session, 0, 45, 60)
    with pytest.raises(Cancelled):
        cancelled_run(session, "frame 1 / ")  # the cancel is seen before frame 1 is written
    assert session.result is None and not any((session.directory / "runs").iterdir())
    first = session.track(OPTIONS)
    click(session, 5, 20, 100)
    with pytest.raises(Cancelled):
        cancelled_run(session, "frame 6 / ")
    assert session.result is first
    stopped = cancelled_run(session, "frame 7 / ")  # one tracked frame after it is kept
    assert stopped.stopped_at == 6 and stopped.passes == [5]


def test_a_cancel_keeps_the_frames_tracked_and_the_next_track_goes_on_from_there(session, tmp_path):
    click(session, 0, 45, 60)
    session.track(OPTIONS)
    session.add_object()
    click(session, 0, 120, 40)
    stopped = cancelled_run(session, "frame 4 / ")
    last = stopped.stopped_at
    assert last in (3, 4) and session.result is stopped
    with MaskZipReader(stopped.masks) as masks:
        assert masks.frames() == list(range(last + 1))
        kept = [np.array(masks[index]) for index in range(last + 1)]
    assert probe(stopped.overlay).frame_count == last + 1
    assert stopped.describe() == (f"stopped after frame {last}, the frames up to it kept with their masks "
                                  f"(re-tracking from frame 0); Track goes on from frame {last}")
    assert f"cancelled after frame {last}: the frames after it are not tracked" in stopped.summary
    assert stopped.objects == {1, 2} and set(stopped.prompts) == {(0, 1), (0, 2)}
    assert (session.labels(last) > 0).any() and not session.labels(last + 1).any()  # not tracked yet
    assert session.frame_note(last) == "" and \
        session.frame_note(last + 1) == f" · not tracked yet: the last run stopped after frame {last}"
    message, _ = session.load_prompts_file(shutil.copy(stopped.prompts_file, tmp_path / "same_prompts.json"))
    assert message.endswith("in place of the clicks before; press Track")  # not "its result stands"

    again = session.track(OPTIONS)  # nothing changed, yet the video is not all tracked
    assert not again.repeated and again.passes == [last] and again.stopped_at is None
    assert again.describe() == f"went on from frame {last}, where the cancelled run stopped; frames before it kept " \
                               "their masks"
    assert session.frame_note(last + 1) == ""
    with MaskZipReader(again.masks) as masks:
        assert masks.frames() == list(range(FRAMES))
        for index in range(last + 1):
            np.testing.assert_array_equal(masks[index], kept[index])
    assert probe(again.overlay).frame_count == FRAMES
    assert session.track(OPTIONS).repeated


def test_a_cancel_in_a_correction_pass_keeps_its_frames_and_the_corrections_not_reached_wait(session):
    """Corrections on frames 3 and 5 make two passes; a cancel in the second, after frame 5, keeps the frames up to
    where it stopped: the correction on frame 3 is in them, the one on frame 5 is not (its pass had not begun), so
    the next Track goes on from frame 5 with it. The tracked video of a pass before the last is drawn from its
    masks."""
    click(session, 0, 45, 60)
    session.track(OPTIONS)
    click(session, 3, 100, 30)
    click(session, 5, 20, 100)
    assert session.edits[(3, 1)].refine and session.edits[(5, 1)].refine
    stopped = cancelled_run(session, "pass 1/2: frame 7 / ")
    last = stopped.stopped_at
    assert last in (6, 7) and stopped.passes == [3]
    assert set(stopped.prompts) == {(0, 1), (3, 1)} and stopped.corrections == {(3, 1)}
    assert probe(stopped.overlay).frame_count == last + 1
    with MaskZipReader(stopped.masks) as masks:
        assert masks.frames() == list(range(last + 1)) and masks[3][30, 100] == 1
    assert [(p.frame, p.correct) for p in load_prompts(stopped.prompts_file)] == [(0, False), (3, True)]

    again = session.track(OPTIONS)
    assert again.passes == [5] and again.stopped_at is None and again.corrections == {(3, 1), (5, 1)}
    with MaskZipReader(again.masks) as masks:
        assert masks.frames() == list(range(FRAMES)) and masks[3][30, 100] == masks[5][100, 20] == 1


def test_a_cancel_before_a_later_pass_reaches_its_correction_keeps_the_frames_written(session):
    """The second pass (from frame 5) writes frames 0 to 4 as the first pass tracked them, the correction on frame 3
    in them: cancelled there, those frames are kept, and the next Track goes on with the correction on frame 5."""
    click(session, 0, 45, 60)
    session.track(OPTIONS)
    click(session, 3, 100, 30)
    click(session, 5, 20, 100)
    stopped = cancelled_run(session, "pass 2/2: frame 4 / ")
    last = stopped.stopped_at
    assert last in (3, 4) and stopped.passes == [3, 5] and stopped.corrections == {(3, 1)}
    assert probe(stopped.overlay).frame_count == last + 1
    again = session.track(OPTIONS)
    assert again.passes == [last, 5] and again.corrections == {(3, 1), (5, 1)}
    with MaskZipReader(again.masks) as masks:
        assert masks.frames() == list(range(FRAMES)) and masks[3][30, 100] == masks[5][100, 20] == 1


def test_a_closed_page_keeps_nothing_of_its_cancelled_job(session):
    click(session, 0, 45, 60)
    session.begin_job()
    closing = []

    def close_page(fraction: float, text: str) -> None:
        if "frame 4 / " in text and not closing:
            closing.append(threading.Thread(target=session.close))
            closing[0].start()
            while not session.cancel.is_set():
                time.sleep(0.01)

    try:
        with pytest.raises(Cancelled):
            session.track(OPTIONS, progress=close_page)
    finally:
        session.end_job()
    closing[0].join(30)
    assert session.result is None and not session.directory.exists()


def test_an_object_the_running_job_does_not_track_can_be_removed(session):
    click(session, 0, 45, 60)
    session.add_object()  # object 2, never clicked
    session.begin_job()
    in_the_job = "object 2 is in the tracking job under way: remove it once the job is done, or press Cancel first"
    with pytest.raises(TrackerError, match=f"^{in_the_job}$"):
        session.remove_object(2)  # the job has not read its prompts yet
    during = []

    def edit_objects() -> None:  # as the page does, from another thread while the job runs
        during.append(session.add_object())
        # Said of the job under way: the last run's result, which it replaces, says nothing of the next Track.
        assert session.remove_object(during[0]) == "object 3 removed (the tracking job under way does not track it)"
        session.remove_object(2)
        with pytest.raises(TrackerError, match="^object 1 is in the tracking job under way"):
            session.remove_object(1)

    def midway(fraction: float, text: str) -> None:
        if "frame 2 / " in text and not during:
            editing = threading.Thread(target=edit_objects)
            editing.start()
            editing.join()

    try:
        record = session.track(OPTIONS, progress=midway)
    finally:
        session.end_job()
    assert during == [3] and session.objects == [1] and record.objects == {1}
    assert not any("object 2" in warning for warning in record.warnings), record.warnings
    session.add_object()
    session.remove_object(1)  # no job runs: any object but the last can go
    assert session.objects == [2]


def test_undo_takes_a_whole_box_back(session):
    click(session, 0, 45, 60)
    click(session, 0, 20, 20, "box")
    click(session, 0, 60, 50, "box")
    assert session.undo(0) == "object 1 on frame 0: 1 point"
    assert session.edits[(0, 1)].clicks.corner is None and session.edits[(0, 1)].clicks.box is None


def test_a_click_made_on_a_video_since_replaced_is_dropped(session, clip, monkeypatch):
    """A click waits for SAM (seconds on a CPU): one made before the video changed must not land on the new one,
    nor say that something went wrong on a video the user has not clicked yet."""
    xy, loads = to_display(session, 45, 60), session.video_loads
    session.open_video(clip, Limits())
    with pytest.raises(ClickDropped):
        session.click(0, xy, "positive", loads)
    assert not session.edits

    embed = session.sam.embed

    def embed_while_the_video_is_replaced(image, **options):
        session.open_video(clip, Limits())
        return embed(image, **options)

    monkeypatch.setattr(session.sam, "embed", embed_while_the_video_is_replaced)
    with pytest.raises(ClickDropped):
        session.click(0, xy, "positive", session.video_loads)
    assert not session.edits
    monkeypatch.undo()
    assert session.click(0, xy, "positive", session.video_loads) == "object 1 on frame 0: 1 point"


def test_a_point_drops_a_box_left_half_drawn(session):
    click(session, 0, 45, 60)
    click(session, 0, 20, 20, "box")
    assert click(session, 0, 60, 60) == "object 1 on frame 0: 2 points"
    assert session.edits[(0, 1)].clicks.corner is None
    assert session.undo(0) == "object 1 on frame 0: 1 point"  # the dropped corner does not come back


def test_switching_to_points_drops_every_box_left_half_drawn(session):
    """A corner left on another frame or object would pair with the next box click there, however long after."""
    click(session, 0, 45, 60)
    click(session, 0, 20, 20, "box")
    session.add_object()
    # One box at a time: a first corner for another object or on another frame drops the one left pending.
    assert click(session, 3, 10, 10, "box") == ("object 2 on frame 3: a box's first corner; click the opposite "
                                                "corner of the box (the first corner left for object 1 on frame 0 "
                                                "is dropped)")
    assert session.edits[(0, 1)].clicks.corner is None and session.edits[(0, 1)].clicks.points == ((45.0, 60.0),)
    session.render(0)  # the page shows frame 0, where object 2 has no clicks
    assert session.drop_corners() == "the box's first corner is dropped (object 2 on frame 3)"
    click(session, 0, 120, 40)
    click(session, 0, 20, 20, "box")
    assert session.drop_corners() == ("the box's first corner is dropped (object 2 on frame 0); object 2 on frame 0: "
                                      "1 point")
    session.undo(0)
    click(session, 0, 20, 20, "box")
    assert session.drop_corners() == ("the box's first corner is dropped (object 2 on frame 0); object 2 has no clicks "
                                      "on frame 0")
    session.remove_object(2)
    assert session.edits[(0, 1)].clicks.points == ((45.0, 60.0),) and session.edits[(0, 1)].clicks.corner is None
    assert (3, 2) not in session.edits
    assert session.drop_corners() is None
    session.select_object(1)
    assert "nothing to undo" not in session.undo(0)
    assert (0, 1) not in session.edits  # the undo took back the point, not the dropped corner


def test_a_job_waiting_for_the_device_says_so_and_can_be_cancelled(session):
    """Behind the start-up warm-up (or another job) a job reports that it waits, and Cancel ends the wait."""
    click(session, 0, 45, 60)
    session.begin_job()
    reports, outcome = [], []

    def job() -> None:
        try:
            session.track(OPTIONS, progress=lambda fraction, text: reports.append(text))
        except Cancelled as exc:
            outcome.append(exc)

    with session.tracker.lock:
        waiting = threading.Thread(target=job)
        waiting.start()
        deadline = time.monotonic() + 5
        while not reports and time.monotonic() < deadline:
            time.sleep(0.01)
        assert reports == [device_wait_line(1)] and reports[0].startswith("Waiting for the device: 1 job is ahead")
        assert session.request_cancel()
        waiting.join(timeout=2)
        assert not waiting.is_alive() and len(outcome) == 1
    session.end_job()
    assert session.result is None and not list((session.directory / "runs").iterdir())


def test_no_upload_while_tracking_and_no_track_without_clicks(session, clip):
    with pytest.raises(PromptError, match="click an object first"):
        session.track(OPTIONS)
    session.begin_job()
    with pytest.raises(TrackerError, match="tracking job is running"):
        session.open_video(clip, Limits())
    with pytest.raises(TrackerError, match="tracking job is running"):
        session.begin_job()
    session.end_job()


def test_a_cutout_says_what_its_format_cannot_keep(tmp_path, disc_tracker):
    """The transparent WebM has square pixels and progressive frames: the page says so beside the file (it was
    only logged), with the size to stretch it to; the green-screen MP4 keeps both."""
    edit = EditSession(tmp_path / "session", disc_tracker)
    edit.open_video(make_clip(tmp_path / "pal.mp4", frames=4, width=96, height=64, pixel_aspect=Fraction(64, 45),
                              x264_params="tff=1", audio=False), Limits())
    notes = edit.cutout_notes("transparent")
    assert len(notes) == 2 and "stretch it to 137x64" in notes[0] and "progressive frames" in notes[1]
    assert edit.cutout_notes("green") == []


def test_cutouts_keep_only_the_chosen_objects(session):
    with pytest.raises(TrackerError, match="track the video first"):
        session.export_cutout([1], "green")
    click(session, 0, 45, 60)
    session.add_object()
    click(session, 0, 120, 40)
    run = session.track(OPTIONS)
    green = session.export_cutout([1], "green")
    transparent = session.export_cutout([1, 2], "transparent")
    matte = session.export_cutout([2], "matte")
    assert session.result_files() == [str(run.overlay), str(run.masks), str(run.prompts_file), str(green),
                                      str(transparent), str(matte)]
    assert matte.name == "clip_matte.mp4"
    with pytest.raises(PromptError, match="at least one object"):
        session.export_cutout([], "green")
    assert session.cutout_choices() == [1, 2]
    session.remove_object(2)
    assert session.cutout_choices() == [1]
    with pytest.raises(PromptError, match="object 2 was removed since the last run"):
        session.export_cutout([1, 2], "transparent")

    with av.open(str(green)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264" and container.streams.audio
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
    assert len(frames) == FRAMES
    labels = MaskZipReader(run.masks)[0]
    far_from_objects = ~np.isin(labels, [1]) & ~disc(45, 60, radius=RADIUS + 4)
    assert np.abs(frames[0][far_from_objects].astype(int) - CHROMA_GREEN).mean() < 12

    with av.open(str(transparent)) as container:
        stream = container.streams.video[0]
        assert container.format.name.startswith("matroska") or "webm" in container.format.name
        assert stream.codec_context.name in ("vp9", "libvpx-vp9")
        assert sum(1 for _ in container.demux(stream) if _.size) == FRAMES

    with av.open(str(matte)) as container:
        frames = [frame.to_ndarray(format="gray") for frame in container.decode(video=0)]
    assert len(frames) == FRAMES
    assert np.abs(frames[0].astype(int) - (MaskZipReader(run.masks)[0] == 2) * 255).mean() < 2


def test_idle_sessions_go_while_no_request_comes(tmp_path, disc_tracker):
    store = SessionStore(tmp_path / "root", disc_tracker, idle_seconds=0.4)
    session = store.get("browser-1")
    assert session.directory.exists()
    deadline = time.monotonic() + 10
    while session.directory.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not session.directory.exists() and len(store) == 0
    folders = set((tmp_path / "root").iterdir())
    for _ in range(2):  # the page left open is told, not handed an empty session as if nothing had happened
        with pytest.raises(TrackerError, match=r"^this page's session ended after 0.4 s without use, and its files "
                                               r"with it; reload the page \(a prompts file you downloaded brings its "
                                               r"clicks back\)$"):
            store.get("browser-1")
    assert set((tmp_path / "root").iterdir()) == folders and len(store) == 0
    assert store.get("browser-2") is not session  # a reloaded page
    store.close_all()


def test_session_store_isolates_and_removes_sessions(tmp_path, disc_tracker, clip):
    store = SessionStore(tmp_path / "root", disc_tracker, idle_seconds=3600)
    one, two = store.get("browser-1"), store.get("browser-2")
    assert one is store.get("browser-1") and one is not two
    assert one.directory != two.directory and one.directory.parent == two.directory.parent == tmp_path / "root"
    assert "browser" not in one.directory.name  # the client's key never becomes a path
    one.open_video(clip, Limits())
    assert two.info is None
    store.close("browser-1")
    assert not one.directory.exists() and len(store) == 1
    folders = set((tmp_path / "root").iterdir())
    with pytest.raises(TrackerError, match="this page was closed; reload it"):
        store.get("browser-1")  # an event still in flight from the closed page starts no session
    assert set((tmp_path / "root").iterdir()) == folders and len(store) == 1
    again = store.get("browser-1", reopen=True)  # a script's client, its connection lost and back
    assert again is not one and again.info is None and len(store) == 2
    store.close("browser-1")
    store.close("never-seen")
    two.last_used -= 7200
    store.close_idle()
    assert len(store) == 0 and not two.directory.exists()
    with pytest.raises(TrackerError, match="reload the page"):
        store.get(None)
    three = store.get("browser-3")
    store.close_all()
    assert not three.directory.exists() and not (tmp_path / "root").exists()


def test_each_session_picks_its_sam_backend(session, disc_tracker):
    """The settings' backend choice: loaded once and shared, per session."""
    click(session, 0, 50, 60)
    assert session._embeddings
    assert disc_tracker.sam_choices() == ["disc", "torch"]  # the start-up one first, then what can run here
    with pytest.raises(TrackerError, match="'tensorrt' cannot run here; choose one of: disc, torch"):
        session.set_sam_backend("tensorrt")
    assert "SAM backend torch" in session.set_sam_backend("torch")
    assert session.sam.name == "torch" and not session._embeddings  # old embeddings belong to the old backend
    assert disc_tracker.sam_backend("torch") is session.sam  # loaded once, then shared
    other = EditSession(session.directory.parent / "other", disc_tracker)
    assert other.sam is disc_tracker.sam  # the other session keeps the default
    session.set_sam_backend("disc")
    assert session.sam is disc_tracker.sam


def test_another_sam_backend_makes_the_next_track_run_again(session):
    """The prompts' masks are the backend's: after a switch, the same clicks are not "nothing changed"."""
    click(session, 0, 50, 60)
    assert session.track(OPTIONS).sam_backend == "disc"
    assert session.track(OPTIONS).repeated
    session.begin_job()  # the page's Track carries the backend chosen: its own switch may come later
    try:
        again = session.track(OPTIONS, sam_backend="torch")
    finally:
        session.end_job()
    assert not again.repeated and not again.redrawn and again.sam_backend == "torch" and again.passes == [None]
    assert session.track(OPTIONS).repeated
    switched = []

    def switch_midway(fraction: float, text: str) -> None:  # a job keeps the backend it began with
        if "frame 2 / " in text and not switched:
            switched.append(session.set_sam_backend("disc"))

    third = session.track(OPTIONS, full=True, progress=switch_midway)
    assert switched and third.sam_backend == "torch" and session.sam.name == "disc"


def test_a_correction_before_every_prompt_re_tracks_the_frames_before_it_too(session):
    """Frames before the first prompt are tracked backward, through the corrected frame: the correction
    reaches them, in a re-track from it and in a full re-run alike; taken away, the first run comes back."""
    click(session, 5, 45, 60)
    first = session.track(OPTIONS)
    before = zip_members(first.masks)
    click(session, 2, 100, 30)
    second = session.track(OPTIONS)
    assert second.describe() == "re-tracked from frame 2, forward and backward (no prompt comes before it)"
    assert re.match(rf"{FRAMES} frames in [\d.]+ s \([\d.]+ FPS\), device cpu", second.summary), second.summary
    corrected = zip_members(second.masks)
    assert any(corrected[f"{i:05d}.png"] != before[f"{i:05d}.png"] for i in range(2))
    with MaskZipReader(second.masks) as masks:
        assert np.array_equal(masks[2] == 1, session.labels(2) == 1)  # the correction is the memory frame
    third = session.track(OPTIONS, full=True)
    assert third.describe() == "tracked the whole video; corrections on frame 2 applied on top"
    assert zip_members(third.masks) == corrected
    session.undo(2)
    fourth = session.track(OPTIONS)
    assert fourth.describe() == "tracked the whole video" and zip_members(fourth.masks) == before


def test_an_object_added_on_a_later_frame_joins_from_there(session):
    """As in a whole run (it joins the forward pass at its first prompt), but without tracking the frames
    before it again."""
    click(session, 0, 45, 60)
    first = session.track(OPTIONS)
    before = zip_members(first.masks)
    session.add_object()
    click(session, 5, 120, 40)
    second = session.track(OPTIONS)
    assert second.describe() == "re-tracked from frame 5; frames before it kept their masks"
    assert second.objects == {1, 2}
    after = zip_members(second.masks)
    assert all(after[f"{i:05d}.png"] == before[f"{i:05d}.png"] for i in range(5))
    with MaskZipReader(second.masks) as masks:
        assert np.array_equal(masks[5] == 2, session.edits[(5, 2)].mask) and (masks[5] == 2).any()
    # Added and removed again before a Track: nothing to track.
    session.add_object()
    click(session, 7, 120, 40)
    assert session.remove_object(3) == "object 3 removed; the clicks are those of the last run again, which Track keeps"
    # Removed again, the run before it comes back (the message says so, as Undo's does).
    assert session.remove_object(2) == ("object 2 removed; Track brings back the run from before the change at "
                                        "once (nothing to track, unless the tracking settings changed since)")
    assert session.track(OPTIONS).describe().startswith("the prompts are again those of the run before")
    assert zip_members(session.result.masks) == before


def test_taking_a_correction_back_brings_the_run_before_it_back_at_once(session, monkeypatch):
    """Undo of a correction would otherwise re-track the whole video (the masks still hold the correction)."""
    click(session, 0, 45, 60)
    first = session.track(OPTIONS)
    before = zip_members(first.masks)
    click(session, 4, 100, 30)
    second = session.track(OPTIONS)
    corrected = zip_members(second.masks)
    assert first.masks.exists() and first.overlay.exists(), "the run a partial one is built on is kept"
    assert session.undo(4) == ("object 1 has no clicks on frame 4; Track brings back the run from before the change "
                               "at once (nothing to track, unless the tracking settings changed since)")

    def no_tracking(*args, **kwargs):
        raise AssertionError("tracked again")

    monkeypatch.setattr(session.tracker, "track", no_tracking)
    back = session.track(OPTIONS)
    assert back.describe() == ("the prompts are again those of the run before the last change, so its masks are "
                               "back (nothing was tracked)")
    assert back.summary == f"{FRAMES} frames, none tracked"
    assert session.result_files() == [str(first.overlay), str(first.masks), str(first.prompts_file)]
    assert zip_members(back.masks) == before
    assert second.masks.exists()
    # Clicked again, the correction's run comes back too, here drawn again with another look.
    click(session, 4, 100, 30)
    again = session.track(replace(OPTIONS, alpha=0.9))
    assert again.redrawn and again.describe().endswith("its masks are back (drawn again with the new look)")
    assert zip_members(again.masks) == corrected
    assert first.masks.exists() and not second.masks.exists(), "the run it replaced is kept, no other"
    session.undo(4)
    assert session.track(replace(OPTIONS, alpha=0.9)).describe().endswith("(drawn again with the new look)")
    assert zip_members(session.result.masks) == before
    # A correction taken back and another made before Track: built on the run before the first one.
    click(session, 4, 100, 30)
    session.track(replace(OPTIONS, alpha=0.9))
    session.undo(4)
    click(session, 6, 100, 30)
    monkeypatch.undo()
    other = session.track(replace(OPTIONS, alpha=0.9))
    assert other.describe() == "re-tracked from frame 6; frames before it kept their masks"
    assert all(zip_members(other.masks)[f"{i:05d}.png"] == before[f"{i:05d}.png"] for i in range(6))


def test_track_reuses_the_clicked_frames_embeddings(session):
    """SAM's image encoder (seconds a frame on a CPU) does not run again on frames the user clicked."""
    sam = session.sam
    for frame in (0, 2, 4, 6):  # one more than the cache keeps: frame 0's embedding is gone by Track
        click(session, frame, 45, 60)
    embedded = len(sam.embedded)
    session.begin_job()
    try:
        session.track(OPTIONS)
    finally:
        session.end_job()
    assert len(sam.embedded) == embedded + 1


def test_a_cancel_is_seen_between_the_prompted_frames_embeddings(disc_tracker, clip):
    cancel = threading.Event()
    cancel.set()
    embedded = len(disc_tracker.sam.embedded)
    prompts = [ObjectPrompt(1, frame, [(45, 60)], [1]) for frame in (0, 3)]
    with pytest.raises(Cancelled):
        disc_tracker.prompt_masks(probe(clip), prompts, cancel=cancel)
    assert len(disc_tracker.sam.embedded) == embedded


def test_an_object_without_clicks_is_named_in_the_results_warnings(session):
    click(session, 0, 45, 60)
    assert session.add_object() == 2
    added = []

    def progress(fraction: float, text: str) -> None:  # a third object, added and clicked while the job runs,
        if not added and text.startswith("Tracking"):  # and a correction of the first one
            added.append(session.add_object())
            click(session, 2, 45, 60)
            session.select_object(1)
            click(session, 4, 100, 30)

    session.begin_job()
    try:
        record = session.track(OPTIONS, progress=progress)
    finally:
        session.end_job()
    assert record.objects == {1} and added == [3]
    assert record.warnings[:3] == ["object 2 has no click or box on any frame: it was not tracked",
                                   "object 3 was clicked during the run, after it began: the next Track tracks it",
                                   "object 1's clicks on frame 4 changed during the run, after it began: this result "
                                   "is without the change, the next Track takes it in"]


def test_a_click_taken_back_from_a_tracked_correction_is_taken_back_from_its_mask(session):
    """Undo of one click of a correction a run applied: the preview and the next run apply the clicks left on the
    mask from before the correction, not on the run's mask that holds the click taken back."""
    click(session, 0, 45, 60)
    session.track(OPTIONS)
    for x, y, mode in ((100, 30, "positive"), (20, 100, "positive"), (45, 60, "negative")):
        click(session, 5, x, y, mode)
    with MaskZipReader(session.track(OPTIONS).masks) as masks:
        assert masks[5][30, 100] == masks[5][100, 20] == 1 and masks[5][60, 45] == 0
    assert session.undo(5) == "correcting object 1 on frame 5: 2 points"  # the negative click
    assert session.undo(5) == "correcting object 1 on frame 5: 1 point"  # the second positive one
    preview = session.edits[(5, 1)].mask
    assert preview[30, 100] and not preview[100, 20]
    record = session.track(OPTIONS)
    assert record.passes == [5]
    with MaskZipReader(record.masks) as masks:
        assert masks[5][30, 100] == 1 and masks[5][100, 20] == 0
        assert masks[5][60, 45] == session._refine_base(5, 1)[60, 45]  # the negative click's spot as tracked


def test_a_negative_correction_comes_back_from_the_prompts_file_as_a_correction(session, tmp_path, disc_tracker,
                                                                               clip):
    """A negative click alone on a tracked mask takes part of it away. The run's prompts file keeps it a
    correction: loaded in a new tab it is one again, and tracks to the same masks."""
    click(session, 0, 45, 60)
    session.track(OPTIONS)
    ys, xs = np.nonzero(session.labels(3) == 1)
    assert len(xs), "the test needs object 1 tracked on frame 3"
    x, y = int(xs[len(xs) // 2]), int(ys[len(ys) // 2])
    click(session, 3, x, y, "negative")
    assert session.edits[(3, 1)].refine and not session.labels(3)[y, x]
    record = session.track(OPTIONS)
    assert [(p.frame, p.labels, p.correct) for p in load_prompts(record.prompts_file)] == \
        [(0, [1], False), (3, [0], True)]

    message, _ = session.load_prompts_file(shutil.copy(record.prompts_file, tmp_path / "same_prompts.json"))
    assert message.endswith("they are the last run's clicks, so its result stands (Track would change nothing)")
    assert session.edits[(3, 1)].refine and not session.labels(3)[y, x]

    again = EditSession(tmp_path / "new tab", disc_tracker)
    again.open_video(clip, Limits())
    again.load_prompts_file(shutil.copy(record.prompts_file, tmp_path / "clip_prompts.json"))
    assert again.edits[(3, 1)].refine and again.edits[(3, 1)].mask is None  # nothing tracked to apply it on yet
    click(again, 3, 5, 5, "negative")
    assert again.undo(3) == "correcting object 1 on frame 3: 1 point" and again.edits[(3, 1)].mask is None
    retracked = again.track(OPTIONS)
    assert retracked.describe() == "tracked the whole video; corrections on frame 3 applied on top"
    assert zip_members(retracked.masks) == zip_members(record.masks)


def test_a_hand_written_prompts_file_tracks_the_same_in_the_page_and_the_cli(session, tmp_path):
    """Objects in any order in the file (overlapping, corrections on one frame too): the page and `track` both
    take each frame's objects in the order of their ids, so the masks are the same."""
    path = tmp_path / "hand_prompts.json"
    path.write_text(json.dumps({"objects": [
        {"id": 3, "frame": 0, "box": [30, 50, 60, 70]}, {"id": 2, "frame": 0, "points": [[45, 60]]},
        {"id": 3, "frame": 5, "points": [[50, 62]], "correct": True},
        {"id": 2, "frame": 5, "points": [[52, 58]], "correct": True}]}))
    session.load_prompts_file(path)
    record = session.track(OPTIONS)
    direct = session.tracker.track(session.video, load_prompts(path), options=OPTIONS,
                                   masks=tmp_path / "direct.zip")
    assert zip_members(direct.masks) == zip_members(record.masks)
    with MaskZipReader(record.masks) as masks:
        assert masks[0][60, 45] == 3  # the higher id wins where the two overlap


def test_a_running_job_draws_a_frame_a_second_for_the_page(session, monkeypatch):
    """The page shows a running job's latest frame with its masks: drawn at display size once a second, taken
    once."""
    click(session, 0, 45, 60)
    assert session.live_frame() is None
    monkeypatch.setattr("tracker.interactive.LIVE_SECONDS", 3600)  # the run is over before a second frame is due
    session.track(OPTIONS)
    index, picture = session.live_frame()
    assert index == 0 and Image.open(picture).size == display_size(session.info)
    assert session.live_frame() is None
    monkeypatch.setattr("tracker.interactive.LIVE_SECONDS", 0)
    session.track(OPTIONS, full=True)
    assert session.live_frame()[0] == FRAMES - 1
    session.begin_job()
    session.end_job()
    assert session.live_frame() is None


def test_a_correction_changed_during_its_run_keeps_the_mask_of_its_new_clicks(session):
    """The run's corrected mask is without the click made meanwhile: the preview keeps the click's mask."""
    click(session, 0, 45, 60)
    session.track(OPTIONS)
    click(session, 4, 100, 30)  # a correction of the tracked mask
    midway = []

    def progress(fraction: float, text: str) -> None:
        if not midway and text.startswith("Tracking"):
            midway.append(click(session, 4, 20, 100))

    session.begin_job()
    try:
        record = session.track(OPTIONS, progress=progress)
    finally:
        session.end_job()
    assert midway and "object 1's clicks on frame 4 changed during the run" in record.warnings[0]
    assert session.edits[(4, 1)].mask[100, 20] and session.edits[(4, 1)].mask[30, 100]


def test_a_truncated_upload_says_so_and_refuses_its_missing_frames(tmp_path, disc_tracker):
    whole = make_clip(tmp_path / "whole.mp4", frames=20, width=W, height=H, audio=False, faststart=True)
    session = EditSession(tmp_path / "s", disc_tracker)
    info = session.open_video(truncated_copy(whole, tmp_path / "cut.mp4", keep=0.5), Limits())
    assert info.frame_count == 20 and 0 < info.present_frames < 20
    assert f"truncated: only its first {info.present_frames} of 20 frames" in upload_message(info)
    # The headline counts what is there, and times it.
    assert f", {info.present_frames} frames, {info.present_frames / 25:.1f} s," in upload_message(info)
    assert "truncated" not in upload_message(probe(whole))
    one = make_clip(tmp_path / "one.mp4", frames=1, width=W, height=H, audio=False)
    assert upload_message(probe(one)).startswith(f"Loaded {W}x{H}, 1 frame, 0.04 s, 25 fps.")
    with pytest.raises(PromptError, match="missing from this truncated file"):
        click(session, info.present_frames, 45, 60)


def test_the_upload_message_gives_the_frame_rate_and_the_fields(tmp_path):
    """What an editor checks before tracking: NTSC's rates as such (29.97 as Matroska rounds it, too), whether
    the rate varies, and an interlaced video's field order."""
    obs = probe(make_clip(tmp_path / "obs.mkv", frames=20, fps=Fraction(30000, 1001), audio=False))
    assert ", 29.97 fps." in upload_message(obs)
    interlaced = probe(make_clip(tmp_path / "interlaced.mp4", frames=4, x264_params="bff=1", audio=False))
    assert ", 25 fps, interlaced (bottom field first)." in upload_message(interlaced)
    with av.open(str(tmp_path / "vfr.mp4"), "w") as container:  # frames 30 to 60 ms apart, as a phone's
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        stream.codec_context.time_base = Fraction(1, 1000)
        for pts in np.cumsum([0, 30, 45, 60, 35, 50, 40, 55, 30, 45]):
            frame = av.VideoFrame.from_ndarray(np.zeros((H, W, 3), np.uint8), format="rgb24")
            frame.pts, frame.time_base = int(pts), Fraction(1, 1000)
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    varying = probe(tmp_path / "vfr.mp4")
    assert varying.variable_rate and ", a variable frame rate (" in upload_message(varying)
    dropped = probe(make_clip(tmp_path / "dropped.mp4", frames=20, vfr=True, audio=False))  # 25 fps, frames missing
    assert not dropped.variable_rate
    assert " fps on average)." in upload_message(varying)
    assert " fps on average (some frames last two or more intervals: dropped frames, or frames held)." \
        in upload_message(dropped)
    assert not obs.variable_rate and not interlaced.variable_rate
    assert all(info.evenly_timed for info in (obs, interlaced, probe(make_clip(tmp_path / "c.mp4", frames=9))))


def test_frame_pictures_are_written_into_the_session_and_go_with_it(session):
    """The page's frame pictures (the user's frames with their clicks) live in the session's folder, the last
    few kept while the page may still fetch them; a handler finishing after the session closed writes none."""
    image, _ = session.render(0)
    paths = [session.preview_file(image) for _ in range(PREVIEWS_KEPT + 3)]
    assert all(path.parent == session.directory / "previews" for path in paths)
    assert len(set(paths)) == len(paths)  # a new name each time: the browser fetches the new picture
    assert sorted(session.directory.glob("previews/*.webp")) == sorted(paths[-PREVIEWS_KEPT:])
    with Image.open(paths[-1]) as written:
        assert written.format == "WEBP" and written.size == (image.shape[1], image.shape[0])
    session.close()
    assert session.preview_file(image) is None and not session.directory.exists()


def test_a_cpu_job_pauses_between_frames_while_a_click_runs_sam(disc_tracker, clip, tmp_path):
    """A click and a job share a CPU's cores: the job waits after its current frame until the click's SAM work
    is done (beside a job a click took 32 s, alone 5), and a cancel still ends it at once."""
    prompts = [ObjectPrompt(1, 0, [(40, 60)], [1])]
    done: list[int] = []
    outcome: list[object] = []
    cancel = threading.Event()

    def job() -> None:
        try:
            outcome.append(disc_tracker.track(clip, prompts, masks=tmp_path / "masks.zip", cancel=cancel,
                                              progress=lambda count, total: done.append(count)))
        except Cancelled as exc:
            outcome.append(exc)

    for cancelled in (False, True):
        done.clear()
        with disc_tracker.click_work():
            worker = threading.Thread(target=job)
            worker.start()
            deadline = time.monotonic() + 120
            while not done:
                assert time.monotonic() < deadline and worker.is_alive()
                time.sleep(0.02)
            time.sleep(1.0)
            assert done == [1]  # held after its first frame while the click works
            if cancelled:
                cancel.set()
                worker.join(5)
                assert not worker.is_alive() and isinstance(outcome[-1], Cancelled)
        worker.join(120)
        if not cancelled:
            assert done[-1] == FRAMES and outcome[-1].frames == FRAMES


def test_another_click_on_the_first_frame_re_tracks_from_it_forward_only(session):
    click(session, 0, 45, 60)
    session.track(OPTIONS)
    session.add_object()
    click(session, 0, 120, 40)
    again = session.track(OPTIONS)
    assert again.passes == [0]
    assert again.describe() == "re-tracked from frame 0"


def test_a_correction_after_frames_the_decoding_lost_keeps_the_frames_present(tmp_path):
    """A damaged video's masks zip has no entry for a lost frame; a correction after one copies the others."""
    labels = np.zeros((H, W), np.uint8)
    writer = MaskZipWriter(tmp_path / "run.zip")
    for index in (0, 2, 3):
        writer.write(index, labels + index)
    writer.close()
    copy_masks_until(tmp_path / "run.zip", 3, labels + 9, tmp_path / "corrected.zip")
    with MaskZipReader(tmp_path / "corrected.zip") as masks:
        assert [index in masks for index in range(4)] == [True, False, True, True]
        assert masks[2].max() == 2 and masks[3].max() == 9


def test_clicks_queued_while_sam_works_land_where_and_on_what_they_were_made(session):
    """The page takes each click as it is made and segments them in turn: neither the place nor the object may
    be read when a click's turn comes (by then the user clicked elsewhere, or picked another object)."""
    places = [(30, 40), (60, 50), (90, 70)]
    for x, y in places:
        session.queue_click(0, to_display(session, x, y), "positive")
    session.add_object()  # picked before the clicks' turn came
    session.queue_click(0, to_display(session, 120, 30), "positive")
    session.add_object()
    session.queue_click(0, to_display(session, 140, 100), "positive")
    session.remove_object(3)
    for _ in range(4):
        assert session.click_next() is not None
    with pytest.raises(ClickDropped, match="object 3 was removed after the click"):
        session.click_next()
    assert session.click_next() is None
    assert session.edits[(0, 1)].clicks.points == tuple(places)
    assert session.edits[(0, 2)].clicks.points == ((120, 30),)
    assert not session.clicks_waiting()


def test_the_page_holds_work_while_it_has_clicks_or_a_job(session):
    """What arms the page's leave warning: a video with objects but no clicks has nothing to lose."""
    session.add_object()
    assert not session.has_work()
    session.begin_job()
    assert session.has_work()
    session.end_job()
    session.queue_click(0, to_display(session, 40, 60), "positive")
    assert session.has_work()  # said on the page, not segmented yet
    session.click_next()
    assert session.has_work()
    session.undo(0)
    assert not session.has_work()


def test_a_re_track_with_a_correction_counts_the_time_spent_applying_it(session, monkeypatch):
    """The metrics' seconds and rate cover the whole run: the correction's SAM work before its pass too."""
    click(session, 0, 45, 60)
    session.track(OPTIONS)
    click(session, 4, 45, 60, "negative")
    assert session.edits[(4, 1)].refine
    monkeypatch.setattr(session, "_correct", slowed(session._correct, 1.5))
    began = time.perf_counter()
    record = session.track(OPTIONS, full=True)
    elapsed = time.perf_counter() - began
    seconds = float(re.search(r"tracked in ([\d.]+) s", record.summary).group(1))
    assert elapsed - 1.0 <= seconds <= elapsed + 0.1, record.summary


def rectangle(x0: int, y0: int, x1: int, y1: int, shape=(H, W)) -> np.ndarray:
    mask = np.zeros(shape, bool)
    mask[y0:y1, x0:x1] = True
    return mask


def refined(prior: np.ndarray) -> np.ndarray:
    """What DiscSam starts from when given `prior` as SAM's mask_input (its logits, upscaled again)."""
    logits = torch.from_numpy(mask_to_logits(prior))[None]
    return upscale_masks(logits, resized_shape(H, W), (H, W))[0, 0].numpy() > 0


def test_a_loaded_mask_is_a_prompt_tracked_as_it_is(session, tmp_path):
    """A mask from another tool replaces the object's clicks on the frame shown, shows at once, is tracked as it
    is, and the run's prompts file names it as a picture beside it, so the CLI tracks the same masks."""
    matte = rectangle(30, 40, 70, 90)
    Image.fromarray(matte.astype(np.uint8) * 255).save(tmp_path / "matte.png")
    click(session, 0, 120, 30)
    assert session.load_mask(0, tmp_path / "matte.png") == (
        "loaded matte.png as object 1's mask on frame 0 in place of its clicks there (Undo brings them back); "
        "clicks on it refine it, and Track tracks it")
    assert np.array_equal(session.labels(0) == 1, matte)  # the preview shows it before any Track
    first = session.track(OPTIONS)
    with MaskZipReader(first.masks) as masks:
        assert np.array_equal(masks[0] == 1, matte)  # as it is: SAM does not redraw it
    picture = first.prompts_file.with_name("clip_prompts_object1_frame0.png")
    assert first.mask_pictures == (picture,)
    assert session.result_files() == [str(first.overlay), str(first.masks), str(first.prompts_file), str(picture)]
    assert json.loads(first.prompts_file.read_text())["objects"] == [
        {"id": 1, "frame": 0, "mask": "clip_prompts_object1_frame0.png"}]
    [prompt] = load_prompts(first.prompts_file)
    assert np.array_equal(prompt.mask, matte)
    cli = session.tracker.track(session.video, load_prompts(first.prompts_file), options=OPTIONS,
                                masks=tmp_path / "cli.zip")
    assert zip_members(cli.masks) == zip_members(first.masks)

    # The same mask loaded again, from another file (RGBA, the object opaque): nothing changed.
    rgba = np.zeros((H, W, 4), np.uint8)
    rgba[..., 3] = matte * 255
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "same.png")
    session.load_mask(0, tmp_path / "same.png")
    assert session.track(OPTIONS).repeated

    # Another mask on a later frame re-tracks from there; a redraw keeps the pictures beside the prompts file.
    Image.fromarray(rectangle(80, 20, 120, 60).astype(np.uint8) * 255).save(tmp_path / "later.png")
    session.load_mask(4, tmp_path / "later.png")
    later = session.track(OPTIONS)
    assert later.describe() == "re-tracked from frame 4; frames before it kept their masks"
    assert [p.frame for p in load_prompts(later.prompts_file)] == [0, 4]
    looks = session.track(replace(OPTIONS, alpha=0.9))
    assert looks.redrawn and [p.name for p in looks.mask_pictures] == [p.name for p in later.mask_pictures]
    assert all(p.parent == looks.prompts_file.parent for p in looks.mask_pictures)
    assert [p.frame for p in load_prompts(looks.prompts_file)] == [0, 4]

    # Undo takes the loads back one by one, then the clicks they replaced come back; Clear removes the prompt.
    assert session.undo(4) == ("the loaded mask is taken back; object 1 has no clicks on frame 4; Track brings back "
                               "the run from before the change at once (nothing to track, unless the tracking settings "
                               "changed since)")
    assert session.undo(0).startswith("the loaded mask is taken back; object 1 on frame 0: a loaded mask; Track "
                                      "brings back the run from before the change")  # the same mask, loaded twice
    assert session.undo(0) == "the loaded mask is taken back; object 1 on frame 0: 1 point"
    assert np.array_equal(session.labels(0) == 1, disc(120, 30))
    assert session.clear(0) == "cleared object 1 on frame 0"
    assert not session.edits


def test_a_prompts_file_comes_back_with_the_mask_pictures_it_names(session, tmp_path, disc_tracker, clip):
    """The run's prompts file and its mask picture, chosen together, bring a loaded mask back to a new tab as a
    loaded mask (clicks on it refine it; Track gives the same masks); chosen alone, the file says what it lacks."""
    matte = rectangle(30, 40, 70, 90)
    Image.fromarray(matte.astype(np.uint8) * 255).save(tmp_path / "matte.png")
    session.load_mask(0, tmp_path / "matte.png")
    click(session, 4, 120, 30)
    first = session.track(OPTIONS)
    uploads = tmp_path / "uploads"  # as the page's uploads: a folder each, named by their own name, then removed
    chosen = []
    for index, path in enumerate([first.prompts_file, *first.mask_pictures]):
        (uploads / str(index)).mkdir(parents=True)
        chosen.append(shutil.copy(path, uploads / str(index) / path.name))
    again = EditSession(tmp_path / "again", disc_tracker, upload_folder=uploads)
    again.open_video(clip, Limits())
    with pytest.raises(PromptError, match=r"^prompts file clip_prompts.json names the mask picture "
                                          r"clip_prompts_object1_frame0.png \(object 1, frame 0\), which was not "
                                          r"chosen with it \(pictures chosen: none\); choose the prompts file and "
                                          r"the mask pictures it names together \(select them all in the file "
                                          r"dialog\)$"):
        again.load_prompts_file(shutil.copy(first.prompts_file, uploads / "clip_prompts.json"))
    assert not (uploads / "clip_prompts.json").exists() and not again.edits
    # A name given as a path reads no file of the server's, even one that is there: only the pictures chosen.
    for name in (str(first.mask_pictures[0]), f"../{first.mask_pictures[0].parent.name}/{chosen[1].name}"):
        (uploads / "path.json").write_text(json.dumps({"objects": [{"id": 1, "mask": name}]}))
        with pytest.raises(PromptError, match=rf"names the mask picture {re.escape(name)} \(object 1, frame 0\), "
                                              r"which was not chosen with it \(pictures chosen: "
                                              r"clip_prompts_object1_frame0.png\)"):
            again.load_prompts_file([uploads / "path.json", shutil.copy(chosen[1], uploads)])
    with pytest.raises(PromptError, match=r"^choose one prompts file at a time"):
        again.load_prompts_file([first.prompts_file, first.prompts_file.with_name("other.json")])
    with pytest.raises(PromptError, match=r"^no prompts file \(.json\) among the files chosen "
                                          r"\(clip_prompts_object1_frame0.png\)"):
        again.load_prompts_file(first.mask_pictures)
    assert again.prompts_file_wait(chosen).startswith("Loading prompts file clip_prompts.json: ")
    message, frame = again.load_prompts_file(chosen)
    assert message == ("loaded prompts file clip_prompts.json: 2 prompts for object 1 on frames 0, 4, in place of "
                       "the clicks before; press Track") and frame == 0
    assert not any(path.exists() for path in chosen)  # the server's copies have served
    assert list(again._embeddings) == [4]  # SAM read the clicked frame only: a mask needs none
    assert again.edits[(0, 1)].clicks.mask is not None and np.array_equal(again.labels(0) == 1, matte)
    assert zip_members(again.track(OPTIONS).masks) == zip_members(first.masks)
    assert click(again, 0, 40, 50, "negative") == "object 1 on frame 0: a loaded mask, 1 point"


def test_clicks_on_a_loaded_mask_refine_it(session, tmp_path):
    """A click on a loaded mask gives SAM the mask as its prior, as a correction's click gives it the tracked
    mask: a negative point takes a part away. Track tracks the mask shown, which the prompts file keeps."""
    matte = rectangle(30, 40, 70, 90)
    Image.fromarray(matte).save(tmp_path / "matte.png")
    session.load_mask(0, tmp_path / "matte.png")
    assert click(session, 0, 40, 50, "negative") == "object 1 on frame 0: a loaded mask, 1 point"
    shown = refined(matte) & ~disc(40, 50)
    assert np.array_equal(session.labels(0) == 1, shown)
    record = session.track(OPTIONS)
    with MaskZipReader(record.masks) as masks:
        assert np.array_equal(masks[0] == 1, shown)
    [prompt] = load_prompts(record.prompts_file)
    assert np.array_equal(prompt.mask, shown)
    assert session.undo(0) == "object 1 on frame 0: a loaded mask"
    assert np.array_equal(session.labels(0) == 1, matte)
    assert session.track(OPTIONS).describe() == "re-tracked from frame 0"


def test_a_mask_picture_that_cannot_be_used_is_refused_with_why(session, tmp_path):
    click(session, 0, 45, 60)
    Image.fromarray(np.full((60, 80), 255, np.uint8)).save(tmp_path / "small.png")
    (tmp_path / "notes.png").write_text("not a picture")
    Image.fromarray(np.zeros((H, W), np.uint8)).save(tmp_path / "black.jpg")
    Image.fromarray(np.zeros((H, W), np.uint8)).save(tmp_path / "black.png")
    ids = np.zeros((H, W), np.uint8)
    ids[10:20, 10:20] = 2
    Image.fromarray(ids).save(tmp_path / "ids.png")
    session.upload_folder = tmp_path.resolve()  # as the page's uploads: named by their own name, then removed
    for name, message in [
            ("small.png", "the mask small.png cannot be used: object 1: its mask on frame 0 is 80x60, and the video "
                          "is 160x120: a mask must have the video's size"),
            ("notes.png", "the mask notes.png is not a picture that can be read (cannot identify image file "
                          "'notes.png')"),
            ("black.jpg", "the mask black.jpg cannot be used: object 1: its mask on frame 0 is empty (no pixel on "
                          "the object)"),
            ("black.png", "the mask black.png is empty: every pixel of it is 0 (black)"),  # not "its objects: none"
            ("ids.png", r"the mask ids.png has no pixel of object 1 (its objects: 2)")]:
        with pytest.raises(PromptError) as refused:
            session.load_mask(0, tmp_path / name)
        assert str(refused.value) == message
        assert not (tmp_path / name).exists()
    assert session.edits[(0, 1)].clicks.points == ((45, 60),) and session.edits[(0, 1)].clicks.mask is None


def test_look_note_after_a_cancel_does_not_say_nothing_is_tracked(tmp_path):
    """A run a cancel stopped is gone on with by the next Track: a look changed since is not "nothing tracked"."""
    from types import SimpleNamespace

    session = EditSession(tmp_path / "s", SimpleNamespace(sam=None, add_page=lambda page: None))
    session.result = RunRecord(overlay=tmp_path / "v.mp4", masks=tmp_path / "m.zip", summary="", warnings=[],
                               prompts={}, objects=frozenset({1}), options=OPTIONS, stopped_at=9)
    note = session.look_note(Style(alpha=0.9, outline=OPTIONS.outline))
    assert "nothing is tracked" not in note
    assert "goes on from frame 9" in note


def test_a_pass_from_a_correction_remembers_the_prompts_and_corrections_before_it(session, tmp_path, monkeypatch):
    """Each pass takes the earlier prompts' and corrections' frames into XMem's memory before its own frame, the
    earliest first, in the page as in the CLI: their masks are the same."""
    import tracker.session

    remembered = []

    def recording(*args, anchors=None, **kwargs):
        remembered.append(sorted(anchors or {}))
        return track_frames(*args, anchors=anchors, **kwargs)

    track_frames = tracker.session.track_frames
    monkeypatch.setattr(tracker.session, "track_frames", recording)
    click(session, 0, 45, 60)
    session.track(OPTIONS)
    click(session, 3, 100, 30)
    click(session, 5, 20, 100)
    record = session.track(OPTIONS)
    assert record.passes == [3, 5] and remembered == [[], [0], [0, 3]]
    remembered.clear()
    direct = session.tracker.track(session.video, load_prompts(record.prompts_file), options=OPTIONS,
                                   masks=tmp_path / "direct.zip")
    assert remembered == [[], [0], [0, 3]]
    assert zip_members(direct.masks) == zip_members(record.masks)


class SlowSam(DiscSam):
    """DiscSam whose encoder takes a second, in 20 steps that can stop there as SAM's blocks can on a CPU."""

    stoppable = True
    STEPS, STEP_SECONDS = 20, 0.05

    def __init__(self):
        super().__init__()
        self.stopped = 0

    def _embed(self, image: np.ndarray) -> ImageEmbedding:
        for _ in range(self.STEPS):
            try:
                stop_point()
            except Exception:
                self.stopped += 1
                raise
            time.sleep(self.STEP_SECONDS)
        return super()._embed(image)


@pytest.fixture
def slow_session(tmp_path, cpu_tracker, clip):
    """A session on the CPU tracker with SlowSam, whose shown frames are embedded 0.1 s after they settle."""
    tracker = copy.copy(cpu_tracker)
    tracker.sam = SlowSam()
    prefetch = EmbeddingPrefetch(tracker.lock.locked, settle_seconds=0.1)
    edit = EditSession(tmp_path / "session", tracker, prefetch=prefetch)
    edit.open_video(clip, Limits())
    yield edit
    prefetch.close()
    edit.close()


def wait_for(condition: Callable[[], bool], seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_the_frame_shown_is_embedded_before_it_is_clicked(slow_session):
    """A CPU's SAM takes seconds for a frame's first click: the frame the page shows is embedded while its user
    looks at it, and the click only runs the decoder."""
    sam = slow_session.sam
    slow_session.render(2)
    wait_for(lambda: 2 in slow_session._embeddings)
    assert len(sam.embedded) == 1
    assert slow_session.click_wait(2) == "Segmenting…"
    assert click(slow_session, 2, 50, 40) == "object 1 on frame 2: 1 point"
    slow_session.render(2)  # redrawn with its mask: embedded already
    time.sleep(0.3)
    assert len(sam.embedded) == 1 and sam.stopped == 0


def test_a_click_on_the_frame_being_embedded_waits_for_that_embedding(slow_session):
    sam = slow_session.sam
    slow_session.render(1)
    wait_for(lambda: sam.embedded or slow_session._prefetch._running is not None)
    assert click(slow_session, 1, 50, 40) == "object 1 on frame 1: 1 point"
    assert len(sam.embedded) == 1 and sam.stopped == 0  # the click took the one made ahead


def test_an_embedding_made_ahead_yields_to_a_click_elsewhere_and_to_a_job(slow_session):
    """A click on another frame (or another page's), or a job, needs the SAM and the cores now: the embedding
    made ahead stops between two steps, and is made once the frame is shown again while nothing else runs."""
    sam = slow_session.sam
    slow_session.render(3)
    wait_for(lambda: slow_session._prefetch._running is not None)
    assert click(slow_session, 5, 50, 40) == "object 1 on frame 5: 1 point"
    assert sam.stopped == 1 and len(sam.embedded) == 1  # frame 5's only
    assert 3 not in slow_session._embeddings

    slow_session.render(3)
    wait_for(lambda: slow_session._prefetch._running is not None)
    with slow_session.tracker.lock:  # a job holds the device: the embedding stops, and none begins until it ends
        wait_for(lambda: sam.stopped == 2)
        slow_session.render(4)
        time.sleep(0.5)
        assert len(sam.embedded) == 1 and slow_session._prefetch._running is None
    wait_for(lambda: 4 in slow_session._embeddings)
    assert 3 not in slow_session._embeddings and len(sam.embedded) == 2


def test_only_the_frame_a_page_settles_on_is_embedded(slow_session):
    """A slider dragged across frames shows each for a moment: only the frame it stops at is embedded (one that
    began to be is stopped when the page shows another)."""
    sam = slow_session.sam
    for frame in range(FRAMES):
        slow_session.render(frame)
        time.sleep(0.02)
    wait_for(lambda: FRAMES - 1 in slow_session._embeddings)
    time.sleep(0.3)
    assert list(slow_session._embeddings) == [FRAMES - 1] and len(sam.embedded) == 1


def test_a_store_on_the_cpu_embeds_ahead_and_stops_with_its_sessions(tmp_path, cpu_tracker, clip):
    tracker = copy.copy(cpu_tracker)
    tracker.sam = SlowSam()
    store = SessionStore(tmp_path / "root", tracker)
    assert store.prefetch is not None
    session = store.get("browser-1")
    session.open_video(clip, Limits())
    session.render(0)
    wait_for(lambda: store.prefetch._running is not None, 5)
    store.close("browser-1")  # the page closed mid-embedding: it stops, and nothing is kept
    wait_for(lambda: store.prefetch._running is None, 2)
    assert tracker.sam.stopped == 1 and not tracker.sam.embedded
    store.close_all()


def test_a_click_waiting_for_the_embedding_made_ahead_keeps_it_when_the_page_moves_on(slow_session):
    """The user clicks the frame being embedded and moves to another before the mask comes (seconds on a CPU):
    the embedding the click waits for goes on."""
    sam = slow_session.sam
    slow_session.render(1)
    wait_for(lambda: slow_session._prefetch._running is not None)
    clicked = threading.Thread(target=click, args=(slow_session, 1, 50, 40))
    slow_session.click_wait(1)
    clicked.start()
    slow_session.render(6)
    clicked.join()
    assert slow_session.edits[1, 1].mask is not None
    assert sam.stopped == 0 and len(sam.embedded) >= 1 and sam.embedded.count(sam.embedded[0]) == len(sam.embedded)
    wait_for(lambda: 6 in slow_session._embeddings)
    assert len(sam.embedded) == 2


def test_an_embedding_that_fails_ahead_leaves_the_prefetch_working(slow_session, monkeypatch, caplog):
    sam = slow_session.sam
    monkeypatch.setattr(SlowSam, "STEPS", 1)
    real = DiscSam._embed
    monkeypatch.setattr(DiscSam, "_embed", lambda self, image: 1 / 0)
    slow_session.render(2)
    wait_for(lambda: "failed" in caplog.text)
    assert "SAM's embedding of frame 2, made ahead, failed" in caplog.text and "ZeroDivisionError" in caplog.text
    monkeypatch.setattr(DiscSam, "_embed", real)
    slow_session.render(3)
    wait_for(lambda: 3 in slow_session._embeddings)
    assert len(sam.embedded) == 1


def test_frames_only_looked_at_leave_the_clicked_frames_embeddings(slow_session, monkeypatch):
    """The page's frames are embedded as the user looks through the video; a Track reuses the clicked frames'
    embeddings, so those stay while there is room, and a frame looked at goes first."""
    monkeypatch.setattr(SlowSam, "STEPS", 1)
    click(slow_session, 0, 50, 40)
    click(slow_session, 2, 50, 40)
    for frame in (4, 5, 6):
        slow_session.render(frame)
        wait_for(lambda: frame in slow_session._embeddings)
    assert list(slow_session._embeddings) == [0, 2, 6]


def test_an_embedding_made_ahead_yields_to_an_undo_that_needs_sam(slow_session):
    """Undo remakes the mask of the clicks left, with SAM's decoder: it does not wait for the frame being made
    ahead (seconds on a CPU), which stops instead."""
    sam = slow_session.sam
    click(slow_session, 0, 50, 40)
    click(slow_session, 0, 90, 40)
    slow_session.render(3)
    wait_for(lambda: slow_session._prefetch._running is not None)
    assert slow_session.undo(0) == "object 1 on frame 0: 1 point"
    assert sam.stopped == 1 and 3 not in slow_session._embeddings


@pytest.fixture
def other_page(slow_session, clip):
    """Another page's session, on the same tracker and prefetch as `slow_session`."""
    other = EditSession(slow_session.directory.parent / "other", slow_session.tracker,
                        prefetch=slow_session._prefetch)
    other.open_video(clip, Limits())
    yield other
    other.close()


def embedding_ahead(session: EditSession, frame: int) -> None:
    """Show `frame` and wait until its embedding is being made ahead."""
    session.render(frame)
    wait_for(lambda: session._prefetch._running is not None)


def test_an_embedding_stopped_by_other_work_is_made_again_for_the_page_still_showing_its_frame(slow_session,
                                                                                             other_page):
    """Another user's click, or a job, stops the frame being made ahead; once that work is done the frame, still
    on this page, is made again without the page asking (its user may be looking at it all along)."""
    sam = slow_session.sam
    embedding_ahead(slow_session, 2)
    assert click(other_page, 0, 50, 40) == "object 1 on frame 0: 1 point"
    assert sam.stopped == 1
    wait_for(lambda: 2 in slow_session._embeddings)
    embedding_ahead(slow_session, 3)
    with slow_session.tracker.lock:
        wait_for(lambda: sam.stopped == 2)
    wait_for(lambda: 3 in slow_session._embeddings)


def test_an_embedding_a_click_waits_for_is_stopped_by_nothing_else(slow_session, other_page):
    """Once a click waits for the frame being made ahead, that embedding is the click's: another page's click
    and a job no longer stop it (stopped, the click would only begin it again: seconds more on a CPU)."""
    sam = slow_session.sam
    embedding_ahead(slow_session, 1)
    slow_session.click_wait(1)
    clicked = threading.Thread(target=click, args=(slow_session, 1, 50, 40))
    clicked.start()
    other_page.click_wait(0)  # another page's click, said at once; it waits for SAM below
    with slow_session.tracker.lock:  # and a job meanwhile
        time.sleep(0.3)
    assert click(other_page, 0, 50, 40) == "object 1 on frame 0: 1 point"
    clicked.join()
    assert slow_session.edits[1, 1].mask is not None
    assert sam.stopped == 0 and len(sam.embedded) == 2  # frame 1 once, and the other page's frame 0


def test_the_embedding_for_a_click_of_a_page_that_closes_stops(slow_session):
    """The page went while SAM read its frame for a click (seconds on a CPU): the embedding stops, and the
    users still there get SAM at once."""
    sam = slow_session.sam
    dropped: list[str] = []

    def clicking():
        try:
            click(slow_session, 4, 50, 40)
        except ClickDropped as exc:
            dropped.append(str(exc))

    slow_session.click_wait(4)
    clicked = threading.Thread(target=clicking)
    clicked.start()
    wait_for(lambda: sam._lock.locked())
    slow_session.close()
    clicked.join(2)
    assert not clicked.is_alive() and dropped and "closed" in dropped[0]
    assert sam.stopped == 1 and not sam.embedded


def test_a_cancel_stops_a_jobs_embedding_of_its_prompted_frame(cpu_tracker, clip, tmp_path):
    """A job embeds the prompted frames it has no embedding of (seconds each on a CPU): Cancel stops that
    between the encoder's blocks."""
    tracker = copy.copy(cpu_tracker)
    tracker.sam = SlowSam()
    cancel = threading.Event()
    timer = threading.Timer(0.3, cancel.set)
    timer.start()
    with pytest.raises(Cancelled):
        tracker.track(clip, [ObjectPrompt(1, 0, [(30, 10)])], masks=tmp_path / "m.zip", cancel=cancel)
    timer.join()
    assert tracker.sam.stopped == 1 and not tracker.sam.embedded and not (tmp_path / "m.zip").exists()
