"""Model checkpoints: where they live, how they arrive, and proof they are the right files.

Checkpoints are large and downloaded on first use, so a transfer must survive
interruptions (HTTP resume of a ``.part`` file, atomic rename) and a finished
file must be the one the manifest names (size + sha256). XMem's release has no
published checksum: its file is checked against the network's key/shape layout
and the sha256 seen on the first download is enforced afterwards.
Untrained checkpoints in the official layouts let tests and CI run the whole
pipeline without any download.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import http.client
import json
import os
import re
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from tqdm import tqdm

from tracker.errors import WeightsError

REPO_ROOT = Path(__file__).resolve().parents[1]
MANIFEST_PATH = REPO_ROOT / "models" / "manifest.json"
MODELS_DIR_ENV = "TRACKER_MODELS_DIR"
UNTRAINED_WARNING = "UNTRAINED WEIGHTS: masks are meaningless; they only exercise the pipeline"
XMEM_DEFAULT_CONFIG = {"key_dim": 64, "value_dim": 512, "hidden_dim": 64}
UNTRAINED_FILENAMES = {"sam": "sam_vit_b_untrained.pth", "xmem": "XMem_untrained.pth"}
LAYOUT_TITLES = {"sam_vit_b": "SAM ViT-B", "xmem": "XMem"}

_CHUNK = 1 << 20
_TIMEOUT_S = 30
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")

CheckpointStatus = Literal["official", "untrained", "unverified"]


@dataclass(frozen=True)
class WeightsEntry:
    """One official checkpoint from models/manifest.json (size/sha256 None when unpublished)."""

    name: str
    title: str
    url: str
    filename: str
    size: int | None
    sha256: str | None
    layout: str


@functools.cache
def manifest() -> dict[str, WeightsEntry]:
    """The official checkpoints by name ("sam", "xmem")."""
    data = json.loads(MANIFEST_PATH.read_text())
    return {
        name: WeightsEntry(name, e["title"], e["url"], e["filename"], e["size"], e["sha256"], e["layout"])
        for name, e in data.items()
    }


def models_dir() -> Path:
    """Where official checkpoints are kept: $TRACKER_MODELS_DIR, else models/ in the repository."""
    override = os.environ.get(MODELS_DIR_ENV)
    return Path(override).expanduser().absolute() if override else REPO_ROOT / "models"


def default_path(name: str) -> Path:
    """Where `ensure_weights(name)` keeps the checkpoint when no path is given."""
    return models_dir() / _entry(name).filename


def ensure_weights(name: str, path: str | Path | None = None, *, download: bool = True,
                   progress: bool = True) -> Path:
    """Return a verified local copy of the official checkpoint `name`, downloading it if missing.

    `path` overrides the location (a directory means the manifest's file name in
    it). A present file must match the manifest's size and sha256, or for XMem
    the recorded first-download sha256, or failing that the key layout.
    """
    entry = _entry(name)
    dest = _destination(entry, path)
    if dest.exists():
        _verify_present(entry, dest, download)
        return dest
    if not download:
        raise WeightsError(f"{entry.title} weights not found at {dest}: {_by_hand(entry, dest)}")
    _download(entry, dest, progress)
    return dest


def resolve_checkpoint(name: str, path: str | Path | None = None, *, download: bool = True,
                       progress: bool = True) -> Path:
    """The checkpoint to load: the official one from models/ (fetched on first use), or the user's own file.

    A user's file may be any checkpoint in the right layout (fine-tuned,
    untrained); the layout is checked when it is loaded.
    """
    if path is None:
        return ensure_weights(name, download=download, progress=progress)
    path = Path(path).expanduser()
    if path.is_dir():
        raise WeightsError(f"{_entry(name).title} checkpoint {path} is a folder; give the checkpoint file itself")
    if not path.is_file():
        entry = _entry(name)
        if path.absolute() == _destination(entry, None).absolute():  # where the official file goes: fetched there
            return ensure_weights(name, download=download, progress=progress)
        raise WeightsError(f"{entry.title} checkpoint {path} does not exist; for the official one, "
                           f"{_by_hand(entry, path)}")
    return path


def resolve_checkpoints(paths: Mapping[str, str | Path | None], *, download: bool = True,
                        progress: bool = True) -> dict[str, Path]:
    """`resolve_checkpoint` for each name -> path given (None: the official file).

    One that fails does not stop the others, and the error names every one
    that failed: offline, the user learns all the files to fetch by hand at once.
    """
    resolved, failures = {}, []
    for name, path in paths.items():
        try:
            resolved[name] = resolve_checkpoint(name, path, download=download, progress=progress)
        except WeightsError as exc:
            failures.append(str(exc))
    if failures:
        raise WeightsError("; and ".join(failures))
    return resolved


def download_all(progress: bool = True) -> dict[str, Path]:
    """Download (or verify) every official checkpoint into models_dir() (see `resolve_checkpoints`)."""
    return resolve_checkpoints(dict.fromkeys(manifest()), progress=progress)


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file, streamed; cached while its size and mtime stay the same."""
    stat = Path(path).stat()
    return _sha256_of(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


def load_checkpoint(path: str | Path, layout: str | None = None) -> dict[str, torch.Tensor]:
    """Load a state dict on the CPU, refusing pickled code (weights_only).

    With the `layout` it should have, a damaged file's message says where the official one comes from.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    # torch.load reports damaged files through many exception types (RuntimeError from
    # the zip reader, EOFError, KeyError or UnpicklingError from the pickle reader).
    except Exception as exc:  # noqa: BLE001
        # The file in models/ is ours to replace; one the user named elsewhere (a video by mistake?) is not.
        ours = path.parent.resolve() == models_dir().resolve()
        remedy = "delete it and download it again" if ours else "give the checkpoint file itself"
        source = (f" from {_official_source(layout)} to {path}" if ours else
                  f" (the official one: {_official_source(layout)})") if layout else ""
        # PyTorch's own words (a zip reader's internals, a pickle opcode) stay in the chained exception.
        raise WeightsError(
            f"cannot read checkpoint {path} ({path.stat().st_size:,} bytes): the file is truncated, corrupt or "
            f"not a PyTorch state dict; {remedy}{source}"
        ) from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"checkpoint {path} is not a plain state dict of tensors; pass the original .pth file")
    return state


def build_model(layout: str) -> torch.nn.Module:
    """A freshly initialised network with the given checkpoint layout ("sam_vit_b" or "xmem")."""
    if layout == "sam_vit_b":
        from tracker.segment_anything_compat import sam_model_registry

        return sam_model_registry["vit_b"](checkpoint=None)
    if layout == "xmem":
        from XMem.model.network import XMem

        return XMem(dict(XMEM_DEFAULT_CONFIG))
    raise ValueError(f"unknown checkpoint layout {layout!r}; known: {', '.join(LAYOUT_TITLES)}")


@functools.cache
def expected_layout(layout: str) -> dict[str, tuple[int, ...]]:
    """Key -> shape of a checkpoint for `layout`, taken from the network itself (built without memory)."""
    with torch.device("meta"):
        return layout_of(build_model(layout))


def layout_of(network: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {key: tuple(value.shape) for key, value in network.state_dict().items()}


def verify_layout(state_dict: Mapping[str, Any], layout: str, source: str | Path | None = None,
                  network: torch.nn.Module | None = None) -> None:
    """Raise WeightsError naming the first missing/unexpected key or wrong shape.

    BatchNorm's ``num_batches_tracked`` counters may be absent: released
    checkpoints sometimes drop them and inference never reads them. A caller
    that has built the `network` to load passes it: its keys are the layout,
    and no second one is built (SAM built on the meta device imports
    torch._dynamo for its random positional encoding, seconds of a start).
    """
    problem = _layout_problem(state_dict, layout, None if network is None else layout_of(network))
    if problem is None:
        return
    title = LAYOUT_TITLES[layout]
    where = f" {source}" if source is not None else ""
    other = next((name for name in LAYOUT_TITLES if name != layout and _layout_problem(state_dict, name) is None),
                 None)
    hint = f"; it looks like {LAYOUT_TITLES[other]} weights given in place of {title} weights" if other else ""
    raise WeightsError(f"checkpoint{where} is not in the {title} layout: {problem}{hint}; "
                       f"pass the official {title} checkpoint, {_official_source(layout)}")


def untrained_state_dict(layout: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Deterministically initialised weights in `layout`; leaves the global RNG untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_model(layout).state_dict()


def untrained_paths(directory: str | Path) -> dict[str, Path]:
    """Where `write_untrained(directory)` writes each checkpoint: {"sam": path, "xmem": path}."""
    return {name: Path(directory) / filename for name, filename in UNTRAINED_FILENAMES.items()}


def write_untrained(directory: str | Path, seed: int = 0, force: bool = False) -> dict[str, Path]:
    """Write untrained SAM ViT-B and XMem checkpoints (official layouts) with `.json` sidecars.

    They exercise the whole pipeline without downloads; their masks are meaningless.
    A file already there is replaced only if it is untrained too, or with `force`: a real checkpoint saved under
    that name (official or trained) would take a download or a training to get back.
    Returns {"sam": path, "xmem": path}.
    """
    if not str(directory).strip():  # an unset shell variable, say: not the current folder
        raise WeightsError("the folder for the untrained checkpoints is empty: give a folder's path")
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        reason = "it is a file" if directory.is_file() else exc.strerror or exc
        raise WeightsError(f"cannot write checkpoints into {directory}: {reason}; give a folder") from exc
    paths = untrained_paths(directory)
    for path in paths.values():
        # The checkpoint, its sidecar, and the temporary files they are written to first.
        written = [path, _sidecar_path(path)]
        for target in [*written, *(_atomic_tmp(target) for target in written)]:
            if target.exists() and not target.is_file():
                raise WeightsError(f"{target} is a folder, where the untrained checkpoint writes a file; move it "
                                   "elsewhere first (--force replaces files only)")
        if not force:
            _check_untrained_or_absent(path)
    for name, path in paths.items():
        layout = _entry(name).layout
        with _atomic_path(path) as tmp:
            torch.save(untrained_state_dict(layout, seed), tmp)
        with _atomic_path(_sidecar_path(path)) as tmp:
            tmp.write_text(json.dumps({"untrained": True, "layout": layout, "seed": seed}, indent=2) + "\n")
    return paths


def _check_untrained_or_absent(path: Path) -> None:
    """Refuse to replace `path` unless it is missing or an untrained checkpoint (a rerun)."""
    if not path.exists():
        return
    try:
        status = checkpoint_status(path)
    except WeightsError:
        status = None
    if status != "untrained":
        what = {"official": "an official checkpoint (its SHA-256 is the official one's)",
                "unverified": "a trained checkpoint"}.get(status, "not a checkpoint")
        raise WeightsError(f"{path} is {what}, not an untrained one; move it elsewhere first, or pass --force "
                           "(force=True in Python) to replace it")


def checkpoint_status(path: str | Path, layout: str | None = None) -> CheckpointStatus:
    """Where a checkpoint comes from, so callers can warn about untrained or unknown weights.

    "official": its sha256 is in the manifest or was recorded on first download;
    "untrained": its sidecar says so, or its values are those of a fresh
    network (a copy or a renamed file has no sidecar); "unverified": anything
    else in the `layout` (any known layout when None). Other files raise WeightsError.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"checkpoint not found: {path}")
    if file_sha256(path) in _trusted_sha256s(path):
        return "official"
    sidecar = _read_sidecar(path)
    if sidecar.get("untrained") is True and layout in (None, sidecar.get("layout")):
        return "untrained"
    state = load_checkpoint(path, layout)
    if layout is not None:
        verify_layout(state, layout, source=path)
    elif all(_layout_problem(state, name) is not None for name in LAYOUT_TITLES):
        raise WeightsError(f"checkpoint {path} matches no known layout ({', '.join(LAYOUT_TITLES.values())}); "
                           "pass an official checkpoint")
    return "untrained" if never_trained(state) else "unverified"


def never_trained(state: Mapping[str, torch.Tensor]) -> bool:
    """Whether a state dict holds a network as initialised: SAM's position embedding starts at zero and XMem's
    batch norms at zero mean and unit variance, and training moves both."""
    position = state.get("image_encoder.pos_embed")
    if position is not None:
        return not bool(position.any())
    statistics = {key: value for key, value in state.items() if key.endswith(("running_mean", "running_var"))}
    return bool(statistics) and all(bool((value == float(key.endswith("var"))).all())
                                    for key, value in statistics.items())


def checkpoint_warning(path: str | Path, layout: str | None = None) -> str | None:
    """A loud one-line warning for untrained or unverified weights, None for official ones."""
    status = checkpoint_status(path, layout)
    if status == "untrained":
        return f"{UNTRAINED_WARNING} ({Path(path).name})"
    if status == "unverified":
        return (f"UNVERIFIED WEIGHTS: {path} is not an official checkpoint; "
                "results are only as good as its source")
    return None


def _entry(name: str) -> WeightsEntry:
    try:
        return manifest()[name]
    except KeyError:
        raise ValueError(f"unknown checkpoint {name!r}; known: {', '.join(manifest())}") from None


def _destination(entry: WeightsEntry, path: str | Path | None) -> Path:
    if path is None:
        return models_dir() / entry.filename
    path = Path(path).expanduser().absolute()
    return path / entry.filename if path.is_dir() else path


def _by_hand(entry: WeightsEntry, dest: Path) -> str:
    """The manual remedy: which URL, where to put it, and how to recognise it."""
    return f"download {entry.url} and save it as {dest} ({_facts(entry)})"


def _facts(entry: WeightsEntry) -> str:
    """How to recognise the official file."""
    if entry.size is not None and entry.sha256 is not None:
        return f"{entry.size} bytes, sha256 {entry.sha256}"
    return "no published size or sha256; it is checked by its key layout"


def _official_source(layout: str) -> str:
    """The URL of the official checkpoint in `layout`, and how to recognise it."""
    entry = next(entry for entry in manifest().values() if entry.layout == layout)
    return f"{entry.url} ({_facts(entry)})"


def _refetch(download: bool) -> str:
    """How a checkpoint deleted for failing its check comes back (a run with --no-download does not fetch it)."""
    if download:
        return "run again, which fetches it afresh (or: python -m tracker weights download)"
    return "fetch it afresh: python -m tracker weights download (or run again without --no-download)"


def _verify_present(entry: WeightsEntry, dest: Path, download: bool) -> None:
    actual_size = dest.stat().st_size
    if entry.size is not None and actual_size != entry.size:
        raise WeightsError(f"{dest} has {actual_size} bytes but the official {entry.title} checkpoint has "
                           f"{entry.size}: delete {dest} and {_refetch(download)}")
    expected, origin = _expected_sha256(entry, dest)
    if expected is None:
        verify_layout(load_checkpoint(dest, entry.layout), entry.layout, source=dest)
        return
    actual = file_sha256(dest)
    if actual != expected:
        remove = dest if entry.sha256 else f"{dest} and {_record_path(dest)}"
        raise WeightsError(f"{dest} has sha256 {actual}, expected {expected} (from {origin}): "
                           f"delete {remove} and {_refetch(download)}")


def _expected_sha256(entry: WeightsEntry, dest: Path) -> tuple[str | None, str]:
    """The sha256 `dest` must have and where that comes from: the manifest or a first-download record."""
    if entry.sha256 is not None:
        return entry.sha256, "the manifest"
    record = _record_path(dest)
    return _read_record(record), f"{record}, recorded on its first download"


def _download(entry: WeightsEntry, dest: Path, progress: bool) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    _fetch(entry, dest, part, progress)
    size = part.stat().st_size
    if entry.size is not None and size != entry.size:
        part.unlink()
        raise WeightsError(f"download of {entry.url} gave {size} bytes, expected {entry.size}: "
                           "the partial file was removed, run again")
    expected, origin = _expected_sha256(entry, dest)
    actual = file_sha256(part)
    if expected is not None and actual != expected:
        part.unlink()
        raise WeightsError(f"download of {entry.url} has sha256 {actual}, expected {expected} (from {origin}): "
                           "the file was removed, run again")
    if expected is None:
        try:
            verify_layout(load_checkpoint(part), entry.layout, source=entry.url)
        except WeightsError:
            part.unlink()
            raise
    os.replace(part, dest)
    if expected is None:
        record = _record_path(dest)
        with _atomic_path(record) as tmp:
            tmp.write_text(f"{actual}  {dest.name}\n")
        print(f"{entry.title}: no published sha256, so this download's sha256 {actual} was recorded in "
              f"{record} (trust on first use); a different {dest.name} will be refused from now on",
              file=sys.stderr)


def _fetch(entry: WeightsEntry, dest: Path, part: Path, progress: bool) -> None:
    """Stream `entry.url` into `part`, resuming from its current length."""
    offset = part.stat().st_size if part.exists() else 0
    if entry.size is not None and offset >= entry.size:
        if offset == entry.size:
            return
        part.unlink()
        offset = 0
    headers = {"User-Agent": "tracker-weights"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        response = urllib.request.urlopen(urllib.request.Request(entry.url, headers=headers), timeout=_TIMEOUT_S)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:  # `part` already holds the whole file: verification decides
            return
        raise WeightsError(f"cannot download {entry.title} weights (HTTP {exc.code} {exc.reason}): "
                           f"{_by_hand(entry, dest)}") from exc
    except (OSError, http.client.HTTPException) as exc:  # URLError is an OSError
        reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        raise WeightsError(f"cannot download {entry.title} weights ({_one_line(reason)}): "
                           f"{_by_hand(entry, dest)}") from exc
    with response:
        if offset and not _resumes_at(response, offset):
            offset = 0  # the server sent the whole file
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length is not None else entry.size
        received = offset
        try:
            with part.open("ab" if offset else "wb") as out, tqdm(
                total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024,
                desc=dest.name, file=sys.stderr, disable=not progress,
            ) as bar:
                while chunk := response.read(_CHUNK):
                    out.write(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
                out.flush()
                os.fsync(out.fileno())
        except (OSError, http.client.HTTPException) as exc:
            raise WeightsError(f"download of {entry.url} stopped at {part.stat().st_size} bytes "
                               f"({_one_line(exc)}): run again to resume from {part}") from exc
    if total is not None and received < total:
        raise WeightsError(f"download of {entry.url} stopped at {received} of {total} bytes: "
                           f"run again to resume from {part}")


def _resumes_at(response: http.client.HTTPResponse, offset: int) -> bool:
    """True when the server honoured our Range request from `offset`."""
    content_range = response.headers.get("Content-Range", "")
    match = re.match(r"bytes (\d+)-", content_range)
    return response.status == 206 and match is not None and int(match.group(1)) == offset


def _layout_problem(state_dict: Mapping[str, Any], layout: str,
                    expected: Mapping[str, tuple[int, ...]] | None = None) -> str | None:
    expected = expected_layout(layout) if expected is None else expected
    missing = [k for k in expected if k not in state_dict and not k.endswith("num_batches_tracked")]
    if missing:
        return (f"missing key {missing[0]!r} (expected shape {_shape(expected[missing[0]])}; "
                f"{len(missing)} missing in all)")
    unexpected = [k for k in state_dict if k not in expected]
    if unexpected:
        return f"unexpected key {unexpected[0]!r} ({len(unexpected)} unexpected in all)"
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            return f"key {key!r} holds a {type(value).__name__}, not a tensor"
        if tuple(value.shape) != expected[key]:
            return f"key {key!r} has shape {_shape(tuple(value.shape))}, expected {_shape(expected[key])}"
    return None


def _shape(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape)) if shape else "scalar"


def _record_path(checkpoint: Path) -> Path:
    return checkpoint.with_name(checkpoint.name + ".sha256")


def _sidecar_path(checkpoint: Path) -> Path:
    return checkpoint.with_name(checkpoint.name + ".json")


def _read_record(record: Path) -> str | None:
    """The sha256 recorded on first download (``sha256sum`` format), None if none was."""
    if not record.exists():
        return None
    words = record.read_text().split()
    if not words or not _SHA256_RE.match(words[0]):
        raise WeightsError(f"{record} does not hold a sha256; delete it and the checkpoint beside it, then run again")
    return words[0]


def _trusted_sha256s(path: Path) -> set[str]:
    trusted = {entry.sha256 for entry in manifest().values() if entry.sha256}
    records = [_record_path(path)] + [_record_path(default_path(name)) for name in manifest()]
    trusted.update(sha for sha in map(_read_record, records) if sha)
    return trusted


def _read_sidecar(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(_sidecar_path(path).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


@functools.lru_cache(maxsize=16)
def _sha256_of(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def _atomic_path(path: Path) -> Iterator[Path]:
    """A temporary sibling to write, renamed over `path` on success so readers never see half a file."""
    tmp = _atomic_tmp(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _atomic_tmp(path: Path) -> Path:
    """The sibling `_atomic_path` writes first."""
    return path.with_name(path.name + ".tmp")


def _one_line(value: object) -> str:
    text = str(value).strip().splitlines()
    return text[0] if text else type(value).__name__
