"""On CUDA, XMem's fast paths (CUDA graphs, mixed precision) agree with plain fp32 (skipped without a GPU).

Weights are the shared deterministic (untrained) ones in the official layout, the
video the shared synthetic two-object clip: agreement is a property of the maths,
so it is checked where the maths is, frame by frame.
"""
from __future__ import annotations

import importlib.util

import pytest
import torch

from tracker.pipeline import IMAGENET_MEAN, IMAGENET_STD, MemoryOptions, autocast_for
from XMem.inference.graphed_network import GraphedXMem
from XMem.inference.inference_core import InferenceCore
from XMem.model.network import XMem

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _load(shared_dir, name):
    spec = importlib.util.spec_from_file_location(name, shared_dir / "xmem_parity" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _probabilities(network, frames, first_mask, precision, late_object_at=None):
    """Per-frame probabilities; with `late_object_at`, object 2 joins on that frame (the reference's valid_labels)."""
    core = InferenceCore(network, MemoryOptions().xmem_config(network))
    probs = []
    with torch.inference_mode(), autocast_for(torch.device("cuda"), precision):
        for t, frame in enumerate(frames):
            mask = valid = None
            if t == 0:
                valid = [1] if late_object_at else [1, 2]
                core.set_all_labels(valid)
                mask = first_mask[:len(valid)]
            elif t == late_object_at:
                core.set_all_labels([1, 2])
                mask, valid = first_mask, [2]
            prob = core.step(frame, mask, valid, end=t == len(frames) - 1)
            assert torch.isfinite(prob).all(), f"non-finite probabilities at frame {t} ({precision})"
            probs.append(prob.float().cpu())
    return probs


@pytest.fixture(scope="module")
def clip(shared_dir):
    """The shared deterministic weights on the GPU, the synthetic video's frames and its first-frame masks."""
    weights = _load(shared_dir, "weights")
    video, labels = _load(shared_dir, "video").synthetic_video(frames=60)
    network = XMem({})
    network.load_weights(weights.deterministic_state_dict(seed=0, dtype=torch.float32))
    network = network.cuda().eval()
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    frames = [((torch.from_numpy(f).permute(2, 0, 1).float() / 255 - mean) / std).cuda() for f in video]
    first_mask = torch.stack([torch.from_numpy(labels == k) for k in (1, 2)]).float().cuda()
    return network, frames, first_mask


@pytest.mark.parametrize("late_object_at", [None, 10])
def test_cuda_graphs_give_the_plain_networks_probabilities(clip, late_object_at):
    network, frames, first_mask = clip
    plain = _probabilities(network, frames, first_mask, "fp32", late_object_at)
    graphed_network = GraphedXMem(network)
    graphed = _probabilities(graphed_network, frames, first_mask, "fp32", late_object_at)
    worst = max((a - b).abs().max().item() for a, b in zip(plain, graphed))
    print(f"CUDA graphs vs plain: max |dp| {worst:.2e} over {len(frames)} frames, "
          f"{graphed_network.graph_count} graphs")
    assert worst <= 1e-4
    assert graphed_network.graph_count >= 3


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("graphs", [False, True])
def test_mixed_precision_stays_finite_and_close_on_the_prompt_frame(clip, precision, graphs):
    """Affinity and softmax run in fp32, so half precision neither overflows nor drifts off the scale."""
    network, frames, first_mask = clip
    reference = _probabilities(network, frames, first_mask, "fp32")
    fast = _probabilities(GraphedXMem(network) if graphs else network, frames, first_mask, precision)
    assert len(fast) == len(reference) == 60
    assert torch.equal(reference[0].argmax(0), fast[0].argmax(0))  # the given mask passes through untouched
    agreement = [float(((a.argmax(0) == 1) & (b.argmax(0) == 1)).sum() / ((a.argmax(0) == 1) | (b.argmax(0) == 1)).sum().clamp(min=1))
                 for a, b in zip(reference, fast)]
    print(f"{precision}{' + graphs' if graphs else ''} vs fp32: worst object-1 IoU {min(agreement):.3f}, "
          f"max |dp| {max((a - b).abs().max().item() for a, b in zip(reference, fast)):.3f}")
