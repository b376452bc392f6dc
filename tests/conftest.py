"""Fixtures shared by the test modules: untrained checkpoints, a CPU tracker, generated clips."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """../shared beside the checkout (CI has it; a user's clone may not)."""
    if not (SHARED / "xmem_parity").is_dir():
        pytest.skip("../shared/xmem_parity is not beside this checkout")
    return SHARED


@pytest.fixture(scope="session")
def untrained_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Untrained SAM ViT-B and XMem checkpoints in the official layouts (written once per session)."""
    from tracker.weights import write_untrained

    return write_untrained(tmp_path_factory.mktemp("weights"))


@pytest.fixture(scope="session")
def cpu_tracker(untrained_checkpoints):
    """A Tracker on the CPU with untrained weights: checks plumbing and maths, not segmentation quality."""
    from tracker.session import Tracker

    return Tracker(untrained_checkpoints["sam"], untrained_checkpoints["xmem"], device="cpu", download=False)
