"""Click an object, get it tracked and segmented in every frame (SAM + XMem).

The Python API::

    from tracker import Tracker, ObjectPrompt, TrackOptions

    tracker = Tracker(device="auto")             # loads (and on first use downloads) the weights
    prompt = ObjectPrompt(object_id=1, frame=0, points=[(320, 180)], labels=[1])
    result = tracker.track("clip.mp4", [prompt], output="output/clip_tracked.mp4",
                           masks="output/clip_masks.zip")
    print(result.summary())

    for frame in tracker.iter_tracked("clip.mp4", [prompt]):   # streamed, one frame at a time
        mask = frame.mask(1)                                    # HxW bool numpy array
"""
from importlib import import_module

from .errors import Cancelled, PromptError, TrackerError, VideoError, WeightsError
from .prompts import ObjectPrompt, load_prompts

# The model-side names load torch and the networks: import them on first use,
# so that `python -m tracker weights ...` and prompt parsing stay light.
_LAZY = {
    "MemoryOptions": "options", "TrackOptions": "options", "TrackedFrame": "pipeline",
    "Tracker": "session", "TrackResult": "session", "track_video": "session",
    "UntrainedWeightsWarning": "session",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["Cancelled", "ObjectPrompt", "PromptError", "TrackerError", "VideoError", "WeightsError",
           "load_prompts", *_LAZY]
