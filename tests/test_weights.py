import hashlib
import http.server
import json
import re
import socket
import threading
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from tracker import weights
from tracker.errors import WeightsError
from tracker.weights import WeightsEntry


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves `server.files` with Range support; can drop the connection after `server.cut_after` bytes."""

    def do_GET(self):  # noqa: N802 (http.server's naming)
        server = self.server
        server.requests.append({"path": self.path, "range": self.headers.get("Range")})
        data = server.files.get(self.path)
        if data is None:
            self.send_error(404)
            return
        start = 0
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        if match and server.honour_range:
            start = int(match.group(1))
            if start >= len(data):
                self.send_error(416)
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if server.cut_after is not None:
            self.wfile.write(body[: server.cut_after])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    """An HTTP server on the loopback interface only."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.files, httpd.requests, httpd.cut_after, httpd.honour_range = {}, [], None, True
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def _served(server, monkeypatch, data: bytes, *, name="blob", size=True, sha=True, layout="sam_vit_b",
            sha256=None) -> WeightsEntry:
    """Put `data` on the server and make it the manifest's only entry."""
    server.files[f"/{name}.pth"] = data
    entry = WeightsEntry(name, name.upper(), f"{server.url}/{name}.pth", f"{name}.pth",
                         len(data) if size else None,
                         (sha256 or hashlib.sha256(data).hexdigest()) if sha else None, layout)
    monkeypatch.setattr(weights, "manifest", lambda: {name: entry})
    return entry


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


BLOB = bytes(range(256)) * 4096  # 1 MiB


def test_manifest_names_the_official_files():
    sam, xmem = weights.manifest()["sam"], weights.manifest()["xmem"]
    assert sam.url == "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth"
    assert (sam.filename, sam.size, sam.layout) == ("sam_vit_b_01ec64.pth", 375042383, "sam_vit_b")
    assert sam.sha256 == "ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912"
    assert xmem.url == "https://github.com/hkchengrex/XMem/releases/download/v1.0/XMem.pth"
    assert (xmem.filename, xmem.size, xmem.sha256, xmem.layout) == ("XMem.pth", None, None, "xmem")
    note = json.loads(weights.MANIFEST_PATH.read_text())["xmem"]["note"]
    assert "trust on first use" in note and "XMem.pth.sha256" in note


def test_models_dir_defaults_to_repo_and_follows_env(monkeypatch, tmp_path):
    monkeypatch.delenv(weights.MODELS_DIR_ENV, raising=False)
    assert weights.default_path("sam") == Path(__file__).resolve().parents[1] / "models" / "sam_vit_b_01ec64.pth"
    monkeypatch.setenv(weights.MODELS_DIR_ENV, str(tmp_path))
    assert weights.default_path("xmem") == tmp_path / "XMem.pth"


def test_download_verifies_renames_and_is_not_repeated(server, monkeypatch, tmp_path, capsys):
    _served(server, monkeypatch, BLOB)
    path = weights.ensure_weights("blob", tmp_path / "sub" / "blob.pth", progress=True)
    assert path == tmp_path / "sub" / "blob.pth" and path.read_bytes() == BLOB
    assert not path.with_name("blob.pth.part").exists()
    assert "blob.pth" in capsys.readouterr().err  # the progress bar goes to stderr
    assert weights.ensure_weights("blob", path) == path
    assert len(server.requests) == 1


def test_download_resumes_an_interrupted_transfer(server, monkeypatch, tmp_path):
    _served(server, monkeypatch, BLOB)
    server.cut_after = 300_000
    with pytest.raises(WeightsError, match="run again to resume"):
        weights.ensure_weights("blob", tmp_path, progress=False)
    part = tmp_path / "blob.pth.part"
    kept = part.stat().st_size
    assert 0 < kept < len(BLOB) and not (tmp_path / "blob.pth").exists()
    server.cut_after = None
    path = weights.ensure_weights("blob", tmp_path, progress=False)
    assert server.requests[-1]["range"] == f"bytes={kept}-"
    assert path.read_bytes() == BLOB and not part.exists()


def test_complete_part_file_is_finished_without_the_network(monkeypatch, tmp_path):
    entry = WeightsEntry("blob", "BLOB", f"http://127.0.0.1:{_closed_port()}/blob.pth", "blob.pth", len(BLOB),
                         hashlib.sha256(BLOB).hexdigest(), "sam_vit_b")
    monkeypatch.setattr(weights, "manifest", lambda: {"blob": entry})
    (tmp_path / "blob.pth.part").write_bytes(BLOB)
    assert weights.ensure_weights("blob", tmp_path, progress=False).read_bytes() == BLOB
    assert not (tmp_path / "blob.pth.part").exists()


def test_download_restarts_when_the_server_ignores_range(server, monkeypatch, tmp_path):
    _served(server, monkeypatch, BLOB)
    server.honour_range = False
    (tmp_path / "blob.pth.part").write_bytes(b"x" * 1000)
    assert weights.ensure_weights("blob", tmp_path, progress=False).read_bytes() == BLOB


def test_download_with_wrong_checksum_is_removed(server, monkeypatch, tmp_path):
    _served(server, monkeypatch, BLOB, sha256="0" * 64)
    with pytest.raises(WeightsError) as err:
        weights.ensure_weights("blob", tmp_path, progress=False)
    message = str(err.value)
    assert "0" * 64 in message and hashlib.sha256(BLOB).hexdigest() in message
    assert list(tmp_path.iterdir()) == []


def test_present_file_with_wrong_size_or_content_is_refused(monkeypatch, tmp_path):
    entry = WeightsEntry("blob", "BLOB", "http://127.0.0.1:9/blob.pth", "blob.pth", len(BLOB),
                         hashlib.sha256(BLOB).hexdigest(), "sam_vit_b")
    monkeypatch.setattr(weights, "manifest", lambda: {"blob": entry})
    path = tmp_path / "blob.pth"
    path.write_bytes(BLOB[:-1])
    with pytest.raises(WeightsError, match=f"has {len(BLOB) - 1} bytes .* has {len(BLOB)}: delete .* and fetch "
                       r"it afresh: python -m tracker weights download \(or run again without --no-download\)"):
        weights.ensure_weights("blob", path, download=False)  # a run again with --no-download would not fetch it
    path.write_bytes(BLOB[::-1])
    with pytest.raises(WeightsError) as err:
        weights.ensure_weights("blob", path)
    assert f"sha256 {hashlib.sha256(BLOB[::-1]).hexdigest()}, expected {entry.sha256}" in str(err.value)
    assert str(err.value).endswith(f"delete {path} and run again, which fetches it afresh (or: python -m tracker "
                                   "weights download)"), "the run did not forbid downloads: no word of --no-download"



def test_offline_error_says_what_to_download_and_where(monkeypatch, tmp_path):
    entry = replace(weights.manifest()["sam"], url=f"http://127.0.0.1:{_closed_port()}/sam_vit_b_01ec64.pth")
    monkeypatch.setattr(weights, "manifest", lambda: {"sam": entry})
    monkeypatch.setenv(weights.MODELS_DIR_ENV, str(tmp_path))
    with pytest.raises(WeightsError) as err:
        weights.ensure_weights("sam", progress=False)
    message = str(err.value)
    assert "\n" not in message
    assert f"download {entry.url} and save it as {tmp_path / 'sam_vit_b_01ec64.pth'}" in message
    assert "375042383 bytes" in message and entry.sha256 in message


def test_missing_file_without_download_says_what_to_fetch(tmp_path):
    with pytest.raises(WeightsError, match=f"not found at {tmp_path / 'absent.pth'}: download "
                                           "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth"):
        weights.ensure_weights("sam", tmp_path / "absent.pth", download=False)


def test_xmem_hash_is_recorded_on_first_download_then_enforced(server, monkeypatch, tmp_path, capsys,
                                                               untrained_checkpoints):
    data = untrained_checkpoints["xmem"].read_bytes()
    _served(server, monkeypatch, data, name="xmem", size=False, sha=False, layout="xmem")
    path = weights.ensure_weights("xmem", tmp_path, progress=False)
    record = tmp_path / "xmem.pth.sha256"
    assert record.read_text().split()[0] == hashlib.sha256(data).hexdigest()
    assert "trust on first use" in capsys.readouterr().err
    assert weights.checkpoint_status(path) == "official"
    other = tmp_path / "other.pth"  # a different, well-formed XMem checkpoint
    torch.save(weights.untrained_state_dict("xmem", seed=1), other)
    path.write_bytes(other.read_bytes())
    with pytest.raises(WeightsError, match="recorded on its first download.*delete"):
        weights.ensure_weights("xmem", path)
    path.unlink()
    server.files["/xmem.pth"] = other.read_bytes()
    with pytest.raises(WeightsError, match="recorded on its first download"):  # a re-download must match too
        weights.ensure_weights("xmem", path, progress=False)
    assert not path.exists()


def test_xmem_download_in_the_wrong_layout_is_refused(server, monkeypatch, tmp_path):
    bad = tmp_path / "bad.pth"
    torch.save({"conv.weight": torch.zeros(2, 2)}, bad)
    _served(server, monkeypatch, bad.read_bytes(), name="xmem", size=False, sha=False, layout="xmem")
    with pytest.raises(WeightsError, match="not in the XMem layout: missing key 'key_encoder.conv1.weight'"):
        weights.ensure_weights("xmem", tmp_path / "dl" / "XMem.pth", progress=False)
    assert list((tmp_path / "dl").iterdir()) == []


def test_verify_layout_names_the_first_problem(untrained_checkpoints):
    sam = weights.load_checkpoint(untrained_checkpoints["sam"])
    xmem = weights.load_checkpoint(untrained_checkpoints["xmem"])
    weights.verify_layout(sam, "sam_vit_b")
    weights.verify_layout(xmem, "xmem")
    with pytest.raises(WeightsError, match="checkpoint sam.pth is not in the XMem layout: missing key "
                                           "'key_encoder.conv1.weight' .*looks like SAM ViT-B weights given in "
                                           "place of XMem weights"):
        weights.verify_layout(sam, "xmem", source="sam.pth")
    first = next(iter(xmem))
    with pytest.raises(WeightsError, match=f"key '{first}' has shape 64x3x7x6, expected 64x3x7x7"):
        weights.verify_layout({**xmem, first: torch.zeros(64, 3, 7, 6)}, "xmem")
    with pytest.raises(WeightsError, match="unexpected key 'extra'"):
        weights.verify_layout({**xmem, "extra": torch.zeros(1)}, "xmem")
    without_counters = {k: v for k, v in xmem.items() if not k.endswith("num_batches_tracked")}
    assert len(without_counters) < len(xmem)
    weights.verify_layout(without_counters, "xmem")


def test_untrained_checkpoints_load_strictly_into_the_real_models(untrained_checkpoints):
    from XMem.model.network import XMem

    sam_model = weights.build_model("sam_vit_b")
    sam_model.load_state_dict(weights.load_checkpoint(untrained_checkpoints["sam"]), strict=True)
    xmem_model = XMem(dict(weights.XMEM_DEFAULT_CONFIG))
    xmem_model.load_state_dict(weights.load_checkpoint(untrained_checkpoints["xmem"]), strict=True)
    for name, path in untrained_checkpoints.items():
        assert path.name == weights.UNTRAINED_FILENAMES[name]
        sidecar = json.loads(path.with_name(path.name + ".json").read_text())
        assert sidecar["untrained"] is True and sidecar["layout"] == weights.manifest()[name].layout
        assert weights.checkpoint_status(path) == "untrained"
        assert weights.checkpoint_warning(path).startswith(weights.UNTRAINED_WARNING)


def test_untrained_weights_replace_only_untrained_files_unless_forced(tmp_path, monkeypatch):
    """An official checkpoint saved under an untrained one's name was replaced without a word: a download lost."""
    monkeypatch.setattr(weights, "untrained_state_dict", lambda layout, seed=0: {"w": torch.zeros(1)})
    paths = weights.write_untrained(tmp_path)
    assert weights.write_untrained(tmp_path) == paths  # a rerun replaces its own files
    official = b"the official XMem checkpoint"
    entries = {**weights.manifest(), "xmem": replace(weights.manifest()["xmem"],
                                                     sha256=hashlib.sha256(official).hexdigest())}
    monkeypatch.setattr(weights, "manifest", lambda: entries)
    paths["xmem"].with_suffix(".pth.json").unlink()  # a user's file has no sidecar
    for content, what in ((official, "an official checkpoint"), (b"a user's file", "not a checkpoint")):
        paths["xmem"].write_bytes(content)
        sam_file = paths["sam"].stat().st_ino
        with pytest.raises(WeightsError, match=rf"^{re.escape(str(paths['xmem']))} is {what}[^,]*, not an untrained "
                                               r"one; move it elsewhere first, or pass --force"):
            weights.write_untrained(tmp_path)
        assert paths["xmem"].read_bytes() == content and paths["sam"].stat().st_ino == sam_file  # nothing written
    weights.write_untrained(tmp_path, force=True)
    assert weights.checkpoint_status(paths["xmem"]) == "untrained"
    # A folder where a checkpoint, its sidecar or their temporary files go: one line, nothing written.
    for folder in (paths["sam"], tmp_path / "sam_vit_b_untrained.pth.json", tmp_path / "XMem_untrained.pth.tmp",
                   tmp_path / "XMem_untrained.pth.json.tmp"):
        folder.unlink(missing_ok=True)
        folder.mkdir()
        before = {path: path.stat().st_mtime_ns for path in tmp_path.iterdir()}
        for force in (False, True):
            with pytest.raises(WeightsError, match=rf"^{re.escape(str(folder))} is a folder, where the untrained "
                                                   r"checkpoint writes a file; move it elsewhere first \(--force "
                                                   r"replaces files only\)$"):
                weights.write_untrained(tmp_path, force=force)
        assert {path: path.stat().st_mtime_ns for path in tmp_path.iterdir()} == before
        folder.rmdir()
        weights.write_untrained(tmp_path, force=True)


def test_untrained_weights_are_deterministic_and_leave_the_global_rng_alone():
    rng_state = torch.random.get_rng_state()
    first, again = weights.untrained_state_dict("xmem", 0), weights.untrained_state_dict("xmem", 0)
    other = weights.untrained_state_dict("xmem", 1)
    assert torch.equal(rng_state, torch.random.get_rng_state())
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first["key_encoder.conv1.weight"], other["key_encoder.conv1.weight"])


def test_truncated_checkpoint_names_the_file_and_the_remedy(untrained_checkpoints, tmp_path):
    cut = tmp_path / "XMem.pth"
    data = untrained_checkpoints["xmem"].read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    remedy = "give the checkpoint file itself"  # a file outside models/ is the user's: not "delete it"
    with pytest.raises(WeightsError, match=f"cannot read checkpoint {cut} .*truncated.*{remedy}") as err:
        weights.load_checkpoint(cut)
    assert f"({len(data) // 2:,} bytes)" in str(err.value) and "miniz" not in str(err.value)  # not PyTorch's words


def test_damaged_or_wrong_checkpoint_names_the_official_file(untrained_checkpoints, tmp_path, monkeypatch):
    """What the README promises for a truncated or wrong checkpoint: URL, size and SHA-256, where to put it
    (in models/; a file the user named elsewhere is not for us to replace)."""
    monkeypatch.setenv(weights.MODELS_DIR_ENV, str(tmp_path / "models"))
    (tmp_path / "models").mkdir()
    sam, xmem = weights.manifest()["sam"], weights.manifest()["xmem"]
    for name, entry, facts in (("xmem", xmem, "no published size or sha256"),
                               ("sam", sam, f"{sam.size} bytes, sha256 {sam.sha256}")):
        cut = tmp_path / "models" / f"cut_{name}.pth"
        with untrained_checkpoints[name].open("rb") as source:
            cut.write_bytes(source.read(1 << 20))
        with pytest.raises(WeightsError, match="truncated.*delete it and download it again") as err:
            weights.checkpoint_status(cut, entry.layout)
        assert f"from {entry.url} ({facts}" in str(err.value) and str(err.value).endswith(f" to {cut}")
        elsewhere = cut.rename(tmp_path / cut.name)
        with pytest.raises(WeightsError, match="truncated.*give the checkpoint file itself .the official one: ") as err:
            weights.checkpoint_status(elsewhere, entry.layout)
        assert f"{entry.url} ({facts}" in str(err.value) and "delete" not in str(err.value)
    with pytest.raises(WeightsError, match="not in the XMem layout") as err:
        weights.verify_layout({"w": torch.zeros(1)}, "xmem")
    assert f"pass the official XMem checkpoint, {xmem.url} (no published size or sha256" in str(err.value)


def test_missing_user_checkpoint_says_to_save_it_where_it_was_looked_for(tmp_path):
    path = tmp_path / "elsewhere" / "sam.pth"
    with pytest.raises(WeightsError) as err:
        weights.resolve_checkpoint("sam", path, download=False)
    assert f"save it as {path} (375042383 bytes" in str(err.value)


def test_the_official_files_own_place_given_as_the_checkpoint_is_fetched_there(server, monkeypatch, tmp_path):
    """`--checkpoint models/sam_vit_b_01ec64.pth` (as the README's export commands say) downloads on first use."""
    _served(server, monkeypatch, BLOB)
    monkeypatch.setenv(weights.MODELS_DIR_ENV, str(tmp_path / "models"))
    monkeypatch.chdir(tmp_path)
    assert weights.resolve_checkpoint("blob", Path("models") / "blob.pth", progress=False) == tmp_path / "models" / \
        "blob.pth"
    assert (tmp_path / "models" / "blob.pth").read_bytes() == BLOB and len(server.requests) == 1
    with pytest.raises(WeightsError, match="does not exist"):  # elsewhere: the user's own file, never fetched
        weights.resolve_checkpoint("blob", tmp_path / "blob.pth", progress=False)


def test_checkpoint_status(untrained_checkpoints, tmp_path, monkeypatch):
    for name, layout in (("xmem", "xmem"), ("sam", "sam_vit_b")):  # copied without its sidecar: its values tell
        renamed = tmp_path / f"renamed_{name}.pth"
        renamed.symlink_to(untrained_checkpoints[name])
        assert weights.checkpoint_status(renamed, layout) == "untrained"
        assert weights.checkpoint_warning(renamed).startswith(weights.UNTRAINED_WARNING)
    state = weights.load_checkpoint(untrained_checkpoints["xmem"])
    for key in state:
        if key.endswith("running_mean"):
            state[key] += 0.1  # statistics a training would have moved
    copy = tmp_path / "copy.pth"
    torch.save(state, copy)
    assert weights.checkpoint_status(copy) == "unverified"
    assert weights.checkpoint_status(copy, "xmem") == "unverified"
    assert weights.checkpoint_warning(copy).startswith("UNVERIFIED WEIGHTS")
    with pytest.raises(WeightsError, match="not in the SAM ViT-B layout"):
        weights.checkpoint_status(copy, "sam_vit_b")
    official = replace(weights.manifest()["xmem"], sha256=weights.file_sha256(copy))
    monkeypatch.setattr(weights, "manifest", lambda: {"xmem": official})
    assert weights.checkpoint_status(copy) == "official" and weights.checkpoint_warning(copy) is None
    monkeypatch.undo()
    junk = tmp_path / "junk.pth"
    torch.save({"w": torch.zeros(1)}, junk)
    with pytest.raises(WeightsError, match="matches no known layout"):
        weights.checkpoint_status(junk)


def test_download_all_fetches_every_manifest_entry(server, monkeypatch, tmp_path):
    entries = {}
    for name, data in (("a", BLOB), ("b", BLOB[::-1])):
        server.files[f"/{name}.pth"] = data
        entries[name] = WeightsEntry(name, name, f"{server.url}/{name}.pth", f"{name}.pth", len(data),
                                     hashlib.sha256(data).hexdigest(), "sam_vit_b")
    monkeypatch.setattr(weights, "manifest", lambda: entries)
    monkeypatch.setenv(weights.MODELS_DIR_ENV, str(tmp_path))
    paths = weights.download_all(progress=False)
    assert paths == {"a": tmp_path / "a.pth", "b": tmp_path / "b.pth"}
    assert paths["b"].read_bytes() == BLOB[::-1]


def test_download_all_names_every_file_it_could_not_fetch(server, monkeypatch, tmp_path):
    """Offline, one run must list every URL and path to fetch by hand, not only the first."""
    entries = {name: WeightsEntry(name, name.upper(), f"{server.url}/{name}.pth", f"{name}.pth", len(BLOB),
                                  hashlib.sha256(BLOB).hexdigest(), "sam_vit_b") for name in ("a", "b", "c")}
    server.files["/b.pth"] = BLOB  # a and c are missing on the server
    monkeypatch.setattr(weights, "manifest", lambda: entries)
    monkeypatch.setenv(weights.MODELS_DIR_ENV, str(tmp_path))
    with pytest.raises(WeightsError) as err:
        weights.download_all(progress=False)
    message = str(err.value)
    assert f"{server.url}/a.pth" in message and f"{server.url}/c.pth" in message and "b.pth" not in message
    assert (tmp_path / "b.pth").read_bytes() == BLOB  # the one that could be fetched was


def test_a_folder_given_as_checkpoint_is_named_a_folder(tmp_path):
    with pytest.raises(WeightsError, match="SAM ViT-B checkpoint .* is a folder; give the checkpoint file itself"):
        weights.resolve_checkpoint("sam", tmp_path)
