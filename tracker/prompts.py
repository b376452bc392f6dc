"""What the user asked for: clicks, boxes or masks per object and frame, checked against the video."""
from __future__ import annotations

import difflib
import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence, TypeVar

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import PromptError, whole_number

POSITIVE, NEGATIVE = 1, 0
T = TypeVar("T")
PROMPTS_ENDING = "_prompts.json"  # after the video's name: the clicks of the app's run, as a prompts file
MAX_PROMPTS_BYTES = 16 * 2**20  # 255 objects prompted on hundreds of frames is a few MB


def frame_problem(frame: int, frame_count: int, present_frames: int | None = None) -> str | None:
    """Why a prompt cannot go on `frame` of a video of `frame_count` frames (of which a truncated file holds
    only the first `present_frames`), or None."""
    if frame < 0:
        return f"frame {frame} is negative; the video has frames 0..{frame_count - 1}"
    if frame >= frame_count:
        return f"frame {frame} is past the end; the video has frames 0..{frame_count - 1}"
    if present_frames is not None and frame >= present_frames:
        return f"frame {frame} is missing from this truncated file: only frames 0..{present_frames - 1} are present"
    return None


@dataclass
class ObjectPrompt:
    """Clicks and/or a box that pick one object on one frame, or its mask there.

    An object may have prompts on several frames: the earliest introduces it,
    later ones correct the tracked mask there. Points without labels are all
    on the object (label 1). A `mask` (HxW, true on the object, at the video's
    size; or a picture's path, read by `object_mask`) is tracked from as it is,
    without SAM: a mask drawn in another tool, or a frame of an earlier run's
    masks zip to go on from. A `correct` prompt's clicks apply on the object's
    tracked mask there (SAM is given that mask too), as clicks on a tracked
    frame of the page do: negative points alone then take part of it away. The
    tracking from the object's other prompts comes first, and the video is
    tracked again from each corrected frame on.
    """

    object_id: int
    frame: int = 0
    points: list[tuple[float, float]] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    box: tuple[float, float, float, float] | None = None
    # The frame size (width, height) the coordinates were given for, where a prompts file records it.
    frame_size: tuple[int, int] | None = field(default=None, compare=False)
    mask: np.ndarray | str | Path | None = field(default=None, compare=False, repr=False)
    correct: bool = False

    def __post_init__(self) -> None:
        self.object_id = whole_number(self.object_id, "an object id", PromptError)
        who = f"object {self.object_id}"
        self.frame = whole_number(self.frame, f"{who}: the prompt frame", PromptError)
        if isinstance(self.mask, (str, Path)):
            self.mask = object_mask(self.mask, self.object_id)
        if self.mask is not None:
            self.mask = np.asarray(self.mask)
            if self.mask.ndim != 2:
                raise PromptError(f"{who}: a mask is one HxW array (true or nonzero on the object), not an array "
                                  f"of shape {self.mask.shape}")
            self.mask = self.mask != 0
        try:
            self.points = [(float(x), float(y)) for x, y in self.points]
        except (TypeError, ValueError):
            raise PromptError(f"{who}: points must be a list of (x, y) pairs of numbers, not {self.points!r}") \
                from None
        try:
            box = None if self.box is None else tuple(float(v) for v in self.box)
        except (TypeError, ValueError):
            box = ()
        if box is not None and len(box) != 4:
            raise PromptError(f"{who}: a box is four numbers (x0, y0, x1, y1), not {self.box!r}")
        try:
            labels = list(self.labels)
        except TypeError:
            raise PromptError(f"{who}: labels must be a list of 1 (object) or 0 (background)") from None
        self.labels = [whole_number(v, f"{who}: a point label", PromptError) for v in labels] or \
            [POSITIVE] * len(self.points)
        if box is not None:
            # Two corners in either order (a box dragged up or to the left) are the same rectangle.
            x0, y0, x1, y1 = box
            finite = all(math.isfinite(v) for v in box)  # check() names the others
            self.box = (min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)) if finite else box

    def check(self, width: int, height: int, frame_count: int, present_frames: int | None = None) -> None:
        """Raise PromptError when the prompt cannot apply to a video of this size and length (of which a
        truncated file holds only the first `present_frames`)."""
        who = f"object {self.object_id}"
        if not 1 <= self.object_id <= 255:
            raise PromptError(f"{who}: object ids must be between 1 and 255")
        if self.frame_size is not None and tuple(self.frame_size) != (width, height):
            raise PromptError(f"the prompts were made on a {self.frame_size[0]}x{self.frame_size[1]} video, "
                              f"and this one is {width}x{height}: the clicks would land elsewhere (the prompts of "
                              "another video?)")
        if problem := frame_problem(self.frame, frame_count, present_frames):
            raise PromptError(f"{who}: prompt {problem}")
        if self.mask is not None:
            self._check_mask(width, height)
            return
        if not self.points and self.box is None:
            raise PromptError(f"{who}: give at least one point or a box (or a mask)")
        if len(self.labels) != len(self.points):
            points, labels = len(self.points), len(self.labels)
            raise PromptError(f"{who}: {points} point{'s' * (points != 1)} but {labels} label{'s' * (labels != 1)}")
        values = [v for xy in self.points for v in xy] + list(self.box or ())
        if not all(math.isfinite(v) for v in values):
            raise PromptError(f"{who}: coordinates must be finite numbers")
        if any(v not in (POSITIVE, NEGATIVE) for v in self.labels):
            raise PromptError(f"{who}: point labels must be 1 (object) or 0 (background)")
        if self.box is None and POSITIVE not in self.labels and not self.correct:
            raise PromptError(f"{who}: negative points alone select nothing; add a positive point or a box (in a "
                              'prompts file, "correct": true makes them take part of the tracked mask away)')
        for x, y in self.points:
            if not (0 <= x < width and 0 <= y < height):
                raise PromptError(
                    f"{who}: point ({x:g}, {y:g}) is outside the {width}x{height} frame; "
                    f"x must be in 0..{width - 1} and y in 0..{height - 1}"
                )
        if self.box is not None:
            x0, y0, x1, y1 = self.box
            box = f"box ({x0:g}, {y0:g}, {x1:g}, {y1:g})"  # as the points are written
            if not (0 <= min(x0, x1) and max(x0, x1) <= width and 0 <= min(y0, y1) and max(y0, y1) <= height):
                raise PromptError(f"{who}: {box} is outside the {width}x{height} frame")
            if abs(x1 - x0) < 1 or abs(y1 - y0) < 1:
                raise PromptError(f"{who}: {box} has zero area; drag two distinct corners")

    def _check_mask(self, width: int, height: int) -> None:
        """A mask prompt takes no clicks, has the video's size and holds the object."""
        who = f"object {self.object_id}"
        if self.points or self.box is not None:
            raise PromptError(f"{who}: give its mask or its clicks and box on frame {self.frame}, not both (clicks "
                              "on a later frame correct the tracked mask there)")
        if self.correct:
            raise PromptError(f"{who}: its mask on frame {self.frame} is marked as a correction: a correction is "
                              "clicks on the tracked mask, and a mask replaces it (drop \"correct\")")
        if self.mask.shape != (height, width):
            raise PromptError(f"{who}: its mask on frame {self.frame} is {self.mask.shape[1]}x{self.mask.shape[0]}, "
                              f"and the video is {width}x{height}: a mask must have the video's size")
        if not self.mask.any():
            raise PromptError(f"{who}: its mask on frame {self.frame} is empty (no pixel on the object)")


def check_prompts(prompts: Sequence[ObjectPrompt], width: int, height: int, frame_count: int,
                  present_frames: int | None = None) -> None:
    """Check every prompt, that no object is prompted twice on the same frame, and that a corrected object has a
    prompt that selects it (a correction applies on what that prompt's tracking gives)."""
    if isinstance(prompts, ObjectPrompt) or not all(isinstance(p, ObjectPrompt) for p in prompts):
        raise PromptError("prompts must be a list of ObjectPrompt (a prompts file's: tracker.load_prompts(path))")
    if not prompts:
        raise PromptError("no object selected: give at least one object prompt (clicks or a box on a frame)")
    corrects: dict[tuple[int, int], bool] = {}  # (object, frame) -> whether its prompt there is a correction
    for prompt in prompts:
        prompt.check(width, height, frame_count, present_frames)
        key = (prompt.object_id, prompt.frame)
        if key in corrects and corrects[key] != prompt.correct:
            raise PromptError(f"object {prompt.object_id} has a prompt and a correction on frame {prompt.frame}: a "
                              "correction applies on the mask tracked from a prompt, so it cannot share the prompt's "
                              'frame; keep one (the correction\'s clicks can join the prompt\'s, without "correct")')
        if key in corrects:
            raise PromptError(f"object {prompt.object_id} has two prompts on frame {prompt.frame}; merge them")
        corrects[key] = prompt.correct
    selected = {prompt.object_id for prompt in prompts if not prompt.correct}
    for prompt in prompts:
        if prompt.correct and prompt.object_id not in selected:
            raise PromptError(f"object {prompt.object_id} has only corrections (frame {prompt.frame}): a correction "
                              "applies on the object's tracked mask, so give it a prompt that selects it first")


def needs_sam(prompts: Sequence[ObjectPrompt]) -> bool:
    """Whether SAM turns any of the prompts into a mask (a prompt given as a mask is taken as it is)."""
    return any(prompt.mask is None for prompt in prompts)


def parse_xy(text: str, what: str = "point") -> tuple[float, float]:
    """'320,180' -> (320.0, 180.0)."""
    values = _floats(text, 2, what, "X,Y")
    return values[0], values[1]


def parse_box(text: str) -> tuple[float, float, float, float]:
    """'10,20,200,150' -> (10.0, 20.0, 200.0, 150.0)."""
    x0, y0, x1, y1 = _floats(text, 4, "box", "X0,Y0,X1,Y1")
    return x0, y0, x1, y1


def _floats(text: str, count: int, what: str, form: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) != count:
        raise PromptError(f"{what} {text!r} is not of the form {form}")
    return values


OBJECT_KEYS = ("id", "frame", "points", "labels", "box", "mask", "correct")


def prompts_from_json(data: object, source: str = "the prompts", folder: Path | None = None,
                      pictures: Mapping[str, Path] | None = None) -> list[ObjectPrompt]:
    """Read ``{"objects": [{"id": 1, "frame": 0, "points": [[x, y]], "labels": [1], "box": null}]}``.

    ``"correct": true`` makes an object's entry a correction of its tracked mask (see `ObjectPrompt`).
    An object's ``"mask": "name.png"`` is a picture in `folder` (the prompts file's) read by `object_mask`,
    or with `pictures` (name -> path: those uploaded with the file) one of those alone, by its name: an upload
    reads no other file of the server's; without either (text sent to the app) masks are refused.
    """
    if not isinstance(data, dict) or not isinstance(data.get("objects"), list):
        raise PromptError('prompts must be a JSON object with an "objects" list')
    unknown = set(data) - {"objects", "frame_size"}
    if unknown:
        raise PromptError(f'{source} has unknown keys {sorted(unknown)} beside "objects" (a typo, or a key of '
                          'an object put outside it?)')
    frame_size = _field(data, source, "frame_size", _frame_size, "null or [width, height] (two whole numbers)")
    if not data["objects"]:
        raise PromptError(f'no object selected: "objects" in {source} is empty; '
                          'give each object "points" or a "box" (see the README)')
    entries = []  # (id or None, the other fields)
    for n, item in enumerate(data["objects"]):
        where = f"objects[{n}]"
        if not isinstance(item, dict):
            raise PromptError(f"{where} must be a JSON object")
        unknown = set(item) - set(OBJECT_KEYS)
        if unknown:
            guesses = [f'"{key}" for "{close[0]}"' for key in sorted(unknown)
                       if (close := difflib.get_close_matches(key, OBJECT_KEYS, n=1, cutoff=0.6))]
            raise PromptError(f"{where} in {source} has unknown keys {sorted(unknown)}"
                              + (f" (a typo? {', '.join(guesses)})" if guesses else "")
                              + f"; an object's keys are {', '.join(OBJECT_KEYS)}")
        mask = _field(item, where, "mask", _file_name, "a picture's file name, beside the prompts file")
        if mask is not None and folder is None and pictures is None:
            raise PromptError(f'{where} gives a "mask": masks are pictures beside a prompts file on disk (python -m '
                              "tracker track --prompts FILE, or load_prompts in Python); here give clicks or a box")
        object_id = _field(item, where, "id", _optional_int, "a whole number from 1 to 255")  # None: a new object
        frame = _field(item, where, "frame", _int, "a whole number (frames count from 0)", default=0)
        points = _field(item, where, "points", _points, "a list of [x, y] pairs of numbers", default=[])
        labels = _field(item, where, "labels", _labels, "a list of 1 (object) or 0 (background), one per point",
                        default=[POSITIVE] * len(points))
        box = _field(item, where, "box", _box, "null or [x0, y0, x1, y1] (four numbers)")
        correct = _field(item, where, "correct", _bool, "true or false", default=False)
        if correct and object_id is None:
            raise PromptError(f'{where} is a correction without an "id": name the object it corrects')
        entries.append((object_id, mask, dict(frame=frame, points=points, labels=labels, box=box, correct=correct)))
    named = {object_id for object_id, _, _ in entries}
    free = (object_id for object_id in itertools.count(1) if object_id not in named)  # for entries without an id
    prompts = []
    for object_id, mask, fields in entries:
        object_id = next(free) if object_id is None else object_id
        prompts.append(ObjectPrompt(object_id=object_id, frame_size=frame_size, **fields, mask=None if mask is None
                                    else _named_mask(mask, object_id, fields["frame"], source, folder, pictures)))
    return prompts


def _named_mask(name: str, object_id: int, frame: int, source: str, folder: Path | None,
                pictures: Mapping[str, Path] | None) -> np.ndarray:
    """The mask of a prompts file's entry that names the picture `name` (see `prompts_from_json`)."""
    named = f"{source} names the mask picture {name} (object {object_id}, frame {frame}), which"
    if pictures is not None:
        chosen = ", ".join(sorted(pictures)) or "none"
        if name not in pictures:
            raise PromptError(f"{named} was not chosen with it (pictures chosen: {chosen}); choose the prompts file "
                              "and the mask pictures it names together (select them all in the file dialog)")
        return object_mask(pictures[name], object_id, name)
    if not (folder / name).exists():
        raise PromptError(f"{named} is not beside it")
    return object_mask(folder / name, object_id)


def _field(item: dict, where: str, name: str, read: Callable[[object], T], expected: str, default: object = None
           ) -> T:
    """One field of an object (`default` when missing or null), or an error naming the field and what it takes."""
    value = item.get(name)
    try:
        return read(default if value is None else value)
    except (TypeError, ValueError, OverflowError, PromptError):
        raise PromptError(f'{where} is malformed: "{name}" must be {expected}, not {_shown(value)}; '
                          "see the prompts file format in the README") from None


def _int(value: object) -> int:
    return whole_number(value, "a number", PromptError)


def _bool(value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{value!r} is not true or false")
    return value


def _optional_int(value: object) -> int | None:
    return None if value is None else _int(value)


def _numbers(value: object, count: int | None = None) -> list[float]:
    """A JSON list of numbers (exactly `count` when given); strings and true/false are not numbers."""
    if (not isinstance(value, list) or (count is not None and len(value) != count)
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
        raise ValueError(f"{value!r} is not a list of numbers")
    return [float(v) for v in value]


def _points(value: object) -> list[tuple[float, float]]:
    if not isinstance(value, list):
        raise ValueError(f"{value!r} is not a list")
    return [(x, y) for x, y in (_numbers(point, 2) for point in value)]


def _labels(value: object) -> list[int]:
    return [_int(v) for v in _numbers(value)]


def _file_name(value: object) -> str | None:
    if value is not None and (not isinstance(value, str) or not value.strip()):
        raise ValueError(f"{value!r} is not a file name")
    return value


def _frame_size(value: object) -> tuple[int, int] | None:
    if value is None:
        return None
    width, height = (_int(v) for v in _numbers(value, 2))
    if width < 1 or height < 1:
        raise ValueError(f"{value!r} is not a frame size")
    return width, height


def _box(value: object) -> tuple[float, float, float, float] | None:
    if value is None:
        return None
    x0, y0, x1, y1 = _numbers(value, 4)
    return x0, y0, x1, y1


def _shown(value: object, limit: int = 40) -> str:
    """A field's value as the user wrote it (JSON), cut short."""
    text = json.dumps(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def load_prompts(path: str | Path, name: str | None = None, pictures: Mapping[str, Path] | None = None
                 ) -> list[ObjectPrompt]:
    """Read a prompts JSON file, with a clear error for a missing or malformed file; messages call it `name`
    where given (an upload's own name, not the server's copy of it). Its objects' masks are read from the
    pictures beside it, or from `pictures` alone (see `prompts_from_json`)."""
    path = Path(path)
    source = f"prompts file {name or path}"
    try:
        if path.stat().st_size > MAX_PROMPTS_BYTES:
            raise PromptError(f"{source} is {path.stat().st_size / 2**20:.0f} MB: not a prompts file (those are "
                              "a few KB); choose the *_prompts.json the app wrote")
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark (Windows editors) is not JSON
    except FileNotFoundError:
        raise PromptError(f"{source} does not exist") from None
    except OSError as exc:
        raise PromptError(f"{source} cannot be read ({exc.strerror or exc})") from None
    except UnicodeDecodeError as exc:
        raise PromptError(f"{source} is not valid JSON ({exc})") from None
    return prompts_from_text(text, source, path.parent, pictures)


def prompts_to_text(prompts: Sequence[ObjectPrompt], frame_size: tuple[int, int] | None = None,
                    mask_names: Mapping[tuple[int, int], str] | None = None) -> str:
    """`prompts` as a prompts file for `load_prompts`: one object per line and coordinates to a thousandth of a
    pixel (a click mapped from the page's display size has many more digits), for reading and diffs. With
    `frame_size` (width, height) the file records it, and prompts read from it refuse a video of another size.
    A mask prompt is written as the name `mask_names` gives its (object id, frame): a picture beside the file."""
    def number(value: float) -> float | int:
        return int(value) if float(value).is_integer() else round(float(value), 3)

    mask_names = mask_names or {}
    if unnamed := [p for p in prompts if p.mask is not None and (p.object_id, p.frame) not in mask_names]:
        raise PromptError(f"object {unnamed[0].object_id}'s prompt on frame {unnamed[0].frame} is a mask, which a "
                          'prompts file names as a picture beside it ("mask": "name.png"), not as text')

    lines = [json.dumps({"id": p.object_id, "frame": p.frame, "mask": mask_names[p.object_id, p.frame]})
             if p.mask is not None else
             json.dumps({"id": p.object_id, "frame": p.frame, "points": [[number(x), number(y)] for x, y in p.points],
                         "labels": list(p.labels), "box": None if p.box is None else [number(v) for v in p.box],
                         **({"correct": True} if p.correct else {})})
             for p in prompts]
    size = "" if frame_size is None else f'"frame_size": [{frame_size[0]}, {frame_size[1]}],\n '
    return '{' + size + '"objects": [\n  ' + ",\n  ".join(lines) + "\n]}\n"


def write_prompts(path: Path, prompts: Sequence[ObjectPrompt], frame_size: tuple[int, int] | None = None
                  ) -> list[Path]:
    """`prompts` as a prompts file at `path`, each mask a black-and-white PNG beside it that the file names
    (`clip_prompts_object1_frame0.png`): what `load_prompts` reads back. Returns the file and the pictures."""
    pictures = {}
    for prompt in prompts:
        if prompt.mask is not None:
            picture = path.with_name(f"{path.stem}_object{prompt.object_id}_frame{prompt.frame}.png")
            Image.fromarray(prompt.mask.astype(bool)).save(picture)
            pictures[prompt.object_id, prompt.frame] = picture
    path.write_text(prompts_to_text(prompts, frame_size, {key: picture.name for key, picture in pictures.items()}),
                    encoding="utf-8")
    return [path, *pictures.values()]


def prompts_from_text(text: str, source: str = "the prompts", folder: Path | None = None,
                      pictures: Mapping[str, Path] | None = None) -> list[ObjectPrompt]:
    """Prompts from JSON text (a prompts file's content, or what an API client sends); masks are read from
    `folder` or `pictures` (see `prompts_from_json`)."""
    if not text.strip():
        raise PromptError(f'{source} is empty: give JSON such as {{"objects": [{{"points": [[x, y]]}}]}} '
                          "(see the README)")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise PromptError(f"{source} is not valid JSON ({exc})") from None
    except RecursionError:  # brackets nested thousands deep: no prompts file looks like that
        raise PromptError(f"{source} is not valid prompts JSON (nested too deep)") from None
    return prompts_from_json(data, source, folder, pictures)


VOID = 255  # a palettised mask's "not labelled" index


def _mask_picture(path: Path, name: str | None = None) -> tuple[np.ndarray, bool]:
    """A mask picture's pixels, and whether they are object ids (else a bool matte); see `mask_objects`. Messages
    call it `name` where given (an upload's own name, not the server's copy of it)."""
    shown = name or str(path)
    try:
        with Image.open(path) as picture:
            picture.load()
            if picture.mode == "P":  # 255 is DAVIS's and VOC's void (unlabelled borders): not an object
                values = np.array(picture)
                return np.where(values == VOID, 0, values).astype(np.uint8), True
            if "A" in picture.getbands():
                alpha = np.array(picture.getchannel("A"))
                if alpha.min() < 255:
                    return alpha >= 128, False
            # Ids only in a lossless grey picture: a colour picture or a JPEG is a matte (a dim colour's grey
            # level, or a JPEG's ringing around it, is not an object id).
            ids_possible = picture.format != "JPEG"
            if picture.mode in ("I", "I;16", "I;16B", "I;16L"):
                values, half = np.array(picture).astype(np.int64), 32768  # half of 16 bits (PNG's open as I)
            elif picture.mode in ("L", "LA"):
                values, half = np.array(picture.getchannel("L")), 128
            else:
                bands = np.array(picture.convert("RGB"))
                ids_possible &= bool((bands == bands[..., :1]).all())  # grey levels written as colour
                values, half = np.array(picture.convert("L")), 128
    except FileNotFoundError:
        raise PromptError(f"the mask {shown} does not exist") from None
    except Image.DecompressionBombError as exc:  # over PIL's guard (179 million pixels), far beyond any video
        raise PromptError(f"the mask {shown} is too large a picture ({exc}); a mask has the video's size") from None
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        detail = str(exc).replace(str(path), shown)
        raise PromptError(f"the mask {shown} is not a picture that can be read ({detail})") from None
    if ids_possible and values.max() == 1:  # 0 and 1: a bool mask saved from numpy, whichever object it is for
        return values == 1, False
    if ids_possible and values.max() < 128:  # 0, 1, 2...: ids, as numpy masks are often saved
        return values.astype(np.uint8), True
    return values >= half, False


def mask_objects(path: str | Path) -> dict[int, np.ndarray]:
    """The objects a mask picture holds, id -> HxW bool.

    A palettised PNG (the DAVIS format of a masks zip), or a grayscale one whose
    values are all under 128 and not only 0 and 1, holds each pixel's object id
    (0: background; 255 in a palettised one is void, as DAVIS and VOC mark
    unlabelled borders). Any other picture is one object's matte, given id 1:
    where it is bright (half grey or more), or, with an alpha channel not opaque
    throughout, where it is opaque; a grayscale one of 0 and 1 only (a bool mask
    saved from numpy), where it is 1.
    """
    values, ids = _mask_picture(Path(path))
    objects = {int(i): values == i for i in np.unique(values) if i} if ids else {1: values} if values.any() else {}
    if not objects:
        raise PromptError(f"the mask {path} holds no object: every pixel is background" + ("" if ids else
                          " (a matte's object is its bright part, half grey or more, or its opaque part)"))
    return objects


def object_mask(path: str | Path, object_id: int, name: str | None = None) -> np.ndarray:
    """Object `object_id`'s pixels in a mask picture of object ids, or the whole matte of any other picture;
    messages call it `name` where given."""
    values, ids = _mask_picture(Path(path), name)
    if not ids:
        return values
    if not values.any():  # an empty matte, not a picture of object ids that lacks this one
        raise PromptError(f"the mask {name or path} is empty: every pixel of it is 0 (black)")
    if not (values == object_id).any():
        held = ", ".join(str(i) for i in np.unique(values) if i) or "none"
        raise PromptError(f"the mask {name or path} has no pixel of object {object_id} (its objects: {held})")
    return values == object_id
