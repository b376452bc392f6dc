"""XMem's fixed-shape stages as CUDA graphs: one replay instead of hundreds of kernel launches.

At video resolution a step's convolutions take far less GPU time than
launching them one by one from Python. The key encoder, the value encoder and
the decoder see the same shapes on every frame of a video, so each distinct
call (shapes, dtypes, flags, autocast state) is captured once and replayed
afterwards (the memory readout too, through fixed-capacity buffers: see
`MemoryManager`). Results equal the plain network's up to the rounding of the
kernels cuDNN picks.
"""
from __future__ import annotations

from typing import Any

import torch

from ..model.network import XMem
from .graph_cache import GraphCache
from .memory_manager import MemoryReadWorkspace


class GraphedXMem:
    """An XMem network on CUDA whose encode_frame, encode_value and segment replay CUDA graphs.

    A drop-in for the network in `InferenceCore`, for one video at a time.
    Graphs share one memory pool and live as long as this object, so a run of
    videos of one size captures them once; the memory reads' graphs live in
    `memory_workspace`, which each video's memory takes over. The padded
    frame and image features that encode_frame returns are its graph's own
    buffers, which segment and encode_value read in place (two copies of
    about 46 MB per frame at 480p saved); they are valid until the next frame.
    """

    def __init__(self, network: XMem):
        if not torch.cuda.is_available() or next(network.parameters()).device.type != "cuda":
            raise ValueError("CUDA graphs need the network on a CUDA device")
        self.network = network
        self._graphs = GraphCache(search_convolutions=True)
        self.memory_workspace = MemoryReadWorkspace()

    def __getattr__(self, name: str) -> Any:  # key_dim, value_dim, hidden_dim, ... of the wrapped network
        return getattr(self.network, name)

    @property
    def graph_count(self) -> int:
        return self._graphs.captured

    def encode_frame(self, image: torch.Tensor, pad: tuple[int, int, int, int], need_sk: bool = True,
                     need_ek: bool = True):
        # One graph for every frame: shrinkage and selection cost two small convolutions, and a single
        # graph keeps the features in the same buffers, where the other graphs read them. The padding is
        # in it too: done eagerly, its two kernels kept the GPU waiting at the start of each step (0.1 ms of
        # a synchronised 2.6 ms step on an H100).
        frame, key, shrinkage, selection, *features = self._graphs.run(
            "encode_frame", (pad,), lambda i: self.network.encode_frame(i, pad, need_sk=True, need_ek=True),
            [image], transient=True)
        return (frame, key.clone(), shrinkage.clone() if need_sk else None, selection.clone() if need_ek else None,
                *features)

    def encode_value(self, frame: torch.Tensor, image_feat_f16: torch.Tensor, h16: torch.Tensor,
                     masks: torch.Tensor, is_deep_update: bool = True):
        return self._graphs.run("encode_value", (is_deep_update,),
                                lambda *args: self.network.encode_value(*args, is_deep_update=is_deep_update),
                                [frame, image_feat_f16, h16, masks])

    def segment(self, multi_scale_features, memory_readout: torch.Tensor, hidden_state: torch.Tensor | None,
                selector: torch.Tensor | None = None, h_out: bool = True, strip_bg: bool = True):
        def call(f16, f8, f4, readout, hidden, chosen):
            return self.network.segment((f16, f8, f4), readout, hidden, chosen, h_out=h_out, strip_bg=strip_bg)

        return self._graphs.run("segment", (h_out, strip_bg, hidden_state is None, selector is None), call,
                                [*multi_scale_features, memory_readout, hidden_state, selector])
