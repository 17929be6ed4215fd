"""Families without native GQA (GPT-2, GPT-NeoX, OPT, Falcon, BERT): conversion swaps in hf_attn_swap's grouped
attention modules. Checked against the stock model on tiny random models (hidden 64, 2 layers, 4 heads)."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import textwrap
from dataclasses import replace

import pytest
import torch
import transformers
from conftest import make_groups_identical, subprocess_env
from packaging.version import Version
from transformers import AutoModel, AutoModelForCausalLM

import hf_attn_swap
from hf_attn_swap import UnsupportedArchitectureError, convert_to_gqa, get_adapter
from hf_attn_swap.evaluate.metrics import measure_kv_cache_bytes_per_token
from hf_attn_swap.methods.calibration import collect_attention_inputs
from hf_attn_swap.methods.gqa import GQAMethod, MeanPooling
from hf_attn_swap.modeling import falcon as falcon_modeling
from hf_attn_swap.testing import repeated_kv_reference, tiny_model

#: name -> (model_type, Auto class, config overrides); every case has 4 query heads and 4 KV heads
CASES = {
    "gpt2": ("gpt2", AutoModelForCausalLM, {}),
    "gpt2-upcast": (
        "gpt2",
        AutoModelForCausalLM,
        {"reorder_and_upcast_attn": True, "scale_attn_by_inverse_layer_idx": True},
    ),
    "gpt_neox": ("gpt_neox", AutoModelForCausalLM, {}),
    "opt": ("opt", AutoModelForCausalLM, {}),
    "falcon-40b-style": ("falcon", AutoModelForCausalLM, {}),  # new_decoder_architecture, num_kv_heads
    "falcon-mha": ("falcon", AutoModelForCausalLM, {"new_decoder_architecture": False, "multi_query": False}),
    "bert": ("bert", AutoModel, {}),
    "bert-decoder": ("bert", AutoModelForCausalLM, {"is_decoder": True}),
}
CAUSAL = [name for name, (_, auto, _) in CASES.items() if auto is AutoModelForCausalLM]


def make(name: str, attn_implementation: str = "eager", seed: int = 0):
    model_type, auto_class, overrides = CASES[name]
    return tiny_model(
        model_type, seed=seed, attn_implementation=attn_implementation, auto_class=auto_class, **overrides
    )


def outputs(model, ids, **kwargs):
    """Logits of a causal LM, the last hidden state of an encoder."""
    with torch.no_grad():
        out = model(input_ids=ids, **kwargs)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def ids(batch=2, length=12, seed=1):
    return torch.randint(3, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("num_kv", [2, 1])
@pytest.mark.parametrize("name", list(CASES))
def test_identical_heads_in_group_convert_exactly(name, num_kv, attn_implementation):
    original = make(name, attn_implementation)
    make_groups_identical(original, num_kv)
    converted = copy.deepcopy(original)
    report = convert_to_gqa(converted, num_kv)
    assert report.changed and report.after == {"num_key_value_heads": num_kv}
    adapter = get_adapter(converted)
    assert type(converted).__name__.startswith("Grouped")
    assert converted.config.model_type == f"hf_attn_swap_{adapter.family}"
    for attn in adapter.attention_modules(converted):
        assert adapter.read(attn).k.shape[0] == num_kv
    x = ids()
    torch.testing.assert_close(outputs(converted, x), outputs(original, x), rtol=0, atol=1e-5)
    # the heads really were merged: the same conversion of the untied model changes its outputs
    untied = make(name, attn_implementation)
    before = outputs(untied, x)
    convert_to_gqa(untied, num_kv)
    assert (outputs(untied, x) - before).abs().max() > 1e-3


@pytest.mark.parametrize("name", list(CASES))
def test_converted_model_equals_stock_model_with_repeated_kv_heads(name):
    original = make(name, "sdpa")
    converted = copy.deepcopy(original)
    convert_to_gqa(converted, 2)
    reference = repeated_kv_reference(original, converted)
    assert type(reference) is type(original)  # stock classes, stock attention
    x = ids()
    torch.testing.assert_close(outputs(converted, x), outputs(reference, x), rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", list(CASES))
def test_eager_output_attentions_are_the_stock_models_with_repeated_kv_heads(name):
    """``output_attentions=True`` on a model converted in place returns each layer's attention probabilities
    (it returned None: transformers finds the modules to record by the model's class, switched in place)."""
    original = make(name, "eager")
    converted = copy.deepcopy(original)
    convert_to_gqa(converted, 2)
    reference = repeated_kv_reference(original, converted)
    x = ids()
    with torch.no_grad():
        got = converted(input_ids=x, output_attentions=True).attentions
        expected = reference(input_ids=x, output_attentions=True).attentions
    assert got is not None and len(got) == len(expected) == converted.config.num_hidden_layers
    for a, b in zip(got, expected, strict=True):
        assert a.shape == (2, 4, 12, 12)
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
        torch.testing.assert_close(a.sum(-1), torch.ones_like(a[..., 0]))


class ReversedHeadsMean(GQAMethod):
    """Mean pooling after reversing the order of all heads (q, k, v and o's columns consistently): the same
    function, so a method that permutes query heads must still convert tied heads exactly."""

    name = "reversed-mean"

    def convert_layer(self, weights, ctx):
        flip = {key: getattr(weights, key) for key in ("q", "k", "v", "q_bias", "k_bias", "v_bias")}
        flipped = {key: None if t is None else t.flip(0) for key, t in flip.items()}
        return MeanPooling().convert_layer(replace(weights, o=weights.o.flip(1), **flipped), ctx)


@pytest.mark.parametrize("name", list(CASES))
def test_query_head_permutations_and_reconversion(name):
    original = make(name)
    make_groups_identical(original, 1)
    x = ids()
    reference = outputs(original, x)
    permuted = copy.deepcopy(original)
    convert_to_gqa(permuted, 2, method=ReversedHeadsMean())
    torch.testing.assert_close(outputs(permuted, x), reference, rtol=0, atol=1e-5)
    convert_to_gqa(permuted, 1)  # a converted (plugin) model converts again
    torch.testing.assert_close(outputs(permuted, x), reference, rtol=0, atol=1e-5)


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("name", list(CASES))
def test_padded_batch_equals_unpadded_rows(name, attn_implementation):
    model = make(name, attn_implementation)
    convert_to_gqa(model, 2)
    long, short = ids(1, 10, seed=2)[0], ids(1, 6, seed=3)[0]
    encoder = not get_adapter(model).layout(model.config).causal
    pad = torch.zeros(4, dtype=torch.long)
    padded = torch.cat([short, pad]) if encoder else torch.cat([pad, short])  # right for BERT, else left
    batch = torch.stack([long, padded])
    mask = (torch.arange(10) < 6) if encoder else (torch.arange(10) >= 4)
    mask = torch.stack([torch.ones(10, dtype=torch.bool), mask]).long()
    kwargs = {} if encoder else {"position_ids": (mask.cumsum(-1) - 1).clamp(min=0)}
    out = outputs(model, batch, attention_mask=mask, **kwargs)
    torch.testing.assert_close(out[0], outputs(model, long[None])[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(out[1][mask[1].bool()], outputs(model, short[None])[0], rtol=0, atol=1e-5)


@pytest.mark.parametrize("num_kv", [2, 1])
@pytest.mark.parametrize("name", CAUSAL)
def test_measured_kv_cache_shrinks_by_head_ratio(name, num_kv):
    model = make(name)
    before = measure_kv_cache_bytes_per_token(model)
    report = convert_to_gqa(model, num_kv)
    after = measure_kv_cache_bytes_per_token(model)
    assert before == report.kv_bytes_per_token_before  # 4 heads, all cached (stock Falcon-40B included)
    assert after == report.kv_bytes_per_token_after
    assert before / after == 4 / num_kv


def test_stock_falcon_40b_style_cache_heads_by_transformers_version_the_plugin_only_kv_heads():
    model = tiny_model("falcon", num_key_value_heads=2)  # new_decoder_architecture, num_kv_heads=2
    # transformers < 5.25 repeats K/V to all 4 query heads before caching them; 5.25 caches the 2 K/V heads
    cached_heads = 4 if Version(transformers.__version__) < Version("5.25.0.dev0") else 2
    assert falcon_modeling.stock_cached_kv_heads(model.config) == cached_heads
    stock = measure_kv_cache_bytes_per_token(model)
    report = convert_to_gqa(model, 1)
    assert report.before["num_key_value_heads"] == 2
    assert stock == cached_heads / 2 * report.kv_bytes_per_token_before
    assert measure_kv_cache_bytes_per_token(model) == report.kv_bytes_per_token_after == stock / cached_heads


def test_grouped_falcon_config_keeps_its_num_key_value_heads():
    # transformers 5.25's FalconConfig.__post_init__ derives num_key_value_heads from the stock fields
    fields = {
        "hidden_size": 64,
        "num_attention_heads": 4,
        "new_decoder_architecture": True,
        "num_kv_heads": 2,
    }
    config = falcon_modeling.GroupedFalconConfig(**fields, num_key_value_heads=1)
    assert config.num_key_value_heads == 1
    assert type(config).from_dict(config.to_dict()).num_key_value_heads == 1
    assert falcon_modeling.GroupedFalconConfig(**fields).num_key_value_heads == 2  # None: the stock count


@pytest.mark.parametrize("name", list(CASES))
def test_calibration_inputs_reach_every_attention_module(name):
    model = make(name)
    rows = collect_attention_inputs(model, ids(1, 16)[0], window=8)
    assert len(rows) == 2 and all(r.shape == (16, 64) for r in rows)


# -- save / load ----------------------------------------------------------------------------------------------
LOAD_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    from transformers import AutoModel, AutoModelForCausalLM
    if sys.argv[1] == "package":
        import hf_attn_swap  # registers the plugin Auto classes
        kwargs = {}
    else:
        sys.modules["hf_attn_swap"] = None  # not importable: load through the saved code (auto_map)
        kwargs = {"trust_remote_code": True}
    for folder, auto, ids in json.loads(sys.argv[2]):
        auto = {"AutoModel": AutoModel, "AutoModelForCausalLM": AutoModelForCausalLM}[auto]
        model = auto.from_pretrained(folder, attn_implementation="eager", **kwargs).eval()
        assert sys.argv[1] == "package" or sys.modules["hf_attn_swap"] is None
        with torch.no_grad():
            out = model(input_ids=torch.tensor(ids))
        out = out.logits if hasattr(out, "logits") else out.last_hidden_state
        generated = {}
        if auto is AutoModelForCausalLM:
            for use_cache in (True, False):  # the saved code's cached decoding == recomputing every step
                generated[use_cache] = model.generate(
                    torch.tensor(ids)[:1, :5], max_new_tokens=6, do_sample=False, use_cache=use_cache,
                    pad_token_id=0, eos_token_id=None,
                )
        torch.save({"outputs": out, "class": type(model).__name__, "module": type(model).__module__,
                    "generated": generated}, f"{folder}/{sys.argv[1]}.pt")
    """
)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Every case converted to 2 KV heads and saved; reloaded in two fresh processes (with the package, and
    with only the checkpoint's own code)."""
    root = tmp_path_factory.mktemp("saved")
    x = ids()
    jobs, expected = [], {}
    for name, (_, auto_class, _) in CASES.items():
        model = make(name)
        convert_to_gqa(model, 2)
        model.save_pretrained(root / name)
        expected[name] = (outputs(model, x), type(model).__name__)
        jobs.append([str(root / name), auto_class.__name__, x.tolist()])
    for mode in ("package", "remote"):
        env = subprocess_env(HF_MODULES_CACHE=str(root / "hf_modules"))
        if mode == "remote":  # the checkpoint's own code only (hf_attn_swap is also blocked in the script)
            del env["PYTHONPATH"]
        subprocess.run(
            [sys.executable, "-c", LOAD_SCRIPT, mode, json.dumps(jobs)], check=True, cwd=root, env=env
        )
    return root, expected


@pytest.mark.parametrize("mode", ["package", "remote"])
@pytest.mark.parametrize("name", list(CASES))
def test_save_load_round_trip_in_fresh_process(saved, name, mode):
    root, expected = saved
    loaded = torch.load(root / name / f"{mode}.pt")
    want_outputs, want_class = expected[name]
    assert loaded["class"] == want_class
    assert loaded["module"].startswith(
        "hf_attn_swap.modeling." if mode == "package" else "transformers_modules."
    )
    assert torch.equal(loaded["outputs"], want_outputs)
    if name in CAUSAL:
        assert torch.equal(loaded["generated"][True], loaded["generated"][False])
    assert (root / name / "compat.py").is_file()  # the cache-name compatibility travels with the code
    config = json.loads((root / name / "config.json").read_text())
    assert config["num_key_value_heads"] == 2
    assert config["model_type"].startswith("hf_attn_swap_") and "AutoConfig" in config["auto_map"]


@pytest.mark.parametrize("name", list(CASES))
def test_convert_checkpoint_of_a_from_pretrained_source(saved_tiny, tmp_path, name):
    """Folder to folder: keys renamed by the stock loader (GPT-NeoX's embed_out) survive the plugin round trip."""
    from hf_attn_swap.pipeline.convert import convert_checkpoint

    model_type, auto_class, overrides = CASES[name]
    src = saved_tiny(model_type, auto_class=auto_class, **overrides)
    convert_checkpoint(src, tmp_path / "out", num_key_value_heads=2)
    loaded, info = auto_class.from_pretrained(
        tmp_path / "out", attn_implementation="eager", output_loading_info=True
    )
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    expected = auto_class.from_pretrained(src, attn_implementation="eager").eval()
    convert_to_gqa(expected, 2)
    x = ids()
    assert torch.equal(outputs(loaded.eval(), x), outputs(expected, x))


def test_plugin_classes_are_registered_with_auto_classes():
    from transformers import AutoConfig

    config = AutoConfig.for_model("hf_attn_swap_gpt2", n_embd=64, n_head=4, n_layer=1, num_key_value_heads=2)
    model = AutoModelForCausalLM.from_config(config)
    assert type(model).__name__ == "GroupedGPT2LMHeadModel"
    assert model.transformer.h[0].attn.c_attn.weight.shape == (64, 64 + 2 * 2 * 16)
    assert hf_attn_swap.modeling.FAMILIES.keys() == {"gpt2", "gpt_neox", "opt", "falcon", "bert"}


# -- refusals -------------------------------------------------------------------------------------------------
def test_falcon_alibi_is_refused_before_anything_changes():
    model = tiny_model("falcon", alibi=True, new_decoder_architecture=False, multi_query=False)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UnsupportedArchitectureError, match="ALiBi.*Supported: rotary Falcon"):
        convert_to_gqa(model, 2)
    assert type(model).__name__ == "FalconForCausalLM" and model.config.model_type == "falcon"
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_falcon_multi_query_is_already_mqa():
    model = tiny_model("falcon", new_decoder_architecture=False, multi_query=True)
    assert get_adapter(model).layout(model.config).num_key_value_heads == 1
    assert not convert_to_gqa(model, 1).changed
    with pytest.raises(ValueError, match="larger than the current 1 KV heads"):
        convert_to_gqa(model, 2)


@pytest.mark.parametrize(
    ("model_type", "auto_class", "overrides", "match"),
    [
        ("gpt2", AutoModelForCausalLM, {"add_cross_attention": True}, "cross-attention"),
        ("bert", AutoModelForCausalLM, {"is_decoder": True, "add_cross_attention": True}, "cross-attention"),
    ],
)
def test_cross_attention_models_are_refused(model_type, auto_class, overrides, match):
    model = tiny_model(model_type, auto_class=auto_class, **overrides)
    with pytest.raises(UnsupportedArchitectureError, match=match):
        convert_to_gqa(model, 2)


def test_model_class_without_plugin_class_is_refused():
    from transformers import GPT2ForSequenceClassification

    from hf_attn_swap.testing import tiny_config

    model = GPT2ForSequenceClassification(tiny_config("gpt2", pad_token_id=0)).eval()
    with pytest.raises(UnsupportedArchitectureError, match="GPT2LMHeadModel, GPT2Model"):
        convert_to_gqa(model, 2)
    assert type(model.transformer.h[0].attn).__name__ == "GPT2Attention"


# -- the packaged real encoder --------------------------------------------------------------------------------
def test_real_minilm_gqa_matches_repeated_kv_reference_with_right_padding(tmp_path):
    """all-MiniLM-L6-v2 12 -> 4 KV heads (mean): mean-pooled sentence embeddings of real tutorial paragraphs,
    batched with right padding, equal those of the stock model holding the repeated pooled heads, and those
    of the folder ``hf-attn-swap convert`` writes."""
    from transformers import AutoTokenizer

    from hf_attn_swap.evaluate.embeddings import mean_pooled_embeddings
    from hf_attn_swap.io.examples import example_model_path
    from hf_attn_swap.io.text import default_eval_files, prose_paragraphs, read_text, resolve_text_files
    from hf_attn_swap.pipeline.convert import convert_checkpoint

    try:
        path = example_model_path("minilm")
        texts = prose_paragraphs(read_text(resolve_text_files(default_eval_files())), min_words=12, limit=4)
    except (ModuleNotFoundError, FileNotFoundError) as missing:
        pytest.skip(f"packaged MiniLM or tutorial text unavailable: {missing}")
    tokenizer = AutoTokenizer.from_pretrained(path)
    original = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    converted = copy.deepcopy(original)
    report = convert_to_gqa(converted, 4)
    assert report.kv_bytes_per_token_before / report.kv_bytes_per_token_after == 3
    reference = repeated_kv_reference(original, converted)
    batched = mean_pooled_embeddings(converted, tokenizer, texts, batch_size=4)
    one_by_one = mean_pooled_embeddings(converted, tokenizer, texts, batch_size=1)
    torch.testing.assert_close(batched, one_by_one, rtol=0, atol=1e-5)
    torch.testing.assert_close(
        batched, mean_pooled_embeddings(reference, tokenizer, texts), rtol=0, atol=1e-5
    )
    assert (batched - mean_pooled_embeddings(original, tokenizer, texts)).abs().max() > 1e-2

    convert_checkpoint(path, tmp_path / "out", num_key_value_heads=4)
    saved = AutoModel.from_pretrained(tmp_path / "out").eval()
    assert type(saved).__name__ == "GroupedBertModel"
    assert (tmp_path / "out" / "modules.json").is_file() and (tmp_path / "out" / "1_Pooling").is_dir()
    torch.testing.assert_close(mean_pooled_embeddings(saved, tokenizer, texts), batched, rtol=0, atol=1e-5)
