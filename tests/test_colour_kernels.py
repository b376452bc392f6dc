"""The Triton pixel kernels against the torch operations they replace on CUDA.

Without a GPU the kernels run in Triton's interpreter (a child process, since
the interpreter is chosen when Triton is imported), on the CPU, where the torch
operations are the reference.
"""
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def differences(device: str) -> dict[str, tuple[int, float]]:
    """Per check: (largest difference of a byte, share of bytes that differ) between the kernels on `device`
    and the torch operations on the CPU."""
    from tracker import colour, colour_kernels, render
    generator = torch.Generator().manual_seed(0)

    def random_bytes(*shape: int) -> torch.Tensor:
        return torch.randint(0, 256, shape, generator=generator, dtype=torch.uint8).to(device)

    def compare(name: str, got: torch.Tensor, want: torch.Tensor) -> None:
        assert got.shape == want.shape and got.dtype == want.dtype, name
        diff = (got.cpu().int() - want.int()).abs()
        largest, share = found.get(name, (0, 0.0))
        found[name] = (max(largest, int(diff.max())), max(share, float((diff > 0).float().mean())))

    found: dict[str, tuple[int, float]] = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(colour, "pixel_kernels", lambda device: None)  # the torch operations
        for matrix in colour.MATRICES:
            for full_range in (False, True):
                offset, luma_span, chroma_span = colour._scales(full_range)
                planes = random_bytes(48 * 3 // 2, 70)
                for cosited, interlaced in (((False, False), False), ((True, False), False), ((True, True), False),
                                            ((True, False), True)):
                    picture = colour.YuvPicture(planes.cpu(), 70, 48, matrix, full_range, cosited=cosited,
                                                interlaced=interlaced)
                    across, down = colour._siting_weights(picture)
                    compare("yuv420 to rgb", colour_kernels.yuv420_to_rgb(
                        planes, 48, 70, colour._rgb_from_yuv_matrix(matrix), offset, luma_span, chroma_span,
                        across[0], down), colour.yuv420_to_rgb(picture))
                kr, kb = colour.MATRICES[matrix]
                for height, width in ((48, 70), (37, 51), (1, 1)):  # odd sides are padded
                    image = random_bytes(height, width, 3)
                    got = colour_kernels.rgb_to_yuv420(image, kr, kb, offset, luma_span, chroma_span)
                    compare("rgb to yuv420", got, colour.rgb_to_yuv420(image.cpu(), matrix, full_range).planes)
        labels = torch.zeros(41, 57, dtype=torch.uint8)
        labels[5:30, 8:40], labels[20:40, 30:56], labels[0:3, 0:4], labels[18, 0:57] = 1, 2, 200, 3
        labels = labels.to(device)
        image = random_bytes(41, 57, 3)
        for outline in (0, 1, 2, 5, 10):  # 10: the widest the app offers, and the kernel's
            for alpha in (0.0, 0.3, 0.5, 1.0):
                colours, weights = render._blend_tables(image.device, round(alpha * render.ALPHA_STEPS))
                compare("overlay", colour_kernels.overlay(image, labels, colours, weights, outline, render.ALPHA_SHIFT),
                        render.overlay(image.cpu(), labels.cpu(), alpha=alpha, outline=outline))
    return found


def check(found: dict[str, tuple[int, float]], exact_rgb: bool) -> None:
    assert found["overlay"] == (0, 0.0)  # integer arithmetic
    largest, share = found["yuv420 to rgb"]  # the same float32 operations in the same order
    assert (largest, share) == (0, 0.0) if exact_rgb else (largest <= 1 and share < 0.01)
    largest, share = found["rgb to yuv420"]  # torch's sums pick their own order
    assert largest <= 1 and share < 0.01


@needs_triton
def test_the_kernels_compute_what_the_torch_operations_do_in_the_triton_interpreter():
    result = subprocess.run([sys.executable, __file__], capture_output=True, text=True, timeout=600,
                            env={**os.environ, "TRITON_INTERPRET": "1"}, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert result.returncode == 0, result.stdout + result.stderr
    found = json.loads(result.stdout.splitlines()[-1])
    check({name: tuple(value) for name, value in found.items()}, exact_rgb=True)


@needs_cuda
@needs_triton
def test_the_kernels_run_on_the_gpu_and_compute_what_the_torch_operations_do():
    from tracker import colour
    assert colour.pixel_kernels(torch.device("cuda")) is not None
    check(differences("cuda"), exact_rgb=False)  # on the GPU, with its own division and rounding hardware


def test_without_a_gpu_frames_are_converted_by_torch_operations():
    from tracker import colour
    assert colour.pixel_kernels(torch.device("cpu")) is None


if __name__ == "__main__":  # the child process of the interpreter test
    sys.path.insert(0, os.getcwd())
    print(json.dumps(differences("cpu")))
