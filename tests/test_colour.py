"""YUV <-> RGB on the compute device agrees with swscale, the CPU conversion it replaces on a GPU."""
from __future__ import annotations

import av
import numpy as np
import pytest
import torch

from media import make_clip
from tracker.colour import rgb_to_yuv420, split_planes, yuv420_to_rgb
from tracker.video import SWS_TO_RGB, YuvPicture, chroma_siting, iter_frames

SWSCALE_NAMES = {"bt709": "itu709", "bt601": "itu601"}
AV_COLORSPACES = {"bt709": 1, "bt601": 5}


def _picture(height: int, width: int, seed: int = 0) -> np.ndarray:
    """Blocks of random colour with grain: sharp chroma edges and fine detail."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (height // 8 + 1, width // 8 + 1, 3)).repeat(8, 0).repeat(8, 1)[:height, :width]
    return np.clip(blocks + rng.integers(-20, 21, blocks.shape), 0, 255).astype(np.uint8)


def _swscale_planes(image: np.ndarray, matrix: str, full_range: bool) -> np.ndarray:
    frame = av.VideoFrame.from_ndarray(image, format="rgb24")
    return frame.reformat(format="yuv420p", dst_colorspace=SWSCALE_NAMES[matrix],
                          dst_color_range="JPEG" if full_range else "MPEG").to_ndarray()


@pytest.mark.parametrize("matrix", ["bt709", "bt601"])
@pytest.mark.parametrize("full_range", [False, True])
@pytest.mark.parametrize("height, width", [(64, 96), (63, 95)])
def test_rgb_to_yuv420_is_swscales_conversion(matrix, full_range, height, width):
    image = _picture(height, width)
    picture = rgb_to_yuv420(torch.from_numpy(image), matrix, full_range)
    padded = np.pad(image, ((0, height % 2), (0, width % 2), (0, 0)), mode="edge")  # 4:2:0 codes even sizes
    want = _swscale_planes(padded, matrix, full_range)
    assert (picture.width, picture.height) == (width + width % 2, height + height % 2)
    assert picture.planes.dtype == torch.uint8 and tuple(picture.planes.shape) == want.shape
    difference = np.abs(picture.planes.numpy().astype(int) - want)
    assert difference.max() <= 1 and difference.mean() < 0.25


@pytest.mark.parametrize("matrix", ["bt709", "bt601"])
@pytest.mark.parametrize("full_range", [False, True])
def test_yuv420_to_rgb_is_swscales_conversion(matrix, full_range):
    planes = _swscale_planes(_picture(64, 96, seed=1), matrix, full_range)
    frame = av.VideoFrame.from_ndarray(planes, format="yuv420p")  # no chroma location: between pixel pairs
    frame.colorspace, frame.color_range = AV_COLORSPACES[matrix], 2 if full_range else 1
    want = frame.to_ndarray(format="rgb24", interpolation=SWS_TO_RGB).astype(int)
    got = yuv420_to_rgb(YuvPicture(planes, 96, 64, matrix, full_range)).numpy().astype(int)
    assert np.abs(got - want).max() <= 1 and np.abs(got - want).mean() < 0.05


@pytest.mark.parametrize("codec, params, siting, on_device", [
    ("libx264", None, (True, False), True),  # H.264's own: on the even columns, between the rows
    ("libx264", "chromaloc=1", (False, False), True),  # the stream says: between pixel pairs both ways
    ("libx264", "chromaloc=2", (True, True), True),  # top left (UHD broadcast)
    ("libvpx-vp9", None, (False, False), True),
    ("libx264", "chromaloc=4", None, False),  # bottom left: left to swscale
    ("libx264", "tff=1", (True, False), True),  # interlaced: each field's chroma rows apart, as swscale does
    ("libx264", "tff=1:chromaloc=2", (True, True), False),  # interlaced, top left: left to swscale
])
def test_planes_are_converted_where_the_stream_sites_its_chroma(tmp_path, codec, params, siting, on_device):
    """The device conversion reads the chroma siting swscale reads and interpolates as it does: a video's
    colour edges come out where the CPU path puts them, within a level (interlaced video's chroma field by
    field: converted as progressive pictures they were up to 118 levels off)."""
    clip = make_clip(tmp_path / ("clip.webm" if codec == "libvpx-vp9" else "clip.mp4"), frames=3, codec=codec,
                     x264_params=params, audio=False)
    with av.open(str(clip)) as container:
        assert chroma_siting(next(container.decode(video=0))) == siting
    for rgb, planes in zip(iter_frames(clip), iter_frames(clip, yuv=True)):
        if not on_device:
            assert planes.yuv is None and np.array_equal(planes.image, rgb.image)
            continue
        difference = np.abs(yuv420_to_rgb(planes.yuv).numpy().astype(int) - rgb.image)
        assert planes.yuv.cosited == siting and planes.yuv.interlaced == ("tff" in (params or ""))
        assert difference.max() <= 1 and difference.mean() < 0.05


def test_the_siting_of_each_joined_recording_and_of_a_tiny_video_is_read(tmp_path):
    """Recordings joined end to end (`cat a.ts b.ts`) may site chroma differently: each part (here 1.2 s) is
    converted as swscale converts it. A 16x16 video's first frame is not the probe that reads its siting."""
    parts = [make_clip(tmp_path / f"{name}.ts", frames=30, x264_params=params, audio=False)
             for name, params in (("left", None), ("centre", "chromaloc=1"))]
    joined = tmp_path / "joined.ts"
    joined.write_bytes(b"".join(part.read_bytes() for part in parts))
    tiny = make_clip(tmp_path / "tiny.mp4", frames=3, width=16, height=16, audio=False)
    for path, count in ((joined, 60), (tiny, 3)):
        pairs = list(zip(iter_frames(path), iter_frames(path, yuv=True)))
        assert len(pairs) == count
        for rgb, planes in pairs:
            assert np.abs(yuv420_to_rgb(planes.yuv).numpy().astype(int) - rgb.image).max() <= 1, (path, rgb.index)


@pytest.mark.parametrize("rotation", [90, 180, 270])
def test_yuv420_to_rgb_turns_to_display_orientation(rotation):
    planes = rgb_to_yuv420(torch.from_numpy(_picture(32, 48))).planes
    upright = yuv420_to_rgb(YuvPicture(planes, 48, 32)).numpy()
    turned = yuv420_to_rgb(YuvPicture(planes, 48, 32, rotation=rotation)).numpy()
    assert np.array_equal(turned, np.rot90(upright, k=-rotation // 90))


def test_round_trip_and_planes_layout():
    yy, xx = np.mgrid[0:48, 0:64]
    image = np.stack([xx * 4, yy * 5, 255 - xx * 2 - yy], -1).astype(np.uint8)  # smooth colour
    picture = rgb_to_yuv420(torch.from_numpy(image))
    y, u, v = split_planes(picture.planes, 48, 64)
    assert (y.shape, u.shape, v.shape) == ((48, 64), (24, 32), (24, 32))
    assert 16 <= int(y.min()) and int(y.max()) <= 235  # limited range
    back = yuv420_to_rgb(picture).numpy().astype(int)
    # Chroma at half resolution, interpolated back, costs a few levels on steep colour gradients (the picture's
    # edges), under half a level on average.
    assert np.abs(back - image).max() <= 4 and np.abs(back - image).mean() < 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_conversions_match_the_cpu():
    image = torch.from_numpy(_picture(720, 1280, seed=3))
    cpu = rgb_to_yuv420(image)
    gpu = rgb_to_yuv420(image.cuda())
    assert (gpu.planes.cpu().int() - cpu.planes.int()).abs().max() <= 1
    back_cpu = yuv420_to_rgb(cpu)
    back_gpu = yuv420_to_rgb(YuvPicture(cpu.planes.cuda(), cpu.width, cpu.height))
    assert (back_gpu.cpu().int() - back_cpu.int()).abs().max() <= 1
