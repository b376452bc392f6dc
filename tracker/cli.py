"""`python -m tracker`: track a video from the command line, cut its objects out, list their boxes, manage
weights."""
from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import re
import signal
import sys
import threading
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

from .errors import Cancelled, TrackerError
from .options import (CUTOUT_KINDS, DEVICE_HELP, MAX_OUTLINE, PRECISION_CHOICES, SAM_BACKEND_CHOICES, MemoryOptions,
                      TrackOptions)
from .prompts import NEGATIVE, POSITIVE, ObjectPrompt, load_prompts, mask_objects, needs_sam, parse_box, parse_xy
from .video import (DEFAULT_PRESET, MASKS_ENDING, TRACKED_ENDING, X264_MAX_CRF, X264_PRESETS, VideoInfo, output_file,
                    remove_unfinished_temporaries, video_name, written_notes)

OUTPUT_DIR = Path("output")
COORDINATE_FLAGS = ("--point", "--negative", "--box")
NEGATIVE_NUMBER = re.compile(r"-[\d.]")


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)
    parser.add_argument("--sam-checkpoint", type=Path, help="SAM ViT-B checkpoint (default: models/, downloaded)")
    parser.add_argument("--xmem-checkpoint", type=Path, help="XMem checkpoint (default: models/, downloaded)")
    parser.add_argument("--sam-backend", default="auto", choices=SAM_BACKEND_CHOICES,
                        help="what runs SAM (auto: TensorRT on CUDA when its engines are built, ONNX Runtime on "
                             "the CPU when the graphs are exported, else PyTorch)")
    parser.add_argument("--sam-precision", default="auto", choices=["auto", "fp32", "fp16", "bf16"],
                        help="the PyTorch SAM encoder's precision (auto: fp16 on CUDA, fp32 on the CPU)")
    parser.add_argument("--precision", default="auto", choices=PRECISION_CHOICES,
                        help="XMem's precision: mixed bf16 on CUDA or the CPU, fp16 on CUDA (auto: fp32)")
    parser.add_argument("--no-download", action="store_true", help="fail instead of downloading missing weights")


class Parser(argparse.ArgumentParser):
    """Malformed flags are bad input like any other: one line `error: ...` and exit code 2, not the usage block."""

    def error(self, message: str, prog: str | None = None):
        self.exit(2, f"error: {message} (see {prog or self.prog} --help)\n")

    def parse_args(self, args=None, namespace=None):
        """As argparse's, but an unknown flag after a command points to that command's help, not the top's."""
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            command = getattr(parsed, "command", None)
            self.error(f"unrecognized arguments: {' '.join(extras)}", f"{self.prog} {command}" if command else None)
        return parsed


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="python -m tracker", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    # Also after the command (`track ... --debug`); SUPPRESS keeps a --debug given before it.
    after = argparse.ArgumentParser(add_help=False)
    after.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    commands = parser.add_subparsers(dest="command", required=True)

    track = commands.add_parser("track", parents=[after], help="track clicked objects through a video")
    track.add_argument("video", type=Path, help="the video to track (any format FFmpeg reads)")
    track.add_argument("--point", action="append", default=[], metavar="X,Y", help="a click on the object")
    track.add_argument("--negative", action="append", default=[], metavar="X,Y", help="a click on background")
    track.add_argument("--box", action="append", default=[], metavar="X0,Y0,X1,Y1", help="a box around the object")
    track.add_argument("--mask", type=Path, metavar="PICTURE", help="start from this mask instead of clicks: a "
                       "palettised PNG of object ids (a frame of a masks zip), or one object's matte, white on black")
    track.add_argument("--frame", type=int, help="frame the clicks or the mask are on (default 0)")
    track.add_argument("--prompts", type=Path, metavar="FILE.json", help="several objects (see README)")
    track.add_argument("--out", help="overlay video: .mp4, .mov, .mkv or .m4v (default "
                       "output/<name>_tracked.mp4; a folder: <name>_tracked.mp4 in it)")
    track.add_argument("--masks", metavar="ZIP", help="also write one palettised PNG per frame, zipped (a folder: "
                       "<name>_masks.zip in it)")
    track.add_argument("--keep-on-interrupt", action="store_true",
                       help="Ctrl-C (or SIGTERM, SIGHUP) stops at the next frame and keeps the frames tracked so far "
                            "in the outputs, as the app's Cancel does; a second one stops at once, writing nothing")
    track.add_argument("--no-video", action="store_true", help="write only the masks zip (--masks), no overlay "
                       "video: a dataset's evaluation, say")
    track.add_argument("--size", type=int, default=480, help="shorter side of the working resolution in pixels "
                       "(0: original; default 480; a smaller video is tracked at its own, never upscaled)")
    track.add_argument("--alpha", type=float, default=0.5, help="overlay opacity, 0 to 1 (default 0.5)")
    track.add_argument("--outline", type=int, default=2,
                       help=f"outline width in pixels, 0 (none) to {MAX_OUTLINE} (default 2)")
    track.add_argument("--crf", type=int, default=18, help=f"H.264 quality, 0 (lossless, which browsers cannot "
                       f"play) to {X264_MAX_CRF}; lower is better and larger (default 18)")
    track.add_argument("--preset", default=DEFAULT_PRESET, choices=X264_PRESETS,
                       help=f"libx264 preset (default {DEFAULT_PRESET}; slower presets make smaller files, "
                            "ultrafast encodes about twice as fast into larger ones)")
    track.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false",
                       help="run the plain XMem network eagerly instead of its fast copy "
                            "(folded, fused, channels-last) replaying CUDA graphs, or on the CPU in fp32 "
                            "with Winograd convolutions")
    defaults = MemoryOptions()
    for name in ("mem_every", "top_k", "min_mid_term_frames", "max_mid_term_frames", "num_prototypes",
                 "max_long_term_elements", "deep_update_every", "min_memory_area"):
        track.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(defaults, name),
                           help=f"XMem memory setting (default {getattr(defaults, name)})")
    add_model_flags(track)

    cut = commands.add_parser("cutout", parents=[after],
                              help="keep only chosen objects of a tracked video: on transparency (WebM or ProRes), "
                                   "on green, or as a black-and-white matte")
    cut.add_argument("video", type=Path, help="the video that was tracked")
    cut.add_argument("masks", type=Path, help="the masks zip its run wrote (track --masks)")
    cut.add_argument("--objects", metavar="ID,ID", help="the object ids to keep, as in 1,3 (default: all)")
    cut.add_argument("--kind", default="transparent", choices=list(CUTOUT_KINDS),
                     help="; ".join(f"{key}: {kind.label}" for key, kind in CUTOUT_KINDS.items())
                     + " (default transparent)")
    cut.add_argument("--out", help="the cut-out video (default output/<name>_<kind's file name>, as "
                     "output/clip_matte.mp4; a folder: that name in it)")

    boxes = commands.add_parser("boxes", parents=[after],
                                help="each object's bounding box and area on every frame of a masks zip, as CSV")
    boxes.add_argument("masks", type=Path, help="the masks zip a run wrote (track --masks)")
    boxes.add_argument("--out", help="the CSV file (default output/<name>_boxes.csv, <name> the zip's without "
                       "_masks; a folder: that name in it)")

    weights = commands.add_parser("weights", parents=[after], help="download or generate checkpoints")
    actions = weights.add_subparsers(dest="action", required=True)
    actions.add_parser("download", parents=[after],
                       help="fetch the official SAM ViT-B and XMem checkpoints into models/ (or "
                            "TRACKER_MODELS_DIR)")
    untrained = actions.add_parser("untrained", parents=[after],
                                   help="write untrained checkpoints in the official layouts")
    untrained.add_argument("directory", help="folder to write them to (created if missing)")
    untrained.add_argument("--force", action="store_true", help="replace files of their names there even where "
                           "they are not untrained checkpoints (an official or trained one, say)")

    # Listed for --help; main() hands its arguments to tracker.bench unparsed.
    commands.add_parser("bench", add_help=False, help="print the speed table (python -m tracker bench -h)")
    for choices in (commands, actions):  # a missing one is then named by its choices, not by its `dest`
        choices.metavar = "{" + ",".join(choices.choices) + "}"
    return parser


def prompts_from_args(args: argparse.Namespace) -> list[ObjectPrompt]:
    """The prompts file, the objects of a --mask picture, or one object from --point/--negative/--box; on
    --frame."""
    clicks = args.point or args.negative or args.box
    if sum(map(bool, (args.prompts, clicks, args.mask))) > 1:
        raise TrackerError("give one of --prompts, --mask or --point/--negative/--box")
    if args.prompts and args.frame is not None:
        raise TrackerError("--frame goes with --point/--negative/--box or --mask; a prompts file gives each "
                           'object\'s "frame" itself')
    if args.prompts:
        return load_prompts(args.prompts)
    if args.mask:
        return [ObjectPrompt(object_id, args.frame or 0, mask=mask) for object_id, mask in
                mask_objects(args.mask).items()]
    if len(args.box) > 1:
        raise TrackerError("give one --box: it boxes the one object tracked; a prompts file (--prompts) boxes "
                           "several objects")
    points = [parse_xy(p) for p in args.point] + [parse_xy(p, "negative point") for p in args.negative]
    labels = [POSITIVE] * len(args.point) + [NEGATIVE] * len(args.negative)
    box = parse_box(args.box[0]) if args.box else None
    return [ObjectPrompt(object_id=1, frame=args.frame or 0, points=points, labels=labels, box=box)]


def attach_negative_values(argv: Sequence[str]) -> list[str]:
    """`--point -5,20` as `--point=-5,20`: argparse takes "-5,20" for an option, and the click would
    not reach the prompt checks that say it is outside the frame."""
    attached: list[str] = []
    for arg in argv:
        if attached and attached[-1] in COORDINATE_FLAGS and NEGATIVE_NUMBER.match(arg):
            attached[-1] += f"={arg}"
        else:
            attached.append(arg)
    return attached


def check_before_loading(args: argparse.Namespace, prompts: list[ObjectPrompt], output: Path | None,
                         masks: Path | None) -> VideoInfo:
    """Refuse a bad video, prompt, output path or precision at once, not after the weights have loaded (10 s
    or more); the video's facts when all is well."""
    from .pipeline import resolve_precision
    from .sam import backend_dtype, resolve_device
    from .session import check_job

    info, _, _ = check_job(args.video, prompts, output, masks)
    device = resolve_device(args.device)
    resolve_precision(device, args.precision)
    backend_dtype(args.sam_precision, device, args.sam_backend)
    return info


# Measured on an H200 (720p): the first frame came 1.8 s after the call with Triton's cache filled, 12 to 17 s
# on a machine's first run.
GPU_START_NOTE = ("the first frame waits for the GPU to get ready (CUDA graphs, cuDNN's choices: about 2 s), and on "
                  "a machine's first run for Triton to build its kernels (15 to 30 s more; cached for later runs)")


def _track(args: argparse.Namespace, stop: StopRequest) -> int:
    from tqdm import tqdm

    from .session import SAM_NOT_USED, Tracker, option_warnings

    prompts = prompts_from_args(args)
    if args.no_video and (args.masks is None or args.out is not None):
        raise TrackerError("--no-video writes only the masks zip: give --masks, and no --out")
    output = None if args.no_video else (output_file(args.out, args.video, TRACKED_ENDING)
                                         or OUTPUT_DIR / f"{video_name(args.video)}{TRACKED_ENDING}")
    masks = output_file(args.masks, args.video, MASKS_ENDING)
    try:
        memory = MemoryOptions(**{name: getattr(args, name) for name in vars(MemoryOptions())
                                  if hasattr(args, name)})
    except TrackerError as exc:
        raise TrackerError(MemoryOptions.named(str(exc), lambda name: "--" + name.replace("_", "-"))) from None
    options = TrackOptions(size=args.size, memory=memory, alpha=args.alpha, outline=args.outline,
                           crf=args.crf, preset=args.preset, precision=args.precision,
                           cuda_graphs=args.cuda_graphs)
    info = check_before_loading(args, prompts, output, masks)
    say_replaced(output, masks)
    said = option_warnings(options, info, writes_video=output is not None)  # said now: a long run can be stopped
    for warning in said:
        print(f"WARNING: {warning}", file=sys.stderr)
    if output is not None:  # the writer says these as it opens the file
        said.extend(written_notes(info, "libx264"))
    tracker = Tracker(args.sam_checkpoint, args.xmem_checkpoint, device=args.device,
                      sam_backend=args.sam_backend, sam_precision=args.sam_precision, download=not args.no_download)
    sam = f"SAM backend {tracker.sam.name}" if needs_sam(prompts) else SAM_NOT_USED
    print(f"device {tracker.device_name}, {sam}", file=sys.stderr)
    if tracker.device.type == "cuda":
        print(GPU_START_NOTE, file=sys.stderr)
    if tracker.untrained:
        from .weights import UNTRAINED_WARNING
        print(f"WARNING: {UNTRAINED_WARNING}", file=sys.stderr)
        said.append(UNTRAINED_WARNING)  # not again at the end
    start = min(prompt.frame for prompt in prompts if not prompt.correct)
    corrected = sorted({prompt.frame for prompt in prompts if prompt.correct})
    # Frames before the first prompt are tracked backward first, then written with the rest; each corrected frame
    # is tracked again from on.
    passes = f"backward {start}, then writing {info.frame_count} frames" if start else \
        f"{info.frame_count} frames" if corrected else None
    if corrected:
        passes += f", then again from frame{'s' * (len(corrected) > 1)} {', '.join(map(str, corrected))} on"
    bar = tqdm(total=start + info.frame_count * (1 + len(corrected)), desc=passes, unit="frame", file=sys.stderr,
               dynamic_ncols=True)

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    cancel = stop.event
    with _signals_cancel(cancel, bar) if args.keep_on_interrupt else contextlib.nullcontext() as stopping:
        try:
            result = tracker.track(args.video, prompts, output=output, masks=masks, options=options,
                                   cancel=cancel, progress=progress, keep_on_cancel=args.keep_on_interrupt)
        except Cancelled:
            if stopping:  # stopped before a frame of its own: as without the flag
                raise Stopped(stopping[0]) from None
            if stop.signum is not None:  # the handler's `Stopped` was lost; its event stopped the run
                raise Stopped(stop.signum) from None
            raise
        finally:
            bar.close()
    print(result.summary())
    for path in (result.output, result.masks):
        if path is not None:
            print(f"wrote {path}")
    for warning in result.warnings:
        if warning not in said:
            print(f"WARNING: {warning}", file=sys.stderr)
    if result.stopped_at is None:
        return 0
    signum = stopping[0]
    print(f"interrupted ({signal.Signals(signum).name}): frames 0 to {result.stopped_at} were kept",
          file=sys.stderr)
    return 128 + signum


@contextlib.contextmanager
def _signals_cancel(cancel: threading.Event, bar) -> Iterator[list[int]]:
    """`--keep-on-interrupt`: the first Ctrl-C, SIGTERM or SIGHUP sets `cancel` (the run keeps the frames done), a
    second one stops at once as without the flag. Yields the signals received. A SIGINT that the shell ignores
    (a background `&` job) stays ignored."""
    received: list[int] = []

    def stop(signum, _frame):
        if received:
            raise Stopped(signum)
        received.append(signum)
        cancel.set()
        bar.write(f"{signal.Signals(signum).name}: stopping at the next frame, keeping the frames tracked "
                  "(again to stop at once, writing nothing)", file=sys.stderr)

    if threading.current_thread() is not threading.main_thread():
        yield received  # signal handlers can only be set from the main thread
        return
    names = [name for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name)
             and signal.getsignal(getattr(signal, name)) is not signal.SIG_IGN]
    previous = {name: signal.signal(getattr(signal, name), stop) for name in names}
    try:
        yield received
    finally:
        for name, handler in previous.items():
            signal.signal(getattr(signal, name), handler)


def object_ids(text: str) -> list[int]:
    """`--objects 1,3` as ids, each 1 to 255 (a masks zip's palette indices)."""
    try:
        ids = [int(part) for part in text.split(",")]
    except ValueError:
        ids = []
    if not ids or not all(1 <= i <= 255 for i in ids):
        raise TrackerError(f"--objects takes object ids from 1 to 255 separated by commas, as in 1,3; not {text!r}")
    return ids


def say_replaced(*outputs: str | Path | None) -> None:
    """Say on stderr, before the tracking, which outputs replace files already there (an earlier run's, or
    another video's of the same name): a run that should not can still be stopped."""
    for path in outputs:
        if path is not None and Path(path).is_file():
            print(f"replacing {path} (a file there from before)", file=sys.stderr)


def _cutout(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .exports import export_cutout

    kind = CUTOUT_KINDS[args.kind]
    ids = object_ids(args.objects) if args.objects is not None else range(1, 256)
    output = args.out if args.out is not None else OUTPUT_DIR / f"{video_name(args.video)}_{kind.filename}"
    # What the format cannot keep is said by the writer as it opens the file, before the first frame (a long
    # run can be stopped), once the video, the masks and the path are found fit.
    bars = []  # made at the first frame: a refusal before it is its one line

    def progress(done: int, total: int) -> None:
        if not bars:
            bars.append(tqdm(total=total, desc=f"{args.kind} cut-out", unit="frame", file=sys.stderr,
                             dynamic_ncols=True))
        bars[0].update(done - bars[0].n)

    replacing = Path(output).is_file()
    try:
        path = export_cutout(args.video, args.masks, ids, output, args.kind, progress=progress)
    finally:
        for bar in bars:
            bar.close()
    say_wrote(path, replacing)
    return 0


def _boxes(args: argparse.Namespace) -> int:
    from .exports import BOXES_ENDING, boxes_named_after, export_boxes

    output = args.out if args.out is not None else OUTPUT_DIR / f"{boxes_named_after(args.masks).stem}{BOXES_ENDING}"
    replacing = Path(output).is_file()
    say_wrote(export_boxes(args.masks, output), replacing)
    return 0


def say_wrote(path: Path, replacing: bool) -> None:
    """The file an export wrote, and whether it replaced one there (said once it is done: a refused export
    replaces nothing)."""
    print(f"wrote {path}" + (" (replacing the file there from before)" if replacing else ""))


def _weights(args: argparse.Namespace) -> int:
    from . import weights

    if args.action == "download":
        for path in weights.download_all(progress=True).values():
            print(f"ok {path}")
    else:
        there = {path for path in weights.untrained_paths(args.directory).values() if path.exists()}
        for path in weights.write_untrained(args.directory, force=args.force).values():
            print(f"{'replaced' if path in there else 'wrote'} {path} (UNTRAINED: for tests and offline demos only)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((i for i, arg in enumerate(argv) if not arg.startswith("-")), None)
    if command is not None and argv[command] == "bench":  # also after --debug, which bench does not need
        from .bench import main as bench_main

        return bench_main(argv[command + 1:])
    args = build_parser().parse_args(attach_negative_values(argv))
    # The library's warnings printed as the command's own are ("WARNING: ..."), not bare; a program that
    # configured logging itself keeps its own.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    from tqdm.contrib.logging import logging_redirect_tqdm

    stop = StopRequest()
    commands = {"track": functools.partial(_track, stop=stop), "cutout": _cutout, "boxes": _boxes,
                "weights": _weights}
    try:
        # A warning said while a progress bar is drawn goes on a line of its own above it.
        with _stopping_signals_interrupt(stop), logging_redirect_tqdm():
            return commands[args.command](args)
    except TrackerError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        remove_unfinished_temporaries()
        signum = exc.signum if isinstance(exc, Stopped) else signal.SIGINT
        # A download keeps what it fetched (its .part file) for the next run to resume from.
        left = ("the part already downloaded is kept; run it again to resume"
                if args.command == "weights" and args.action == "download" else "nothing was written")
        print(f"interrupted ({signal.Signals(signum).name}): {left}", file=sys.stderr)
        return 128 + signum


class Stopped(KeyboardInterrupt):
    """Ctrl-C, SIGTERM or SIGHUP (`kill`, `timeout`, `docker stop`, a closed terminal)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@dataclass
class StopRequest:
    """A stopping signal received while a command runs.

    Its handler raises `Stopped` and sets `event` too, the run's cancel: an
    exception raised in Python code that C code called is lost where that
    code clears errors, and the run then stops at its next frame anyway.
    """

    event: threading.Event = field(default_factory=threading.Event)
    signum: int | None = None


@contextlib.contextmanager
def _stopping_signals_interrupt(request: StopRequest):
    """While a command runs, Ctrl-C, SIGTERM and SIGHUP raise `Stopped` (and set `request`), so its clean-up
    runs. A SIGINT that the shell ignores (a background `&` job) stays ignored."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return
    names = [name for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name)
             and signal.getsignal(getattr(signal, name)) is not signal.SIG_IGN]

    def stop(signum, _frame):
        request.signum = signum
        request.event.set()
        raise Stopped(signum)

    previous = {name: signal.signal(getattr(signal, name), stop) for name in names}
    try:
        yield
    finally:
        for name, handler in previous.items():
            signal.signal(getattr(signal, name), handler)
