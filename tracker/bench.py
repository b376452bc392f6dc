"""`python -m tracker bench`: how fast each stage runs, on the plain fp32 path and (on CUDA) the fast ones.

Speed does not depend on training, so the benchmark writes untrained weights in
the official layouts and its own synthetic H.264 clips (with audio). Warm-up
runs are excluded, CUDA is synchronised around every timed call, and each
figure is a median.
"""
from __future__ import annotations

import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import av
import numpy as np
import psutil
import torch

from XMem.inference.inference_core import InferenceCore

from .cli import Parser
from .errors import TrackerError
from .options import DEVICE_HELP, SAM_BACKEND_CHOICES, MemoryOptions, TrackOptions
from .pipeline import (IDLE_GRAPHS, FramePrep, ThreadedSink, autocast_for, cpu_has_bf16, frame_graphs, prefetch,
                       stepping_network)
from .prompts import ObjectPrompt
from .render import encoder_picture, encoder_picture_bytes
from .sam import TorchSam, resolve_device
from .session import Tracker
from .video import VideoInfo, VideoWriter, iter_frames, make_clip, probe
from .weights import untrained_paths


@dataclass(frozen=True)
class Mode:
    """One column of the table: how SAM's encoder and XMem run."""

    label: str
    sam_precision: str  # the PyTorch SAM encoder's autocast type ("auto": fp16 on CUDA)
    sam_graphs: bool  # SAM's encoder and decoder replay CUDA graphs
    options: TrackOptions  # XMem's precision and CUDA graphs, the encoder preset


# The plain fp32 path (eager PyTorch everywhere, as the reference runs), the default, then XMem in half precision.
MODES = {
    "plain": Mode("plain fp32", "fp32", False, TrackOptions(precision="fp32", cuda_graphs=False)),
    "fast": Mode("fast (default)", "auto", True, TrackOptions()),
    "bf16": Mode("fast, bf16 XMem", "auto", True, TrackOptions(precision="bf16")),
    "fp16": Mode("fast, fp16 XMem", "auto", True, TrackOptions(precision="fp16")),
}
WARMUP_FRAMES = 30  # file-to-file rates count the frames after these (graph capture, cuDNN's algorithm search)


@dataclass
class Profile:
    """Sizes and counts for one benchmark run."""

    frame_sizes: dict[str, tuple[int, int]]  # name -> (width, height) of the generated clips
    clip_frames: int
    work_size: int  # shorter side of XMem's working resolution
    repeats: int  # timed calls for the SAM figures
    xmem_steps: int
    rounds: int = 1  # file-to-file runs of each clip, each beside its own decode + encode runs
    warmup: int = 2  # untimed calls before the SAM figures
    smoke: bool = False  # a quick run: its figures measure nothing

    @classmethod
    def for_device(cls, device: torch.device, frames: int | None, quick: bool = False,
                   rounds: int | None = None) -> "Profile":
        """The sizes to measure on `device`; `quick`: one timed call of each, a smoke test that measures nothing."""
        if quick:
            return cls({"240p": (426, 240)}, frames or 6, 240, 1, 3, rounds or 1, warmup=0, smoke=True)
        if device.type == "cuda":
            return cls({"720p": (1280, 720), "1080p": (1920, 1080)}, frames or 400, 480, 50, 200, rounds or 3)
        return cls({"240p": (426, 240)}, frames or 60, 240, 3, 30, rounds or 1)


@dataclass
class Results:
    rows: dict[str, dict[str, str]] = field(default_factory=dict)  # measure -> mode -> value

    def add(self, measure: str, mode: str, value: str) -> None:
        self.rows.setdefault(measure, {})[mode] = value

    def table(self, modes: list[str]) -> str:
        lines = ["| measure | " + " | ".join(modes) + " |", "|---" * (len(modes) + 1) + "|"]
        for measure, values in self.rows.items():
            lines.append(f"| {measure} | " + " | ".join(values.get(m, "") for m in modes) + " |")
        return "\n".join(lines)


def median_ms(call: Callable[[], object], repeats: int, device: torch.device, warmup: int = 2) -> float:
    """Median wall time of `call` in milliseconds, CUDA synchronised, warm-up excluded."""
    for _ in range(warmup):
        call()
    times = []
    for _ in range(repeats):
        _sync(device)
        began = time.perf_counter()
        call()
        _sync(device)
        times.append((time.perf_counter() - began) * 1000)
    return statistics.median(times)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def warmup_frames(frame_count: int) -> int:
    """The frames a steady rate leaves out: WARMUP_FRAMES, or a third of a shorter clip."""
    return min(WARMUP_FRAMES, frame_count // 3)


def clip_prompt(info: VideoInfo) -> ObjectPrompt:
    """A click on the disc that `make_clip` draws, on the first frame."""
    return ObjectPrompt(1, 0, [(info.width * 0.2, info.height / 2)], [1])


class SteadyRate:
    """A progress callback that starts a clock after the warm-up frames; `finish` stops it when the file is done.

    The clock runs until the output is complete, not until the tracking loop
    ends: the frames still queued for the encoder then (up to 64) belong to
    the run, and the loop's own rate read up to a fifth higher than the file's.
    """

    def __init__(self, frame_count: int):
        self.warmup = warmup_frames(frame_count)
        self.began: float | None = None
        self.ended = 0.0
        self.frames = 0

    def __call__(self, done: int, total: int) -> None:
        if done == self.warmup:
            self.began = time.perf_counter()

    def finish(self, frames: int) -> None:
        """The output is complete, with `frames` frames."""
        self.ended, self.frames = time.perf_counter(), frames - self.warmup

    @property
    def fps(self) -> float:
        return self.frames / (self.ended - self.began) if self.began is not None and self.frames > 0 else 0.0


def bench_sam(tracker: Tracker, width: int, height: int, profile: Profile, results: Results, mode: str) -> None:
    image = np.random.default_rng(1).integers(0, 255, (height, width, 3), dtype=np.uint8)
    last = {}  # the latest embedding, for the decoder (a quick run embeds only once)
    encode = median_ms(lambda: last.update(embedding=tracker.sam.embed(image)), profile.repeats, tracker.device,
                       profile.warmup)
    results.add("SAM encoder ms (1024x1024 input)", mode, f"{encode:.1f}")
    click = ObjectPrompt(1, 0, [(width / 2, height / 2)], [1])
    decode = median_ms(lambda: tracker.segment(last["embedding"], click), profile.repeats * 4, tracker.device,
                       profile.warmup)
    results.add("SAM decoder ms per click", mode, f"{decode:.2f}")


def bench_xmem(tracker: Tracker, profile: Profile, objects: int, options: TrackOptions, results: Results,
               mode: str) -> None:
    """Median time of one XMem step at the working resolution (a 16:9 frame)."""
    width = round(profile.work_size * 16 / 9)
    prep = FramePrep(tracker.device, (width, profile.work_size))
    generator = torch.Generator().manual_seed(0)
    frames = [prep.normalise(torch.randint(0, 255, (profile.work_size, width, 3), generator=generator,
                                           dtype=torch.uint8).to(tracker.device)) for _ in range(8)]
    mask = torch.zeros(objects, profile.work_size, width, device=tracker.device)
    for k in range(objects):
        mask[k, :, k * width // objects:(k + 1) * width // objects] = 1
    times = []
    with torch.inference_mode(), autocast_for(tracker.device, options.precision), \
            stepping_network(tracker.xmem, tracker.device, options, (profile.work_size, width)) as network:
        core = InferenceCore(network, MemoryOptions().xmem_config(tracker.xmem))
        core.set_all_labels(list(range(1, objects + 1)))
        core.step(frames[0], mask)
        for i in range(profile.xmem_steps):
            _sync(tracker.device)
            began = time.perf_counter()
            core.step(frames[i % len(frames)])
            _sync(tracker.device)
            times.append((time.perf_counter() - began) * 1000)
    skip = min(10, len(times) // 5)  # warm-up (none in a quick run)
    results.add(f"XMem step ms, {objects} object{'s' * (objects > 1)} at {profile.work_size}p", mode,
                f"{statistics.median(times[skip:]):.2f}")


@dataclass
class FileRun:
    whole_fps: float
    steady_fps: float  # after the warm-up frames, until the file is complete
    peak_gpu_bytes: int | None
    output: Path


def track_file(tracker: Tracker, clip: Path, output: Path, profile: Profile, options: TrackOptions) -> FileRun:
    """Decode, SAM on frame 0, XMem, render, encode with audio: the app's and the CLI's path."""
    info = probe(clip)
    prompt = clip_prompt(info)
    rate = SteadyRate(info.frame_count)
    result = tracker.track(clip, [prompt], output=output, options=replace(options, size=profile.work_size),
                           progress=rate)
    rate.finish(result.frames)
    return FileRun(result.fps, rate.fps, result.peak_gpu_bytes, output)


def track_without_encoding(tracker: Tracker, clip: Path, profile: Profile, options: TrackOptions) -> float:
    """`track_file` with every picture drawn and downloaded as for the encoder, but not encoded: the rate
    that the rest of the pipeline (decode, model, drawing, transfers) sustains (after the warm-up frames)."""
    info = probe(clip)
    prompt = clip_prompt(info)
    options = replace(options, size=profile.work_size)
    graphs = frame_graphs(tracker.device, options)
    sink = ThreadedSink("discard", lambda *item: None, lambda: None, lambda: None,
                        item_bytes=encoder_picture_bytes(tracker.device, info.width, info.height))
    rate = SteadyRate(info.frame_count)
    done = 0
    for done, tracked in enumerate(tracker.iter_tracked(clip, [prompt], options, progress=rate), 1):
        sink.put(encoder_picture(tracked.image, tracked.labels, alpha=options.alpha, outline=options.outline,
                                 graphs=graphs), tracked.pts, tracked.time)
    sink.close()
    rate.finish(done)
    return rate.fps


def decode_encode_fps(clip: Path, device: torch.device, output: Path) -> float:
    """Decode + encode alone, through the pipeline's own transfers and conversions but no model: the most
    the full pipeline can reach with `clip`'s pictures (after the warm-up frames, until the file is complete)."""
    info = probe(clip)
    graphs = frame_graphs(device, TrackOptions())
    prep = FramePrep(device, (info.width, info.height), graphs=graphs)
    writer = VideoWriter(output, info, audio_from=clip)
    sink = ThreadedSink("encode", writer.write, writer.close, writer.abort,
                        item_bytes=encoder_picture_bytes(device, info.width, info.height))
    rate = SteadyRate(info.frame_count)
    frames = prefetch(iter_frames(clip, yuv=prep.planes), depth=4, stop=threading.Event(), stage=prep.stage)
    done = 0
    for done, frame in enumerate(frames, 1):
        image, _ = prep.prepare(frame)
        sink.put(encoder_picture(image, graphs=graphs), frame.pts, frame.time)
        rate(done, info.frame_count)
    sink.close()
    rate.finish(done)
    return rate.fps


def bench_clip(tracker: Tracker, clip: Path, name: str, profile: Profile, options: TrackOptions, results: Results,
               mode: str, out_dir: Path) -> None:
    """File-to-file FPS on one clip, each run between decode + encode alone of the clip and of its own output.

    A machine's CPUs (which the codecs need) are not equally fast all the
    time, so the pipeline's share of decode + encode alone comes from runs
    side by side: the median of the rounds' shares. The first round starts
    without graphs that earlier videos left (a first video); later rounds
    take them over (the next video of the same size).
    """
    IDLE_GRAPHS.clear()
    warmup = warmup_frames(profile.clip_frames)
    runs, ceilings, own_ceilings, unencoded = [], [], [], []
    for round_ in range(profile.rounds):
        ceilings.append(decode_encode_fps(clip, tracker.device, out_dir / f"{name}_copy.mp4"))
        runs.append(track_file(tracker, clip, out_dir / f"{name}_{mode}_{round_}.mp4", profile, options))
        # What the run's own pictures cost the codecs: masks drawn over the clip can take libx264
        # much longer than the clip itself (untrained weights draw many ragged shapes).
        own_ceilings.append(decode_encode_fps(runs[-1].output, tracker.device, out_dir / f"{name}_copy.mp4"))
        unencoded.append(track_without_encoding(tracker, clip, profile, options))
    median = statistics.median
    results.add(f"file to file FPS, {name} in and out: whole run, first video", mode, f"{runs[0].whole_fps:.1f}")
    if profile.rounds > 1:
        results.add(f"file to file FPS, {name} in and out: whole run, next videos", mode,
                    f"{median(run.whole_fps for run in runs[1:]):.1f}")
    results.add(f"file to file FPS, {name} in and out: after {warmup} frames", mode,
                f"{median(run.steady_fps for run in runs):.1f}")
    results.add(f"decode + encode only FPS, {name}: clip / own output (after {warmup} frames)", mode,
                f"{median(ceilings):.1f} / {median(own_ceilings):.1f}")
    shares = [(run.steady_fps / clip_fps, run.steady_fps / own_fps)
              for run, clip_fps, own_fps in zip(runs, ceilings, own_ceilings) if clip_fps and own_fps]
    if shares:
        results.add(f"file to file as a share of decode + encode only, {name}: clip / own output", mode,
                    f"{median(a for a, _ in shares):.0%} / {median(b for _, b in shares):.0%}")
    results.add(f"file to file without the encoder FPS, {name} (after {warmup} frames)", mode,
                f"{median(unencoded):.1f}")
    peaks = [run.peak_gpu_bytes for run in runs if run.peak_gpu_bytes is not None]
    if peaks:
        results.add(f"peak GPU memory GiB, {name}", mode, f"{max(peaks) / 2**30:.2f}")


def bench_long(tracker: Tracker, clip: Path, profile: Profile, out_dir: Path, results: Results) -> None:
    """Memory stays flat with video length: RSS and GPU memory at a tenth of the video and at its end."""
    info = probe(clip)
    early = max(1, info.frame_count // 10)
    process = psutil.Process()
    samples: dict[str, tuple[float, float]] = {}
    cuda = tracker.device.type == "cuda"

    def sample(done: int, total: int) -> None:
        if done in (early, total):
            gpu = torch.cuda.max_memory_allocated(tracker.device) / 2**30 if cuda else 0.0
            samples["early" if done == early else "end"] = (process.memory_info().rss / 2**30, gpu)

    prompt = clip_prompt(info)
    result = tracker.track(clip, [prompt], output=out_dir / "long.mp4", masks=out_dir / "long.zip",
                           options=TrackOptions(size=profile.work_size), progress=sample)
    name = f"{info.frame_count} frames, {info.height}p"
    results.add(f"long video ({name}): file to file FPS", "value", f"{result.fps:.1f}")
    results.add(f"RSS GiB at frame {early} / at the end", "value",
                f"{samples['early'][0]:.2f} / {samples['end'][0]:.2f}")
    if cuda:
        results.add(f"peak GPU memory GiB by frame {early} / by the end", "value",
                    f"{samples['early'][1]:.3f} / {samples['end'][1]:.3f}")
    results.add("peak RSS GiB (whole run)", "value",
                f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f}")


def run_long(device: torch.device, frames: int) -> str:
    profile = Profile.for_device(device, frames, rounds=1)
    width, height = next(iter(profile.frame_sizes.values()))
    results = Results()
    with tempfile.TemporaryDirectory(prefix="tracker-bench-") as tmp:
        tmp = Path(tmp)
        checkpoints = _untrained_checkpoints(tmp / "weights")
        tracker = Tracker(checkpoints["sam"], checkpoints["xmem"], device=str(device), download=False)
        bench_long(tracker, make_clip(tmp / "long_in.mp4", width, height, frames), profile, tmp, results)
    return _header(device, profile) + "\n\n" + results.table(["value"])


def _untrained_checkpoints(directory: Path) -> dict[str, Path]:
    """Write them in a child process, so that building them does not count in this process's peak RSS."""
    subprocess.run([sys.executable, "-m", "tracker", "weights", "untrained", str(directory)], check=True,
                   stdout=subprocess.DEVNULL)
    return untrained_paths(directory)


def _header(device: torch.device, profile: Profile) -> str:
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    options = TrackOptions()
    rounds = (f"file to file: medians of {profile.rounds} rounds, each run beside decode + encode alone of the clip "
              f"and of the run's own output, shares taken round by round; a first video starts without kept graphs, "
              f"next videos are rounds 2-{profile.rounds}" if profile.rounds > 1
              else "file to file: one run of each clip, a first video")
    return (f"device: {gpu}, {torch.get_num_threads()} CPU threads, torch {torch.__version__}, "
            f"PyAV {av.__version__}; working resolution {profile.work_size}p; {profile.clip_frames}-frame clips; "
            f"libx264 {options.preset} crf {options.crf}; untrained weights (speed only); {rounds}; "
            + ("SMOKE TEST, one call each: these figures measure nothing" if profile.smoke else "medians"))


def usable_modes(device: torch.device, names: list[str]) -> list[str]:
    """The modes of `names` that `device` runs: a CPU runs plain and fast, and bf16 where it has bf16 instructions."""
    if device.type == "cuda":
        return names
    cpu_modes = ["plain", "fast", "bf16"] if cpu_has_bf16() else ["plain", "fast"]
    usable = [name for name in names if name in cpu_modes]
    if not usable:
        raise TrackerError(f"--modes {','.join(names)} run on CUDA only; on this CPU: {', '.join(cpu_modes)}")
    return usable


def run(tracker_device: torch.device, frames: int | None, sam_backend: str, mode_names: list[str],
        quick: bool = False, rounds: int | None = None) -> str:
    profile = Profile.for_device(tracker_device, frames, quick, rounds)
    modes = {MODES[name].label: MODES[name] for name in usable_modes(tracker_device, mode_names)}
    results = Results()
    with tempfile.TemporaryDirectory(prefix="tracker-bench-") as tmp:
        tmp = Path(tmp)
        checkpoints = _untrained_checkpoints(tmp / "weights")
        clips = {name: make_clip(tmp / f"{name}.mp4", w, h, profile.clip_frames)
                 for name, (w, h) in profile.frame_sizes.items()}
        first = next(iter(modes))
        for mode, setting in modes.items():
            tracker = Tracker(checkpoints["sam"], checkpoints["xmem"], device=str(tracker_device),
                              sam_backend=sam_backend, sam_precision=setting.sam_precision, download=False)
            if isinstance(tracker.sam, TorchSam):
                tracker.sam.cuda_graphs = tracker.sam.cuda_graphs and setting.sam_graphs
                results.add("SAM backend, encoder precision", mode, f"torch, {_short(tracker.sam.dtype)}")
            else:
                results.add("SAM backend, encoder precision", mode, tracker.sam.name)
            w, h = next(iter(profile.frame_sizes.values()))
            bench_sam(tracker, w, h, profile, results, mode)
            for objects in (1, 3):
                bench_xmem(tracker, profile, objects, setting.options, results, mode)
            for name, clip in clips.items():
                bench_clip(tracker, clip, name, profile, setting.options, results, mode, tmp)
            del tracker
            IDLE_GRAPHS.clear()
        results.add("peak RSS GiB (whole run)", first,
                    f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f}")
    return _header(tracker_device, profile) + "\n\n" + results.table(list(modes))


def _short(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="python -m tracker bench", description=__doc__)
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)
    parser.add_argument("--frames", type=int,
                        help="frames per generated clip (default 400 on GPU, 60 on CPU, 6 with --quick)")
    parser.add_argument("--sam-backend", default="auto", choices=SAM_BACKEND_CHOICES)
    parser.add_argument("--modes", default=",".join(MODES),
                        help=f"table columns, comma-separated, of: {', '.join(MODES)} (CPU: plain, fast, and bf16 "
                             "where the CPU has bf16 instructions)")
    parser.add_argument("--rounds", type=int,
                        help="file-to-file runs of each clip, each beside decode + encode alone (default 3 on GPU, "
                             "1 on CPU)")
    parser.add_argument("--long", type=int, metavar="FRAMES",
                        help="instead: track one long clip and report memory early and at the end")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke test: small clips, one timed call each, nothing worth quoting")
    args = parser.parse_args(argv)
    names = [name.strip() for name in args.modes.split(",") if name.strip()]
    if not names or any(name not in MODES for name in names):
        parser.error(f"--modes takes a comma-separated list of: {', '.join(MODES)}")
    try:
        device = resolve_device(args.device)
        usable_modes(device, names)
    except TrackerError as exc:
        parser.error(str(exc))
    for flag, value, least in (("--rounds", args.rounds, 1), ("--frames", args.frames, 3), ("--long", args.long, 10)):
        if value is not None and value < least:
            parser.error(f"{flag} takes a whole number of at least {least}")
    print(run_long(device, args.long) if args.long is not None
          else run(device, args.frames, args.sam_backend, names, args.quick, args.rounds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
