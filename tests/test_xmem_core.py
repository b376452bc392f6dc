"""Unit tests of XMem's pieces: memory maths, memory stores, padding, and the inference loop."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from XMem.inference.inference_core import DEFAULT_CONFIG, InferenceCore
from XMem.inference.kv_memory_store import KeyValueMemoryStore
from XMem.inference.memory_manager import MemoryManager, MemoryReadWorkspace, _FixedLayout
from XMem.inference.padding import pad_to_multiple, unpad
from XMem.model.aggregate import aggregate
from XMem.model.memory_util import get_similarity, tf32_parts, topk_softmax
from XMem.model.network import XMem


def _generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---- memory maths -------------------------------------------------------------------------

def test_similarity_is_weighted_negative_squared_distance():
    g = _generator()
    mk, qk = torch.randn(2, 4, 7, generator=g), torch.randn(2, 4, 5, generator=g)
    ms, qe = 1 + torch.rand(2, 1, 7, generator=g), torch.rand(2, 4, 5, generator=g)
    diff = mk[:, :, :, None] - qk[:, :, None, :]  # B, C, N, P
    expected = -(qe[:, :, None, :] * diff ** 2).sum(1) * ms.transpose(1, 2) / math.sqrt(4)
    torch.testing.assert_close(get_similarity(mk, ms, qk, qe), expected)


def test_similarity_without_selection_drops_only_the_query_norm():
    g = _generator(1)
    mk, qk = torch.randn(1, 3, 6, generator=g), torch.randn(1, 3, 4, generator=g)
    expected = -((mk[:, :, :, None] - qk[:, :, None, :]) ** 2).sum(1) + (qk ** 2).sum(1, keepdim=True)
    torch.testing.assert_close(get_similarity(mk, None, qk, None), expected / math.sqrt(3))


def test_topk_softmax_keeps_the_k_best_and_normalises():
    similarity = torch.randn(2, 9, 6, generator=_generator(2))
    affinity = topk_softmax(similarity, top_k=3)
    torch.testing.assert_close(affinity.sum(1), torch.ones(2, 6))
    assert ((affinity > 0).sum(1) == 3).all()
    top = similarity.topk(3, dim=1)
    torch.testing.assert_close(affinity.gather(1, top.indices), torch.softmax(top.values, dim=1))


def test_topk_softmax_with_k_beyond_memory_is_a_full_softmax():
    similarity = torch.randn(1, 4, 5, generator=_generator(3))
    torch.testing.assert_close(topk_softmax(similarity, top_k=30), torch.softmax(similarity, dim=1))


def test_topk_softmax_survives_very_negative_similarities_in_float32():
    similarity = -1e5 - torch.rand(1, 8, 3, generator=_generator(4))
    affinity = topk_softmax(similarity, top_k=4)
    assert torch.isfinite(affinity).all()
    torch.testing.assert_close(affinity.sum(1), torch.ones(1, 3))


def test_aggregate_adds_a_background_and_sums_to_one():
    prob = torch.rand(2, 3, 4, 5, generator=_generator(5))
    logits, merged = aggregate(prob, dim=1, return_logits=True)
    assert merged.shape == (2, 4, 4, 5)
    torch.testing.assert_close(merged.sum(1), torch.ones(2, 4, 5))
    torch.testing.assert_close(torch.softmax(logits, dim=1), merged)
    # one object at 0.5: background is 0.5 too, and they split evenly
    torch.testing.assert_close(aggregate(torch.full((1, 1, 1), 0.5), dim=0), torch.full((2, 1, 1), 0.5))
    # hard masks stay finite and nearly hard
    hard = aggregate(torch.tensor([[[1.0, 0.0]]]), dim=0)
    assert torch.isfinite(hard).all() and hard[1, 0, 0] > 0.999 and hard[0, 0, 1] > 0.999


# ---- padding -------------------------------------------------------------------------------

@pytest.mark.parametrize("height, width, expected_pad", [
    (96, 160, (0, 0, 0, 0)), (100, 150, (5, 5, 6, 6)), (97, 161, (7, 8, 7, 8)),
])
def test_padding_round_trip(height, width, expected_pad):
    image = torch.randn(3, height, width, generator=_generator(6))
    padded, pad = pad_to_multiple(image, 16)
    assert pad == expected_pad
    assert padded.shape[-2] % 16 == 0 and padded.shape[-1] % 16 == 0
    assert torch.equal(unpad(padded, pad), image)


# ---- key/value store -----------------------------------------------------------------------

def _numbered(start: int, count: int, channels: int = 1) -> torch.Tensor:
    """Elements whose value is their own index, so removals can be read off."""
    return torch.arange(start, start + count, dtype=torch.float64).expand(1, channels, count).clone()


def test_store_groups_objects_by_first_frame():
    store = KeyValueMemoryStore(count_usage=True)
    store.add_frame(_numbered(0, 2), torch.ones(1, 1, 2), None, torch.zeros(1, 5, 2), [1])
    store.add_frame(_numbered(2, 2), torch.ones(1, 1, 2), None, torch.zeros(2, 5, 2), [1, 2])
    assert store.size == 4 and [store.value_size(g) for g in range(2)] == [4, 2]
    with pytest.raises(ValueError):
        store.add_frame(_numbered(4, 2), torch.ones(1, 1, 2), None, torch.zeros(2, 5, 2), [1, 3])
    with pytest.raises(RuntimeError):
        KeyValueMemoryStore(count_usage=False).usage()


def test_store_remove_range_keeps_each_groups_first_and_newest_values():
    store = KeyValueMemoryStore(count_usage=True)
    store.add_frame(_numbered(0, 4), torch.ones(1, 1, 4), None, _numbered(0, 4), [1])
    store.add_frame(_numbered(4, 6), torch.ones(1, 1, 6), None, _numbered(4, 6).expand(2, 1, 6), [1, 2])
    store.values.append(_numbered(8, 2))  # a group too young to be touched
    store.remove_range(2, 8, min_value_size=4)
    assert store.key.flatten().tolist() == [0, 1, 8, 9]
    assert store.values[0].flatten().tolist() == [0, 1, 8, 9]
    assert store.values[1][0].flatten().tolist() == [4, 5, 8, 9]
    assert store.values[2].flatten().tolist() == [8, 9]
    assert store.use_count.shape[-1] == store.life_count.shape[-1] == 4


def test_store_prune_drops_least_used_and_all_ties():
    store = KeyValueMemoryStore(count_usage=True)
    store.add_prototypes(_numbered(0, 5), torch.ones(1, 1, 5), [_numbered(0, 5), _numbered(3, 2)])
    store.update_usage(torch.tensor([0.5, 0.0, 0.0, 0.2, 0.9], dtype=torch.float64))
    store.prune(max_size=4)  # one too many, but two share the lowest usage
    assert store.key.flatten().tolist() == [0, 3, 4]
    assert store.values[0].flatten().tolist() == [0, 3, 4]
    assert store.values[1].flatten().tolist() == [3, 4]
    store.prune(max_size=3)  # nothing in excess
    assert store.size == 3


# ---- memory manager -------------------------------------------------------------------------

def _tiny_memory_config(**overrides) -> dict:
    return {**DEFAULT_CONFIG, "hidden_dim": 4, "top_k": 3, "min_mid_term_frames": 2, "max_mid_term_frames": 4,
            "num_prototypes": 4, "max_long_term_elements": 10, **overrides}


def test_memory_manager_consolidates_and_prunes_within_limits():
    config = _tiny_memory_config()
    memory = MemoryManager(config)
    g = _generator(7)
    frame_elements = 2 * 3
    long_sizes = []
    for frame in range(24):
        key = torch.randn(1, 4, 2, 3, generator=g, dtype=torch.float64)
        selection = torch.rand(1, 4, 2, 3, generator=g, dtype=torch.float64)
        if memory.work_mem.engaged:
            readout = memory.match_memory(key, selection)
            assert readout.shape == (2, 5, 2, 3) and torch.isfinite(readout).all()
        value = torch.randn(1, 2, 5, 2, 3, generator=g, dtype=torch.float64)
        memory.add_memory(key, 1 + torch.rand(1, 1, 2, 3, generator=g, dtype=torch.float64), value, [1, 2],
                          selection=selection)
        assert memory.work_mem.size < config["max_mid_term_frames"] * frame_elements
        assert memory.long_mem.size <= config["max_long_term_elements"]
        long_sizes.append(memory.long_mem.size)
    assert long_sizes[2] == 0 and long_sizes[3] == config["num_prototypes"]
    assert max(long_sizes) == config["max_long_term_elements"]
    assert memory.long_mem.use_count.dtype == torch.float32  # as the reference keeps them


def test_memory_reads_between_writes_reuse_what_only_writes_change():
    """Reads reuse the memory side (operands, values by element) until the next write, which must renew it."""
    memory = MemoryManager(_tiny_memory_config())
    g = _generator(8)
    for frame in range(14):
        objects = [1] if frame < 5 else [1, 2]  # a late object starts a second group
        for _ in range(2 if memory.work_mem.engaged else 0):
            key = torch.randn(1, 4, 2, 3, generator=g, dtype=torch.float64)
            selection = torch.rand(1, 4, 2, 3, generator=g, dtype=torch.float64)
            rebuilt = copy.deepcopy(memory)
            rebuilt._readable = None
            torch.testing.assert_close(memory.match_memory(key, selection), rebuilt.match_memory(key, selection),
                                       rtol=0, atol=0)
            for store in ("work_mem", "long_mem"):
                torch.testing.assert_close(getattr(memory, store).use_count, getattr(rebuilt, store).use_count)
        key = torch.randn(1, 4, 2, 3, generator=g, dtype=torch.float64)
        value = torch.randn(1, len(objects), 5, 2, 3, generator=g, dtype=torch.float64)
        memory.add_memory(key, 1 + torch.rand(1, 1, 2, 3, generator=g, dtype=torch.float64), value, objects,
                          selection=torch.rand(1, 4, 2, 3, generator=g, dtype=torch.float64))
    assert memory.long_mem.num_groups == 2  # the late object's frames were consolidated too


def _read_and_write(memories: list[MemoryManager], frames: int, device: str = "cpu", seed: int = 9,
                    dtype: torch.dtype = torch.float64):
    """Drive managers through the same reads and writes (objects join on frames 5 and 11); yield after each read."""
    g = _generator(seed)

    def draw(*shape, positive=False):
        x = torch.rand(*shape, generator=g, dtype=torch.float64) if positive else torch.randn(
            *shape, generator=g, dtype=torch.float64)
        return x.to(device, dtype)

    for frame in range(frames):
        objects = [1] if frame < 5 else [1, 2] if frame < 11 else [1, 2, 3]
        for _ in range(2 if memories[0].work_mem.engaged else 0):
            key, selection = draw(1, 4, 2, 3), draw(1, 4, 2, 3, positive=True)
            yield [memory.match_memory(key, selection) for memory in memories]
        key, shrinkage, selection = draw(1, 4, 2, 3), 1 + draw(1, 1, 2, 3, positive=True), draw(1, 4, 2, 3)
        value = draw(1, len(objects), 5, 2, 3)
        for memory in memories:
            memory.add_memory(key, shrinkage, value, objects, selection=selection)


def _same_usage(a: MemoryManager, b: MemoryManager, tolerance: float = 1e-12) -> None:
    a.flush_usage()
    b.flush_usage()
    for store in ("work_mem", "long_mem"):
        for counter in ("use_count", "life_count"):
            mine, theirs = getattr(getattr(a, store), counter), getattr(getattr(b, store), counter)
            assert (mine is None) == (theirs is None)
            if mine is not None:
                torch.testing.assert_close(mine, theirs, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("top_k, count_long_usage, max_long", [(3, True, 10), (8, True, 10), (3, False, 60)])
def test_reading_in_a_fixed_layout_equals_the_plain_reading(top_k, count_long_usage, max_long):
    """Padded columns (masked to -inf) and groups read through masks give the plain reading's readouts and
    usage counts, through consolidation, pruning and late objects; top_k 8 exceeds a late group's 6 keys.
    (Without usage counts long-term memory cannot be pruned, so it gets room for the whole clip.)"""
    config = _tiny_memory_config(top_k=top_k, enable_long_term_count_usage=count_long_usage,
                                 max_long_term_elements=max_long)
    plain, fixed = MemoryManager(config), MemoryManager(config, MemoryReadWorkspace(cuda_graphs=False))
    reads = 0
    for reads, (want, got) in enumerate(_read_and_write([plain, fixed], 30), 1):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        assert fixed._readable.masks is not None and fixed._readable.operand.shape[1] == max_long + 4 * 6
        if reads % 7 == 0:
            _same_usage(plain, fixed)
    assert reads == 58 and fixed.long_mem.num_groups == 3 and fixed.long_mem.size == min(max_long, 56)
    _same_usage(plain, fixed)


def test_tf32_parts_are_exact_and_split_products_read_like_fp32():
    """The high part holds only the bits a TF32 tensor core keeps, high + low is the number, and a fixed layout
    read through split products (here in fp32 on the CPU, as the tensor cores add them) reads as the plain one."""
    x = torch.randn(4096, generator=_generator(3)) * torch.logspace(-3, 3, 4096)
    x[0] = float("-inf")
    high, low = tf32_parts(x)
    assert not (high.view(torch.int32) & (2**13 - 1)).any()
    assert torch.equal(high[1:] + low[1:], x[1:]) and high[0] == float("-inf") and low[0] == 0
    assert (low[1:].abs() <= x[1:].abs() * 2**-10).all()
    config = _tiny_memory_config(top_k=3)
    plain = MemoryManager(config)
    split = MemoryManager(config, MemoryReadWorkspace(cuda_graphs=False, split_products=True))
    for want, got in _read_and_write([plain, split], 30, dtype=torch.float32):
        assert split._readable.split and split._readable.operand.shape[-1] == 3 * (2 * 4 + 1) + 1
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    _same_usage(plain, split, tolerance=1e-5)


def test_fixed_layout_columns_grow_in_quanta_up_to_the_capacity():
    layout = _FixedLayout(capacity=10000 + 10 * 1620, frame_elements=1620)
    assert [layout.columns(n) for n in (1, 1620, 2048, 2049, 26199)] == [1024, 2048, 2048, 3072, 26200]
    assert _FixedLayout(capacity=10**6, frame_elements=8160).columns(8161) == 12240  # half a frame


def test_memory_too_large_for_a_fixed_layout_is_read_as_it_is(monkeypatch):
    """Similarities at full capacity must fit the scratch limit; otherwise reading sizes them to the memory."""
    monkeypatch.setattr(_FixedLayout, "SCRATCH_LIMIT", 6 * 34 * 8 - 1)  # one byte short at the tiny config
    config = _tiny_memory_config()
    plain, fixed = MemoryManager(config), MemoryManager(config, MemoryReadWorkspace(cuda_graphs=False))
    for want, got in _read_and_write([plain, fixed], 8):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        assert fixed._readable.masks is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fixed_layout_reads_replay_cuda_graphs_and_equal_the_plain_reading():
    config = _tiny_memory_config()
    workspace = MemoryReadWorkspace()
    plain, fixed = MemoryManager(config), MemoryManager(config, workspace)
    for want, got in _read_and_write([plain, fixed], 30, device="cuda"):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    _same_usage(plain, fixed)
    graphs, captured = workspace.graphs, workspace.graphs.captured
    assert captured >= 3 and graphs.failures == 0  # one per number of groups
    # The next video's memory reads through the same graphs: nothing is captured again.
    del fixed
    plain, fixed = MemoryManager(config), MemoryManager(config, workspace)
    for want, got in _read_and_write([plain, fixed], 30, device="cuda", seed=4):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    _same_usage(plain, fixed)
    assert workspace.graphs is graphs and graphs.captured == captured


def test_the_next_videos_memory_reads_through_the_same_workspace_and_equals_the_plain_reading():
    """A workspace passes from one video's memory to the next (buffers and graphs kept, stale contents
    unread); a memory made while another holds it reads plainly; a different capacity starts afresh."""
    config = _tiny_memory_config()
    workspace = MemoryReadWorkspace(cuda_graphs=False)
    first = MemoryManager(config, workspace)
    for _ in _read_and_write([first], 30):
        pass
    layout, graphs = workspace.layout, workspace.graphs
    assert layout is not None
    bystander = MemoryManager(config, workspace)  # the first video's memory still lives
    assert bystander.workspace is None
    del first, bystander
    plain, second = MemoryManager(config), MemoryManager(config, workspace)
    for want, got in _read_and_write([plain, second], 30, seed=4):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        assert second._readable.masks is not None
    _same_usage(plain, second)
    assert workspace.layout is layout and workspace.graphs is graphs
    del second
    roomier = _tiny_memory_config(max_long_term_elements=60)
    plain, third = MemoryManager(roomier), MemoryManager(roomier, workspace)
    for want, got in _read_and_write([plain, third], 12, seed=5):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert workspace.layout is not layout and workspace.layout.capacity == 60 + 4 * 6
    assert workspace.graphs is not graphs


def test_memory_manager_without_long_term_keeps_everything():
    memory = MemoryManager(_tiny_memory_config(enable_long_term=False))
    for _ in range(6):
        memory.add_memory(torch.randn(1, 4, 2, 3), torch.ones(1, 1, 2, 3), torch.randn(1, 1, 5, 2, 3), [1])
    assert memory.work_mem.size == 36 and memory.long_mem is None and memory.work_mem.use_count is None


def test_hidden_state_grows_with_new_objects():
    memory = MemoryManager(_tiny_memory_config())
    key = torch.zeros(1, 4, 2, 3, dtype=torch.float64)
    memory.create_hidden_state(1, key)
    memory.hidden = memory.hidden + 1
    memory.create_hidden_state(3, key)
    assert memory.hidden.shape == (1, 3, 4, 2, 3) and memory.hidden.dtype == torch.float64
    assert memory.hidden[:, 0].eq(1).all() and memory.hidden[:, 1:].eq(0).all()


# ---- network and inference loop ---------------------------------------------------------------

def _randomise(net: XMem, seed: int) -> XMem:
    """Untrained weights with lively activations (He-normal convolutions, random BatchNorm statistics)."""
    g = _generator(seed)
    state = {}
    for key, value in net.state_dict().items():
        if not value.is_floating_point():
            state[key] = value
        elif value.dim() > 1:
            state[key] = torch.randn(value.shape, generator=g) * math.sqrt(2 / value[0].numel())
        elif key.endswith("running_var"):
            state[key] = 0.5 + torch.rand(value.shape, generator=g)
        elif key.endswith(("running_mean", "bias")):
            state[key] = 0.05 * torch.randn(value.shape, generator=g)
        else:
            state[key] = 0.3 + 0.4 * torch.rand(value.shape, generator=g)
    net.load_weights(state)
    return net.eval()


@pytest.fixture(scope="module")
def net32() -> XMem:
    return _randomise(XMem({}), seed=0)


def _clip(frames: int, height: int = 64, width: int = 96):
    """A drifting random texture with two square objects; returns images and the first-frame masks."""
    g = _generator(8)
    texture = torch.randn(3, height, width + frames * 2, generator=g, dtype=torch.float64)
    images = [texture[:, :, 2 * t:2 * t + width].clone() for t in range(frames)]
    masks = torch.zeros(2, height, width, dtype=torch.float64)
    masks[0, 10:30, 10:30] = 1
    masks[1, 30:50, 50:80] = 1
    for image in images:
        image[:, 10:30, 10:30] += 2
    return images, masks


def _run(net: XMem, images, masks, config: dict, device: str = "cpu"):
    processor = InferenceCore(net, dict(config))
    processor.set_all_labels([1, 2])
    out = []
    for t, image in enumerate(images):
        mask = masks.to(device) if t == 0 else None
        out.append(processor.step(image.to(device), mask, end=t == len(images) - 1))
    return out, processor


def test_encode_key_shapes_for_frames_and_clips(net32):
    net32.float()
    key, shrinkage, selection, f16, f8, f4 = net32.encode_key(torch.randn(1, 3, 64, 96))
    assert key.shape == selection.shape == (1, 64, 4, 6) and shrinkage.shape == (1, 1, 4, 6)
    assert (shrinkage >= 1).all() and ((selection > 0) & (selection < 1)).all()
    assert (f16.shape, f8.shape, f4.shape) == ((1, 1024, 4, 6), (1, 512, 8, 12), (1, 256, 16, 24))
    key, shrinkage, selection, f16, _, _ = net32.encode_key(torch.randn(1, 2, 3, 32, 32), need_sk=False)
    assert key.shape == (1, 64, 2, 2, 2) and shrinkage is None and f16.shape == (1, 2, 1024, 2, 2)


def test_inference_schedule_and_output(net32):
    images, masks = _clip(6, height=60, width=90)
    original = masks.clone()
    out, processor = _run(net32.double(), images, masks, dict(DEFAULT_CONFIG, mem_every=2))
    assert all(p.shape == (3, 60, 90) for p in out)
    torch.testing.assert_close(torch.stack(out).sum(1), torch.ones(6, 60, 90, dtype=torch.float64))
    assert torch.equal(masks, original)
    # memory frames 0, 2, 4 (frame 5 is the end): three frames of 4x6 elements
    assert processor.memory.work_mem.size == 3 * 4 * 6
    assert processor.memory.hidden.shape == (1, 2, 64, 4, 6)


def test_occlusion_shortcut_skips_memory_only_when_asked(net32):
    images, masks = _clip(6, height=60, width=90)
    config = dict(DEFAULT_CONFIG, mem_every=2)
    _, plain = _run(net32.double(), images, masks, config)
    _, shortcut = _run(net32.double(), images, masks, dict(config, min_memory_area=60 * 90 + 1))
    assert plain.memory.work_mem.size == 3 * 4 * 6
    assert shortcut.memory.work_mem.size == 4 * 6  # only the given first frame: every object is "too small"


def test_occlusion_shortcut_keeps_the_sensory_memory_going_and_ends_after_the_working_memorys_span(net32):
    """Skipped memory frames still update the hidden state (in sync mode only a deep update would have);
    after max_mid_term_frames memory periods without one, a frame is remembered however small its objects."""
    images, masks = _clip(8, height=60, width=90)
    config = dict(DEFAULT_CONFIG, mem_every=2, min_mid_term_frames=1, max_mid_term_frames=3,
                  min_memory_area=60 * 90 + 1, enable_long_term=False)
    processor = InferenceCore(net32.double(), config)
    processor.set_all_labels([1, 2])
    hidden, remembered = [], []
    for t, image in enumerate(images):
        before = processor.memory.work_mem.size if t else 0
        processor.step(image, masks if t == 0 else None)
        hidden.append(processor.memory.hidden.clone())
        remembered.append(processor.memory.work_mem.size > before)
    assert remembered == [True, False, False, False, False, False, True, False]  # frame 6: 6 frames after 0
    assert not torch.equal(hidden[1], hidden[2]) and not torch.equal(hidden[2], hidden[3])


def test_float32_and_float64_agree(net32):
    images, masks = _clip(4)
    config = dict(DEFAULT_CONFIG, mem_every=2)
    out64, _ = _run(net32.double(), images, masks, config)
    out32, _ = _run(net32.float(), [i.float() for i in images], masks.float(), config)
    assert all(p.dtype == torch.float32 for p in out32)
    assert max((a - b).abs().max().item() for a, b in zip(out32, out64)) < 1e-4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_float32_matches_cpu_float64(net32):
    images, masks = _clip(4)
    config = dict(DEFAULT_CONFIG, mem_every=2)
    out64, _ = _run(net32.double(), images, masks, config)
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        out_cuda, _ = _run(net32.float().cuda(), [i.float() for i in images], masks.float(), config, device="cuda")
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
        net32.cpu()
    assert all(p.is_cuda for p in out_cuda)
    assert max((a.cpu() - b).abs().max().item() for a, b in zip(out_cuda, out64)) < 1e-3


def test_inference_needs_a_first_mask_and_labels(net32):
    processor = InferenceCore(net32.float(), dict(DEFAULT_CONFIG))
    with pytest.raises(ValueError, match="set_all_labels"):
        processor.step(torch.zeros(3, 32, 32), torch.zeros(1, 32, 32))
    processor.set_all_labels([1])
    with pytest.raises(ValueError, match="mask"):
        processor.step(torch.zeros(3, 32, 32))


def test_an_object_added_without_its_mask_is_named_at_the_memory_frame(net32):
    """The reference fails there with an IndexError; ours stored an empty group and failed a frame later."""
    images, masks = _clip(3, height=32, width=32)
    processor = InferenceCore(net32.double(), dict(DEFAULT_CONFIG, mem_every=1))
    processor.set_all_labels([1])
    processor.step(images[0], masks[:1])
    processor.set_all_labels([1, 2])
    with pytest.raises(ValueError, match="need their mask on the frame that adds them"):
        processor.step(images[1])
