"""XMem's three memories: sensory (hidden state), working and long-term.

Working memory holds every memory frame since the last consolidation. When it
reaches max_mid_term_frames, all but its first frame and the newest
min_mid_term_frames-1 frames are condensed into num_prototypes long-term
elements: the most-read candidates become prototype keys, and their values are
affinity-weighted averages over all candidates. When long-term memory would
exceed max_long_term_elements, its least-read elements are dropped first.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..model.memory_util import (element_major, get_similarity, memory_operand, operand_similarity, sparse_readout,
                                 sparse_topk_softmax, sparse_usage)
from .kv_memory_store import KeyValueMemoryStore


@dataclass
class _ReadableMemory:
    """What reading memory needs that only a write changes (the similarity's memory operand, values by element)."""

    operand: torch.Tensor  # (1, N, D) for N keys, long-term first
    with_selection: bool
    long_size: int
    # Per object group: its first key (it has values from there on), its values by element
    # (N_g, objects * C_v), and its number of objects.
    groups: list[tuple[int, torch.Tensor, int]]


class MemoryManager:
    """Reads from and writes to the memories of one video."""

    def __init__(self, config: dict):
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
            readable = self._readable = self._make_readable(with_selection=selection is not None)
        similarity = operand_similarity(readable.operand, query_key, selection, query_major=True)

        readouts = []
        for group, (first_column, per_element, objects) in enumerate(readable.groups):
            group_similarity = similarity[..., first_column:]
            weights, indices = sparse_topk_softmax(group_similarity, self.top_k)
            if group == 0 and self.enable_long_term:
                usage = sparse_usage(weights, indices, group_similarity.shape[-1])
                self.work_mem.update_usage(usage[:, readable.long_size:])
                if readable.long_size:
                    self.long_mem.update_usage(usage[:, :readable.long_size])
            readouts.append(sparse_readout(weights, indices, per_element, objects))
        return torch.cat(readouts, 0).view(-1, readouts[0].shape[1], height, width)

    def _make_readable(self, with_selection: bool) -> _ReadableMemory:
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
        groups = []
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
            groups.append((first_column, element_major(values), values.shape[0]))
        return _ReadableMemory(memory_operand(key, shrinkage, with_selection), with_selection, long_size, groups)

    def add_memory(self, key: torch.Tensor, shrinkage: torch.Tensor, value: torch.Tensor,
                   objects: list[int], selection: torch.Tensor | None = None) -> None:
        """Store a memory frame; key/shrinkage/selection (1, C, H, W), value (1, objects, C_v, H, W).

        In long-term mode a full working memory is then consolidated, after
        pruning long-term memory if the new prototypes would not fit.
        """
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
