"""Small synthetic clips for the tests, written with PyAV (no ffmpeg command needed).

A clip shows a textured background with a bright disc moving across it, so
trackers have an object to follow and every frame differs from the next.
`clip_frame` gives the exact picture a frame was made from (before lossy
compression), in display orientation, for comparisons.
"""
from __future__ import annotations

import itertools
import time
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

DISC_RADIUS_FRACTION = 0.15  # of the shorter side
DISC_COLOUR = (255, 240, 40)
AUDIO_RATE = 44100

# Frame intervals (in nominal frames) that make a clip's timing clearly variable.
VFR_INTERVALS = (1, 1, 2, 1, 3)


def disc_centre(index: int, frames: int, width: int, height: int) -> tuple[float, float]:
    """(x, y) of the disc in frame `index`: left to right along a gentle arc."""
    progress = index / max(frames - 1, 1)
    x = width * (0.25 + 0.5 * progress)
    y = height * (0.5 + 0.15 * np.sin(2 * np.pi * progress))
    return float(x), float(y)


def disc_radius(width: int, height: int) -> float:
    return DISC_RADIUS_FRACTION * min(width, height)


def clip_frame(index: int, frames: int, width: int, height: int, moving_object: bool = True) -> np.ndarray:
    """The display picture of frame `index` (HxWx3 uint8 RGB)."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    image = np.empty((height, width, 3), np.float32)
    image[..., 0] = 60 + 40 * np.sin(x / 7.0) + 20 * np.cos(y / 5.0)
    image[..., 1] = 80 + 30 * np.sin((x + y) / 9.0)
    image[..., 2] = 100 + 50 * ((x // 16 + y // 16) % 2)
    if moving_object:
        cx, cy = disc_centre(index, frames, width, height)
        inside = (x - cx) ** 2 + (y - cy) ** 2 <= disc_radius(width, height) ** 2
        image[inside] = DISC_COLOUR
    return np.clip(image, 0, 255).astype(np.uint8)


def frame_pts(frames: int, vfr: bool) -> list[int]:
    """Timestamps in units of one nominal frame interval (uneven when `vfr`)."""
    steps = [VFR_INTERVALS[i % len(VFR_INTERVALS)] if vfr else 1 for i in range(frames - 1)]
    return list(itertools.accumulate(steps, initial=0))


TRACK_LANGUAGES = ("eng", "fra", "deu")


def make_clip(path: str | Path, *, frames: int = 30, width: int = 160, height: int = 120, fps: int = 25,
              audio: bool = True, audio_codec: str | tuple[str, ...] = "aac", rotation: int = 0,
              codec: str = "libx264",
              pix_fmt: str = "yuv420p", vfr: bool = False, moving_object: bool = True, gop: int = 12,
              bframes: int = 2, faststart: bool = False, audio_seconds: float | None = None,
              audio_rate: int | None = None, video_start: float = 0.0, pixel_aspect: Fraction | None = None,
              x264_params: str | None = None) -> Path:
    """Write a clip whose display size is width x height and return its path.

    `rotation` (0/90/180/270, clockwise, as a phone records portrait video) stores
    the picture turned the other way with a display matrix that turns it back,
    so decoders that honour the matrix show `clip_frame` again. Odd sizes need a
    pixel format without chroma subsampling (e.g. yuv444p) or VP9. H.264 gets
    `bframes` B-frames and a keyframe every `gop` frames. Timestamps count in
    1/(fps*100) s; with `vfr` the frame intervals vary. `audio_codec` must fit
    the container (e.g. pcm_s16le needs .mkv or .mov); several codecs make one
    track each, tagged with the languages of `TRACK_LANGUAGES` in turn and titled after them. The audio
    lasts as long as the video unless `audio_seconds` says otherwise; it starts at 0, the picture at
    `video_start` seconds. `pixel_aspect` makes anamorphic video (its stored pixels' width over height).
    `x264_params` go to libx264 as they are (say "open-gop=1").
    """
    path = Path(path)
    options = {"g": str(gop)}
    if codec == "libx264":
        options.update(bf=str(bframes), preset="veryfast")
        if x264_params:
            options["x264-params"] = x264_params
    elif codec == "libvpx-vp9":
        options.update(deadline="realtime", **{"cpu-used": "8"})
    time_base = Fraction(1, fps * 100)
    container = av.open(str(path), "w", options={"movflags": "+faststart"} if faststart else {})
    try:
        video = container.add_stream(codec, rate=fps, options=options)
        coded_w, coded_h = (height, width) if rotation in (90, 270) else (width, height)
        video.width, video.height, video.pix_fmt = coded_w, coded_h, pix_fmt
        video.codec_context.time_base = time_base
        if pixel_aspect is not None:
            video.codec_context.sample_aspect_ratio = pixel_aspect
        if rotation:
            video.set_display_rotation(-rotation)  # PyAV takes counter-clockwise degrees
        codecs = (audio_codec,) if isinstance(audio_codec, str) else audio_codec
        sounds = [_add_sine_stream(container, name, audio_rate) for name in codecs] if audio else []
        if len(sounds) > 1:
            for sound, language in zip(sounds, TRACK_LANGUAGES):
                sound.metadata["language"] = language
                sound.metadata["title"] = f"{language} commentary"
        ticks = frame_pts(frames, vfr)
        ends = ticks[1:] + [ticks[-1] + 1]
        for index, (tick, end) in enumerate(zip(ticks, ends)):
            picture = np.rot90(clip_frame(index, frames, width, height, moving_object), k=rotation // 90)
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(picture), format="rgb24")
            frame.pts = tick * 100 + round(video_start * fps * 100)
            frame.duration, frame.time_base = (end - tick) * 100, time_base
            container.mux(video.encode(frame))
        container.mux(video.encode())
        for sound in sounds:
            _write_sine(container, sound, seconds=ends[-1] / fps if audio_seconds is None else audio_seconds)
    finally:
        container.close()
    return path


def _add_sine_stream(container: av.container.OutputContainer, codec: str = "aac",
                     rate: int | None = None) -> av.AudioStream:
    stream = container.add_stream(codec, rate=rate or (48000 if codec == "libopus" else AUDIO_RATE))  # no Opus 44.1k
    stream.layout = "mono"
    return stream


def _write_sine(container: av.container.OutputContainer, stream: av.AudioStream, seconds: float) -> None:
    rate = stream.rate
    samples = np.arange(round(seconds * rate))
    wave = (0.3 * np.sin(2 * np.pi * 440 * samples / rate)).astype(np.float32)
    for start in range(0, len(wave), 1024):
        frame = av.AudioFrame.from_ndarray(wave[None, start:start + 1024], format="flt", layout="mono")
        frame.sample_rate, frame.pts = rate, start
        container.mux(stream.encode(frame))
    container.mux(stream.encode())


def make_joined_recording(path: str | Path, sizes: tuple[tuple[int, int], ...], frames: int = 8, *,
                          restart: bool = False, audio: bool | tuple[bool, ...] = False,
                          bframes: int | tuple[int, ...] = 0) -> Path:
    """MPEG-TS segments joined byte by byte, as recorders and stream dumps do: one video stream whose size
    changes where a segment of another size starts; the disc of `clip_frame` moves on across the joins.
    With `restart` each segment's clock starts again (separate recordings joined with `cat`); `audio`
    gives each segment (or those it names, one flag each) its length of sound; `bframes` is each one's
    B-frame count (or one for all)."""
    path = Path(path)
    total = frames * len(sizes)
    with open(path, "wb") as joined:
        for number, (width, height) in enumerate(sizes):
            segment = path.with_name(f"{path.stem}.{number}.ts")
            container = av.open(str(segment), "w", format="mpegts")
            b = bframes[number] if isinstance(bframes, tuple) else bframes
            stream = container.add_stream("libx264", rate=25, options={"bf": str(b)})
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            sound = _add_sine_stream(container) if (audio[number] if isinstance(audio, tuple) else audio) else None
            for index in range(frames):
                picture = clip_frame(number * frames + index, total, width, height)
                frame = av.VideoFrame.from_ndarray(picture, format="rgb24")
                frame.pts, frame.time_base = (0 if restart else number * frames) + index, Fraction(1, 25)
                container.mux(stream.encode(frame))
            container.mux(stream.encode())
            if sound is not None:
                _write_sine(container, sound, seconds=frames / 25)
            container.close()
            joined.write(segment.read_bytes())
            segment.unlink()
    return path


def capture_from(source: str | Path, path: str | Path, packet: int) -> Path:
    """The video of an MPEG-TS `source` from its `packet`-th video packet on, timestamps as they were: a
    capture started mid-stream (mid-GOP, its first pictures refer to ones it lacks)."""
    with av.open(str(source)) as whole, av.open(str(path), "w", format="mpegts") as capture:
        stream = capture.add_stream_from_template(whole.streams.video[0])
        packets = (p for p in whole.demux(whole.streams.video[0]) if p.size)
        for kept in itertools.islice(packets, packet, None):
            kept.stream = stream
            capture.mux(kept)
    return Path(path)


def _pes_timestamp(field: bytes) -> int:
    return ((field[0] >> 1) & 7) << 30 | field[1] << 22 | (field[2] >> 1) << 15 | field[3] << 7 | field[4] >> 1


def _pes_field(marker: int, value: int) -> bytes:
    return bytes([marker << 4 | (value >> 30 & 7) << 1 | 1, value >> 22 & 0xFF, (value >> 15 & 0x7F) << 1 | 1,
                  value >> 7 & 0xFF, (value & 0x7F) << 1 | 1])


def damaged_timestamp_copy(source: str | Path, path: str | Path, packet: int, seconds: float) -> Path:
    """A copy of an MPEG-TS file whose `packet`-th video packet is stamped `seconds` off (both timestamps),
    as one damaged in transmission."""
    data = bytearray(Path(source).read_bytes())
    start = count = 0
    while (start := data.find(b"\x00\x00\x01\xe0", start) + 1) > 0:  # a video PES header
        flags, at = data[start + 6], start + 8
        if not flags & 0x80:  # no timestamps
            continue
        if count == packet:
            for field in ((at,) if not flags & 0x40 else (at, at + 5)):  # PTS, and DTS when present
                moved = (_pes_timestamp(data[field:field + 5]) + round(seconds * 90000)) % (1 << 33)
                data[field:field + 5] = _pes_field(data[field] >> 4, moved)
            break
        count += 1
    Path(path).write_bytes(data)
    return Path(path)


def make_audio_only(path: str | Path, seconds: float = 1.0) -> Path:
    """An MP4 (M4A) file with an AAC sine and no video stream."""
    path = Path(path)
    with av.open(str(path), "w", format="mp4") as container:
        _write_sine(container, _add_sine_stream(container), seconds)
    return path


def make_text_file(path: str | Path) -> Path:
    """Plain text under a video name, as a confused upload would be."""
    path = Path(path)
    path.write_text("this is not a video\n" * 20)
    return path


def make_empty_file(path: str | Path) -> Path:
    path = Path(path)
    path.write_bytes(b"")
    return path


def truncated_copy(source: str | Path, path: str | Path, keep: float = 0.6) -> Path:
    """The first `keep` fraction of the bytes of `source`, like an interrupted upload.

    Make the source with `faststart=True` so its index survives the cut.
    """
    path = Path(path)
    data = Path(source).read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def noisy_copy(source: str | Path, path: str | Path, at: tuple[float, ...] = (0.3, 0.6), size: int = 3000) -> Path:
    """`source` with `size` random bytes written over it at each fraction `at` of its length: damage in the
    middle of the media data (seeded, so the same frames are lost each time)."""
    data = bytearray(Path(source).read_bytes())
    noise = np.random.default_rng(1)
    for fraction in at:
        start = int(len(data) * fraction)
        data[start:start + size] = noise.integers(0, 256, size, dtype=np.uint8).tobytes()
    path = Path(path)
    path.write_bytes(bytes(data))
    return path


def top_level_atoms(path: str | Path) -> list[str]:
    """The box types at the top of an MP4 file, in file order (e.g. ['ftyp', 'moov', 'mdat'])."""
    data = Path(path).read_bytes()
    atoms, offset = [], 0
    while offset + 8 <= len(data):
        size = int.from_bytes(data[offset:offset + 4], "big")
        kind = data[offset + 4:offset + 8].decode("latin-1")
        if size == 1:  # 64-bit size follows the type
            size = int.from_bytes(data[offset + 8:offset + 16], "big")
        atoms.append(kind)
        if size < 8:
            break
        offset += size
    return atoms


def blanked_media_copy(source: str | Path, path: str | Path) -> Path:
    """A copy of an MP4 with every byte of its media data zeroed: valid index, nothing decodable."""
    data = bytearray(Path(source).read_bytes())
    offset = 0
    while offset + 8 <= len(data):
        size = int.from_bytes(data[offset:offset + 4], "big")
        if data[offset + 4:offset + 8] == b"mdat":
            data[offset + 8:offset + size] = bytes(size - 8)
        offset += max(size, 8)
    path = Path(path)
    path.write_bytes(bytes(data))
    return path


def slowed(call, seconds: float):
    """`call`, taking `seconds` longer: slow work whose time a run must count."""
    def slow(*args, **kwargs):
        time.sleep(seconds)
        return call(*args, **kwargs)

    return slow
