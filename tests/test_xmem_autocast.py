"""On CUDA, XMem's fast paths (CUDA graphs, mixed precision) agree with plain fp32 (skipped without a GPU).

Weights are the shared deterministic (untrained) ones in the official layout, the
video the shared synthetic two-object clip: agreement is a property of the maths,
so it is checked where the maths is, frame by frame.
"""
from __future__ import annotations

import copy
import importlib.util

import pytest
import torch

from tracker.options import MemoryOptions, TrackOptions
from tracker.pipeline import IDLE_GRAPHS, IMAGENET_MEAN, IMAGENET_STD, autocast_for, stepping_network
from XMem.inference.graph_cache import SEARCH_WORKSPACE_BYTES
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


def _object_iou(a: torch.Tensor, b: torch.Tensor, label: int) -> float:
    mine, theirs = a.argmax(0) == label, b.argmax(0) == label
    return float((mine & theirs).sum() / (mine | theirs).sum().clamp(min=1))


@pytest.fixture
def exact_fp32():
    """Full fp32 arithmetic: no TF32 in cuDNN's convolutions (PyTorch's default has it) or in matrix products."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.fixture(scope="module")
def float64_probabilities(clip):
    """The plain network in float64 on the GPU: the yardstick both fp32 paths are measured against."""
    network, frames, first_mask = clip
    network64 = copy.deepcopy(network).double()
    frames64 = [frame.double() for frame in frames]
    return {late: _probabilities(network64, frames64, first_mask.double(), "fp32", late) for late in (None, 10)}


def _fast(network, frames, precision="fp32", graphs=True):
    """The pipeline's network for these frames (a graphed one that a finished video left idle, if any)."""
    return stepping_network(network, torch.device("cuda"), TrackOptions(precision=precision, cuda_graphs=graphs),
                            tuple(frames[0].shape[-2:]))


def _max_dp(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b))


@pytest.mark.parametrize("late_object_at", [None, 10])
def test_the_fast_fp32_network_does_the_plain_networks_maths(clip, float64_probabilities, late_object_at,
                                                            exact_fp32):
    """Folded batch norms, fused blocks, channels-last features, CUDA graphs, the sparse readout and the
    matrix upsampling change only the order of fp32 rounding.

    With untrained weights the probabilities are near ties, and any rounding grows frame by frame as the
    memory's top-k picks flip: the plain fp32 network itself strays up to ~1e-2 from float64 on this video.
    So the first frames must agree closely, and over the whole video the fast network may stray no further
    from float64 than the plain one does.
    """
    network, frames, first_mask = clip
    plain = _probabilities(network, frames, first_mask, "fp32", late_object_at)
    with _fast(network, frames) as fast_network:
        fast = _probabilities(fast_network, frames, first_mask, "fp32", late_object_at)
    exact = float64_probabilities[late_object_at]
    early = _max_dp(plain[:8], fast[:8])
    plain_error, fast_error = _max_dp(exact, plain), _max_dp(exact, fast)
    print(f"exact fp32: fast vs plain on frames 0-7 max |dp| {early:.1e}; from float64 over {len(frames)} frames: "
          f"plain {plain_error:.1e}, fast {fast_error:.1e}; {fast_network.graph_count} graphs")
    assert early <= 1e-3
    assert fast_error <= 2 * plain_error + 1e-4
    assert fast_network.graph_count >= 3


def test_tf32_moves_the_fast_network_no_further_than_the_plain_one(clip, float64_probabilities):
    """As shipped both paths let cuDNN use TF32; measured from float64 the fast one strays no further."""
    network, frames, first_mask = clip
    exact = float64_probabilities[10]
    plain_error = _max_dp(exact, _probabilities(network, frames, first_mask, "fp32", 10))
    with _fast(network, frames) as fast_network:
        fast_error = _max_dp(exact, _probabilities(fast_network, frames, first_mask, "fp32", 10))
    print(f"max |dp| from float64 with TF32 convolutions: plain {plain_error:.2e}, fast {fast_error:.2e}")
    assert fast_error <= max(3 * plain_error, 1e-3)


def test_the_next_video_replays_the_graphs_the_first_one_captured(clip):
    """A finished video leaves its graphed network (network and memory-read graphs) to the next video of its
    working size, which captures nothing and computes what the first did; another size gets a fresh one."""
    network, frames, first_mask = clip
    IDLE_GRAPHS.clear()
    with _fast(network, frames) as first_network:
        first = _probabilities(first_network, frames, first_mask, "fp32")

    def captured(graphed):
        return graphed.graph_count + graphed.memory_workspace.graphs.captured

    count = captured(first_network)
    assert first_network.graph_count >= 3 and first_network.memory_workspace.graphs.captured >= 2
    with _fast(network, frames) as second_network:
        assert second_network is first_network
        second = _probabilities(second_network, frames, first_mask, "fp32")
    assert captured(second_network) == count
    # Until memory is first consolidated (frame 50) nothing but the order of atomic additions can differ.
    assert _max_dp(first[:45], second[:45]) <= 1e-5
    assert len(IDLE_GRAPHS) == 1
    smaller = [frame[:, :128, :192].contiguous() for frame in frames[:3]]
    with _fast(network, smaller) as other:
        assert other is not first_network


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("graphs", [False, True])
def test_mixed_precision_stays_finite_and_close_on_the_prompt_frame(clip, precision, graphs):
    """Affinity and softmax run in fp32, so half precision neither overflows nor drifts off the scale."""
    network, frames, first_mask = clip
    reference = _probabilities(network, frames, first_mask, "fp32")
    with _fast(network, frames, precision, graphs) as fast_network:
        fast = _probabilities(fast_network, frames, first_mask, precision)
    assert len(fast) == len(reference) == 60
    assert torch.equal(reference[0].argmax(0), fast[0].argmax(0))  # the given mask passes through untouched
    agreement = [_object_iou(a, b, 1) for a, b in zip(reference, fast)]
    print(f"{precision}{' + graphs' if graphs else ''} vs fp32: worst object-1 IoU {min(agreement):.3f}, "
          f"max |dp| {max((a - b).abs().max().item() for a, b in zip(reference, fast)):.3f}")


def test_cudnn_times_its_algorithms_within_its_memory_cap_and_restores_the_settings(clip):
    """Timing cuDNN's candidates takes each one's workspace; uncapped, a first video peaked at 34 GB."""
    network, frames, first_mask = clip
    shape = (3, 232, 344)  # a size no other test runs, so its convolutions are searched now
    small = [frame[:, :shape[1], :shape[2]].contiguous() for frame in frames[:3]]
    fraction, benchmark = torch.cuda.get_per_process_memory_fraction(), torch.backends.cudnn.benchmark
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    held = torch.cuda.memory_reserved()
    with _fast(network, small) as fast:
        probabilities = _probabilities(fast, small, first_mask[:, :shape[1], :shape[2]].contiguous(), "fp32")
    assert len(probabilities) == 3
    # Beyond the cap: this small video's memory buffers and features (tens of MB); uncapped, several GB.
    peak = torch.cuda.max_memory_reserved()
    assert peak <= held + SEARCH_WORKSPACE_BYTES + (256 << 20), \
        f"held {held / 2**30:.2f} GiB, peak {peak / 2**30:.2f} GiB"
    assert torch.cuda.get_per_process_memory_fraction() == fraction
    assert torch.backends.cudnn.benchmark == benchmark
