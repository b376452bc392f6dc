import os
import re
import shutil
import subprocess
import threading
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from media import (TRACK_LANGUAGES, blanked_media_copy, capture_from, clip_frame, damaged_timestamp_copy,
                   disc_centre, make_audio_only, make_clip, make_empty_file, make_joined_recording, make_text_file,
                   noisy_copy, top_level_atoms, truncated_copy)
from tracker.colour import yuv420_to_rgb
from tracker.errors import TrackerError, VideoError
from tracker.exports import export_boxes, export_cutout, export_overlay
from tracker.interactive import upload_message
from tracker import video
from tracker.render import MaskZipWriter
from tracker.video import (VideoWriter, check_writable_folder, chroma_siting, colour_note, iter_frames, probe,
                          read_frame, truncation_note)

FRAMES, WIDTH, HEIGHT, FPS = 30, 160, 120, 25


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("media")


@pytest.fixture(scope="module")
def clip(media_dir):
    """H.264 with B-frames (keyframe every 12 frames), AAC audio, index at the front."""
    return make_clip(media_dir / "clip.mp4", frames=FRAMES, width=WIDTH, height=HEIGHT, fps=FPS, faststart=True)


@pytest.fixture(scope="module")
def vfr_clip(media_dir):
    return make_clip(media_dir / "vfr.mp4", frames=20, vfr=True)


def close_to(image: np.ndarray, expected: np.ndarray, tolerance: float = 8.0) -> bool:
    return image.shape == expected.shape and np.abs(image.astype(float) - expected).mean() < tolerance


def encode_copy(source, output, **writer_options):
    info = probe(source)
    with VideoWriter(output, info, audio_from=source if info.has_audio else None, **writer_options) as writer:
        for frame in iter_frames(source):
            writer.write(frame.image, frame.pts, frame.time)
    return output


@pytest.mark.parametrize("suffix, container", [(".mov", "mov"), (".mkv", "matroska"), (".M4V", "mp4")])
def test_h264_goes_in_the_container_its_name_asks_for(clip, tmp_path, suffix, container):
    out = encode_copy(clip, tmp_path / f"copy{suffix}")
    with av.open(str(out)) as result:
        assert container in result.format.name.split(",")
        assert result.streams.video[0].codec_context.name == "h264" and len(result.streams.audio) == 1
    info = probe(out)
    assert info.frame_count == FRAMES and info.duration == pytest.approx(FRAMES / FPS, abs=0.05)


def test_probe_reports_the_clip(clip):
    info = probe(clip)
    assert (info.width, info.height, info.frame_count) == (WIDTH, HEIGHT, FRAMES)
    assert info.fps == FPS
    assert info.duration == pytest.approx(FRAMES / FPS)
    assert (info.rotation, info.codec, info.pix_fmt, info.has_audio) == (0, "h264", "yuv420p", True)
    with av.open(str(clip)) as container:
        assert info.time_base == container.streams.video[0].time_base


def test_frames_decode_in_order_with_their_timestamps(clip):
    frames = list(iter_frames(clip))
    assert [f.index for f in frames] == list(range(FRAMES))
    assert [f.time for f in frames] == pytest.approx([i / FPS for i in range(FRAMES)])
    assert all(f.image.dtype == np.uint8 and f.image.shape == (HEIGHT, WIDTH, 3) for f in frames)
    assert all(close_to(f.image, clip_frame(f.index, FRAMES, WIDTH, HEIGHT)) for f in frames)


@pytest.mark.skipif(shutil.which("ffprobe") is None, reason="ffprobe is not installed")
def test_frame_count_agrees_with_ffprobe(clip, vfr_clip):
    for path in (clip, vfr_clip):
        counted = subprocess.run(["ffprobe", "-v", "error", "-count_frames", "-select_streams", "v:0",
                                  "-show_entries", "stream=nb_read_frames", "-of", "csv=p=0", str(path)],
                                 capture_output=True, text=True, check=True).stdout.strip()
        assert probe(path).frame_count == int(counted)


@pytest.mark.parametrize("rotation", [90, 180, 270])
def test_rotation_is_applied_on_decode(media_dir, rotation):
    path = make_clip(media_dir / f"rotated{rotation}.mp4", frames=3, width=WIDTH, height=HEIGHT, audio=False,
                     rotation=rotation)
    with av.open(str(path)) as container:  # stored the other way round, or the test proves nothing
        stored = next(container.decode(video=0)).to_ndarray(format="rgb24")
    expected = clip_frame(1, 3, WIDTH, HEIGHT)
    assert not close_to(stored, expected)
    info = probe(path)
    assert (info.rotation, info.width, info.height) == (rotation, WIDTH, HEIGHT)
    frame = read_frame(path, 1)
    assert close_to(frame.image, expected)


def test_ten_bit_video_decodes_to_8_bit_rgb(media_dir):
    path = make_clip(media_dir / "ten_bit.mp4", frames=3, pix_fmt="yuv420p10le", audio=False)
    assert probe(path).pix_fmt == "yuv420p10le"
    frame = next(iter_frames(path))
    assert frame.image.dtype == np.uint8
    assert close_to(frame.image, clip_frame(0, 3, WIDTH, HEIGHT))


def test_read_frame_equals_the_decoded_frame_with_b_frames(clip):
    with av.open(str(clip)) as container:
        decode_order = [p.pts for p in container.demux(video=0) if p.size]
    assert decode_order != sorted(decode_order), "the clip should have B-frames"
    middle = 17  # between the keyframes at 12 and 24
    frames = list(iter_frames(clip))
    frame = read_frame(clip, middle)
    assert (frame.index, frame.pts, frame.time) == (middle, frames[middle].pts, frames[middle].time)
    assert np.array_equal(frame.image, frames[middle].image)
    assert not np.array_equal(frame.image, frames[middle - 1].image)


def test_read_frame_and_partial_iteration_follow_variable_timestamps(vfr_clip):
    frames = list(iter_frames(vfr_clip))
    part = list(iter_frames(vfr_clip, 13, 17))
    assert [f.index for f in part] == [13, 14, 15, 16]
    assert [f.pts for f in part] == [f.pts for f in frames[13:17]]
    assert np.array_equal(read_frame(vfr_clip, 14).image, frames[14].image)


def test_read_frame_past_the_end_is_a_clear_error(clip):
    with pytest.raises(VideoError, match="frame 30"):
        read_frame(clip, FRAMES)


def test_round_trip_keeps_count_rate_duration_size_and_audio(clip, tmp_path):
    output = encode_copy(clip, tmp_path / "out.mp4")
    before, after = probe(clip), probe(output)
    assert (after.frame_count, after.fps, after.width, after.height) == (FRAMES, FPS, WIDTH, HEIGHT)
    assert after.duration == pytest.approx(before.duration)
    assert after.pix_fmt == "yuv420p" and after.has_audio
    for original, copy in zip(iter_frames(clip), iter_frames(output)):
        assert copy.time == pytest.approx(original.time)
        assert close_to(copy.image, original.image, tolerance=3.0)
    with av.open(str(clip)) as source, av.open(str(output)) as result:
        source_audio, result_audio = source.streams.audio[0], result.streams.audio[0]
        assert result_audio.codec.canonical_name == "aac"
        assert float(result_audio.duration * result_audio.time_base) == pytest.approx(
            float(source_audio.duration * source_audio.time_base), abs=0.05)
        copied = [bytes(p) for p in result.demux(result_audio) if p.size][:10]
        original = [bytes(p) for p in source.demux(source_audio) if p.size][:10]
        assert copied == original  # remuxed, not re-encoded


@pytest.mark.parametrize("codec, rate, aac_rate", [("pcm_s16le", 44100, 44100), ("flac", 44100, 44100),
                                                    ("flac", 192000, 48000), ("libopus", 48000, 48000)])
def test_audio_mp4_players_and_editors_refuse_is_converted_to_aac(media_dir, tmp_path, codec, rate, aac_rate):
    """Studio FLAC at 192 kHz too: AAC has no such rate, so it is resampled."""
    source = make_clip(media_dir / f"{codec}_{rate}.mkv", frames=10, audio_codec=codec, audio_rate=rate)
    output = encode_copy(source, tmp_path / f"{codec}_out.mp4")
    with av.open(str(output)) as result:
        audio = result.streams.audio[0]
        assert audio.codec.canonical_name == "aac" and audio.rate == aac_rate
        assert audio.bit_rate == pytest.approx(96_000, rel=0.1)  # mono
        assert float(audio.duration * audio.time_base) == pytest.approx(10 / FPS, abs=0.05)


@pytest.mark.parametrize("codec", ["flac", "libopus"])
def test_matroska_keeps_flac_and_opus_as_they_are(media_dir, tmp_path, codec):
    source = make_clip(media_dir / f"{codec}.mkv", frames=10, audio_codec=codec)
    output = encode_copy(source, tmp_path / "out.mkv")
    with av.open(str(source)) as original, av.open(str(output)) as result:
        sent, got = (b"".join(bytes(p) for p in c.demux(audio=0) if p.size) for c in (original, result))
        assert got == sent



@pytest.mark.parametrize("ending", [".mkv", ".mov"])
@pytest.mark.parametrize("pcm", ["pcm_s16le", "pcm_s24le", "pcm_f32le"])
def test_uncompressed_audio_stays_uncompressed_where_the_container_carries_it(media_dir, tmp_path, pcm, ending):
    source = make_clip(media_dir / f"{pcm}.mkv", frames=10, audio_codec=pcm)
    output = encode_copy(source, tmp_path / f"out{ending}")
    with av.open(str(source)) as original, av.open(str(output)) as result:
        assert result.streams.audio[0].codec.canonical_name == pcm
        sent, got = (b"".join(bytes(p) for p in c.demux(audio=0) if p.size)
                     for c in (original, result))
        assert got == sent  # bit for bit


def test_a_mov_keeps_each_tracks_language_in_quicktimes_spelling(media_dir, tmp_path):
    """QuickTime's language table knows German as "ger" (ISO 639-2/B); written as "deu" it was lost."""
    source = make_clip(media_dir / "three_tracks.mkv", frames=6, audio_codec=("aac", "aac", "aac"))
    with av.open(str(encode_copy(source, tmp_path / "three.mov"))) as result:
        assert [t.metadata.get("language") for t in result.streams.audio] == ["eng", "fra", "ger"]


@pytest.mark.parametrize("again", [".mp4", ".mkv"])
def test_every_audio_track_is_kept_in_order_with_its_language_and_title(media_dir, tmp_path, again):
    """A second track (commentary, another language) is not dropped: each is copied or converted in turn.
    An MP4's track title reads back under another key ("name"); a second pass must keep it too."""
    source = make_clip(media_dir / "two_tracks.mkv", frames=10, audio_codec=("aac", "pcm_s16le"))
    output = encode_copy(encode_copy(source, tmp_path / "two_tracks.mp4"), tmp_path / f"again{again}")
    with av.open(str(output)) as result:
        tracks = result.streams.audio
        assert [t.codec.canonical_name for t in tracks] == ["aac", "aac"]
        assert [t.metadata.get("language") for t in tracks] == list(TRACK_LANGUAGES[:2])
        assert [t.metadata.get("title") or t.metadata.get("name") for t in tracks] == [
            f"{language} commentary" for language in TRACK_LANGUAGES[:2]]
        ends = {track.index: 0 for track in tracks}  # Matroska keeps no track duration: from the packets
        for packet in result.demux(*tracks):
            if packet.pts is not None:
                ends[packet.stream.index] = max(ends[packet.stream.index],
                                                float((packet.pts + packet.duration) * packet.time_base))
        assert list(ends.values()) == pytest.approx([10 / FPS] * len(tracks), abs=0.05)

@pytest.mark.parametrize("seconds", [2.0, 0.2])
def test_audio_that_outlasts_or_ends_before_the_picture_is_kept_whole(media_dir, tmp_path, seconds):
    """A narration running on after the last frame is the input's too: the picture stays on its last frame."""
    source = make_clip(media_dir / f"audio_{seconds}.mp4", frames=10, audio_seconds=seconds)
    output = encode_copy(source, tmp_path / "out.mp4")
    with av.open(str(output)) as result:
        audio, video = result.streams.audio[0], result.streams.video[0]
        assert float(audio.duration * audio.time_base) == pytest.approx(seconds, abs=0.05)
        assert video.frames == 10 and float(video.duration * video.time_base) == pytest.approx(10 / FPS)
    assert [f.time for f in iter_frames(output)] == pytest.approx([f.time for f in iter_frames(source)])


@pytest.mark.parametrize("seconds", [1.2, 0.5])
def test_a_picture_that_starts_late_starts_the_output_with_its_sound_in_sync(media_dir, tmp_path, caplog, seconds):
    """The first frame stamped at 0.5 s: the output starts with it at 0, and the sound before it is left out
    (all of it when it ends there, rather than a track of packets all stamped 0 that plays nothing)."""
    source = make_clip(media_dir / f"late_{seconds}.mp4", frames=10, video_start=0.5, audio_seconds=seconds)
    assert next(iter_frames(source)).time == pytest.approx(probe(source).start) == pytest.approx(0.5)
    output = encode_copy(source, tmp_path / "out.mp4")
    assert next(iter_frames(output)).time == probe(output).start == 0
    with av.open(str(output)) as result:
        audio = result.streams.audio
        played = sum(frame.samples for frame in result.decode(audio=0)) / audio[0].rate if audio else 0
    assert played == pytest.approx(seconds - 0.5, abs=0.03)
    assert ("ends before the first frame" in caplog.text) == (seconds == 0.5)


def test_variable_frame_rate_stays_variable(vfr_clip, tmp_path):
    output = encode_copy(vfr_clip, tmp_path / "vfr_out.mp4")
    before = [f.time for f in iter_frames(vfr_clip)]
    after = [f.time for f in iter_frames(output)]
    assert len(set(np.round(np.diff(before), 6))) > 1
    assert after == pytest.approx(before, abs=1e-6)
    assert probe(output).duration == pytest.approx(probe(vfr_clip).duration)


@pytest.mark.parametrize("fps, vfr", [(25, True), (25, False), (60, False)])
def test_output_ends_where_the_input_ends(media_dir, tmp_path, fps, vfr):
    """The muxer took the last frame as 1 / the average rate long, which moved a variable-rate video's end.
    (FFmpeg reads the variable-rate source itself as 0.64 s long, its B-frames' decoding times ending early:
    its frames end at 0.72 s, where the probe puts its end.)"""
    source = make_clip(media_dir / f"end_{fps}_{vfr}.mp4", frames=12, fps=fps, vfr=vfr, audio=False)
    output = encode_copy(source, tmp_path / "end_out.mp4")
    assert probe(source).duration == pytest.approx(0.72 if vfr else 12 / fps)
    assert declared_ends(output) == pytest.approx((probe(source).duration,) * 2, abs=1e-3)


def declared_ends(path: Path) -> tuple[float, ...]:
    """The container's and the video stream's durations, as FFmpeg reads them (Matroska: the container's)."""
    with av.open(str(path)) as container:
        video = container.streams.video[0]
        return (container.duration / 1e6, *([float(video.duration * video.time_base)] if video.duration else []))


@pytest.mark.parametrize("suffix", [".mp4", ".mkv"])
@pytest.mark.parametrize("gaps", [(40, 40, 40, 40, 40, 40, 40, 320, 400, 400), (100, 100, 200, 100, 100, 300, 100)])
def test_frames_dropped_near_the_end_keep_the_duration(tmp_path, suffix, gaps):
    """A slideshow, a GIF, a screen recording that paused: every interval a whole number of the typical one.
    Each packet lasted the encoder's guess and the MP4's decoding times trailed its frames (B-frames): it
    read 0.72 s long for 1.44 s of frames (0.9 s with its last frame at 1.0 s); the Matroska file 1.53 s."""
    source = tmp_path / "source.mkv"
    times = np.cumsum((0, *gaps))
    with av.open(str(source), "w") as container:
        stream = container.add_stream("libx264", rate=25, options={"preset": "ultrafast"})
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.codec_context.time_base = Fraction(1, 1000)
        for index, milliseconds in enumerate(times):
            frame = av.VideoFrame.from_ndarray(clip_frame(index, len(times), 64, 48), format="rgb24")
            frame.pts, frame.time_base = int(milliseconds), Fraction(1, 1000)
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    output = encode_copy(source, tmp_path / f"out{suffix}")
    assert [f.time for f in iter_frames(output)] == pytest.approx(times / 1000, abs=1e-6)
    ends = declared_ends(output)
    assert ends == pytest.approx((probe(source).duration,) * len(ends), abs=1e-3)


def test_odd_size_becomes_even_yuv420p_with_the_picture_intact(media_dir, tmp_path, caplog):
    source = make_clip(media_dir / "odd.mp4", frames=4, width=161, height=121, pix_fmt="yuv444p", audio=False)
    output = encode_copy(source, tmp_path / "odd_out.mp4")
    info = probe(output)
    assert (info.width, info.height, info.frame_count, info.pix_fmt) == (162, 122, 4, "yuv420p")
    image = next(iter_frames(output)).image
    assert close_to(image[:121, :161], clip_frame(0, 4, 161, 121))
    assert close_to(image[121:, :161], image[120:121, :161])  # the added row repeats the last one
    assert "written at 162x122, the video's 161x121 with its last column and row repeated" in caplog.text


@pytest.mark.parametrize("kind, pix_fmt", [("transparent", "yuv420p"), ("prores", "yuva444p12le"),
                                           ("green", "yuv444p"), ("matte", "yuv444p")])
@pytest.mark.parametrize("field_order", [None, "tff"])
def test_an_odd_sized_videos_cutouts_keep_its_exact_size(tmp_path, caplog, kind, pix_fmt, field_order):
    """A cut-out lies over its source in an editor: the green-screen and matte MP4s came out a row and a column
    larger (4:2:0 H.264's even sides); they are 4:4:4 there, and say so."""
    source = make_clip(tmp_path / "odd.mp4", frames=4, width=161, height=120, pix_fmt="yuv444p", audio=False,
                       x264_params=field_order and f"{field_order}=1")
    labels = np.zeros((120, 161), np.uint8)
    labels[10:60, 30:161] = 1
    with MaskZipWriter(tmp_path / "masks.zip") as writer:
        for index in range(4):
            writer.write(index, labels)
    output = export_cutout(source, tmp_path / "masks.zip", [1], f"{tmp_path}/", kind)
    info = probe(output)
    assert (info.width, info.height, info.frame_count, info.pix_fmt) == (161, 120, 4, pix_fmt)
    if kind == "matte":
        image = next(iter_frames(output)).image
        assert np.abs(image[..., 1].astype(int) - labels * 255).mean() < 1
    assert ("written as 4:4:4 H.264" in caplog.text) == (pix_fmt == "yuv444p")
    if kind in ("green", "matte"):
        assert info.field_order == field_order


def test_index_is_written_before_the_media_data(clip, tmp_path):
    atoms = top_level_atoms(encode_copy(clip, tmp_path / "fast.mp4"))
    assert atoms.index("moov") < atoms.index("mdat")


def test_abort_and_errors_leave_no_file(clip, tmp_path):
    info = probe(clip)
    frame = next(iter_frames(clip))
    writer = VideoWriter(tmp_path / "aborted.mp4", info)
    writer.write(frame.image, frame.pts, frame.time)
    assert not (tmp_path / "aborted.mp4").exists()
    writer.abort()
    with pytest.raises(RuntimeError):
        with VideoWriter(tmp_path / "failed.mp4", info, audio_from=clip) as failing:
            failing.write(frame.image, frame.pts, frame.time)
            raise RuntimeError("tracking failed")
    assert list(tmp_path.iterdir()) == []


def test_a_folder_removed_while_writing_is_said_not_taken_for_a_full_disk(clip, tmp_path):
    """The page's session folder goes when the session closes or the server's temporary folder is cleaned."""
    folder = tmp_path / "session"
    folder.mkdir()
    frame = next(iter_frames(clip))
    video_writer = VideoWriter(folder / "tracked.mp4", probe(clip))
    video_writer.write(frame.image, frame.pts, frame.time)
    zip_writer = MaskZipWriter(folder / "masks.zip")
    zip_writer.write(0, np.zeros((HEIGHT, WIDTH), np.uint8))
    shutil.rmtree(folder)
    for writer in (video_writer, zip_writer):
        with pytest.raises(VideoError, match=re.escape(
                f"finishing {writer.path.name} failed: its folder {folder} was removed while writing")) as err:
            writer.close()
        assert "disk" not in str(err.value)
    assert not folder.exists()

def test_missing_output_folders_are_created(clip, tmp_path):
    output = encode_copy(clip, tmp_path / "a" / "b" / "out.mp4")
    assert probe(output).frame_count == FRAMES


def test_unusable_output_folder_is_a_clear_error(clip, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    for output in (blocker / "out.mp4", blocker / "sub" / "out.mp4"):
        with pytest.raises(VideoError, match=f"cannot write to {output}: {blocker} is a file, not a folder"):
            VideoWriter(output, probe(clip))


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_a_folder_that_refuses_files_is_refused_before_work_even_for_root():
    """/proc takes no new files, for root neither (whom os.access always answers yes)."""
    with pytest.raises(VideoError, match=r"cannot write to /proc/out.mp4: no file can be made in the folder /proc \("):
        check_writable_folder(Path("/proc/out.mp4"))
    with pytest.raises(VideoError, match="no file can be made in the folder /proc"):
        check_writable_folder(Path("/proc/new/folder/out.mp4"))


def test_writer_runs_in_another_thread(clip, tmp_path):
    info = probe(clip)
    writer = VideoWriter(tmp_path / "threaded.mp4", info)
    frames = list(iter_frames(clip, 0, 10))

    def encode() -> None:
        for frame in frames:
            writer.write(frame.image, frame.pts, frame.time)
        writer.close()

    worker = threading.Thread(target=encode)
    worker.start()
    worker.join()
    assert probe(tmp_path / "threaded.mp4").frame_count == 10


def test_the_encoder_leaves_a_quarter_of_the_cores_to_the_rest_of_the_pipeline(clip, tmp_path, monkeypatch):
    assert [video.encoder_threads(cores) for cores in (1, 2, 4, 16, 64)] == [1, 1, 3, 12, 48]
    monkeypatch.setattr(video.os, "cpu_count", lambda: 8)
    writer = VideoWriter(tmp_path / "threads.mp4", probe(clip))
    try:
        assert writer._video.codec_context.thread_count == 6
    finally:
        writer.abort()


def test_vp9_cutout_keeps_its_alpha(clip, tmp_path):
    info = probe(clip)
    cx, cy = disc_centre(0, FRAMES, WIDTH, HEIGHT)
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH]
    inside = (x - cx) ** 2 + (y - cy) ** 2 < 20 ** 2
    with VideoWriter(tmp_path / "cutout.webm", info, codec="libvpx-vp9", crf=30) as writer:
        for frame in iter_frames(clip):
            rgba = np.dstack([frame.image, np.where(inside, 255, 0).astype(np.uint8)])
            writer.write(rgba, frame.pts, frame.time)
    with av.open(str(tmp_path / "cutout.webm")) as container:
        decoder = av.CodecContext.create("libvpx-vp9", "r")  # FFmpeg's own vp9 decoder drops alpha
        decoded = [f for p in container.demux(video=0) for f in decoder.decode(p)]
    assert len(decoded) == FRAMES and decoded[0].format.name == "yuva420p"
    alpha = decoded[5].to_ndarray(format="rgba")[..., 3]
    assert alpha[inside].mean() > 250 and alpha[~inside].mean() < 5


def test_a_cutout_from_another_videos_masks_is_refused_and_leaves_nothing(clip, tmp_path):
    writer = MaskZipWriter(tmp_path / "other_masks.zip")
    for index in range(FRAMES):
        writer.write(index, np.zeros((HEIGHT + 2, WIDTH), np.uint8))
    writer.close()
    with pytest.raises(TrackerError, match=f"other_masks.zip holds {WIDTH}x{HEIGHT + 2} masks, and clip.mp4 is "
                                           f"{WIDTH}x{HEIGHT}: use the masks zip tracked from this video"):
        export_cutout(clip, tmp_path / "other_masks.zip", [1], tmp_path / "cut.webm")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other_masks.zip"]


@pytest.mark.parametrize("kind", [None, "matte"])
def test_frames_a_masks_zip_lacks_are_drawn_with_no_object_and_said(clip, tmp_path, caplog, kind):
    """A masks zip that ends early (or skips frames) stopped the drawing at its first missing frame: the
    video is drawn whole, those frames without objects, and the warning says which."""
    labels = np.zeros((HEIGHT, WIDTH), np.uint8)
    labels[10:30, 20:50] = 1
    with MaskZipWriter(tmp_path / "short_masks.zip") as writer:
        for index in [*range(10), 12]:
            writer.write(index, labels)
    if kind is None:
        output = export_overlay(clip, tmp_path / "short_masks.zip", tmp_path / "redrawn.mp4", alpha=1.0,
                                outline=0, crf=18, preset="ultrafast")
    else:
        output = export_cutout(clip, tmp_path / "short_masks.zip", [1], tmp_path / "matte.mp4", kind)
    frames = list(iter_frames(output))
    assert len(frames) == FRAMES
    if kind == "matte":
        assert [frame.image[20, 30, 1] > 128 for frame in frames] == [i < 10 or i == 12 for i in range(FRAMES)]
    assert f"short_masks.zip holds no masks for {FRAMES - 11} of the {FRAMES} frames of clip.mp4 (frames 10, 11, " \
           f"13 to {FRAMES - 1}): {output.name} shows them with no object" in caplog.text


def test_exports_through_the_api_take_a_folder_as_the_cli_does(clip, tmp_path):
    """A folder (a name ending in a slash, or one that exists) gets the file named as the CLI names it."""
    masks = tmp_path / "clip_masks.zip"
    labels = np.zeros((HEIGHT, WIDTH), np.uint8)
    labels[10:30, 20:50] = 1
    with MaskZipWriter(masks) as writer:
        for index in range(FRAMES):
            writer.write(index, labels)
    assert export_cutout(clip, masks, [1], f"{tmp_path}/cuts/", "green") == tmp_path / "cuts" / \
        "clip_cutout_greenscreen.mp4"
    assert probe(tmp_path / "cuts" / "clip_cutout_greenscreen.mp4").frame_count == FRAMES
    assert export_boxes(masks, tmp_path / "cuts") == tmp_path / "cuts" / "clip_boxes.csv"
    other = tmp_path / "run.zip"
    shutil.copy(masks, other)
    assert export_boxes(other, f"{tmp_path}/boxes/") == tmp_path / "boxes" / "run_boxes.csv"
    assert (tmp_path / "boxes" / "run_boxes.csv").read_text().splitlines()[1] == "0,1,20,10,30,20,600"


@pytest.mark.parametrize("make, message", [
    (lambda d: d / "missing.mp4", "no such video file"),
    (lambda d: Path("/dev/null"), "/dev/null is not a file"),
    (lambda d: make_empty_file(d / "empty.mp4"), "empty"),
    (lambda d: make_text_file(d / "notes.mp4"), "not a video"),
    (lambda d: make_audio_only(d / "song.mp4"), "only audio"),
    (lambda d: blanked_media_copy(make_clip(d / "src.mp4", frames=3, audio=False), d / "blank.mp4"),
     "no frame .* can be decoded"),
])
def test_unusable_inputs_are_clear_errors(tmp_path, make, message):
    with pytest.raises(VideoError, match=message):
        probe(make(tmp_path))


def test_truncated_file_decodes_what_is_there(clip, tmp_path):
    damaged = truncated_copy(clip, tmp_path / "cut.mp4", keep=0.6)
    info = probe(damaged)
    assert info.frame_count == FRAMES  # what the index promises
    assert probe(clip).truncated_to is None and 0 < info.truncated_to < FRAMES
    frames = list(iter_frames(damaged))
    assert 0 < info.present_frames <= len(frames) < FRAMES
    assert all(close_to(f.image, clip_frame(f.index, FRAMES, WIDTH, HEIGHT)) for f in frames)
    with pytest.raises(VideoError, match="cannot be decoded"):
        read_frame(damaged, FRAMES - 1)


def test_the_frames_a_truncated_file_is_said_to_hold_all_decode(tmp_path):
    """With B-frames, decoding order runs ahead of display order: the frames counted present are those before
    the first one that the cut-off packet or the missing ones may be, not as many as the packets read whole."""
    whole = make_clip(tmp_path / "whole.mp4", frames=64, width=64, height=48, audio=False, faststart=True,
                      bframes=3)
    for keep in np.arange(0.32, 0.95, 0.03):
        cut = truncated_copy(whole, tmp_path / "cut.mp4", keep=keep)
        info = probe(cut)
        decoded = [frame.index for frame in iter_frames(cut)]
        assert 0 < info.present_frames < 64 and decoded[:info.present_frames] == list(range(info.present_frames))
        assert info.present_frames >= len(decoded) - 3  # at most the reordering is given up
        # the references decoded past the whole frames leave a gap that is not the video's timing
        assert info.evenly_timed and not info.variable_rate and "on average" not in upload_message(info)


@pytest.mark.parametrize("ending", [".webm", ".mkv"])
def test_a_file_cut_short_with_its_index_is_said_to_be(tmp_path, ending, caplog):
    """Matroska keeps its index at the end: a cut file looks whole but for the length its header declares."""
    whole = make_clip(tmp_path / f"whole{ending}", frames=30, codec="libvpx-vp9" if ending == ".webm" else "libx264",
                      audio_codec="libopus" if ending == ".webm" else "aac")
    cut = truncated_copy(whole, tmp_path / f"cut{ending}", keep=0.5)
    caplog.clear()
    info = probe(cut)
    # Said as the file is opened (before a long run) in the words the run's summary uses.
    assert [record.getMessage() for record in caplog.records] == [f"cut{ending}: {truncation_note(info)}"]
    caplog.clear()
    assert probe(cut) == info and not caplog.records  # a job probes again: said once while the file is unchanged
    assert info.cut_short == pytest.approx(30 / FPS, abs=0.05) and info.truncated_to is None
    assert info.frame_count == len(list(iter_frames(cut))) < 30
    assert truncation_note(info).startswith(
        "the file seems cut short or damaged (an unfinished download or copy?): its header says it lasts 1.2 s, but "
        f"its frames end at {info.duration:.1f} s")
    assert probe(whole).cut_short is None and truncation_note(probe(whole)) is None


def test_sound_that_outlasts_the_picture_is_not_a_cut_file(tmp_path):
    narrated = make_clip(tmp_path / "narrated.mkv", frames=10, audio_seconds=2.0)
    assert probe(narrated).cut_short is None


def single_threaded_decode(path: Path) -> list[int]:
    """The frames one decoder thread gets out of a damaged file (it skips a refused packet and goes on), by index."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        order = sorted(packet.pts for packet in container.demux(stream) if packet.size)
        container.seek(0)
        decoded = []
        for packet in container.demux(stream):
            try:
                decoded += [order.index(frame.pts) for frame in packet.decode()]
            except (av.FFmpegError, EOFError):
                pass
    return decoded


@pytest.mark.parametrize("threads", [None, 16])
def test_damage_that_breaks_the_frame_threads_costs_only_its_frames(tmp_path, monkeypatch, threads):
    """With frame threads FFmpeg loses every frame after such damage (here 4 of 10 came): the app decodes the
    rest again on one thread. With as many threads as a 16-core machine has, every packet is in the threads
    when the damage shows, and PyAV drops the error that comes with the frames drained at the end."""
    opened = video._video_stream

    def with_threads(container, path, frame_threads=True):
        stream = opened(container, path, frame_threads)
        if frame_threads and threads:
            stream.codec_context.thread_count = threads
        return stream

    monkeypatch.setattr(video, "_video_stream", with_threads)
    damaged = noisy_copy(make_clip(tmp_path / "clip.mp4", frames=10, width=160, height=120, fps=10),
                         tmp_path / "damaged.mp4")
    present = single_threaded_decode(damaged)
    assert 4 < len(present) < 10 and present[-1] > 4
    assert [frame.index for frame in iter_frames(damaged)] == present
    assert [frame.index for frame in iter_frames(damaged, present[-2])] == present[-2:]


def test_a_recording_cut_mid_gop_starts_at_its_first_keyframe(tmp_path):
    """The packets before the first keyframe (a stream dump, a cut MPEG-TS) decode to nothing: the video starts
    at that keyframe, with one numbering for reading in order, seeking and the frame count."""
    whole = make_clip(tmp_path / "whole.ts", frames=30, fps=10, gop=12, bframes=2)
    data = whole.read_bytes()
    cut = tmp_path / "cut.ts"
    cut.write_bytes(data[len(data) // 188 * 2 // 5 * 188:])
    info = probe(cut)
    frames = list(iter_frames(cut))
    assert info.frame_count == len(frames) == 6 and info.truncated_to is None
    assert [frame.index for frame in frames] == list(range(6))
    assert read_frame(cut, 3).time == pytest.approx(frames[3].time)
    assert np.array_equal(read_frame(cut, 3).image, frames[3].image)


@pytest.mark.parametrize("name, params", [("clip.avi", None), ("clip.ts", None), ("clip.mkv", None), ("clip.mp4", None),
                                          ("open_gop.avi", "open-gop=1:b-adapt=0:scenecut=0")])
def test_a_whole_file_with_b_frames_keeps_every_frame_in_order(tmp_path, name, params):
    """Every frame comes in display order at a rising time, and `read_frame` (the app's preview) and a run
    started later show the frame tracked under its number. AVI keeps decoding times only (its decoder lets
    pictures out stamped with their neighbours' times): there frames are counted from a keyframe and
    timed by their place (an open GOP's keyframe, shown after B-frames that follow it, is not counted from)."""
    clip = make_clip(tmp_path / name, frames=30, audio=False, bframes=2, gop=12, x264_params=params)
    frames = list(iter_frames(clip))
    assert probe(clip).frame_count == 30 and [frame.index for frame in frames] == list(range(30))
    assert all(close_to(frame.image, clip_frame(frame.index, 30, 160, 120)) for frame in frames)
    steps = np.diff([frame.time for frame in frames])[:-1]  # the clip's last frame may be shorter
    assert np.allclose(steps, 1 / 25), steps
    for index in (1, 2, 7, 11, 12, 13, 14, 25, 29):
        assert np.array_equal(read_frame(clip, index).image, frames[index].image), index
    later = list(iter_frames(clip, 13))
    assert [frame.index for frame in later] == list(range(13, 30))
    assert all(np.array_equal(a.image, b.image) and a.time == b.time for a, b in zip(later, frames[13:]))
    copied = [frame.time for frame in iter_frames(encode_copy(clip, tmp_path / "copy.mp4"))]
    assert np.allclose(np.diff(copied)[:-1], 1 / 25)  # the writer had timestamps going back to mend


def test_damage_in_the_middle_costs_the_damaged_frames_not_the_rest(tmp_path):
    """Two overwritten runs: the decoder refuses some packets; the frames after them still come."""
    whole = make_clip(tmp_path / "whole.mp4", frames=120, width=320, height=240)
    damaged = noisy_copy(whole, tmp_path / "damaged.mp4")
    frames = list(iter_frames(damaged))
    assert 60 < len(frames) < 120, len(frames)  # stopping at the first refused packet kept about 35
    assert frames[-1].time == pytest.approx(list(iter_frames(whole))[-1].time)
    assert close_to(frames[-1].image, clip_frame(119, 120, 320, 240))
    # A lost frame leaves a gap: every index still names the frame that read_frame (the app's slider) shows.
    indices = [f.index for f in frames]
    assert indices[-1] == 119 and indices == sorted(set(indices))
    times = {f.index: f.time for f in iter_frames(whole)}
    assert all(f.time == pytest.approx(times[f.index]) for f in frames)
    later = frames[-10]
    assert read_frame(damaged, later.index).time == pytest.approx(later.time)
    assert [f.index for f in iter_frames(damaged, later.index)] == indices[-10:]
    lost = next(i for i in range(120) if i not in indices)
    with pytest.raises(VideoError, match=f"frame {lost} cannot be decoded"):
        read_frame(damaged, lost)


def test_a_recording_that_changes_picture_size_is_scaled_to_its_first_size(tmp_path):
    """Segments joined end to end (`cat a.ts b.ts`): every frame comes at the size `probe` reports (the
    pipeline's tensors and the writer need one size), none is lost at the join (MPEG-TS flags its packet)."""
    joined = make_joined_recording(tmp_path / "joined.ts", ((320, 240), (160, 120)), frames=8)
    info = probe(joined)
    assert (info.width, info.height, info.frame_count) == (320, 240, 16)
    for yuv in (False, True):
        frames = list(iter_frames(joined, yuv=yuv))
        assert [f.index for f in frames] == list(range(16))
        assert all(f.image.shape == (240, 320, 3) for f in frames[8:])
        assert all((f.yuv.width, f.yuv.height) == (320, 240) if f.yuv else f.image.shape == (240, 320, 3)
                   for f in frames[:8])
    later = read_frame(joined, 12, info.size)  # seeking past the join: at the size probe reports
    drawn = Image.fromarray(clip_frame(12, 16, 160, 120)).resize((320, 240), Image.Resampling.BICUBIC)
    assert close_to(later.image, np.asarray(drawn))


@pytest.mark.parametrize("bframes", [0, 2])
def test_recordings_joined_whose_clocks_start_again_play_one_after_the_other(tmp_path, bframes):
    """`cat` of separate recordings: each part's timestamps start again. The parts follow each other in
    time (FFmpeg squeezes a part whose clock went back less than 10 s into one instant), the sound with
    them, and a frame is found by its place, not by a timestamp two frames share."""
    joined = make_joined_recording(tmp_path / "joined.ts", ((160, 120),) * 3, frames=10, restart=True, audio=True,
                                   bframes=bframes)
    info = probe(joined)
    assert (info.frame_count, info.fps) == (30, 25) and info.duration == pytest.approx(1.2)
    frames = list(iter_frames(joined))
    assert [f.index for f in frames] == list(range(30))
    assert np.diff([f.time for f in frames]) == pytest.approx([0.04] * 29)
    for index in (13, 25):  # after a join: not the frame of the first part stamped the same
        assert close_to(read_frame(joined, index).image, frames[index].image)
        assert not close_to(read_frame(joined, index).image, frames[index % 10].image)
        assert [f.time for f in iter_frames(joined, index, index + 2)] == [frames[index].time, frames[index + 1].time]
    output = encode_copy(joined, tmp_path / "out.mp4")
    assert [round(f.time, 3) for f in iter_frames(output)] == [round(i * 0.04, 3) for i in range(30)]
    assert sound_runs(output) == pytest.approx([0, 1.2], abs=0.05)


def sound_runs(path: Path) -> list[float]:
    """Start and end seconds of each stretch of an output's first audio track without a gap, one after another
    (from the decoded samples: MP4 stores a gap as a longer packet)."""
    runs: list[list[float]] = []
    with av.open(str(path)) as container:
        for frame in container.decode(audio=0):
            start = float(frame.pts * frame.time_base)
            end = start + frame.samples / frame.sample_rate
            if runs and abs(start - runs[-1][1]) < 0.01:
                runs[-1][1] = end
            else:
                runs.append([start, end])
    return [seconds for run in runs for seconds in run]


def test_a_joined_part_without_sound_leaves_a_gap_and_the_next_parts_sound_in_its_place(tmp_path):
    joined = make_joined_recording(tmp_path / "joined.ts", ((160, 120),) * 3, frames=10, restart=True,
                                   audio=(True, False, True))
    assert sound_runs(encode_copy(joined, tmp_path / "out.mp4")) == pytest.approx([0, 0.4, 0.8, 1.2], abs=0.05)


@pytest.mark.parametrize("bframes", [0, 2])
def test_a_capture_started_mid_stream_joined_after_a_recording_follows_it(media_dir, tmp_path, bframes):
    """A capture that starts mid-GOP begins with pictures that refer to ones it lacks: the part starts with
    them, one frame after the part before, whether read through or sought."""
    whole = make_clip(media_dir / f"gop12_{bframes}.ts", frames=60, gop=12, bframes=bframes, audio=False)
    capture = capture_from(whole, tmp_path / "capture.ts", packet=17)
    first = make_clip(media_dir / "first.ts", frames=30, gop=12, audio=False)
    joined = tmp_path / "joined.ts"
    joined.write_bytes(first.read_bytes() + capture.read_bytes())
    info = probe(joined)
    assert len(info.joins) == 1 and info.frame_count == 30 + 43
    frames = list(iter_frames(joined))  # those of the capture before its first keyframe may not decode
    times = [f.time for f in frames]
    assert np.diff(times) == pytest.approx(np.diff([f.index for f in frames]) / FPS)  # in order, none squeezed
    assert frames[-1].index == 72 and times[-1] == pytest.approx(times[0] + 72 / FPS)
    later = {f.index: f.time for f in frames[-10:]}
    assert {i: read_frame(joined, i).time for i in later} == later


@pytest.mark.parametrize("seconds", [10.0, -1.0])
def test_one_damaged_timestamp_is_no_join(media_dir, tmp_path, seconds):
    source = make_clip(media_dir / "gop12.ts", frames=60, gop=12, bframes=2)
    damaged = damaged_timestamp_copy(source, tmp_path / "damaged.ts", packet=30, seconds=seconds)
    assert [f.time for f in iter_frames(damaged)] != [f.time for f in iter_frames(source)]  # it is damaged
    assert probe(damaged).joins == () and probe(damaged).frame_count == 60


def test_recordings_that_go_on_from_each_other_are_not_taken_for_joins(tmp_path):
    """A part with B-frames after one without: its decoding timestamps start a little back, its clock does not."""
    joined = make_joined_recording(tmp_path / "joined.ts", ((160, 120),) * 2, frames=10, bframes=(0, 2))
    assert probe(joined).joins == ()
    assert [f.time for f in iter_frames(joined)] == pytest.approx([read_frame(joined, i).time for i in range(20)])


def test_a_file_cut_inside_a_packet_counts_only_whole_frames_and_keeps_their_times(tmp_path):
    whole = make_clip(tmp_path / "whole.mp4", frames=30, width=160, height=96, faststart=True)
    cut = truncated_copy(whole, tmp_path / "cut.mp4", keep=0.5)  # ends inside a frame's packet
    info = probe(cut)
    frames = list(iter_frames(cut))
    assert 0 < len(frames) == info.present_frames < 30  # every frame it holds whole, and no more
    read_frame(cut, info.present_frames - 1)
    # The last frames come drained from the decoder at the cut: their times too are the file's.
    assert [f.time for f in frames] == pytest.approx([f.time for f in iter_frames(whole, stop=len(frames))])


def test_tags_that_are_not_utf8_do_not_stop_the_video(clip, tmp_path):
    """Cameras and old muxers write tags in other encodings; the picture must still open and decode."""
    tagged = tmp_path / "tagged.mkv"
    with av.open(str(clip)) as source, av.open(str(tagged), "w") as target:
        target.metadata["title"] = "TITLEMARK"
        stream = target.add_stream_from_template(source.streams.video[0])
        for packet in source.demux(source.streams.video[0]):
            if packet.dts is not None:
                packet.stream = stream
                target.mux(packet)
    data = tagged.read_bytes()
    assert data.count(b"TITLEMARK") == 1
    tagged.write_bytes(data.replace(b"TITLEMARK", b"TI\xff\xfe\xc3MARK"))
    info = probe(tagged)
    assert (info.width, info.height, info.frame_count) == (WIDTH, HEIGHT, FRAMES)
    assert len(list(iter_frames(tagged))) == FRAMES


def test_yuv_frames_carry_planes_that_convert_to_the_rgb_frames(clip, media_dir):
    """The planes path (used on a GPU) gives swscale's RGB, rotation included, within a level: chroma
    interpolated between samples where the stream sites them (repeating each sample over its 2x2 block
    differed by up to 54 levels at colour edges)."""
    from tracker.colour import yuv420_to_rgb

    rotated = make_clip(media_dir / "rotated_planes.mp4", frames=4, rotation=90, audio=False)
    for path in (clip, rotated):
        for rgb, planes in zip(iter_frames(path), iter_frames(path, yuv=True)):
            assert planes.image is None and planes.yuv is not None and (planes.pts, planes.time) == (rgb.pts, rgb.time)
            converted = yuv420_to_rgb(planes.yuv).numpy()
            assert converted.shape == rgb.image.shape
            difference = np.abs(converted.astype(int) - rgb.image)
            assert difference.max() <= 1 and difference.mean() < 0.05


def test_yuv_request_falls_back_to_rgb_where_planes_do_not_fit(media_dir):
    ten_bit = make_clip(media_dir / "ten_bit_planes.mp4", frames=3, pix_fmt="yuv420p10le", audio=False)
    full_chroma = make_clip(media_dir / "yuv444_planes.mp4", frames=3, pix_fmt="yuv444p", audio=False)
    odd = make_clip(media_dir / "odd_planes.webm", frames=3, width=161, height=121, codec="libvpx-vp9",
                    audio=False)
    assert probe(odd).pix_fmt == "yuv420p"
    for path in (ten_bit, full_chroma, odd):
        frames = list(iter_frames(path, yuv=True))
        assert frames and all(f.yuv is None and f.image.dtype == np.uint8 for f in frames)


@pytest.mark.parametrize("size", [(WIDTH, HEIGHT), (98, 74)])  # PyAV wraps 4:2:0 planes in place only for some
def test_writer_takes_yuv_pictures_made_on_the_device(clip, media_dir, tmp_path, size):
    """Frames converted by rgb_to_yuv420 encode like RGB frames converted by swscale, even when the caller
    reuses its buffer as soon as `write` returns."""
    import torch

    from tracker.colour import rgb_to_yuv420

    if size != (WIDTH, HEIGHT):
        clip = make_clip(media_dir / "74p.mp4", frames=FRAMES, width=size[0], height=size[1])
    info = probe(clip)
    frames = list(iter_frames(clip))

    def yuv(image: np.ndarray):
        picture = rgb_to_yuv420(torch.from_numpy(image))
        reused.append(picture.planes.numpy())
        return picture

    reused = []
    for name, convert in (("rgb.mp4", lambda image: image), ("yuv.mp4", yuv)):
        with VideoWriter(tmp_path / name, info) as writer:
            for frame in frames:
                writer.write(convert(frame.image), frame.pts, frame.time)
                for planes in reused:
                    planes[:] = 0  # the encoder may not read the caller's memory after write returns
    via_rgb, via_yuv = list(iter_frames(tmp_path / "rgb.mp4")), list(iter_frames(tmp_path / "yuv.mp4"))
    assert len(via_rgb) == len(via_yuv) == FRAMES
    for source, a, b in zip(frames, via_rgb, via_yuv):  # as faithful to the source as the swscale path
        error_rgb, error_yuv = (np.abs(x.image.astype(int) - source.image).mean() for x in (a, b))
        assert error_yuv <= error_rgb + 0.25
    with VideoWriter(tmp_path / "wrong.mp4", info) as writer, pytest.raises(ValueError, match="BT.709"):
        writer.write(rgb_to_yuv420(torch.zeros(60, 80, 3, dtype=torch.uint8)), 0, 0.0)


@pytest.mark.parametrize("codec, suffix", [("libx264", ".mp4"), ("libx264", ".mkv"), ("libvpx-vp9", ".webm")])
def test_a_written_video_says_where_its_chroma_sits(clip, tmp_path, codec, suffix):
    """Both conversions to YUV put chroma between pixel pairs; H.264 that does not say so is read as having
    it on the even columns, half a pixel to the left of where it was made."""
    with VideoWriter(tmp_path / f"out{suffix}", probe(clip), codec=codec) as writer:
        for frame in iter_frames(clip, 0, 3):
            writer.write(frame.image, frame.pts, frame.time)
    with av.open(str(tmp_path / f"out{suffix}")) as container:
        assert chroma_siting(next(container.decode(video=0))) == (False, False)


def test_a_file_replaced_in_place_is_read_again(tmp_path):
    """The timeline of a file is kept while the file is unchanged, not once the path holds another video."""
    path = make_clip(tmp_path / "clip.mp4", frames=12, audio=False)
    assert probe(path).frame_count == 12 and len(list(iter_frames(path, 5))) == 7
    make_clip(tmp_path / "other.mp4", frames=20, audio=False).replace(path)
    assert probe(path).frame_count == 20 and len(list(iter_frames(path, 5))) == 15


def test_a_video_written_from_its_own_frames_keeps_its_brightness(clip, tmp_path):
    """Decoding to RGB and encoding back (losslessly here) moves no level on average: swscale's fast path
    made each pass about one level darker (-1.2), which added up over renders and re-exports."""
    output = encode_copy(clip, tmp_path / "lossless.mp4", crf=0)
    before = np.stack([frame.image for frame in iter_frames(clip)]).astype(float)
    after = np.stack([frame.image for frame in iter_frames(output)]).astype(float)
    assert abs((after - before).mean()) < 0.2, (after - before).mean(axis=(0, 1, 2))


@pytest.mark.parametrize("suffix", [".mp4", ".mov", ".mkv"])
@pytest.mark.parametrize("rotation", [0, 90])
def test_anamorphic_video_keeps_its_pixel_aspect(tmp_path, suffix, rotation):
    """PAL widescreen stores 720x576 pixels shown 64:45 wide: without it the output played 5:4, squashed."""
    clip = make_clip(tmp_path / "pal.mp4", frames=6, width=96, height=64, rotation=rotation, audio=False,
                     pixel_aspect=Fraction(64, 45))
    info = probe(clip)
    assert info.pixel_aspect == (Fraction(45, 64) if rotation else Fraction(64, 45))
    assert probe(encode_copy(clip, tmp_path / f"copy{suffix}")).pixel_aspect == info.pixel_aspect
    assert probe(encode_copy(make_clip(tmp_path / "square.mp4", frames=3, audio=False),
                             tmp_path / f"square{suffix}")).pixel_aspect == 1


def test_a_frame_rate_that_a_millisecond_clock_rounds_is_written_exactly(tmp_path):
    """OBS records 29.97 fps into Matroska, whose clock counts milliseconds (0, 33, 67, 100, ...): the tracked
    MP4 is timed on 30000/1001's exact grid, as FFmpeg's conversion times it, where it kept 33 and 34 ms
    steps (29.96 fps, which an editor reads as a variable rate). Times that no standard rate rounds to
    milliseconds (a phone's variable rate) and 25 fps (40 ms exactly) are written as they are."""
    def steps(path: Path) -> set[Fraction]:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            stamps = sorted(packet.pts for packet in container.demux(stream) if packet.size)
            return {Fraction(int(step)) * stream.time_base for step in np.diff(stamps)}

    recorded = make_clip(tmp_path / "obs.mkv", frames=40, fps=Fraction(30000, 1001))
    info = probe(recorded)
    assert info.time_base == Fraction(1, 1000) and info.rounded_rate == Fraction(30000, 1001)
    assert steps(recorded) == {Fraction(33, 1000), Fraction(34, 1000)}
    written = encode_copy(recorded, tmp_path / "tracked.mp4")
    assert steps(written) == {Fraction(1001, 30000)}
    assert probe(written).duration == pytest.approx(info.duration, abs=0.002)
    assert probe(written).fps == Fraction(30000, 1001)
    webcam = make_clip(tmp_path / "webcam.mkv", frames=20, fps=15)  # 66 and 67 ms
    assert probe(webcam).rounded_rate == 15 and steps(encode_copy(webcam, tmp_path / "webcam.mp4")) == \
        {Fraction(1, 15)}

    def recorded_as(name: str, codec: str, time_base: Fraction, times: np.ndarray, **options) -> Path:
        with av.open(str(tmp_path / name), "w", options=options) as container:
            stream = container.add_stream(codec, rate=30)
            stream.width, stream.height, stream.pix_fmt = 160, 120, "yuv420p"
            stream.codec_context.time_base = time_base
            for time in times:
                frame = av.VideoFrame.from_ndarray(np.zeros((120, 160, 3), np.uint8), format="rgb24")
                frame.pts, frame.time_base = round(time / time_base), time_base
                container.mux(stream.encode(frame))
            container.mux(stream.encode())
        return tmp_path / name

    phone = recorded_as("phone.mkv", "libx264", Fraction(1, 1000),
                        np.cumsum(np.random.default_rng(0).uniform(0.02, 0.05, 30)))
    pal = make_clip(tmp_path / "pal.mkv", frames=20, fps=25)
    # Clocks that hold the rate, where a short file would fit its NTSC neighbour too (29.97 read as 30).
    avi = recorded_as("ntsc.avi", "mpeg4", Fraction(1001, 30000), np.arange(60) * 1001 / 30000)
    iphone = recorded_as("iphone.mov", "libx264", Fraction(1, 600), np.arange(45) / 30, video_track_timescale="600")
    assert not info.variable_rate and probe(phone).variable_rate
    for path in (phone, pal, avi, iphone):
        assert probe(path).rounded_rate is None, path.name
        assert probe(path).variable_rate == (path is phone), path.name
        assert steps(encode_copy(path, tmp_path / f"{path.stem}.mp4")) == steps(path), path.name
    # Constant rates all the same: a frame dropped, and OBS's 29.97 remuxed to MP4 (FFmpeg keeps the
    # milliseconds, in 1/16000 s).
    dropped = recorded_as("dropped.mkv", "libx264", Fraction(1, 1000), np.delete(np.arange(40), 10) / 25)
    remuxed = recorded_as("remuxed.mp4", "libx264", Fraction(1, 16000), np.round(np.arange(45) * 1001 / 30) / 1000)
    assert not probe(dropped).variable_rate and not probe(remuxed).variable_rate


@pytest.mark.parametrize("suffix, params, rotation, order", [
    (".mp4", "tff=1", 0, "tff"), (".mkv", "bff=1", 0, "bff"),
    (".mp4", "tff=1", 180, "bff"),  # turned upside down, the top field's rows are the bottom's
    (".mp4", "tff=1", 90, None),  # turned a quarter, rows are no fields: progressive
    (".mp4", None, 0, None)])
def test_interlaced_video_is_written_interlaced_in_its_field_order(tmp_path, caplog, suffix, params, rotation, order):
    """Broadcast and camcorder video (1080i) goes back into an editor's interlaced timeline: written as
    progressive frames, its fields' rows were coded together (combing) and players did not deinterlace."""
    clip = make_clip(tmp_path / f"in{suffix}", frames=6, x264_params=params, rotation=rotation, audio=False)
    assert probe(clip).field_order == order
    assert probe(encode_copy(clip, tmp_path / f"out{suffix}")).field_order == order
    if order:
        encode_copy(clip, tmp_path / "cutout.webm", codec="libvpx-vp9")
        assert "written as progressive frames (VP9" in caplog.text


def test_interlaced_pictures_keep_each_fields_colours(tmp_path, monkeypatch):
    """Where something moves, an interlaced picture's two fields differ (here red rows over blue ones): its
    chroma is made field by field, on the CPU (swscale) and on the device (`encoder_picture`), so that
    players read each field's colours back; made from the frame's rows, both came back purple (63.8 levels
    off on average)."""
    import torch

    from tracker import colour
    from tracker.render import encoder_picture

    info = probe(make_clip(tmp_path / "in.mp4", frames=3, x264_params="tff=1", audio=False))
    picture = np.full((HEIGHT, WIDTH, 3), 128, np.uint8)
    picture[40:80:2], picture[41:80:2] = (220, 40, 40), (40, 40, 220)
    monkeypatch.setattr(colour, "colour_on_device", lambda device: True)
    on_device = encoder_picture(torch.from_numpy(picture), interlaced=True).result()
    assert on_device.interlaced
    for name, image in (("cpu.mp4", picture), ("device.mp4", on_device)):
        with VideoWriter(tmp_path / name, info, crf=0) as writer:
            writer.write(image, None, 0.0)
        back = next(iter_frames(tmp_path / name)).image.astype(int)
        assert probe(tmp_path / name).field_order == "tff"
        assert np.abs(back[44:76] - picture[44:76]).mean() < 1.5, name
    with VideoWriter(tmp_path / "wrong.mp4", info) as writer, pytest.raises(ValueError, match="interlaced"):
        writer.write(encoder_picture(torch.from_numpy(picture)).result(), 0, 0.0)


def test_interlaced_video_that_h264_cannot_code_so_is_written_progressive(tmp_path, caplog):
    """libx264 codes interlaced 4:2:0 pictures in 4-row units: 118 rows (NTSC's 486 alike) are written as
    progressive frames, with a warning, not refused."""
    clip = make_clip(tmp_path / "in.mp4", frames=6, height=118, pix_fmt="yuv444p", x264_params="tff=1",
                     audio=False)
    assert probe(clip).field_order == "tff"
    assert probe(encode_copy(clip, tmp_path / "out.mp4")).field_order is None
    assert "written as progressive frames (H.264" in caplog.text


@pytest.mark.parametrize("width, height, matrix", [(1280, 536, "itu709"), (1280, 720, "itu709"), (720, 576, "itu601")])
def test_untagged_colours_are_read_as_players_read_them(tmp_path, width, height, matrix):
    """Without a colour matrix tag, HD (1280 wide, as a film cropped to 1280x536, or taller than 576) is
    BT.709 and SD BT.601, as players take them: the other matrix shifts saturated colours by tens of levels."""
    patches = np.array([[220, 30, 40], [30, 200, 60], [40, 50, 210], [200, 200, 40]], dtype=np.uint8)
    picture = np.repeat(np.repeat(patches[None], height, axis=0), width // 4, axis=1)
    path = tmp_path / "untagged.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=25, options={"crf": "10"})
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for index in range(2):
            frame = av.VideoFrame.from_ndarray(picture, format="rgb24").reformat(
                format="yuv420p", dst_colorspace=matrix, dst_color_range="MPEG")
            frame.pts = index
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    decoded = next(iter_frames(path)).image
    assert np.abs(decoded.astype(float) - picture).mean() < 3


def test_hdr_video_is_said_to_lose_its_range(tmp_path):
    """An HLG or PQ recording (phones film HDR) is written as standard range without tone mapping: the user
    is told, not left to find washed-out colours."""
    from tracker.interactive import upload_message

    path = tmp_path / "hlg.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.codec_context.color_trc, stream.codec_context.color_primaries = 18, 9  # ARIB STD-B67, BT.2020
        stream.codec_context.colorspace = 9
        for index in range(2):
            frame = av.VideoFrame.from_ndarray(np.zeros((48, 64, 3), np.uint8), format="rgb24")
            frame.pts = index
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    info = probe(path)
    assert info.hdr == "HLG" and colour_note(info).startswith("HDR video (HLG): the tracked video is standard-range")
    assert colour_note(info) in upload_message(info)
    clip = make_clip(tmp_path / "sdr.mp4", frames=2, audio=False)
    assert probe(clip).hdr is None and colour_note(probe(clip)) is None


@pytest.mark.parametrize("suffix", [".mov", ".mp4", ".mkv"])
def test_a_timecode_is_kept(tmp_path, suffix):
    """A camera's or an edit's timecode track: without it the tracked clip cannot be conformed back."""
    path = tmp_path / f"camera{suffix}"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.metadata["timecode"] = "01:00:00:00"
        for index in range(3):
            frame = av.VideoFrame.from_ndarray(np.zeros((48, 64, 3), np.uint8), format="rgb24")
            frame.pts = index
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    assert probe(path).timecode == "01:00:00:00"
    output = encode_copy(path, tmp_path / "tracked.mp4")
    with av.open(str(output)) as result:
        assert [s.type for s in result.streams if s.metadata.get("timecode") == "01:00:00:00"] == ["video", "data"]
    assert probe(make_clip(tmp_path / "plain.mp4", frames=2, audio=False)).timecode is None


def test_only_avi_timestamps_are_taken_for_decoding_times(tmp_path):
    """An MP4 whose decoder may reorder keeps its presentation timestamps (found by them, and by them past
    damage); an AVI with B-frames has decoding times only, and damage there loses frames, never repeats them."""
    from tracker.video import _timeline_of

    # As a camera that writes no B-frames muxes it: a reorder delay declared, timestamps rising packet by packet.
    source = make_clip(tmp_path / "source.mp4", frames=12, audio=False, x264_params="b-bias=-100:scenecut=0")
    mp4 = tmp_path / "camera.mp4"
    with av.open(str(source)) as given, av.open(str(mp4), "w") as remuxed:
        stream = remuxed.add_stream_from_template(given.streams.video[0])
        for packet in given.demux(video=0):
            if packet.size:
                packet.dts, packet.stream = packet.pts, stream
                remuxed.mux(packet)
    with av.open(str(mp4)) as container:
        assert container.streams.video[0].codec_context.has_b_frames
    avi = make_clip(tmp_path / "clip.avi", frames=90, width=320, height=256, audio=False, bframes=3, gop=30)
    assert not _timeline_of(mp4).decoding_order and _timeline_of(avi).decoding_order
    assert [read_frame(mp4, index).time for index in (4, 9)] == [frame.time for frame in iter_frames(mp4)][4:10:5]
    whole = list(iter_frames(avi))
    damaged = tmp_path / "damaged.avi"
    data = bytearray(avi.read_bytes())
    start = int(len(data) * 0.88)
    data[start:start + 60] = np.random.default_rng(38).integers(0, 256, 60, dtype=np.uint8).tobytes()
    damaged.write_bytes(bytes(data))
    frames = list(iter_frames(damaged))
    indices = [frame.index for frame in frames]
    assert indices == sorted(set(indices)) and len(frames) <= 90
    assert all(close_to(frame.image, whole[frame.index].image, 12) for frame in frames[:60])


def test_a_file_cut_inside_an_audio_packet_is_written_without_it(tmp_path):
    """A truncated file's last audio packet is partly there: copied as it is, every player's decoder failed on
    it in the written video."""
    whole = make_clip(tmp_path / "whole.mp4", frames=30, width=160, height=96, faststart=True)
    with av.open(str(whole)) as container:
        packets = [(packet.pos, packet.size) for packet in container.demux(container.streams.audio[0]) if packet.size]
    position, size = packets[len(packets) // 2]
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(whole.read_bytes()[:position + size // 2])
    with av.open(str(cut)) as container:
        assert [packet.is_corrupt for packet in container.demux(container.streams.audio[0]) if packet.size][-1]
    written = encode_copy(cut, tmp_path / "written.mp4")
    with av.open(str(written)) as container:
        audio = container.streams.audio[0]
        decoded = [frame for packet in container.demux(audio) for frame in packet.decode()]  # raises on damage
        assert len(decoded) >= len(packets) // 2 - 2


def test_folders_made_for_outputs_go_when_nothing_lands_there(clip, tmp_path):
    """A failed or cancelled run leaves no empty folders it made for its files (nor removes one that was there),
    and a finished file keeps its folder."""
    info = probe(clip)
    existing = tmp_path / "existing"
    existing.mkdir()
    for folder in (tmp_path / "new" / "deeper", existing):
        video, masks = VideoWriter(folder / "out.mp4", info), MaskZipWriter(folder / "out.zip")
        video.abort()
        assert folder.is_dir()  # the zip's temporary is still there
        masks.abort()
    assert not (tmp_path / "new").exists() and existing.is_dir() and not list(existing.iterdir())
    with MaskZipWriter(tmp_path / "kept" / "out.zip") as masks:
        masks.write(0, np.zeros((4, 4), np.uint8))
    VideoWriter(tmp_path / "kept" / "more" / "out.mp4", info).abort()
    assert sorted(p.name for p in (tmp_path / "kept").iterdir()) == ["out.zip"]


def _upright(width=64, height=48):
    """A picture whose red corner shows where its top left is."""
    image = np.zeros((height, width, 3), np.uint8)
    image[..., 1] = 60
    image[: height // 3, : width // 3] = (240, 20, 20)  # a red corner at the top left
    return image


def _write_mirrored(path, stored, hflip, vflip=False):
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = stored.shape[1], stored.shape[0], "yuv420p"
        stream.set_display_rotation(0, hflip=hflip, vflip=vflip)
        for index in range(3):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(stored), format="rgb24")
            frame.pts, frame.time_base = index, Fraction(1, 25)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


@pytest.mark.parametrize("flip", ["h", "v"])
@pytest.mark.parametrize("yuv", [False, True])
def test_mirrored_display_matrix_comes_out_upright(tmp_path, flip, yuv):
    """A display matrix that mirrors the picture (a selfie recording, a file flipped with FFmpeg's -display_hflip)
    is applied as FFmpeg's autorotate applies it: upright, not turned upside down."""
    upright = _upright()
    stored = upright[:, ::-1] if flip == "h" else upright[::-1]
    clip = tmp_path / "mirrored.mp4"
    _write_mirrored(clip, stored, hflip=flip == "h", vflip=flip == "v")
    info = probe(clip)
    assert (info.width, info.height) == (64, 48)
    frames = list(iter_frames(clip, yuv=yuv))
    assert len(frames) == 3
    for frame in frames:
        image = frame.image if frame.image is not None else yuv420_to_rgb(frame.yuv).numpy()
        assert np.abs(image.astype(int) - upright).mean() < 4, "the mirrored picture is not upright"


@pytest.mark.parametrize("yuv", [False, True])
def test_frames_read_are_freed_at_once_not_by_the_cycle_collector(tmp_path, yuv):
    """Reading a frame's side data (its display matrix) ties the frame into a reference cycle: done for every
    frame, the frames waited for Python's cycle collector, and a 1080p run's memory grew by GBs."""
    import gc

    clip = video.make_clip(tmp_path / "clip.mp4", 64, 48, frames=30)
    gc.collect()
    gc.disable()
    try:
        assert sum(1 for _ in iter_frames(clip, yuv=yuv)) == 30
        assert gc.collect() < 30
    finally:
        gc.enable()


def test_jpeg_with_exif_orientation_is_read_upright(tmp_path):
    """FFmpeg attaches side data PyAV cannot name to a JPEG with EXIF (reading the mirror must not fail on it)."""
    upright = _upright()
    photo = tmp_path / "photo.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned 90 degrees clockwise
    Image.fromarray(np.ascontiguousarray(np.rot90(upright, 1))).save(photo, exif=exif.tobytes(), quality=95)
    info = probe(photo)
    assert (info.width, info.height) == (64, 48)
    (frame,) = list(iter_frames(photo))
    assert np.abs(frame.image.astype(int) - upright).mean() < 4


def test_of_several_video_streams_the_largest_picture_is_tracked(tmp_path):
    """As FFmpeg's conversions choose: a file with a small preview stream before the main one (a camera's proxy,
    a screen recording's webcam track) is read from its main picture."""
    path = tmp_path / "two_pictures.mkv"
    with av.open(str(path), "w") as container:
        streams = [container.add_stream("libx264", rate=25) for _ in range(2)]
        for stream, (width, height) in zip(streams, ((64, 48), (160, 120))):
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for index in range(4):
            for stream in streams:
                image = np.full((stream.height, stream.width, 3), 40 * index, np.uint8)
                frame = av.VideoFrame.from_ndarray(image, format="rgb24")
                frame.pts, frame.time_base = index, Fraction(1, 25)
                for packet in stream.encode(frame):
                    container.mux(packet)
        for stream in streams:
            for packet in stream.encode():
                container.mux(packet)
    info = probe(path)
    assert (info.width, info.height, info.frame_count) == (160, 120, 4)
    assert [frame.image.shape for frame in iter_frames(path)] == [(120, 160, 3)] * 4


def test_a_folder_of_pictures_is_read_as_a_video_in_name_order(tmp_path):
    """A dataset's frames (DAVIS's JPEGImages/480p/<name>/00000.jpg ...): one picture a frame, in name order,
    at 25 fps, pictures of another kind beside them left out; a folder without pictures is refused by name."""
    folder = tmp_path / "bear [take 1]"  # glob's special characters in the path are taken literally
    folder.mkdir()
    pictures = [np.full((30, 40, 3), (20 * index, 255 - 20 * index, 90), np.uint8) for index in range(6)]
    for index, picture in enumerate(pictures):
        Image.fromarray(picture).save(folder / f"{index:05d}.png")
    (folder / "notes.txt").write_text("not a frame")
    Image.fromarray(pictures[0]).save(folder / "cover.jpg")
    info = probe(folder)
    assert (info.width, info.height, info.frame_count, info.fps, info.has_audio) == (40, 30, 6, 25, False)
    frames = list(iter_frames(folder))
    assert [frame.index for frame in frames] == list(range(6))
    assert all(np.array_equal(frame.image, picture) for frame, picture in zip(frames, pictures))
    assert np.array_equal(video.read_frame(folder, 4).image, pictures[4])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(VideoError, match="empty is a folder, not a video file; give the video's own path, or a "
                                         "folder of pictures, one a frame"):
        probe(empty)


def test_a_folder_of_pictures_says_what_it_leaves_out_or_takes_out_of_number_order(tmp_path, caplog):
    """Frames are the pictures of the commonest ending in name order: pictures of another ending (a camera's
    .JPG beside renamed .jpg) and unpadded numbers (1, 10, 2) are said, not silently dropped or shuffled; a
    tie between endings goes by name, not by the folder's order on disk."""
    picture = Image.fromarray(np.zeros((30, 40, 3), np.uint8))
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for index in range(5):
        picture.save(mixed / f"{index:05d}.{'JPG' if index % 2 else 'jpg'}")
    with caplog.at_level("WARNING"):
        assert probe(mixed).frame_count == 3
    assert "2 picture(s) not ending in .jpg left out of its frames (00001.JPG, 00003.JPG)" in caplog.text
    numbered = tmp_path / "numbered"
    numbered.mkdir()
    for index in (1, 2, 10):
        picture.save(numbered / f"{index}.png")
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert probe(numbered).frame_count == 3
    assert "numbered without leading zeros, and frames go in name order (1, 10, 2)" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):  # a run opens the folder again, resolved: the note is not said twice
        probe(numbered.resolve())
        probe(Path(os.path.relpath(numbered)))
    assert "numbered without leading zeros" not in caplog.text
    tie = tmp_path / "tie"
    tie.mkdir()
    for name in ("a.png", "b.png", "c.jpg", "d.jpg"):
        picture.save(tie / name)
    assert video._picture_pattern(tie).endswith("/*.jpg")
