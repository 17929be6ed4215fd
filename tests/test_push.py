"""``hf-attn-swap push`` end to end against a local HTTP stand-in for the Hub (HF_ENDPOINT=127.0.0.1):
what huggingface_hub sends is recorded and compared with the folder; the token never reaches the output."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest
from _recipes_fixtures import REPO, make_tiny_pair
from hub_server import LocalHub

from hf_attn_swap.cli import main as cli_main
from hf_attn_swap.pipeline.hub import model_card

TOKEN = "hf_testTOKENdoNotLeak0123456789"


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("push")
    _, mqa = make_tiny_pair(root)
    (mqa / "optimizer.pt").write_bytes(b"pickled optimizer state")
    (mqa / "eval.json").write_text(
        json.dumps(
            {
                "perplexity": 12.5,
                "tokens": 1000,
                "window": 256,
                "kl_to_reference": 0.25,
                "kv_cache_bytes_per_token": 256.0,
                "num_key_value_heads": 1,
                "data": ["tutorial/introduction.rst.txt"],
                "model": str(mqa),
            }
        )
    )
    return mqa


def auth(request) -> str | None:
    return {k.lower(): v for k, v in request["headers"].items()}.get("authorization")


def push(folder, hub_url, *args, home, token=TOKEN):
    env = {k: v for k, v in os.environ.items() if k != "HF_TOKEN"}
    env.update(HF_TOKEN=token) if token else None
    env = {
        **env,
        "PYTHONPATH": str(REPO),
        "HF_ENDPOINT": hub_url,
        "HF_HOME": str(home),
        "HF_HUB_DISABLE_XET": "1",
        "NO_PROXY": "127.0.0.1",
    }
    return subprocess.run(
        [sys.executable, "-m", "hf_attn_swap", "push", str(folder), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_push_uploads_the_folder_with_a_model_card(converted, tmp_path):
    with LocalHub() as hub:
        done = push(converted, hub.url, "--repo-id", "me/tiny-mqa", "--private", home=tmp_path)
        again = push(converted, hub.url, "--repo-id", "me/tiny-mqa", "--revision", "v2", home=tmp_path)
    assert done.returncode == 0, done.stderr
    assert again.returncode == 0, again.stderr
    for proc in (done, again):
        assert TOKEN not in proc.stdout + proc.stderr
    assert "skipped optimizer.pt" in done.stdout

    state = hub.state
    posts = [r for r in state.requests if r["method"] == "POST"]
    assert posts and all(auth(r) == f"Bearer {TOKEN}" for r in posts)
    # huggingface_hub may ask the (local) endpoint for its agent registry; nothing else is read
    unexpected = [
        r["path"] for r in state.requests if r["method"] == "GET" and r["path"] != "/api/agent-harnesses"
    ]
    assert not unexpected, unexpected
    create = [r["json"] for r in state.requests if r["path"] == "/api/repos/create"]
    assert create[0]["name"] == "tiny-mqa" and create[0]["organization"] == "me"
    assert state.repos["me/tiny-mqa"]["private"] is True

    main = state.repos["me/tiny-mqa"]["branches"]["main"]
    expected = {p.name for p in converted.iterdir() if p.suffix != ".pt"} | {"README.md"}
    assert set(main) == expected
    for name in expected - {"README.md"}:
        assert hashlib.sha256(main[name]).digest() == hashlib.sha256((converted / name).read_bytes()).digest()
    assert any(r["path"].endswith(".git/info/lfs/objects/batch") for r in state.requests), (
        "weights go via LFS"
    )

    card = main["README.md"].decode()
    assert card.startswith("---\n") and "hf_attn_swap" in card
    assert "| num_key_value_heads | 2 | 1 |" in card and "(-50.00%)" in card
    assert "## Evaluation" in card and "| 12.5 |" in card
    assert 'AutoModelForCausalLM.from_pretrained("me/tiny-mqa")' in card

    assert [c["revision"] for c in state.commits] == ["main", "v2"]
    assert set(state.repos["me/tiny-mqa"]["branches"]["v2"]) == expected


def test_private_push_never_lands_in_an_existing_public_repo(converted, tmp_path):
    with LocalHub() as hub:
        public = push(converted, hub.url, "--repo-id", "me/public", home=tmp_path)
        refused = push(converted, hub.url, "--repo-id", "me/public", "--private", home=tmp_path)
        fresh = push(converted, hub.url, "--repo-id", "me/secret", "--private", home=tmp_path)
        again = push(converted, hub.url, "--repo-id", "me/secret", "--private", home=tmp_path)
    for proc in (public, fresh, again):
        assert proc.returncode == 0, proc.stderr
    assert refused.returncode == 2 and "me/public already exists and is public" in refused.stderr
    for proc in (public, refused, fresh, again):
        assert TOKEN not in proc.stdout + proc.stderr
    assert [(c["repo_id"], c["revision"]) for c in hub.state.commits] == [
        ("me/public", "main"),
        ("me/secret", "main"),
        ("me/secret", "main"),
    ]
    assert hub.state.repos["me/public"]["private"] is False
    assert hub.state.repos["me/secret"]["private"] is True


def test_push_refuses_pickle_only_folders_and_missing_tokens(converted, tmp_path, capsys, monkeypatch):
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((converted / "config.json").read_text())
    (pickled / "pytorch_model.bin").write_bytes(b"pickle")
    assert cli_main(["push", str(pickled), "--repo-id", "me/x", "--dry-run"]) == 2
    assert "no .safetensors weights" in capsys.readouterr().err

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)  # fails before any network access
    assert cli_main(["push", str(converted), "--repo-id", "me/x"]) == 2
    assert "no Hugging Face token" in capsys.readouterr().err
    assert cli_main(["push", str(converted), "--repo-id", "not-a-repo-id", "--dry-run"]) == 2


def test_model_card_for_a_plugin_format_points_to_the_plugin(converted, tmp_path):
    folder = tmp_path / "plugin"
    folder.mkdir()
    config = json.loads((converted / "config.json").read_text())
    config["model_type"] = "hf_attn_swap_mla"
    (folder / "config.json").write_text(json.dumps(config))
    report = json.loads((converted / "conversion.json").read_text())
    report["details"]["attn_implementation"] = "latent_sdpa"
    (folder / "conversion.json").write_text(json.dumps(report))
    card = model_card(folder, "me/mla")
    assert "import hf_attn_swap" in card and 'attn_implementation="latent_sdpa"' in card
    assert "Stock transformers" not in card
    # a stock deepseek_v3 export of an MLA conversion: both ways, the plugin one with absorbed decoding
    config["model_type"] = "deepseek_v3"
    (folder / "config.json").write_text(json.dumps(config))
    report["target"] = "mla"
    del report["details"]["attn_implementation"]
    (folder / "conversion.json").write_text(json.dumps(report))
    card = model_card(folder, "me/mla")
    assert "Stock transformers" in card and 'attn_implementation="latent_sdpa"' in card


def test_pickle_shard_indexes_are_skipped_with_their_shards(tmp_path):
    from hf_attn_swap.pipeline.hub import files_to_upload

    for name in ("model.safetensors", "pytorch_model.bin", "pytorch_model.bin.index.json", "config.json"):
        (tmp_path / name).write_text("{}")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "notes.txt").write_text("x")
    keep, skipped = files_to_upload(tmp_path)
    assert [p.relative_to(tmp_path).as_posix() for p in keep] == [
        "config.json",
        "model.safetensors",
        "sub/notes.txt",
    ]
    assert sorted(p.name for p in skipped) == ["pytorch_model.bin", "pytorch_model.bin.index.json"]


def test_linked_files_are_followed_and_linked_folders_refused(tmp_path):
    """A Hub-cache snapshot is made of file links (followed); a link to a folder could point anywhere (a home
    directory with keys) and is refused with the fix instead of being uploaded or silently left out."""
    from hf_attn_swap.pipeline.hub import files_to_upload

    blobs, folder = tmp_path / "blobs", tmp_path / "model"
    blobs.mkdir(), folder.mkdir()
    (blobs / "weights").write_text("w")
    (folder / "model.safetensors").symlink_to(blobs / "weights")
    (folder / "config.json").write_text("{}")
    keep, _ = files_to_upload(folder)
    assert [p.name for p in keep] == ["config.json", "model.safetensors"]
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "id_rsa").write_text("PRIVATE")
    (folder / "extra").symlink_to(outside, target_is_directory=True)
    with pytest.raises(ValueError, match="extra' is a link to a folder: push never follows those"):
        files_to_upload(folder)
