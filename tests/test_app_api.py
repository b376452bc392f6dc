"""The app's `/track` API under load: 8 gradio_client clients x 3 jobs at once on one `python app.py` (CPU).

Each job sends a short generated clip and its own prompt (a distinct object id
and click), and must get back exactly its own result: the clip's size and frame
count, only its object id, and on the prompt frame the mask SAM gives for that
click (computed here with the same untrained weights). When the clients close,
their sessions end and no file of theirs stays on the server.
"""
from __future__ import annotations

import json
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from media import make_clip
from test_app import serve_app
from tracker.prompts import ObjectPrompt
from tracker.video import probe, read_frame

CLIENTS, JOBS = 8, 3
# One clip per client (name -> width, height, frames), all different, so that a swapped result shows.
CLIPS = {f"client{c}.mp4": (96 + 16 * (c % 4), 64 + 16 * (c // 4), 5 + c % 3) for c in range(CLIENTS)}


@dataclass(frozen=True)
class Job:
    client: int
    number: int
    clip: str

    @property
    def object_id(self) -> int:
        return 1 + self.client * JOBS + self.number

    @property
    def point(self) -> tuple[int, int]:
        width, height, _ = CLIPS[self.clip]
        return (9 + 11 * self.client) % width, (7 + 13 * self.number + 3 * self.client) % height

    def prompts(self) -> str:
        return json.dumps({"objects": [{"id": self.object_id, "points": [list(self.point)], "labels": [1]}]})


def all_jobs() -> list[Job]:
    return [Job(c, n, f"client{c}.mp4") for c in range(CLIENTS) for n in range(JOBS)]


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("api-clips")
    for name, (width, height, frames) in CLIPS.items():
        make_clip(folder / name, frames=frames, width=width, height=height)
    return folder


@pytest.fixture(scope="module")
def expected_masks(cpu_tracker, clips) -> dict[Job, np.ndarray]:
    """What SAM makes of each job's click on frame 0, with the weights the app uses."""
    embeddings = {name: cpu_tracker.sam.embed(read_frame(clips / name, 0).image) for name in CLIPS}
    return {job: cpu_tracker.segment(embeddings[job.clip], ObjectPrompt(job.object_id, 0, [job.point], [1]))
            for job in all_jobs()}


def mask_frames(masks: Path) -> list[np.ndarray]:
    with zipfile.ZipFile(masks) as archive:
        return [np.asarray(Image.open(archive.open(name))) for name in sorted(archive.namelist())]


def server_files(temp: Path) -> list[Path]:
    """Files with content left in the app's upload folder (its session folders and the framework's uploads)."""
    return [path for path in (temp / "gradio").rglob("*") if path.is_file() and path.stat().st_size]


def test_eight_clients_three_jobs_each_get_their_own_results(untrained_checkpoints, clips, expected_masks,
                                                             tmp_path):
    from gradio_client import Client, handle_file

    def client_run(client_index: int) -> list[tuple[Job, tuple]]:
        client = Client(server.url, verbose=False, download_files=str(tmp_path / f"client-{client_index}"))
        try:
            results = []
            for job in (j for j in all_jobs() if j.client == client_index):
                results.append((job, client.predict(handle_file(str(clips / job.clip)), job.prompts(), 480,
                                                    api_name="/track")))
            return results
        finally:
            client.close()

    with serve_app(untrained_checkpoints, tmp_path / "app") as server:
        began = time.monotonic()
        with ThreadPoolExecutor(CLIENTS) as pool:
            finished = [item for items in pool.map(client_run, range(CLIENTS)) for item in items]
        minutes = (time.monotonic() - began) / 60
        print(f"\n{len(finished)} jobs in {minutes:.2f} min: {len(finished) / minutes:.1f} jobs/min on this CPU")

        assert len(finished) == CLIENTS * JOBS
        for job, (overlay, masks, summary) in finished:
            width, height, frames = CLIPS[job.clip]
            info = probe(overlay)
            assert (info.width, info.height, info.frame_count) == (width, height, frames), job
            labels = mask_frames(Path(masks))
            assert len(labels) == frames and labels[0].shape == (height, width), job
            assert set(np.unique(np.stack(labels)).tolist()) <= {0, job.object_id}, job
            got, expected = labels[0] == job.object_id, expected_masks[job]
            union = (got | expected).sum()
            assert union == 0 or (got & expected).sum() / union >= 0.98, job
            assert summary.startswith(f"{frames} frames in ") and "UNTRAINED WEIGHTS" in summary, summary
        assert sum(m.any() for m in expected_masks.values()) >= len(expected_masks) // 2, \
            "most clicks must give a non-empty mask for the comparison to mean something"

        # Closed clients end their sessions: nothing of theirs stays on the server.
        deadline = time.monotonic() + 30
        while left := server_files(server.temp):
            assert time.monotonic() < deadline, f"files outlived their sessions: {left}"
            time.sleep(0.5)
        assert not server.session_dirs()


def test_api_errors_are_messages(untrained_checkpoints, clips, tmp_path):
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    with serve_app(untrained_checkpoints, tmp_path / "app") as server:
        client = Client(server.url, verbose=False, download_files=str(tmp_path / "client"))
        try:  # the page's own events (clicks, frames, Track's steps) are not offered as endpoints
            assert list(client.view_api(print_info=False, return_format="dict")["named_endpoints"]) == ["/track"]
            for prompts, message in (
                ("{not json", "^the prompts text is not valid JSON"),
                ("", "^the prompts text is empty: give JSON such as"),
                ("clip_prompts.json", "^the prompts text 'clip_prompts.json' is a file name: send the file's JSON"),
                (json.dumps({"objects": [{"id": 1, "points": [[500, 5]]}]}), "outside the 96x64 frame"),
                (json.dumps({"objects": []}), "no object selected"),
                ("[" * 100_000 + "]" * 100_000, "^the prompts text is not valid prompts JSON"),
            ):
                with pytest.raises(AppError, match=message):
                    client.predict(handle_file(str(clips / "client0.mp4")), prompts, 480, api_name="/track")
            with pytest.raises(AppError, match=r"^size must be a whole number, not 2.5"):  # not tracked at 2 px
                client.predict(handle_file(str(clips / "client0.mp4")), Job(0, 0, "client0.mp4").prompts(), 2.5,
                               api_name="/track")
            notes = tmp_path / "notes.mp4"
            notes.write_text("not a video")
            for size in (480, None):  # a size left out is the default one
                with pytest.raises(AppError, match="not a video FFmpeg can read"):
                    client.predict(handle_file(str(notes)), Job(0, 0, "client0.mp4").prompts(), size,
                                   api_name="/track")
            with pytest.raises(AppError, match="not a video FFmpeg can read"):  # by the names the API page gives
                client.predict(video=handle_file(str(notes)), prompts=Job(0, 0, "client0.mp4").prompts(), size=240,
                               api_name="/track")
        finally:
            client.close()
    assert "Traceback" not in server.log.read_text()  # a client's mistakes are a line each in the log
