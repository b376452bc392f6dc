"""The pipeline streams: memory stays flat with length, and backward tracking equals tracking the reversed video."""
from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pytest
import psutil
import torch

from tests.media import make_clip, slowed
from tracker.errors import TrackerError
from tracker.options import TrackOptions
from tracker.prompts import ObjectPrompt
from tracker.video import iter_frames


def write_lossless(path: Path, frames: list[np.ndarray], fps: int = 25) -> Path:
    """FFV1 in Matroska: decodes to exactly these pixels, so two clips can be compared frame for frame."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("ffv1", rate=fps)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "bgr0"
        for image in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode())
    return path


def test_backward_pass_equals_tracking_the_reversed_video(cpu_tracker, tmp_path):
    source = make_clip(tmp_path / "src.mp4", frames=9, width=64, height=48, audio=False)
    frames = [f.image for f in iter_frames(source)]
    forward = write_lossless(tmp_path / "forward.mkv", frames)
    backward = write_lossless(tmp_path / "reversed.mkv", frames[::-1])
    assert [f.image for f in iter_frames(backward)][0].tobytes() == frames[-1].tobytes()

    middle, last = 5, len(frames) - 1
    options = TrackOptions(size=0)
    point = ([(30.0, 24.0)], [1])
    ahead = [f.labels.numpy() for f in cpu_tracker.iter_tracked(forward, [ObjectPrompt(1, middle, *point)], options)]
    behind = [f.labels.numpy() for f in
              cpu_tracker.iter_tracked(backward, [ObjectPrompt(1, last - middle, *point)], options)]
    assert len(ahead) == len(behind) == len(frames)
    for index in range(middle + 1):
        assert np.array_equal(ahead[index], behind[last - index]), f"frame {index} differs"


def test_memory_stays_flat_over_a_long_video(cpu_tracker, tmp_path):
    """Resident memory at frame 2,000 is within 10% of frame 200 (every frame written to the video and zip)."""
    clip = make_clip(tmp_path / "long.mp4", frames=2000, width=64, height=48, fps=50, audio=True)
    samples: dict[int, int] = {}
    process = psutil.Process()

    def sample(done: int, total: int) -> None:
        if done in (200, 2000):
            samples[done] = process.memory_info().rss

    result = cpu_tracker.track(clip, [ObjectPrompt(1, 0, [(16, 24)], [1])], output=tmp_path / "out.mp4",
                               masks=tmp_path / "masks.zip", options=TrackOptions(size=0), progress=sample)
    assert result.frames == 2000
    assert samples[2000] <= samples[200] * 1.10, f"RSS grew from {samples[200]} to {samples[2000]} bytes"


def test_a_backward_re_track_keeps_the_earlier_frames_where_an_object_absent_from_its_start_shows(cpu_tracker,
                                                                                                   tmp_path):
    """Re-tracking backward from frame 4 knows only the objects on frame 4: one that shows only before it
    would be lost, so those frames keep the last run's masks then."""
    from tracker.render import MaskZipReader, MaskZipWriter
    from tracker.session import PreviousRun

    clip = make_clip(tmp_path / "clip.mp4", frames=8, width=64, height=48, audio=False)
    prompt = [ObjectPrompt(1, 4, [(30.0, 24.0)], [1])]
    first = cpu_tracker.track(clip, prompt, masks=tmp_path / "first.zip", options=TrackOptions(size=0))
    assert first.kept_frames == 0
    with MaskZipReader(tmp_path / "first.zip") as masks:
        labels = [masks[i] for i in range(8)]
    labels[1][:4, :4] = 9  # object 9 shows on frame 1 only
    writer = MaskZipWriter(tmp_path / "hidden.zip")
    for index, label_map in enumerate(labels):
        writer.write(index, label_map)
    writer.close()

    again = cpu_tracker.track(clip, prompt, masks=tmp_path / "kept.zip", options=TrackOptions(size=0),
                              previous=PreviousRun(tmp_path / "hidden.zip", 4, backward=True))
    assert again.kept_frames == 4
    with MaskZipReader(tmp_path / "kept.zip") as masks:
        assert (masks[1][:4, :4] == 9).all()
    retracked = cpu_tracker.track(clip, prompt, masks=tmp_path / "again.zip", options=TrackOptions(size=0),
                                  previous=PreviousRun(tmp_path / "first.zip", 4, backward=True))
    assert retracked.kept_frames == 0
    with MaskZipReader(tmp_path / "again.zip") as masks:  # from the same prompt: what the first run tracked
        assert all(np.array_equal(masks[i], labels[i]) for i in range(8) if i != 1)


def test_a_re_track_from_a_frame_a_correction_left_without_objects_keeps_its_objects_empty(cpu_tracker, tmp_path):
    """A correction that erases the only object on frame 3 leaves a frame to track from with no object on it: the
    frames before keep their masks, and the object stays one of XMem's, empty there (no error)."""
    from tracker.render import MaskZipReader, copy_masks_until
    from tracker.session import PreviousRun

    clip = make_clip(tmp_path / "clip.mp4", frames=8, width=64, height=48, audio=False)
    prompt = [ObjectPrompt(1, 0, [(30.0, 24.0)], [1])]
    cpu_tracker.track(clip, prompt, masks=tmp_path / "first.zip", options=TrackOptions(size=0))
    copy_masks_until(tmp_path / "first.zip", 3, np.zeros((48, 64), np.uint8), tmp_path / "erased.zip")
    again = cpu_tracker.track(clip, prompt, masks=tmp_path / "again.zip", options=TrackOptions(size=0),
                              previous=PreviousRun(tmp_path / "erased.zip", 3))
    assert again.frames == 8 and again.kept_frames == 3
    with MaskZipReader(tmp_path / "first.zip") as first, MaskZipReader(tmp_path / "again.zip") as masks:
        assert all(np.array_equal(masks[i], first[i]) for i in range(3))
        assert not masks[3].any()
    with pytest.raises(TrackerError, match="iter_tracked streams one pass, so track"):
        cpu_tracker.iter_tracked(clip, [*prompt, ObjectPrompt(1, 3, [(30.0, 24.0)], [0], correct=True)])


def test_a_run_with_corrections_counts_the_time_spent_applying_them(cpu_tracker, tmp_path, monkeypatch):
    """The summary's seconds and rate cover the whole run: the corrections' SAM work between the passes too."""
    import time

    clip = make_clip(tmp_path / "clip.mp4", frames=6, width=64, height=48, audio=False)
    prompts = [ObjectPrompt(1, 0, [(30.0, 24.0)], [1]), ObjectPrompt(1, 3, [(10.0, 10.0)], [0], correct=True)]
    monkeypatch.setattr(cpu_tracker, "correct", slowed(cpu_tracker.correct, 1.5))
    began = time.perf_counter()
    result = cpu_tracker.track(clip, prompts, masks=tmp_path / "masks.zip", options=TrackOptions(size=0))
    elapsed = time.perf_counter() - began
    assert result.passes == 2
    assert elapsed - 1.0 <= result.seconds <= elapsed


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))])
def device_tracker(request, untrained_checkpoints, cpu_tracker):
    """The CPU tracker, and one on the GPU (XMem's fast path and its CUDA graphs) where there is one."""
    from tracker.session import Tracker

    if request.param == "cpu":
        return cpu_tracker
    return Tracker(untrained_checkpoints["sam"], untrained_checkpoints["xmem"], device="cuda", download=False)


def test_a_re_track_remembers_the_prompts_frame_before_it(device_tracker, tmp_path):
    """Going on from frame 4 of a run prompted on frame 0, XMem first takes frame 0's masks into its memory, as the
    run did: the frames after 4 change with what frame 0 holds, and not with a tracked frame between (frame 2)."""
    from tracker.render import MaskZipReader, MaskZipWriter
    from tracker.session import PreviousRun

    clip = make_clip(tmp_path / "clip.mp4", frames=8, width=64, height=48, audio=False)
    prompt = [ObjectPrompt(1, 0, [(30.0, 24.0)], [1])]
    options = TrackOptions(size=0)
    device_tracker.track(clip, prompt, masks=tmp_path / "first.zip", options=options)
    with MaskZipReader(tmp_path / "first.zip") as masks:
        labels = [np.array(masks[i]) for i in range(8)]

    def went_on(name: str, changed: int | None) -> list[np.ndarray]:
        edited = [label_map.copy() for label_map in labels]
        if changed is not None:
            edited[changed] = np.where(edited[changed] == 1, 0, 1).astype(np.uint8)  # the object's complement
        writer = MaskZipWriter(tmp_path / f"{name}.zip")
        for index, label_map in enumerate(edited):
            writer.write(index, label_map)
        writer.close()
        result = device_tracker.track(clip, prompt, masks=tmp_path / f"{name}-again.zip", options=options,
                                      previous=PreviousRun(tmp_path / f"{name}.zip", 4))
        assert result.kept_frames == 4
        with MaskZipReader(result.masks) as masks:
            return [np.array(masks[i]) for i in range(8)]

    same = went_on("same", None)
    assert all(np.array_equal(same[i], labels[i]) for i in range(5))
    prompt_frame_changed = went_on("prompt-frame", 0)
    tracked_frame_changed = went_on("tracked-frame", 2)
    assert any(not np.array_equal(prompt_frame_changed[i], same[i]) for i in range(5, 8))
    assert all(np.array_equal(tracked_frame_changed[i], same[i]) for i in range(4, 8))
