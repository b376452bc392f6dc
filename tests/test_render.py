import zipfile
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image

from tracker.errors import TrackerError, VideoError
from tracker.render import (CHROMA_GREEN, OUTLINE_SHADE, PALETTE, MaskZipReader, MaskZipWriter, cutout, overlay,
                            overlay_colours)
from tracker.video import remove_unfinished_temporaries

H, W = 40, 50


@pytest.fixture
def scene():
    """A grey ramp with object 1 (rows 5..19, cols 5..19) touching object 2 (rows 5..19, cols 20..34)."""
    image = torch.arange(H * W * 3, dtype=torch.int64).reshape(H, W, 3).remainder(200).to(torch.uint8) + 20
    labels = torch.zeros(H, W, dtype=torch.uint8)
    labels[5:20, 5:20] = 1
    labels[5:20, 20:35] = 2
    return image, labels


def test_palette_is_the_davis_palette():
    assert PALETTE.shape == (256, 3) and PALETTE.dtype == np.uint8
    assert PALETTE[:9].tolist() == [[0, 0, 0], [128, 0, 0], [0, 128, 0], [128, 128, 0], [0, 0, 128],
                                    [128, 0, 128], [0, 128, 128], [128, 128, 128], [64, 0, 0]]
    assert PALETTE[255].tolist() == [224, 224, 192]
    assert len(np.unique(PALETTE, axis=0)) == 256


def test_overlay_colours_are_distinct_and_saturated():
    colours = overlay_colours()[1:].astype(int)
    assert len(np.unique(colours, axis=0)) == 255
    assert (colours.max(axis=1) - colours.min(axis=1)).min() >= 100


def blended(image: torch.Tensor, colour: np.ndarray, alpha: float) -> np.ndarray:
    return np.round(image.numpy() * (1 - alpha) + colour * alpha)


def test_overlay_tints_objects_outlines_them_and_leaves_the_rest(scene):
    image, labels = scene
    original = image.clone()
    out = overlay(image, labels, alpha=0.5, outline=2)
    assert out.dtype == torch.uint8 and out.shape == image.shape
    assert torch.equal(image, original)
    colours = overlay_colours()
    background = labels == 0
    assert torch.equal(out[background], image[background])
    # Deep inside object 1 (3+ pixels from any other label): tinted.
    assert np.abs(out[8:17, 8:17].numpy().astype(int) - blended(image[8:17, 8:17], colours[1], 0.5)).max() <= 1
    # Its outer ring of 2 pixels, including along object 2: the darker colour, opaque.
    edge_1 = np.round(colours[1] * OUTLINE_SHADE)
    for ring in (out[5:7, 5:20], out[5:20, 5:7], out[18:20, 5:20], out[5:20, 18:20]):
        assert (ring.numpy() == edge_1).all()
    edge_2 = np.round(colours[2] * OUTLINE_SHADE)
    assert (out[5:20, 20:22].numpy() == edge_2).all()
    assert not (out[7:18, 7:18].numpy() == edge_1).all(axis=-1).any()


def test_overlay_without_outline_and_with_full_opacity(scene):
    image, labels = scene
    out = overlay(image, labels, alpha=1.0, outline=0)
    colours = overlay_colours()
    assert (out[labels == 1].numpy() == colours[1]).all()
    assert (out[labels == 2].numpy() == colours[2]).all()
    with pytest.raises(ValueError):
        overlay(image, labels, alpha=1.5)


def test_overlay_accepts_any_integer_labels(scene):
    image, labels = scene
    assert torch.equal(overlay(image, labels.long()), overlay(image, labels))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_overlay_on_cuda_matches_the_cpu(scene):
    image, labels = scene
    on_gpu = overlay(image.cuda(), labels.cuda())
    assert on_gpu.device.type == "cuda"
    assert torch.equal(on_gpu.cpu(), overlay(image, labels))


def test_cutout_on_transparency_green_and_as_a_matte(scene):
    image, labels = scene
    rgba = cutout(image, labels, [2])
    assert rgba.shape == (H, W, 4)
    assert (rgba[labels == 2][:, 3] == 255).all() and (rgba[labels != 2][:, 3] == 0).all()
    assert torch.equal(rgba[labels == 2][:, :3], image[labels == 2])
    green = cutout(image, labels, [1, 2], background="green")
    assert green.shape == (H, W, 3)
    assert torch.equal(green[labels > 0], image[labels > 0])
    assert (green[labels == 0].numpy() == CHROMA_GREEN).all()
    matte = cutout(image, labels, [2], background="matte")
    assert matte.shape == (H, W, 3) and matte.dtype == torch.uint8
    assert (matte[labels == 2] == 255).all() and (matte[labels != 2] == 0).all()
    with pytest.raises(ValueError):
        cutout(image, labels, [1], background="blue")


def label_maps(count: int) -> list[np.ndarray]:
    maps = []
    for index in range(count):
        labels = np.zeros((H, W), np.uint8)
        labels[index:index + 10, 3:13] = 1
        labels[20:30, index + 20:index + 30] = 7
        maps.append(labels)
    return maps


def test_masks_zip_holds_palettised_davis_pngs(tmp_path):
    maps = label_maps(3)
    path = tmp_path / "masks.zip"
    with MaskZipWriter(path) as writer:
        for index, labels in enumerate(maps):
            writer.write(index, labels)
            assert not path.exists()
    with zipfile.ZipFile(path) as archive:
        assert archive.namelist() == ["00000.png", "00001.png", "00002.png"]
        for name, labels in zip(archive.namelist(), maps):
            with archive.open(name) as member, Image.open(member) as picture:
                assert picture.mode == "P"
                assert np.array_equal(np.array(picture), labels)
                assert picture.getpalette()[:768] == PALETTE.flatten().tolist()
    with MaskZipReader(path) as reader:
        assert len(reader) == 3 and 2 in reader and 3 not in reader
        assert np.array_equal(reader[1], maps[1])
        with pytest.raises(TrackerError, match="no mask for frame 3"):
            reader[3]


def test_masks_zip_leaves_nothing_when_aborted(tmp_path):
    writer = MaskZipWriter(tmp_path / "aborted.zip")
    writer.write(0, label_maps(1)[0])
    writer.abort()
    with pytest.raises(RuntimeError):
        with MaskZipWriter(tmp_path / "failed.zip") as failing:
            failing.write(0, label_maps(1)[0])
            raise RuntimeError("tracking failed")
    assert list(tmp_path.iterdir()) == []


def test_an_interrupt_before_anyone_holds_a_writer_leaves_nothing(tmp_path, monkeypatch):
    """Ctrl-C can land while a writer is being made, before a clean-up owns it: the command line sweeps it."""
    finished = MaskZipWriter(tmp_path / "finished.zip")
    finished.write(0, label_maps(1)[0])
    finished.close()
    orphan = MaskZipWriter(tmp_path / "orphan.zip")  # never closed nor aborted: as if interrupted at once
    monkeypatch.setattr(zipfile, "ZipFile", mock.Mock(side_effect=KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        MaskZipWriter(tmp_path / "interrupted.zip")
    assert {p.name for p in tmp_path.iterdir()} == {"finished.zip", orphan._temp.name}
    monkeypatch.setattr("tracker.video._swept", False)  # given back to this process's writers after the test
    remove_unfinished_temporaries()
    assert [p.name for p in tmp_path.iterdir()] == ["finished.zip"]
    # A writer thread opening its file after the sweep (the process is ending) leaves nothing either.
    with pytest.raises(VideoError, match="the run is stopping: late.zip is not started"):
        MaskZipWriter(tmp_path / "late.zip")
    assert [p.name for p in tmp_path.iterdir()] == ["finished.zip"]


def test_unreadable_masks_zip_is_a_clear_error(tmp_path):
    (tmp_path / "masks.zip").write_text("not a zip")
    with pytest.raises(TrackerError, match="cannot read the masks zip"):
        MaskZipReader(tmp_path / "masks.zip")
