"""XMem video object segmentation (Cheng & Schwing, ECCV 2022): network and inference.

`XMem.model.network.XMem` is the network, `XMem.inference.inference_core.InferenceCore`
propagates masks through a video frame by frame. Parameter names follow the
official checkpoints so `XMem.pth` loads unchanged.
"""
