"""The fast path's rewrites of XMem keep its maths (checked in float64 on the CPU; the GPU runs are in
test_xmem_autocast.py): folded batch norms, fused blocks, channels-last layout, matrix upsampling, the
sparse top-k readout."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from XMem.inference.inference_core import DEFAULT_CONFIG, InferenceCore
from XMem.model.fusion import fold_batch_norms, inference_copy
from XMem.model.group_modules import cat_channels, downsample_objects, fold_objects, prepend_to_objects
from XMem.model.memory_util import (element_major, get_similarity, sparse_readout, sparse_topk_softmax, sparse_usage,
                                     top_k_last, topk_softmax)
from XMem.model.network import FINE_MODULES, XMem
from XMem.model.resample import upsample_bilinear
from XMem.model.winograd import suits_winograd, transform_weight, use_winograd, winograd_conv3x3, winograd_matrices


def _generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def net64() -> XMem:
    """An fp64 XMem whose batch norms have non-trivial statistics (fresh ones are the identity)."""
    torch.manual_seed(0)
    net = XMem(dict(DEFAULT_CONFIG)).double().eval()
    g = _generator(1)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, nn.BatchNorm2d):
                channels = module.num_features
                module.running_mean.copy_(torch.randn(channels, generator=g, dtype=torch.float64) * 0.1)
                module.running_var.copy_(torch.rand(channels, generator=g, dtype=torch.float64) + 0.5)
                module.weight.copy_(torch.rand(channels, generator=g, dtype=torch.float64) + 0.5)
                module.bias.copy_(torch.randn(channels, generator=g, dtype=torch.float64) * 0.1)
    return net


def _track(network: XMem, steps: int = 12, dtype: torch.dtype = torch.float64) -> list[torch.Tensor]:
    g = _generator(2)
    image = torch.randn(3, 64, 100, generator=g, dtype=dtype)
    mask = torch.zeros(2, 64, 100, dtype=dtype)
    mask[0, 10:30, 10:40] = 1
    mask[1, 30:60, 50:90] = 1
    core = InferenceCore(network, dict(DEFAULT_CONFIG, mem_every=3))
    core.set_all_labels([1, 2])
    with torch.no_grad():
        probs = [core.step(image, mask)]
        probs += [core.step(image + 0.05 * t) for t in range(1, steps)]
    return probs


def test_folding_batch_norms_keeps_every_feature(net64):
    folded = inference_copy(net64)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    x = torch.randn(1, 3, 64, 96, generator=_generator(3), dtype=torch.float64)
    with torch.no_grad():
        for want, got in zip(net64.encode_key(x), folded.encode_key(x)):
            torch.testing.assert_close(got.contiguous(), want, rtol=1e-10, atol=1e-10)


def test_the_inference_copy_tracks_like_the_network_and_leaves_it_alone(net64):
    before = {name: tensor.clone() for name, tensor in net64.state_dict().items()}
    fast = inference_copy(net64)
    assert fast.key_encoder.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert type(fast.key_encoder.res2[0]).__name__ == "_FusedBottleneck"
    for want, got in zip(_track(net64), _track(fast)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
    after = net64.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert net64.key_encoder.conv1.weight.is_contiguous()  # the original keeps its layout


def test_a_copy_for_autocast_stores_its_weights_cast_and_tracks_exactly_as_autocast_would(net64):
    """Autocast casts a convolution's weights on every call; stored cast, they give the same bits."""
    net = XMem(dict(DEFAULT_CONFIG)).eval()
    net.load_state_dict({name: tensor.float() for name, tensor in net64.state_dict().items()})
    cast = inference_copy(net, torch.bfloat16)
    assert cast.key_encoder.conv1.weight.dtype == torch.bfloat16
    assert cast.key_encoder.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert cast.value_encoder.fuser.attention.ChannelGate.mlp[1].weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in net.parameters())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want, got = _track(inference_copy(net), 4, torch.float32), _track(cast, 4, torch.float32)
    for a, b in zip(want, got):
        assert torch.equal(a, b)


@pytest.mark.parametrize("shape", [(1, 5, 7, 9), (2, 16, 8, 12), (3, 130, 15, 27)])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("tile", [4, 6])
def test_winograd_convolution_is_the_3x3_convolution(shape, channels_last, tile):
    """Exact maths (float64 agrees to rounding) and fp32 within a few units of 1e-5 of the float64 result."""
    g = _generator(4)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    weight = torch.randn(11, shape[1], 3, 3, generator=g, dtype=torch.float64) / (3 * shape[1] ** 0.5)
    bias = torch.randn(11, generator=g, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    want = F.conv2d(x, weight, bias, padding=1)
    transformed = transform_weight(weight, tile)
    assert transformed.shape == ((tile + 2) ** 2, shape[1], 11)
    got = winograd_conv3x3(x, transformed, bias)
    assert got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    got32 = winograd_conv3x3(x.float(), transform_weight(weight.float(), tile), bias.float())
    assert got32.dtype == torch.float32
    assert (got32.double() - want).abs().max() <= 1e-4 * want.abs().max()
    assert winograd_conv3x3(x, transformed).sub(want - bias.view(-1, 1, 1)).abs().max() < 1e-12
    torch.testing.assert_close(winograd_conv3x3(x, transformed, bias, relu_input=True),
                               F.conv2d(F.relu(x), weight, bias, padding=1), rtol=0, atol=1e-12)


def test_winograd_matrices_are_the_published_ones():
    """F(4x4, 3x3)'s B^T, G and A^T as Lavin & Gray print them (points 0, 1, -1, 2, -2)."""
    input_t, weight_t, output_t = winograd_matrices(4)
    assert input_t.tolist() == [[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
                                [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]]
    torch.testing.assert_close(weight_t, torch.tensor(
        [[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6], [1 / 24, 1 / 12, 1 / 6],
         [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]], dtype=torch.float64), rtol=0, atol=1e-15)
    assert output_t.tolist() == [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]]


def test_winograd_runs_in_and_out_of_inference_mode_alike(monkeypatch):
    """Its kept buffers are written by every call: one made inside inference mode must serve outside it too."""
    from XMem.model import winograd

    monkeypatch.setattr(winograd, "_idle_workspaces", [])  # buffers made afresh, inside inference mode
    x = torch.randn(1, 8, 40, 44, generator=_generator(6), dtype=torch.float16).float()
    weight = torch.randn(3, 8, 3, 3, generator=_generator(7))
    transformed = transform_weight(weight)
    with torch.inference_mode():
        inside = winograd_conv3x3(x * 2, transformed)
    with torch.no_grad():
        outside = winograd_conv3x3(x * 2, transformed)
    assert torch.equal(inside, outside)


def test_winograd_takes_only_wide_stride_1_convolutions_and_cpu_inference():
    assert use_winograd(nn.Conv2d(64, 8, 3, padding=1), 128) == 0
    assert use_winograd(nn.Conv2d(128, 8, 3, stride=2, padding=1), 128) == 0
    assert use_winograd(nn.Conv2d(128, 8, 1), 128) == 0
    conv = nn.Conv2d(128, 8, 3, padding=1)
    assert use_winograd(conv, 128) == 1
    x = torch.randn(1, 128, 9, 11, generator=_generator(5))
    assert torch.equal(conv(x), F.conv2d(x, conv.weight, conv.bias, padding=1))  # autograd: the convolution's
    assert torch.equal(conv.winograd_weight, transform_weight(conv.weight))
    want_of_relu = F.conv2d(F.relu(x), conv.weight, conv.bias, padding=1)
    assert torch.equal(conv.conv_of_relu(x, conv.bias), want_of_relu)
    with torch.no_grad():
        torch.testing.assert_close(conv(x), F.conv2d(x, conv.weight, conv.bias, padding=1), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(conv.conv_of_relu(x, conv.bias), want_of_relu, rtol=1e-4, atol=1e-4)


def test_the_winograd_copy_tracks_like_the_network(net64):
    """Every wide 3x3 convolution of the inference copy as Winograd's: the same tracking, in float64."""
    fast = inference_copy(net64)
    count = use_winograd(fast, 128, FINE_MODULES)
    wide = [m for m in net64.modules() if isinstance(m, nn.Conv2d) and suits_winograd(m, 128)]
    assert count >= len(wide) > 20  # the copy also splits and joins some (see fusion.fuse_blocks)
    conv = fast.decoder.up_8_4.out_conv.conv1
    assert type(conv).__name__ == "WinogradGConv2D" and conv.winograd_weight.shape == (64, 256, 256)
    assert fast.decoder.fuser.block2.conv1.winograd_weight.shape == (36, 512, 512)  # at 1/16: F(4x4, 3x3)
    assert use_winograd(fast, 128) == 0  # once
    for want, got in zip(_track(net64), _track(fast)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-9)
    with torch.enable_grad():  # a convolution that is not inference takes the convolution's own path
        x = torch.randn(1, 256, 6, 6, dtype=torch.float64, requires_grad=True)
        fast.decoder.up_8_4.skip_conv(x).sum().backward()
    assert x.grad is not None


def test_the_cpus_fp32_copy_strays_from_float64_no_further_than_the_plain_network(net64):
    """The CPU's default fp32 network (Winograd convolutions) against plain fp32, both measured from float64.

    Untrained weights amplify any rounding frame by frame, so the first frames must agree closely and
    the whole run may stray from float64 by no more than about what plain fp32 does.
    """
    from tracker import pipeline
    from tracker.options import TrackOptions

    plain = XMem(dict(DEFAULT_CONFIG)).eval()
    plain.load_state_dict({name: tensor.float() for name, tensor in net64.state_dict().items()})
    with pipeline.stepping_network(plain, torch.device("cpu"), TrackOptions(), (64, 100)) as fast:
        fast_probs = _track(fast, 12, torch.float32)
    assert fast.decoder.fuser.block1.conv2.winograd_weight is not None
    assert fast.decoder.up_8_4.out_conv.conv1.winograd_weight.shape[0] == 64  # F(6x6, 3x3) on the finer maps
    with pipeline.stepping_network(plain, torch.device("cpu"), TrackOptions(cuda_graphs=False), (64, 100)) as same:
        assert same is plain
    plain_probs = _track(plain, 12, torch.float32)
    exact = _track(net64, 12)
    early = max((a - b).abs().max().item() for a, b in zip(plain_probs[:4], fast_probs[:4]))
    plain_error = max((a.double() - e).abs().max().item() for a, e in zip(plain_probs, exact))
    fast_error = max((a.double() - e).abs().max().item() for a, e in zip(fast_probs, exact))
    print(f"fp32 on the CPU: Winograd vs plain on frames 0-3 max |dp| {early:.1e}; from float64: "
          f"plain {plain_error:.1e}, Winograd {fast_error:.1e}")
    assert early <= 1e-4
    assert fast_error <= 2 * plain_error + 1e-4


def test_folding_needs_evaluation_mode():
    with pytest.raises(ValueError, match="evaluation mode"):
        fold_batch_norms(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).train())
    assert fold_batch_norms(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()) == 1


@pytest.mark.parametrize("shape, scale", [((2, 5, 7, 9), 2), ((1, 1, 30, 54), 4), ((3, 16, 15, 27), 2),
                                          ((1, 8, 5, 3), 4)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_matrix_upsampling_is_bilinear_interpolation(shape, scale, channels_last):
    x = torch.randn(shape, generator=_generator(4), dtype=torch.float64)
    want = F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    got = upsample_bilinear(x, scale)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    assert got.is_contiguous(memory_format=layout)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_object_downsampling_is_area_interpolation(device, dtype):
    """Pooling where the factor divides the size, area interpolation where it does not: the same averages (on the
    CPU to the bit; CUDA's kernels for few channels may add in another order)."""
    for shape, ratio in (((1, 2, 257, 120, 216), 1 / 4), ((1, 3, 256, 60, 108), 1 / 2), ((1, 1, 5, 30, 54), 1 / 4)):
        g = torch.randn(shape, generator=_generator(7)).to(device, dtype)
        for layout in (torch.contiguous_format, torch.channels_last):
            flat = g.flatten(0, 1).contiguous(memory_format=layout)
            want = F.interpolate(flat, scale_factor=ratio, mode="area")
            got = downsample_objects(flat.view(shape), ratio).flatten(0, 1)
            if device == "cpu":
                assert torch.equal(got, want), (shape, layout)
            else:
                torch.testing.assert_close(got, want, rtol=1e-6 if dtype == torch.float32 else 1e-2, atol=0)


def test_channel_concatenation_matches_torch_cat_and_keeps_channels_last():
    g = _generator(5)
    x, objects = torch.randn(2, 4, 5, 6, generator=g), torch.randn(2, 3, 7, 5, 6, generator=g)
    want = torch.cat([x.unsqueeze(1).expand(-1, 3, -1, -1, -1), objects], 2)
    assert torch.equal(prepend_to_objects(x, objects), want)
    nhwc = objects.flatten(0, 1).to(memory_format=torch.channels_last).view(2, 3, 7, 5, 6)
    got = cat_channels([x.to(memory_format=torch.channels_last).unsqueeze(1), nhwc])
    assert torch.equal(got, want)
    assert got.flatten(0, 1).is_contiguous(memory_format=torch.channels_last)
    assert cat_channels([objects, objects.double()]).dtype == torch.float64  # promoted, as torch.cat does


def test_one_objects_channels_last_features_stay_channels_last_through_pooling():
    """A view gives a batch axis of size 1 any stride; pooling took such features for channels-first and copied them."""
    image = torch.randn(1, 16, 8, 12, generator=_generator(7)).to(memory_format=torch.channels_last)
    g = image.view(1, 1, 16, 8, 12)  # one object's features, as the decoder's layers pass them on
    folded = fold_objects(g)
    assert folded.data_ptr() == image.data_ptr() and torch.equal(folded, image)
    assert folded.stride() == image.stride()
    pooled = downsample_objects(g, 1 / 4)
    assert pooled.flatten(0, 1).is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(pooled.flatten(0, 1), F.avg_pool2d(image.contiguous(), 4))
    channels_first = torch.randn(2, 3, 4, 6, 10, generator=_generator(8))
    assert fold_objects(channels_first).stride() == channels_first.flatten(0, 1).stride()


def test_sparse_top_k_readout_and_usage_equal_the_dense_affinitys():
    g = _generator(6)
    mk, qk = torch.randn(1, 8, 500, generator=g, dtype=torch.float64), torch.randn(1, 8, 60, generator=g,
                                                                                    dtype=torch.float64)
    ms, qe = 1 + torch.rand(1, 1, 500, generator=g, dtype=torch.float64), torch.rand(1, 8, 60, generator=g,
                                                                                    dtype=torch.float64)
    values = torch.randn(3, 16, 500, generator=g, dtype=torch.float64)
    similarity = get_similarity(mk, ms, qk, qe)
    torch.testing.assert_close(get_similarity(mk, ms, qk, qe, query_major=True), similarity.transpose(1, 2))
    affinity = topk_softmax(similarity, top_k=30)
    weights, indices = sparse_topk_softmax(similarity.transpose(1, 2), 30)
    assert weights.shape == indices.shape == (1, 60, 30)
    torch.testing.assert_close(sparse_readout(weights, indices, element_major(values), 3), values @ affinity)
    torch.testing.assert_close(sparse_usage(weights, indices, 500), affinity.sum(2))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))])
def test_top_k_by_group_maxima_finds_what_torch_topk_finds(device):
    """Rows long enough for the group search: the same values at the same columns, whether the largest
    values are spread out, packed into one group, in the last columns that fill no group, or few among -inf."""
    g = _generator(8)
    for columns in (30 * 4 * 32, 26112, 26200):
        spread = torch.randn(2, 40, columns, generator=g)
        packed = torch.full((1, 40, columns), float("-inf"))
        packed[..., 3000:3020] = torch.randn(1, 40, 20, generator=g)
        packed[..., -10:] = torch.randn(1, 40, 10, generator=g) + 5
        clustered = spread[:1].clone()
        clustered[..., 64:96] += 10
        for similarity in (spread, packed, clustered):
            similarity = similarity.to(device)
            values, indices = top_k_last(similarity, 30)
            want = torch.topk(similarity, 30, dim=-1)
            assert torch.equal(values.sort(-1).values, want.values.sort(-1).values), columns
            assert torch.equal(indices.sort(-1).values, want.indices.sort(-1).values), columns
    assert top_k_last(torch.randn(1, 3, 50, generator=g), 30)[0].shape == (1, 3, 30)
