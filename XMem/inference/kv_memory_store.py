"""Key/value storage shared by XMem's working and long-term memory.

Keys (with shrinkage and, in working memory, selection) are one tensor
(1, C, N) for all objects. Values are kept per object group, (objects, C_v, N_g):
objects that first appear on the same frame form a group, and a group only has
values for the newest N_g keys, since earlier frames were stored before it
existed. Optionally the store counts how much each element is read, which
decides what is consolidated into, and pruned from, long-term memory.
"""
from __future__ import annotations

import torch

# Initial "lifetime" of an element, so usage = use / life is defined before its first read.
_NEWBORN_LIFE = 1e-7


def _cat(old: torch.Tensor | None, new: torch.Tensor) -> torch.Tensor:
    return new if old is None else torch.cat([old, new], dim=-1)


class KeyValueMemoryStore:
    """Elements along the last dimension; groups of objects own suffixes of it."""

    def __init__(self, count_usage: bool):
        self.count_usage = count_usage
        self.key: torch.Tensor | None = None
        self.shrinkage: torch.Tensor | None = None
        self.selection: torch.Tensor | None = None
        self.values: list[torch.Tensor] = []
        # Working memory only: the object indices (0-based, contiguous) of each group.
        self.group_slices: list[slice] = []
        self.use_count: torch.Tensor | None = None
        self.life_count: torch.Tensor | None = None

    @property
    def size(self) -> int:
        return 0 if self.key is None else self.key.shape[-1]

    @property
    def num_groups(self) -> int:
        return len(self.values)

    @property
    def engaged(self) -> bool:
        return self.key is not None

    @property
    def num_objects(self) -> int:
        return 0 if not self.group_slices else self.group_slices[-1].stop

    def value_size(self, group: int) -> int:
        """How many of the newest keys have values for this group."""
        return self.values[group].shape[-1]

    def _append_keys(self, key: torch.Tensor, shrinkage: torch.Tensor | None,
                     selection: torch.Tensor | None) -> None:
        self.key = _cat(self.key, key)
        if shrinkage is not None:
            self.shrinkage = _cat(self.shrinkage, shrinkage)
        if selection is not None:
            self.selection = _cat(self.selection, selection)
        if self.count_usage:
            # float32 whatever the keys' precision, as the reference keeps them: a float64 run's usage
            # ranks prototypes and prunes exactly as the reference's, ties included.
            fresh = key.new_zeros((key.shape[0], 1, key.shape[-1]), dtype=torch.float32)
            self.use_count = _cat(self.use_count, fresh)
            self.life_count = _cat(self.life_count, fresh + _NEWBORN_LIFE)

    def add_frame(self, key: torch.Tensor, shrinkage: torch.Tensor, selection: torch.Tensor | None,
                  value: torch.Tensor, objects: list[int]) -> None:
        """Store one memory frame (working memory).

        `value` is (objects, C_v, HW) for `objects`, the labels 1..n of all
        objects so far; labels beyond those already stored start a new group.
        """
        if list(objects) != list(range(1, len(objects) + 1)) or len(objects) < self.num_objects:
            raise ValueError(f"object labels must be 1..n and never shrink; got {list(objects)} "
                             f"with {self.num_objects} objects already in memory")
        if value.shape[0] != len(objects):
            raise ValueError(f"a memory frame holds values of {value.shape[0]} objects for labels {list(objects)}: "
                             "objects added with set_all_labels need their mask on the frame that adds them")
        self._append_keys(key, shrinkage, selection)
        for group, objects_slice in enumerate(self.group_slices):
            self.values[group] = torch.cat([self.values[group], value[objects_slice]], dim=-1)
        if len(objects) > self.num_objects:
            new_group = slice(self.num_objects, len(objects))
            self.group_slices.append(new_group)
            self.values.append(value[new_group])

    def add_prototypes(self, key: torch.Tensor, shrinkage: torch.Tensor,
                       values: list[torch.Tensor | None]) -> None:
        """Append consolidated prototypes (long-term memory); None means "nothing for this group"."""
        self._append_keys(key, shrinkage, None)
        for group, value in enumerate(values):
            if value is None:
                continue
            if group < self.num_groups:
                self.values[group] = torch.cat([self.values[group], value], dim=-1)
            else:
                self.values.append(value)

    def update_usage(self, usage: torch.Tensor) -> None:
        """Add one read's affinity mass per element and age every element by one read."""
        if not self.count_usage:
            return
        self.use_count += usage.view_as(self.use_count)
        self.life_count += 1

    def usage(self) -> torch.Tensor:
        """Average affinity per read since each element was stored, (1, 1, N)."""
        if not self.count_usage:
            raise RuntimeError("this memory does not count usage; enable "
                               "enable_long_term_count_usage to prune long-term memory")
        return self.use_count / self.life_count

    def sliced(self, start: int, end: int):
        """(key, shrinkage, selection, usage) of elements start..end-1."""
        def part(x: torch.Tensor | None) -> torch.Tensor | None:
            return None if x is None else x[..., start:end]

        return part(self.key), part(self.shrinkage), part(self.selection), self.usage()[..., start:end]

    def remove_range(self, start: int, end: int, min_value_size: int) -> None:
        """Drop elements start..end-1 of the keys, and the matching span of each group's values.

        A group's span is measured from its own first element: its first
        `start` values and its last (size - end) values are kept. Groups with
        fewer than `min_value_size` values are left alone, as they were not
        consolidated.
        """
        tail = self.size - end

        def cut(x: torch.Tensor | None, stop: int) -> torch.Tensor | None:
            return None if x is None else torch.cat([x[..., :start], x[..., stop:]], dim=-1)

        self.key, self.shrinkage, self.selection, self.use_count, self.life_count = (
            cut(x, end) for x in (self.key, self.shrinkage, self.selection, self.use_count, self.life_count))
        self.values = [cut(v, v.shape[-1] - tail) if v.shape[-1] >= min_value_size else v for v in self.values]

    def prune(self, max_size: int) -> None:
        """Forget the least-used elements so at most `max_size` remain.

        Every element whose usage is at or below the k-th smallest (k = the
        excess) goes, so ties can remove more than the excess. A group's
        values follow the keys they are aligned with (the newest ones).
        """
        excess = self.size - max_size
        if excess <= 0:
            return
        usage = self.usage().flatten()
        threshold = torch.kthvalue(usage, excess).values
        kept = torch.nonzero(usage > threshold).squeeze(1)

        def keep(x: torch.Tensor | None) -> torch.Tensor | None:
            return None if x is None else x.index_select(-1, kept)

        offsets = [self.size - v.shape[-1] for v in self.values]
        self.key, self.shrinkage, self.selection, self.use_count, self.life_count = (
            keep(x) for x in (self.key, self.shrinkage, self.selection, self.use_count, self.life_count))
        self.values = [v.index_select(-1, kept if offset == 0 else kept[kept >= offset] - offset)
                       for v, offset in zip(self.values, offsets)]
