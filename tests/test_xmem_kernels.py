"""XMem's Triton kernels against the torch operations they replace on CUDA.

Without a GPU the kernels run in Triton's interpreter (a child process, since
the interpreter is chosen when Triton is imported), on the CPU.
"""
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def kernel_modules() -> tuple[str, ...]:
    """The Triton kernel modules the network asks for (imported here: the interpreter's child sets its path first)."""
    from XMem.model.fusion import FUSED_KERNELS
    from XMem.model.memory_util import TOP_K_KERNELS
    return FUSED_KERNELS, TOP_K_KERNELS


def differences(device: str) -> dict[str, float]:
    """Per check: the largest difference between a kernel's result and the torch operations' on `device`."""
    from XMem.model import fused_kernels
    generator = torch.Generator().manual_seed(0)

    def features(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=generator).to(device).contiguous(memory_format=torch.channels_last)

    found = {}
    for objects, shape in ((1, (1, 8, 5, 7)), (3, (1, 16, 6, 10)), (2, (2, 4, 3, 5))):
        x = features(shape[0] * objects, *shape[1:])
        bias = torch.randn(shape[1], generator=generator).to(device)
        for name, skip in (("no skip", None), ("own skip", features(*x.shape)), ("shared skip", features(*shape))):
            out = fused_kernels.bias_add(x, bias, skip)
            want = x + bias.view(-1, 1, 1)
            if name == "own skip":
                want = want + skip
            elif name == "shared skip":
                want = (want.unflatten(0, (shape[0], objects)) + skip.unsqueeze(1)).flatten(0, 1)
            assert out.is_contiguous(memory_format=torch.channels_last) and out.shape == want.shape
            found[f"bias add, {name}, {objects} objects"] = (out - want).abs().max().item()
        skip = features(shape[0], shape[1], 2 * shape[2], 2 * shape[3])
        out, relu = fused_kernels.upsample_add(skip, bias, x)
        upsampled = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        want = ((skip + bias.view(-1, 1, 1)).unsqueeze(1) + upsampled.unflatten(0, (shape[0], objects))).flatten(0, 1)
        assert out.is_contiguous(memory_format=torch.channels_last) and out.shape == want.shape
        found[f"upsample add, {objects} objects"] = (out - want).abs().max().item()
        found[f"upsample relu, {objects} objects"] = (relu - F.relu(want)).abs().max().item()
    for shape in ((1, 8, 12, 18), (2, 4, 7, 9)):
        x = features(*shape)
        pooled = fused_kernels.max_pool(x)
        want = F.max_pool2d(x, kernel_size=3, stride=2, padding=1)
        assert pooled.is_contiguous(memory_format=torch.channels_last) and pooled.shape == want.shape
        found[f"max pool {shape}"] = (pooled - want).abs().max().item()
    from XMem.model import top_k_kernel
    for columns in (4 * 5 * top_k_kernel.GROUP, 1000):
        similarity = torch.randn(1, 4, columns, generator=generator).to(device)
        similarity[0, 0] = float("-inf")
        similarity[0, 0, 300:303] = 1.0  # fewer finite values than k, and ties
        similarity[0, 1, 64:96] += 10  # the largest values packed into one group
        similarity[0, 2, -7:] += 10  # ... into the last columns, which fill no whole group
        values, indices = top_k_kernel.top_k(similarity, 5)
        want = torch.topk(similarity, 5, dim=-1)
        found[f"top k values, {columns} columns"] = float(not torch.equal(values.sort(-1).values,
                                                                          want.values.sort(-1).values))
        found[f"top k indices, {columns} columns"] = float(not torch.equal(similarity.gather(-1, indices), values))
    return found


def check(found: dict[str, float]) -> None:
    for name, difference in found.items():
        if name.startswith(("bias add", "max pool", "top k")):
            assert difference == 0, name  # the same float32 operations in the same order
        else:  # the interpolation's products and sums may round differently (fused multiply-adds in torch)
            assert difference <= 1e-6, (name, difference)


@needs_triton
def test_the_kernels_compute_what_the_torch_operations_do_in_the_triton_interpreter():
    result = subprocess.run([sys.executable, __file__], capture_output=True, text=True, timeout=600,
                            env={**os.environ, "TRITON_INTERPRET": "1"}, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert result.returncode == 0, result.stdout + result.stderr
    check(json.loads(result.stdout.splitlines()[-1]))


@needs_cuda
@needs_triton
def test_the_kernels_run_on_the_gpu_and_compute_what_the_torch_operations_do():
    from XMem.model.triton_support import triton_kernels
    for name in kernel_modules():
        assert triton_kernels(name, torch.device("cuda")) is not None, name
    check(differences("cuda"))


def test_without_a_gpu_the_sums_and_the_top_k_are_torch_operations():
    from XMem.model.triton_support import triton_kernels
    for name in kernel_modules():
        assert triton_kernels(name, torch.device("cpu")) is None, name


if __name__ == "__main__":  # the child process of the interpreter test
    sys.path.insert(0, os.getcwd())
    print(json.dumps(differences("cpu")))
