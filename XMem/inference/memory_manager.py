"""XMem's three memories: sensory (hidden state), working and long-term.

Working memory holds every memory frame since the last consolidation. When it
reaches max_mid_term_frames, all but its first frame and the newest
min_mid_term_frames-1 frames are condensed into num_prototypes long-term
elements: the most-read candidates become prototype keys, and their values are
affinity-weighted averages over all candidates. When long-term memory would
exceed max_long_term_elements, its least-read elements are dropped first.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

from ..model.memory_util import (element_major, get_similarity, memory_operand, operand_similarity, sparse_readout,
                                 sparse_topk_softmax, sparse_usage, split_memory_operand)
from .graph_cache import GraphCache
from .kv_memory_store import KeyValueMemoryStore


@dataclass
class _ReadableMemory:
    """What reading memory needs that only a write changes (the similarity's memory operand, values by element)."""

    operand: torch.Tensor  # (1, C, D): N keys, long-term first (a fixed layout: then unused columns up to C)
    with_selection: bool
    long_size: int
    size: int  # N
    # Per object group: its first column (it has values from there on), its values by element for those
    # columns (N_g, objects * C_v), and its number of objects. A fixed layout has rows for every column instead.
    groups: list[tuple[int, torch.Tensor, int]]
    # A fixed layout only (its operand has a bias column, -inf beyond N): per group after the first, -inf on
    # the columns before its own and 0 from there on; where the (1, P, C) similarities go; the use and life
    # counters of every column, which the reads advance.
    masks: list[torch.Tensor] | None = None
    scratch: torch.Tensor | None = None
    use: torch.Tensor | None = None
    life: torch.Tensor | None = None
    split: bool = False  # the operand is `split_memory_operand`'s (a fixed layout's only)


class _FixedLayout:
    """Buffers that hold readable memory at a fixed capacity, read through their first columns.

    With these the read's shapes change only when memory outgrows a quantum
    of columns, and the buffers never move, so a CUDA graph captured for some
    number of columns keeps reading what memory holds later. Long-term memory
    bounds the capacity: at most max_long_term_elements plus
    max_mid_term_frames frames of working memory. The similarities are
    written to a buffer of that capacity too: made inside the graphs, each
    larger one would take new memory from their pool and keep it.
    """

    # The largest similarity buffer worth keeping for a whole video (480p: 170 MB); beyond it memory is read
    # eagerly, and its similarities take only what the memory of the moment needs.
    SCRATCH_LIMIT = 512 * 2**20

    def __init__(self, capacity: int, frame_elements: int, split: bool = False):
        self.capacity = capacity
        self.frame_elements = frame_elements
        self.split = split  # hold the operand split for TF32 products (see `split_memory_operand`)
        self.quantum = max(1024, frame_elements // 2)
        self.operand: torch.Tensor | None = None  # (1, capacity, D + 1), the last column the bias
        self.values: list[torch.Tensor] = []  # per object group, (capacity, objects * C_v)
        self.masks: list[torch.Tensor] = []  # per object group after the first
        self.scratch: torch.Tensor | None = None
        self.counters: tuple[torch.Tensor, torch.Tensor] | None = None

    def columns(self, size: int) -> int:
        return min(self.capacity, -(-size // self.quantum) * self.quantum)

    def fits(self, operand: torch.Tensor, spans: list[tuple[int, torch.Tensor]], frame_elements: int) -> bool:
        """Whether memory with this operand and these group spans (first column, values) fits the buffers.

        The groups' first columns must not decrease (each reads a suffix of
        the previous group's columns), as consolidation and pruning keep them.
        """
        size, width = operand.shape[1:]
        firsts = [first_column for first_column, _ in spans]
        return (size <= self.capacity and frame_elements == self.frame_elements
                and self.frame_elements * self.capacity * operand.element_size() <= self.SCRATCH_LIMIT
                and firsts[0] == 0 and firsts == sorted(firsts)
                and (self.operand is None or self.operand.shape[-1] == width * (3 if self.split else 1) + 1
                     and self.operand.dtype == operand.dtype)
                and all(values.shape[0] * values.shape[1] == buffer.shape[1] and values.dtype == buffer.dtype
                        for (_, values), buffer in zip(spans, self.values)))

    def load(self, operand: torch.Tensor, spans: list[tuple[int, torch.Tensor]], counters: list[torch.Tensor],
             with_selection: bool, long_size: int, graphs: GraphCache) -> _ReadableMemory:
        """Copy memory into the buffers; `counters` are the use and life counts of all N elements."""
        if self.split:
            operand = split_memory_operand(operand)
        size, width = operand.shape[1:]
        columns = self.columns(size)
        if self.operand is None:
            self.operand = operand.new_zeros((1, self.capacity, width + 1))
            graphs.fix(self.operand)
        biased = self.operand
        biased[:, :size, :width] = operand
        biased[:, :size, width] = 0
        biased[:, size:, width] = float("-inf")
        for group, (first_column, values) in enumerate(spans):
            if group == len(self.values):
                self.values.append(values.new_zeros((self.capacity, values.shape[0] * values.shape[1])))
                graphs.fix(self.values[-1])
                if group:
                    self.masks.append(operand.new_zeros(self.capacity))
                    graphs.fix(self.masks[-1])
            self.values[group][first_column:size] = values.flatten(0, 1).T
            if group:
                self.masks[group - 1].zero_()[:first_column] = float("-inf")
        if self.scratch is None:
            self.scratch = operand.new_empty(self.frame_elements * self.capacity)
            self.counters = tuple(counters[0].new_zeros((1, self.capacity)) for _ in range(2))
            graphs.fix(self.scratch)
        use, life = (counter[:, :columns] for counter in self.counters)
        use[:, :size], life[:, :size] = counters
        groups = [(0, self.values[g][:columns], values.shape[0]) for g, (_, values) in enumerate(spans)]
        scratch = self.scratch[:self.frame_elements * columns].view(1, self.frame_elements, columns)
        return _ReadableMemory(biased[:, :columns], with_selection, long_size, size, groups,
                               [mask[:columns] for mask in self.masks[:len(spans) - 1]], scratch, use, life,
                               self.split)


class MemoryReadWorkspace:
    """A fixed layout and the graphs that read it, handed from one video's memory to the next.

    The graphs read the layout's buffers where they lie, so the two live and
    go together. A video whose memory fits the buffers (same working size,
    capacity and object groups) reads through the graphs the videos before
    it captured; otherwise both start afresh. One `MemoryManager` at a time
    holds it (a second one, while the first lives, reads plainly).
    """

    def __init__(self, cuda_graphs: bool = True, split_products: bool | None = None):
        self.cuda_graphs = cuda_graphs
        # Similarities as split TF32 products (`split_memory_operand`); by default where graphs capture the reads
        # of fp32 keys on CUDA, since the switch to TF32 is global (see `_tf32_products`).
        self.split_products = split_products
        self.graphs = GraphCache(enabled=cuda_graphs)
        self.layout: _FixedLayout | None = None
        self._user: weakref.ref | None = None

    def claim(self, user: object) -> bool:
        """Hold the workspace for `user` while it lives; False if another user holds it."""
        if self._user is not None and self._user() is not None:
            return False
        self._user = weakref.ref(user)
        return True

    def layout_for(self, capacity: int, frame_elements: int, operand: torch.Tensor,
                   spans: list[tuple[int, torch.Tensor]]) -> _FixedLayout | None:
        """The layout to read this memory through, or None: read it plainly."""
        layout = self.layout
        split = self.split_products if self.split_products is not None else \
            self.cuda_graphs and operand.is_cuda and operand.dtype == torch.float32
        if (layout is None or (layout.capacity, layout.frame_elements, layout.split) != (capacity, frame_elements,
                                                                                          split)
                or not layout.fits(operand, spans, frame_elements)):
            layout = _FixedLayout(capacity, frame_elements, split)
            if not layout.fits(operand, spans, frame_elements):
                return None
            self.layout, self.graphs = layout, GraphCache(enabled=self.cuda_graphs)
        return layout


class MemoryManager:
    """Reads from and writes to the memories of one video.

    With a `workspace` (and long-term memory, which bounds its size) memory is
    read in a fixed layout whose shapes change rarely, as one CUDA graph
    replay where the workspace's graphs capture them; the reads' usage counts
    reach the stores at the next write (or `flush_usage`). Results equal the
    plain reading's.
    """

    def __init__(self, config: dict, workspace: MemoryReadWorkspace | None = None):
        self.hidden_dim = config["hidden_dim"]
        self.top_k = config["top_k"]
        self.enable_long_term = config["enable_long_term"]
        self.work_mem = KeyValueMemoryStore(count_usage=self.enable_long_term)
        self.long_mem: KeyValueMemoryStore | None = None
        if self.enable_long_term:
            self.max_mt_frames = config["max_mid_term_frames"]
            self.min_mt_frames = config["min_mid_term_frames"]
            self.num_prototypes = config["num_prototypes"]
            self.max_long_elements = config["max_long_term_elements"]
            self.long_mem = KeyValueMemoryStore(count_usage=config["enable_long_term_count_usage"])
        # Sensory memory, (1, objects, hidden_dim, H/16, W/16).
        self.hidden: torch.Tensor | None = None
        self._readable: _ReadableMemory | None = None
        self.workspace = workspace if self.enable_long_term and workspace is not None and workspace.claim(self) \
            else None

    def match_memory(self, query_key: torch.Tensor, selection: torch.Tensor | None) -> torch.Tensor:
        """Read every object's memory at each query pixel: (objects, C_v, H, W).

        All keys are compared once, query-major (P, N), so each pixel's top-k
        is taken along contiguous memory; each object group then averages only
        its k best matches among the keys it has values for. The first group
        covers every key, so its weights are what the usage counters record.
        """
        height, width = query_key.shape[-2:]
        readable = self._readable
        if readable is None or readable.with_selection != (selection is not None):
            self.flush_usage()
            readable = self._readable = self._make_readable(selection is not None, height * width)
        if readable.masks is None:
            similarity = operand_similarity(readable.operand, query_key, selection, query_major=True)
            readout, usage = self._read(similarity, readable.groups)
            if usage is not None:
                self.work_mem.update_usage(usage[:, readable.long_size:])
                if readable.long_size:
                    self.long_mem.update_usage(usage[:, :readable.long_size])
        else:
            objects = tuple(group[2] for group in readable.groups)
            readout, usage = self.workspace.graphs.run(
                "read_memory", (objects, self.top_k, readable.split),
                lambda *inputs: self._read_fixed(objects, readable.split, *inputs),
                [readable.operand, query_key, selection, readable.scratch, *readable.masks,
                 *(group[1] for group in readable.groups)], transient=True)
            readable.use.add_(usage)
            readable.life.add_(1)
        return readout.view(-1, readout.shape[1], height, width)

    def _read(self, similarity: torch.Tensor, groups: list[tuple[int, torch.Tensor, int]],
              masks: list[torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(objects, C_v, P) readouts from (1, P, C) similarities, and the first group's usage of every column.

        With `masks` (a fixed layout) the first group reads every column and
        each later group the columns its mask leaves open, a suffix of the
        previous group's (it joined later), so the masks are added in turn.
        """
        readouts, usage = [], None
        for group, (first_column, per_element, objects) in enumerate(groups):
            if masks is None:
                group_similarity = similarity[..., first_column:]
            else:
                group_similarity = similarity.add_(masks[group - 1]) if group else similarity
            weights, indices = sparse_topk_softmax(group_similarity, self.top_k)
            if group == 0 and self.enable_long_term:
                usage = sparse_usage(weights, indices, group_similarity.shape[-1])
            readouts.append(sparse_readout(weights, indices, per_element, objects))
        return torch.cat(readouts, 0), usage

    def _read_fixed(self, objects: tuple[int, ...], split: bool, operand: torch.Tensor, query_key: torch.Tensor,
                    selection: torch.Tensor | None, scratch: torch.Tensor,
                    *masks_and_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`_read` in the fixed layout, its similarities written to `scratch`."""
        masks, values = masks_and_values[:len(objects) - 1], masks_and_values[len(objects) - 1:]
        similarity = operand_similarity(operand, query_key, selection, query_major=True, biased=True, out=scratch,
                                        split=split)
        return self._read(similarity, [(0, v, o) for v, o in zip(values, objects)], list(masks))

    def flush_usage(self) -> None:
        """Hand the usage counts that reads in the fixed layout gathered to the stores."""
        readable = self._readable
        if readable is None or readable.use is None:
            return
        spans = ((self.long_mem, 0, readable.long_size), (self.work_mem, readable.long_size, readable.size))
        for store, start, end in spans:
            if end > start and store.count_usage:
                store.use_count.copy_(readable.use[:, start:end].view_as(store.use_count))
                store.life_count.copy_(readable.life[:, start:end].view_as(store.life_count))

    def _make_readable(self, with_selection: bool, frame_elements: int) -> _ReadableMemory:
        """The memory side of reading, built once per memory change: all frames in between share it.

        Keys are long-term then working memory; each group reads the suffix of
        keys it has values for.
        """
        work, long = self.work_mem, self.long_mem
        if long is not None and not long.engaged:
            long = None
        if long is None:
            key, shrinkage, long_size = work.key, work.shrinkage, 0
        else:
            key, shrinkage = torch.cat([long.key, work.key], -1), torch.cat([long.shrinkage, work.shrinkage], -1)
            long_size = long.size
        spans = []
        for group in range(work.num_groups):
            first_column = long_size + work.size - work.value_size(group)
            values = work.values[group]
            if long is not None and group < long.num_groups:
                # Consolidation leaves every group it drew prototypes from as long as working memory,
                # so the group's keys are its own prototypes (the newest ones) through to the end.
                if work.value_size(group) != work.size:
                    raise RuntimeError(f"object group {group} has long-term memory but only "
                                       f"{work.value_size(group)} of {work.size} working elements")
                first_column = long_size - long.value_size(group)
                values = torch.cat([long.values[group], values], -1)
            spans.append((first_column, values))
        operand = memory_operand(key, shrinkage, with_selection)
        layout = None if self.workspace is None else self.workspace.layout_for(
            self.max_long_elements + self.max_mt_frames * frame_elements, frame_elements, operand, spans)
        if layout is not None:
            stores = [work] if long is None else [long, work]  # working memory counts usage in long-term mode
            counters = [torch.cat([getattr(s, name) if s.count_usage else work.use_count.new_zeros((1, 1, s.size))
                                   for s in stores], -1).flatten(1) for name in ("use_count", "life_count")]
            return layout.load(operand, spans, counters, with_selection, long_size, self.workspace.graphs)
        groups = [(first_column, element_major(values), values.shape[0]) for first_column, values in spans]
        return _ReadableMemory(operand, with_selection, long_size, operand.shape[1], groups)

    def add_memory(self, key: torch.Tensor, shrinkage: torch.Tensor, value: torch.Tensor,
                   objects: list[int], selection: torch.Tensor | None = None) -> None:
        """Store a memory frame; key/shrinkage/selection (1, C, H, W), value (1, objects, C_v, H, W).

        In long-term mode a full working memory is then consolidated, after
        pruning long-term memory if the new prototypes would not fit.
        """
        self.flush_usage()
        self._readable = None
        frame_elements = key.shape[-2] * key.shape[-1]
        self.work_mem.add_frame(key.flatten(start_dim=2), shrinkage.flatten(start_dim=2),
                                None if selection is None else selection.flatten(start_dim=2),
                                value[0].flatten(start_dim=2), objects)
        if self.enable_long_term and self.work_mem.size >= self.max_mt_frames * frame_elements:
            room = self.max_long_elements - self.num_prototypes
            if self.long_mem.size >= room:
                self.long_mem.prune(room)
            self._consolidate(frame_elements)

    def create_hidden_state(self, num_objects: int, sample_key: torch.Tensor) -> None:
        """Give objects that have none yet a zero hidden state, sized like `sample_key`."""
        have = 0 if self.hidden is None else self.hidden.shape[1]
        if have == num_objects:
            return
        fresh = sample_key.new_zeros((1, num_objects - have, self.hidden_dim, *sample_key.shape[-2:]))
        self.hidden = fresh if self.hidden is None else torch.cat([self.hidden, fresh], 1)

    def _consolidate(self, frame_elements: int) -> None:
        """Move the middle of working memory into long-term memory as prototypes.

        The first memory frame (for each group, its own first frame) stays in
        working memory for good, and so do the newest min_mid_term_frames-1
        frames; everything between is the candidate set.
        """
        work = self.work_mem
        min_elements = self.min_mt_frames * frame_elements
        start, end = frame_elements, work.size - min_elements + frame_elements
        num_candidates = end - start

        candidate_values = []
        for value in work.values:
            size = value.shape[-1]
            if size == work.size or size > min_elements + frame_elements:
                candidate_values.append(value[..., frame_elements:size - min_elements + frame_elements])
            else:  # the group is too young: all its frames are permanent or recent
                candidate_values.append(None)

        key, shrinkage, selection, usage = work.sliced(start, end)
        chosen = torch.topk(usage, k=min(self.num_prototypes, num_candidates), dim=-1, sorted=True).indices.flatten()
        prototype_key = key[:, :, chosen]
        prototype_selection = None if selection is None else selection[:, :, chosen]
        # Query-major (prototypes, candidates): the softmax runs along contiguous memory.
        similarity = get_similarity(key, shrinkage, prototype_key, prototype_selection, query_major=True)

        prototype_values = []
        affinities = []
        for value in candidate_values:
            affinity = None
            if value is not None:
                # A group can only average over (and be represented by) candidates it has values for.
                columns = similarity[..., -value.shape[-1]:]
                if value.shape[-1] < num_candidates:
                    columns = columns[:, chosen >= num_candidates - value.shape[-1]]
                if columns.shape[1] > 0:
                    affinity = torch.softmax(columns, dim=-1).transpose(1, 2)  # (1, candidates, prototypes)
            affinities.append(affinity)
            prototype_values.append(None if affinity is None else value @ affinity)
        prototype_shrinkage = shrinkage @ affinities[0]

        work.remove_range(start, end, min_value_size=min_elements + frame_elements)
        self.long_mem.add_prototypes(prototype_key, prototype_shrinkage, prototype_values)
