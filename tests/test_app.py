"""The web app end to end in a real browser (Debian's Chromium, headless) against `python app.py` on the CPU.

Weights are untrained, so masks are meaningless; what is checked is the flow:
upload, clicks and their previews, objects, tracking, correction, downloads.
"""
from __future__ import annotations

import importlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Iterator
from urllib.parse import urljoin

import numpy as np
import pytest
from PIL import Image

from media import make_audio_only, make_clip, make_text_file, truncated_copy
from tracker.exports import CUTOUT_KINDS
from tracker.prompts import ObjectPrompt, load_prompts, prompts_to_text
from tracker.render import overlay_colours
from tracker.video import probe

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
SAM_SECONDS = 300  # an untrained SAM embedding on a busy 2-core CPU
TRACK_SECONDS = 600
W, H = 160, 120
# Clicks whose untrained SAM masks overlap only partly, so both ids survive on the prompt frame.
OBJECT_1, OBJECT_2 = (40, 60), (20, 20)

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="the browser tests need Debian's chromium package")


@dataclass
class AppServer:
    url: str
    process: subprocess.Popen
    temp: Path  # the app's TMPDIR: its session folders and Gradio's cache live here
    log: Path

    def session_dirs(self) -> list[Path]:
        return sorted(self.temp.glob("gradio/tracker-app-*/*"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def serve_app(checkpoints: dict[str, Path], temp: Path, *flags: str) -> Iterator[AppServer]:
    """`python app.py` on a free port, as a user starts it; stopped with SIGTERM afterwards."""
    temp.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log = temp / "app.log"
    env = {**os.environ, "TMPDIR": str(temp), "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "app.py", "--device", "cpu", "--no-download", "--port", str(port),
               "--sam-checkpoint", str(checkpoints["sam"]), "--xmem-checkpoint", str(checkpoints["xmem"]), *flags]
    with open(log, "w") as output:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=output, stderr=subprocess.STDOUT)
    server = AppServer(f"http://127.0.0.1:{port}/", process, temp, log)
    try:
        deadline = time.monotonic() + 180
        while True:
            if process.poll() is not None:
                pytest.fail(f"app.py exited with {process.returncode}:\n{log.read_text()}")
            try:
                with urllib.request.urlopen(server.url, timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"app.py did not answer within 180 s:\n{log.read_text()}")
            time.sleep(0.5)
        yield server
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def headless_chromium() -> Iterator:
    """Debian's Chromium driven by Playwright (which never downloads a browser here)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def browser():
    yield from headless_chromium()


class AppPage:
    """One browser tab on the app, driven through the elem_ids the app promises."""

    def __init__(self, page, url: str):
        self.page = page
        page.set_viewport_size({"width": 1400, "height": 1100})
        page.goto(url)
        page.wait_for_selector("#status textarea")

    def status(self) -> str:
        return self.page.locator("#status textarea").input_value()

    def wait_status(self, pattern: str, timeout: float = 60, unlike: str | None = None) -> str:
        """Wait until the status box matches `pattern` (a regular expression) and differs from `unlike`."""
        deadline = time.monotonic() + timeout
        while True:  # one read a round: the status may change between two reads
            status = self.status()
            if re.search(pattern, status) and status != unlike:
                return status
            if time.monotonic() > deadline:
                raise AssertionError(f"status {status!r} never matched {pattern!r}")
            time.sleep(0.2)

    def upload(self, path: Path) -> str:
        before = self.status()
        self.page.locator("#video-input input[type=file]").set_input_files(str(path))
        return self.wait_status(r"^(Loaded|Error)", unlike=before)

    def clear_video(self) -> None:
        """Press the video's Clear button and wait for the app to forget the video (the reset is a server event)."""
        self.page.locator("#video-input button[aria-label='Clear']").click()
        self.wait_status("^Upload a video to start.$")

    def frame_src(self) -> str:
        return self.page.locator("#frame-image img").get_attribute("src")

    def frame_pixels(self) -> np.ndarray:
        """The frame shown for clicking, as the browser fetched it."""
        response = self.page.request.get(urljoin(self.page.url, self.frame_src()))
        assert response.ok, response.status
        return np.asarray(Image.open(BytesIO(response.body())).convert("RGB"))

    def click_frame(self, x: float, y: float, expect: str | None, width: int = W, height: int = H) -> None:
        """Click frame pixel (x, y) on the displayed frame and wait for the status to say `expect` (if given)."""
        image = self.page.locator("#frame-image img")
        # The status can say "Loaded" before the browser has the picture: a click on an image without a size
        # lands nowhere.
        self.page.wait_for_function("() => { const img = document.querySelector('#frame-image img');"
                                    " return img && img.complete && img.naturalWidth > 0"
                                    " && img.getBoundingClientRect().height > 0; }")
        box = image.bounding_box()
        image.click(position={"x": (x + 0.5) * box["width"] / width, "y": (y + 0.5) * box["height"] / height})
        if expect is not None:
            self.wait_status(expect, SAM_SECONDS)

    def set_number(self, elem_id: str, value: str) -> None:
        """Type `value` into a number field and leave it, as a user does.

        A field in an accordion that has just been opened is mounted lazily and takes its
        value from the app a moment later, over anything typed at once: type until it stays.
        """
        field = self.page.locator(f"#{elem_id} input")
        deadline = time.monotonic() + 30
        while True:
            field.fill(value)
            field.press("Tab")
            self.page.wait_for_timeout(1000)
            if field.input_value() == value:
                return
            assert time.monotonic() < deadline, f"#{elem_id} kept {field.input_value()!r}, not {value!r}"

    def choose(self, elem_id: str, label: str) -> None:
        self.page.locator(f"#{elem_id}").get_by_label(label, exact=True).check()

    def select_object(self, object_id: int) -> None:
        self.page.locator("#object-select input").click()
        self.page.get_by_role("option", name=f"Object {object_id}", exact=True).click()
        self.wait_status(f"clicks go to object {object_id}")

    def go_to_frame(self, index: int) -> None:
        number = self.page.locator("#frame-slider input[type=number]")
        number.fill(str(index))
        number.press("Enter")
        self.page.wait_for_function(
            "text => document.querySelector('#frame-info').innerText.startsWith(text)", arg=f"Frame {index} /")

    def track(self) -> str:
        before = self.status()  # an error said before is not this Track's answer
        self.page.locator("#track-button").click()
        try:
            self.wait_status("^Waiting for the tracker|^Error", 20, unlike=before)
        except AssertionError:  # the same error said again
            pass
        return self.wait_status(r"^(Done|Error|Cancelled)", TRACK_SECONDS)

    def load_prompts(self, *paths: Path) -> None:
        """Pick a prompts file (and the mask pictures it names) with the page's button, as a user does in the file
        dialog it opens."""
        with self.page.expect_file_chooser() as chooser:
            self.page.locator("#load-prompts").click()
        chooser.value.set_files([str(path) for path in paths])

    def load_mask(self, path: Path) -> None:
        """Pick a mask picture with the page's button."""
        with self.page.expect_file_chooser() as chooser:
            self.page.locator("#load-mask").click()
        chooser.value.set_files(str(path))

    def download(self, name: str, folder: Path) -> Path:
        with self.page.expect_download() as download:
            self.page.locator(f'#result-files a[download="{name}"]').click()
        path = folder / name
        download.value.save_as(path)
        return path

    def download_names(self) -> list[str]:
        return [a.get_attribute("download") for a in self.page.locator("#result-files a[download]").all()]


def assert_positive_point(pixels: np.ndarray, x: float, y: float, object_id: int) -> None:
    """A positive point is drawn at frame pixel (x, y) in its object's colour (its white plus is too small for the
    lossy WebP picture to keep: the unit tests check it): the most colourful pixel there is nearest that colour."""
    scale = pixels.shape[1] / W
    row, column = round((y + 0.5) * scale), round((x + 0.5) * scale)
    around = np.array([pixels[row + dy, column + dx] for dy in (-2, 2) for dx in (-2, 2)], int)  # off the plus
    colourful = around[np.argmax(around.max(axis=1) - around.min(axis=1))]
    colours = overlay_colours().astype(int)
    nearest = min(range(1, 4), key=lambda i: np.abs(colours[i] - colourful).sum())
    assert nearest == object_id, ((x, y), colourful)


def mask_ids(masks: Path, index: int) -> set[int]:
    with zipfile.ZipFile(masks) as archive, archive.open(f"{index:05d}.png") as member:
        picture = Image.open(member)
        assert picture.mode == "P"
        return set(np.unique(np.asarray(picture)).tolist())


def x264_settings(video: Path) -> dict[str, str]:
    """The settings libx264 writes into the stream it encodes (as "options: key=value ...")."""
    data = video.read_bytes()
    text = data[data.index(b"options: ") + len(b"options: "):].split(b"\0", 1)[0].decode()
    return dict(item.split("=", 1) for item in text.split() if "=" in item)


def members(masks: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(masks) as archive:
        return {name: archive.read(name) for name in archive.namelist()}


@pytest.fixture(scope="module")
def app(untrained_checkpoints, tmp_path_factory) -> Iterator[AppServer]:
    with serve_app(untrained_checkpoints, tmp_path_factory.mktemp("app"), "--max-frames", "20",
                   "--max-upload-mb", "1") as server:
        yield server


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("clips")
    make_clip(folder / "clip.mp4", frames=12, width=W, height=H)
    make_clip(folder / "long.mp4", frames=25, width=W, height=H)
    make_clip(folder / "camera.avi", frames=12, width=W, height=H, codec="mjpeg", pix_fmt="yuvj420p", audio=False)
    make_text_file(folder / "notes.mp4")
    make_audio_only(folder / "sound.m4a")
    (folder / "big.mp4").write_bytes(os.urandom(1_300_000))
    truncated_copy(make_clip(folder / "whole.mp4", frames=20, width=W, height=H, faststart=True), folder / "cut.mp4",
                   keep=0.5)
    return folder


def test_page_shows_every_control_and_refuses_what_it_cannot_take(app, browser, clips):
    tab = AppPage(browser.new_page(), app.url)
    page = tab.page
    for elem_id in ("video-input", "frame-image", "frame-slider", "point-mode", "object-select", "add-object",
                    "remove-object", "undo-point", "clear-object", "track-button", "cancel-button", "full-rerun",
                    "result-video", "result-files", "cutout-objects", "cutout-format", "cutout-button", "settings",
                    "status", "metrics", "load-prompts", "load-mask"):
        page.locator(f"#{elem_id}").first.wait_for(state="attached")  # a first page may still be rendering
        assert page.locator(f"#{elem_id}").count() == 1, elem_id
    assert "UNTRAINED WEIGHTS" in page.locator("#untrained-banner").inner_text()
    assert "cpu" in page.locator("#device-info").inner_text()

    page.locator("#track-button").click()
    tab.wait_status("^Error: upload a video first$")
    page.locator(".toast-body").filter(has_text="upload a video first").wait_for()

    assert re.match(r"Error: the video has 25 frames; this app accepts at most 20 \(--max-frames\)",
                    tab.upload(clips / "long.mp4"))
    # A refused file leaves the video widget: it is ready for the next one, with nothing to clear.
    page.locator("#video-input input[type=file]").wait_for(state="attached")
    assert page.locator("#video-input button[aria-label='Clear']").count() == 0
    assert tab.upload(clips / "notes.mp4").startswith("Error: notes.mp4 is not a video FFmpeg can read")
    assert "Traceback" not in tab.status()
    # A file the browser does not type as a video never reaches the app: the widget drops it, and a note says so.
    page.locator("#video-input input[type=file]").set_input_files(str(clips / "sound.m4a"))
    page.locator("#video-input .refused-file").filter(has_text="sound.m4a was not taken: the browser reads it as "
                                                               "audio/").wait_for()
    tab.wait_status("^Error: sound.m4a was not taken: the browser reads it as audio/.*, not as a video; choose a "
                    "video file")
    page.evaluate("""() => {  // the same, dragged in
      const files = new DataTransfer();
      files.items.add(new File(["not a video"], "tune.mp3", {type: "audio/mpeg"}));
      const box = document.querySelector("#video-input input[type=file]").parentElement;
      box.dispatchEvent(new DragEvent("drop", {dataTransfer: files, bubbles: true, cancelable: true}));
    }""")
    page.locator("#video-input .refused-file").filter(has_text="tune.mp3 was not taken").wait_for()
    tab.wait_status("^Error: tune.mp3 was not taken: the browser reads it as audio/mpeg")

    page.locator("#video-input input[type=file]").wait_for(state="attached")
    # An oversized file is kept back by the page, which says the limit in MB and the option that raises it.
    page.locator("#video-input input[type=file]").set_input_files(str(clips / "big.mp4"))
    over = ("big.mp4 is 1.3 MB, over this server's upload limit of 1 MB: choose a smaller video, or ask the "
            "server's operator to raise the limit (python app.py --max-upload-mb)")
    assert tab.wait_status("^Error: big.mp4") == f"Error: {over}"
    page.locator(".toast-body").filter(has_text=over).wait_for()
    assert page.locator(".toast-body").filter(has_text="maximum allowed size").count() == 0  # Gradio's, in Kb
    page.evaluate("""() => {  // the same, dragged in
      const files = new DataTransfer();
      files.items.add(new File([new Uint8Array(1_200_000)], "dropped.mp4", {type: "video/mp4"}));
      const box = document.querySelector("#video-input input[type=file]").parentElement;
      box.dispatchEvent(new DragEvent("drop", {dataTransfer: files, bubbles: true, cancelable: true}));
    }""")
    tab.wait_status("^Error: dropped.mp4 is 1.2 MB, over this server's upload limit of 1 MB")
    assert not [path for folder in app.session_dirs() for path in folder.iterdir()], "refused uploads leave nothing"

    # A truncated file: what it holds is loaded, evenly timed, and the toast about it names it (it may outlast it).
    loaded = tab.upload(clips / "cut.mp4")
    assert re.match(r"Loaded 160x120, \d+ frames, [\d.]+ s, 25 fps\. Click the object to track\.\n⚠ the file is "
                    r"truncated: only its first \d+ of 20 frames are present", loaded), loaded
    page.locator(".toast-body").filter(has_text="cut.mp4: the file is truncated").wait_for()
    assert page.locator("#video-input .refused-file").count() == 0  # the next file took its note away
    tab.clear_video()

    # The browser cannot play an AVI: a note says so, not an error over a video the app took.
    assert tab.upload(clips / "camera.avi").startswith("Loaded 160x120, 12 frames")
    page.locator("#video-input .no-preview").wait_for()
    page.wait_for_timeout(500)
    assert page.locator(".toast-body").filter(has_text="not playable").count() == 0
    tab.clear_video()
    assert page.locator("#video-input .no-preview").count() == 0
    tab.upload(clips / "clip.mp4")
    page.locator("#video-input video").wait_for()
    assert page.locator("#video-input .no-preview").count() == 0
    page.close()


def test_a_prompts_file_over_the_upload_limit_is_refused_in_the_status(app, browser, tmp_path):
    """As an oversized video: the limit in MB and how it is raised, in the status and a toast, not Gradio's Kb; a
    mask picture too."""
    tab = AppPage(browser.new_page(), app.url)
    big = tmp_path / "huge_prompts.json"
    big.write_text(" " * 1_300_000 + "[]")
    tab.load_prompts(big)
    over = ("huge_prompts.json is 1.3 MB, over this server's upload limit of 1 MB: choose a smaller prompts file, "
            "or ask the server's operator to raise the limit (python app.py --max-upload-mb)")
    assert tab.wait_status("^Error: huge_prompts.json") == f"Error: {over}"
    tab.page.locator(".toast-body").filter(has_text=over).wait_for()
    assert tab.page.locator(".toast-body").filter(has_text="maximum allowed size").count() == 0  # Gradio's, in Kb
    tab.page.locator(".toast-body").filter(has_text=over).first.wait_for(state="detached", timeout=30_000)
    tab.load_prompts(big)  # chosen again, refused again
    tab.page.locator(".toast-body").filter(has_text=over).wait_for()
    picture = tmp_path / "huge_mask.png"
    picture.write_bytes(b"\x89PNG" + bytes(1_300_000))
    tab.load_mask(picture)
    assert tab.wait_status("^Error: huge_mask.png") == (
        "Error: huge_mask.png is 1.3 MB, over this server's upload limit of 1 MB: choose a smaller mask picture, "
        "or ask the server's operator to raise the limit (python app.py --max-upload-mb)")
    tab.page.close()


def test_the_radio_and_checkbox_groups_have_names(app, browser):
    """A screen reader (and an outside test) finds each group of options by its label."""
    tab = AppPage(browser.new_page(), app.url)
    page = tab.page
    for name, options in (("Click adds", 3), ("Cut-out format", len(CUTOUT_KINDS))):
        group = page.get_by_role("radiogroup", name=name, exact=True)
        group.wait_for(state="attached")
        assert group.get_by_role("radio").count() == options
    page.get_by_role("radiogroup", name="Click adds").get_by_role("radio", name="Box (click two corners)").check()
    assert page.get_by_role("group", name="Cut-out: objects to keep", exact=True).count() == 1
    page.close()


def test_click_track_correct_and_download(app, browser, clips, tmp_path):
    tab = AppPage(browser.new_page(), app.url)
    assert tab.upload(clips / "clip.mp4") == "Loaded 160x120, 12 frames, 0.5 s, 25 fps. Click the object to track."
    assert tab.page.locator("#frame-info").inner_text() == "Frame 0 / 11 · 0:00.000"
    assert tab.track().startswith("Error: click an object first")

    blank = tab.frame_src()
    tab.click_frame(*OBJECT_1, expect="object 1 on frame 0: 1 point")
    assert tab.frame_src() != blank, "the mask preview replaces the frame"
    tab.page.locator("#add-object").click()
    tab.wait_status("object 2 added")
    one_object = tab.frame_src()
    tab.click_frame(*OBJECT_2, expect="object 2 on frame 0: 1 point")
    assert tab.frame_src() != one_object
    assert re.fullmatch(r"\s*Object 1\s*Object 2\s*", tab.page.locator("#object-legend").inner_text())

    tab.page.locator("#settings").get_by_text("Settings").click()  # encoder settings reach the file
    tab.page.locator("#encoder-preset input").click()
    tab.page.get_by_role("option", name="ultrafast", exact=True).click()
    crf = tab.page.locator("#video-crf input[type=number]")
    crf.fill("30")
    crf.press("Enter")

    started = time.monotonic()
    tab.page.locator("#track-button").click()
    tab.wait_status("^Waiting for the tracker")
    tab.go_to_frame(5)  # while the job runs: the frame shown after it must be this one, not frame 0
    moved = tab.frame_src()
    assert not tab.status().startswith("Done"), "the job ended before the slider moved"
    done = tab.wait_status(r"^(Done|Error|Cancelled)", TRACK_SECONDS)
    assert done.startswith("Done: tracked the whole video. 12 frames in"), done
    assert "UNTRAINED WEIGHTS" in done
    metrics = tab.page.locator("#metrics").inner_text()
    assert re.search(r"12 frames in [\d.]+ s \([\d.]+ FPS\), device cpu, SAM backend torch", metrics)
    print(f"first track took {time.monotonic() - started:.1f} s")
    tab.page.wait_for_function("src => document.querySelector('#frame-image img').getAttribute('src') !== src",
                               arg=moved)
    assert tab.page.locator("#frame-info").inner_text().startswith("Frame 5 / 11")
    after_run = tab.frame_pixels()
    tab.go_to_frame(4)
    tab.go_to_frame(5)
    assert np.array_equal(tab.frame_pixels(), after_run), "the frame shown after the run is not frame 5"

    video = tab.page.locator("#result-video video")
    video.wait_for()
    tab.page.wait_for_function("() => document.querySelector('#result-video video').readyState >= 1")
    assert video.evaluate("v => v.duration") == pytest.approx(0.48, abs=0.05)
    assert tab.download_names() == ["clip_tracked.mp4", "clip_masks.zip", "clip_prompts.json"]  # after the upload
    # An outside test finds the picture to click and each download by role and name, as a screen reader does.
    assert tab.page.get_by_role("img", name="Click the object").count() == 1
    assert tab.page.get_by_role("link", name="Download clip_masks.zip", exact=True).count() == 1
    clicked = load_prompts(tab.download("clip_prompts.json", tmp_path))  # in frame pixels, for the CLI's --prompts
    assert [(p.object_id, p.frame, p.labels, p.box) for p in clicked] == [(1, 0, [1], None), (2, 0, [1], None)]
    for prompt, place in zip(clicked, (OBJECT_1, OBJECT_2)):
        assert prompt.points[0] == pytest.approx(place, abs=1.5)
    overlay = tab.download("clip_tracked.mp4", tmp_path)
    info = probe(overlay)
    assert (info.frame_count, info.width, info.height, info.codec, info.has_audio) == (12, W, H, "h264", True)
    settings = x264_settings(overlay)
    assert (settings["cabac"], settings["crf"]) == ("0", "30.0"), "ultrafast (no CABAC) at crf 30, as chosen"
    first_masks = members(tab.download("clip_masks.zip", tmp_path))
    assert sorted(first_masks) == [f"{i:05d}.png" for i in range(12)]
    assert mask_ids(tmp_path / "clip_masks.zip", 0) == {0, 1, 2}, "the prompt frame holds both objects"

    # Correct object 1 on frame 6 with a background click, then re-track from there.
    tab.go_to_frame(6)
    tab.select_object(1)
    tab.choose("point-mode", "Negative point (background)")
    tab.click_frame(100, 100, expect="correcting object 1 on frame 6: 1 point")
    done = tab.track()
    assert done.startswith("Done: re-tracked from frame 6; frames before it kept their masks."), done
    second_masks = members(tab.download("clip_masks.zip", tmp_path))
    assert sorted(second_masks) == sorted(first_masks)
    assert all(second_masks[f"{i:05d}.png"] == first_masks[f"{i:05d}.png"] for i in range(6))
    tab.page.locator("#track-button").click()  # nothing changed since: nothing runs, the result stays
    assert tab.wait_status("^Nothing changed", 60).startswith("Nothing changed since the last run")
    assert tab.download_names() == ["clip_tracked.mp4", "clip_masks.zip", "clip_prompts.json"]
    opacity = tab.page.locator("#overlay-opacity input[type=number]")  # the frame takes a new look at once
    for typed, said in (("0.8", "^The frame shows the new look; the tracked video below keeps the old one until "
                                "Track draws it again"), ("0.5", "^The look is again that of the tracked video")):
        opacity.fill(typed)
        opacity.press("Enter")
        tab.wait_status(said)

    # A green-screen cut-out of object 1.
    tab.page.locator("#cutout-objects").get_by_label("Object 2", exact=True).uncheck()
    tab.choose("cutout-format", "Green-screen MP4 (H.264)")
    tab.page.locator("#cutout-button").click()
    assert tab.wait_status("Cut-out ready", TRACK_SECONDS) == \
        "Cut-out ready in the downloads: clip_cutout_greenscreen.mp4 (object 1)."
    assert tab.download_names() == ["clip_tracked.mp4", "clip_masks.zip", "clip_prompts.json",
                                    "clip_cutout_greenscreen.mp4"]
    cutout = probe(tab.download("clip_cutout_greenscreen.mp4", tmp_path))
    assert (cutout.frame_count, cutout.codec) == (12, "h264")

    # Object 2 removed: the cut-out no longer offers it.
    tab.select_object(2)
    tab.page.locator("#remove-object").click()
    tab.wait_status("^object 2 removed; the next Track re-runs the whole video")
    tab.page.wait_for_function("() => !document.querySelector('#cutout-objects').innerText.includes('Object 2')")
    assert tab.page.locator("#cutout-objects").get_by_label("Object 1", exact=True).is_checked()

    tab.page.screenshot(path="/tmp/app_e2e.png", full_page=True)
    tab.page.close()


def test_clicks_made_while_sam_reads_the_frame_all_count_and_track_waits_for_them(app, browser, clips):
    """The first click on a frame waits seconds for SAM's encoder on a CPU, and the page invites more clicks
    meanwhile: none may be dropped, and a Track pressed at once tracks with them (it said "click an object
    first", or "nothing changed" after a correction, while the clicks were still being segmented). The clicks'
    own replies, late by then, leave the newer status in place."""
    tab = AppPage(browser.new_page(), app.url)
    tab.upload(clips / "clip.mp4")
    places = [OBJECT_1, (100, 30), (130, 95)]
    tab.page.evaluate("""() => {  // every status the page shows, in turn
        window.statuses = [];
        setInterval(() => {
            const text = document.querySelector('#status textarea').value;
            if (window.statuses[window.statuses.length - 1] !== text) window.statuses.push(text);
        }, 20);
    }""")
    tab.click_frame(*places[0], expect="^Segmenting: SAM's image encoder reads frame 0")
    for place in places[1:]:
        tab.click_frame(*place, expect=None)
    tab.wait_status(r"2 clicks made before this one \(this page's or other users'\) are segmented first\.$", 10)
    tab.page.locator("#track-button").click()
    tab.wait_status("^Waiting for the tracker: the last click is being segmented first…$", 10)
    done = tab.wait_status(r"^(Done|Error|Cancelled)", TRACK_SECONDS)
    assert done.startswith("Done: tracked the whole video. 12 frames in"), done
    statuses = tab.page.evaluate("window.statuses")
    third = next(i for i, text in enumerate(statuses) if "2 clicks made before this one" in text)
    assert not [text for text in statuses[third:] if text.startswith("object 1 on frame 0:")], statuses
    # Each click is where it was made (they all took the last one's place, read when their turn came).
    pixels = tab.frame_pixels()
    for x, y in places:
        assert_positive_point(pixels, x, y, object_id=1)
    tab.page.locator("#undo-point").click()  # three clicks were made: two are left
    tab.wait_status("^object 1 on frame 0: 2 points$")
    tab.page.close()


def test_a_click_on_the_top_row_of_the_picture_counts(app, browser, clips):
    """The picture's first row (and its first column) takes a click as any other."""
    tab = AppPage(browser.new_page(), app.url)
    tab.upload(clips / "clip.mp4")
    image = tab.page.locator("#frame-image img")
    tab.page.wait_for_function("() => document.querySelector('#frame-image img')?.naturalWidth > 0")
    box = image.bounding_box()
    image.click(position={"x": box["width"] / 2, "y": 0.1})
    tab.wait_status("^object 1 on frame 0: 1 point$", SAM_SECONDS)
    image.click(position={"x": 0.1, "y": box["height"] / 2})
    tab.wait_status("^object 1 on frame 0: 2 points$", SAM_SECONDS)
    tab.page.close()


def test_points_and_boxes_are_placed_from_the_keyboard(app, browser, clips):
    """Tab to the picture, move its marker with the arrow keys (Shift: ten times as far), and Enter or Space
    clicks where it is: the point lands on the pixel the marker says (whole CSS pixels: within one of the
    fraction moved to), in the mode chosen with the arrow keys, and the picture's edges take points too."""
    tab = AppPage(browser.new_page(), app.url)
    tab.upload(clips / "clip.mp4")
    tab.page.wait_for_function("() => document.querySelector('#frame-image img')?.naturalWidth > 0")
    picture = tab.page.locator("#frame-image button:has(img)")
    marker = tab.page.locator("#frame-image .key-marker")

    def marked() -> tuple[int, int]:
        """The preview's pixel the marker clicks (its text says it as shares of the picture)."""
        x, y = map(int, marker.get_attribute("data-pixel").split(","))
        assert marker.inner_text() == (f"Marker {round(100 * x / 639)}% across, {round(100 * y / 479)}% down the "
                                       "picture: Enter or Space clicks there")
        return x, y

    picture.focus()
    picture.press("Shift+ArrowRight")  # from the middle: 0.6 of the width
    for _ in range(5):
        picture.press("ArrowUp")  # 0.4 of the height
    assert marker.is_visible()
    first = marked()
    assert abs(first[0] - 0.6 * 639) <= 1 and abs(first[1] - 0.4 * 479) <= 1, first
    picture.press("Enter")
    tab.wait_status("^object 1 on frame 0: 1 point$", SAM_SECONDS)
    for _ in range(10):
        picture.press("ArrowLeft")  # 0.4 of the width
    second = marked()
    assert abs(second[0] - 0.4 * 639) <= 1 and second[1] == first[1], second
    assert marker.inner_text() == "Marker 40% across, 40% down the picture: Enter or Space clicks there"
    width = tab.page.viewport_size["width"]
    tab.page.set_viewport_size({"width": width // 2, "height": tab.page.viewport_size["height"]})
    tab.page.wait_for_timeout(500)  # the picture shrinks with the page: the ring stays on its pixel
    ring, shown = marker.bounding_box(), tab.page.locator("#frame-image img").bounding_box()
    assert abs(ring["x"] + ring["width"] / 2 - shown["x"] - second[0] * shown["width"] / 640) <= 2
    tab.page.set_viewport_size({"width": width, "height": tab.page.viewport_size["height"]})
    picture.press(" ")
    tab.wait_status("^object 1 on frame 0: 2 points$", SAM_SECONDS)
    tab.page.wait_for_timeout(1000)  # nor does the button's own click on Space's release say anything
    assert tab.status() == "object 1 on frame 0: 2 points"
    pixels = tab.frame_pixels()
    for x, y in (first, second):
        assert_positive_point(pixels, x / 4, y / 4, object_id=1)
    for _ in range(6):  # held at the picture's edges, whose last pixels take a point too
        picture.press("Shift+ArrowRight")
        picture.press("Shift+ArrowDown")
    assert marked() == (639, 479)
    picture.press("Enter")
    tab.wait_status("^object 1 on frame 0: 3 points$", SAM_SECONDS)
    for _ in range(12):
        picture.press("Shift+ArrowLeft")
        picture.press("Shift+ArrowUp")
    assert marked() == (0, 0)
    picture.press("Enter")
    tab.wait_status("^object 1 on frame 0: 4 points$", SAM_SECONDS)
    for _ in range(5):  # to the middle, for the box
        picture.press("Shift+ArrowRight")
        picture.press("Shift+ArrowDown")
    picture.blur()
    assert not marker.is_visible()
    # The click mode from the keyboard too: its options are one Tab stop (the chosen one), the arrow keys choose.
    tab.page.locator("#point-mode input:checked").focus()
    tab.page.keyboard.press("ArrowDown")
    tab.page.keyboard.press("ArrowDown")
    assert tab.page.locator("#point-mode input:checked").get_attribute("value") == "box"
    tab.page.keyboard.press("Tab")
    assert tab.page.evaluate("document.activeElement.closest('#point-mode')") is None
    picture.focus()
    picture.press("Enter")
    tab.wait_status("^object 1 on frame 0: 4 points, a box's first corner; click the opposite corner", SAM_SECONDS)
    picture.press("Shift+ArrowRight")
    picture.press("Shift+ArrowDown")
    picture.press("Enter")
    tab.wait_status("^object 1 on frame 0: 4 points, a box$", SAM_SECONDS)
    tab.page.close()


def test_a_prompts_file_loaded_into_the_page_brings_its_clicks_back(app, browser, clips, tmp_path):
    """An annotator whose tab closed loads the run's prompts file (the downloads' clip_prompts.json): its objects
    and clicks come back on their frame, Undo takes back its points one by one, and Track tracks them."""
    tab = AppPage(browser.new_page(), app.url)
    tab.upload(clips / "clip.mp4")
    other = tmp_path / "other_prompts.json"  # from a larger video: its points would all fit this one
    other.write_text(prompts_to_text([ObjectPrompt(1, 0, [(30, 10)])], (320, 240)))
    tab.load_prompts(other)
    tab.wait_status(r"^Error: prompts file other_prompts.json cannot be used on clip.mp4 \(160x120, 12 frames\): "
                    r"the prompts were made on a 320x240 video, and this one is 160x120")
    prompts = tmp_path / "clip_prompts.json"
    prompts.write_text(prompts_to_text([ObjectPrompt(2, 4, [OBJECT_1, (60, 70)], [1, 0]),
                                        ObjectPrompt(3, 4, [OBJECT_2])]))
    tab.load_prompts(prompts)
    tab.wait_status("^loaded prompts file clip_prompts.json: 2 prompts for objects 2, 3 on frame 4, in place of "
                    "the clicks before; press Track$", SAM_SECONDS)
    assert tab.page.locator("#frame-info").inner_text().startswith("Frame 4 / 11")
    assert tab.page.locator("#object-legend span:not(.swatch)").all_inner_texts() == ["Object 2", "Object 3"]
    pixels = tab.frame_pixels()
    for (x, y), object_id in ((OBJECT_1, 2), (OBJECT_2, 3)):
        assert_positive_point(pixels, x, y, object_id)
    tab.page.locator("#undo-point").click()  # object 2 is the current one: its negative point goes
    tab.wait_status("^object 2 on frame 4: 1 point$")
    done = tab.track()
    assert done.startswith("Done: tracked the whole video. 12 frames in"), done
    (tmp_path / "downloads").mkdir()
    assert load_prompts(tab.download("clip_prompts.json", tmp_path / "downloads")) == \
        [ObjectPrompt(2, 4, [OBJECT_1]), ObjectPrompt(3, 4, [OBJECT_2])]
    assert [t.strip() for t in tab.page.locator("#cutout-objects label").all_inner_texts()] == ["Object 2", "Object 3"]
    keep = tmp_path / "keep_prompts.json"  # object 3 left out: it leaves the cut-out list, as a removed one does
    keep.write_text(prompts_to_text([ObjectPrompt(2, 4, [OBJECT_1])], (W, H)))
    tab.load_prompts(keep)
    tab.wait_status("^loaded prompts file keep_prompts.json: ", SAM_SECONDS)
    assert [t.strip() for t in tab.page.locator("#cutout-objects label").all_inner_texts()] == ["Object 2"]
    # Track pressed while a file's masks are still being made (SAM's encoder on a frame not read yet): the job
    # waits for them and tracks the file's prompts.
    later = tmp_path / "later_prompts.json"
    later.write_text(prompts_to_text([ObjectPrompt(1, 9, [OBJECT_2])], (W, H)))
    tab.load_prompts(later)
    tab.wait_status("^Loading prompts file later_prompts.json: SAM reads the frames of its prompts")
    tab.page.locator("#track-button").click()
    done = tab.wait_status(r"^(Done|Error|Cancelled)", TRACK_SECONDS)
    assert done.startswith("Done: "), done
    (tmp_path / "again").mkdir()
    assert load_prompts(tab.download("clip_prompts.json", tmp_path / "again")) == [ObjectPrompt(1, 9, [OBJECT_2])]
    tab.page.close()


def test_a_mask_picture_loaded_on_a_frame_is_tracked_and_downloaded_beside_the_prompts_file(app, browser, clips,
                                                                                             tmp_path):
    """An annotator's mask from another tool goes on the frame shown for the chosen object: it shows at once, a
    picture of another size is refused in the status, and the run's prompts file names it as a picture beside it."""
    tab = AppPage(browser.new_page(), app.url)
    tab.upload(clips / "clip.mp4")
    tab.go_to_frame(3)
    small = tmp_path / "small.png"
    Image.fromarray(np.full((H // 2, W // 2), 255, np.uint8)).save(small)
    tab.load_mask(small)
    tab.wait_status("^Error: the mask small.png cannot be used: object 1: its mask on frame 3 is 80x60, and the "
                    "video is 160x120: a mask must have the video's size$")
    matte = np.zeros((H, W), bool)
    matte[30:90, 40:100] = True
    picture = tmp_path / "matte.png"
    Image.fromarray(matte.astype(np.uint8) * 255).save(picture)
    before, shown = tab.frame_pixels(), tab.frame_src()
    tab.load_mask(picture)
    tab.wait_status("^loaded matte.png as object 1's mask on frame 3; clicks on it refine it, and Track tracks it$")
    tab.page.wait_for_function("src => document.querySelector('#frame-image img').getAttribute('src') !== src",
                               arg=shown)
    changed = np.abs(tab.frame_pixels().astype(int) - before.astype(int)).sum(axis=2) > 40
    scale = changed.shape[1] / W
    inside, outside = changed[round(60 * scale), round(70 * scale)], changed[round(10 * scale), round(10 * scale)]
    assert inside and not outside  # the mask is drawn over the frame at once
    done = tab.track()
    assert done.startswith("Done: tracked the whole video."), done
    assert "clip_prompts_object1_frame3.png" in tab.download_names()
    picture = tab.download("clip_prompts_object1_frame3.png", tmp_path)
    prompts_file = tab.download("clip_prompts.json", tmp_path)
    [prompt] = load_prompts(prompts_file)
    assert prompt.frame == 3 and np.array_equal(prompt.mask, matte)
    masks = members(tab.download("clip_masks.zip", tmp_path))
    tab.page.close()

    # A new tab takes the prompts file back with its picture, chosen together; the file alone says what it lacks.
    again = AppPage(browser.new_page(), app.url)
    again.upload(clips / "clip.mp4")
    again.load_prompts(prompts_file)
    again.wait_status(r"^Error: prompts file clip_prompts.json names the mask picture clip_prompts_object1_frame3.png "
                      r"\(object 1, frame 3\), which was not chosen with it \(pictures chosen: none\); choose the "
                      r"prompts file and the mask pictures it names together")
    again.load_prompts(prompts_file, picture)
    again.wait_status(r"^loaded prompts file clip_prompts.json: 1 prompt for object 1 on frame 3, in place of the "
                      r"clicks before; press Track$", SAM_SECONDS)
    assert again.track().startswith("Done: tracked the whole video.")
    (tmp_path / "again").mkdir()
    assert members(again.download("clip_masks.zip", tmp_path / "again")) == masks
    again.page.close()


def test_the_picture_stays_on_the_frame_the_slider_shows_while_a_click_is_segmented(app, browser, clips):
    """A click's mask comes seconds later on a CPU: by then the user may be on another frame, whose picture
    must stay (it was replaced by the clicked frame's, under the other frame's number, where clicks then went)."""
    tab = AppPage(browser.new_page(), app.url)
    tab.upload(clips / "clip.mp4")
    tab.click_frame(*OBJECT_1, expect="^Segmenting: SAM's image encoder reads frame 0")
    tab.go_to_frame(9)
    frame_9 = tab.frame_pixels()
    tab.wait_status("^object 1 on frame 0: 1 point$", SAM_SECONDS)
    tab.page.wait_for_timeout(1000)
    assert tab.page.locator("#frame-info").inner_text().startswith("Frame 9 / 11")
    np.testing.assert_array_equal(tab.frame_pixels(), frame_9)
    tab.click_frame(*OBJECT_1, expect="^object 1 on frame 9: 1 point$")
    tab.page.close()


def test_a_running_job_shows_its_latest_frame_with_its_masks(app, browser, tmp_path):
    """While Track runs, the page shows the frame the job is at with its masks, once a second; the picture goes
    when the job ends (here cancelled)."""
    clip = make_clip(tmp_path / "large.mp4", frames=20, width=640, height=480, audio=False)
    tab = AppPage(browser.new_page(), app.url)
    tab.upload(clip)
    tab.click_frame(320, 240, expect="^object 1 on frame 0: 1 point$", width=640, height=480)
    tab.page.locator("#track-button").click()
    live = tab.page.locator("#live-frame")
    live.locator("img").wait_for(timeout=TRACK_SECONDS * 1000)
    assert re.fullmatch(r"Tracked video so far: frame \d+",
                        live.locator("[data-testid=block-label]").inner_text().strip())
    assert not tab.status().startswith("Done")
    tab.page.locator("#cancel-button").click()
    tab.wait_status("^Cancelled", TRACK_SECONDS)
    live.wait_for(state="hidden")
    tab.page.close()


def test_leaving_the_page_asks_first_while_it_holds_clicks(app, browser, clips):
    """A closed or reloaded page's session ends with its clicks and results: the browser asks before, but not
    for a page with nothing to lose (Chromium asks only once the user has used the page: each step clicks)."""
    tab = AppPage(browser.new_page(), app.url)
    page = tab.page
    asked = []
    page.on("dialog", lambda dialog: (asked.append(dialog.type), dialog.accept()))
    armed = "armed => document.querySelector('#unsaved-work input').checked === armed"
    page.locator("#add-object").click()
    tab.wait_status("^Error: upload a video first$")
    page.reload()
    tab.upload(clips / "clip.mp4")
    page.locator("#add-object").click()  # an object without clicks is nothing to lose
    tab.wait_status("^object 2 added")
    page.reload()
    assert asked == []

    tab.upload(clips / "clip.mp4")
    tab.click_frame(*OBJECT_1, expect="^object 1 on frame 0: 1 point$")
    page.wait_for_function(armed, arg=True)
    page.locator("#undo-point").click()
    tab.wait_status("^object 1 has no clicks on frame 0$")
    page.wait_for_function(armed, arg=False)
    tab.click_frame(*OBJECT_1, expect="^object 1 on frame 0: 1 point$")
    page.wait_for_function(armed, arg=True)
    page.reload()
    assert asked == ["beforeunload"]
    page.wait_for_selector("#status textarea")
    assert tab.status() == "Upload a video to start."  # left: a new session
    page.close()


def test_numbers_typed_out_of_range_are_held_to_their_sliders_and_clicks_go_to_the_frame_shown(app, browser, clips):
    tab = AppPage(browser.new_page(), app.url)
    page = tab.page
    tab.upload(clips / "clip.mp4")
    number = page.locator("#frame-slider input[type=number]")
    for typed, frame in (("40", 11), ("-3", 0), ("2.5", 3), ("3.6", 4)):
        number.fill(typed)
        number.press("Enter")
        page.wait_for_function("text => document.querySelector('#frame-info').innerText.startsWith(text)",
                               arg=f"Frame {frame} / 11")
        page.wait_for_function("value => document.querySelector('#frame-slider input[type=number]').value === value",
                               arg=str(frame))
    number.fill("")
    number.press("Enter")
    page.wait_for_timeout(1000)
    assert page.locator("#frame-info").inner_text().startswith("Frame 4 / 11")
    scrub = page.locator("#frame-slider input[type=range]")
    for _ in range(5):  # each step's redraw returns while the next is on its way: none may pull the handle back
        scrub.press("ArrowRight")
    page.wait_for_function("text => document.querySelector('#frame-info').innerText.startsWith(text)",
                           arg="Frame 9 / 11")
    page.wait_for_timeout(1500)
    assert scrub.input_value() == "9" and page.locator("#frame-info").inner_text().startswith("Frame 9 / 11")
    page.locator("#settings").click()
    page.locator("#overlay-opacity input[type=number]").wait_for()
    page.wait_for_timeout(1500)  # the opened accordion's fields take their values from the app a moment later
    for elem_id, typed, shown_after in (("overlay-opacity", "3", "1"), ("outline-width", "-4", "0"),
                                        ("video-crf", "99", "51"), ("video-crf", "", "18"),
                                        ("processing-size", "5000", "1080"),
                                        ("overlay-opacity", "", "")):
        field = page.locator(f"#{elem_id} input[type=number]")
        field.fill(typed)
        field.press("Enter")
        page.wait_for_function("([id, value]) => document.querySelector(`#${id} input[type=number]`).value === value",
                               arg=[elem_id, shown_after])
    page.wait_for_timeout(1000)
    assert page.locator(".toast-body").count() == 0, page.locator(".toast-body").all_inner_texts()
    assert not tab.status().startswith("Error")
    tab.click_frame(*OBJECT_1, expect="object 1 on frame 9: 1 point")
    top_k = page.locator("#top-k input[type=number]")  # a whole-number setting: a fraction is refused, not rounded
    top_k.fill("2.5")
    top_k.press("Enter")
    page.locator("#track-button").click()
    assert tab.wait_status("^Error") == \
        'Error: Settings: "Top-k memory matches per pixel" must be a whole number, not 2.5'
    assert "Traceback" not in app.log.read_text()
    page.close()


def test_a_trim_made_in_the_video_widget_is_the_video_tracked(app, browser, clips, tmp_path):
    """Gradio's video widget offers its own trim (scissors, handles, "Trim"): the trimmed file is what the app
    shows, counts and tracks, and the downloads keep the upload's name."""
    tab = AppPage(browser.new_page(), app.url)
    page = tab.page
    tab.upload(clips / "clip.mp4")
    tab.click_frame(*OBJECT_1, expect="object 1 on frame 0: 1 point")
    # A trim whose handles were not moved sends the same video again: the clicks stay.
    page.get_by_role("button", name="Trim video to selection").click()
    page.get_by_role("button", name="Trim", exact=True).click()
    tab.wait_status("^The trim kept the whole video: nothing changed.$")
    page.locator("#undo-point").click()
    tab.wait_status("^object 1 has no clicks on frame 0$")  # the click was still there
    page.get_by_role("button", name="Trim video to selection").click()
    end = page.get_by_role("button", name="end drag handle for trimming video")
    timeline = page.locator("#video-input #timeline")
    for _ in range(10):  # a drag made while the timeline's thumbnails are still drawn is undone: drag again
        handle, box = end.bounding_box(), timeline.bounding_box()
        page.mouse.move(handle["x"] + handle["width"] / 2, handle["y"] + handle["height"] / 2)
        page.mouse.down()
        page.mouse.move(box["x"] + box["width"] * 0.5, handle["y"] + handle["height"] / 2, steps=10)
        page.mouse.up()
        page.wait_for_timeout(1000)
        if end.get_attribute("style") != "left: 100%;":
            break
    assert end.get_attribute("style") != "left: 100%;", "the end handle never moved"
    before = tab.status()
    page.get_by_role("button", name="Trim", exact=True).click()
    loaded = tab.wait_status(r"^(Loaded|Error)", 120, unlike=before)
    found = re.match(r"Loaded the trimmed video, 160x120, (\d+) frames", loaded)
    assert found, loaded
    frames = int(found.group(1))
    assert 3 <= frames < 12, loaded
    assert page.locator("#frame-info").inner_text() == f"Frame 0 / {frames - 1} · 0:00.000"
    page.get_by_role("button", name="Trim video to selection").click()  # the trimmed video, trimmed to all of it
    page.get_by_role("button", name="Trim", exact=True).click()
    tab.wait_status("^The trim kept the whole video: nothing changed.$")

    tab.click_frame(*OBJECT_1, expect="object 1 on frame 0: 1 point")
    done = tab.track()
    assert done.startswith(f"Done: tracked the whole video. {frames} frames in"), done
    assert tab.download_names() == ["clip_trimmed_tracked.mp4", "clip_trimmed_masks.zip", "clip_trimmed_prompts.json"]
    assert probe(tab.download("clip_trimmed_tracked.mp4", tmp_path)).frame_count == frames
    assert len(members(tab.download("clip_trimmed_masks.zip", tmp_path))) == frames
    tab.clear_video()  # the trimmed video goes as an upload does
    page.close()


def read_response(connection: socket.socket) -> str:
    """One whole HTTP response: the head, then as many body bytes as its Content-Length says (they may come later)."""
    data = b""
    while b"\r\n\r\n" not in data and (chunk := connection.recv(4096)):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
    while length and len(body) < int(length.group(1)) and (chunk := connection.recv(4096)):
        body += chunk
    return (head + b"\r\n\r\n" + body).decode(errors="replace")


def test_an_oversized_upload_is_refused_before_it_is_all_sent(app):
    """The 1 MB limit stops a 64 MB upload after its first 2 MB: the server answers 413 while the rest is unsent."""
    declared = 64 * 2**20
    boundary = "tracker-test-boundary"
    head = (f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="big.mp4"\r\n'
            "Content-Type: video/mp4\r\n\r\n").encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    host, port = app.url.split("//")[1].rstrip("/").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as connection:
        connection.sendall(
            (f"POST /gradio_api/upload HTTP/1.1\r\nHost: {host}:{port}\r\n"
             f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
             f"Content-Length: {len(head) + declared + len(tail)}\r\n\r\n").encode() + head)
        sent = 0
        for _ in range(32):  # 2 MB in 64 KB pieces
            connection.sendall(b"\0" * 65536)
            sent += 65536
        answer = read_response(connection)
    assert answer.startswith("HTTP/1.1 413"), answer
    assert "maximum allowed size" in answer
    assert sent < declared // 16
    assert not _large_files(app.temp), "a refused upload left a large file behind"


def _large_files(root: Path) -> list[Path]:
    """Files of 1 MB or more under `root`; the server may be removing folders while they are listed."""
    found = []
    for folder, _, names in os.walk(root):
        for name in names:
            try:
                if os.stat(os.path.join(folder, name)).st_size >= 2**20:
                    found.append(Path(folder, name))
            except FileNotFoundError:
                continue
    return found


def test_the_start_lines_give_the_address_and_name_the_share_flag(app):
    """Gradio's own hint names its launch() argument (share=True), which a user of app.py cannot set."""
    deadline = time.monotonic() + 30
    while "public link" not in (started := app.log.read_text()) and time.monotonic() < deadline:
        time.sleep(0.2)  # the lines come just after the server answers
    assert f"* Running on local URL:  {app.url.rstrip('/')}\n" in started
    assert "* To create a public link, start the app with --share.\n" in started
    assert "share=True" not in started


def test_a_precision_the_device_cannot_run_is_refused_at_start(untrained_checkpoints):
    command = [sys.executable, "app.py", "--device", "cpu", "--no-download", "--precision", "fp16",
               "--sam-checkpoint", str(untrained_checkpoints["sam"]),
               "--xmem-checkpoint", str(untrained_checkpoints["xmem"])]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert "error: fp16 runs on CUDA GPUs only; on the CPU use bf16 or fp32" in done.stderr


def test_a_port_the_server_cannot_take_is_one_line_of_error_before_the_weights_load(tmp_path):
    missing = {"--sam-checkpoint": tmp_path / "no_sam.pth", "--xmem-checkpoint": tmp_path / "no_xmem.pth"}
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run([sys.executable, "app.py", "--no-download", "--port", str(port),
                               *(str(part) for item in missing.items() for part in item)],
                              cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip() == f"error: port {port} on 127.0.0.1 is in use; pick another with --port"
    for typed, message in (("99999", "99999 is not a port: use 1 to 65535"), ("http", "'http' is not a port")):
        done = subprocess.run([sys.executable, "app.py", "--port", typed], cwd=ROOT, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 2 and message in done.stderr, done.stderr


def test_the_frame_size_limit_is_typed_as_the_readme_gives_it():
    for typed, message in (("3840x", "is not a size such as 3840x2160"), ("0x1080", "must be above 0")):
        done = subprocess.run([sys.executable, "app.py", "--max-pixels", typed], cwd=ROOT, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 2 and message in done.stderr, done.stderr
    app = importlib.import_module("app")
    assert app.build_parser().parse_args(["--max-pixels", "1920x1080"]).max_pixels == 1920 * 1080
    assert app.build_parser().parse_args(["--max-pixels", "2073600"]).max_pixels == 2073600
    assert app.build_parser().parse_args([]).max_pixels == 3840 * 2160


def test_a_limit_that_would_refuse_everything_or_crash_the_launch_is_refused_at_once():
    """A negative, zero or nan upload size crashed Gradio's launch after the weights loaded; a negative frame
    limit refused every video."""
    for flag, typed, message in (("--max-upload-mb", "-1", "the limit must be a finite number above 0 (1 KB at least)"),
                                 ("--max-upload-mb", "nan", "above 0"), ("--max-upload-mb", "0.0001", "1 KB at least"),
                                 ("--max-frames", "-3", "above 0"), ("--max-frames", "2.5", "'2.5' is not a number"),
                                 ("--max-seconds", "inf", "a finite number above 0")):
        done = subprocess.run([sys.executable, "app.py", flag, typed], cwd=ROOT, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 2 and done.stderr.startswith(f"error: argument {flag}: ") and \
            message in done.stderr and "Traceback" not in done.stderr, done.stderr
    app = importlib.import_module("app")
    parsed = app.build_parser().parse_args(["--max-upload-mb", "0.5", "--max-frames", "900", "--max-seconds", "30.5"])
    assert (parsed.max_upload_mb, parsed.max_frames, parsed.max_seconds) == (0.5, 900, 30.5)
