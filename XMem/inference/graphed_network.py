"""XMem's fixed-shape stages as CUDA graphs: one replay instead of hundreds of kernel launches.

At video resolution a step's convolutions take far less GPU time than
launching them one by one from Python. The key encoder, the value encoder and
the decoder see the same shapes on every frame of a video, so each distinct
call (shapes, dtypes, flags, autocast state) is captured once and replayed
afterwards. The memory readout, whose sizes change as memory grows, stays
eager. Results equal the plain network's up to the rounding of the kernels
cuDNN picks.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from ..model.network import XMem

Tensors = Sequence[torch.Tensor | None]


class CapturedCall:
    """One captured call: static input buffers, the graph, and its static outputs.

    `fn(*inputs)` must not synchronise with the host; calling the object copies
    new inputs (same shapes) into the buffers, replays, and returns copies of
    the outputs.
    """

    def __init__(self, fn: Callable[..., Any], inputs: Tensors, pool: tuple):
        self.inputs = [None if t is None else t.clone() for t in inputs]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        # Warm-up: lazy initialisation and cuDNN's algorithm choice happen outside capture. The shapes never
        # change afterwards, so cuDNN may time its candidates (benchmark mode) once, here, for every replay.
        benchmark, torch.backends.cudnn.benchmark = torch.backends.cudnn.benchmark, True
        try:
            with torch.cuda.stream(side):
                for _ in range(2):
                    fn(*self.inputs)
        finally:
            torch.backends.cudnn.benchmark = benchmark
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.outputs = fn(*self.inputs)

    def __call__(self, inputs: Tensors) -> Any:
        for static, tensor in zip(self.inputs, inputs):
            if static is not None:
                static.copy_(tensor)
        self.graph.replay()
        return _copy(self.outputs)  # the static outputs are overwritten by the next replay


def _copy(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, tuple):
        return tuple(_copy(v) for v in value)
    return value


def _signature(inputs: Tensors) -> tuple:
    return tuple(None if t is None else (tuple(t.shape), t.dtype, t.device) for t in inputs)


class GraphedXMem:
    """An XMem network on CUDA whose encode_key, encode_value and segment replay CUDA graphs.

    A drop-in for the network in `InferenceCore`. Graphs share one memory pool
    and live as long as this object: make one per video (or per run of videos
    of one size).
    """

    def __init__(self, network: XMem):
        if not torch.cuda.is_available() or next(network.parameters()).device.type != "cuda":
            raise ValueError("CUDA graphs need the network on a CUDA device")
        self.network = network
        self._pool = torch.cuda.graph_pool_handle()
        self._graphs: dict[tuple, CapturedCall] = {}

    def __getattr__(self, name: str) -> Any:  # key_dim, value_dim, hidden_dim, ... of the wrapped network
        return getattr(self.network, name)

    def _run(self, name: str, flags: tuple, fn: Callable[..., Any], inputs: Tensors) -> Any:
        autocast = (torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"))
        key = (name, flags, autocast, _signature(inputs))
        captured = self._graphs.get(key)
        if captured is None:
            captured = self._graphs[key] = CapturedCall(fn, inputs, self._pool)
        return captured(inputs)

    @property
    def graph_count(self) -> int:
        return len(self._graphs)

    def encode_key(self, frame: torch.Tensor, need_sk: bool = True, need_ek: bool = True):
        return self._run("encode_key", (need_sk, need_ek),
                         lambda f: self.network.encode_key(f, need_sk=need_sk, need_ek=need_ek), [frame])

    def encode_value(self, frame: torch.Tensor, image_feat_f16: torch.Tensor, h16: torch.Tensor,
                     masks: torch.Tensor, is_deep_update: bool = True):
        return self._run("encode_value", (is_deep_update,),
                         lambda *args: self.network.encode_value(*args, is_deep_update=is_deep_update),
                         [frame, image_feat_f16, h16, masks])

    def segment(self, multi_scale_features, memory_readout: torch.Tensor, hidden_state: torch.Tensor | None,
                selector: torch.Tensor | None = None, h_out: bool = True, strip_bg: bool = True):
        def call(f16, f8, f4, readout, hidden, chosen):
            return self.network.segment((f16, f8, f4), readout, hidden, chosen, h_out=h_out, strip_bg=strip_bg)

        return self._run("segment", (h_out, strip_bg, hidden_state is None, selector is None), call,
                         [*multi_scale_features, memory_readout, hidden_state, selector])
