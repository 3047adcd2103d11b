"""`--push-to-hub` against a local stand-in for the hub's HTTP API (issue 7, acceptance 3; issue
21, acceptance 1: the card's metadata and HfApi.upload_folder).

The stand-in implements only what huggingface_hub's create_repo + upload_folder call:
repo creation, README metadata validation, preupload (every file answered "regular", so the
content travels inline in the commit) and the ndjson commit. It checks the bearer token on
every request and keeps what was committed, so the test can compare it with the folder.
"""

import base64
import json
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from huggingface_hub import ModelCard, constants as hub_constants
import pytest
import torch
import yaml
from safetensors.torch import load as load_safetensors

from test_export_helpers import REPO_ROOT, TINY_RUN_STEPS, repo_env, tiny_run

from training import export

TOKEN = "hf_standinSECRETtoken0123456789"


class StandInHub:
    def __init__(self, token: str):
        self.token = token
        self.requests = []  # (method, path, authorised)
        self.repos = {}  # repo_id -> create payload
        self.commits = []  # (repo_id, header, {path: bytes})
        self.card_metadata = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.endpoint = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def reply(self, code, obj):
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def handle_any(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                path = self.path.split("?")[0]
                authorised = self.headers.get("Authorization") == f"Bearer {hub.token}"
                hub.requests.append((self.command, path, authorised))
                if not path.startswith("/api/"):
                    return self.reply(404, {"error": "not found"})
                if not authorised and path != "/api/agent-harnesses":
                    return self.reply(401, {"error": "Invalid credentials"})
                if self.command == "POST" and path == "/api/repos/create":
                    payload = json.loads(body)
                    repo_id = f"{payload['organization']}/{payload['name']}"
                    hub.repos[repo_id] = payload
                    return self.reply(200, {"url": f"{hub.endpoint}/{repo_id}", "name": repo_id})
                if self.command == "POST" and path == "/api/validate-yaml":
                    # The hub parses the README's front matter (between the leading --- lines).
                    content = json.loads(body)["content"]
                    try:
                        _, front, _ = content.split("---\n", 2)
                        metadata = yaml.safe_load(front)
                        assert isinstance(metadata, dict), "front matter is not a mapping"
                    except (ValueError, AssertionError, yaml.YAMLError) as exc:
                        return self.reply(400, {"errors": [{"message": f"bad model card metadata: {exc}"}]})
                    hub.card_metadata.append(metadata)
                    return self.reply(200, {"errors": [], "warnings": []})
                parts = path.split("/")  # /api/models/{ns}/{name}/{preupload|commit}/{rev}
                if self.command == "POST" and len(parts) == 7 and parts[2] == "models":
                    repo_id = f"{parts[3]}/{parts[4]}"
                    if repo_id not in hub.repos:
                        return self.reply(404, {"error": f"repository {repo_id} not found"})
                    if parts[5] == "preupload":
                        files = json.loads(body)["files"]
                        return self.reply(200, {"files": [
                            {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]})
                    if parts[5] == "commit":
                        header, files = None, {}
                        for line in body.splitlines():
                            item = json.loads(line)
                            if item["key"] == "header":
                                header = item["value"]
                            elif item["key"] == "file":
                                files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                            else:
                                return self.reply(400, {"error": f"unsupported operation {item['key']}"})
                        hub.commits.append((repo_id, header, files))
                        return self.reply(200, {"commitUrl": f"{hub.endpoint}/{repo_id}/commit/{'0' * 40}",
                                                "commitOid": "0" * 40})
                return self.reply(404, {"error": "not found"})

            do_GET = do_POST = do_PUT = do_HEAD = handle_any

        return Handler


@pytest.fixture
def hub():
    server = StandInHub(TOKEN)
    yield server
    server.close()


def test_push_to_hub_uploads_the_verified_folder_and_never_leaks_the_token(tmp_path_factory, tmp_path, hub):
    trained = tiny_run(tmp_path_factory)
    # The same run with an export section in its saved config: the card's license and tags come from it.
    run = tmp_path / "runs" / "tiny"
    shutil.copytree(trained, run, ignore=shutil.ignore_patterns("export"))
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["export"] = {"license": "mit", "tags": ["long-context", "rmt"]}
    (run / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    out = tmp_path / "hf"
    env = repo_env(HF_ENDPOINT=hub.endpoint, HF_TOKEN=TOKEN, HF_HOME=str(tmp_path / "hf_home"))
    del env["HF_HUB_OFFLINE"]
    proc = subprocess.run(  # default --device/--dtype: the CPU in fp32 here
        [sys.executable, "-m", "training.export", "--run", str(run), "--out", str(out),
         "--push-to-hub", "alice/tiny-rmt", "--private"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"pushed: {hub.endpoint}/alice/tiny-rmt/commit/" in proc.stdout
    # stderr is a pipe: no progress bars (DeepSpeed's consolidation, transformers, huggingface_hub).
    for bar in ("Loading checkpoint shards", "Gathering sharded weights", "Loading weights", "it/s]"):
        assert bar not in proc.stderr, proc.stderr[-2000:]

    assert hub.repos["alice/tiny-rmt"]["visibility"] == "private"
    assert all(authorised for method, path, authorised in hub.requests if path != "/api/agent-harnesses")
    [(repo_id, header, files)] = hub.commits
    assert repo_id == "alice/tiny-rmt" and f"step {TINY_RUN_STEPS}" in header["summary"]
    local = {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert files == local
    assert 'repo = "alice/tiny-rmt"' in local["README.md"].decode()

    # The card's metadata, read back as the hub reads it and as huggingface_hub parses it.
    metrics = json.loads((run / "checkpoints" / f"step_{TINY_RUN_STEPS:08d}" / "client_state.json").read_text())["metrics"]
    eval_metrics = {k: v for k, v in metrics.items() if k.startswith("eval/")}
    assert {"eval/loss", "eval/memory_exact_match_2seg"} <= set(eval_metrics)
    front = yaml.safe_load(local["README.md"].decode().split("---\n")[1])
    assert hub.card_metadata == [front]
    assert front["license"] == "mit" and front["library_name"] == "transformers"
    assert front["tags"] == ["rmt", "recurrent-memory-transformer", "custom_code", "long-context"]
    assert "base_model" not in front  # model.init_from was null
    [index] = front["model-index"]
    assert index["name"] == "alice/tiny-rmt"
    assert {m["name"]: m["value"] for r in index["results"] for m in r["metrics"]} == eval_metrics
    card = ModelCard.load(out / "README.md")
    assert {r.metric_name: r.metric_value for r in card.data.eval_results} == eval_metrics
    assert card.data.license == "mit"

    # CPU defaults write the fp32 weights exactly as DeepSpeed's own tool consolidates them.
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    expected = get_fp32_state_dict_from_zero_checkpoint(str(run / "checkpoints"), tag=f"step_{TINY_RUN_STEPS:08d}")
    uploaded = load_safetensors(files["model.safetensors"])
    assert json.loads(files["config.json"])["dtype"] == "float32"
    assert uploaded.keys() == expected.keys()
    assert all(uploaded[k].dtype == torch.float32 and torch.equal(uploaded[k], expected[k]) for k in expected)

    # The token reaches the hub in the Authorization header only: not the console, not any file.
    assert TOKEN not in proc.stdout + proc.stderr
    for folder in (trained, run, out, tmp_path / "hf_home"):
        for path in folder.rglob("*"):
            if path.is_file():
                assert TOKEN.encode() not in path.read_bytes(), path


def test_push_without_a_token_is_refused_before_any_work(tmp_path_factory, tmp_path, monkeypatch, capsys):
    run = tiny_run(tmp_path_factory)
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(hub_constants, "HF_TOKEN_PATH", str(tmp_path / "no_login" / "token"))
    code = export.main(["--run", str(run), "--out", str(tmp_path / "x"), "--push-to-hub", "alice/tiny-rmt"])
    assert code == 2
    assert "no Hugging Face token" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_token_comes_from_the_login_cache_when_the_env_has_none(tmp_path, monkeypatch):
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    cache = tmp_path / "token"
    cache.write_text(TOKEN + "\n")  # what `hf auth login` stores
    monkeypatch.setattr(hub_constants, "HF_TOKEN_PATH", str(cache))
    assert export.resolve_hub_token() == TOKEN


def test_private_needs_push_to_hub(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        export.main(["--run", str(tmp_path), "--out", str(tmp_path / "x"), "--private"])
    assert exc.value.code == 2
    assert "--private only applies with --push-to-hub" in capsys.readouterr().err
