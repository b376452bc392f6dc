"""Host <-> GPU copies that neither stall the caller nor wake torch's CPU thread pool."""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch


def pinned(array: np.ndarray) -> torch.Tensor:
    """A copy of a host array in pinned (page-locked) memory, which the GPU copies from without waiting.

    The copy is numpy's, not torch's: torch's CPU copy wakes its OpenMP
    pool, whose spinning threads took the cores from libx264 and the decoder
    (the 720p codec ceiling went 87 -> 297 FPS).
    """
    host = torch.empty(array.shape, dtype=torch.from_numpy(array[:0]).dtype, pin_memory=True)
    np.copyto(host.numpy(), array)
    return host


def upload(array: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host array (or a `pinned` copy of one) on `device`; on CUDA copied without waiting."""
    if isinstance(array, torch.Tensor):
        return array.to(device, non_blocking=True)
    if device.type != "cuda":
        return torch.from_numpy(np.ascontiguousarray(array))
    return pinned(array).to(device, non_blocking=True)


class Download:
    """A tensor on its way to host memory: the copy is queued now, `result()` waits for it.

    On CUDA the copy goes into pinned memory behind the work already queued,
    so the caller never waits for the GPU until it asks for the result (a
    writer thread, or after every copy of a step is queued); `finish` turns
    the host array into what the caller takes.
    """

    def __init__(self, tensor: torch.Tensor, finish: Callable[[np.ndarray], object] = lambda array: array):
        self._finish = finish
        self._event = None
        if tensor.device.type == "cuda":
            self._host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            self._host.copy_(tensor, non_blocking=True)
            self._event = torch.cuda.Event(blocking=True)  # `result` sleeps rather than spins a core
            self._event.record()
        else:
            self._host = tensor

    def result(self):
        if self._event is not None:
            self._event.synchronize()
        return self._finish(self._host.numpy())
