"""Export SAM ViT-B's prompt encoder + mask decoder to ONNX (and optionally a TensorRT engine); see --help."""
import sys

from tracker.sam_onnx import export_cli

if __name__ == "__main__":
    sys.exit(export_cli("decoder"))
