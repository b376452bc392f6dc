import copy
import importlib
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tracker import sam
from tracker.errors import PromptError, TrackerError, WeightsError
from tracker.sam_attention import FusedRelPosAttention
from tracker.segment_anything_compat import SamOnnxModel, image_encoder

FRAME_H, FRAME_W = 48, 64


def _frame(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A smooth gradient with noise: something to resize that is neither flat nor pure noise."""
    y, x = np.mgrid[0:height, 0:width]
    image = np.stack([x * 255.0 / width, y * 255.0 / height, 128 + 100 * np.sin(x / 7 + y / 11)], axis=-1)
    image += np.random.default_rng(seed).normal(0, 20, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def reference():
    """SAM's own ResizeLongestSide and SamPredictor.

    Both modules import torchvision, which is absent here; if so they get
    torchvision's documented PIL path (to_pil_image, then a bilinear resize to
    (h, w)) for the duration of this module.
    """
    added = []
    try:
        importlib.import_module("torchvision.transforms.functional")
    except ImportError:
        functional = types.ModuleType("torchvision.transforms.functional")
        functional.to_pil_image = Image.fromarray
        functional.resize = lambda image, size: image.resize((size[1], size[0]), Image.BILINEAR)
        for name, module in (("torchvision", types.ModuleType("torchvision")),
                             ("torchvision.transforms", types.ModuleType("torchvision.transforms")),
                             ("torchvision.transforms.functional", functional)):
            sys.modules[name] = module
            added.append(name)
    for name in ("segment_anything.utils.transforms", "segment_anything.predictor"):
        if name not in sys.modules:
            added.append(name)
    transforms = importlib.import_module("segment_anything.utils.transforms")
    predictor = importlib.import_module("segment_anything.predictor")
    yield types.SimpleNamespace(ResizeLongestSide=transforms.ResizeLongestSide, SamPredictor=predictor.SamPredictor)
    for name in added:
        sys.modules.pop(name, None)


@pytest.fixture(scope="module")
def backend(untrained_checkpoints):
    return sam.load_sam(untrained_checkpoints["sam"], device="cpu")


@pytest.fixture(scope="module")
def embedded(backend):
    """The only encoder run of this module: the frame's embedding and the tensor the encoder was fed."""
    fed = []
    hook = backend.model.image_encoder.register_forward_pre_hook(lambda _module, args: fed.append(args[0].clone()))
    try:
        emb = backend.embed(_frame(FRAME_H, FRAME_W))
    finally:
        hook.remove()
    return emb, fed[0]


def _reference_input(reference, model, image):
    """What SamPredictor.set_image hands to the image encoder."""
    resized = reference.ResizeLongestSide(1024).apply_image(image)
    x = torch.as_tensor(resized).permute(2, 0, 1).contiguous()[None]
    return model.preprocess(x)


@pytest.mark.parametrize("height, width", [(48, 64), (480, 640), (1080, 1920), (2000, 999), (333, 333)])
def test_preprocess_is_exactly_sams(reference, backend, height, width):
    image = _frame(height, width)
    x, input_size = sam.preprocess(image)
    expected = _reference_input(reference, backend.model, image)
    assert x.shape == (1, 3, 1024, 1024) and x.dtype == torch.float32
    assert torch.equal(x, expected)
    assert input_size == reference.ResizeLongestSide.get_preprocess_shape(height, width, 1024)
    assert max(input_size) == 1024 and torch.all(x[..., input_size[0]:, :] == 0)


@pytest.mark.parametrize("height, width", [(48, 64), (720, 1280), (2160, 3840), (1000, 1000)])
def test_on_device_resize_is_within_tolerance_of_pil(height, width):
    image = _frame(height, width, seed=1)
    pil, on_device = sam.resize_image(image, "pil"), sam.resize_image(image, "torch")
    assert pil.shape == on_device.shape
    assert (pil - on_device).abs().max().item() <= sam.RESIZE_TOLERANCE


def test_coordinate_transforms_match_sam_and_round_trip(reference):
    resize = reference.ResizeLongestSide(1024)
    xy = np.array([[0.0, 0.0], [10.5, 20.25], [63.0, 47.0]])
    box = np.array([5.0, 6.0, 40.0, 30.0])
    for size in [(48, 64), (480, 640), (1080, 1920), (2000, 999)]:
        ours = sam.to_model_coords(xy, size)
        np.testing.assert_array_equal(ours, resize.apply_coords(xy, size).astype(np.float32))
        np.testing.assert_allclose(sam.to_frame_coords(ours, size), xy, rtol=1e-6, atol=1e-4)
        prompt = sam.prepare_prompt(xy, [1, 0, 1], box, None, size)
        np.testing.assert_array_equal(prompt.points, ours)
        np.testing.assert_array_equal(prompt.box, resize.apply_boxes(box[None], size)[0].astype(np.float32))


def test_embed_feeds_the_encoder_sams_input(reference, backend, embedded):
    emb, fed = embedded
    assert torch.equal(fed, _reference_input(reference, backend.model, _frame(FRAME_H, FRAME_W)))
    assert emb.features.shape == (1, 256, 64, 64) and emb.features.dtype == torch.float32
    assert emb.original_size == (FRAME_H, FRAME_W) and emb.input_size == (768, 1024)


@pytest.mark.parametrize("size, rel_pos, batch", [(14, True, 3), (64, True, 1), (8, False, 2)])
def test_fused_attention_is_sams_attention(size, rel_pos, batch):
    torch.manual_seed(size)
    plain = image_encoder.Attention(768, 12, use_rel_pos=rel_pos, input_size=(size, size))
    if rel_pos:  # SAM starts them at zero; make the bias matter
        torch.nn.init.normal_(plain.rel_pos_h, std=0.5)
        torch.nn.init.normal_(plain.rel_pos_w, std=0.5)
    fused = copy.deepcopy(plain)
    fused.__class__ = FusedRelPosAttention
    x = torch.randn(batch, size, size, 768)
    with torch.inference_mode():
        torch.testing.assert_close(fused(x), plain(x), atol=2e-6, rtol=1e-5)


def test_backend_encoder_gives_sams_embedding(backend, embedded):
    """The loaded backend runs the fused attention; SAM's own encoder gives the same embedding."""
    emb, fed = embedded
    assert sum(isinstance(m, FusedRelPosAttention) for m in backend.model.image_encoder.modules()) == 12
    plain = copy.deepcopy(backend.model.image_encoder)
    for module in plain.modules():
        if isinstance(module, FusedRelPosAttention):
            module.__class__ = image_encoder.Attention
    with torch.inference_mode():
        expected = plain(fed)
    assert (emb.features - expected).abs().max() <= 1e-4 * expected.std()


PROMPTS = [
    dict(points=[[20, 10]], labels=[1], multimask=True),
    dict(points=[[20, 10], [50.5, 40]], labels=[1, 0]),
    dict(points=None, labels=None, box=[5, 6, 40, 30]),
    dict(points=[[20, 10]], labels=[1], box=[5, 6, 40, 30], multimask=True),
]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_decode_equals_sams_predictor(reference, backend, embedded, prompt):
    emb, _ = embedded
    predictor = reference.SamPredictor(backend.model)
    predictor.features, predictor.is_image_set = emb.features, True
    predictor.original_size, predictor.input_size = emb.original_size, emb.input_size
    prompt = dict(prompt, multimask=prompt.get("multimask", False))
    for mask_input in (None, np.random.default_rng(0).normal(0, 3, (1, 256, 256)).astype(np.float32)):
        ours = backend.decode(emb, prompt["points"], prompt["labels"], prompt.get("box"), mask_input,
                              multimask=prompt["multimask"])
        points = None if prompt["points"] is None else np.array(prompt["points"], dtype=np.float64)
        labels = None if prompt["labels"] is None else np.array(prompt["labels"])
        box = None if prompt.get("box") is None else np.array(prompt["box"], dtype=np.float64)
        masks, scores, low_res = predictor.predict(points, labels, box, mask_input, prompt["multimask"])
        assert ours.masks.shape == (3 if prompt["multimask"] else 1, FRAME_H, FRAME_W)
        assert ours.masks.dtype == bool and ours.low_res_logits.shape[1:] == (256, 256)
        np.testing.assert_array_equal(ours.masks, masks)
        np.testing.assert_array_equal(ours.scores, scores)
        np.testing.assert_array_equal(ours.low_res_logits, low_res)


def test_point_prompt_is_what_sams_onnx_decoder_takes(backend, embedded):
    emb, _ = embedded
    onnx_model = SamOnnxModel(backend.model, return_single_mask=False)
    orig_size = torch.tensor(emb.original_size, dtype=torch.float32)
    for points, labels, box in (([[20, 10], [3, 40]], [1, 0], None), ([[20, 10]], [1], [5, 6, 40, 30])):
        prompt = sam.prepare_prompt(points, labels, box, None, emb.original_size)
        coords, point_labels = prompt.point_prompt()
        with torch.inference_mode():
            _, scores, low_res = onnx_model(emb.features, torch.from_numpy(coords), torch.from_numpy(point_labels),
                                            torch.zeros(1, 1, 256, 256), torch.zeros(1), orig_size)
        single = backend.decode(emb, points, labels, box)
        multi = backend.decode(emb, points, labels, box, multimask=True)
        torch.testing.assert_close(torch.from_numpy(single.scores), scores[0, :1])
        torch.testing.assert_close(torch.from_numpy(multi.scores), scores[0, 1:])
        torch.testing.assert_close(torch.from_numpy(multi.low_res_logits), low_res[0, 1:])


class _Recording(sam.SamBackend):
    """Passes decodes to a real backend and remembers the multimask choice."""

    name = "recording"

    def __init__(self, inner):
        self.inner, self.multimask = inner, []

    def _embed(self, image):
        return self.inner._embed(image)

    def _decode(self, emb, prompt, multimask):
        self.multimask.append(multimask)
        return self.inner._decode(emb, prompt, multimask)


def test_segment_policy(backend, embedded):
    emb, _ = embedded
    recording = _Recording(backend)
    mask, score = sam.segment(recording, emb, [[20, 10]], [1])
    candidates = backend.decode(emb, [[20, 10]], [1], multimask=True)
    best = int(np.argmax(candidates.scores))
    assert recording.multimask == [True]
    assert mask.shape == (FRAME_H, FRAME_W) and mask.dtype == bool
    np.testing.assert_array_equal(mask, candidates.masks[best])
    assert score == pytest.approx(float(candidates.scores[best]))
    for kwargs in (dict(points=[[20, 10], [40, 30]], labels=[1, 1]), dict(points=[[20, 10]], labels=[0]),
                   dict(points=[[20, 10]], labels=[1], box=[5, 6, 40, 30]),
                   dict(points=[[20, 10]], labels=[1], mask_input=candidates.low_res_logits[best][None]),
                   dict(points=None, labels=None, box=[5, 6, 40, 30])):
        mask, _ = sam.segment(recording, emb, **kwargs)
        assert recording.multimask[-1] is False and mask.shape == (FRAME_H, FRAME_W)


@pytest.mark.parametrize("kwargs, message", [
    (dict(points=[[64, 10]], labels=[1]), r"click \(64, 10\) is outside the 64x48 frame"),
    (dict(points=[[10, -0.5]], labels=[1]), r"click \(10, -0.5\) is outside the 64x48 frame"),
    (dict(points=[[float("nan"), 3]], labels=[1]), "outside the 64x48 frame"),
    (dict(points=None, labels=None, box=[10, 10, 10, 30]), r"box \(10, 10, 10, 30\) has no area in the 64x48"),
    (dict(points=None, labels=None, box=[10, 30, 20, 5]), "has no area in the 64x48 frame"),
    (dict(points=None, labels=None, box=[10, 10, 65, 30]), "is outside the 64x48 frame"),
    (dict(points=None, labels=None, box=[1, 2, 3]), "x0,y0,x1,y1 in pixels of the 64x48 frame"),
    (dict(points=[[1, 2, 3]], labels=[1]), "x,y pairs in pixels of the 64x48 frame"),
    (dict(points=[[1, 2]], labels=[1, 0]), "1 clicks but 2 labels"),
    (dict(points=[[1, 2]], labels=[2]), r"1 \(object\) or 0 \(background\)"),
    (dict(points=[], labels=[]), "at least one click or a box"),
    (dict(points=[[1, 2]], labels=[1], mask_input=np.zeros((256, 256))), "1x256x256 logits"),
])
def test_bad_prompts_raise_prompt_error(backend, kwargs, message):
    emb = sam.ImageEmbedding(torch.zeros(1, 256, 64, 64), (FRAME_H, FRAME_W), (768, 1024))
    with pytest.raises(PromptError, match=message):
        backend.decode(emb, **kwargs)


def test_embed_rejects_non_rgb_uint8(backend):
    for image in (np.zeros((4, 4), np.uint8), np.zeros((4, 4, 3), np.float32), np.zeros((4, 4, 4), np.uint8)):
        with pytest.raises(ValueError, match="HxWx3 uint8 RGB"):
            backend.embed(image)


def test_backend_selection(monkeypatch, backend, untrained_checkpoints):
    assert isinstance(backend, sam.TorchSam) and backend.name == "torch" and backend.resize == "pil"
    assert not backend.model.training and backend.device == torch.device("cpu")
    assert "torch" in sam.available_backends("cpu")
    with pytest.raises(TrackerError, match="SAM backend 'nope' is unknown; choose one of: auto, .*torch"):
        sam.load_sam(untrained_checkpoints["sam"], "cpu", backend="nope")
    with pytest.raises(WeightsError, match="not in the SAM ViT-B layout"):
        sam.load_sam(untrained_checkpoints["xmem"], "cpu")

    monkeypatch.setattr(sam, "_BACKENDS", dict(sam._BACKENDS))
    loaded = []
    sam.register_backend("absent", lambda *a: loaded.append(("absent", a)), available=lambda d: False, priority=9,
                         needs="a GPU")
    sam.register_backend("fast", lambda *a: loaded.append(("fast", a)) or "fast", available=lambda d: True,
                         priority=50)
    assert sam.available_backends("cpu")[0] == "fast"
    assert sam.load_sam("x.pth", "cpu") == "fast"
    assert loaded == [("fast", (Path("x.pth"), torch.device("cpu"), torch.float32))]
    with pytest.raises(TrackerError, match=r"'absent' is not available on cpu \(it needs a GPU\); choose one of: "
                                           r"auto, fast, .*torch$"):
        sam.load_sam("x.pth", "cpu", backend="absent")


def test_fp16_encoder_is_refused_on_the_cpu_as_xmems_is():
    """fp16 runs far slower than fp32 on the CPU; loading must not start for it."""
    assert sam.encoder_dtype("fp16", torch.device("cuda")) == torch.float16
    assert sam.encoder_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(TrackerError, match="SAM precision fp16 runs on CUDA GPUs only; on the CPU use bf16 or fp32"):
        sam.load_sam("x.pth", "cpu", precision="fp16")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message when no GPU is present")
def test_asking_for_cuda_without_a_gpu_is_a_user_error():
    assert sam.resolve_device("auto") == torch.device("cpu")
    with pytest.raises(TrackerError, match="CUDA was requested"):
        sam.resolve_device("cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("resize, dtype, tolerance", [
    ("pil", torch.float32, 2e-3),  # CUDA kernels only (4e-4 seen on an H100)
    ("torch", torch.float32, 1e-2),  # plus the on-device resize (4e-3 seen)
    ("torch", torch.bfloat16, 3e-2),  # plus the bf16 encoder (9e-3 seen)
    ("torch", torch.float16, 1e-2),  # the default on CUDA: fp16 encoder
])
def test_cuda_backend_agrees_with_cpu(backend, embedded, resize, dtype, tolerance):
    emb, _ = embedded
    gpu = sam.TorchSam(copy.deepcopy(backend.model), "cuda", dtype=dtype, resize=resize)
    gpu_emb = gpu.embed(_frame(FRAME_H, FRAME_W))
    assert gpu_emb.features.dtype == torch.float32 and gpu_emb.input_size == emb.input_size
    error = (gpu_emb.features.cpu() - emb.features).norm() / emb.features.norm()
    assert error < tolerance
    gpu_pred = gpu.decode(emb, [[20, 10]], [1], multimask=True)
    cpu_pred = backend.decode(emb, [[20, 10]], [1], multimask=True)
    np.testing.assert_allclose(gpu_pred.low_res_logits, cpu_pred.low_res_logits, atol=1e-2, rtol=1e-3)
    np.testing.assert_allclose(gpu_pred.scores, cpu_pred.scores, atol=1e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graphs_give_the_eager_backends_embedding_and_masks(backend):
    """Encoder and mask decoder replay CUDA graphs (one per prompt shape) with the eager results."""
    eager = sam.TorchSam(copy.deepcopy(backend.model), "cuda", cuda_graphs=False)
    graphed = sam.TorchSam(copy.deepcopy(backend.model), "cuda")
    assert graphed.dtype == torch.float16 and graphed.cuda_graphs
    image = _frame(FRAME_H, FRAME_W)
    want, got = eager.embed(image), graphed.embed(image)
    assert (got.features - want.features).abs().max() <= 1e-3 * want.features.std()
    logits = eager.decode(want, [[20, 10]], [1]).low_res_logits
    prompts = [([[20, 10]], [1], None, None, True), ([[20, 10], [40, 30], [5, 5]], [1, 0, 1], None, None, False),
               ([[20, 10]], [1], [2, 2, 50, 40], None, False), (None, None, [2, 2, 50, 40], logits, False)]
    for points, labels, box, mask_input, multimask in prompts * 2:  # the second round replays
        a = eager.decode(want, points, labels, box, mask_input, multimask=multimask)
        b = graphed.decode(want, points, labels, box, mask_input, multimask=multimask)
        np.testing.assert_allclose(b.low_res_logits, a.low_res_logits, atol=1e-4, rtol=1e-4)
        np.testing.assert_allclose(b.scores, a.scores, atol=1e-5)
        assert np.array_equal(a.masks, b.masks)
    assert graphed._graphs.captured == 5 and graphed._graphs.failures == 0


def test_loading_sam_leaves_its_torchvision_parts_unimported(tmp_path):
    """SAM's predictor and mask generator import torchvision (seconds of a start) and are not needed to run it;
    code that asks the package for them still gets its own `__init__`. A stand-in torchvision on the path
    shows whether it is imported."""
    for module, body in {"__init__": "", "transforms/__init__": "", "ops/__init__": "",
                         "transforms/functional": "resize = to_pil_image = None",
                         "ops/boxes": "batched_nms = box_area = None"}.items():
        path = tmp_path / "torchvision" / f"{module}.py"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(body)
    script = (
        "import sys\n"
        "from tracker import sam\n"
        "unneeded = [m for m in sys.modules if m.startswith(('torchvision', 'segment_anything.predictor',"
        " 'segment_anything.automatic_mask_generator'))]\n"
        "assert not unneeded, unneeded\n"
        "from segment_anything import SamPredictor, SamAutomaticMaskGenerator\n"
    )
    repo = Path(__file__).resolve().parents[1]
    path = os.pathsep.join([str(repo), str(tmp_path), os.environ.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-c", script], cwd=repo, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": path})
    assert done.returncode == 0, done.stderr


def test_an_embedding_stops_between_the_encoders_blocks_when_asked_and_is_unchanged_otherwise(backend, embedded):
    """An embedding made ahead of need (`tracker.prefetch`) is asked before each of the 12 blocks whether to go
    on; given up, it leaves the backend as it was; never stopped, it is the embedding itself, bit for bit."""
    asked = []

    def stop_at_the_fourth_block() -> bool:
        asked.append(True)
        return len(asked) == 4

    assert backend.stoppable
    with pytest.raises(sam.EmbeddingStopped):
        backend.embed(_frame(FRAME_H, FRAME_W), stop=stop_at_the_fourth_block)
    assert len(asked) == 4
    asked.clear()
    again = backend.embed(_frame(FRAME_H, FRAME_W), stop=lambda: asked.append(True) is not None)
    assert len(asked) == 12
    assert torch.equal(again.features, embedded[0].features)


@pytest.mark.parametrize("still_ahead", [True, False])
def test_an_embedding_made_ahead_yields_to_a_call_that_needs_the_backend(backend, embedded, still_ahead):
    """A click's decoder (or any call not made ahead) waiting for the backend stops an embedding made ahead at
    its next block, and goes first; once a click waits for that embedding (no longer `ahead`), it goes on."""
    import threading

    began = threading.Event()
    outcome = []

    def ahead():
        try:
            backend.embed(_frame(FRAME_H, FRAME_W), stop=lambda: began.set() or False, ahead=lambda: still_ahead)
            outcome.append("finished")
        except sam.EmbeddingStopped:
            outcome.append("stopped")

    worker = threading.Thread(target=ahead)
    worker.start()
    assert began.wait(60)
    prediction = backend.decode(embedded[0], [[20, 10]], [1])
    worker.join()
    assert outcome == ["stopped" if still_ahead else "finished"] and prediction.masks.shape == (1, FRAME_H, FRAME_W)
