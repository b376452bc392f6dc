"""Frame-by-frame XMem propagation: segment each frame from memory, then maybe memorise it."""
from __future__ import annotations

from collections.abc import Collection, Sequence

import torch

from ..model.aggregate import aggregate
from ..model.network import XMem
from .graphed_network import GraphedXMem
from .memory_manager import MemoryManager
from .padding import pad_to_multiple, padding_to_multiple, unpad

# The reference implementation's evaluation defaults.
DEFAULT_CONFIG: dict = {
    "enable_long_term": True,
    "enable_long_term_count_usage": True,
    "hidden_dim": 64,
    "key_dim": 64,
    "value_dim": 512,
    "mem_every": 5,
    "deep_update_every": -1,
    "top_k": 30,
    "min_mid_term_frames": 5,
    "max_mid_term_frames": 10,
    "num_prototypes": 128,
    "max_long_term_elements": 10000,
}

_STRIDE = 16


class InferenceCore:
    """Propagates object masks through one video; call `step` once per frame, in order.

    Every mem_every-th frame, and every frame with a given mask, is added to
    memory. The sensory memory is deep-updated on memory frames when
    deep_update_every < 0, else every deep_update_every frames (when that
    falls on a memory frame).
    """

    def __init__(self, network: XMem, config: dict):
        self.config = config
        self.network = network
        self.mem_every = config["mem_every"]
        self.deep_update_every = config["deep_update_every"]
        self.enable_long_term = config["enable_long_term"]
        self.deep_update_sync = self.deep_update_every < 0
        self.all_labels: Sequence[int] | None = None
        self.clear_memory()

    def clear_memory(self) -> None:
        """Forget everything, to start a new video (labels are kept)."""
        self.curr_ti = -1
        self.last_mem_ti = 0
        self.last_deep_update_ti = -self.deep_update_every
        # A graphed network's memory is read by graph replays too, through the network's workspace (whose
        # graphs earlier videos of the same size captured). The old memory goes first: it holds the workspace.
        self.memory = None
        graphed = isinstance(self.network, GraphedXMem)
        self.memory = MemoryManager(self.config, self.network.memory_workspace if graphed else None)

    def set_all_labels(self, labels: Sequence[int]) -> None:
        """The labels 1..n of every object given so far (grows when objects are added)."""
        self.all_labels = labels

    @torch.no_grad()
    def step(self, image: torch.Tensor, mask: torch.Tensor | None = None,
             valid_labels: Collection[int] | None = None, end: bool = False) -> torch.Tensor:
        """Process the next frame and return its probabilities, (objects + 1, H, W), background first.

        image: (3, H, W) ImageNet-normalised. mask: (objects, H, W) soft or
        binary masks for all labels, given on the first frame and whenever
        objects are added or corrected. valid_labels: which mask channels are
        meaningful; the others keep the network's prediction. end: the last
        frame, so nothing needs remembering.
        """
        if mask is None and not self.memory.work_mem.engaged:
            raise ValueError("the first frame given to XMem needs a mask")
        if self.all_labels is None:
            raise ValueError("call set_all_labels before the first step")

        self.curr_ti += 1
        self.pad = padding_to_multiple(image, _STRIDE)

        is_mem_frame = (self.curr_ti - self.last_mem_ti >= self.mem_every or mask is not None) and not end
        need_segment = self.curr_ti > 0 and (valid_labels is None or len(self.all_labels) != len(valid_labels))
        if self.deep_update_sync:
            is_deep_update = is_mem_frame
        else:
            is_deep_update = self.curr_ti - self.last_deep_update_ti >= self.deep_update_every and not end
        # In sync mode a memory frame's hidden state comes from the deep update alone.
        is_normal_update = (not self.deep_update_sync or not is_deep_update) and not end
        # A memory frame the occlusion shortcut may skip keeps its normal update for then (no deep one comes).
        may_skip = is_mem_frame and mask is None and self.config.get("min_memory_area", 0) > 0

        image, key, shrinkage, selection, f16, f8, f4 = self.network.encode_frame(
            image, self.pad, need_ek=self.enable_long_term or need_segment, need_sk=is_mem_frame)

        prob = None
        if need_segment:
            readout = self.memory.match_memory(key, selection).unsqueeze(0)
            hidden, _, prob = self.network.segment((f16, f8, f4), readout, self.memory.hidden,
                                                   h_out=is_normal_update or may_skip, strip_bg=False)
            prob = prob[0]
            if is_normal_update:
                self.memory.hidden = hidden

        if mask is not None:
            prob = self._merge_mask(mask, prob, valid_labels, image.dtype)
            self.memory.create_hidden_state(len(self.all_labels), key)
        elif may_skip and self._too_small_to_remember(prob):
            is_mem_frame = False  # tried again on the next frame
            self.memory.hidden = hidden

        if is_mem_frame:
            value, hidden = self.network.encode_value(image, f16, self.memory.hidden, prob[1:].unsqueeze(0),
                                                      is_deep_update=is_deep_update)
            self.memory.add_memory(key, shrinkage, value, self.all_labels,
                                   selection=selection if self.enable_long_term else None)
            self.last_mem_ti = self.curr_ti
            if is_deep_update:
                self.memory.hidden = hidden
                self.last_deep_update_ti = self.curr_ti

        return unpad(prob, self.pad)

    def _too_small_to_remember(self, prob: torch.Tensor) -> bool:
        """The opt-in occlusion shortcut (not in the reference, off unless config min_memory_area > 0).

        An object covering fewer pixels than that (at the working resolution) is
        probably occluded; remembering the frame would teach XMem it vanished.
        Not for longer than the working memory's span (max_mid_term_frames memory
        frames): an object gone for good must not freeze every object's memory.
        """
        if self.curr_ti - self.last_mem_ti >= self.mem_every * self.config["max_mid_term_frames"]:
            return False
        areas = torch.bincount(unpad(prob, self.pad).argmax(0).flatten(), minlength=prob.shape[0])[1:]
        return bool((areas < self.config["min_memory_area"]).any())

    def _merge_mask(self, mask: torch.Tensor, prob: torch.Tensor | None,
                    valid_labels: Collection[int] | None, dtype: torch.dtype) -> torch.Tensor:
        """Probabilities (with background) from a given mask, keeping predictions for labels it does not cover.

        Where the given mask claims a pixel, predicted objects are cleared, so
        a newly added object wins over older ones.
        """
        mask, _ = pad_to_multiple(mask, _STRIDE)
        mask = mask.to(dtype)
        if prob is not None:
            predicted = prob[1:].masked_fill(mask.sum(0) > 0.5, 0)
            if valid_labels is not None:
                keep = [i for i in range(predicted.shape[0]) if i + 1 not in valid_labels]
                if keep:
                    mask = mask.clone()
                    mask[keep] = predicted[keep]
        return aggregate(mask, dim=0)
