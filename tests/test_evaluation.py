"""Perplexity / KL / measured KV bytes against independent references (HF's own loss, torch's kl_div)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from hf_attn_swap import convert_to_gqa
from hf_attn_swap.cli import main
from hf_attn_swap.evaluate.metrics import evaluate_models, measure_kv_cache_bytes_per_token
from hf_attn_swap.io.text import load_token_ids, resolve_text_files, windows
from hf_attn_swap.testing import tiny_model, tiny_tokenizer


def test_perplexity_matches_transformers_loss_and_kl_matches_kl_div():
    model = tiny_model("llama", seed=0)
    other = tiny_model("llama", seed=1)
    ids = torch.randint(3, 128, (50,), generator=torch.Generator().manual_seed(0))
    res = evaluate_models({"m": model, "o": other}, ids, window=16, reference=model, progress=False)
    # reference: transformers' own shifted cross-entropy, window by window (16, 16, 16, 2 tokens)
    nll, n = 0.0, 0
    kl, agree = 0.0, 0
    with torch.no_grad():
        for chunk in windows(ids, 16):
            loss = model(chunk[None], labels=chunk[None]).loss.item()
            nll += loss * (chunk.numel() - 1)
            n += chunk.numel() - 1
            p = F.log_softmax(model(chunk[None]).logits[0, :-1], -1)
            q = F.log_softmax(other(chunk[None]).logits[0, :-1], -1)
            kl += F.kl_div(q, p, log_target=True, reduction="sum").item()
            agree += (p.argmax(-1) == q.argmax(-1)).sum().item()
    assert res["m"]["tokens"] == n == 49 - 3  # 4 windows, each loses its first token
    assert res["m"]["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-5)
    assert res["m"]["kl_to_reference"] == 0.0 and res["m"]["top1_agreement"] == 1.0
    assert res["o"]["kl_to_reference"] == pytest.approx(kl / n, rel=1e-4)
    assert res["o"]["top1_agreement"] == pytest.approx(agree / n)
    assert res["o"]["kl_to_reference"] > 0.01


def test_windows_drop_only_a_single_trailing_token():
    assert [c.numel() for c in windows(torch.arange(33), 16)] == [16, 16]
    assert [c.numel() for c in windows(torch.arange(34), 16)] == [16, 16, 2]
    with pytest.raises(ValueError, match="at least 2"):
        windows(torch.arange(10), 1)


@pytest.mark.parametrize("family,kv_after", [("llama", 2), ("llama", 1), ("qwen3", 1), ("gemma2", 2)])
def test_measured_kv_bytes_follow_the_head_count(family, kv_after):
    model = tiny_model(family, num_attention_heads=4, num_key_value_heads=4)
    tokens = 6  # below gemma2's sliding window (8), whose layers keep only the last window - 1 tokens
    before = measure_kv_cache_bytes_per_token(model, tokens=tokens)
    report = convert_to_gqa(model, kv_after)
    after = measure_kv_cache_bytes_per_token(model, tokens=tokens)
    # K and V, 2 layers, head_dim 16, float32
    assert before == 2 * 4 * 16 * 2 * 4 == report.kv_bytes_per_token_before
    assert after == 2 * kv_after * 16 * 2 * 4 == report.kv_bytes_per_token_after


def test_data_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_text_files([tmp_path / "missing.txt"])
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="is empty"):
        resolve_text_files([tmp_path / "empty.txt"])
    (tmp_path / "d").mkdir()
    with pytest.raises(ValueError, match="no non-empty"):
        resolve_text_files([tmp_path / "d"])
    (tmp_path / "one.txt").write_text("a")
    with pytest.raises(ValueError, match="need at least 2"):
        load_token_ids(tiny_tokenizer(), [tmp_path / "one.txt"])


def test_token_budget_reads_files_in_order(tmp_path):
    (tmp_path / "a.txt").write_text("abc")
    (tmp_path / "b.txt").write_text("xyz" * 100)
    ids = load_token_ids(tiny_tokenizer(), [tmp_path], max_tokens=7)
    assert ids.tolist() == [ord(c) for c in "abc\n\nxy"]


def test_cli_eval_writes_the_contracted_json(saved_tiny, text_file, tmp_path, capsys):
    src = saved_tiny("llama", num_attention_heads=4, num_key_value_heads=4)
    out = tmp_path / "gqa"
    assert main(["convert", str(src), str(out), "--to", "gqa", "--num-kv-heads", "2"]) == 0
    js = tmp_path / "eval.json"
    args = ["eval", str(out), "--data", str(text_file), "--reference", str(src), "--max-tokens", "300"]
    assert main([*args, "--window", "64", "--json", str(js)]) == 0
    result = json.loads(js.read_text())
    for key in ("perplexity", "tokens", "kl_to_reference", "kv_cache_bytes_per_token"):
        assert key in result
    assert result["tokens"] == 300 - 5  # windows 64,64,64,64,44 each lose one position
    assert result["kv_cache_bytes_per_token"] == 2 * 2 * 16 * 2 * 4
    assert result["kl_to_reference"] > 0
    assert "| KV heads |" in capsys.readouterr().out
    js2 = tmp_path / "noref.json"
    assert main(["eval", str(src), "--data", str(text_file), "--max-tokens", "300", "--json", str(js2)]) == 0
    assert json.loads(js2.read_text())["kl_to_reference"] is None
    assert main(["eval", str(src), "--data", str(tmp_path / "nope.txt")]) == 2
