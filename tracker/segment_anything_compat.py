"""Import SAM's model code without the parts that need torchvision.

`segment_anything/__init__.py` pulls in the automatic mask generator, which
needs torchvision's NMS. We only use the network (``modeling``), the
``build_sam`` helpers and the ONNX wrapper, none of which touch torchvision,
so where torchvision is missing (CPU-only installs of recent PyTorch) we
register the package without running its ``__init__``.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
import types


def _package() -> types.ModuleType:
    try:
        return importlib.import_module("segment_anything")
    except (ImportError, RuntimeError) as exc:  # torchvision missing or broken
        spec = importlib.util.find_spec("segment_anything")
        if spec is None or not spec.submodule_search_locations:
            raise ImportError(
                "segment-anything is not installed: pip install -r requirements.txt"
            ) from exc
        for name in [m for m in sys.modules if m == "segment_anything" or m.startswith("segment_anything.")]:
            del sys.modules[name]
        pkg = types.ModuleType("segment_anything")
        pkg.__path__ = list(spec.submodule_search_locations)
        pkg.__spec__ = spec
        sys.modules["segment_anything"] = pkg
        return pkg


_package()
from segment_anything.build_sam import sam_model_registry  # noqa: E402
from segment_anything.modeling import Sam, image_encoder  # noqa: E402
from segment_anything.utils.onnx import SamOnnxModel  # noqa: E402

__all__ = ["Sam", "SamOnnxModel", "image_encoder", "sam_model_registry"]
