"""On CUDA, the fast mixed-precision XMem path agrees with fp32 (skipped without a GPU).

Weights are the shared deterministic (untrained) ones in the official layout, the
video the shared synthetic two-object clip: agreement is a property of the maths,
so it is checked where the maths is, frame by frame.
"""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from tracker.pipeline import IMAGENET_MEAN, IMAGENET_STD, MemoryOptions, autocast_for
from XMem.inference.inference_core import InferenceCore
from XMem.model.network import XMem

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _load(shared_dir, name):
    spec = importlib.util.spec_from_file_location(name, shared_dir / "xmem_parity" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _track(network, frames, first_mask, precision):
    core = InferenceCore(network, MemoryOptions().xmem_config(network))
    core.set_all_labels([1, 2])
    device = torch.device("cuda")
    masks = []
    with torch.inference_mode(), autocast_for(device, precision):
        for t, frame in enumerate(frames):
            prob = core.step(frame, first_mask if t == 0 else None, [1, 2] if t == 0 else None,
                             end=t == len(frames) - 1)
            assert torch.isfinite(prob).all(), f"non-finite probabilities at frame {t} ({precision})"
            masks.append(prob.float().argmax(0).cpu().numpy())
    return masks


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_stays_finite_and_close_on_the_prompt_frame(shared_dir, precision):
    """Affinity and softmax run in fp32, so half precision neither overflows nor drifts off the scale."""
    weights = _load(shared_dir, "weights")
    video, labels = _load(shared_dir, "video").synthetic_video(frames=60)
    network = XMem({})
    network.load_weights(weights.deterministic_state_dict(seed=0, dtype=torch.float32))
    network = network.cuda().eval()
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    frames = [((torch.from_numpy(f).permute(2, 0, 1).float() / 255 - mean) / std).cuda() for f in video]
    first_mask = torch.stack([torch.from_numpy(labels == k) for k in (1, 2)]).float().cuda()

    reference = _track(network, frames, first_mask, "fp32")
    fast = _track(network, frames, first_mask, precision)
    assert np.array_equal(reference[0], fast[0])  # the given mask passes through untouched
    assert len(fast) == len(reference) == 60
