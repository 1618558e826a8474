"""Hub ids (issue #18): `miniblip2.load("owner/name")` and `--weights owner/name` through the real
huggingface_hub, against a cache laid out as it lays one out, with downloads off.

The cache is built by hand, file by file, the way huggingface_hub writes it
(HF_HOME/hub/models--owner--name/{blobs/<hash>, snapshots/<revision>/<file> -> ../../blobs/<hash>,
refs/main = <revision>}), and `huggingface_hub.scan_cache_dir` must read it back as a valid
repository before anything else trusts it. huggingface_hub reads HF_HOME and HF_HUB_OFFLINE when it
is imported, so the runs that use them are fresh processes with those variables set.

Downloads run against a stand-in for the hub on 127.0.0.1 (HF_ENDPOINT): a few lines of
http.server answering the four requests huggingface_hub makes (the repository's info, its file
tree, and HEAD and GET of each file), which logs them, so the test sees what was fetched: the
support files and the safetensors, never the .bin beside them. `needed_files` is also checked
on the listings real repositories have.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlparse

import pytest
from huggingface_hub import scan_cache_dir

import miniblip2
from miniblip2 import hub, shapes
from miniblip2.errors import CheckpointError
from miniblip2.shapes.shipped import SHAPES_TINY

REVISION = "0123456789abcdef0123456789abcdef01234567"  # a commit hash, as refs/main holds one


def cache_repo(hf_home: Path, repo_id: str, files: dict) -> Path:
    """Lay `files` {name: bytes} out as huggingface_hub's cache holds repo_id at REVISION."""
    repo = hf_home / "hub" / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / REVISION
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for name, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()  # LFS files are named by their sha256
        blob.write_bytes(data)
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    return snapshot


def shapes_files(without=()) -> dict:
    return {p.name: p.read_bytes() for p in sorted(SHAPES_TINY.iterdir()) if p.is_file() and p.name not in without}


# A script run in a fresh process with HF_HOME=hf_home and HF_HUB_OFFLINE=1; its stdout.
def offline_run(hf_home, script, tmp_path):
    result = subprocess.run([sys.executable, "-c", script], env=hub_env(HF_HOME=str(hf_home), HF_HUB_OFFLINE="1"),
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


def hub_env(**variables):
    return {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "MINIBLIP2_"))} | variables


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory):
    home = tmp_path_factory.mktemp("hf-home")
    cache_repo(home, "Salesforce/shapes-tiny", shapes_files())
    cache_repo(home, "Salesforce/no-weights", shapes_files(without={"model.safetensors"}))
    index = {"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors",
                                            "b": "model-00002-of-00002.safetensors"}}
    cache_repo(home, "Salesforce/one-shard", shapes_files(without={"model.safetensors"}) | {
        "model.safetensors.index.json": json.dumps(index).encode(),
        "model-00001-of-00002.safetensors": (SHAPES_TINY / "model.safetensors").read_bytes()})
    return home


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    path = tmp_path_factory.mktemp("scene") / "scene.png"
    shapes.sample(7)[0].save(path)
    return path


def test_the_cache_is_laid_out_as_huggingface_hub_reads_it(hf_home):
    info = {repo.repo_id: repo for repo in scan_cache_dir(hf_home / "hub").repos}
    assert set(info) == {"Salesforce/shapes-tiny", "Salesforce/no-weights", "Salesforce/one-shard"}
    shapes_repo = info["Salesforce/shapes-tiny"]
    (revision,) = shapes_repo.revisions
    assert revision.commit_hash == REVISION and revision.refs == {"main"}
    assert {f.file_name for f in revision.files} == {p.name for p in SHAPES_TINY.iterdir() if p.is_file()}


def test_load_caption_and_the_cli_take_a_hub_id_from_the_cache(hf_home, scene, tmp_path):
    expected = miniblip2.load(SHAPES_TINY).caption(scene)
    out = offline_run(hf_home, f"""
import miniblip2, sys
from miniblip2 import cli
model = miniblip2.load("Salesforce/shapes-tiny")
print(model.caption({str(scene)!r}))
print(miniblip2.caption({str(scene)!r}, weights="Salesforce/shapes-tiny"))
assert cli.main(["caption", {str(scene)!r}, "--weights", "Salesforce/shapes-tiny"]) == 0
assert cli.main(["download", "Salesforce/shapes-tiny"]) == 0  # offline: the complete cached copy
""", tmp_path)
    snapshot = hf_home / "hub" / "models--Salesforce--shapes-tiny" / "snapshots" / REVISION
    assert out.splitlines() == [expected] * 3 + [str(snapshot)]


def test_offline_a_missing_or_partial_hub_id_is_one_clear_error(hf_home, scene, tmp_path):
    out = offline_run(hf_home, f"""
import contextlib, io
from miniblip2 import cli
for argv in (["caption", {str(scene)!r}, "--weights", "Salesforce/not-cached"],
             ["caption", {str(scene)!r}, "--weights", "Salesforce/no-weights"],
             ["caption", {str(scene)!r}, "--weights", "Salesforce/one-shard"],
             ["download", "Salesforce/not-cached"],
             ["download", "Salesforce/shapes-tiny", "--dir", "here"]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = cli.main(argv)
    print(code, err.getvalue().strip().replace("\\n", "|"))
""", tmp_path)
    lines = out.splitlines()
    assert [line.split()[0] for line in lines] == ["2"] * 5, out
    cache = str(hf_home / "hub")
    for line, repo in zip(lines, ["not-cached", "no-weights", "one-shard", "not-cached", "shapes-tiny"]):
        assert f"miniblip2: error: Salesforce/{repo} is not a folder here" in line and "|" not in line
        assert "HF_HUB_OFFLINE=1" in line and f"miniblip2 download Salesforce/{repo}" in line
    assert f"it is not in the cache ({cache}" in lines[0]
    assert "models--Salesforce--no-weights" in lines[1] and "lacks model.safetensors (or shards" in lines[1]
    assert "lacks model-00002-of-00002.safetensors" in lines[2] and "00001" not in lines[2]
    assert f"it is not in the cache ({cache}" in lines[3]
    assert "its snapshot in the cache" in lines[4]  # --dir: a download asked for, not the cache's copy
    assert not (tmp_path / "here").exists()


def test_a_local_folder_wins_over_a_hub_id_of_the_same_spelling(tmp_path, monkeypatch, scene):
    shutil.copytree(SHAPES_TINY, tmp_path / "Salesforce" / "blip2-opt-2.7b")
    monkeypatch.chdir(tmp_path)
    assert hub.resolve("Salesforce/blip2-opt-2.7b") == "Salesforce/blip2-opt-2.7b"  # not looked up
    assert miniblip2.load("Salesforce/blip2-opt-2.7b").caption(scene) == miniblip2.load(SHAPES_TINY).caption(scene)


def test_only_owner_slash_name_is_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "weights" / "mine").mkdir(parents=True)
    assert hub.is_hub_id("Salesforce/blip2-opt-2.7b") and hub.is_hub_id(Path("Salesforce/blip2-opt-2.7b"))
    for name in ("weights/mine", "./Salesforce/blip2", "/abs/Salesforce/blip2", "a/b/c", "a--b/c", "a/b..c",
                 "blip2-opt-2.7b", "", None, b"a/b", 3):
        assert not hub.is_hub_id(name), name
    with pytest.raises(CheckpointError, match="'a/b/c' is not a Hugging Face hub id"):
        hub.download("a/b/c")


def test_a_family_loader_given_a_hub_id_says_how_to_get_the_folder():
    from miniblip2 import blip2
    with pytest.raises(CheckpointError, match=r"looks like a Hugging Face hub id: miniblip2.load\('Salesforce/x'\) "
                                              r"and --weights take those, or `miniblip2 download Salesforce/x"):
        blip2.load("Salesforce/x")


# What a download would fetch, on the listings of real repositories (abridged).
BLIP2_OPT = ["config.json", "generation_config.json", "merges.txt", "model-00001-of-00002.safetensors",
             "model-00002-of-00002.safetensors", "model.safetensors.index.json", "preprocessor_config.json",
             "processor_config.json", "pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin",
             "pytorch_model.bin.index.json", "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json",
             "vocab.json", "added_tokens.json", "README.md", ".gitattributes", "onnx/model.onnx", "tf_model.h5"]
BLIP_VQA = ["config.json", "preprocessor_config.json", "pytorch_model.bin", "special_tokens_map.json",
            "tokenizer.json", "tokenizer_config.json", "vocab.txt", "README.md", "tf_model.h5"]


@pytest.mark.parametrize("files, weights", [
    (BLIP2_OPT, ["model.safetensors.index.json", "model-00001-of-00002.safetensors",
                 "model-00002-of-00002.safetensors"]),
    (BLIP_VQA, ["pytorch_model.bin"]),  # no safetensors: the .bin, read through the allowlist
    (BLIP_VQA + ["model.safetensors"], ["model.safetensors"]),
    (["config.json", "pytorch_model.bin.index.json", "pytorch_model-00001-of-00002.bin",
      "pytorch_model-00002-of-00002.bin"], ["pytorch_model.bin.index.json", "pytorch_model-00001-of-00002.bin",
                                            "pytorch_model-00002-of-00002.bin"]),
    (["config.json", "README.md"], []),
], ids=["blip2-opt-sharded", "blip-vqa-bin-only", "safetensors-over-bin", "bin-sharded", "no-weights"])
def test_needed_files_are_the_support_files_and_one_copy_of_the_weights(files, weights):
    needed = hub.needed_files(files)
    support = [name for name in files if name in hub.SUPPORT_FILES]
    assert sorted(needed) == sorted(support + weights)
    assert "README.md" not in needed and not any("/" in name or name.endswith(".h5") for name in needed)


class StandInHub:
    """The hub's API for the repositories in `repos` {id: {file name: bytes}}, at self.url, all
    at REVISION; self.requests logs (method, path) of every request."""

    def __init__(self, repos):
        self.repos, self.requests = repos, []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self.handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def handler(hub):
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                self.answer(body=True)

            def do_HEAD(self):
                self.answer(body=False)

            def answer(self, body):
                path = urlparse(self.path).path
                hub.requests.append((self.command, path))
                parts = path.strip("/").split("/")
                if parts[:2] == ["api", "models"]:  # /api/models/ID[/revision/main | /tree/REVISION]
                    files = hub.repos.get("/".join(parts[2:4]))
                    if files is None:
                        return self.send(404, b"{}", body, {"X-Error-Code": "RepoNotFound"})
                    tree = [{"type": "file", "path": n, "size": len(d), "oid": hashlib.sha1(d).hexdigest()}
                            for n, d in files.items()]
                    info = {"id": "/".join(parts[2:4]), "sha": REVISION, "siblings": [{"rfilename": n} for n in files]}
                    return self.send(200, json.dumps(tree if parts[4:5] == ["tree"] else info).encode(), body)
                data = hub.repos.get("/".join(parts[:2]), {}).get("/".join(parts[4:]))  # /ID/resolve/REVISION/FILE
                if parts[2:3] != ["resolve"] or data is None:
                    return self.send(404, b"", body, {"X-Error-Code": "EntryNotFound"})
                self.send(200, data, body, {"X-Repo-Commit": REVISION, "ETag": f'"{hashlib.sha256(data).hexdigest()}"'})

            def send(self, code, data, body, headers=None):
                self.send_response(code)
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if body:
                    self.wfile.write(data)

            def log_message(self, *args):
                pass
        return Handler


@pytest.fixture
def stand_in_hub():
    hub = StandInHub({"Salesforce/shapes-tiny": shapes_files() | {
        "pytorch_model.bin": b"a second copy of the weights, never fetched", "README.md": b"# shapes-tiny\n"}})
    yield hub
    hub.server.shutdown()


def test_online_only_what_is_needed_is_downloaded_then_the_cache_answers(stand_in_hub, scene, tmp_path):
    env = hub_env(HF_HOME=str(tmp_path / "hf"), HF_ENDPOINT=stand_in_hub.url)

    def run(*argv):
        return subprocess.run([sys.executable, "-m", "miniblip2.cli", *argv], env=env, cwd=tmp_path,
                              capture_output=True, text=True, timeout=120)
    expected = miniblip2.load(SHAPES_TINY).caption(scene)
    first = run("caption", str(scene), "--weights", "Salesforce/shapes-tiny")
    assert (first.returncode, first.stdout) == (0, expected + "\n"), first.stderr
    assert "11/11" in first.stderr  # huggingface_hub's progress bar: 11 files fetched
    needed = shapes_files(without={"training_log.json"})  # the shapes model's record of its training: not read
    fetched = {path.rsplit("/", 1)[-1] for method, path in stand_in_hub.requests
               if method == "GET" and "/resolve/" in path}
    assert fetched == set(needed)  # no .bin, no README, no training log
    snapshot = tmp_path / "hf" / "hub" / "models--Salesforce--shapes-tiny" / "snapshots" / REVISION
    assert {p.name: p.read_bytes() for p in snapshot.iterdir()} == needed

    stand_in_hub.requests.clear()
    again = run("caption", str(scene), "--weights", "Salesforce/shapes-tiny")
    assert (again.returncode, again.stdout) == (0, expected + "\n") and stand_in_hub.requests == []  # the cache first

    copy = run("download", "Salesforce/shapes-tiny", "--dir", str(tmp_path / "copy"))
    assert (copy.returncode, copy.stdout) == (0, f"{tmp_path / 'copy'}\n"), copy.stderr
    assert {p.name: p.read_bytes() for p in (tmp_path / "copy").iterdir() if p.is_file()} == needed

    missing = run("download", "Salesforce/no-such-model")
    assert missing.returncode == 2 and missing.stderr.startswith(
        "miniblip2: error: Salesforce/no-such-model is not a folder here, nor a repository on the Hugging Face hub")
