"""Weights cache: mirror pulls, sha256 enforcement, trust on first use, resumable HTTP downloads
(against a local Range-capable server), and the `weights` commands' exit codes. No network, no
models: the files are random bytes described by a temporary manifest."""

from __future__ import annotations

import hashlib
import http.server
import json
import re
import threading
from pathlib import Path

import pytest
import yaml

from vaepack import weights as W
from vaepack.errors import WeightsError
from vaepack.manifest import get_model, load_manifest
from vaepack.paths import manifest_path

SIZE = 200_000


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


class Zoo:
    """A manifest with fake single-file models, a mirror folder and a private cache."""

    def __init__(self, root: Path, mp: pytest.MonkeyPatch):
        self.root = root
        self.mirror = root / "mirror"
        self.mirror.mkdir()
        self.home = root / "home"
        self.manifest = root / "manifest.yaml"
        self.data = {"version": 1, "spaces": {"sd1": {"channels": 4, "factor": 8}}, "aliases": {}, "models": {}}
        self.mp = mp
        mp.setenv("VAEPACK_MANIFEST", str(self.manifest))
        mp.setenv("VAEPACK_MIRROR", str(self.mirror))
        mp.setenv("VAEPACK_HOME", str(self.home))

    def add(self, mid: str, payload: bytes, *, sha: str | None | bool = True, size: bool = True,
            url: str | None = None, in_mirror: bool = True) -> str:
        name = f"{mid}.bin"
        if in_mirror:
            (self.mirror / name).write_bytes(payload)
        spec = {"name": name, "url": url, "size": len(payload) if size else None,
                "sha256": _sha(payload) if sha is True else (sha or None)}
        self.data["models"][mid] = {"description": "fake", "license": "MIT", "space": "sd1",
                                    "parts": {"encoder": {"family": "tae", "config": {}, "files": [spec]}}}
        self.manifest.write_text(yaml.safe_dump(self.data))
        return name

    def cached(self, name: str) -> Path:
        return self.home / "weights" / name


@pytest.fixture
def zoo(tmp_path, monkeypatch):
    return Zoo(tmp_path, monkeypatch)


def _payload(seed: int, n: int = SIZE) -> bytes:
    import random

    return random.Random(seed).randbytes(n)


# --------------------------------------------------------------------------- local HTTP server
class _RangeHandler(http.server.BaseHTTPRequestHandler):
    """Serves server.files; honours ``Range: bytes=N-``; ``server.cut`` truncates the next body."""

    def do_GET(self):  # noqa: N802
        data = self.server.files.get(self.path.lstrip("/"))
        rng = self.headers.get("Range")
        self.server.requests.append((self.path, rng))
        if data is None:
            self.send_error(404)
            return
        start = 0
        if rng:
            m = re.fullmatch(r"bytes=(\d+)-", rng)
            start = int(m.group(1)) if m else 0
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        cut, self.server.cut = self.server.cut, None
        self.wfile.write(body if cut is None else body[:cut])
        if cut is not None:
            self.close_connection = True

    def log_message(self, *args):
        pass


@pytest.fixture
def http_server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _RangeHandler)
    srv.files, srv.requests, srv.cut = {}, [], None
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}"
    yield srv
    srv.shutdown()
    srv.server_close()


# --------------------------------------------------------------------------- mirror + sha256
def test_pull_from_mirror_folder(zoo, run_cli):
    data = _payload(1)
    name = zoo.add("m1", data)
    code, out, err = run_cli("weights", "pull", "m1", "--json")
    assert code == 0, err
    rep = json.loads(out)
    assert rep["files"][0]["sha256"] == _sha(data)
    assert zoo.cached(name).read_bytes() == data
    assert not zoo.cached(name + ".part").exists()
    # Cached now: a second pull does not need the mirror.
    (zoo.mirror / name).unlink()
    assert run_cli("weights", "pull", "m1")[0] == 0


def test_sha256_mismatch_deletes_and_raises(zoo, run_cli, clean_error):
    data = _payload(2)
    name = zoo.add("m2", data, sha=_sha(b"something else"))
    with pytest.raises(WeightsError, match="sha256 mismatch") as ei:
        W.pull(get_model("m2"))
    assert "m2.bin" in str(ei.value) and "deleted" in str(ei.value)
    assert not zoo.cached(name).exists() and not zoo.cached(name + ".part").exists()
    code, _, err = run_cli("weights", "pull", "m2")
    assert code == 1
    clean_error(err, "m2.bin", "sha256 mismatch")
    assert not zoo.cached(name).exists()


def test_size_mismatch_is_refused(zoo):
    data = _payload(3)
    zoo.add("m3", data)
    zoo.data["models"]["m3"]["parts"]["encoder"]["files"][0]["size"] = SIZE + 1
    zoo.manifest.write_text(yaml.safe_dump(zoo.data))
    with pytest.raises(WeightsError, match=f"expected {SIZE + 1}"):
        W.pull(get_model("m3"))


def test_tampered_cached_file_detected_by_verify(zoo, run_cli):
    data = _payload(4)
    name = zoo.add("m4", data)
    assert run_cli("weights", "pull", "m4")[0] == 0
    code, out, _ = run_cli("weights", "verify", "m4", "--json")
    assert code == 0 and json.loads(out)["files"][0]["status"] == "ok"
    f = zoo.cached(name)
    b = bytearray(f.read_bytes())
    b[1000] ^= 0xFF
    f.write_bytes(bytes(b))
    code, out, err = run_cli("weights", "verify", "m4")
    assert code == 1
    assert "bad" in err and "sha256 mismatch" in err and "Traceback" not in err
    code, out, _ = run_cli("weights", "verify", "--json")  # every cached model
    assert code == 1
    assert [r["status"] for r in json.loads(out)["files"] if r["model"] == "m4"] == ["bad"]
    # Using the model never silently swaps the file: ensure() refuses it ...
    with pytest.raises(WeightsError, match="sha256 mismatch"):
        W.ensure(get_model("m4"), "encoder")
    assert f.read_bytes() == bytes(b)
    # ... and an explicit pull replaces it from the mirror.
    assert run_cli("weights", "pull", "m4")[0] == 0
    assert f.read_bytes() == data


def test_verify_missing_file_of_named_model_fails(zoo, run_cli):
    zoo.add("m5", _payload(5))
    code, out, _ = run_cli("weights", "verify", "m5", "--json")
    assert code == 1 and json.loads(out)["files"][0]["status"] == "missing"


# --------------------------------------------------------------------------- trust on first use
def test_null_hash_is_trusted_on_first_use_then_enforced(zoo, run_cli):
    data = _payload(6)
    name = zoo.add("m6", data, sha=None, size=False)
    code, out, err = run_cli("weights", "pull", "m6")
    assert code == 0, err
    assert "warning:" in err and "no published sha256" in err and _sha(data) in err
    tofu = json.loads((zoo.home / "tofu.json").read_text())
    assert tofu == {name: _sha(data)}
    # Second pull: already trusted, no new warning.
    code, _, err = run_cli("weights", "pull", "m6")
    assert code == 0 and "warning" not in err
    # The cached file changes: verify fails.
    zoo.cached(name).write_bytes(_payload(7))
    assert run_cli("weights", "verify", "m6")[0] == 1
    # The source changes too: the pull is refused against the recorded hash, nothing installed.
    (zoo.mirror / name).write_bytes(_payload(7))
    code, _, err = run_cli("weights", "pull", "m6")
    assert code == 1 and "sha256 mismatch" in err and "Traceback" not in err
    assert not zoo.cached(name).exists()
    assert json.loads((zoo.home / "tofu.json").read_text()) == {name: _sha(data)}


# --------------------------------------------------------------------------- HTTP resume
def _http_entry(zoo, srv, mid, data, **kw):
    zoo.mp.delenv("VAEPACK_MIRROR")
    srv.files[f"{mid}.bin"] = data
    return zoo.add(mid, data, url=f"{srv.url}/{mid}.bin", in_mirror=False, **kw)


def test_interrupted_download_keeps_part_and_resumes(zoo, http_server, run_cli):
    data = _payload(8)
    name = _http_entry(zoo, http_server, "h1", data)
    part = zoo.cached(name + ".part")
    http_server.cut = SIZE // 3  # the connection drops after a third
    code, _, err = run_cli("weights", "pull", "h1")
    assert code == 1 and "connection closed" in err and "Traceback" not in err
    assert part.stat().st_size == SIZE // 3 and not zoo.cached(name).exists()
    code, _, err = run_cli("weights", "pull", "h1")
    assert code == 0, err
    assert http_server.requests[-1] == ("/h1.bin", f"bytes={SIZE // 3}-")
    assert zoo.cached(name).read_bytes() == data and not part.exists()


def test_truncated_download_of_null_hash_entry_is_not_trusted(zoo, http_server, run_cli):
    data = _payload(9)
    name = _http_entry(zoo, http_server, "h2", data, sha=None, size=False)
    http_server.cut = 1000
    assert run_cli("weights", "pull", "h2")[0] == 1
    assert not (zoo.home / "tofu.json").exists() and not zoo.cached(name).exists()
    assert run_cli("weights", "pull", "h2")[0] == 0
    assert json.loads((zoo.home / "tofu.json").read_text()) == {name: _sha(data)}


def test_resume_from_a_complete_part(zoo, http_server, run_cli):
    """Interrupted between download and rename: the server answers 416; the .part is verified."""
    data = _payload(10)
    name = _http_entry(zoo, http_server, "h3", data)
    zoo.cached(name).parent.mkdir(parents=True)
    zoo.cached(name + ".part").write_bytes(data)
    code, _, err = run_cli("weights", "pull", "h3")
    assert code == 0, err
    assert zoo.cached(name).read_bytes() == data


def test_clear_partial_starts_over(zoo, http_server, run_cli):
    data = _payload(11)
    name = _http_entry(zoo, http_server, "h4", data)
    part = zoo.cached(name + ".part")
    part.parent.mkdir(parents=True)
    part.write_bytes(b"\0" * 5000)  # a stale partial from some other file
    code, _, err = run_cli("weights", "pull", "h4", "--clear-partial")
    assert code == 0, err
    assert http_server.requests[-1] == ("/h4.bin", None)  # no Range: started over
    assert zoo.cached(name).read_bytes() == data
    # Without --clear-partial the same stale partial is resumed, fails the hash and is deleted.
    zoo.cached(name).unlink()
    part.write_bytes(b"\0" * 5000)
    code, _, err = run_cli("weights", "pull", "h4")
    assert code == 1 and "sha256 mismatch" in err
    assert not part.exists() and not zoo.cached(name).exists()


def test_url_mirror_is_tried_before_upstream(zoo, http_server, run_cli):
    data = _payload(12)
    name = zoo.add("h5", data, url="http://127.0.0.1:9/nowhere/h5.bin", in_mirror=False)
    http_server.files[name] = data
    zoo.mp.setenv("VAEPACK_MIRROR", http_server.url)
    code, _, err = run_cli("weights", "pull", "h5")
    assert code == 0, err
    assert http_server.requests == [(f"/{name}", None)]


# --------------------------------------------------------------------------- commands
def test_unknown_model_suggests_close_names(run_cli, clean_error):
    code, _, err = run_cli("weights", "pull", "taef3")
    assert code == 2
    clean_error(err, "unknown model 'taef3'", "did you mean", "taef2")


def test_weights_list_json_lists_every_model(run_cli, tmp_path, monkeypatch):
    monkeypatch.setenv("VAEPACK_HOME", str(tmp_path / "empty"))
    code, out, _ = run_cli("weights", "list", "--json")
    assert code == 0
    rep = json.loads(out)
    ids = [r["id"] for r in rep["models"]]
    assert ids == list(load_manifest().models) and len(ids) >= 10
    assert {"taef2", "taesana", "flux2-vae"} <= set(ids)
    entries = load_manifest().models
    for r in rep["models"]:
        files = [f for p in entries[r["id"]].parts.values() for f in p.files]
        # Nothing is cached: only embedded files are present, so a model mixing an embedded part
        # with a downloadable one (taef2-eps: TAEF2 encoder + shipped eps decoder) is "partial".
        want = ("embedded" if all(f.embedded for f in files) else
                "partial" if any(f.embedded for f in files) else "not cached")
        assert r["status"] == want, r
    assert rep["manifest"] == str(manifest_path())


def test_weights_list_status_after_pull(zoo, run_cli):
    zoo.add("a", _payload(13))
    zoo.add("b", _payload(14))
    assert run_cli("weights", "pull", "a")[0] == 0
    code, out, _ = run_cli("weights", "list", "--json")
    st = {r["id"]: r["status"] for r in json.loads(out)["models"]}
    assert st == {"a": "cached", "b": "not cached"}


def test_weights_path_exit_codes(zoo, run_cli):
    name = zoo.add("p1", _payload(15))
    code, out, err = run_cli("weights", "path", "p1")
    assert code == 1 and out.strip() == str(zoo.cached(name)) and "weights pull p1" in err
    assert not zoo.cached(name).exists()  # path pulls nothing
    assert run_cli("weights", "pull", "p1")[0] == 0
    code, out, _ = run_cli("weights", "path", "p1")
    assert code == 0 and out.strip() == str(zoo.cached(name))
    assert run_cli("weights", "path", "p1", "--part", "encoder")[0] == 0
    assert run_cli("weights", "path", "p1", "--part", "decoder")[0] == 2
    assert run_cli("weights", "path", "nosuch")[0] == 2


def test_weights_path_lists_a_shared_file_once(run_cli, tmp_path, monkeypatch):
    monkeypatch.setenv("VAEPACK_HOME", str(tmp_path / "empty"))
    code, out, _ = run_cli("weights", "path", "taesd")  # encoder and decoder share one file
    assert code == 1 and len(out.split()) == 1


def test_unknown_model_in_a_subprocess_has_no_traceback(run_cli_subprocess, clean_error):
    code, out, err = run_cli_subprocess("weights", "path", "taesanna")
    assert code == 2 and out == ""
    clean_error(err, "taesanna", "did you mean", "taesana")
