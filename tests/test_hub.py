"""push_to_hub against a fake Hub on 127.0.0.1 (tests/fake_hub.py): nothing reaches huggingface.co."""

import json
import logging
import os
import socket
from pathlib import Path
from types import SimpleNamespace

import pytest
from huggingface_hub import constants
from huggingface_hub.utils import _http as hf_http

from sdtune import hub as hub_module
from sdtune.hub import HubError, push_to_hub

from fake_hub import FakeHub

TOKEN = "hf_FakeWriteToken0123456789abcdefXYZ"
REPO = "someone/shapes-lora"


@pytest.fixture
def sleeps(monkeypatch):
    """Waits sdtune asked for; huggingface_hub's own backoff waits are skipped too."""
    waits: list[float] = []
    monkeypatch.setattr(hub_module, "_sleep", waits.append)
    monkeypatch.setattr(hf_http, "time", SimpleNamespace(sleep=lambda seconds: None))
    return waits


@pytest.fixture
def hub(monkeypatch, tmp_path, sleeps):
    """A running FakeHub that accepts only TOKEN; the client is online, but only for loopback."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # conftest sets offline for every other test
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-saved-login"))  # never the developer's token
    elsewhere: list[str] = []
    real_getaddrinfo = socket.getaddrinfo

    def loopback_only(host, *args, **kwargs):
        if host not in ("127.0.0.1", "localhost"):
            elsewhere.append(str(host))
            raise OSError(f"test tried to reach {host}")
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", loopback_only)
    with FakeHub(token=TOKEN) as fake:
        # huggingface_hub reads HF_ENDPOINT at import, so set the constant it was read into as well.
        monkeypatch.setenv("HF_ENDPOINT", fake.url)
        monkeypatch.setattr(constants, "ENDPOINT", fake.url)
        yield fake
    assert elsewhere == [], f"contacted hosts other than the fake Hub: {elsewhere}"
    assert fake.unknown == [], f"requests the fake Hub does not implement: {fake.unknown}"


@pytest.fixture
def output_dir(tmp_path):
    """A training output folder: exports, card and config, plus what must not be pushed."""
    out = tmp_path / "out"
    files = {
        "pytorch_lora_weights.safetensors": os.urandom(2048),
        "kohya_lora.safetensors": os.urandom(1024),
        "README.md": b"---\nlicense: creativeml-openrail-m\n---\n\n# shapes\n",
        "sdtune_config.yaml": b"rank: 4\n",
        "samples/step-4.png": os.urandom(300),
        "big.safetensors": os.urandom(11 * 1024 * 1024),  # > 10 MB: the Hub's LFS threshold
        "empty.txt": b"",
        "checkpoint-2/optimizer.safetensors": b"opt",
        "logs/events.out.tfevents": b"tb",
        ".cache/entry": b"cache",
    }
    for name, data in files.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(data)
    return out


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


PUSHED = {"pytorch_lora_weights.safetensors", "kohya_lora.safetensors", "README.md", "sdtune_config.yaml",
          "samples/step-4.png", "big.safetensors", "empty.txt"}


def test_push_uploads_every_file_byte_for_byte_and_skips_checkpoints_logs_hidden(hub, output_dir):
    url = push_to_hub(output_dir, REPO, token=TOKEN, endpoint=hub.url)

    local = snapshot(output_dir)
    assert set(hub.files(REPO)) == PUSHED
    assert all(hub.files(REPO)[name] == local[name] for name in PUSHED)
    assert url.startswith(f"{hub.url}/{REPO}/commit/")


def test_push_leaves_the_local_folder_untouched(hub, output_dir):
    before = snapshot(output_dir)
    push_to_hub(output_dir, REPO, token=TOKEN, endpoint=hub.url)
    assert snapshot(output_dir) == before


@pytest.mark.parametrize("private, visibility", [(True, "private"), (False, "public")])
def test_private_flag_is_sent_when_creating_the_repo(hub, output_dir, private, visibility):
    push_to_hub(output_dir, REPO, token=TOKEN, endpoint=hub.url, private=private)
    create = next(r for r in hub.requests if r.path == "/api/repos/create")
    assert json.loads(create.body)["visibility"] == visibility
    assert hub.repos[REPO]["private"] is private


def test_existing_repo_is_reused_and_keeps_its_other_files(hub, output_dir):
    hub.add_repo(REPO, {"notes.md": b"old"})
    push_to_hub(output_dir, REPO, token=TOKEN, endpoint=hub.url)
    assert set(hub.files(REPO)) == PUSHED | {"notes.md"}


def test_revision_creates_the_branch_and_commits_there_and_again_when_it_exists(hub, output_dir):
    for _ in range(2):
        url = push_to_hub(output_dir, REPO, token=TOKEN, endpoint=hub.url, revision="v2")
    assert set(hub.files(REPO, "v2")) == PUSHED
    assert hub.files(REPO, "main") == {}
    assert hub.paths("POST").count(f"/api/models/{REPO}/branch/v2") == 2
    assert f"/api/models/{REPO}/commit/v2" in hub.paths("POST")
    assert url.startswith(f"{hub.url}/{REPO}/commit/")


def test_allow_patterns_upload_only_matching_files(hub, output_dir):
    push_to_hub(output_dir, REPO, token=TOKEN, endpoint=hub.url, allow_patterns=["*.safetensors"])
    assert set(hub.files(REPO)) == {"pytorch_lora_weights.safetensors", "kohya_lora.safetensors", "big.safetensors"}


@pytest.mark.parametrize("status", [503, 429, 500])
def test_transient_create_failures_are_retried_with_exponential_backoff(hub, output_dir, sleeps, status):
    hub.fail("/api/repos/create", status=status, times=2)
    push_to_hub(output_dir, REPO, token=TOKEN, endpoint=hub.url)
    assert sleeps == [2.0, 4.0]
    assert set(hub.files(REPO)) == PUSHED


def test_commit_failing_past_huggingface_hub_retries_is_retried_by_sdtune(hub, output_dir, sleeps):
    hub.fail("/commit/", status=503, times=6)  # huggingface_hub retries a commit 5 times itself
    push_to_hub(output_dir, REPO, token=TOKEN, endpoint=hub.url)
    assert sleeps == [2.0]
    assert set(hub.files(REPO)) == PUSHED


def test_failures_past_max_retries_raise_with_the_retry_command(hub, output_dir, sleeps):
    before = snapshot(output_dir)
    hub.fail("/api/repos/create", status=503, times=100)
    with pytest.raises(HubError, match="503") as err:
        push_to_hub(output_dir, REPO, token=TOKEN, endpoint=hub.url, max_retries=2, revision="v2", private=True,
                    commit_message="first try")
    # every option, --private above all (a copied hint must not publish a private model), never the token
    assert f"sdtune push {output_dir} --repo_id {REPO} --private --revision v2 --commit_message 'first try'" in str(err.value)
    assert TOKEN not in str(err.value)
    assert sleeps == [2.0, 4.0]
    assert snapshot(output_dir) == before


def test_refused_token_gives_the_login_hint_no_retry_and_leaves_files_intact(hub, output_dir, sleeps):
    before = snapshot(output_dir)
    wrong = "hf_WrongToken0123456789abcdefghijkl"
    with pytest.raises(HubError, match=r"refused the token \(401\).*hf auth login.*HF_TOKEN") as err:
        push_to_hub(output_dir, REPO, token=wrong, endpoint=hub.url)
    assert f"sdtune push {output_dir} --repo_id {REPO}" in str(err.value)
    assert wrong not in str(err.value)
    assert sleeps == []
    assert REPO not in hub.repos
    assert snapshot(output_dir) == before


@pytest.mark.parametrize("status, message", [(403, "403"), (404, "404"), (400, "HTTP 400")])
def test_client_errors_are_not_retried(hub, output_dir, sleeps, status, message):
    hub.fail("/api/repos/create", status=status, times=1)
    with pytest.raises(HubError, match=message):
        push_to_hub(output_dir, REPO, token=TOKEN, endpoint=hub.url)
    assert sleeps == []
    assert hub.paths().count("/api/repos/create") == 1


def test_token_is_only_in_the_authorization_header_never_logged_or_written(hub, output_dir, caplog, capsys, monkeypatch):
    monkeypatch.setattr(constants, "HF_DEBUG", True)  # huggingface_hub then logs every request as curl
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="huggingface_hub")
    hub.fail("/api/repos/create", status=503, times=1)  # the retry path logs too
    url = push_to_hub(output_dir, REPO, token=TOKEN, endpoint=hub.url)

    assert url in caplog.text  # the URL is reported
    assert caplog.records and TOKEN not in caplog.text
    captured = capsys.readouterr()
    assert TOKEN not in captured.out + captured.err
    assert all(TOKEN.encode() not in data for data in snapshot(output_dir).values())
    assert all(r.headers.get("authorization") == f"Bearer {TOKEN}" for r in hub.requests)
    assert hub.token_leaks(TOKEN) == []


def test_token_defaults_to_HF_TOKEN_and_endpoint_to_HF_ENDPOINT(hub, output_dir, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    url = push_to_hub(output_dir, REPO)
    assert url.startswith(hub.url)
    assert set(hub.files(REPO)) == PUSHED


def test_offline_mode_gives_a_clear_error(hub, output_dir, monkeypatch, sleeps):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubError, match="HF_HUB_OFFLINE"):
        push_to_hub(output_dir, REPO, token=TOKEN, endpoint=hub.url)
    assert hub.requests == [] and sleeps == []


def test_missing_folder_is_a_clear_error(hub, tmp_path):
    with pytest.raises(HubError, match="not a folder"):
        push_to_hub(tmp_path / "nope", REPO, token=TOKEN, endpoint=hub.url)
    assert hub.requests == []


# ----------------------------------------------------------------------------- from training and the CLI


def test_push_to_hub_after_training_uploads_the_exports_and_card(hub, lora_config, monkeypatch):
    import dataclasses

    from huggingface_hub import ModelCard

    from sdtune import train_lora

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    config = dataclasses.replace(lora_config, push_to_hub=True, hub_model_id=REPO, checkpointing_steps=2)
    result = train_lora(config)
    files = hub.files(REPO)
    assert {"pytorch_lora_weights.safetensors", "kohya_lora.safetensors", "README.md", "sdtune_config.yaml"} <= set(files)
    assert not any(name.startswith("checkpoint-") for name in files)
    assert files["pytorch_lora_weights.safetensors"] == result.outputs["diffusers"].read_bytes()
    card = ModelCard(files["README.md"].decode())
    assert "lora" in card.data.tags and "sdtune" in card.data.tags
    assert hub.token_leaks(TOKEN) == []
    for path in Path(config.output_dir).rglob("*"):
        assert not path.is_file() or TOKEN.encode() not in path.read_bytes()


def test_cli_push_prints_the_commit_url(hub, output_dir, monkeypatch, capsys):
    from sdtune.cli import main

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    assert main(["push", str(output_dir), "--repo_id", REPO, "--private"]) == 0
    assert capsys.readouterr().out.strip().startswith(f"{hub.url}/{REPO}/commit/")
    assert hub.repos[REPO]["private"] is True and set(hub.files(REPO)) == PUSHED


def test_cli_push_with_a_bad_token_is_one_line_and_says_how_to_retry(hub, output_dir, monkeypatch, capsys):
    from sdtune.cli import main

    monkeypatch.setenv("HF_TOKEN", "hf_wrongwrongwrongwrongwrong")
    assert main(["push", str(output_dir), "--repo_id", REPO]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "401" in err and f"sdtune push {output_dir} --repo_id {REPO}" in err
    assert "hf_wrongwrong" not in err


def test_diffusers_hub_token_flag_uploads_but_is_written_nowhere(hub, tiny_model, shapes_dir, tmp_path, monkeypatch,
                                                                   caplog, capsys):
    """train_dreambooth_lora.py-style --hub_token: the upload uses it, and no file, log or output holds it.

    (--push_to_hub without --hub_model_id is covered in test_diffusers_compat.py: this fake Hub cannot
    answer for a repo without a namespace, which huggingface_hub 2.4 then refuses to parse.)"""
    from sdtune.cli import main

    monkeypatch.setenv("HF_TOKEN", "")  # restored afterwards; --hub_token replaces it for this process
    caplog.set_level(logging.DEBUG)
    out = tmp_path / "shapes-lora"
    argv = ["train-dreambooth", "--use_lora", "--pretrained_model_name_or_path", str(tiny_model), "--instance_data_dir",
            str(shapes_dir), "--resolution", "64", "--max_train_steps", "2", "--checkpointing_steps", "1",
            "--validation_prompt", "a sks shape", "--num_validation_images", "1", "--validation_inference_steps", "1",
            "--output_dir", str(out), "--push_to_hub", "--hub_model_id", REPO, "--hub_token", TOKEN]
    assert main(argv) == 0
    assert "pytorch_lora_weights.safetensors" in hub.files(REPO)
    assert all(r.headers.get("authorization") == f"Bearer {TOKEN}" for r in hub.requests)
    assert hub.token_leaks(TOKEN) == []
    captured = capsys.readouterr()
    assert TOKEN not in captured.out + captured.err + caplog.text
    assert "HF_TOKEN" in caplog.text  # the warning
    written = [p for p in out.rglob("*") if p.is_file()]
    assert any("checkpoint-" in str(p) for p in written) and any("logs" in str(p) for p in written)
    assert all(TOKEN.encode() not in p.read_bytes() for p in written)
