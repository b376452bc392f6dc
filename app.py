"""Web app: upload a video, click the objects, track them, download the results.

`python app.py` serves on http://127.0.0.1:7860. This file is the page layout
and its event wiring only; editing state and logic live in
`tracker.interactive`, tracking in the `Tracker` the CLI uses too.
"""
from __future__ import annotations

import argparse
import errno
import functools
import html
import json
import logging
import math
import os
import signal
import socket
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Callable, Sequence

import gradio as gr
from gradio.route_utils import delete_files_created_by_app
from gradio.utils import get_upload_folder

from tracker.cli import Parser, add_model_flags
from tracker.errors import Cancelled, ClickDropped, TrackerError
from tracker.exports import CUTOUT_KINDS
from tracker.interactive import (LIVE_SECONDS, TRIMMED_UPLOAD, VIDEO_SUFFIXES, EditSession, Limits, SessionStore,
                                 Style, frame_caption, oversize_message, untyped_file_message, upload_message)
from tracker.options import MemoryOptions, TrackOptions
from tracker.pipeline import resolve_precision
from tracker.render import overlay_colours
from tracker.session import Tracker
from tracker.video import X264_MAX_CRF, X264_PRESETS, colour_note, truncation_note
from tracker.weights import UNTRAINED_WARNING

log = logging.getLogger("tracker.app")

MODES = [("Positive point (object)", "positive"), ("Negative point (background)", "negative"),
         ("Box (click two corners)", "box")]
# The memory settings as the Settings panel names them (their errors quote these, not the code's names).
MEMORY_LABELS = {"mem_every": "Memory interval (frames between memory updates)",
                 "top_k": "Top-k memory matches per pixel",
                 "min_mid_term_frames": "Working memory: frames kept after a consolidation",
                 "max_mid_term_frames": "Working memory: frames before consolidation",
                 "num_prototypes": "Long-term prototypes per consolidation",
                 "max_long_term_elements": "Long-term memory size (elements)",
                 "min_memory_area": "Occlusion shortcut: no memory update while an object covers fewer pixels "
                                    "than this (0 = off, as in XMem)"}
HELP = """**1.** Upload a video. **2.** Click the object (the mask updates after every click; from the
keyboard, Tab to the picture, move its marker with the arrow keys and press Enter); use *Add object* for
more. **3.** Press **Track**. **4.** To correct, move to a frame where a mask is wrong, click there and
press **Track** again: earlier frames keep their result."""
# Track jobs that may be in their handlers at once. They take turns on the device in the tracker's own lock,
# whose wait a Cancel ends at once; a job held in Gradio's queue (the ninth) could not be cancelled there.
TRACK_JOBS = 8
CLICKS_NEED_A_POINT = ("Clicks need a point on the picture: click it with the mouse or tap it; from the keyboard, "
                       "Tab to the picture, move its marker with the arrow keys and press Enter; or load them from a "
                       "prompts file (Load clicks from a prompts file)")
NOTHING_CHANGED = ("Nothing changed since the last run (same clicks, objects and settings): its result below is "
                   "current. Tick \"Full re-run\" to track again anyway.")
CSS = """
#frame-image .key-marker { position: absolute; width: 18px; height: 18px; margin: -9px 0 0 -9px; border-radius: 50%;
  border: 2px solid #fff; box-shadow: 0 0 0 2px #000, inset 0 0 0 2px #000; pointer-events: none;
  color: transparent; overflow: hidden; white-space: nowrap; font-size: 1px; }
#frame-image img { cursor: crosshair; width: auto; max-width: 100%; max-height: max(240px, calc(100vh - 520px)); }
h1 { margin-bottom: 0 !important; }
#untrained-banner { background: #b91c1c; color: #fff; padding: 6px 14px; border-radius: 6px; font-weight: 600; }
.swatch { display: inline-block; width: 0.9em; height: 0.9em; border-radius: 2px; margin: 0 0.3em 0 0.8em;
          vertical-align: -0.1em; border: 1px solid #0004; }
.legend .current { font-weight: 700; text-decoration: underline; }
#result-files .label-clear-button { display: none; }
#result-video video { max-height: min(75vh, 720px); }  /* a portrait video fits the window */
#video-input .no-preview { position: absolute; inset: 35% 8% auto 8%; text-align: center; font-size: 0.95em;
                           color: var(--body-text-color-subdued); pointer-events: none; }
#video-input .refused-file { padding: 4px 10px 8px; font-size: 0.95em; color: var(--error-text-color, #b91c1c); }
"""

# Browsers play MP4/WebM, not AVI, WMV, FLV or MPEG-PS: the app reads those anyway, so the player's failure is a
# note under it, not Gradio's red "Video not playable" error (its handler on the element never sees the event);
# other failures (the network, say) still reach it. A file the browser does not type as a video (an audio file, a
# picture, MPEG-TS that Chromium takes for text) the widget drops without a word: a note names it.
NO_PREVIEW_JS = """
() => {
  // What happens in the browser alone goes to the server, which says it in the status line.
  const report = (note) => {
    const box = document.querySelector("#browser-note textarea");
    box.value = JSON.stringify({...note, at: Date.now()});
    box.dispatchEvent(new Event("input", {bubbles: true}));
  };
  const noteRefused = (box, file) => {
    box.querySelector(".refused-file")?.remove();
    if (!file || file.type.startsWith("video/")) return;
    const line = document.createElement("div");
    line.className = "refused-file";
    line.textContent = `${file.name} was not taken: the browser reads it as ${file.type || "an unknown type"}, ` +
      "not as a video. Choose a video file (an MPEG-TS .ts file goes in renamed .m2ts).";
    box.append(line);
    report({kind: "not a video", name: file.name, type: file.type});
  };
  const UPLOAD_BUTTONS = ["load-prompts", "load-mask"];  // the prompts file's takes its mask pictures with it
  // A video, a prompts file or a mask picture over the upload limit (--max-upload-mb) is kept from its widget, whose
  // refusal is a toast in Kb that leaves the status line as it was: the server is told its name and size, and says
  // what to do in the status.
  const overLimit = (event, file, kind) => {
    const limit = window.gradio_config?.max_file_size;
    if (!file || !limit || file.size <= limit) return false;
    event.stopPropagation();
    event.preventDefault();
    report({name: file.name, size: file.size, kind});
    return true;
  };
  // The picture from the keyboard: once it has the focus, the arrow keys move a marker over it (with Shift ten
  // times as far) and Enter or Space clicks where it is, as the mouse would (the widget's own click handler reads
  // the point, so clicks go the same way). The marker's place is said to screen readers.
  let marked = [0.5, 0.5];  // the marker's place, as fractions of the picture's width and height
  const pictureOf = (target) => target instanceof HTMLButtonElement && target.closest("#frame-image") ?
    target.querySelector("img") : null;
  // Where a click for the marker goes: a mouse event's coordinates are whole CSS pixels, which the widget's click
  // handler takes to the nearest picture pixel (its scale and centring reckoned as it does); held inside the
  // picture, so that its last rows and columns take clicks too. Returns the client point and that picture pixel.
  const aim = (img) => {
    const rect = img.getBoundingClientRect();
    const scale = Math.min(rect.width / img.naturalWidth, rect.height / img.naturalHeight, 1);
    const axis = (start, size, fraction) => {
      const lowest = Math.ceil(start - 0.5 * scale), highest = Math.ceil(start + (size - 0.5) * scale) - 1;
      const client = Math.min(highest, Math.max(lowest, Math.round(start + fraction * (size - 1) * scale)));
      return [client, Math.max(0, Math.round((client - start) / scale))];
    };
    const [clientX, x] = axis(rect.left + (rect.width - img.naturalWidth * scale) / 2, img.naturalWidth, marked[0]);
    const [clientY, y] = axis(rect.top + (rect.height - img.naturalHeight * scale) / 2, img.naturalHeight,
                              marked[1]);
    return {clientX, clientY, x, y};
  };
  const showMarker = (button, img) => {
    const box = button.parentElement;
    if (getComputedStyle(box).position === "static") box.style.position = "relative";
    let marker = box.querySelector(".key-marker");
    if (!marker) {
      marker = document.createElement("div");
      marker.className = "key-marker";
      marker.setAttribute("aria-live", "polite");
      box.append(marker);
    }
    const {clientX, clientY, x, y} = aim(img), outer = box.getBoundingClientRect();
    marker.style.left = `${clientX + 0.5 - outer.left}px`;
    marker.style.top = `${clientY + 0.5 - outer.top}px`;
    // Said as shares of the picture (its pixels are the preview's, not the video's); the pixel is kept for tests.
    const share = (at, size) => Math.round(100 * at / Math.max(size - 1, 1));
    marker.dataset.pixel = `${x},${y}`;
    marker.textContent = `Marker ${share(x, img.naturalWidth)}% across, ${share(y, img.naturalHeight)}% down the ` +
      "picture: Enter or Space clicks there";
    marker.hidden = false;
  };
  document.addEventListener("keydown", (event) => {
    const button = event.target, img = pictureOf(button);
    if (!img || !img.naturalWidth || event.altKey || event.ctrlKey || event.metaKey) return;
    const step = event.shiftKey ? 0.1 : 0.02;
    const moves = {ArrowLeft: [-step, 0], ArrowRight: [step, 0], ArrowUp: [0, -step], ArrowDown: [0, step]};
    if (event.key in moves) {
      marked = marked.map((value, axis) => Math.min(1, Math.max(0, value + moves[event.key][axis])));
      showMarker(button, img);
    } else if (event.key === "Enter" || event.key === " ") {
      const {clientX, clientY} = aim(img);
      button.dispatchEvent(new MouseEvent("click", {bubbles: true, clientX, clientY}));
    } else return;
    event.preventDefault();
    event.stopPropagation();
  }, true);
  document.addEventListener("keyup", (event) => {  // a button clicks itself on Space's release, with no point
    if (event.key === " " && pictureOf(event.target)) event.preventDefault();
  }, true);
  document.addEventListener("focusin", (event) => {
    const img = pictureOf(event.target);
    if (img?.naturalWidth && event.target.matches(":focus-visible")) showMarker(event.target, img);
  });
  window.addEventListener("resize", () => {  // the picture moves with the page: the marker goes with it
    const img = pictureOf(document.activeElement);
    const marker = document.activeElement?.parentElement?.querySelector(".key-marker");
    if (img?.naturalWidth && marker && !marker.hidden) showMarker(document.activeElement, img);
  });
  document.addEventListener("focusout", (event) => {
    if (pictureOf(event.target)) event.target.parentElement.querySelector(".key-marker")?.setAttribute("hidden", "");
  });
  document.addEventListener("change", (event) => {
    const input = event.target;
    if (!(input instanceof HTMLInputElement) || input.type !== "file") return;
    const file = input.files?.[0];
    // An upload button has its file input next to it, not inside.
    const button = [input.nextElementSibling, input.previousElementSibling].map((next) => next?.id)
      .find((id) => UPLOAD_BUTTONS.includes(id));
    if (button) {
      const kind = (chosen) =>
        button === "load-prompts" && chosen.name.toLowerCase().endsWith(".json") ? "prompts file" : "mask picture";
      // The first file over the limit is said; chosen again, they are refused again.
      if ([...input.files].some((chosen) => overLimit(event, chosen, kind(chosen)))) input.value = "";
      return;
    }
    const box = input.closest("#video-input");
    if (!box) return;
    if (file?.type.startsWith("video/") && overLimit(event, file, "video")) input.value = "";
    noteRefused(box, file);
  }, true);
  document.addEventListener("drop", (event) => {
    const box = event.target instanceof Element ? event.target.closest("#video-input") : null;
    const file = event.dataTransfer?.files?.[0];
    if (!box) return;
    if (file?.type.startsWith("video/")) overLimit(event, file, "video");
    noteRefused(box, file);
  }, true);
  const note = "This browser cannot preview this file; the app reads it all the same: click the object in the frame.";
  document.addEventListener("error", (event) => {
    const player = event.target;
    const box = player instanceof HTMLVideoElement ? player.closest("#video-input") : null;
    if (!box || player.error?.code !== MediaError.MEDIA_ERR_SRC_NOT_SUPPORTED) return;
    event.stopPropagation();
    if (!box.querySelector(".no-preview")) {
      const line = document.createElement("div");
      line.className = "no-preview";
      line.textContent = note;
      const frame = player.parentElement;  // the note lies over the empty player, and goes with it on Clear
      if (getComputedStyle(frame).position === "static") frame.style.position = "relative";
      frame.append(line);
    }
  }, true);
  // A download link is named by its file's size alone: give it the file's name, for screen readers and for
  // tests that find it by role and name.
  const nameLinks = () => {
    for (const link of document.querySelectorAll("#result-files a[download]")) {
      const label = `Download ${link.getAttribute("download")}`;
      if (link.getAttribute("aria-label") !== label) link.setAttribute("aria-label", label);
    }
  };
  // Radio and checkbox groups are fieldsets without a legend: name each after its label, and make a radio one a
  // radiogroup, for screen readers and for tests that find them by role and name. Gradio names each radio button
  // apart (anew at each change), so the browser made each its own Tab stop and its arrow keys did nothing: only
  // the chosen one takes the focus from Tab here, and the arrow keys choose (below), as in a radio group.
  const nameGroups = () => {
    for (const group of document.querySelectorAll("fieldset")) {
      const label = group.querySelector(":scope > [data-testid=block-info]")?.textContent.trim();
      if (label && group.getAttribute("aria-label") !== label) group.setAttribute("aria-label", label);
      const radios = [...group.querySelectorAll("input[type=radio]")];
      if (!radios.length) continue;
      group.setAttribute("role", "radiogroup");
      const chosen = radios.find((radio) => radio.checked) ?? radios[0];
      for (const radio of radios) {
        const stop = radio === chosen ? 0 : -1;
        if (radio.tabIndex !== stop) radio.tabIndex = stop;
      }
    }
  };
  document.addEventListener("keydown", (event) => {
    const radio = event.target;
    const step = {ArrowDown: 1, ArrowRight: 1, ArrowUp: -1, ArrowLeft: -1}[event.key];
    if (!(radio instanceof HTMLInputElement) || radio.type !== "radio" || !step || event.altKey || event.ctrlKey ||
        event.metaKey) return;
    const radios = [...(radio.closest("fieldset")?.querySelectorAll("input[type=radio]") ?? [])];
    if (radios.length < 2) return;
    event.preventDefault();
    const next = radios[(radios.indexOf(radio) + step + radios.length) % radios.length];
    next.focus();
    next.click();
  }, true);
  new MutationObserver(() => { nameLinks(); nameGroups(); }).observe(document.body, {childList: true, subtree: true});
  // Closing or reloading the page ends its session: while it holds work (the server ticks #unsaved-work), the
  // browser asks first.
  window.addEventListener("beforeunload", (event) => {
    if (document.querySelector("#unsaved-work input")?.checked) event.preventDefault();
  });
  document.addEventListener("loadstart", (event) => {
    const box = event.target instanceof HTMLVideoElement ? event.target.closest("#video-input") : null;
    box?.querySelector(".no-preview")?.remove();
    box?.querySelector(".refused-file")?.remove();
  }, true);
}
"""


def settings_named(message: str) -> str:
    """A memory setting's error with the code's names of the settings replaced by the panel's labels."""
    return MemoryOptions.named(message, lambda name: f'"{MEMORY_LABELS.get(name, name)}"')


def pixel_count(text: str) -> int:
    """A frame-size limit typed as WIDTHxHEIGHT (as the README gives it) or as a number of pixels."""
    width, _, height = text.lower().partition("x")
    try:
        count = int(width) * int(height) if height else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size such as 3840x2160 or a pixel count") from None
    if count <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: the limit must be above 0")
    return count


def limit(kind: type, least: float = 0, least_said: str = "") -> Callable[[str], float]:
    """An argument type for an upload limit: a finite number above 0 (`least` at least). A negative, zero or
    nan upload size crashed Gradio's launch after the weights had loaded; --max-frames -1 refused every video."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not math.isfinite(value) or value <= 0 or value < least:
            raise argparse.ArgumentTypeError(f"{text!r}: the limit must be a finite number above 0"
                                             + (f" ({least_said} at least)" if least_said else ""))
        return value
    return parse


def port_number(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port: use 1 to 65535")
    return port


def check_can_listen(host: str, port: int) -> None:
    """Refuse an address the server cannot listen on before the weights load: Gradio refuses it only after,
    with a traceback that names its own settings rather than --host and --port."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as exc:
        raise TrackerError(f"--host {host}: {exc.strerror}; give an address such as 127.0.0.1 or 0.0.0.0") from None
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server itself binds
        try:
            probe.bind(address)
        except OSError as exc:
            why = "is in use" if exc.errno == errno.EADDRINUSE else f"cannot be listened on ({exc.strerror or exc})"
            raise TrackerError(f"port {port} on {host} {why}; pick another with --port") from None


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="python app.py", description="Track anything you click: the web app.")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=port_number, default=7860, help="port to listen on (default 7860)")
    parser.add_argument("--share", action="store_true", help="also publish a temporary public gradio.live link")
    parser.add_argument("--max-upload-mb", type=limit(float, 1 / 1024, "1 KB"), default=1024,
                        help="largest upload accepted, in MB (default 1024)")
    parser.add_argument("--max-frames", type=limit(int), default=18000, help="longest video accepted, in frames "
                        "(default 18000)")
    parser.add_argument("--max-seconds", type=limit(float), default=600, help="longest video accepted, in seconds "
                        "(default 600)")
    parser.add_argument("--max-pixels", type=pixel_count, default=3840 * 2160, metavar="WxH|PIXELS",
                        help="largest frame accepted, as a size or a pixel count (default 3840x2160)")
    add_model_flags(parser)
    return parser


def toast(message: str) -> None:
    """A warning toast; the page shows its text as HTML, and messages quote file names."""
    gr.Warning(html.escape(message))


def show_errors(outputs: int) -> Callable:
    """Turn a handler's errors into a readable status line (its first output) and a toast; never a traceback.

    The handler's other outputs stay as they are.
    """
    def wrap(handler: Callable) -> Callable:
        @functools.wraps(handler)
        def guarded(*args, **kwargs):
            try:
                return handler(*args, **kwargs)
            except TrackerError as exc:
                message = str(exc)
            except Exception as exc:  # a bug: keep the page alive and the details in the server log
                log.exception("handler %s failed", handler.__name__)
                message = f"internal error ({type(exc).__name__}); the server log has the details"
            toast(message)
            status = f"Error: {message}"
            return status if outputs == 1 else (status, *[gr.skip()] * (outputs - 1))
        return guarded
    return wrap


def held(typed, lowest: float, highest: float, fallback: float, whole: bool = False) -> float:
    """A number typed into a slider's box, within the slider's ends (halves of whole numbers round up);
    `fallback` when the box was emptied or holds no number."""
    try:
        value = float(typed)
    except (TypeError, ValueError, OverflowError):
        return fallback
    if math.isnan(value):
        return fallback
    value = min(max(value, lowest), highest)
    return math.floor(value + 0.5) if whole else value


def object_choices(session: EditSession) -> dict:
    return gr.update(choices=[(f"Object {i}", i) for i in session.objects], value=session.current)


def cutout_choices(session: EditSession) -> list[tuple[str, int]]:
    return [(f"Object {i}", i) for i in session.cutout_choices()]


def cutout_list(session: EditSession) -> dict:
    """The cut-out's object list after a run: every object offered, all ticked."""
    choices = cutout_choices(session)
    return gr.update(choices=choices, value=[i for _, i in choices])


def cutout_list_kept(session: EditSession, ticked: Sequence[int] | None) -> dict:
    """The cut-out's object list after objects changed (removed, or a prompts file loaded): those still
    offered, ticked as they were."""
    choices = cutout_choices(session)
    return gr.update(choices=choices, value=[i for i in ticked or [] if i in {offered for _, offered in choices}])


def legend(session: EditSession) -> str:
    items = []
    colours = overlay_colours()
    for object_id in session.objects:
        r, g, b = (int(c) for c in colours[object_id])
        current = ' class="current"' if object_id == session.current else ""
        items.append(f'<span class="swatch" style="background: rgb({r},{g},{b})"></span>'
                     f"<span{current}>Object {object_id}</span>")
    return f'<div class="legend">{"".join(items)}</div>'


def build_app(tracker: Tracker, store: SessionStore, limits: Limits, max_upload_mb: float,
              precision: str = "auto") -> gr.Blocks:
    """The page; every handler finds its user's EditSession through the browser session key."""

    def session_of(request: gr.Request) -> EditSession:
        return store.get(request.session_hash)

    def shown(session: EditSession, frame: int, alpha: float, outline: float):
        image, time_s = session.render(int(frame), Style(alpha=float(alpha), outline=int(outline)))
        return session.preview_file(image), \
            frame_caption(int(frame), session.require_video(), time_s) + session.frame_note(int(frame))

    def shown_again(session: EditSession, alpha_value, outline_value) -> Path | None:
        """The frame the page shows, drawn again after an edit: the user may have moved on from the frame edited
        while SAM worked (the caption and the clicks follow the slider, so must the picture)."""
        return shown(session, session.shown_frame, *held_style(alpha_value, outline_value))[0]

    with gr.Blocks(title="Track anything you click", analytics_enabled=False, delete_cache=(3600, 4 * 3600)) as demo:
        gr.Markdown("# Track anything you click")
        gr.Markdown(f"SAM turns clicks into masks, XMem follows them through the video · Device "
                    f"**{html.escape(tracker.device_name)}** · default SAM backend **{tracker.sam.name}**",
                    elem_id="device-info")
        if tracker.untrained:
            gr.HTML(f"⚠ {html.escape(UNTRAINED_WARNING)}.", elem_id="untrained-banner")
        with gr.Row():
            with gr.Column(scale=2, min_width=320):
                video_input = gr.Video(label="Video", sources=["upload"], elem_id="video-input", height=260)
                gr.Markdown(f"{', '.join(VIDEO_SUFFIXES)} · up to {max_upload_mb:g} MB, "
                            f"{limits.max_seconds:g} s, {limits.max_frames} frames · a .ts file the browser "
                            "refuses as text goes in renamed .m2ts", elem_id="upload-limits")
                gr.Markdown(HELP)
                point_mode = gr.Radio(MODES, value="positive", label="Click adds", elem_id="point-mode")
                with gr.Row(equal_height=True):
                    object_select = gr.Dropdown(label="Clicks go to", choices=[], elem_id="object-select",
                                                interactive=True, scale=2, min_width=140)
                    with gr.Column(scale=1, min_width=120):
                        add_object = gr.Button("Add object", elem_id="add-object", size="sm")
                        remove_object = gr.Button("Remove object", elem_id="remove-object", size="sm")
                object_legend = gr.HTML("", elem_id="object-legend")
                with gr.Row():
                    undo = gr.Button("Undo last click", elem_id="undo-point")
                    clear = gr.Button("Clear object on this frame", elem_id="clear-object")
                load_mask = gr.UploadButton("Load a mask picture for this object on this frame", file_types=["image"],
                                            elem_id="load-mask", size="sm")
                load_prompts = gr.UploadButton("Load clicks from a prompts file (.json, with the mask pictures it "
                                               "names, if any)", file_types=[".json", "image"],
                                               file_count="multiple", elem_id="load-prompts", size="sm")
                with gr.Accordion("Settings", open=False, elem_id="settings"):
                    defaults = TrackOptions()
                    size = gr.Slider(0, 1080, value=defaults.size, step=8, label="Processing resolution (shorter "
                                     "side, px; 0 = original)", elem_id="processing-size")
                    mem_every = gr.Slider(1, 30, value=defaults.memory.mem_every, step=1,
                                          label=MEMORY_LABELS["mem_every"], elem_id="memory-interval")
                    # No precision: a fraction typed is refused by name, not rounded behind the user's back.
                    memory_limits = [
                        gr.Number(getattr(defaults.memory, name), label=MEMORY_LABELS[name],
                                  elem_id=name.replace("_", "-"))
                        for name in ("top_k", "min_mid_term_frames", "max_mid_term_frames", "num_prototypes",
                                     "max_long_term_elements")]
                    min_area = gr.Number(0, elem_id="min-memory-area",
                                         label=MEMORY_LABELS["min_memory_area"])
                    alpha = gr.Slider(0, 1, value=defaults.alpha, step=0.05, label="Overlay opacity",
                                      elem_id="overlay-opacity")
                    outline = gr.Slider(0, 10, value=defaults.outline, step=1, label="Outline width (px)",
                                        elem_id="outline-width")
                    encoder_preset = gr.Dropdown(list(X264_PRESETS), value=defaults.preset,
                                                 label="Encoding speed (libx264 preset)", elem_id="encoder-preset",
                                                 info="faster presets make larger files; the encoder can be what "
                                                      "limits a run's speed")
                    crf = gr.Slider(0, X264_MAX_CRF, value=defaults.crf, step=1, elem_id="video-crf",
                                    label="Video quality (CRF: lower is better and larger; 0 is lossless, which "
                                          "browsers cannot play)")
                    sam_backend = gr.Dropdown(tracker.sam_choices(), value=tracker.sam.name, label="SAM backend",
                                              info="for this session's clicks and jobs (default: --sam-backend)",
                                              elem_id="sam-backend")
            with gr.Column(scale=3, min_width=400):
                status = gr.Textbox("Upload a video to start.", label="Status", interactive=False, lines=2,
                                    elem_id="status")
                frame_image = gr.Image(label="Click the object", interactive=False, elem_id="frame-image",
                                       alt_text="Click the object (frame picture)",
                                       type="filepath", buttons=[])
                frame_slider = gr.Slider(0, 1, value=0, step=1, label="Frame", elem_id="frame-slider",
                                         interactive=False)
                frame_info = gr.Markdown("No video yet", elem_id="frame-info")
                with gr.Row():
                    track_button = gr.Button("Track", variant="primary", elem_id="track-button", scale=2)
                    cancel_button = gr.Button("Cancel", variant="stop", elem_id="cancel-button", interactive=False,
                                              scale=1)
                    full_rerun = gr.Checkbox(False, label="Full re-run (re-track earlier frames too)",
                                             elem_id="full-rerun", scale=2)
        with gr.Row():
            with gr.Column(scale=3):
                # While a job runs: its latest frame with its masks, once a second.
                live_frame = gr.Image(label="Tracked video so far", visible=False, interactive=False,
                                      elem_id="live-frame")
                result_video = gr.Video(label="Tracked video", interactive=False, elem_id="result-video")
            with gr.Column(scale=2):
                metrics = gr.Markdown("", elem_id="metrics")
                result_files = gr.File(label="Downloads", file_count="multiple", interactive=False,
                                       elem_id="result-files")
                cutout_objects = gr.CheckboxGroup([], label="Cut-out: objects to keep", elem_id="cutout-objects")
                cutout_kind = gr.Radio([(kind.label, key) for key, kind in CUTOUT_KINDS.items()],
                                       value=next(iter(CUTOUT_KINDS)), label="Cut-out format", elem_id="cutout-format")
                cutout_button = gr.Button("Make cut-out video", elem_id="cutout-button")

        # The page's script writes here what happened in the browser alone: a file it kept back for the upload
        # limit or one the video widget dropped (its name, size or type, and kind).
        browser_note = gr.Textbox(visible="hidden", elem_id="browser-note")
        unsaved_work = gr.Checkbox(False, visible="hidden", interactive=False, elem_id="unsaved-work")

        style = [alpha, outline]
        results = [result_video, result_files, metrics, cutout_objects]

        # What the page shows without a video (the status first, the video widget last).
        no_video = ("Upload a video to start.", None, gr.update(value=0, maximum=1, interactive=False),
                    "No video yet", gr.update(choices=[], value=None), "", None, None, "",
                    gr.update(choices=[], value=[]), gr.skip())

        @show_errors(outputs=11)
        def on_video(path: str | None, alpha_value: float, outline_value: float, request: gr.Request):
            """Follow the widget's value: an upload, a trim made in the widget (a new file), or a clear."""
            session = session_of(request)
            if path is None:
                if session.info is None:  # also the app's own clearing of a refused file: its message stays
                    return (gr.skip(),) * 11
                session.reset()
                return no_video
            # The widget's trim uploads its result while the video is open (a new upload comes after a clear).
            trimmed = session.info is not None and Path(path).name == TRIMMED_UPLOAD
            if not trimmed and Path(path) == session.uploaded_from:  # the widget shows the open video again
                return (gr.skip(),) * 11
            try:
                info = session.open_trimmed_video(path, limits) if trimmed else session.open_video(path, limits)
            except TrackerError as exc:
                toast(str(exc))
                if session.info is not None:  # refused before the old video was let go: the widget shows it again
                    return f"Error: {exc}", *(gr.skip(),) * 9, str(session.uploaded_from)
                return f"Error: {exc}", *no_video[1:-1], None  # the refused file leaves the widget too
            if info is None:
                return "The trim kept the whole video: nothing changed.", *(gr.skip(),) * 10
            image, caption = shown(session, 0, alpha_value, outline_value)
            for note in (truncation_note(info), colour_note(info)):
                if note is not None:  # named: a toast may outlast its video
                    toast(f"{Path(path).name}: {note}")
            return (upload_message(info, trimmed), image,
                    # A slider needs two ends: a one-frame video gets 0..1, held at 0.
                    gr.update(value=0, maximum=max(info.present_frames - 1, 1), interactive=info.present_frames > 1),
                    caption, object_choices(session), legend(session), None, None, "",
                    gr.update(choices=[], value=[]), gr.skip())

        upload_outputs = [status, frame_image, frame_slider, frame_info, object_select, object_legend, *results,
                          video_input]
        video_input.change(on_video, [video_input, *style], upload_outputs, concurrency_limit=4)

        @show_errors(outputs=1)
        def on_browser_note(note: str, request: gr.Request):
            """Say in the status line and a toast what the browser alone saw: for a file over the upload limit,
            the limit and how it is raised (Gradio's refusal is a toast in Kb alone)."""
            try:
                note = json.loads(note)
                if note["kind"] == "not a video":
                    message = untyped_file_message(str(note["name"]), str(note["type"]), session_of(request).info)
                else:
                    message = oversize_message(str(note["name"]), int(note["size"]), max_upload_mb,
                                               str(note["kind"]))
            except (ValueError, TypeError, KeyError):
                return gr.skip()
            toast(message)
            return f"Error: {message}"

        browser_note.change(on_browser_note, browser_note, status, concurrency_limit=4)

        def on_status(request: gr.Request):
            """Every change of the page's work (a click, an undo, a run, a new video) says itself in the status."""
            try:
                return session_of(request).has_work()
            except TrackerError:  # a closed page's
                return gr.skip()

        status.change(on_status, None, unsaved_work, queue=False, show_progress="hidden")

        def held_style(alpha_value, outline_value) -> tuple[float, int]:
            """The look as the sliders' number boxes hold it, unchecked (Gradio's own check refuses what a user
            can type there with a toast and a logged traceback), held to the sliders' ends; an emptied box is
            its slider's low end, as the page makes it once the box loses focus."""
            return (held(alpha_value, alpha.minimum, alpha.maximum, alpha.minimum),
                    held(outline_value, outline.minimum, outline.maximum, outline.minimum, whole=True))

        def held_view(session: EditSession, frame, alpha_value, outline_value) -> tuple[int, float, int]:
            """The frame (held to the video's; emptied: the one shown) and the look, from unchecked values: a
            frame typed beyond the slider left the box on a frame that was not the one shown, where clicks went."""
            last = session.info.present_frames - 1 if session.info is not None else 0
            return held(frame, 0, last, session.shown_frame, whole=True), *held_style(alpha_value, outline_value)

        @show_errors(outputs=3)
        def on_frame(frame, alpha_value, outline_value, request: gr.Request):
            session = session_of(request)
            if session.info is None:
                return gr.skip(), gr.skip(), gr.skip()
            image, caption = shown(session, *held_view(session, frame, alpha_value, outline_value))
            return gr.skip(), image, caption

        @show_errors(outputs=4)
        def on_frame_typed(frame, alpha_value, outline_value, request: gr.Request):
            """The frame box also shows the frame drawn: a number typed beyond the video goes back to its end."""
            session = session_of(request)
            if session.info is None:
                return (gr.skip(),) * 4
            view = held_view(session, frame, alpha_value, outline_value)
            image, caption = shown(session, *view)
            try:
                typed_in_range = float(frame) == view[0]
            except (TypeError, ValueError, OverflowError):
                typed_in_range = False
            # Written back only when held: a drag's earlier value would pull the handle back from where it went.
            return gr.skip(), image, caption, gr.skip() if typed_in_range else view[0]

        # Only what the user does redraws the frame (not the slider's reset on upload).
        frame_slider.input(on_frame_typed, [frame_slider, *style], [status, frame_image, frame_info, frame_slider],
                           show_progress="hidden", trigger_mode="always_last", concurrency_limit=4,
                           preprocess=False)

        @show_errors(outputs=3)
        def on_look(frame, alpha_value, outline_value, request: gr.Request):
            """The frame drawn with the new look, and whether the tracked video has it."""
            session = session_of(request)
            if session.info is None:
                return gr.skip(), gr.skip(), gr.skip()
            view = held_view(session, frame, alpha_value, outline_value)
            image, caption = shown(session, *view)
            note = session.look_note(Style(alpha=view[1], outline=view[2]))
            return gr.skip() if note is None else note, image, caption

        for trigger in (alpha.input, outline.input):
            trigger(on_look, [frame_slider, *style], [status, frame_image, frame_info], show_progress="hidden",
                    trigger_mode="always_last", concurrency_limit=4, preprocess=False)

        def hold_to_range(slider: gr.Slider, whole: bool, emptied: float | None = None) -> None:
            """A number typed beyond the slider's ends goes back into the box as the end it is held to (the page
            moves the handle, not the number); values within them are left alone, a drag included. An emptied
            box is left to be typed anew (the page makes it the low end once it loses focus), or refilled with
            `emptied` where the low end is no safe default."""
            def hold(typed):
                value = held(typed, slider.minimum, slider.maximum, slider.minimum, whole)
                try:
                    return gr.skip() if float(typed) == value else value
                except (TypeError, ValueError, OverflowError):
                    return gr.skip() if emptied is None else emptied

            slider.input(hold, slider, slider, preprocess=False, queue=False, show_progress="hidden")

        for slider, whole in ((size, True), (mem_every, True), (alpha, False), (outline, True)):
            hold_to_range(slider, whole)
        hold_to_range(crf, True, emptied=defaults.crf)  # CRF 0 is lossless: browsers cannot play it

        @show_errors(outputs=2)
        def on_click(alpha_value, outline_value, request: gr.Request):
            session = session_of(request)
            try:
                message = session.click_next()
            except ClickDropped:  # the page shows another video by now, or the object is gone
                return gr.skip(), gr.skip()
            if message is None:
                return gr.skip(), gr.skip()
            # Older news by now, kept off the status: a later click's "Segmenting…" stays until its own reply, and
            # a job's status (its progress over the box, then its end) until the job ends.
            stale = session.clicks_queued() or session.job_running
            return gr.skip() if stale else message, shown_again(session, alpha_value, outline_value)

        # A click is said and taken at once (the first one on a frame waits for SAM's image encoder: seconds on
        # a CPU), then segmented in the queue, where SAM runs one request at a time: the backends (TensorRT above
        # all) are not re-entrant. The session keeps each click as it was made (a gr.State would be read when
        # the queued event runs, by then holding the latest click's place).
        @show_errors(outputs=1)
        def on_click_begin(frame, mode: str, alpha_value, outline_value, event: gr.SelectData,
                           request: gr.Request):
            session = session_of(request)
            if not isinstance(event.index, (list, tuple)) or None in event.index:
                return CLICKS_NEED_A_POINT
            x, y = event.index
            message = session.queue_click(held_view(session, frame, alpha_value, outline_value)[0],
                                          (float(x), float(y)), mode)
            return message if session.info is not None else gr.skip()

        sam_queue = dict(concurrency_limit=1, concurrency_id="sam")
        # Every click counts, also those made while an earlier one waits for SAM (Gradio's default drops them).
        (frame_image.select(on_click_begin, [frame_slider, point_mode, *style], status, queue=False,
                            show_progress="hidden", trigger_mode="multiple")
         .then(on_click, style, [status, frame_image], show_progress="minimal", trigger_mode="multiple",
               preprocess=False, **sam_queue))

        @show_errors(outputs=2)
        def on_point_mode(mode: str, alpha_value, outline_value, request: gr.Request):
            session = session_of(request)
            message = session.drop_corners() if mode != "box" else None
            if message is None:
                return gr.skip(), gr.skip()
            return message, shown_again(session, alpha_value, outline_value)

        point_mode.input(on_point_mode, [point_mode, *style], [status, frame_image], preprocess=False, **sam_queue)

        def editing(action: Callable[[EditSession, int], str]) -> Callable:
            @show_errors(outputs=2)
            def handler(frame, alpha_value, outline_value, request: gr.Request):
                session = session_of(request)
                message = action(session, held_view(session, frame, alpha_value, outline_value)[0])
                return message, shown_again(session, alpha_value, outline_value)
            return handler

        @show_errors(outputs=1)
        def on_sam_backend(name: str, request: gr.Request):
            session = session_of(request)
            if name == session.sam.name:  # the dropdown opened and closed again: the status stays
                return gr.skip()
            return session.set_sam_backend(name)

        sam_backend.input(on_sam_backend, sam_backend, status, **sam_queue)
        # Each press counts (Gradio's default drops one made while the last is pending: three quick Undos took
        # back two clicks).
        undo.click(editing(EditSession.undo), [frame_slider, *style], [status, frame_image], preprocess=False,
                   trigger_mode="multiple", **sam_queue)
        clear.click(editing(EditSession.clear), [frame_slider, *style], [status, frame_image], preprocess=False,
                    trigger_mode="multiple", **sam_queue)

        @show_errors(outputs=2)
        def on_load_mask(path: str | None, alpha_value: float, outline_value: float, request: gr.Request):
            """A mask from another tool as the chosen object's prompt on the frame shown, in place of its clicks."""
            session = session_of(request)
            if path is None:
                return gr.skip(), gr.skip()
            message = session.load_mask(session.shown_frame, path)
            return message, shown_again(session, alpha_value, outline_value)

        load_mask.upload(on_load_mask, [load_mask, *style], [status, frame_image], **sam_queue)

        @show_errors(outputs=3)
        def on_add_object(request: gr.Request):
            session = session_of(request)
            object_id = session.add_object()
            return f"object {object_id} added: its clicks now go to it", object_choices(session), legend(session)

        add_object.click(on_add_object, None, [status, object_select, object_legend], concurrency_limit=4)

        @show_errors(outputs=2)
        def on_select_object(object_id: int | None, request: gr.Request):
            session = session_of(request)
            if object_id is None or session.info is None:
                return gr.skip(), gr.skip()
            session.select_object(int(object_id))
            return f"clicks go to object {object_id}", legend(session)

        object_select.input(on_select_object, object_select, [status, object_legend], concurrency_limit=4)

        @show_errors(outputs=5)
        def on_remove_object(object_id: int | None, alpha_value: float, outline_value: float, ticked: list[int],
                             request: gr.Request):
            session = session_of(request)
            session.require_video()
            if object_id is None:
                raise TrackerError("pick the object to remove first")
            removed = session.remove_object(int(object_id))
            return (removed, object_choices(session),
                    legend(session), shown_again(session, alpha_value, outline_value),
                    cutout_list_kept(session, ticked))

        remove_object.click(on_remove_object, [object_select, *style, cutout_objects],
                            [status, object_select, object_legend, frame_image, cutout_objects],
                            concurrency_limit=4, preprocess=False)

        @show_errors(outputs=7)
        def on_load_prompts(files: list[str] | None, alpha_value: float, outline_value: float, ticked: list[int],
                            request: gr.Request, progress=gr.Progress()):
            """A prompts file (the downloads' `<video>_prompts.json`, or one written for the CLI), with the mask
            pictures it names, in place of the clicks; the page moves to its earliest prompt's frame. Objects it
            leaves out leave the cut-out list."""
            session = session_of(request)
            if not files:
                return (gr.skip(),) * 7
            message, frame = session.load_prompts_file(files, lambda fraction, text: progress(fraction, desc=text))
            image, caption = shown(session, frame, *held_style(alpha_value, outline_value))
            return (message, image, frame, caption, object_choices(session), legend(session),
                    cutout_list_kept(session, ticked))

        @show_errors(outputs=1)
        def on_load_prompts_begin(files: list[str] | None, request: gr.Request):
            """Say the load at once, as a click is said: a Track pressed from now on waits for it."""
            return gr.skip() if not files else session_of(request).prompts_file_wait(files)

        (load_prompts.upload(on_load_prompts_begin, load_prompts, status, queue=False, show_progress="hidden")
         .then(on_load_prompts, [load_prompts, *style, cutout_objects],
               [status, frame_image, frame_slider, frame_info, object_select, object_legend, cutout_objects],
               show_progress_on=status, **sam_queue))

        # Track runs in two steps: an immediate one marks the job (so that Cancel reaches it even while it
        # waits in the queue) and says why it may not run; the queued one tracks, or shows that reason (an
        # immediate event cannot show a toast). While it runs, the video cannot be replaced.
        job_refused = gr.State("")

        def on_begin(request: gr.Request):
            try:
                session = session_of(request)
                session.begin_job()
            except TrackerError as exc:
                return f"Error: {exc}", str(exc), gr.skip(), gr.skip(), gr.skip(), gr.skip()
            waiting = ("Waiting for the tracker: the last click is being segmented first…"
                       if session.clicks_waiting() else
                       "Waiting for the tracker (one job runs at a time; another user's may be ahead)…")
            return (waiting, "",
                    gr.update(interactive=False), gr.update(interactive=True),
                    gr.update(interactive=False), gr.Timer(active=True))

        @show_errors(outputs=5)
        def on_track(refused: str, full: bool, size_value: float, mem_value: float, top_k: float,
                     min_mid_term: float, max_mid_term: float, prototypes: float, long_term: float,
                     min_area_value: float, alpha_value: float, outline_value: float, preset_value: str,
                     crf_value: float, backend: str | None, request: gr.Request, progress=gr.Progress()):
            if refused:
                toast(refused)
                return (gr.skip(),) * 5
            session = session_of(request)
            try:
                if None in (top_k, min_mid_term, max_mid_term, prototypes, long_term):
                    raise TrackerError("a memory setting is empty: give it a whole number (Settings)")
                try:
                    memory = MemoryOptions(mem_every=int(mem_value), top_k=top_k, min_mid_term_frames=min_mid_term,
                                           max_mid_term_frames=max_mid_term, num_prototypes=prototypes,
                                           max_long_term_elements=long_term, min_memory_area=min_area_value or 0)
                except TrackerError as exc:
                    raise TrackerError(f"Settings: {settings_named(str(exc))}") from None
                options = TrackOptions(size=int(size_value), memory=memory, alpha=float(alpha_value),
                                       outline=int(outline_value), preset=preset_value, crf=int(crf_value),
                                       precision=precision)
                record = session.track(options, full=bool(full), sam_backend=backend or None,
                                       progress=lambda fraction, text: progress(fraction, desc=text))
            except Cancelled:
                log.info("tracking job cancelled; nothing of it was kept")
                waiting = " A click is still being segmented: its mask shows when SAM is done." \
                    if session.clicks_waiting() else ""
                return (f"Cancelled: nothing of that run was kept; the app is ready.{waiting}",
                        gr.skip(), gr.skip(), gr.skip(), gr.skip())
            finally:
                session.end_job()
            if session.closed:  # the page went as the job ended: its files go with it, and nobody is shown them
                return (gr.skip(),) * 5
            warnings = "".join(f"\n⚠ {w}" for w in record.warnings)
            files = session.result_files()
            ended = "Done" if record.stopped_at is None else "Cancelled"
            done = (NOTHING_CHANGED if record.repeated else
                    f"{ended}: {record.describe()}. {record.summary}.{warnings}")
            return (done, str(record.overlay), files,
                    f"**{record.summary}**",
                    cutout_list(session))

        job_controls = [track_button, cancel_button, video_input]
        live_timer = gr.Timer(LIVE_SECONDS, active=False)

        def on_live(request: gr.Request):
            try:
                live = session_of(request).live_frame()
            except TrackerError:  # a closed page's
                return gr.skip()
            if live is None:
                return gr.skip()
            index, picture = live
            return gr.update(value=str(picture), label=f"Tracked video so far: frame {index}", visible=True)

        live_timer.tick(on_live, None, live_frame, queue=False, show_progress="hidden")
        tracked = (track_button.click(on_begin, None, [status, job_refused, *job_controls, live_timer], queue=False,
                                      show_progress="hidden")  # the job's own progress follows at once
                   .then(on_track, [job_refused, full_rerun, size, mem_every, *memory_limits, min_area, *style,
                                    encoder_preset, crf, sam_backend],
                         [status, *results], show_progress_on=status, concurrency_limit=TRACK_JOBS,
                         concurrency_id="track"))
        tracked.then(lambda: (gr.update(interactive=True), gr.update(interactive=False, value="Cancel"),
                              gr.update(interactive=True), gr.Timer(active=False),
                              gr.update(visible=False, value=None)),
                     None, [*job_controls, live_timer, live_frame], queue=False, show_progress="hidden")
        # The frame the slider is on now (the user may have moved it during the run), with the new masks. Its
        # progress, hidden, stays off the status too: there it would start the status's timer again under "Done".
        tracked.then(on_frame, [frame_slider, *style], [status, frame_image, frame_info], show_progress="hidden",
                     show_progress_on=[frame_image, frame_info], queue=False, preprocess=False)

        def on_cancel(request: gr.Request):
            """Greys the button out, saying "Cancelling…" until the job ends, and leaves the status to the job:
            its "Cancelled" comes through the queue (for a job still held there, only when its turn comes), and a
            status sent from here could arrive after it (or after its "Done") and stay."""
            try:
                session_of(request).request_cancel()
            except TrackerError as exc:  # a closed page's: nothing of it runs
                toast(str(exc))
            return gr.update(interactive=False, value="Cancelling…")

        cancel_button.click(on_cancel, None, cancel_button, queue=False)

        @show_errors(outputs=2)
        def on_cutout(objects: Sequence[int], kind: str, request: gr.Request, progress=gr.Progress()):
            session = session_of(request)
            path = session.export_cutout(objects, kind,
                                         progress=lambda fraction, text: progress(fraction, desc=text))
            if session.closed:  # as after a job (see on_track)
                return gr.skip(), gr.skip()
            kept = ", ".join(map(str, sorted(objects)))
            notes = session.cutout_notes(kind)
            for note in notes:
                toast(f"{path.name}: {note}")
            return (f"Cut-out ready in the downloads: {path.name} (object{'s' * (len(objects) > 1)} {kept})."
                    + "".join(f"\n⚠ {note}" for note in notes), session.result_files())

        cutout_button.click(on_cutout, [cutout_objects, cutout_kind], [status, result_files],
                            show_progress_on=status, concurrency_limit=1, concurrency_id="export")

        # The same job without the page, for scripts (gradio_client): a video and a prompts JSON (the CLI's
        # --prompts format) in; the tracked video, the masks zip and the summary out.
        with gr.Group(visible=False):
            api_inputs = [gr.File(label="video"), gr.Textbox(label="prompts"),
                          gr.Number(defaults.size, label="size")]  # a fraction refused, not rounded
            api_outputs = [gr.File(label="tracked video"), gr.File(label="masks zip"), gr.Textbox(label="summary")]
            api_trigger = gr.Button()

        def api_track(video: str | None, prompts: str, size: float | None, request: gr.Request,
                      progress=gr.Progress()) -> tuple[str, str, str]:
            """Track the objects the prompts pick (JSON, as the CLI's --prompts file) through the video."""
            if video is None:
                raise gr.Error("send a video file", print_exception=False)
            try:
                record = store.get(request.session_hash, reopen=True).track_prompts(
                    video, prompts or "", limits,
                    TrackOptions(size=defaults.size if size is None else size, precision=precision),
                    progress=lambda fraction, text: progress(fraction, desc=text))
            except Cancelled:
                raise gr.Error("the job was cancelled (the session ended)", print_exception=False) from None
            except TrackerError as exc:  # the client's mistake, said to it: the log gets a line, not a traceback
                log.info("an API job was refused: %s", exc)
                raise gr.Error(str(exc), print_exception=False) from None
            warnings = "".join(f"\n{w}" for w in record.warnings)
            return str(record.overlay), str(record.masks), f"{record.summary}{warnings}"

        api_trigger.click(api_track, api_inputs, api_outputs, api_name="track", concurrency_limit=TRACK_JOBS,
                          concurrency_id="track")

        def on_unload(request: gr.Request) -> None:
            store.close(request.session_hash)
            log.info("a page closed: its session ended and its files were removed")

        demo.unload(on_unload)
    for event in demo.fns.values():  # the page's own events are no API (nor kept in Gradio's run history)
        if event.api_name != "track":
            event.api_visibility = "private"
    return demo


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message="UNTRAINED WEIGHTS")  # said below, and on the page
    try:
        check_can_listen(args.host, args.port)
        tracker = Tracker(args.sam_checkpoint, args.xmem_checkpoint, device=args.device,
                          sam_backend=args.sam_backend, sam_precision=args.sam_precision,
                          download=not args.no_download)
        resolve_precision(tracker.device, args.precision)
    except TrackerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"device {tracker.device_name}, SAM backend {tracker.sam.name}", file=sys.stderr)
    tracker.warm_up_in_background(TrackOptions(precision=args.precision))
    if tracker.untrained:
        print(f"WARNING: {UNTRAINED_WARNING}", file=sys.stderr)
    limits = Limits(max_frames=args.max_frames, max_seconds=args.max_seconds, max_pixels=args.max_pixels)
    # Session folders live in the framework's upload folder, so results are served from there without copies
    # and go when their session does.
    uploads = Path(get_upload_folder())
    uploads.mkdir(parents=True, exist_ok=True)
    store = SessionStore(Path(tempfile.mkdtemp(prefix="tracker-app-", dir=uploads)), tracker, upload_folder=uploads)
    demo = build_app(tracker, store, limits, args.max_upload_mb, args.precision)
    # Stopping the server (Ctrl-C or SIGTERM) removes every session's files, and the frames Gradio cached
    # for the pages (its shutdown deletes them; a SIGTERM would otherwise end the process before it runs).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    status = 0
    try:
        # Without --share, Gradio's start lines end with how to publish a link in its own terms (share=True in
        # launch()): this app's are said instead.
        demo.queue(default_concurrency_limit=1).launch(
            server_name=args.host, server_port=args.port, share=args.share, allowed_paths=[],
            max_file_size=f"{int(args.max_upload_mb * 1024)}kb", ssr_mode=False, css=CSS, js=NO_PREVIEW_JS,
            footer_links=[], quiet=not args.share, prevent_thread_lock=True)
        if not args.share:
            print(f"* Running on local URL:  {demo.local_url.rstrip('/')}")
            print("* To create a public link, start the app with --share.")
        demo.block_thread()
    except SystemExit:  # SIGTERM
        pass
    except OSError as exc:  # the port taken while the weights loaded, say
        print(f"error: the server could not start on {args.host}:{args.port} ({exc}); pick another with --port",
              file=sys.stderr)
        status = 2
    finally:
        demo.close(verbose=False)
        store.close_all()
        # Once more, for the frames a handler still running at the stop cached after Gradio's own sweep.
        delete_files_created_by_app(demo, None)
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
    # Not the interpreter's exit: a handler thread still inside a PyTorch call (a click's SAM encoder) would
    # abort it ("terminate called without an active exception"); everything worth keeping is done above.
    os._exit(status)


if __name__ == "__main__":
    sys.exit(main())
