"""How a video is tracked and rendered: XMem's memory settings and the run's options, checked on creation.

Free of torch, so that the command line can build its help and check its
flags before the models load.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Callable

from .errors import TrackerError, real_number, whole_number
from .video import DEFAULT_PRESET, H264_CONTAINERS, X264_MAX_CRF, X264_PRESETS

# The command lines' model flags (the CLI's and the benchmark's).
DEVICE_HELP = "auto (CUDA when present), cuda or cpu (another GPU than the first: CUDA_VISIBLE_DEVICES=N)"
SAM_BACKEND_CHOICES = ("auto", "torch", "onnx", "tensorrt")

if TYPE_CHECKING:
    import torch


MAX_MEMORY_SETTING = 10**9
PRECISION_CHOICES = ("auto", "fp32", "bf16", "fp16")  # XMem's (see `pipeline.PRECISIONS`)


@dataclass
class MemoryOptions:
    """XMem's memory settings, defaults as in the reference implementation."""

    mem_every: int = 5
    top_k: int = 30
    min_mid_term_frames: int = 5
    max_mid_term_frames: int = 10
    num_prototypes: int = 128
    max_long_term_elements: int = 10000
    deep_update_every: int = -1
    enable_long_term: bool = True
    enable_long_term_count_usage: bool = True
    # Opt-in occlusion shortcut, off as in the reference: skip a memory update while
    # an object covers fewer pixels than this at the working resolution.
    min_memory_area: int = 0

    def __post_init__(self) -> None:
        for name in ("mem_every", "top_k", "min_mid_term_frames", "max_mid_term_frames", "num_prototypes",
                     "max_long_term_elements", "deep_update_every", "min_memory_area"):
            setattr(self, name, whole_number(getattr(self, name), f"memory setting {name}"))
            if getattr(self, name) > MAX_MEMORY_SETTING:  # beyond any video; past 2**63 the GPU's integers overflow
                raise TrackerError(f"memory setting {name} must be at most {MAX_MEMORY_SETTING:,}, "
                                   f"not {getattr(self, name):,}")
        for name in ("mem_every", "top_k", "min_mid_term_frames", "num_prototypes", "max_long_term_elements"):
            if getattr(self, name) < 1:
                raise TrackerError(f"memory setting {name} must be at least 1, not {getattr(self, name)}")
        if self.deep_update_every < 1 and self.deep_update_every != -1:
            raise TrackerError(f"memory setting deep_update_every must be -1 (with every memory update) or a number "
                               f"of frames, 1 or more, not {self.deep_update_every}")
        if self.min_memory_area < 0:
            raise TrackerError(f"min_memory_area must be 0 (off) or more, not {self.min_memory_area}")
        if self.max_mid_term_frames <= self.min_mid_term_frames:
            raise TrackerError(f"max_mid_term_frames ({self.max_mid_term_frames}) must be larger than "
                               f"min_mid_term_frames ({self.min_mid_term_frames})")
        if self.num_prototypes > self.max_long_term_elements:
            raise TrackerError(f"num_prototypes ({self.num_prototypes}) cannot exceed max_long_term_elements "
                               f"({self.max_long_term_elements})")

    @staticmethod
    def named(message: str, name_of: Callable[[str], str]) -> str:
        """One of these settings' errors with their field names as the user knows them (CLI flags, app labels)."""
        names = {f.name for f in fields(MemoryOptions)}
        return re.sub(r"\b(?:memory setting )?([a-z_]+)\b", lambda m: name_of(m[1]) if m[1] in names else m[0],
                      message)

    def xmem_config(self, network: torch.nn.Module) -> dict:
        """The reference's config dict, with the dimensions the loaded network has."""
        return dict(
            vars(self),
            enable_short_term=True,
            key_dim=network.key_dim,
            value_dim=network.value_dim,
            hidden_dim=network.hidden_dim,
        )


# Wider outlines would hide the objects they surround.
MAX_OUTLINE = 64


@dataclass(frozen=True)
class CutoutKind:
    """How one kind of cut-out (tracker.exports) is written."""

    label: str
    background: str  # render.cutout's background
    codec: str  # VideoWriter's codec
    filename: str  # after the video's name and "_"
    endings: tuple[str, ...]  # the output names its container takes
    crf: int = 18


CUTOUT_KINDS = {
    "transparent": CutoutKind("Transparent WebM (VP9 with alpha)", "transparent", "libvpx-vp9", "cutout.webm",
                              (".webm",)),
    "green": CutoutKind("Green-screen MP4 (H.264)", "green", "libx264", "cutout_greenscreen.mp4",
                        tuple(H264_CONTAINERS)),
    # Editing programs (Premiere, Resolve, Final Cut, After Effects) read ProRes 4444's alpha; few read VP9's.
    "prores": CutoutKind("Transparent ProRes 4444 MOV (for editing programs)", "transparent", "prores_ks",
                         "cutout_prores.mov", (".mov",)),
    # A matte's edges are all it has: coded finer (a few KB a frame more), they stay sharp.
    "matte": CutoutKind("Black-and-white matte MP4 (H.264)", "matte", "libx264", "matte.mp4",
                        tuple(H264_CONTAINERS), crf=8),
}


# The TrackOptions fields that change only how a result is drawn and encoded, not its masks.
LOOK = ("alpha", "outline", "crf", "preset")


@dataclass
class TrackOptions:
    """How a video is tracked and rendered (the fields in LOOK change only the drawing and encoding)."""

    size: int = 480  # shorter side of the working resolution; 0 keeps the original
    memory: MemoryOptions = field(default_factory=MemoryOptions)
    alpha: float = 0.5  # overlay opacity
    outline: int = 2  # outline width in pixels, 0 for none
    crf: int = 18
    preset: str = DEFAULT_PRESET
    precision: str = "auto"  # XMem on CUDA: "fp32", "bf16", "fp16", or "auto" (fp32: see FAST_PRECISION)
    # XMem's fast copy (folded, fused, channels-last) replaying CUDA graphs (on the CPU in fp32: with Winograd
    # convolutions); False: the plain network, eager
    cuda_graphs: bool = True

    def __post_init__(self) -> None:
        self.size, self.crf, self.outline = (whole_number(self.size, "size"), whole_number(self.crf, "crf"),
                                             whole_number(self.outline, "outline"))
        self.alpha = real_number(self.alpha, "alpha (the overlay's opacity)")
        if self.size < 0:
            raise TrackerError(f"size (the working resolution's shorter side) must be 0 (the original resolution) "
                               f"or a number of pixels, not {self.size}")
        if self.preset not in X264_PRESETS:
            raise TrackerError(f"unknown encoder preset {self.preset!r}; use one of {', '.join(X264_PRESETS)}")
        if self.precision not in PRECISION_CHOICES:  # which of them the device runs is checked with the device
            raise TrackerError(f"unknown precision {self.precision!r}; use auto, fp32, bf16 or fp16")
        if not 0 <= self.crf <= X264_MAX_CRF:
            raise TrackerError(f"crf must be 0 (lossless) to {X264_MAX_CRF}, not {self.crf}")
        if not 0 <= self.alpha <= 1:
            raise TrackerError(f"alpha (the overlay's opacity) must be 0 to 1, not {self.alpha}")
        if not 0 <= self.outline <= MAX_OUTLINE:
            raise TrackerError(f"outline must be 0 (none) to {MAX_OUTLINE} pixels, not {self.outline}")

    def tracks_like(self, other: TrackOptions | None) -> bool:
        """Whether `other` gives the same masks: it differs at most in the look (LOOK), not in the tracking."""
        return other is not None and replace(self, **{name: getattr(other, name) for name in LOOK}) == other
