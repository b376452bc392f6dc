"""The XMem network: the entry points that inference (and training) call."""
from __future__ import annotations

import os
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .aggregate import aggregate
from .memory_util import get_similarity, readout, topk_softmax
from .modules import Decoder, KeyEncoder, KeyProjection, ValueEncoder

_DEFAULT_DIMS = {"key_dim": 64, "value_dim": 512, "hidden_dim": 64}
_MASK_CONV = "value_encoder.conv1.weight"


def dims_from_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """key_dim, value_dim and hidden_dim implied by a checkpoint (hidden_dim 0: no sensory memory)."""
    hidden = state.get("decoder.hidden_update.transform.weight")
    return {
        "key_dim": state["key_proj.key_proj.weight"].shape[0],
        "value_dim": state["value_encoder.fuser.block2.conv2.weight"].shape[0],
        "hidden_dim": 0 if hidden is None else hidden.shape[0] // 3,
    }


def _fill_missing_batch_counters(module: nn.Module, state_dict: dict, prefix: str, *_args) -> None:
    """Let checkpoints saved without BatchNorm's num_batches_tracked load strictly.

    The counter only matters for training with momentum=None, so the module's
    current value is used; every other missing key still fails a strict load.
    """
    for name, buffer in module.named_buffers():
        key = prefix + name
        if name.rsplit(".", 1)[-1] == "num_batches_tracked" and key not in state_dict:
            state_dict[key] = buffer


# Submodules working at 1/8 and 1/4 of the image's size (the rest at 1/16 or coarser): on the CPU their maps are
# large enough for Winograd's larger tile to pay (see `XMem.model.winograd.use_winograd`).
FINE_MODULES = ("key_encoder.layer2", "value_encoder.layer2", "decoder.up_16_8", "decoder.up_8_4")


class XMem(nn.Module):
    """Key encoder, value encoder, key projection and decoder of XMem.

    `config` supplies key_dim/value_dim/hidden_dim unless `model_path` is
    given, in which case they are read from the checkpoint; either way the
    dimensions used are written back into `config` so the inference code sees
    the same values.
    """

    def __init__(self, config: dict, model_path: str | os.PathLike | None = None,
                 map_location: str | torch.device | None = None):
        super().__init__()
        weights = None
        if model_path is not None:
            weights = torch.load(model_path, map_location=map_location, weights_only=True)
            dims = dims_from_state_dict(weights)
        else:
            dims = {name: config.get(name, default) for name, default in _DEFAULT_DIMS.items()}
        config.update(dims)
        self.key_dim, self.value_dim, self.hidden_dim = dims["key_dim"], dims["value_dim"], dims["hidden_dim"]

        self.key_encoder = KeyEncoder()
        self.value_encoder = ValueEncoder(self.value_dim, self.hidden_dim)
        self.key_proj = KeyProjection(1024, self.key_dim)
        self.decoder = Decoder(self.value_dim, self.hidden_dim)
        self.register_load_state_dict_pre_hook(_fill_missing_batch_counters)

        if weights is not None:
            self.load_weights(weights, init_as_zero_if_needed=True)

    def encode_key(self, frame: torch.Tensor, need_sk: bool = True, need_ek: bool = True):
        """Key, shrinkage, selection and the f16/f8/f4 image features of (B, 3, H, W) or (B, T, 3, H, W) frames.

        For 5-D input the key terms come back as (B, C, T, H, W) and the
        features as (B, T, C, H, W), as the training code expects.
        """
        if frame.dim() not in (4, 5):
            raise ValueError(f"expected frames shaped (B, 3, H, W) or (B, T, 3, H, W), got {tuple(frame.shape)}")
        clip_shape = frame.shape[:2] if frame.dim() == 5 else None
        if clip_shape is not None:
            frame = frame.flatten(0, 1)

        f16, f8, f4 = self.key_encoder(frame)
        key, shrinkage, selection = self.key_proj(f16, need_sk, need_ek)

        if clip_shape is not None:
            def channels_first(x: torch.Tensor | None) -> torch.Tensor | None:
                return None if x is None else x.view(*clip_shape, *x.shape[-3:]).transpose(1, 2).contiguous()

            key, shrinkage, selection = map(channels_first, (key, shrinkage, selection))
            f16, f8, f4 = (f.view(*clip_shape, *f.shape[-3:]) for f in (f16, f8, f4))
        return key, shrinkage, selection, f16, f8, f4

    def encode_frame(self, image: torch.Tensor, pad: tuple[int, int, int, int], need_sk: bool = True,
                     need_ek: bool = True):
        """`encode_key` of one (3, H, W) image zero-padded by `pad` (left, right, top, bottom), with the padded
        (1, 3, H', W') frame first: the value encoder reads it too."""
        frame = F.pad(image, pad).unsqueeze(0)
        return frame, *self.encode_key(frame, need_sk, need_ek)

    def encode_value(self, frame: torch.Tensor, image_feat_f16: torch.Tensor, h16: torch.Tensor,
                     masks: torch.Tensor, is_deep_update: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Memory value of each object (B, K, C_v, H/16, W/16) and the (possibly deep-updated) hidden state.

        Each object is encoded together with the union of all other objects'
        masks, which tells the encoder what it must not claim.
        """
        others = masks.sum(dim=1, keepdim=True) - masks
        return self.value_encoder(frame, image_feat_f16, h16, masks, others, is_deep_update)

    def read_memory(self, query_key: torch.Tensor, query_selection: torch.Tensor, memory_key: torch.Tensor,
                    memory_shrinkage: torch.Tensor, memory_value: torch.Tensor) -> torch.Tensor:
        """Dense (no top-k) memory readout as used in training.

        query_key/query_selection (B, C_k, H, W); memory_key (B, C_k, T, H, W);
        memory_shrinkage (B, 1, T, H, W); memory_value (B, K, C_v, T, H, W).
        Returns (B, K, C_v, H, W).
        """
        batch, objects = memory_value.shape[:2]
        affinity = topk_softmax(get_similarity(memory_key, memory_shrinkage, query_key, query_selection))
        memory = readout(affinity, memory_value.flatten(1, 2))
        return memory.view(batch, objects, self.value_dim, *memory.shape[-2:])

    def segment(self, multi_scale_features, memory_readout: torch.Tensor, hidden_state: torch.Tensor | None,
                selector: torch.Tensor | None = None, h_out: bool = True, strip_bg: bool = True):
        """Decode (new hidden state or None, logits with background, probabilities).

        Object probabilities are sigmoids, optionally masked by `selector`, then
        soft-aggregated with a background channel; strip_bg drops that channel
        from the returned probabilities.
        """
        hidden_state, logits = self.decoder(*multi_scale_features, hidden_state, memory_readout, h_out=h_out)
        prob = torch.sigmoid(logits)
        if selector is not None:
            prob = prob * selector
        logits, prob = aggregate(prob, dim=1, return_logits=True)
        if strip_bg:
            prob = prob[:, 1:]
        return hidden_state, logits, prob

    def forward(self, mode: str, *args, **kwargs):
        """Dispatch by name, so wrappers such as DistributedDataParallel can reach every entry point."""
        entry_points = {
            "encode_key": self.encode_key,
            "encode_value": self.encode_value,
            "read_memory": self.read_memory,
            "segment": self.segment,
        }
        if mode not in entry_points:
            raise ValueError(f"unknown mode {mode!r}; expected one of {sorted(entry_points)}")
        return entry_points[mode](*args, **kwargs)

    def load_weights(self, src_dict: Mapping[str, torch.Tensor], init_as_zero_if_needed: bool = False) -> None:
        """Strictly load a checkpoint, widening a single-object mask convolution if needed.

        Checkpoints from the single-object pre-training stage have 4 input
        channels in the value encoder's first convolution; the missing
        "other objects" channel is added as zeros (or orthogonal noise when
        init_as_zero_if_needed is False, for training).
        """
        state = dict(src_dict)
        mask_conv = state.get(_MASK_CONV)
        if mask_conv is not None and mask_conv.shape[1] == 4:
            extra = torch.zeros_like(mask_conv[:, :1])
            if not init_as_zero_if_needed:
                nn.init.orthogonal_(extra)
            state[_MASK_CONV] = torch.cat([mask_conv, extra], dim=1)
        self.load_state_dict(state, strict=True)
