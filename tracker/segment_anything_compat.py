"""Import SAM's model code without its package's ``__init__``.

`segment_anything/__init__.py` pulls in the predictor and the automatic mask
generator, which import torchvision: about 5 s of a CUDA machine's start, for
code we never run (and torchvision is missing from CPU-only installs of recent
PyTorch). We use the network (``modeling``), the ``build_sam`` helpers and the
ONNX wrapper, none of which touch torchvision, so the package is registered
with its ``__init__`` deferred until something asks it for a name it lacks.
"""
from __future__ import annotations

import importlib.util
import sys
import types


def _package() -> types.ModuleType:
    if "segment_anything" in sys.modules:
        return sys.modules["segment_anything"]
    spec = importlib.util.find_spec("segment_anything")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("segment-anything is not installed: pip install -r requirements.txt")
    pkg = importlib.util.module_from_spec(spec)

    def run_init(name: str):
        """The package's own ``__init__`` (torchvision included), run once, for code that asks for its names."""
        del pkg.__getattr__
        spec.loader.exec_module(pkg)
        return getattr(pkg, name)

    pkg.__getattr__ = run_init
    sys.modules["segment_anything"] = pkg
    return pkg


_package()
from segment_anything.build_sam import sam_model_registry  # noqa: E402
from segment_anything.modeling import Sam, image_encoder  # noqa: E402
from segment_anything.utils.onnx import SamOnnxModel  # noqa: E402

__all__ = ["Sam", "SamOnnxModel", "image_encoder", "sam_model_registry"]
