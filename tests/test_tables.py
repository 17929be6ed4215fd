"""Every results table of README.md and docs/ matches the JSON under results/ it is generated from
(``scripts/tables.py``), and the script's rules hold: rows from a benchmark's JSON, "pending" without it, **Stale**
when the producing code has a commit the JSON's commit lacks."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_tables():
    spec = importlib.util.spec_from_file_location("hfas_tables", ROOT / "scripts" / "tables.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their annotations through it
    spec.loader.exec_module(module)
    return module


def test_every_table_matches_its_json():
    tables = load_tables()
    assert tables.differing() == [], "a results table differs from its JSON: run python3 scripts/tables.py"


def test_every_marker_names_a_known_table_and_every_source_is_under_results():
    tables = load_tables()
    found = {m.group(2) for page in tables.pages() for m in tables.BLOCK.finditer(page.read_text())}
    assert found <= set(tables.TABLES)
    assert "current" in {m.group(2) for m in tables.BLOCK.finditer((ROOT / "README.md").read_text())}
    for table in tables.TABLES.values():
        assert all(source.startswith("results/") for source in table.sources)
    for path in (ROOT / "results").rglob("*.json"):
        data = json.loads(path.read_text())
        assert data.get("machine") and data.get("command"), f"{path}: machine and command are recorded"


def test_current_table_renders_demo_rows_and_pending_rows():
    tables = load_tables()
    demo = {
        "model": "smollm2",
        "results": {
            "original (3 KV heads)": {
                "kv_cache_bytes_per_token": 46080.0,
                "perplexity": 11.6,
                "kl_to_reference": 0.0,
                "top1_agreement": 1.0,
                "tokens": 16368,
            },
            "fit-pooled (1 KV heads)": {
                "kv_cache_bytes_per_token": 15360.0,
                "perplexity": 80.78,
                "kl_to_reference": 1.865,
                "top1_agreement": 0.3327,
                "tokens": 16368,
            },
        },
    }
    lines = tables.render_current(
        [
            tables.Source("results/main_smollm2.json", demo),
            tables.Source("results/main_qwen2.5-coder.json", None),
        ]
    )
    assert lines[2].startswith("| smollm2 | original (3 KV heads) | 46080 | — | 11.6 | 0 | 1 | 16368 |")
    assert (
        "| smollm2 | fit-pooled (1 KV heads) | 15360 | -66.67 % | 80.78 | 1.865 | 0.3327 | 16368 |"
        in lines[3]
    )
    assert "pending: no generating JSON yet (`results/main_qwen2.5-coder.json`)" in lines[4]


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_a_table_is_stale_when_its_producer_changed_after_the_json(tmp_path, monkeypatch):
    tables = load_tables()

    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    git("config", "user.email", "t@example.com")
    git("config", "user.name", "t")
    (tmp_path / "bench.py").write_text("v1\n")
    git("add", ".")
    git("commit", "-qm", "v1")
    first = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True
    ).stdout.strip()
    monkeypatch.setattr(tables, "ROOT", tmp_path)
    source = tables.Source("results/x.json", {"commit": first, "machine": {}, "command": ["bench.py"]})
    assert tables.freshness(source, ("bench.py",)).startswith("> Freshness: no commit")
    (tmp_path / "bench.py").write_text("v2\n")
    git("commit", "-qam", "v2")
    assert tables.freshness(source, ("bench.py",)).startswith("> **Stale**")
    unknown = tables.Source("results/x.json", {"machine": {}, "command": []})
    assert "unknown" in tables.freshness(unknown, ("bench.py",))


def test_verify_results_become_engine_rows_and_peer_reruns_replace_rows(tmp_path, monkeypatch):
    """--verified: one row per runtime of a verify JSON, pass only when every compared row passed, a rerun
    replaces the row; the main table then names the engines that passed. render_peers: a later JSON's row with
    the same key replaces the earlier one."""
    tables = load_tables()
    monkeypatch.setattr(tables, "ROOT", tmp_path)
    (tmp_path / "results").mkdir()

    def row(passed, delta):
        return {"counts": True, "passed": passed, "tokens_equal": 3 if passed else 1, "prompts": 3,
                "max_dlogprob": delta}  # fmt: skip

    verify = tmp_path / "verify.json"
    verify.write_text(json.dumps({"runtimes": {
        "vllm": {"version": "0.1", "rows": [row(True, 1e-5), {"counts": False, "passed": False}]},
        "mlx": {"version": "0.2", "rows": [row(True, 2e-5), row(False, 0.5)]},
    }}))  # fmt: skip
    tables.add_verified([f"m-mla={verify}"])
    data = json.loads((tmp_path / tables.RUNTIMES_JSON).read_text())
    assert {(r["runtime"], r["verdict"], r["tokens_equal"]) for r in data["rows"]} == {
        ("vllm", "pass", "3/3"), ("mlx", "fail", "4/6")
    }
    verify.write_text(json.dumps({"runtimes": {"mlx": {"rows": [row(True, 1e-5)]}}}))
    tables.add_verified([f"m-mla={verify}"])
    engines = tables._engines(tables.load(tables.RUNTIMES_JSON))
    assert engines == {"m-mla": ["vllm", "mlx"]}
    assert tables._verified(engines, "m", "this project (default)") == "vllm, mlx"
    with pytest.raises(SystemExit):
        tables.add_verified(["no-equals-sign"])
    first = {"rows": [{"key": "a", "method": "a", "kv_values": 2, "tutorial_perplexity": 5.0},
                      {"key": "b", "method": "b", "kv_values": 1, "tutorial_perplexity": 9.0}]}  # fmt: skip
    second = {"rows": [{"key": "b", "method": "b", "kv_values": 1, "tutorial_perplexity": 7.0}]}
    lines = tables.render_peers([tables.Source("x", first), tables.Source("y", second)])
    assert [line.split(" | ")[1] for line in lines[2:]] == ["a", "b"] and "| 7 |" in lines[3]
