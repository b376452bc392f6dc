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

import logging
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

import torch

from ..model.network import XMem

log = logging.getLogger(__name__)

Tensors = Sequence[torch.Tensor | None]


class CapturedCall:
    """One captured call: static input buffers, the graph, and its static outputs.

    `fn(*inputs)` must not synchronise with the host; calling the object copies
    new inputs (same shapes) into the buffers, replays, and returns copies of
    the outputs, or with `transient` the static outputs themselves. An input
    for which `in_place` holds (the transient output of another call, or a
    tensor fixed in place) is read where it lies instead of being copied.
    """

    def __init__(self, fn: Callable[..., Any], inputs: Tensors, pool: tuple, transient: bool = False,
                 in_place: Callable[[torch.Tensor], bool] = lambda tensor: False, search_convolutions: bool = False):
        self.inputs = [None if t is None else t if in_place(t) else t.clone() for t in inputs]
        self.transient = transient
        side = _warmup_stream()
        side.wait_stream(torch.cuda.current_stream())
        # Warm-up: lazy initialisation and cuDNN's algorithm choice happen outside capture.
        with torch.cuda.stream(side):
            if search_convolutions:
                _search_convolutions(fn, self.inputs)
            for _ in range(2):
                fn(*self.inputs)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        # Thread-local: the decode and writer threads allocate pinned memory and wait for copies meanwhile.
        with torch.cuda.graph(self.graph, pool=pool, capture_error_mode="thread_local"):
            self.outputs = fn(*self.inputs)

    def __call__(self, inputs: Tensors) -> Any:
        for static, tensor in zip(self.inputs, inputs):
            if static is not None and static.data_ptr() != tensor.data_ptr():
                static.copy_(tensor)
        self.graph.replay()
        return self.outputs if self.transient else _copy(self.outputs)  # the next replay overwrites them


# GPU memory that cuDNN may use, beyond what the process holds, while it times its candidate algorithms.
SEARCH_WORKSPACE_BYTES = 1 << 30


def _search_convolutions(fn: Callable[..., Any], inputs: Tensors) -> None:
    """Run `fn` once with cuDNN timing its candidate algorithms for every convolution it has not seen.

    cuDNN's heuristics run some of XMem's fp32 (TF32) 1x1 convolutions as a
    matrix product plus a separate epilogue kernel: timed choices took the
    step from 3.63 to 3.15 ms on an H200 at 480p. Timing needs each candidate's workspace, and cuDNN sizes that
    from the free GPU memory (a 34 GB peak on an H200), so the search runs
    under a cap on this process's memory; choices are cached per shape, so
    later calls run none. A call that does not fit under the cap is left to
    the heuristics. The cap is the process's: while it lasts (the first
    warm-ups at a new working size, about a second), other threads' GPU
    allocations share it.
    """
    held = torch.cuda.memory_reserved()
    with _memory_cap(SEARCH_WORKSPACE_BYTES), _cudnn_benchmark():
        try:
            fn(*inputs)
        except torch.OutOfMemoryError as exc:
            log.info("cuDNN's algorithm search did not fit in its workspace cap; heuristics choose: %s", exc)
    if torch.cuda.memory_reserved() > held:
        torch.cuda.empty_cache()  # the workspaces it tried


@contextmanager
def _memory_cap(extra: int) -> Iterator[None]:
    """At most `extra` bytes of GPU memory beyond what the current device's caching allocator holds now."""
    device = torch.cuda.current_device()
    # Older PyTorch cannot report the fraction: 1.0 unless something else in the process set one.
    previous = getattr(torch.cuda, "get_per_process_memory_fraction", lambda device: 1.0)(device)
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(min(previous, (torch.cuda.memory_reserved(device) + extra) / total),
                                               device)
    try:
        yield
    finally:
        torch.cuda.set_per_process_memory_fraction(previous, device)


@contextmanager
def _cudnn_benchmark() -> Iterator[None]:
    previous = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = previous


_WARMUP_STREAMS: dict[int, torch.cuda.Stream] = {}


def _warmup_stream() -> torch.cuda.Stream:
    """The current device's one stream for warming graphs up.

    cuBLAS keeps a workspace (32 MiB on Hopper) for every stream it has run
    on: with a new stream per capture, each capture kept 32 MiB more (11 of
    them at the peak of a 150-frame 720p video).
    """
    device = torch.cuda.current_device()
    if device not in _WARMUP_STREAMS:
        _WARMUP_STREAMS[device] = torch.cuda.Stream()
    return _WARMUP_STREAMS[device]


def _copy(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, tuple):
        return tuple(_copy(v) for v in value)
    return value


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, tuple):
        return [t for v in value for t in _tensors(v)]
    return []


def _signature(inputs: Tensors) -> tuple:
    return tuple(None if t is None else (tuple(t.shape), t.dtype, t.device) for t in inputs)


class GraphCache:
    """Fixed-shape calls replayed from CUDA graphs, captured on first use; eager where graphs are off.

    Each distinct call (name, flags that change what `fn` does, the inputs'
    shapes and dtypes, the autocast state) is captured once; the graphs share
    one memory pool and must be replayed from one thread at a time. A call
    whose capture fails (an operation a graph cannot hold) runs eagerly from
    then on, so results stay correct. With `search_convolutions`, cuDNN times
    its algorithms for a call's convolutions as the call warms up.
    """

    def __init__(self, enabled: bool = True, search_convolutions: bool = False):
        self.enabled = enabled
        self.search_convolutions = search_convolutions
        self._pool: tuple | None = None
        self._graphs: dict[tuple, CapturedCall | None] = {}
        self._in_place: set[int] = set()  # data pointers of transient outputs and fixed tensors

    @property
    def captured(self) -> int:
        """How many calls replay a graph."""
        return sum(graph is not None for graph in self._graphs.values())

    @property
    def failures(self) -> int:
        """How many calls run eagerly because their capture failed."""
        return sum(graph is None for graph in self._graphs.values())

    def fix(self, *tensors: torch.Tensor) -> None:
        """Tensors that stay where they are for this cache's life: calls read them (or write scratch) in place.

        A call must not update a fixed tensor that it reads: warming up runs it twice before the capture.
        """
        self._in_place.update(t.data_ptr() for t in tensors)

    def run(self, name: str, flags: tuple, fn: Callable[..., Any], inputs: Tensors, transient: bool = False) -> Any:
        """`fn(*inputs)`; with `transient`, outputs that stay valid only until this call runs again.

        A transient output passed to another call of this cache is read in place, not copied.
        """
        if not self.enabled:
            return fn(*inputs)
        autocast = (torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"))
        key = (name, flags, autocast, _signature(inputs))
        if key not in self._graphs:
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            try:
                captured = CapturedCall(fn, inputs, self._pool, transient,
                                        in_place=lambda tensor: tensor.data_ptr() in self._in_place,
                                        search_convolutions=self.search_convolutions)
            except RuntimeError as exc:
                log.warning("%s runs without a CUDA graph: capturing it failed: %s", name, exc)
                captured = None
            else:
                if transient:
                    self._in_place.update(t.data_ptr() for t in _tensors(captured.outputs))
            self._graphs[key] = captured
        captured = self._graphs[key]
        return fn(*inputs) if captured is None else captured(inputs)


class GraphedXMem:
    """An XMem network on CUDA whose encode_key, encode_value and segment replay CUDA graphs.

    A drop-in for the network in `InferenceCore`. Graphs share one memory pool
    and live as long as this object: make one per video (or per run of videos
    of one size). The image features that encode_key returns are its graph's
    own buffers, which segment and encode_value read in place (two copies of
    about 46 MB per frame at 480p saved); they are valid until the next frame.
    """

    def __init__(self, network: XMem):
        if not torch.cuda.is_available() or next(network.parameters()).device.type != "cuda":
            raise ValueError("CUDA graphs need the network on a CUDA device")
        self.network = network
        self._graphs = GraphCache(search_convolutions=True)

    def __getattr__(self, name: str) -> Any:  # key_dim, value_dim, hidden_dim, ... of the wrapped network
        return getattr(self.network, name)

    @property
    def graph_count(self) -> int:
        return self._graphs.captured

    def encode_key(self, frame: torch.Tensor, need_sk: bool = True, need_ek: bool = True):
        # One graph for every frame: shrinkage and selection cost two small convolutions, and a single
        # graph keeps the features in the same buffers, where the other graphs read them.
        key, shrinkage, selection, *features = self._graphs.run(
            "encode_key", (), lambda f: self.network.encode_key(f, need_sk=True, need_ek=True), [frame],
            transient=True)
        return key.clone(), shrinkage.clone() if need_sk else None, selection.clone() if need_ek else None, *features

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
