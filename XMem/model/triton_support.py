"""Which Triton kernel modules run on a device; where one does not, torch operations do the same work."""
from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
from types import ModuleType

import torch

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=16)
def triton_kernels(module: str, device: torch.device) -> ModuleType | None:
    """The kernel module `module` (a full name) where its kernels run on `device` (CUDA), else None.

    Decided once per module and device: eager paths ask on every frame. The
    module's `smoke_test(device)` launches a kernel once: Triton reports a
    missing compiler or an unsupported GPU only when it compiles, in many ways.
    """
    if device.type != "cuda" or importlib.util.find_spec("triton") is None:
        return None
    try:
        kernels = importlib.import_module(module)
        kernels.smoke_test(device)
    except Exception as exc:
        log.warning("the Triton kernels of %s do not run here (%s); torch operations do their work", module, exc)
        return None
    return kernels
