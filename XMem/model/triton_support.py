"""Which of XMem's Triton kernel modules run on a device; where none do, torch operations do the same work."""
from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
from types import ModuleType

import torch

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=16)
def triton_kernels(name: str, device: torch.device) -> ModuleType | None:
    """`XMem.model.<name>` where its kernels run on `device` (CUDA), else None.

    The module's `smoke_test(device)` launches a kernel once: Triton reports a
    missing compiler or an unsupported GPU only when it compiles, in many ways.
    """
    if device.type != "cuda" or importlib.util.find_spec("triton") is None:
        return None
    try:
        kernels = importlib.import_module(f"{__package__}.{name}")
        kernels.smoke_test(device)
    except Exception as exc:
        log.warning("XMem's %s do not run here (%s); torch operations do their work", name, exc)
        return None
    return kernels
