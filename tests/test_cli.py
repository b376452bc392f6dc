"""End to end: `python -m tracker` on generated clips with untrained weights, as a user runs it.

Untrained weights make the masks meaningless, so these tests check what the
pipeline guarantees: the files, their timing and streams, and that the masks
on prompted frames are exactly what SAM gives for the prompt.
"""
from __future__ import annotations

import json
import os
import re
import signal
import stat
import subprocess
import sys
import threading
import time
import zipfile
from io import BytesIO
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

from tests.media import make_clip, truncated_copy
from tracker.cli import GPU_START_NOTE, attach_negative_values
from tracker.prompts import ObjectPrompt
from tracker.render import PALETTE, MaskZipWriter
from tracker.session import LOSSLESS_WARNING
from tracker.video import iter_frames, probe, read_frame

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tracker", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=600)


def weights_flags(checkpoints: dict[str, Path]) -> list[str]:
    return ["--sam-checkpoint", checkpoints["sam"], "--xmem-checkpoint", checkpoints["xmem"], "--device", "cpu",
            "--no-download"]


def zip_labels(path: Path) -> dict[str, np.ndarray]:
    with zipfile.ZipFile(path) as archive:
        out = {}
        for name in archive.namelist():
            image = Image.open(BytesIO(archive.read(name)))
            assert image.mode == "P", name
            out[name] = np.array(image)
        return out


def stream_facts(path: Path) -> dict:
    with av.open(str(path)) as container:
        video = container.streams.video[0]
        frames = sum(1 for _ in container.decode(video))
        return {"codec": video.codec_context.name, "pix_fmt": video.codec_context.pix_fmt, "frames": frames,
                "audio": len(container.streams.audio)}


@pytest.fixture(scope="module")
def rotated_clip(tmp_path_factory) -> Path:
    """Odd display size 121x161 (stored 161x121 turned by 90 degrees), audio, 12 frames."""
    return make_clip(tmp_path_factory.mktemp("clips") / "phone.mp4", frames=12, width=121, height=161, fps=25,
                     rotation=90, pix_fmt="yuv444p", audio=True)


def test_track_writes_video_and_masks(rotated_clip, untrained_checkpoints, cpu_tracker, tmp_path):
    # Folders: a new one named with a slash, an existing one; the files in them are named after the video.
    out, masks = tmp_path / "out" / "phone_tracked.mp4", tmp_path / "phone_masks.zip"
    done = run_cli("track", rotated_clip, "--point", "60,80", "--out", f"{tmp_path / 'out'}/", "--masks", tmp_path,
                   "--size", "96", *weights_flags(untrained_checkpoints))
    assert done.returncode == 0, done.stderr
    assert f"wrote {out}" in done.stdout and f"wrote {masks}" in done.stdout
    assert "UNTRAINED WEIGHTS" in done.stderr
    assert "12 frames in" in done.stdout and "FPS" in done.stdout
    assert GPU_START_NOTE not in done.stderr  # a CPU has no graphs or kernels to wait for

    source, result = probe(rotated_clip), probe(out)
    assert (source.width, source.height) == (121, 161)
    assert (result.width, result.height) == (122, 162)  # 4:2:0 H.264 needs even sides: one edge row/column added
    assert result.frame_count == source.frame_count == 12
    assert result.fps == source.fps
    assert result.duration == pytest.approx(source.duration, abs=0.05)
    facts = stream_facts(out)
    assert facts == {"codec": "h264", "pix_fmt": "yuv420p", "frames": 12, "audio": 1}
    with out.open("rb") as f:  # faststart: the index comes before the media data
        head = f.read(4096)
    assert head.find(b"moov") < head.find(b"mdat") or b"mdat" not in head

    labels = zip_labels(masks)
    assert sorted(labels) == [f"{i:05d}.png" for i in range(12)]
    assert all(v.shape == (161, 121) for v in labels.values())
    expected = cpu_tracker.segment(cpu_tracker.sam.embed(read_frame(rotated_clip, 0).image),
                                   ObjectPrompt(1, 0, [(60, 80)], [1]))
    assert np.array_equal(labels["00000.png"] == 1, expected)
    assert set(np.unique(np.concatenate([v.ravel() for v in labels.values()]))) <= {0, 1}


def write_still_objects(masks: Path, second: int) -> np.ndarray:
    """A masks zip for the 12 frames of `rotated_clip`: object 1 and object `second`, still; returns their labels."""
    labels = np.zeros((161, 121), np.uint8)
    labels[20:80, 10:60], labels[100:150, 60:110] = 1, second
    with MaskZipWriter(masks) as writer:
        for index in range(12):
            writer.write(index, labels)
    return labels


def test_cutout_keeps_the_chosen_objects_as_a_matte_or_on_transparency(rotated_clip, tmp_path):
    """`cutout` draws a run's masks zip over its video again: the matte white where the chosen objects are,
    black elsewhere (sharp: it is coded finer than the overlay), upright like the video, with its audio."""
    masks = tmp_path / "phone_masks.zip"
    labels = write_still_objects(masks, second=2)
    done = run_cli("cutout", rotated_clip, masks, "--kind", "matte", "--objects", "2", "--out", f"{tmp_path}/")
    assert done.returncode == 0, done.stderr
    matte = tmp_path / "phone_matte.mp4"
    assert done.stdout.strip() == f"wrote {matte}"
    # The odd size kept for the editor that lays it over the video: 4:4:4, said so before the work.
    assert f"WARNING: {matte.name}: written as 4:4:4 H.264" in done.stderr.splitlines()[0]
    assert done.stderr.count("4:4:4 H.264") == 1, done.stderr  # said once, not again as the file is written
    assert stream_facts(matte) == {"codec": "h264", "pix_fmt": "yuv444p", "frames": 12, "audio": 1}
    expected = (labels == 2) * 255
    for frame in iter_frames(matte):
        assert frame.image.shape == (161, 121, 3)
        error = np.abs(frame.image.astype(int) - expected[..., None])
        assert error.mean() < 1 and (error > 64).mean() < 1e-3

    done = run_cli("cutout", rotated_clip, masks, "--out", f"{tmp_path}/")  # all objects, on transparency
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"wrote {tmp_path / 'phone_cutout.webm'}"
    assert stream_facts(tmp_path / "phone_cutout.webm")["frames"] == 12

    # For editing programs: ProRes 4444 in a QuickTime file, its alpha exactly the object's mask, odd size kept.
    done = run_cli("cutout", rotated_clip, masks, "--kind", "prores", "--objects", "1", "--out", f"{tmp_path}/")
    assert done.returncode == 0, done.stderr
    prores = tmp_path / "phone_cutout_prores.mov"
    assert done.stdout.strip() == f"wrote {prores}"
    facts = stream_facts(prores)
    assert (facts["codec"], facts["frames"], facts["audio"]) == ("prores", 12, 1)
    with av.open(str(prores)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.profile == "4444" and stream.codec_context.pix_fmt.startswith("yuva444p")
        rgba = next(container.decode(stream)).to_ndarray(format="rgba")
    assert rgba.shape == (161, 121, 4) and np.array_equal(rgba[..., 3] == 255, labels == 1)
    assert (rgba[..., 3][labels != 1] == 0).all()


def test_boxes_lists_each_objects_box_and_area_frame_by_frame(tmp_path):
    masks = tmp_path / "clip_masks.zip"
    frames = [np.zeros((48, 64), np.uint8) for _ in range(3)]
    frames[0][5:20, 10:30], frames[0][30:31, 40:41] = 1, 7  # object 7: a single pixel
    frames[1][0:48, 60:64] = 1  # against the edges; object 7 gone; frame 2 empty
    with MaskZipWriter(masks) as writer:
        for index, labels in enumerate(frames):
            writer.write(index, labels)
    done = run_cli("boxes", masks, "--out", f"{tmp_path}/out/")
    assert done.returncode == 0, done.stderr
    boxes = tmp_path / "out" / "clip_boxes.csv"
    assert done.stdout.strip() == f"wrote {boxes}"
    assert boxes.read_text().splitlines() == ["frame,object,x,y,width,height,area", "0,1,10,5,20,15,300",
                                              "0,7,40,30,1,1,1", "1,1,60,0,4,48,192"]
    umask = os.umask(0o022)
    os.umask(umask)  # the outputs get what any new file of the user's gets, as the masks zip did
    assert stat.S_IMODE(boxes.stat().st_mode) == stat.S_IMODE(masks.stat().st_mode) == 0o666 & ~umask
    again = run_cli("boxes", masks, "--out", boxes)
    assert (again.returncode, again.stdout.strip()) == (0, f"wrote {boxes} (replacing the file there from before)")
    done = run_cli("boxes", masks, "--out", tmp_path / "boxes.txt")
    assert (done.returncode, done.stderr.strip()) == (2, "error: the boxes file boxes.txt would be misnamed: end "
                                                          "its name in .csv")
    assert not (tmp_path / "boxes.txt").exists()


@pytest.mark.parametrize("args, message", [
    (["--kind", "transparent", "--out", "{tmp}/cut.mp4"], "error: the cut-out cut.mp4 would be misnamed: end its name "
                                                    "in .webm"),
    (["--kind", "prores", "--out", "{tmp}/cut.mp4"], "error: the cut-out cut.mp4 would be misnamed: end its name "
                                                     "in .mov"),
    (["--objects", "0,x"], "error: --objects takes object ids from 1 to 255 separated by commas, as in 1,3; "
                           "not '0,x'"),
    (["--out", "{masks}", "--kind", "green"], "error: the cut-out {masks} is the masks zip; choose another path"),
])
def test_a_cutout_refused_is_one_line_and_writes_nothing(rotated_clip, tmp_path, args, message):
    masks = tmp_path / "masks.zip"
    with MaskZipWriter(masks) as writer:
        writer.write(0, np.zeros((161, 121), np.uint8))
    done = run_cli("cutout", rotated_clip, masks, *(arg.format(masks=masks, tmp=tmp_path) for arg in args))
    assert (done.returncode, done.stderr.strip(), done.stdout) == (2, message.format(masks=masks), "")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["masks.zip"]


def test_prompts_file_on_later_frames(untrained_checkpoints, cpu_tracker, tmp_path):
    """Object 1 from frame 4 (tracked both ways), object 2 joins at frame 7 (forward only)."""
    clip = make_clip(tmp_path / "clip.mp4", frames=10, width=96, height=64, audio=False)
    prompts = {"objects": [{"id": 1, "frame": 4, "points": [[40, 30]], "labels": [1]},
                           {"id": 2, "frame": 7, "box": [5, 5, 30, 40]}]}
    (tmp_path / "prompts.json").write_text(json.dumps(prompts))
    masks = tmp_path / "m.zip"
    done = run_cli("track", clip, "--prompts", tmp_path / "prompts.json", "--out", tmp_path / "o.mp4",
                   "--masks", masks, "--crf", "0", *weights_flags(untrained_checkpoints))
    assert done.returncode == 0, done.stderr
    # What an option costs is said before the weights load and the run begins (it can then be stopped), once.
    lossless = f"WARNING: {LOSSLESS_WARNING}"
    assert done.stderr.count(lossless) == 1 and done.stderr.index(lossless) < done.stderr.index("device cpu")
    labels = zip_labels(masks)
    assert len(labels) == 10
    for frame, prompt in ((4, ObjectPrompt(1, 4, [(40, 30)], [1])), (7, ObjectPrompt(2, 7, [], [], (5, 5, 30, 40)))):
        sam = cpu_tracker.segment(cpu_tracker.sam.embed(read_frame(clip, frame).image), prompt)
        assert np.array_equal(labels[f"{frame:05d}.png"] == prompt.object_id, sam)
    assert not any((labels[f"{i:05d}.png"] == 2).any() for i in range(7)), "object 2 appears before its frame"
    assert stream_facts(tmp_path / "o.mp4")["frames"] == 10


def test_a_correction_in_a_prompts_file_tracks_again_from_its_frame(untrained_checkpoints, tmp_path):
    """A prompts file's correction (the page writes them so) is applied on the tracked mask of its frame, negative
    points alone included, and the video is tracked again from there: the frames before keep their masks."""
    clip = make_clip(tmp_path / "clip.mp4", frames=8, width=96, height=64, audio=False)
    first = {"id": 1, "frame": 0, "points": [[40, 30]], "labels": [1]}
    prompts = {"objects": [first, {"id": 1, "frame": 5, "points": [[42, 31]], "labels": [0], "correct": True}]}
    (tmp_path / "prompts.json").write_text(json.dumps(prompts))
    masks = tmp_path / "m.zip"
    done = run_cli("track", clip, "--prompts", tmp_path / "prompts.json", "--no-video", "--masks", masks,
                   *weights_flags(untrained_checkpoints))
    assert done.returncode == 0, done.stderr
    assert "8 frames, then again from frame 5 on" in done.stderr
    assert re.match(r"8 frames in 2 passes \(11 tracked in [\d.]+ s, [\d.]+ FPS: the frames from a correction on "
                    r"are tracked again\)", done.stdout), done.stdout
    (tmp_path / "plain.json").write_text(json.dumps({"objects": [first]}))
    done = run_cli("track", clip, "--prompts", tmp_path / "plain.json", "--no-video", "--masks", tmp_path / "plain.zip",
                   *weights_flags(untrained_checkpoints))  # a fresh process too, as the run it is compared with
    assert done.returncode == 0, done.stderr
    corrected, plain = zip_labels(masks), zip_labels(tmp_path / "plain.zip")
    assert sorted(corrected) == sorted(plain) and all(np.array_equal(corrected[f"{i:05d}.png"], plain[f"{i:05d}.png"])
                                                      for i in range(5))


def test_an_odd_sized_videos_tracked_video_says_its_added_row_and_column_once(untrained_checkpoints, cpu_tracker,
                                                                               tmp_path):
    """4:2:0 H.264 codes only even sides: the result's warnings (the page's too) say so, not only the log."""
    clip = make_clip(tmp_path / "odd.mp4", frames=3, width=65, height=49, audio=False, pix_fmt="yuv444p")
    done = run_cli("track", clip, "--point", "30,20", "--out", tmp_path, *weights_flags(untrained_checkpoints))
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("written at 66x50, the video's 65x49 with its last column and row repeated") == 1, \
        done.stderr
    result = cpu_tracker.track(clip, [ObjectPrompt(1, 0, [(30.0, 20.0)])], output=tmp_path / "api.mp4")
    assert any(warning.startswith("written at 66x50") for warning in result.warnings)


def test_a_mask_starts_the_run_as_it_is_without_sam(untrained_checkpoints, tmp_path):
    """`--mask` with a frame of a masks zip (object ids) goes on from there: each object's mask on that frame
    is the picture's, exactly, and every object in it is tracked; before it, frames are tracked backward. The
    run says SAM was not used (it named a SAM backend)."""
    clip = make_clip(tmp_path / "clip.mp4", frames=6, width=64, height=48, audio=False)
    labels = np.zeros((48, 64), np.uint8)
    labels[5:20, 4:30], labels[25:45, 35:60] = 2, 5
    picture = Image.fromarray(labels, mode="P")
    picture.putpalette(PALETTE.tobytes())
    picture.save(tmp_path / "00003.png")
    masks = tmp_path / "m.zip"
    done = run_cli("track", clip, "--mask", tmp_path / "00003.png", "--frame", "3", "--masks", masks, "--size", "48",
                   "--out", tmp_path, *weights_flags(untrained_checkpoints))
    assert done.returncode == 0, done.stderr
    assert "masks given (SAM not used)" in done.stderr and "masks given (SAM not used)" in done.stdout
    assert "SAM backend" not in done.stderr + done.stdout
    tracked = zip_labels(masks)
    assert len(tracked) == 6 and np.array_equal(tracked["00003.png"], labels)
    assert set(np.unique(np.concatenate([v.ravel() for v in tracked.values()]))) <= {0, 2, 5}


def test_a_folder_of_frames_with_its_first_mask_as_in_davis(untrained_checkpoints, tmp_path):
    """The semi-supervised protocol of DAVIS: a folder of JPEG frames and the first frame's annotation in; one
    mask per frame out, named as the frames are, the first one the annotation itself."""
    frames = tmp_path / "JPEGImages" / "bear"
    frames.mkdir(parents=True)
    for index in range(5):
        picture = np.full((48, 64, 3), 60, np.uint8)
        picture[10 + 3 * index:30 + 3 * index, 20:44] = (200, 120, 40)
        Image.fromarray(picture).save(frames / f"{index:05d}.jpg", quality=95)
    annotation = np.zeros((48, 64), np.uint8)
    annotation[10:30, 20:44] = 1
    first = Image.fromarray(annotation, mode="P")
    first.putpalette(PALETTE.tobytes())
    first.save(tmp_path / "00000.png")
    first.save(frames / "thumbnail.png")  # left out, and said once, as the command's own warnings are
    done = run_cli("track", frames, "--mask", tmp_path / "00000.png", "--masks", f"{tmp_path}/", "--no-video",
                   "--size", "48", *weights_flags(untrained_checkpoints))
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("picture(s) not ending in .jpg left out") == 1
    assert f"WARNING: {frames}: 1 picture(s) not ending in .jpg left out of its frames (thumbnail.png)" in done.stderr
    assert done.stderr.count("UNTRAINED WEIGHTS") == 1
    labels = zip_labels(tmp_path / "bear_masks.zip")
    assert sorted(labels) == [f"{index:05d}.png" for index in range(5)]
    assert np.array_equal(labels["00000.png"], annotation)
    assert done.stdout.splitlines()[-1] == f"wrote {tmp_path / 'bear_masks.zip'}"  # and no video
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00000.png", "JPEGImages", "bear_masks.zip"]


@pytest.mark.parametrize("case, args, message", [
    ("text", ["--point", "5,5"], "video"),
    ("missing", ["--point", "5,5"], "no such video file"),
    ("outside", ["--point", "500,5"], "outside"),
    ("negative point", ["--point", "-5,20"], "point (-5, 20) is outside the 64x48 frame"),
    ("negative click", ["--point", "5,5", "--negative", "-3,4"], "point (-3, 4) is outside the 64x48 frame"),
    ("negative box", ["--box", "-1,-2,30,40"], "box (-1, -2, 30, 40) is outside the 64x48 frame"),
    ("two boxes", ["--box", "1,1,30,30", "--box", "2,2,40,40"], "give one --box"),  # the last one was kept
    ("frame", ["--point", "5,5", "--frame", "99"], "past the end"),
    ("negative frame", ["--point", "5,5", "--frame", "-1"], "prompt frame -1 is negative; the video has frames 0..2"),
    ("prompts", ["--prompts", "{bad}"], "not valid JSON"),
    ("no objects", ["--prompts", "{empty}"], 'no object selected: "objects" in prompts file'),
    ("crf", ["--point", "5,5", "--crf", "60"], "crf must be 0 (lossless) to 51"),
    ("alpha", ["--point", "5,5", "--alpha", "2"], "alpha (the overlay's opacity) must be 0 to 1, not 2.0"),
    ("outline", ["--point", "5,5", "--outline", "-3"], "outline must be 0 (none) to 64 pixels, not -3"),
    ("deep update", ["--point", "5,5", "--deep-update-every", "-5"],
     "--deep-update-every must be -1 (with every memory update) or a number of frames, 1 or more, not -5"),
    ("unwritable folder", ["--point", "5,5", "--masks", "/proc/m.zip"],
     "cannot write to /proc/m.zip: no file can be made in the folder /proc"),
    ("sam fp16", ["--point", "5,5", "--sam-precision", "fp16", "--device", "cpu"],
     "SAM precision fp16 runs on CUDA GPUs only"),
    ("no video without masks", ["--point", "5,5", "--no-video"], "--no-video writes only the masks zip: give --masks"),
    ("masks over the input", ["--point", "5,5", "--masks", "{clip}"], "is the input video"),
    ("masks misnamed", ["--point", "5,5", "--masks", "masks.mkv"], "masks.mkv would be misnamed: end its name in .zip"),
    ("folder", ["--point", "5,5"], "clip.mp4 is a folder, not a video file"),
    ("frame with prompts", ["--prompts", "{one}", "--frame", "1"], "--frame goes with --point/--negative/--box"),
    ("memory", ["--point", "5,5", "--top-k", "0"], "--top-k must be at least 1, not 0"),
    ("infinite id", ["--prompts", "{inf}"], '"id" must be a whole number from 1 to 255, not Infinity'),
    ("masks under a file", ["--point", "5,5", "--masks", "{blocked}"], "file.txt is a file, not a folder"),
    ("truncated", ["--point", "5,5", "--frame", "20"], "prompt frame 20 is missing from this truncated file: only "
     "frames 0.."),
    ("size", ["--point", "5,5", "--size", "-5"],
     "size (the working resolution's shorter side) must be 0 (the original resolution)"),
    ("mask and clicks", ["--mask", "{mask}", "--point", "5,5"], "give one of --prompts, --mask or --point"),
    ("mask of another size", ["--mask", "{mask}"], "object 1: its mask on frame 0 is 32x24, and the video is 64x48"),
    ("mask missing", ["--mask", "{missing}"], "the mask {missing} does not exist"),
    ("mask not a picture", ["--mask", "{bad}"], "is not a picture that can be read"),
])
def test_bad_input_exits_2_with_one_line_before_the_weights_load(case, args, message, tmp_path):
    """The checkpoints given do not exist: the input's error must come first, without waiting for the weights."""
    clip = tmp_path / "clip.mp4"
    if case == "text":
        clip.write_text("this is not a video\n")
    elif case == "folder":
        clip.mkdir()
    elif case == "truncated":  # its index lists 24 frames, about half of them are present
        truncated_copy(make_clip(tmp_path / "whole.mp4", frames=24, width=64, height=48, audio=False, gop=3,
                                 faststart=True), clip, keep=0.5)
    elif case != "missing":
        make_clip(clip, frames=3, width=64, height=48, audio=False)
    prompts = {name: tmp_path / f"{name[1:-1]}.json" for name in ("{bad}", "{empty}", "{one}", "{inf}")}
    prompts["{bad}"].write_text("{not json")
    prompts["{empty}"].write_text('{"objects": []}')
    prompts["{one}"].write_text('{"objects": [{"id": 1, "points": [[5, 5]]}]}')
    prompts["{inf}"].write_text('{"objects": [{"id": 1e400, "points": [[5, 5]]}]}')
    (tmp_path / "file.txt").write_text("a file where a folder should be")
    Image.fromarray(np.full((24, 32), 255, np.uint8)).save(tmp_path / "mask.png")
    paths = {**prompts, "{clip}": clip, "{blocked}": tmp_path / "file.txt" / "m.zip", "{mask}": tmp_path / "mask.png",
             "{missing}": tmp_path / "missing.png"}
    args, message = [str(paths.get(a, a)) for a in args], message.format(missing=paths["{missing}"])
    out = tmp_path / "out.mp4"
    absent = {"sam": tmp_path / "absent_sam.pth", "xmem": tmp_path / "absent_xmem.pth"}
    done = run_cli("track", clip, *args, "--out", out, *weights_flags(absent))
    assert done.returncode == 2
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], done.stderr
    assert "Traceback" not in done.stderr
    assert not out.exists() and list(tmp_path.glob("out*")) == []


def test_debug_after_the_command_adds_the_traceback(tmp_path):
    clip = make_clip(tmp_path / "clip.mp4", frames=2, width=32, height=32, audio=False)
    done = run_cli("track", clip, "--point", "50,5", "--debug")
    assert done.returncode == 2 and "Traceback" in done.stderr and "PromptError" in done.stderr, done.stderr
    assert done.stderr.splitlines()[-1].startswith("error: "), "the same last line and exit code as without it"
    quiet = run_cli("--debug", "track", clip, "--point", "50,5")  # before the command, as before
    assert quiet.returncode == 2 and "PromptError" in quiet.stderr


def as_from_a_terminal() -> None:
    """Ctrl-C reaches a command started from a terminal; tests started in the background inherit SIGINT ignored."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT])
def test_a_stopped_run_leaves_nothing_behind(stop, untrained_checkpoints, tmp_path):
    """`kill`, `timeout` and `docker stop` send SIGTERM: like Ctrl-C, no partial file and no temporary folder."""
    clip = make_clip(tmp_path / "clip.mp4", frames=400, width=64, height=48, audio=True)
    out_dir, temp_dir = tmp_path / "out", tmp_path / "tmp"
    out_dir.mkdir()
    temp_dir.mkdir()
    run = subprocess.Popen([sys.executable, "-m", "tracker", "track", str(clip), "--point", "20,20",
                            "--out", str(out_dir / "o.mp4"), "--masks", str(out_dir / "m.zip"),
                            *map(str, weights_flags(untrained_checkpoints))],
                           cwd=ROOT, stderr=subprocess.PIPE, text=True, env={**os.environ, "TMPDIR": str(temp_dir)},
                           preexec_fn=as_from_a_terminal)
    try:
        deadline = time.monotonic() + 300
        while not any(out_dir.iterdir()) and run.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)  # the writers' temporary files appear once tracking starts
        assert run.poll() is None, "the run ended before it could be stopped"
        run.send_signal(stop)
        stderr = run.communicate(timeout=120)[1]
    finally:
        run.kill()
    assert run.returncode == 128 + stop, stderr
    assert f"interrupted ({stop.name}): nothing was written" in stderr
    assert list(out_dir.iterdir()) == [] and list(temp_dir.glob("tracker-*")) == []


def test_a_stop_whose_exception_is_lost_still_stops_the_run(untrained_checkpoints, tmp_path, monkeypatch, capsys):
    """The handler's exception is lost where it lands in Python code whose errors C code clears: the run
    still stops at its next frame and writes nothing."""
    from tracker import cli, pipeline

    clip = make_clip(tmp_path / "clip.mp4", frames=24, width=64, height=48)
    steps: list[int] = []
    step = pipeline.Propagator.step

    def step_losing_a_signal(self, index, image, end):
        steps.append(index)
        if len(steps) == 3:
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(1)  # the handler runs here, in this thread
            except cli.Stopped:
                pass  # as C code clearing the errors of what it called
            else:
                pytest.fail("the handler did not run")
        return step(self, index, image, end)

    monkeypatch.setattr(pipeline.Propagator, "step", step_losing_a_signal)
    monkeypatch.setattr("tracker.video._swept", False)  # the sweep ends this process's writing: given back after
    out_dir = tmp_path / "out"
    code = cli.main(["track", str(clip), "--point", "20,20", "--out", str(out_dir / "o.mp4"),
                     "--masks", str(out_dir / "m.zip"), *map(str, weights_flags(untrained_checkpoints))])
    assert code == 128 + signal.SIGTERM
    assert "interrupted (SIGTERM): nothing was written" in capsys.readouterr().err
    assert len(steps) == 3 and (not out_dir.exists() or list(out_dir.iterdir()) == [])


def test_keep_on_interrupt_keeps_the_frames_tracked(untrained_checkpoints, tmp_path):
    """`--keep-on-interrupt`: Ctrl-C finishes the files with the frames tracked so far, and says so."""
    clip = make_clip(tmp_path / "clip.mp4", frames=400, width=64, height=48, audio=True)
    run = subprocess.Popen([sys.executable, "-m", "tracker", "track", str(clip), "--point", "20,20",
                            "--out", str(tmp_path / "o.mp4"), "--masks", str(tmp_path / "m.zip"),
                            "--keep-on-interrupt", *map(str, weights_flags(untrained_checkpoints))],
                           cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           preexec_fn=as_from_a_terminal)
    said: list[str] = []
    reader = threading.Thread(target=lambda: said.extend(iter(lambda: run.stderr.read(1), "")), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 300
        while not re.search(r"\b([2-9]\d|1\d\d)/400\b", "".join(said)) and time.monotonic() < deadline:
            assert run.poll() is None, "".join(said)
            time.sleep(0.05)  # until some frames are tracked
        run.send_signal(signal.SIGINT)
        run.wait(timeout=120)  # its few lines of stdout fit the pipe; stderr is the reader's alone
    finally:
        run.kill()
    reader.join(10)
    stdout = run.stdout.read()
    stderr = "".join(said)
    kept = re.search(r"interrupted \(SIGINT\): frames 0 to (\d+) were kept$", stderr.strip())
    assert run.returncode == 128 + signal.SIGINT and kept, stderr
    last = int(kept.group(1))
    assert 19 <= last < 399 and f"cancelled after frame {last}" in stdout
    assert probe(tmp_path / "o.mp4").frame_count == last + 1
    with zipfile.ZipFile(tmp_path / "m.zip") as archive:
        assert len(archive.namelist()) == last + 1


def test_negative_coordinates_reach_the_prompt_checks():
    argv = ["track", "v.mp4", "--point", "-5,20", "--negative", "-.5,3", "--box", "-1,-2,3,4", "--frame", "-1",
            "--point", "7,8"]
    assert attach_negative_values(argv) == ["track", "v.mp4", "--point=-5,20", "--negative=-.5,3",
                                            "--box=-1,-2,3,4", "--frame", "-1", "--point", "7,8"]


def test_help_and_flag_checks_do_not_load_torch():
    """`--help`, a typo'd flag and Ctrl-C early must be instant: the command line loads the models' libraries
    only once a command runs."""
    done = subprocess.run([sys.executable, "-c", "import sys, tracker.cli, tracker.options; "
                           "print('torch' in sys.modules)"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "False", done.stderr
    assert run_cli("track", "--help").returncode == 0


@pytest.mark.parametrize("args, message", [
    (["track", "v.mp4", "--point", "1,1", "--mem-every", "1.5"],
     "error: argument --mem-every: invalid int value: '1.5' (see python -m tracker track --help)"),
    (["track", "v.mp4", "--pont", "1,1"],
     "error: unrecognized arguments: --pont 1,1 (see python -m tracker track --help)"),
    (["bench", "--modes", "turbo"], "error: --modes takes a comma-separated list of: plain, fast, bf16, fp16 "
                                    "(see python -m tracker bench --help)"),
    ([], "error: the following arguments are required: {track,cutout,boxes,weights,bench} "
         "(see python -m tracker --help)"),
    (["weights"], "error: the following arguments are required: {download,untrained} "
                  "(see python -m tracker weights --help)"),
])
def test_a_malformed_flag_is_one_line_of_error(args, message):
    """Bad input like any other: `error: ...` and exit code 2, not argparse's usage block before it."""
    done = run_cli(*args)
    assert (done.returncode, done.stderr) == (2, message + "\n")


def test_missing_checkpoint_names_url_and_path(tmp_path):
    clip = make_clip(tmp_path / "clip.mp4", frames=2, width=32, height=32, audio=False)
    done = run_cli("track", clip, "--point", "5,5", "--sam-checkpoint", tmp_path / "none.pth", "--device", "cpu",
                   "--no-download", "--out", tmp_path)
    assert done.returncode == 2
    assert "https://dl.fbaipublicfiles.com/segment_anything/" in done.stderr
    assert f"save it as {tmp_path / 'none.pth'}" in done.stderr  # where the flag looks, not models/


def test_untrained_weights_command(tmp_path):
    done = run_cli("weights", "untrained", tmp_path)
    assert done.returncode == 0, done.stderr
    assert "UNTRAINED" in done.stdout
    assert {p.name for p in tmp_path.glob("*.pth")} == {"sam_vit_b_untrained.pth", "XMem_untrained.pth"}
    blocker = tmp_path / "a file"
    blocker.write_text("not a folder")
    done = run_cli("weights", "untrained", blocker)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert f"error: cannot write checkpoints into {blocker}: it is a file; give a folder" in done.stderr
    done = run_cli("weights", "untrained", "")  # an unset shell variable: not the current folder
    assert done.returncode == 2 and "the folder for the untrained checkpoints is empty" in done.stderr, done.stderr


def test_untrained_weights_command_says_which_files_it_replaced(tmp_path, monkeypatch, capsys):
    from tracker import weights
    from tracker.cli import main

    monkeypatch.setattr(weights, "untrained_state_dict", lambda layout, seed=0: {"w": torch.zeros(1)})
    assert main(["weights", "untrained", str(tmp_path)]) == 0
    sam, xmem = weights.untrained_paths(tmp_path).values()
    xmem.unlink()
    assert main(["weights", "untrained", str(tmp_path)]) == 0
    assert capsys.readouterr().out.splitlines()[2:] == [f"replaced {sam} (UNTRAINED: for tests and offline demos "
                                                        f"only)", f"wrote {xmem} (UNTRAINED: for tests and offline "
                                                        "demos only)"]
    sam.with_suffix(".pth.json").unlink()
    sam.write_bytes(b"a file of the user's")
    assert main(["weights", "untrained", str(tmp_path)]) == 2
    assert capsys.readouterr().err == (f"error: {sam} is not a checkpoint, not an untrained one; move it elsewhere "
                                       "first, or pass --force (force=True in Python) to replace it\n")
    assert main(["weights", "untrained", str(tmp_path), "--force"]) == 0
    assert f"replaced {sam}" in capsys.readouterr().out


def test_bench_smoke_run_prints_every_row():
    """`python -m tracker bench --device cpu --quick` runs every stage once (CI's smoke test; no timing is checked)."""
    done = run_cli("bench", "--device", "cpu", "--quick", "--rounds", "2")
    assert done.returncode == 0, done.stderr
    table = done.stdout
    assert "SMOKE TEST" in table and "CPU" in table and "medians of 2 rounds" in table
    for row in ("SAM encoder ms", "SAM decoder ms per click", "XMem step ms, 1 object at 240p",
                "XMem step ms, 3 objects at 240p", "file to file FPS, 240p in and out: whole run, first video",
                "file to file FPS, 240p in and out: whole run, next videos",
                "file to file FPS, 240p in and out: after 2 frames",
                "decode + encode only FPS, 240p: clip / own output (after 2 frames)",
                "file to file as a share of decode + encode only, 240p: clip / own output",
                "file to file without the encoder FPS, 240p (after 2 frames)", "peak RSS GiB"):
        line = next((line for line in table.splitlines() if line.startswith(f"| {row}")), None)
        assert line is not None, f"no row {row!r} in\n{table}"
        for value in line.split("|")[2].split(" / "):
            assert float(value.strip().rstrip("%")) > 0, line
    for flag, value, least in (("--rounds", "0", 1), ("--frames", "-3", 3), ("--long", "0", 10)):
        done = run_cli("bench", "--device", "cpu", flag, value)
        assert done.returncode == 2 and f"error: {flag} takes a whole number of at least {least}" in done.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks what a machine without CUDA says")
def test_bench_modes_a_cpu_cannot_run_are_one_error_line():
    done = run_cli("--debug", "bench", "--device", "cpu", "--quick", "--modes", "fp16")
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "error: --modes fp16 run on CUDA only; on this CPU: plain, fast" in done.stderr


def test_an_interrupted_download_says_that_its_part_is_kept(monkeypatch, capsys):
    """Ctrl-C during `weights download` keeps the .part file for the next run: the message must not say otherwise."""
    from tracker import cli, weights

    def interrupted(progress: bool):
        raise KeyboardInterrupt

    monkeypatch.setattr(weights, "download_all", interrupted)
    monkeypatch.setattr("tracker.video._swept", False)  # the sweep ends this process's writing: given back after
    assert cli.main(["weights", "download"]) == 128 + signal.SIGINT
    stderr = capsys.readouterr().err
    assert "interrupted (SIGINT): the part already downloaded is kept; run it again to resume" in stderr
    assert "nothing was written" not in stderr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_gpu_run_says_why_its_first_frame_waits(untrained_checkpoints, tmp_path):
    clip = make_clip(tmp_path / "clip.mp4", frames=6, width=160, height=96, audio=False)
    flags = [flag if flag != "cpu" else "cuda" for flag in weights_flags(untrained_checkpoints)]
    done = run_cli("track", clip, "--point", "80,48", "--out", tmp_path / "o.mp4", *flags)
    assert done.returncode == 0, done.stderr
    assert GPU_START_NOTE in done.stderr and "cuda" in done.stderr


@pytest.mark.parametrize("device", ["tpu", "CPU", "gpu"])
def test_an_unknown_device_is_one_line_before_the_weights_load(device, tmp_path):
    clip = make_clip(tmp_path / "clip.mp4", frames=2, width=32, height=32, audio=False)
    done = run_cli("track", clip, "--point", "5,5", "--device", device, "--no-download")
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert f"error: unknown device '{device}': use auto, cpu or cuda" in done.stderr


def test_a_gpu_other_than_the_first_is_chosen_the_way_cuda_does_it(tmp_path):
    """The tracker's streams, events and CUDA graphs are the current device's; the message says what works."""
    clip = make_clip(tmp_path / "clip.mp4", frames=2, width=32, height=32, audio=False)
    done = run_cli("track", clip, "--point", "5,5", "--device", "cuda:1", "--no-download")
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "start it with CUDA_VISIBLE_DEVICES=1 and device cuda" in done.stderr


def test_a_warning_said_during_a_cutout_is_a_line_of_its_own_beside_the_progress_bar(rotated_clip, tmp_path):
    """A warning logged while the bar is drawn starts its own line, not glued to the bar's end."""
    masks = tmp_path / "short_masks.zip"
    labels = np.zeros((161, 121), np.uint8)
    labels[20:80, 10:60] = 1
    with MaskZipWriter(masks) as writer:
        for index in range(6):
            writer.write(index, labels)
    done = run_cli("cutout", rotated_clip, masks, "--kind", "matte", "--out", f"{tmp_path}/")
    assert done.returncode == 0, done.stderr
    pieces = [piece.strip() for piece in re.split(r"[\r\n]", done.stderr)]
    said = "WARNING: short_masks.zip holds no masks for 6 of the 12 frames"
    assert any(piece.startswith(said) for piece in pieces), done.stderr


def test_a_cutout_of_a_masks_zip_without_objects_says_so_without_listing_every_id(rotated_clip, tmp_path):
    """Every object kept (no --objects) of a zip whose frames hold none: one short line, not 255 ids."""
    masks = tmp_path / "masks.zip"
    with MaskZipWriter(masks) as writer:
        for index in range(12):
            writer.write(index, np.zeros((161, 121), np.uint8))
    done = run_cli("cutout", rotated_clip, masks, "--kind", "matte", "--out", f"{tmp_path}/")
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr.strip().splitlines()[-1] == ("error: masks.zip holds no object on any frame: the cut-out "
                                                    "would be empty (a run whose objects were all lost?)")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["masks.zip"]


def test_a_cutout_of_objects_the_masks_never_hold_is_refused_and_not_written(rotated_clip, tmp_path):
    """--objects naming ids that are on no frame (a typo, the masks of another run) would give an empty
    cut-out after the whole render: refused with the objects the zip holds, nothing left behind."""
    masks = tmp_path / "masks.zip"
    write_still_objects(masks, second=3)
    done = run_cli("cutout", rotated_clip, masks, "--kind", "matte", "--objects", "2,9", "--out", f"{tmp_path}/")
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr.strip().splitlines()[-1] == ("error: masks.zip has no pixel of objects 2, 9 on any frame "
                                                    "(its objects: 1, 3): the cut-out would be empty; choose "
                                                    "objects it holds")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["masks.zip"]
    done = run_cli("cutout", rotated_clip, masks, "--kind", "matte", "--objects", "3,9", "--out", f"{tmp_path}/")
    assert done.returncode == 0, done.stderr  # one of them is there: its matte


def test_a_cutout_from_the_masks_of_a_longer_video_is_refused_before_drawing(rotated_clip, tmp_path):
    masks = tmp_path / "other_masks.zip"
    with MaskZipWriter(masks) as writer:  # the same size, 20 frames: another video's run
        for index in range(20):
            writer.write(index, np.ones((161, 121), np.uint8))
    done = run_cli("cutout", rotated_clip, masks, "--out", f"{tmp_path}/")
    assert (done.returncode, done.stderr.strip().splitlines()[-1]) == (
        2, "error: other_masks.zip holds masks for 20 frames, and phone.mp4 has 12: use the masks zip tracked from "
           "this video")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["other_masks.zip"]


def test_outputs_for_a_folder_of_pictures_are_named_after_the_whole_folder(tmp_path, monkeypatch):
    from tracker.video import TRACKED_ENDING, output_file
    shot = tmp_path / "shot.010"
    shot.mkdir()
    assert output_file(f"{tmp_path}/out/", shot, TRACKED_ENDING) == tmp_path / "out" / "shot.010_tracked.mp4"
    monkeypatch.chdir(shot)
    assert output_file(f"{tmp_path}/out/", ".", TRACKED_ENDING) == tmp_path / "out" / "shot.010_tracked.mp4"
    assert output_file(f"{tmp_path}/out/", tmp_path / "clip.v2.mp4", TRACKED_ENDING).name == "clip.v2_tracked.mp4"


def test_a_run_says_which_outputs_replace_files_there_from_before(rotated_clip, untrained_checkpoints, tmp_path):
    """The same video name run twice into one folder (another clip.mp4, say) replaces the files: said on stderr as
    the run starts, while it can still be stopped; stdout still says what was written."""
    flags = ["--point", "60,80", "--size", "64", "--out", tmp_path, "--masks", tmp_path,
             *weights_flags(untrained_checkpoints)]
    first = run_cli("track", rotated_clip, *flags)
    assert first.returncode == 0, first.stderr
    assert "replacing" not in first.stderr
    again = run_cli("track", rotated_clip, *flags)
    assert again.returncode == 0, again.stderr
    out, masks = tmp_path / "phone_tracked.mp4", tmp_path / "phone_masks.zip"
    assert f"replacing {out} (a file there from before)\nreplacing {masks} (a file there from before)" in again.stderr
    assert again.stderr.index("replacing") < again.stderr.index("device ")  # before the models load
    assert f"wrote {out}" in again.stdout and f"wrote {masks}" in again.stdout
