"""Bad input and failures mid-job: every one ends in a one-line TrackerError or a valid output, never a
half-written file, a stray temp file or a tracker that no longer works.

SAM's image encoder costs seconds per frame on a CPU whatever the clip size, so the `tracker` fixture
computes one real embedding per frame shape and reuses it; everything after it (SAM's decoder, XMem,
decoding, writing) runs for real on every call.
"""
from __future__ import annotations

import errno
import os
import random
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from tests.media import make_audio_only, make_clip, make_empty_file, make_text_file, noisy_copy, truncated_copy
from tracker import pipeline, weights
from tracker.errors import Cancelled, PromptError, TrackerError, VideoError, WeightsError
from tracker.prompts import ObjectPrompt, load_prompts
from tracker.options import TrackOptions
from tracker.render import MaskZipReader
from tracker.session import DeviceTurns, Tracker, TrackResult, load_xmem
from tracker.weights import MODELS_DIR_ENV
from tracker.video import VideoWriter, iter_frames, probe

ROOT = Path(__file__).resolve().parents[1]
WIDTH, HEIGHT, FRAMES = 64, 48, 6
CLICK = [ObjectPrompt(1, 0, [(32, 24)], [1])]
MUTANTS = 50

_embeddings: dict[tuple[int, ...], object] = {}


@pytest.fixture
def tracker(cpu_tracker, monkeypatch) -> Tracker:
    """The session's CPU tracker with one real SAM embedding per frame shape; checks it is left unlocked."""
    real_embed = cpu_tracker.sam.embed

    def embed(image: np.ndarray, **options):
        if image.shape not in _embeddings:
            _embeddings[image.shape] = real_embed(image, **options)
        return _embeddings[image.shape]

    monkeypatch.setattr(cpu_tracker.sam, "embed", embed)
    yield cpu_tracker
    assert not cpu_tracker.lock.locked(), "a failed job left the tracker locked"


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    return make_clip(tmp_path_factory.mktemp("robust") / "clip.mp4", frames=FRAMES, width=WIDTH, height=HEIGHT,
                     audio=False, gop=3, faststart=True)


def decoded_count(path: Path) -> int:
    with av.open(str(path)) as container:
        return sum(1 for _ in container.decode(container.streams.video[0]))


def complete_packets(path: Path, size: int) -> int:
    """Video packets of `path` that lie wholly within its first `size` bytes: every one is a frame a cut keeps."""
    with av.open(str(path)) as container:
        return sum(1 for p in container.demux(container.streams.video[0]) if p.size and p.pos + p.size <= size)


def leftovers(folder: Path) -> list[str]:
    """Files a failed job must not leave: outputs and the writers' hidden temp files."""
    return sorted(p.name for p in folder.rglob("*") if p.is_file() and p.suffix in (".mp4", ".zip", ".part"))


def one_line(exc: BaseException) -> str:
    message = str(exc)
    assert message and "\n" not in message
    return message


def assert_usable(tracker: Tracker, clip: Path, folder: Path) -> None:
    result = tracker.track(clip, CLICK, output=folder / "after.mp4")
    assert result.frames == FRAMES and decoded_count(folder / "after.mp4") == FRAMES


# --- unusable inputs ---------------------------------------------------------------------------------

@pytest.mark.parametrize("make, message", [
    (make_text_file, "not a video"),
    (make_empty_file, "empty"),
    (make_audio_only, "only audio"),
])
def test_unusable_video_is_a_one_line_error_and_writes_nothing(tracker, tmp_path, make, message):
    video = make(tmp_path / "upload.mp4")
    out = tmp_path / "out"
    with pytest.raises(VideoError, match=message) as err:
        tracker.track(video, CLICK, output=out / "o.mp4", masks=out / "m.zip")
    assert "upload.mp4" in one_line(err.value)
    assert not out.exists()
    with pytest.raises(VideoError, match=message):
        tracker.iter_tracked(video, CLICK)  # at the call, not at the first frame


def test_cli_audio_only_exits_2_without_traceback(untrained_checkpoints, tmp_path):
    video = make_audio_only(tmp_path / "song.mp4")
    out = tmp_path / "o.mp4"
    done = subprocess.run([sys.executable, "-m", "tracker", "track", str(video), "--point", "5,5", "--out", str(out),
                           "--sam-checkpoint", str(untrained_checkpoints["sam"]),
                           "--xmem-checkpoint", str(untrained_checkpoints["xmem"]), "--device", "cpu",
                           "--no-download"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "only audio" in errors[0] and "song.mp4" in errors[0]
    assert "Traceback" not in done.stderr
    assert leftovers(tmp_path) == ["song.mp4"]


def test_truncated_mp4_tracks_what_decodes_and_says_what_was_lost(tracker, tmp_path):
    source = make_clip(tmp_path / "src.mp4", frames=24, width=WIDTH, height=HEIGHT, audio=False, gop=3,
                       faststart=True)
    damaged = truncated_copy(source, tmp_path / "cut.mp4", keep=0.5)
    decodable = len(list(iter_frames(damaged)))
    assert 0 < decodable == complete_packets(source, damaged.stat().st_size) < 24
    result = tracker.track(damaged, CLICK, output=tmp_path / "o.mp4", masks=tmp_path / "m.zip")
    assert (result.frames, result.expected_frames, result.lost_frames) == (decodable, 24, 24 - decodable)
    assert f"{24 - decodable} of 24 frames could not be decoded" in result.summary()
    assert decoded_count(tmp_path / "o.mp4") == decodable
    assert probe(tmp_path / "o.mp4").frame_count == decodable


def test_an_mp4_cut_before_its_index_is_named_cut_short(tmp_path):
    """An MP4 whose index comes last (a camera's or a phone's, cut off mid-copy) has no frame to show: the
    message says why, not that the format is unknown."""
    source = make_clip(tmp_path / "src.mp4", frames=24, width=WIDTH, height=HEIGHT, audio=False)
    data = source.read_bytes()
    index = data.rindex(b"moov") - 4
    for keep in (0.5, (index + len(data)) / 2 / len(data)):  # the index missing, or cut in its middle
        with pytest.raises(VideoError, match=r"^cut.mp4 is cut short: it is an MP4/MOV whose index \(the 'moov' "
                                             r"box, which it keeps at its end\) is missing or incomplete"):
            probe(truncated_copy(source, tmp_path / "cut.mp4", keep=keep))
    (tmp_path / "text.mp4").write_text("not a video " * 100)
    with pytest.raises(VideoError, match="is not a video FFmpeg can read"):
        probe(tmp_path / "text.mp4")


def test_one_frame_video(tracker, tmp_path):
    video = make_clip(tmp_path / "one.mp4", frames=1, width=WIDTH, height=HEIGHT, audio=False)
    result = tracker.track(video, CLICK, output=tmp_path / "o.mp4", masks=tmp_path / "m.zip")
    assert result.frames == 1 and result.lost_frames == 0
    assert decoded_count(tmp_path / "o.mp4") == 1


# --- formats that must work --------------------------------------------------------------------------

def test_ten_bit_input_gives_8_bit_output(tracker, tmp_path):
    video = make_clip(tmp_path / "ten.mp4", frames=4, width=WIDTH, height=HEIGHT, audio=False,
                      pix_fmt="yuv420p10le")
    assert probe(video).pix_fmt == "yuv420p10le"
    result = tracker.track(video, CLICK, output=tmp_path / "o.mp4")
    assert result.frames == 4
    out = probe(tmp_path / "o.mp4")
    assert (out.pix_fmt, out.frame_count) == ("yuv420p", 4)


def test_variable_frame_rate_keeps_its_timestamps(tracker, tmp_path):
    video = make_clip(tmp_path / "vfr.mp4", frames=8, width=WIDTH, height=HEIGHT, audio=False, vfr=True)
    tracker.track(video, CLICK, output=tmp_path / "o.mp4")
    source = [f.time for f in iter_frames(video)]
    written = [f.time for f in iter_frames(tmp_path / "o.mp4")]
    assert len(set(np.round(np.diff(source), 3))) > 1, "the input should have uneven intervals"
    assert np.allclose(np.array(written) - written[0], np.array(source) - source[0], atol=1e-3)


@pytest.mark.parametrize("rotation", [90, 180, 270])
def test_rotation_is_honoured(tracker, tmp_path, rotation):
    # Display 63x45 (odd, stored turned when 90/270): the output is the display size rounded up to even.
    video = make_clip(tmp_path / "rot.mp4", frames=3, width=63, height=45, audio=False, rotation=rotation,
                      pix_fmt="yuv444p")
    info = probe(video)
    assert (info.width, info.height, info.rotation) == (63, 45, rotation)
    result = tracker.track(video, [ObjectPrompt(1, 0, [(60, 10)], [1])], output=tmp_path / "o.mp4")
    out = probe(tmp_path / "o.mp4")
    assert result.frames == 3 and (out.width, out.height, out.rotation) == (64, 46, 0)


def test_vp9_with_alpha_in_webm(tracker, tmp_path):
    try:
        video = make_clip(tmp_path / "alpha.webm", frames=4, width=WIDTH, height=HEIGHT, audio=False,
                          codec="libvpx-vp9", pix_fmt="yuva420p")
    except (av.FFmpegError, ValueError) as exc:
        pytest.skip(f"this FFmpeg cannot write VP9 with alpha: {exc}")
    result = tracker.track(video, CLICK, output=tmp_path / "o.mp4")
    assert result.frames == 4 and decoded_count(tmp_path / "o.mp4") == 4


# --- prompts -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("prompt, message", [
    (ObjectPrompt(1, 0, [(-1, 5)], [1]), "outside the 64x48 frame"),
    (ObjectPrompt(1, 0, [(64, 5)], [1]), "outside the 64x48 frame"),
    (ObjectPrompt(1, 0, [(float("nan"), 5)], [1]), "must be finite"),
    (ObjectPrompt(1, 0, box=(10, 10, 10, 30)), "zero area"),
    (ObjectPrompt(1, FRAMES, [(5, 5)], [1]), "past the end"),
])
def test_bad_prompt_through_the_api(tracker, clip, tmp_path, prompt, message):
    with pytest.raises(PromptError, match=message) as err:
        tracker.track(clip, [prompt], output=tmp_path / "o.mp4", masks=tmp_path / "m.zip")
    one_line(err.value)
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("content, message", [
    (b'{"objects": [{"id": 1, "points": [["a", 2]], "labels": [1]}]}', r"objects\[0\] is malformed"),
    (b"\xff\xfe\x00 not text", "not valid JSON"),
])
def test_malformed_prompts_file_through_the_api(tmp_path, content, message):
    bad = tmp_path / "p.json"
    bad.write_bytes(content)
    with pytest.raises(PromptError, match=message) as err:
        load_prompts(bad)
    one_line(err.value)


# --- checkpoints -------------------------------------------------------------------------------------

def test_missing_and_wrong_checkpoints_through_the_tracker(untrained_checkpoints, tmp_path):
    expected = "xmem.pth does not exist; .*download https://github.com/hkchengrex/XMem/.* save it as"
    with pytest.raises(WeightsError, match=expected) as err:
        Tracker(untrained_checkpoints["sam"], tmp_path / "xmem.pth", device="cpu", download=False)
    one_line(err.value)
    with pytest.raises(WeightsError, match=r"sam.pth does not exist; .*dl.fbaipublicfiles.*; and .*xmem.pth does "
                                           r"not exist; .*hkchengrex"):  # both at once: one trip to fetch them
        Tracker(tmp_path / "sam.pth", tmp_path / "xmem.pth", device="cpu", download=False)
    with pytest.raises(WeightsError, match="not in the XMem layout.*SAM ViT-B weights given in place of XMem"):
        load_xmem(untrained_checkpoints["sam"], torch.device("cpu"))


def test_truncated_xmem_checkpoint_through_the_tracker(untrained_checkpoints, tmp_path):
    cut = tmp_path / "XMem.pth"
    data = untrained_checkpoints["xmem"].read_bytes()
    cut.write_bytes(data[: len(data) // 3])
    with pytest.raises(WeightsError, match="truncated.*give the checkpoint file itself .the official one: https"):
        Tracker(untrained_checkpoints["sam"], cut, device="cpu", download=False)


# --- output paths and failures while writing ---------------------------------------------------------

def test_missing_output_folders_are_created(tracker, clip, tmp_path):
    out, masks = tmp_path / "a" / "b" / "o.mp4", tmp_path / "c" / "m.zip"
    result = tracker.track(clip, CLICK, output=out, masks=masks)
    assert result.frames == FRAMES and decoded_count(out) == FRAMES and masks.is_file()
    assert leftovers(tmp_path) == ["m.zip", "o.mp4"]


@pytest.mark.parametrize("paths", [
    dict(output="in.mp4"), dict(masks="in.mp4"), dict(output="./sub/../in.mp4"),
    dict(output="both.mp4", masks="both.mp4")])
def test_outputs_that_would_overwrite_the_input_or_each_other_are_refused(tracker, clip, tmp_path, paths):
    video = tmp_path / "in.mp4"
    video.write_bytes(clip.read_bytes())
    (tmp_path / "sub").mkdir()
    with pytest.raises(TrackerError, match="is the input video|give them different paths") as err:
        tracker.track(video, CLICK, **{key: tmp_path / name for key, name in paths.items()})
    one_line(err.value)
    assert video.read_bytes() == clip.read_bytes() and leftovers(tmp_path) == ["in.mp4"]


@pytest.mark.parametrize("paths, message", [
    (dict(output="o.avi"), r"the output video o.avi would be misnamed: end its name in .mp4, .m4v, .mov or .mkv"),
    (dict(masks="m.tar"), "m.tar would be misnamed: end its name in .zip"),
    (dict(output="results"), "the output video results has no ending: end its name in .mp4, .* \\(or, for a new "
                             "folder to hold it, end the name in a slash: results/\\)"),
    (dict(output=".mp4"), "the output video .mp4 has no name before its ending: name it, as in clip.mp4"),
    (dict(masks="pipe.zip"), "the masks zip .*pipe.zip is not a regular file \\(a device or a pipe\\)")])
def test_outputs_that_are_folders_or_misnamed_are_refused(tracker, clip, tmp_path, paths, message):
    """A device or pipe at the path (`/dev/null`) would be replaced by the finished file, as root even /dev/null."""
    (tmp_path / "folder").mkdir()
    os.mkfifo(tmp_path / "pipe.zip")
    with pytest.raises(TrackerError, match=message) as err:
        tracker.track(clip, CLICK, **{key: tmp_path / name for key, name in paths.items()})
    one_line(err.value)
    assert leftovers(tmp_path) == [] and (tmp_path / "pipe.zip").is_fifo()


def test_a_folder_as_output_holds_files_named_after_the_video(tracker, clip, tmp_path):
    """As on the command line: an existing folder, or a name ending in a slash, gets <video>_tracked.mp4 and
    <video>_masks.zip."""
    (tmp_path / "folder").mkdir()
    result = tracker.track(clip, CLICK, output=tmp_path / "folder", masks=f"{tmp_path}/new/")
    assert result.output == tmp_path / "folder" / f"{clip.stem}_tracked.mp4" and result.output.is_file()
    assert result.masks == tmp_path / "new" / f"{clip.stem}_masks.zip" and result.masks.is_file()


def test_track_video_checks_the_job_before_loading_the_weights(clip, tmp_path):
    from tracker import track_video

    absent = dict(device="cpu", sam_checkpoint=tmp_path / "absent.pth", xmem_checkpoint=tmp_path / "absent.pth")
    with pytest.raises(PromptError, match="frame 99"):
        track_video(clip, [ObjectPrompt(1, 99, [(5, 5)], [1])], output=tmp_path / "o.mp4", **absent)
    with pytest.raises(TrackerError, match="options must be a TrackOptions .*not a dict"):
        track_video(clip, CLICK, output=tmp_path / "o.mp4", options={"size": 100}, **absent)
    with pytest.raises(VideoError, match="an output path is empty"):  # not the current folder
        track_video(clip, CLICK, masks="", **absent)
    with pytest.raises(TrackerError, match="fp16 runs on CUDA GPUs only"):
        track_video(clip, CLICK, output=tmp_path / "o.mp4", options=TrackOptions(precision="fp16"), **absent)
    with pytest.raises(TrackerError, match="unknown precision 'fp8'; use auto, fp32, bf16 or fp16"):
        TrackOptions(precision="fp8")
    assert leftovers(tmp_path) == []


def test_track_video_can_refuse_to_download(clip, tmp_path, monkeypatch):
    """A script's `download=False` is the CLI's --no-download: a missing official checkpoint is an error."""
    from tracker import track_video

    monkeypatch.setenv(MODELS_DIR_ENV, str(tmp_path / "models"))
    monkeypatch.setattr(weights, "_download", lambda *args, **kwargs: pytest.fail("it downloaded"))
    with pytest.raises(WeightsError, match="sam_vit_b_01ec64.pth"):
        track_video(clip, CLICK, output=tmp_path / "o.mp4", device="cpu", download=False)
    assert not (tmp_path / "o.mp4").exists()


def test_a_file_cut_short_warns_that_only_its_frames_present_were_tracked(tracker, tmp_path):
    whole = make_clip(tmp_path / "whole.webm", frames=30, width=64, height=48, codec="libvpx-vp9",
                      audio_codec="libopus")
    cut = truncated_copy(whole, tmp_path / "cut.webm", keep=0.5)
    result = tracker.track(cut, CLICK, masks=tmp_path / "m.zip")
    assert any(warning.startswith("the file seems cut short") for warning in result.warnings), result.warnings
    assert result.frames == result.expected_frames < 30


def test_crf_0_warns_that_browsers_cannot_play_the_video(tracker, clip, tmp_path):
    result = tracker.track(clip, CLICK, output=tmp_path / "o.mp4", options=TrackOptions(crf=0))
    assert any("lossless H.264" in warning for warning in result.warnings)
    assert not any("very small" in warning for warning in result.warnings), "480 on a 48-pixel clip is its own size"


def test_a_tiny_working_resolution_warns(tracker, clip, tmp_path):
    result = tracker.track(clip, CLICK, masks=tmp_path / "m.zip", options=TrackOptions(size=16))
    assert "the working resolution 16 px (shorter side) is very small: the masks are coarse; 480 suits most " \
           "videos" in result.warnings


def test_untrained_weights_warn_a_script(untrained_checkpoints):
    from tracker import UntrainedWeightsWarning

    with pytest.warns(UntrainedWeightsWarning, match="UNTRAINED WEIGHTS"):
        Tracker(untrained_checkpoints["sam"], untrained_checkpoints["xmem"], device="cpu", download=False)


@pytest.mark.parametrize("which", ["output", "masks"])
def test_unwritable_output_is_a_clear_error_and_leaves_nothing(tracker, clip, tmp_path, which):
    blocker = tmp_path / "file.txt"
    blocker.write_text("a file where a folder should be")
    paths = {"output": tmp_path / "o.mp4", "masks": tmp_path / "m.zip"}
    paths[which] = blocker / paths[which].name
    with pytest.raises(VideoError, match="cannot write to .*file.txt.*choose a folder") as err:
        tracker.track(clip, CLICK, **paths)
    one_line(err.value)
    assert leftovers(tmp_path) == []  # the other writer, already open, is removed too


def test_nothing_to_write_is_refused_before_sam_runs(tracker, clip, monkeypatch):
    monkeypatch.setattr(tracker.sam, "embed",
                        lambda image, **options: pytest.fail("SAM ran for a job that writes nothing"))
    with pytest.raises(TrackerError, match="nothing to write: give an output video path and/or a masks zip path"):
        tracker.track(clip, CLICK)


def test_disk_full_while_writing(tracker, clip, tmp_path):
    calls = []

    def full(self, image, pts, time):
        calls.append(pts)
        if len(calls) >= 3:
            raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(VideoWriter, "write", full)
        with pytest.raises(TrackerError, match="No space left on device; free some disk space") as err:
            tracker.track(clip, CLICK, output=tmp_path / "o.mp4", masks=tmp_path / "m.zip")
    one_line(err.value)
    assert leftovers(tmp_path) == []
    assert_usable(tracker, clip, tmp_path)


def test_no_room_for_the_frames_before_a_late_prompt_is_an_error_not_a_crash(tracker, clip, tmp_path, monkeypatch):
    """Frames before the first prompt are cached on disk through a memory map, where a full disk is a SIGBUS
    that kills the process: their space is reserved first, and a full temporary folder is reported."""
    cache = tmp_path / "tmp"
    cache.mkdir()

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    late = [ObjectPrompt(1, 3, [(32, 24)], [1])]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pipeline.tempfile, "tempdir", str(cache))
        patch.setattr(os, "posix_fallocate", full, raising=False)
        with pytest.raises(VideoError, match=r"the frames before the first prompt \(0.0 MiB\) could not be cached "
                                             f"in the temporary folder {cache}: No space left on device; free some "
                                             "disk space there, or point TMPDIR at a folder with room") as err:
            tracker.track(clip, late, output=tmp_path / "o.mp4", masks=tmp_path / "m.zip")
    one_line(err.value)
    assert leftovers(tmp_path) == [] and list(cache.iterdir()) == []
    assert_usable(tracker, clip, tmp_path)


def test_crash_mid_job_leaves_no_file(tracker, clip, tmp_path):
    def crash(done: int, total: int) -> None:
        if done == 3:
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        tracker.track(clip, CLICK, output=tmp_path / "o.mp4", masks=tmp_path / "m.zip", progress=crash)
    assert leftovers(tmp_path) == []
    assert_usable(tracker, clip, tmp_path)


def test_cancel_mid_run_writes_nothing(tracker, clip, tmp_path):
    cancel = threading.Event()
    seen = []

    def progress(done: int, total: int) -> None:
        seen.append(done)
        if done == 2:
            cancel.set()

    with pytest.raises(Cancelled):
        tracker.track(clip, CLICK, output=tmp_path / "o.mp4", masks=tmp_path / "m.zip", cancel=cancel,
                      progress=progress)
    assert seen == [1, 2]
    assert leftovers(tmp_path) == []
    stream = tracker.iter_tracked(clip, CLICK, cancel=cancel)
    with pytest.raises(Cancelled):
        list(stream)


def cancel_at(cancel: threading.Event, count: int):
    """A progress report that sets `cancel` at the `count`th frame done."""
    def progress(done: int, total: int) -> None:
        if done == count:
            cancel.set()
    return progress


def test_a_cancel_can_keep_the_frames_done_with_the_sound_cut_there(tracker, tmp_path):
    """`keep_on_cancel` (the page's Cancel): the files end at the last frame written, and the sound with them; a
    cancel before the first frame is written keeps nothing."""
    video = make_clip(tmp_path / "voiced.mp4", frames=12, width=WIDTH, height=HEIGHT, audio_seconds=1.0)
    cancel = threading.Event()

    result = tracker.track(video, CLICK, output=tmp_path / "o.mp4", masks=tmp_path / "m.zip", cancel=cancel,
                           progress=cancel_at(cancel, 5), keep_on_cancel=True)
    stopped = result.stopped_at
    assert stopped in (3, 4) and result.frames == stopped + 1 and result.lost_frames == 0
    assert f"cancelled after frame {stopped}: the frames after it are not tracked" in result.summary()
    assert decoded_count(tmp_path / "o.mp4") == stopped + 1
    with MaskZipReader(tmp_path / "m.zip") as masks:
        assert masks.frames() == list(range(stopped + 1))
    with av.open(str(tmp_path / "o.mp4")) as container:
        audio = container.streams.audio[0]
        ends = [float((p.pts + p.duration) * p.time_base) for p in container.demux(audio) if p.pts is not None]
    video_end = (stopped + 1) / 25
    assert video_end - 0.05 < max(ends) < video_end + 0.05  # the clip's sound lasts 1 s

    late = [ObjectPrompt(1, 5, [(32, 24)], [1])]
    cancel.clear()
    with pytest.raises(Cancelled):  # while frames 4 to 0 are tracked backward from frame 5: none written yet
        tracker.track(video, late, output=tmp_path / "late.mp4", cancel=cancel, progress=cancel_at(cancel, 3),
                      keep_on_cancel=True)
    assert leftovers(tmp_path) == ["m.zip", "o.mp4", "voiced.mp4"]
    cancel.clear()
    early = tracker.track(video, late, output=tmp_path / "late.mp4", cancel=cancel, progress=cancel_at(cancel, 5 + 4),
                          keep_on_cancel=True)  # frames before frame 5, tracked backward from it, are kept too
    assert early.stopped_at in (2, 3) and decoded_count(tmp_path / "late.mp4") == early.stopped_at + 1


def test_a_kept_cancel_of_a_run_with_corrections_keeps_the_last_pass_frames(tracker, tmp_path):
    """With corrections, the passes before the last write no video: a cancel there keeps nothing, one in the last
    pass keeps the frames written."""
    video = make_clip(tmp_path / "clip.mp4", frames=12, width=WIDTH, height=HEIGHT, audio=False)
    prompts = [*CLICK, ObjectPrompt(1, 3, [(20, 20)], [1], correct=True)]
    cancel = threading.Event()

    with pytest.raises(Cancelled):
        tracker.track(video, prompts, output=tmp_path / "o.mp4", cancel=cancel, progress=cancel_at(cancel, 6),
                      keep_on_cancel=True)
    assert leftovers(tmp_path) == ["clip.mp4"]
    cancel.clear()
    result = tracker.track(video, prompts, output=tmp_path / "o.mp4", masks=tmp_path / "m.zip", cancel=cancel,
                           progress=cancel_at(cancel, 12 + 9), keep_on_cancel=True)  # the second pass's frame 8
    assert result.stopped_at in (7, 8) and result.passes == 2
    assert decoded_count(tmp_path / "o.mp4") == result.stopped_at + 1
    with MaskZipReader(tmp_path / "m.zip") as masks:
        assert masks.frames() == list(range(result.stopped_at + 1))


def test_cancel_stops_the_reading_of_the_frames_before_a_late_prompt(tracker, tmp_path, monkeypatch):
    """Frames before the first prompt are read into a cache before they are tracked backward: seconds to
    minutes of a long video, which a cancel must not wait out."""
    video = make_clip(tmp_path / "clip.mp4", frames=60, width=160, height=120, fps=25)
    read = []

    def counted(*args, **kwargs):
        for frame in iter_frames(*args, **kwargs):
            read.append(frame.index)
            yield frame

    monkeypatch.setattr(pipeline, "iter_frames", counted)
    mask = np.zeros((120, 160), bool)
    mask[40:80, 40:80] = True
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(Cancelled):
        for _ in pipeline.track_frames(tracker.xmem, probe(video), {59: {1: mask}}, TrackOptions(size=120),
                                       tracker.device, cancel=cancel):
            pass
    assert len(read) < 10


def test_a_streamed_job_holds_the_device_until_its_iterator_ends(tracker, clip, tmp_path):
    """iter_tracked ran beside another job on the same network (its graphs and buffers are the device's):
    a second job now waits its turn, and a stream left early gives the device back."""
    stream = tracker.iter_tracked(clip, CLICK)
    next(stream)
    assert tracker.lock.locked()
    with pytest.raises(TrackerError, match="earlier job still holds the device"):  # not a wait for ever
        tracker.track(clip, CLICK, output=tmp_path / "o.mp4")
    stream.close()
    assert not tracker.lock.locked()
    assert len(list(tracker.iter_tracked(clip, CLICK))) == probe(clip).frame_count and not tracker.lock.locked()


def test_cancel_while_waiting_for_the_device_ends_the_wait_at_once(tracker, clip, tmp_path):
    """A job queued behind another (or behind the warm-up) stops as soon as it is cancelled, writing nothing."""
    cancel, outcome = threading.Event(), []

    def job() -> None:
        try:
            tracker.track(clip, CLICK, output=tmp_path / "o.mp4", cancel=cancel)
        except Cancelled as exc:
            outcome.append(exc)

    with tracker.lock:  # the job ahead
        waiting = threading.Thread(target=job)
        waiting.start()
        time.sleep(0.3)
        assert waiting.is_alive() and not outcome
        cancel.set()
        waiting.join(timeout=2)
        assert not waiting.is_alive() and len(outcome) == 1
    assert leftovers(tmp_path) == []
    assert_usable(tracker, clip, tmp_path)


def test_jobs_get_the_device_in_the_order_they_asked_and_know_their_place():
    """Several users' jobs wait for one device: first come, first served (a plain lock wakes any waiter), each
    told how many jobs are ahead as the line moves, and a cancelled wait leaves the line at once."""
    turns, order, told = DeviceTurns(), [], {}
    cancels = [threading.Event() for _ in range(5)]

    def job(number: int) -> None:
        try:
            turns.acquire(cancels[number], lambda ahead: told.setdefault(number, []).append(ahead))
        except Cancelled:
            order.append(f"{number} cancelled")
            return
        order.append(number)
        turns.release()

    turns.acquire()  # the job ahead (the warm-up, another user's job)
    waiting = []
    for number in range(5):
        waiting.append(threading.Thread(target=job, args=(number,)))
        waiting[-1].start()
        deadline = time.monotonic() + 5
        while told.get(number) != [number + 1] and time.monotonic() < deadline:  # in line before the next asks
            time.sleep(0.005)
    assert told == {number: [number + 1] for number in range(5)}
    cancels[2].set()
    deadline = time.monotonic() + 5
    while (told[3], told[4]) != ([4, 3], [5, 4]) and time.monotonic() < deadline:  # each told by its own thread
        time.sleep(0.005)
    assert order == ["2 cancelled"] and told[3] == [4, 3] and told[4] == [5, 4] and told[1] == [2]
    turns.release()
    for thread in waiting:
        thread.join(timeout=5)
    assert order == ["2 cancelled", 0, 1, 3, 4] and not turns.locked()
    assert told.pop(2) == [3]
    for places in told.values():  # a place the line passed between two looks is not told
        assert places[-1] == 0 and places == sorted(set(places), reverse=True)


def test_calls_in_one_held_turn_let_no_other_job_between_them(tracker, clip, tmp_path):
    """The page's passes of one Track hold the device once: a job that asks meanwhile comes after them all."""
    order, queued = [], threading.Event()

    def other_job() -> None:
        tracker.track(clip, CLICK, output=tmp_path / "other.mp4", waiting=lambda ahead: queued.set())
        order.append("other")

    other = threading.Thread(target=other_job)
    with tracker.device_held():
        other.start()
        assert queued.wait(5)
        for name in ("first", "second"):
            tracker.track(clip, CLICK, output=tmp_path / f"{name}.mp4")
            order.append(name)
    other.join(timeout=60)
    assert order == ["first", "second", "other"]
    with pytest.raises(TrackerError, match="earlier job still holds the device"):  # outside a hold, as before
        stream = tracker.iter_tracked(clip, CLICK)
        next(stream)
        try:
            tracker.track(clip, CLICK, output=tmp_path / "o.mp4")
        finally:
            stream.close()


def test_a_job_that_finds_the_device_free_is_told_nothing(tracker, clip, tmp_path):
    told = []
    tracker.track(clip, CLICK, output=tmp_path / "o.mp4", waiting=told.append)
    assert told == [] and not tracker.lock.locked()


def test_gpu_out_of_memory_suggests_a_smaller_size(tracker, clip, tmp_path):
    real_step = pipeline.Propagator.step

    def step(self, index, image, end):
        if index == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_step(self, index, image, end)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pipeline.Propagator, "step", step)
        with pytest.raises(TrackerError, match=r"memory at working size 480; .*size, 360 \(the CLI's --size") as err:
            tracker.track(clip, CLICK, output=tmp_path / "o.mp4", masks=tmp_path / "m.zip")
        with pytest.raises(TrackerError, match=r"working size 1000; .*size, 744 \("):
            list(tracker.iter_tracked(clip, CLICK, TrackOptions(size=1000)))
    assert err.value.__suppress_context__
    innermost = err.value.__context__.__traceback__
    while innermost.tb_next is not None:
        innermost = innermost.tb_next
    assert innermost.tb_frame.f_locals == {}, "the failed step's tensors are still referenced"
    one_line(err.value)
    assert leftovers(tmp_path) == []
    assert_usable(tracker, clip, tmp_path)


# --- damaged files -----------------------------------------------------------------------------------

def mutant(source: bytes, seed: int) -> bytes:
    """A damaged copy: random bit flips, overwritten runs or a cut, past the first 8 bytes."""
    rng = random.Random(seed)
    data = bytearray(source)
    kind = ("flip", "overwrite", "truncate")[seed % 3]
    if kind == "truncate":
        return bytes(data[: rng.randrange(8, len(data))])
    for _ in range(rng.randint(1, 12)):
        at = rng.randrange(8, len(data))
        if kind == "flip":
            data[at] ^= 1 << rng.randrange(8)
        else:
            run = rng.randint(1, 64)
            data[at:at + run] = rng.randbytes(len(data[at:at + run]))
    return bytes(data)


@pytest.fixture(scope="module")
def mutation_source(tmp_path_factory) -> bytes:
    path = make_clip(tmp_path_factory.mktemp("mutants") / "src.mp4", frames=FRAMES, width=WIDTH, height=HEIGHT,
                     audio=True, gop=3, faststart=True)
    return path.read_bytes()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("seed", range(MUTANTS))
def test_damaged_file_is_an_error_or_a_valid_output(mutation_source, tmp_path, seed):
    video = tmp_path / "damaged.mp4"
    video.write_bytes(mutant(mutation_source, seed))
    try:
        info = probe(video)
    except VideoError as exc:
        one_line(exc)
        return
    frames = list(iter_frames(video))
    assert 0 < len(frames) <= info.frame_count
    try:
        with VideoWriter(tmp_path / "o.mp4", info, audio_from=video if info.has_audio else None) as writer:
            for frame in frames:
                writer.write(frame.image, frame.pts, frame.time)
    except VideoError as exc:
        one_line(exc)
        assert leftovers(tmp_path) == ["damaged.mp4"]
        return
    assert probe(tmp_path / "o.mp4").frame_count == len(frames) == decoded_count(tmp_path / "o.mp4")


@pytest.mark.timeout(120)
def test_damaged_files_track_end_to_end(tracker, mutation_source, tmp_path):
    tracked = 0
    for seed in range(MUTANTS):
        if tracked == 3:
            break
        video = tmp_path / f"damaged{seed}.mp4"
        video.write_bytes(mutant(mutation_source, seed))
        try:
            info = probe(video)
        except VideoError:
            continue
        try:
            result = tracker.track(video, CLICK, output=tmp_path / f"o{seed}.mp4")
        except TrackerError as exc:
            one_line(exc)
            assert not (tmp_path / f"o{seed}.mp4").exists()
            continue
        assert result.frames > 0 and result.expected_frames == info.frame_count
        assert probe(tmp_path / f"o{seed}.mp4").frame_count == result.frames
        tracked += 1
    assert tracked == 3


def test_damage_in_the_middle_is_tracked_past_with_gaps_named_by_frame(tracker, tmp_path):
    video = noisy_copy(make_clip(tmp_path / "clip.mp4", frames=120, width=320, height=240, audio=True),
                       tmp_path / "damaged.mp4")
    present = [frame.index for frame in iter_frames(video)]
    result = tracker.track(video, CLICK, output=tmp_path / "o.mp4", masks=tmp_path / "m.zip")
    assert result.frames == len(present) and 60 < len(present) < 120 and present[-1] == 119
    assert f"{120 - len(present)} of 120 frames could not be decoded" in result.summary()
    with zipfile.ZipFile(tmp_path / "m.zip") as archive:  # a lost frame has no PNG; the others keep their number
        assert archive.namelist() == [f"{index:05d}.png" for index in present]
    output = probe(tmp_path / "o.mp4")
    assert output.frame_count == len(present) and output.duration == pytest.approx(120 / 25, abs=0.1)


def audio_end(path: Path) -> float:
    with av.open(str(path)) as container:
        return max(float((packet.pts + packet.duration) * packet.time_base)
                   for packet in container.demux(container.streams.audio[0]) if packet.size)


def test_the_sound_plays_to_its_end_past_frames_lost_to_damage(tracker, tmp_path):
    """Here the damage takes the last frame: the file is whole, so its sound is too (it stopped with frame 8)."""
    video = noisy_copy(make_clip(tmp_path / "clip.mp4", frames=10, width=160, height=120, fps=10),
                       tmp_path / "damaged.mp4")
    result = tracker.track(video, [ObjectPrompt(1, 0, [(20, 60)], [1])], output=tmp_path / "o.mp4",
                           options=TrackOptions(size=120))
    assert 4 < result.frames < 10 and result.frames == probe(tmp_path / "o.mp4").frame_count
    assert audio_end(tmp_path / "o.mp4") == pytest.approx(audio_end(video), abs=0.03)


def test_a_prompt_after_damage_tracks_back_over_the_gaps(tracker, tmp_path):
    video = noisy_copy(make_clip(tmp_path / "clip.mp4", frames=120, width=320, height=240, audio=False),
                       tmp_path / "damaged.mp4")
    present = [frame.index for frame in iter_frames(video)]
    start = present[-5]
    assert len(present) < start + 1, "the damage must lie before the prompt"
    prompt = [ObjectPrompt(1, start, [(64, 120)], [1])]
    frames = [frame.index for frame in tracker.iter_tracked(video, prompt, TrackOptions(size=120))]
    assert frames == present


def test_a_prompt_on_a_frame_the_decoding_loses_is_named(tracker, tmp_path):
    """A frame that a seek decodes but the pass over the file loses (damage) cannot carry the prompt."""
    video = noisy_copy(make_clip(tmp_path / "clip.mp4", frames=120, width=320, height=240, audio=False),
                       tmp_path / "damaged.mp4")
    present = {frame.index for frame in iter_frames(video)}
    lost = min(set(range(120)) - present)
    info = probe(video)
    mask = np.zeros((info.height, info.width), bool)
    mask[100:140, 40:90] = True
    for keyframes in ({lost: {1: mask}}, {0: {1: mask}, lost: {1: mask}}):
        with pytest.raises(TrackerError, match=f"frame {lost}, where a prompt is, does not decode in sequence"):
            for _ in pipeline.track_frames(tracker.xmem, info, keyframes, TrackOptions(size=120), tracker.device):
                pass


def test_a_slow_run_states_its_rate_not_zero():
    slow = TrackResult(frames=1, expected_frames=1, seconds=25.0, device="cpu", sam_backend="torch")
    assert "1 frame in 25.0 s (0.04 FPS)" in slow.summary()
    assert "(12.0 FPS)" in TrackResult(12, 12, 1.0, "cpu", "torch").summary()


def test_the_summary_names_the_working_resolution(tracker, clip, tmp_path):
    """Quality and speed hang on it, and a --size larger than the video's own does not say what it was."""
    for size, working in ((24, "32x24"), (480, "64x48")):
        result = tracker.track(clip, CLICK, masks=tmp_path / "m.zip", options=TrackOptions(size=size))
        assert f"SAM backend torch, XMem at {working}" in result.summary()
    assert "XMem at" not in TrackResult(12, 12, 1.0, "cpu", "torch").summary()  # a result built without it


def test_a_folder_removed_under_a_job_is_said_as_such(tmp_path):
    """A file a job makes in a folder removed meanwhile (the page's session closed, the temporary folder cleaned)
    fails as that, not as a folder the user cannot write to or a full disk."""
    from tracker.session import user_facing_resource_errors

    gone = tmp_path / "runs" / "2"
    with pytest.raises(VideoError, match=rf"^writing the output failed: the folder {gone} was removed while the job "
                                         "wrote there$"):
        with user_facing_resource_errors(TrackOptions()):
            zipfile.ZipFile(gone / "corrected-1.zip", "w")  # as a correction pass's zip is made
    with pytest.raises(VideoError, match="^writing the output failed: Permission denied; choose a folder you can write "
                                         "to and try again$"):
        with user_facing_resource_errors(TrackOptions()):
            raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "out.zip"))
    with pytest.raises(VideoError, match="^writing the output failed: No such file or directory; choose"):  # its folder
        with user_facing_resource_errors(TrackOptions()):  # is there: not said as removed
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", str(tmp_path / "gone.zip"))
