"""XMem's three memories: sensory (hidden state), working and long-term.

Working memory holds every memory frame since the last consolidation. When it
reaches max_mid_term_frames, all but its first frame and the newest
min_mid_term_frames-1 frames are condensed into num_prototypes long-term
elements: the most-read candidates become prototype keys, and their values are
affinity-weighted averages over all candidates. When long-term memory would
exceed max_long_term_elements, its least-read elements are dropped first.
"""
from __future__ import annotations

import torch

from ..model.memory_util import get_similarity, sparse_readout, sparse_topk_softmax, sparse_usage
from .kv_memory_store import KeyValueMemoryStore


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

    def match_memory(self, query_key: torch.Tensor, selection: torch.Tensor | None) -> torch.Tensor:
        """Read every object's memory at each query pixel: (objects, C_v, H, W).

        All keys are compared once, query-major (P, N), so each pixel's top-k
        is taken along contiguous memory; each object group then averages only
        its k best matches among the keys it has values for. The first group
        covers every key, so its weights are what the usage counters record.
        """
        height, width = query_key.shape[-2:]
        work, long = self.work_mem, self.long_mem
        if long is not None and not long.engaged:
            long = None
        long_size = 0 if long is None else long.size

        if long is None:
            similarity = get_similarity(work.key, work.shrinkage, query_key, selection, query_major=True)
        else:
            similarity = get_similarity(torch.cat([long.key, work.key], -1),
                                        torch.cat([long.shrinkage, work.shrinkage], -1), query_key, selection,
                                        query_major=True)

        readouts = []
        for group in range(work.num_groups):
            columns = similarity[..., -work.value_size(group):]
            values = work.values[group]
            if long is not None and group < long.num_groups:
                first_long = long_size - long.value_size(group)
                if work.value_size(group) == work.size:  # long and working columns are contiguous
                    columns = similarity[..., first_long:]
                else:
                    columns = torch.cat([similarity[..., first_long:long_size], columns], -1)
                values = torch.cat([long.values[group], values], -1)
            weights, indices = sparse_topk_softmax(columns, self.top_k)
            if group == 0 and self.enable_long_term:
                usage = sparse_usage(weights, indices, columns.shape[-1])
                work.update_usage(usage[:, long_size:])
                if long is not None:
                    long.update_usage(usage[:, :long_size])
            readouts.append(sparse_readout(weights, indices, values))
        return torch.cat(readouts, 0).view(-1, readouts[0].shape[1], height, width)

    def add_memory(self, key: torch.Tensor, shrinkage: torch.Tensor, value: torch.Tensor,
                   objects: list[int], selection: torch.Tensor | None = None) -> None:
        """Store a memory frame; key/shrinkage/selection (1, C, H, W), value (1, objects, C_v, H, W).

        In long-term mode a full working memory is then consolidated, after
        pruning long-term memory if the new prototypes would not fit.
        """
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
