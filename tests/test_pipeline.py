import threading
import time

import numpy as np
import pytest
import torch

from tracker.errors import Cancelled
from tracker.pipeline import (WRITER_QUEUE_BYTES, Download, FramePrep, ThreadedSink, labels_at, prefetch, shrink_mask,
                              stamp, working_size, writer_queue_depth)
from tracker.render import encoder_picture_bytes
from tracker.video import Frame


@pytest.mark.parametrize("size, expected", [
    ((1920, 1080, 480), (853, 480)),
    ((1080, 1920, 480), (480, 853)),
    ((640, 360, 480), (640, 360)),  # never upscaled
    ((1281, 721, 0), (1281, 721)),  # 0 keeps the original
    ((161, 121, 100), (133, 100)),
])
def test_working_size(size, expected):
    assert working_size(*size) == expected


def _frame(image: np.ndarray) -> Frame:
    return Frame(0, image, 0, 0.0)


def test_frame_prep_resizes_as_uint8_and_normalises():
    prep = FramePrep(torch.device("cpu"), (40, 30))
    image = np.random.default_rng(0).integers(0, 256, (60, 80, 3), dtype=np.uint8)
    small = prep.resize(prep.upload(_frame(image)))
    assert small.shape == (30, 40, 3) and small.dtype == torch.uint8
    normalised = prep.normalise(small)
    assert normalised.shape == (3, 30, 40)
    back = (normalised * prep.std + prep.mean) * 255
    assert torch.allclose(back, small.permute(2, 0, 1).float(), atol=1e-3)
    flat = np.full((60, 80, 3), 77, np.uint8)  # resizing a flat picture keeps its value exactly
    assert (prep.resize(prep.upload(_frame(flat))) == 77).all()


def test_labels_at_upsamples_and_maps_channels_to_ids():
    prob = torch.zeros(3, 4, 4)
    prob[0] = 1
    prob[1, :, :2] = 2  # channel 1 on the left half
    prob[2, 3, 3] = 3  # channel 2 in one corner
    lookup = torch.tensor([0, 7, 9], dtype=torch.uint8)
    labels = labels_at(prob, (8, 8), lookup)
    assert labels.shape == (8, 8) and labels.dtype == torch.uint8
    assert (labels[:, :3] == 7).all() and labels[7, 7] == 9 and labels[0, 7] == 0
    ties = torch.tensor([[0.5, 0.2, 0.4], [0.5, 0.4, 0.4], [0.1, 0.4, 0.2]]).view(3, 1, 3)
    assert labels_at(ties, (1, 3), lookup).tolist() == [[0, 7, 0]]  # argmax's choice: the first of equal values


def test_stamp_puts_prompt_masks_over_tracked_labels():
    labels = torch.tensor([[1, 1, 2], [0, 0, 2]], dtype=torch.uint8)
    new = torch.tensor([[False, False, False], [True, True, False]])
    out = stamp(labels, {1: new})
    assert out.tolist() == [[0, 0, 2], [1, 1, 2]]


def test_shrink_mask_keeps_large_regions():
    mask = torch.zeros(40, 40, dtype=torch.bool)
    mask[:20] = True
    small = shrink_mask(mask, (10, 10))
    assert small.dtype == torch.float32 and small[:5].eq(1).all() and small[5:].eq(0).all()


def test_prefetch_yields_in_order_and_reraises():
    assert list(prefetch(iter(range(50)), depth=3, stop=threading.Event())) == list(range(50))

    def broken():
        yield 1
        raise ValueError("bad frame")

    with pytest.raises(ValueError, match="bad frame"):
        list(prefetch(broken(), depth=2, stop=threading.Event()))


def test_prefetch_stops_its_thread_when_the_consumer_leaves():
    stop = threading.Event()
    produced = []

    def endless():
        i = 0
        while True:
            produced.append(i)
            yield i
            i += 1

    for item in prefetch(endless(), depth=2, stop=stop):
        if item == 3:
            break
    assert stop.is_set()
    count = len(produced)
    threading.Event().wait(0.3)
    assert len(produced) <= count + 1


def test_a_consumer_leaving_near_the_end_does_not_wait_for_the_decode_thread():
    """The thread's end-of-items mark once went into a full queue with a blocking put: a consumer that left in
    the last frames waited 5 s for the thread, which then stayed blocked for good."""
    before = {thread for thread in threading.enumerate() if thread.name == "decode"}
    started = time.monotonic()
    frames = prefetch(iter(range(3)), depth=2, stop=threading.Event())
    next(frames)
    threading.Event().wait(0.3)  # the thread has queued the rest and waits to queue its end
    frames.close()
    assert time.monotonic() - started < 2
    threading.Event().wait(0.3)
    assert {thread for thread in threading.enumerate() if thread.name == "decode"} <= before


def test_threaded_sink_writes_finishes_and_reports_errors():
    written, finished, discarded = [], [], []
    sink = ThreadedSink("t", lambda i: written.append(i), lambda: finished.append(1), lambda: discarded.append(1))
    for i in range(20):
        sink.put(i)
    sink.close()
    assert written == list(range(20)) and finished == [1] and not discarded

    def fail(i):
        raise OSError("disk full")

    sink = ThreadedSink("t", fail, lambda: finished.append(2), lambda: discarded.append(2))
    with pytest.raises(OSError, match="disk full"):
        for i in range(50):
            sink.put(i)
            threading.Event().wait(0.01)
    sink.abort()
    assert 2 not in finished and discarded == [2]

    sink = ThreadedSink("t", fail, lambda: finished.append(3), lambda: discarded.append(3))
    sink.put(0)
    with pytest.raises(OSError, match="disk full"):
        sink.close()
    assert 3 not in finished and discarded == [2, 3]


def test_threaded_sink_abort_discards():
    events = []
    sink = ThreadedSink("t", lambda i: events.append(i), lambda: events.append("finish"),
                        lambda: events.append("discard"))
    sink.put(1)
    sink.abort()
    assert events[-1] == "discard" and "finish" not in events
    with pytest.raises(Cancelled):
        sink.put(2)


def test_a_writer_queue_holds_many_small_frames_and_few_large_ones_within_its_byte_budget():
    gpu, cpu = torch.device("cuda"), torch.device("cpu")
    assert encoder_picture_bytes(gpu, 1280, 720) == 1280 * 720 * 3 // 2  # 4:2:0 planes come back from a GPU
    assert encoder_picture_bytes(cpu, 1280, 720) == 1280 * 720 * 3  # RGB elsewhere
    assert writer_queue_depth(encoder_picture_bytes(gpu, 1280, 720)) == 64
    depth_1080p = writer_queue_depth(encoder_picture_bytes(gpu, 1920, 1080))
    assert 32 <= depth_1080p < 64 and depth_1080p * 1920 * 1080 * 3 // 2 <= WRITER_QUEUE_BYTES
    assert writer_queue_depth(encoder_picture_bytes(gpu, 7680, 4320)) == 8  # never so shallow that encoding stalls


def test_aborting_a_deep_queue_skips_what_is_still_queued():
    written = []

    def slow_write(i):
        threading.Event().wait(0.05)
        written.append(i)

    sink = ThreadedSink("t", slow_write, lambda: None, lambda: None, item_bytes=1)  # small items: 64 deep
    for i in range(64):
        sink.put(i)
    sink.abort()
    assert len(written) < 10  # 64 writes would take 3.2 s


@pytest.mark.parametrize("settings, message", [
    ({"mem_every": 0}, "mem_every must be at least 1"),
    ({"min_mid_term_frames": 10, "max_mid_term_frames": 10}, "must be larger than"),
    ({"num_prototypes": 200, "max_long_term_elements": 100}, "cannot exceed"),
    ({"min_memory_area": 10**30}, "min_memory_area must be at most 1,000,000,000"),  # overflowed on the GPU
])
def test_memory_settings_are_checked(settings, message):
    from tracker.errors import TrackerError
    from tracker.options import MemoryOptions

    with pytest.raises(TrackerError, match=message):
        MemoryOptions(**settings)


@pytest.mark.parametrize("settings, message", [
    ({"preset": "warp"}, "unknown encoder preset 'warp'; use one of ultrafast, superfast"),
    ({"crf": 52}, "crf must be 0 .lossless. to 51, not 52"),
    ({"crf": -1}, "not -1"),
    ({"size": -5}, "size .the working resolution's shorter side. must be 0 .the original resolution. or a number of "
                   "pixels, not -5"),
    ({"size": "120"}, "size must be a whole number, not '120'"),
    ({"crf": 18.5}, "crf must be a whole number, not 18.5"),
    ({"alpha": "0.5"}, "alpha .the overlay's opacity. must be a finite number, not '0.5'"),
])
def test_encoder_settings_are_checked(settings, message):
    from tracker.errors import TrackerError
    from tracker.options import TrackOptions

    with pytest.raises(TrackerError, match=message):
        TrackOptions(**settings)
    assert TrackOptions(preset="ultrafast", crf=0).preset == "ultrafast"


def test_only_the_look_may_differ_for_options_to_track_alike():
    from tracker.options import MemoryOptions, TrackOptions

    base = TrackOptions()
    assert base.tracks_like(TrackOptions(alpha=0.9, outline=0, crf=30, preset="ultrafast"))
    for other in (TrackOptions(size=240), TrackOptions(memory=MemoryOptions(mem_every=3)),
                  TrackOptions(precision="fp32"), TrackOptions(alpha=0.9, size=240), None):
        assert not base.tracks_like(other), other


def test_memory_settings_of_the_wrong_type_are_named():
    from tracker.errors import TrackerError
    from tracker.options import MemoryOptions

    with pytest.raises(TrackerError, match="memory setting top_k must be a whole number, not 2.5"):
        MemoryOptions(top_k=2.5)
    assert MemoryOptions.named("memory setting top_k must be at least 1, not 0 (min_mid_term_frames)",
                               str.upper) == "TOP_K must be at least 1, not 0 (MIN_MID_TERM_FRAMES)"


def test_sink_receives_downloads_as_host_arrays():
    received = []
    sink = ThreadedSink("t", lambda index, array: received.append((index, array)), lambda: None, lambda: None)
    for i in range(3):
        sink.put(i, Download(torch.full((2, 3), i, dtype=torch.uint8), lambda array: array.sum()))
    sink.close()
    assert [(i, int(total)) for i, total in received] == [(0, 0), (1, 6), (2, 12)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_download_arrives_whole_after_later_work():
    tensor = torch.arange(1 << 20, device="cuda", dtype=torch.int32)
    download = Download(tensor)
    tensor.zero_()  # queued after the copy: must not reach the host array
    assert np.array_equal(download.result(), np.arange(1 << 20, dtype=np.int32))


def test_the_gpu_colour_path_tracks_like_the_cpu_path(cpu_tracker, tmp_path, monkeypatch):
    """Planes decoded, converted and re-encoded by torch code (what runs on a GPU), here on the CPU."""
    import tracker.colour as colour
    from media import make_clip
    from tracker.prompts import ObjectPrompt
    from tracker.render import MaskZipReader
    from tracker.video import iter_frames, probe

    clip = make_clip(tmp_path / "clip.mp4", frames=8, width=160, height=120, rotation=90)
    prompt = ObjectPrompt(1, 3, [(60, 80)], [1])
    results = {}
    for name, on_device in (("swscale", False), ("device", True)):
        monkeypatch.setattr(colour, "colour_on_device", lambda device, on_device=on_device: on_device)
        results[name] = cpu_tracker.track(clip, [prompt], output=tmp_path / f"{name}.mp4",
                                          masks=tmp_path / f"{name}.zip")
    assert all(r.frames == 8 for r in results.values())
    assert probe(tmp_path / "device.mp4").frame_count == 8
    for a, b in zip(iter_frames(tmp_path / "swscale.mp4"), iter_frames(tmp_path / "device.mp4")):
        assert a.image.shape == b.image.shape == (120, 160, 3)
        difference = a.image.astype(int) - b.image  # the encoder's losses on inputs a level apart, untrained
        assert abs(difference.mean()) < 1  # masks' near-ties; never brightness
        assert np.abs(difference).mean() < 6
    with MaskZipReader(tmp_path / "swscale.zip") as a, MaskZipReader(tmp_path / "device.zip") as b:
        assert np.array_equal(a[3], b[3])  # the prompt frame: SAM's mask, stamped
        agreement = np.mean([np.mean(a[i] == b[i]) for i in range(8)])
    print(f"labels agree on {agreement:.1%} of pixels")
    assert agreement > 0.9


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))])
def colour_path_tracker(request, untrained_checkpoints, cpu_tracker, monkeypatch):
    """A tracker whose frames take the device's colour path: a GPU's own, or on the CPU the torch code that
    runs there."""
    import tracker.colour as colour
    from tracker.session import Tracker

    if request.param == "cpu":
        monkeypatch.setattr(colour, "colour_on_device", lambda device: True)
        return cpu_tracker
    return Tracker(untrained_checkpoints["sam"], untrained_checkpoints["xmem"], device="cuda", download=False)


def test_an_interlaced_video_is_tracked_into_an_interlaced_one(colour_path_tracker, tmp_path):
    """Planes read field by field, drawn, converted back field by field (on a GPU in the frame graphs) and
    coded as fields in the input's order, as bright as the input."""
    from media import make_clip
    from tracker.options import TrackOptions
    from tracker.prompts import ObjectPrompt
    from tracker.video import iter_frames, probe

    clip = make_clip(tmp_path / "interlaced.mp4", frames=6, x264_params="bff=1", audio=False)
    result = colour_path_tracker.track(clip, [ObjectPrompt(1, 0, [(80, 60)], [1])], output=tmp_path / "out.mp4",
                                       options=TrackOptions(alpha=0.0, outline=0))
    written = probe(tmp_path / "out.mp4")
    assert result.frames == written.frame_count == 6 and written.field_order == "bff"
    for a, b in zip(iter_frames(clip), iter_frames(tmp_path / "out.mp4")):
        assert abs(a.image.astype(float).mean() - b.image.mean()) < 1
        assert np.abs(a.image.astype(int) - b.image).mean() < 4


def test_a_recording_that_changes_size_midway_is_tracked_at_its_first_size(colour_path_tracker, tmp_path):
    """Joined segments: the planes of the first size and the scaled RGB frames of the second pass through the
    device's colour path in one run."""
    from media import make_joined_recording
    from tracker.prompts import ObjectPrompt
    from tracker.render import MaskZipReader
    from tracker.video import probe

    joined = make_joined_recording(tmp_path / "joined.ts", ((176, 144), (128, 96)), frames=6)
    result = colour_path_tracker.track(joined, [ObjectPrompt(1, 0, [(88, 72)], [1])], output=tmp_path / "out.mp4",
                                       masks=tmp_path / "masks.zip")
    assert result.frames == 12
    written = probe(tmp_path / "out.mp4")
    assert (written.frame_count, written.width, written.height) == (12, 176, 144)
    with MaskZipReader(tmp_path / "masks.zip") as masks:
        assert len(masks) == 12 and masks[11].shape == (144, 176)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_launch_pacer_keeps_the_loop_two_frames_ahead():
    from tracker.pipeline import LaunchPacer

    pace = LaunchPacer(torch.device("cuda"), lead=2)
    big = torch.randn(4096, 4096, device="cuda")
    first = None
    for step in range(6):
        pace()
        first = first or pace.events[0]
        big = big @ big / 64  # a frame's worth of queued work
        assert len(pace.events) <= 2
        if step == 2:
            assert first.query()  # the third frame waited for the first one
    assert not LaunchPacer(torch.device("cpu")).enabled


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_frame_graphs_replay_the_eager_conversions_labels_and_drawing(tmp_path):
    """The per-frame work around XMem, replayed from CUDA graphs, gives what it gives eagerly."""
    from media import make_clip
    from tracker.options import TrackOptions
    from tracker.pipeline import frame_graphs, labels_at
    from tracker.render import encoder_picture
    from tracker.video import iter_frames

    clip = make_clip(tmp_path / "clip.mp4", frames=6, width=160, height=120, rotation=90)
    cuda = torch.device("cuda")
    graphs = frame_graphs(cuda, TrackOptions())
    graphed, eager = FramePrep(cuda, (80, 60), graphs=graphs), FramePrep(cuda, (80, 60))
    lookup = torch.tensor([0, 4, 9], dtype=torch.uint8, device=cuda)
    generator = torch.Generator(cuda).manual_seed(0)
    for frame in iter_frames(clip, yuv=True):
        assert frame.yuv is not None
        image, net_input = graphed.prepare(frame)
        want_image, want_input = eager.prepare(frame)
        assert image.shape == (120, 160, 3) and net_input.shape == (3, 60, 80)
        assert torch.equal(image, want_image) and torch.equal(net_input, want_input)
        prob = torch.rand((3, 60, 80), device=cuda, generator=generator)
        labels = graphs.run("labels", (120, 160), lambda p, table: labels_at(p, (120, 160), table), [prob, lookup])
        assert torch.equal(labels, labels_at(prob, (120, 160), lookup))
        got = encoder_picture(image, labels, alpha=0.5, outline=2, graphs=graphs).result()
        want = encoder_picture(image, labels, alpha=0.5, outline=2).result()
        assert (got.width, got.height) == (want.width, want.height) == (160, 120)
        assert np.abs(got.planes.astype(int) - want.planes).max() <= 1
    assert graphs.captured == 3 and graphs.failures == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_tracking_on_cuda_writes_every_frame(untrained_checkpoints, tmp_path):
    """The whole GPU path (graphed frames and XMem, backward from a middle prompt, writers) end to end."""
    from media import make_clip
    from tracker.prompts import ObjectPrompt
    from tracker.render import MaskZipReader
    from tracker.session import Tracker
    from tracker.video import probe

    clip = make_clip(tmp_path / "clip.mp4", frames=24, width=176, height=144)
    tracker = Tracker(untrained_checkpoints["sam"], untrained_checkpoints["xmem"], device="cuda", download=False)
    prompt = ObjectPrompt(1, 9, [(88, 72)], [1])
    result = tracker.track(clip, [prompt], output=tmp_path / "out.mp4", masks=tmp_path / "masks.zip")
    assert result.frames == 24 and result.peak_gpu_bytes > 0
    assert probe(tmp_path / "out.mp4").frame_count == 24
    with MaskZipReader(tmp_path / "masks.zip") as masks:
        assert len(masks) == 24
        sam_mask = tracker.prompt_masks(probe(clip), [prompt])[9][1]
        assert np.array_equal(masks[9] == 1, sam_mask)  # the prompt frame keeps SAM's mask


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_warm_up_leaves_xmems_graphs_to_the_next_videos_of_its_size(untrained_checkpoints, tmp_path):
    """The warm-up's graphed XMem waits for a video of its working size, which captures no more network graphs
    and leaves it for the next; an error drops it (its graphs' memory goes)."""
    from media import make_clip
    from tracker.errors import Cancelled
    from tracker.options import TrackOptions
    from tracker.pipeline import IDLE_GRAPHS
    from tracker.prompts import ObjectPrompt
    from tracker.session import Tracker

    tracker = Tracker(untrained_checkpoints["sam"], untrained_checkpoints["xmem"], device="cuda", download=False)
    options = TrackOptions(size=144)
    IDLE_GRAPHS.clear()
    assert tracker.warm_up(options, frame_size=(176, 144)) > 0
    ((size, graphed),) = IDLE_GRAPHS._idle[tracker.xmem].values()
    count = graphed.graph_count
    assert size == (144, 176) and count >= 3
    clip = make_clip(tmp_path / "clip.mp4", frames=24, width=176, height=144)
    prompt = [ObjectPrompt(1, 0, [(88, 72)], [1])]
    for _ in range(2):
        assert tracker.track(clip, prompt, output=tmp_path / "out.mp4", options=options).frames == 24
        ((_, again),) = IDLE_GRAPHS._idle[tracker.xmem].values()
        assert again is graphed and graphed.graph_count == count

    def cancel(done: int, total: int) -> None:
        if done == 5:
            raise Cancelled("stop")

    with pytest.raises(Cancelled):
        tracker.track(clip, prompt, output=tmp_path / "out.mp4", options=options, progress=cancel)
    assert len(IDLE_GRAPHS) == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_cancel_that_keeps_the_frames_done_finishes_the_files_on_a_gpu(untrained_checkpoints, tmp_path):
    """On a GPU the labels and pictures come back to the writers asynchronously: a cancel that keeps the frames
    done (the page's) still finishes both files with exactly the frames written, and the next job runs whole."""
    from media import make_clip
    from tracker.options import TrackOptions
    from tracker.prompts import ObjectPrompt
    from tracker.render import MaskZipReader
    from tracker.session import Tracker
    from tracker.video import probe

    tracker = Tracker(untrained_checkpoints["sam"], untrained_checkpoints["xmem"], device="cuda", download=False)
    clip = make_clip(tmp_path / "clip.mp4", frames=24, width=176, height=144)
    prompt, options = [ObjectPrompt(1, 0, [(88, 72)], [1])], TrackOptions(size=144)
    cancel = threading.Event()

    def progress(done: int, total: int) -> None:
        if done == 10:
            cancel.set()

    result = tracker.track(clip, prompt, output=tmp_path / "out.mp4", masks=tmp_path / "out.zip", options=options,
                           cancel=cancel, progress=progress, keep_on_cancel=True)
    last = result.stopped_at
    assert last in (8, 9) and result.frames == last + 1
    assert probe(tmp_path / "out.mp4").frame_count == last + 1
    with MaskZipReader(tmp_path / "out.zip") as masks:
        assert masks.frames() == list(range(last + 1))
    again = tracker.track(clip, prompt, output=tmp_path / "again.mp4", options=options)
    assert again.frames == 24 and again.stopped_at is None


def test_warming_up_on_a_cpu_makes_the_inference_copy_the_first_video_would_wait_for(cpu_tracker):
    from XMem.model.winograd import WinogradConv
    from tracker.pipeline import _INFERENCE_COPIES

    copies = _INFERENCE_COPIES.setdefault(cpu_tracker.xmem, {})
    copies.pop(None, None)  # as in a fresh process (earlier tests' tracking made it)
    cpu_tracker.warm_up()
    fast = copies[None]
    assert sum(isinstance(module, WinogradConv) for module in fast.modules()) > 20
    cpu_tracker.warm_up()
    assert copies[None] is fast  # made once for the process


def test_precisions_per_device():
    from tracker.errors import TrackerError
    from tracker.options import TrackOptions
    from tracker.pipeline import resolve_precision, stepping_network

    cpu, network = torch.device("cpu"), torch.nn.Conv2d(3, 3, 3)
    assert resolve_precision(cpu, "auto") is None and resolve_precision(cpu, "fp32") is None
    assert resolve_precision(cpu, "bf16") is torch.bfloat16
    with pytest.raises(TrackerError, match="fp16 runs on CUDA GPUs only"):
        resolve_precision(cpu, "fp16")
    with pytest.raises(TrackerError, match="unknown precision"):
        resolve_precision(cpu, "int8")
    with stepping_network(network, cpu, TrackOptions(cuda_graphs=False), (8, 8)) as plain:
        assert plain is network  # the plain path stays as it is
    with stepping_network(network, cpu, TrackOptions(), (8, 8)) as fast:
        assert fast is not network and fast.weight.is_contiguous(memory_format=torch.channels_last)
        assert not hasattr(fast, "winograd_weight")  # 3 channels: too narrow for Winograd to pay
    with stepping_network(network, cpu, TrackOptions(precision="bf16"), (8, 8)) as fast:
        assert fast is not network and fast.weight.is_contiguous(memory_format=torch.channels_last)


def test_bf16_on_the_cpu_tracks_every_frame_and_keeps_the_prompt(cpu_tracker, tmp_path):
    """bf16 XMem on the CPU (mixed precision; the memory's similarity stays fp32) runs the whole video.

    Untrained weights give near-tie probabilities, so its masks are not compared with fp32's here.
    """
    from media import make_clip
    from tracker.errors import TrackerError
    from tracker.options import TrackOptions
    from tracker.prompts import ObjectPrompt
    from tracker.video import probe

    clip = make_clip(tmp_path / "clip.mp4", frames=8, width=96, height=64, audio=False)
    prompt = ObjectPrompt(1, 2, [(48, 32)], [1])
    frames = list(cpu_tracker.iter_tracked(clip, [prompt], TrackOptions(precision="bf16")))
    assert [f.index for f in frames] == list(range(8))
    sam_mask = cpu_tracker.prompt_masks(probe(clip), [prompt])[2][1]
    assert np.array_equal(frames[2].mask(1), sam_mask)
    with pytest.raises(TrackerError, match=r"object 2 is not tracked in this run \(its objects: 1\)"):
        frames[0].mask(2)  # a wrong id, not an object lost everywhere


def test_a_tracked_frames_mask_takes_object_ids_only():
    import torch

    from tracker.errors import TrackerError
    from tracker.pipeline import TrackedFrame

    labels = torch.tensor([[0, 1], [255, 1]], dtype=torch.uint8)
    frame = TrackedFrame(0, 0, 0.0, torch.zeros(2, 2, 3, dtype=torch.uint8), labels)
    assert frame.mask(1).tolist() == [[False, True], [False, True]] and frame.mask(255)[1, 0]
    assert repr(frame) == "TrackedFrame(index=0, pts=0, time=0.0)"  # printed in a loop, not a screen of pixels
    for bad, message in ((256, "object ids are 1 to 255 .0 is the background., not 256"), (-1, "not -1"),
                         (1.5, "an object id must be a whole number, not 1.5")):
        with pytest.raises(TrackerError, match=message):
            frame.mask(bad)
    tracked = TrackedFrame(0, 0, 0.0, frame.image, labels, frozenset({1, 3}))
    assert tracked.mask(3).sum() == 0 and tracked.mask(0).sum() == 1  # prompted later, or the background
    with pytest.raises(TrackerError, match=r"object 2 is not tracked in this run \(its objects: 1, 3\)"):
        tracked.mask(2)
