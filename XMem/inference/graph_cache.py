"""CUDA graphs for fixed-shape calls: captured on first use, replayed after (one launch instead of hundreds).

Shared by XMem's network and memory reads, SAM, and the per-frame work around
them. Results equal eager execution's up to the rounding of the kernels
cuDNN picks.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

import torch

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
    shapes and dtypes, the autocast and TF32 settings) is captured once; the graphs share
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
        # The kernels a capture records depend on the autocast state and on whether TF32 may round fp32.
        arithmetic = (torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"),
                      torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
        key = (name, flags, arithmetic, _signature(inputs))
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
