"""Several users at once: each browser session has its own video, prompts and results; Cancel; cleanup.

Each user is a separate browser context (its own cookies and Gradio session)
on one `python app.py`, as two people on two machines would be.
"""
from __future__ import annotations

import re
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from media import make_clip
from test_app import CHROMIUM, SAM_SECONDS, TRACK_SECONDS, AppPage, headless_chromium, serve_app
from tracker.prompts import ObjectPrompt, prompts_to_text
from tracker.video import probe

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="the browser tests need Debian's chromium package")


@pytest.fixture(scope="module")
def browser():
    yield from headless_chromium()


@pytest.fixture(scope="module")
def app(untrained_checkpoints, tmp_path_factory):
    with serve_app(untrained_checkpoints, tmp_path_factory.mktemp("app")) as server:
        yield server


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("clips")
    make_clip(folder / "a.mp4", frames=12, width=160, height=120)
    make_clip(folder / "b.mp4", frames=16, width=192, height=144)
    make_clip(folder / "long.mp4", frames=60, width=160, height=120)
    return folder


def ids_on_frame(masks: Path, index: int) -> set[int]:
    with zipfile.ZipFile(masks) as archive, archive.open(f"{index:05d}.png") as member:
        return set(np.unique(np.asarray(Image.open(member))).tolist())


def start_long_job(user: AppPage, clips: Path) -> None:
    """Upload the 60-frame clip, click it and press Track; return once frames past the clicked one are tracked
    (a job stopped before it tracked one keeps nothing)."""
    user.upload(clips / "long.mp4")
    user.click_frame(40, 60, expect="object 1 on frame 0: 1 point")
    user.page.locator("#track-button").click()
    user.page.locator("#status").get_by_text(re.compile(r"Tracking frame ([2-9]|\d\d+) / 59")).wait_for(
        timeout=SAM_SECONDS * 1000)


def test_two_users_tracking_at_once_see_only_their_own_work(app, browser, clips, tmp_path):
    alice = AppPage(browser.new_context().new_page(), app.url)
    bob = AppPage(browser.new_context().new_page(), app.url)
    assert alice.upload(clips / "a.mp4").startswith("Loaded 160x120, 12 frames")
    assert bob.upload(clips / "b.mp4").startswith("Loaded 192x144, 16 frames")
    alice.click_frame(40, 60, expect="object 1 on frame 0: 1 point")
    bob.click_frame(60, 70, expect="object 1 on frame 0: 1 point", width=192, height=144)
    bob.page.locator("#add-object").click()
    bob.wait_status("object 2 added")
    bob.click_frame(24, 24, expect="object 2 on frame 0: 1 point", width=192, height=144)

    # Both press Track; the jobs share the tracker one after the other.
    for user in (alice, bob):
        user.page.locator("#track-button").click()
    for user in (alice, bob):
        assert user.wait_status(r"^(Done|Error)", TRACK_SECONDS).startswith("Done: tracked the whole video")

    for user, caption in ((alice, "Frame 0 / 11"), (bob, "Frame 0 / 15")):  # redrawn just after the run
        user.page.wait_for_function(
            "text => document.querySelector('#frame-info').innerText.startsWith(text)", arg=caption)
    assert alice.page.locator("#object-select input").input_value() == "Object 1"
    assert re.fullmatch(r"\s*Object 1\s*", alice.page.locator("#object-legend").inner_text())
    assert alice.frame_src() != bob.frame_src()
    links = {user: [a.get_attribute("href") for a in user.page.locator("#result-files a[download]").all()]
             for user in (alice, bob)}
    assert not set(links[alice]) & set(links[bob])

    expected = {alice: ("a", 12, 160, 120), bob: ("b", 16, 192, 144)}
    for user, (video, frames, width, height) in expected.items():
        assert user.download_names() == [f"{video}_tracked.mp4", f"{video}_masks.zip", f"{video}_prompts.json"]
        folder = tmp_path / video
        folder.mkdir()
        overlay = probe(user.download(f"{video}_tracked.mp4", folder))
        assert (overlay.frame_count, overlay.width, overlay.height) == (frames, width, height)
        masks = user.download(f"{video}_masks.zip", folder)
        with zipfile.ZipFile(masks) as archive:
            assert len(archive.namelist()) == frames
    assert ids_on_frame(tmp_path / "a" / "a_masks.zip", 0) <= {0, 1}
    assert 2 in ids_on_frame(tmp_path / "b" / "b_masks.zip", 0)
    bob.page.screenshot(path="/tmp/app_sessions_bob.png", full_page=True)
    alice.page.context.close()
    bob.page.context.close()


def test_cancel_stops_the_job_and_the_app_stays_usable(app, browser, clips, tmp_path):
    user = AppPage(browser.new_context().new_page(), app.url)
    start_long_job(user, clips)
    assert user.page.locator("#cancel-button").is_enabled() and not user.page.locator("#track-button").is_enabled()
    # The video cannot be replaced or cleared under a running job.
    assert user.page.locator("#video-input input[type=file]").count() == 0
    assert user.page.locator("#video-input button[aria-label='Clear']").count() == 0
    pressed = time.monotonic()
    user.page.locator("#cancel-button").click()
    said = user.wait_status(r"^Cancelled: stopped after frame \d+, the frames up to it kept", 30)
    stopped = time.monotonic() - pressed
    print(f"cancel took {stopped:.2f} s")
    assert stopped < 5  # one frame of untrained XMem on a busy 2-core CPU, plus the page round trip
    user.page.wait_for_function(  # it said "Cancelling…" meanwhile
        "() => document.querySelector('#cancel-button').textContent.trim() === 'Cancel'", timeout=10_000)
    # The frames tracked are kept, in the tracked video and the masks zip, up to where it stopped.
    last = int(re.match(r"Cancelled: stopped after frame (\d+)", said).group(1))
    assert last < 59 and f"Track goes on from frame {last}" in said
    assert sorted(user.download_names()) == ["long_masks.zip", "long_prompts.json", "long_tracked.mp4"]
    assert probe(user.download("long_tracked.mp4", tmp_path)).frame_count == last + 1
    with zipfile.ZipFile(user.download("long_masks.zip", tmp_path)) as archive:
        assert len(archive.namelist()) == last + 1
    assert user.page.locator("#result-video video").count() == 1
    user.go_to_frame(last + 1)
    assert user.page.locator("#frame-info").inner_text().endswith(
        f"not tracked yet: the last run stopped after frame {last}")
    user.page.wait_for_function("() => !document.querySelector('#track-button').disabled")
    user.page.locator("#video-input button[aria-label='Clear']").wait_for()
    user.page.screenshot(path="/tmp/app_cancelled.png", full_page=True)

    # Still usable: edit, and Track goes on from where the job stopped.
    user.page.locator("#add-object").click()
    user.wait_status("object 2 added")
    kept = "; frames before it kept their masks" if last else ""
    assert user.track().startswith(f"Done: went on from frame {last}, where the cancelled run stopped{kept}. 60 frames")
    assert probe(user.download("long_tracked.mp4", tmp_path)).frame_count == 60
    user.page.context.close()


def test_what_the_running_job_tracks_cannot_be_removed_or_replaced_and_the_page_says_why(app, browser, clips,
                                                                                          tmp_path):
    """Remove object and Load clicks stay usable during a job (an object added meanwhile can go; a job still
    waiting for its turn tracks a file loaded then); what the job tracks is refused in the status and a toast, a
    prompts file at once, not after saying that it loads."""
    user = AppPage(browser.new_context().new_page(), app.url)
    start_long_job(user, clips)
    user.page.locator("#remove-object").click()
    in_the_job = "object 1 is in the tracking job under way: remove it once the job is done, or press Cancel first"
    user.wait_status(f"^Error: {in_the_job}$")
    user.page.locator(".toast-body").filter(has_text=in_the_job).wait_for()
    prompts = tmp_path / "other_prompts.json"
    prompts.write_text(prompts_to_text([ObjectPrompt(1, 0, [(20.0, 20.0)], [1])], (160, 120)))
    user.load_prompts(prompts)
    taken = ("the tracking job under way has taken the clicks it tracks: load the prompts file once it is done, "
             "or press Cancel first")
    user.wait_status(f"^Error: {taken}$", unlike=f"Error: {in_the_job}")
    user.page.locator(".toast-body").filter(has_text=taken).wait_for()
    user.page.locator("#cancel-button").click()
    user.wait_status("^Cancelled: stopped after frame", 30)
    user.page.context.close()


def test_a_job_waiting_behind_another_users_job_cancels_at_once(app, browser, clips):
    """Bob's job waits for Alice's to finish with the device; his Cancel ends the wait, not hers."""
    alice = AppPage(browser.new_context().new_page(), app.url)
    bob = AppPage(browser.new_context().new_page(), app.url)
    bob.upload(clips / "a.mp4")
    bob.click_frame(40, 60, expect="object 1 on frame 0: 1 point")
    start_long_job(alice, clips)
    bob.page.locator("#track-button").click()
    bob.page.locator("#status").get_by_text(re.compile("Waiting for the device")).wait_for(timeout=30_000)
    pressed = time.monotonic()
    bob.page.locator("#cancel-button").click()
    bob.wait_status("^Cancelled: nothing of that run was kept", 30)
    stopped = time.monotonic() - pressed
    print(f"a waiting job's cancel took {stopped:.2f} s")
    assert stopped < 5
    assert alice.page.locator("#status").get_by_text(re.compile(r"Tracking frame \d+ / 59")).count(), \
        "Alice's job goes on"
    assert alice.wait_status(r"^(Done|Error|Cancelled)", TRACK_SECONDS).startswith("Done: tracked the whole video")
    assert bob.download_names() == []
    assert bob.track().startswith("Done: tracked the whole video. 12 frames")
    for user in (alice, bob):
        user.page.context.close()


def test_a_closed_page_leaves_no_files(app, browser, clips):
    """The session's folder goes, and with it the frame pictures the page showed (the user's frames, with their
    clicks: none is left in the framework's cache, where its URL would serve it for hours)."""
    others = set(app.session_dirs())
    user = AppPage(browser.new_context().new_page(), app.url)
    user.upload(clips / "a.mp4")
    user.go_to_frame(3)
    user.click_frame(40, 60, expect="object 1 on frame 3: 1 point")
    mine = [folder for folder in app.session_dirs() if folder not in others and (folder / "video" / "a.mp4").exists()]
    assert len(mine) == 1
    previews = list(mine[0].glob("previews/*.webp"))
    assert len(previews) >= 3  # the upload's, the frame moved to, the click's
    user.page.context.close()
    deadline = time.monotonic() + 30
    while mine[0].exists():
        assert time.monotonic() < deadline, "the session folder outlived its page"
        time.sleep(0.5)
    cached = [path for path in app.temp.glob("gradio/**/*.webp") if "tracker-app-" not in str(path)]
    assert not cached, "frame pictures were left in the framework's cache"


def test_closing_the_tab_mid_run_stops_the_job_within_2_s(app, browser, clips):
    user = AppPage(browser.new_context().new_page(), app.url)
    before = set(app.session_dirs())
    user.upload(clips / "long.mp4")
    (mine,) = set(app.session_dirs()) - before
    user.click_frame(40, 60, expect="object 1 on frame 0: 1 point")
    user.page.locator("#track-button").click()
    user.page.locator("#status").get_by_text(re.compile(r"Tracking frame \d+ / 59")).wait_for(
        timeout=SAM_SECONDS * 1000)
    assert (mine / "runs").is_dir()
    cancelled = app.log.read_text().count("tracking job cancelled")
    closed = time.monotonic()
    user.page.context.close()
    # The session folder goes only once its job has let go of the tracker.
    while mine.exists():
        assert time.monotonic() - closed < 10, "the job outlived its tab"
        time.sleep(0.05)
    stopped = time.monotonic() - closed
    print(f"job stopped and files removed {stopped:.2f} s after the tab closed")
    assert stopped < 2
    assert app.log.read_text().count("tracking job cancelled") == cancelled + 1, "the job was stopped, not finished"

    # The tracker is free again: the next user's job runs.
    other = AppPage(browser.new_context().new_page(), app.url)
    other.upload(clips / "a.mp4")
    other.click_frame(40, 60, expect="object 1 on frame 0: 1 point")
    assert other.track().startswith("Done: tracked the whole video")
    other.page.context.close()


def test_stopping_the_app_removes_every_session(untrained_checkpoints, browser, clips, tmp_path):
    with serve_app(untrained_checkpoints, tmp_path / "app") as server:
        user = AppPage(browser.new_context().new_page(), server.url)
        user.upload(clips / "a.mp4")
        assert server.session_dirs()
        roots = list(server.temp.glob("gradio/tracker-app-*"))
        previews = list(server.temp.glob("gradio/**/*.webp"))  # the frames the page showed
    assert server.process.returncode == 0
    assert roots and not any(root.exists() for root in roots)
    assert previews and not any(preview.exists() for preview in previews), "the user's frames outlived the app"
    user.page.context.close()


def test_stopping_the_app_mid_job_and_mid_click_exits_cleanly(untrained_checkpoints, browser, clips, tmp_path):
    """SIGTERM while a job runs and a click's SAM encoder works in another thread: exit code 0, nothing left
    (the interpreter's own exit used to abort on the busy PyTorch thread, before the cached frames went)."""
    with serve_app(untrained_checkpoints, tmp_path / "app") as server:
        user = AppPage(browser.new_context().new_page(), server.url)
        start_long_job(user, clips)
        user.go_to_frame(12)
        image = user.page.locator("#frame-image img")
        box = image.bounding_box()
        image.click(position={"x": box["width"] / 3, "y": box["height"] / 2})
        user.wait_status("^Segmenting", 30)
    assert server.process.returncode == 0, server.log.read_text()[-2000:]
    assert not list(server.temp.glob("gradio/**/*.webp")), "the user's frames outlived the app"
    assert not list(server.temp.glob("gradio/tracker-app-*/*")), "a session's files outlived the app"
    user.page.context.close()


def test_a_bad_memory_setting_is_named_and_the_app_stays_ready(app, browser, clips):
    """An out-of-range or empty number used to stop the job before its handler ran: Track stayed disabled."""
    user = AppPage(browser.new_context().new_page(), app.url)
    user.page.locator("#settings").get_by_text("Settings").click()  # mounts its fields well before they are typed in
    user.upload(clips / "a.mp4")
    user.click_frame(40, 60, expect="object 1 on frame 0: 1 point")
    for value, message in (("0", 'Settings: "Top-k memory matches per pixel" must be at least 1, not 0'),
                           ("", "a memory setting is empty")):
        user.set_number("top-k", value)
        before = user.status()
        user.page.locator("#track-button").click()
        assert message in user.wait_status("^Error", 60, unlike=before)
        user.page.wait_for_function("() => !document.querySelector('#track-button').disabled")
        user.page.locator("#video-input button[aria-label='Clear']").wait_for()
    user.set_number("top-k", "30")
    assert user.track().startswith("Done: tracked the whole video")
    user.page.context.close()
