"""GQA/MQA initialisation methods beyond mean pooling: grouping, alignment, activation fit (and combinations).

References: the original model's logits (function-preserving steps must not change them), exact recovery
where the math says a method must be exact, and mean pooling on held-out text for the fitted methods.
"""

from __future__ import annotations

import copy
import math
import subprocess

import pytest
import torch
import torch.nn.functional as F
from conftest import NATIVE_FAMILIES, PYTHON, make_groups_identical, subprocess_env
from test_checkpoint_cli import STOCK_LOADER

from hf_attn_swap import convert_to_gqa
from hf_attn_swap.adapters import get_adapter
from hf_attn_swap.cli import build_parser, main
from hf_attn_swap.io.checkpoints import load_causal_lm, load_tokenizer
from hf_attn_swap.io.text import load_token_ids
from hf_attn_swap.methods.affine import split_bias, with_bias
from hf_attn_swap.methods.calibration import collect_attention_inputs, collect_calibration
from hf_attn_swap.methods.gqa import (
    GQA_METHODS,
    align_heads,
    balanced_partition,
    expand_to_query_heads,
    fit_heads,
    layer_context,
    permute_query_heads,
)
from hf_attn_swap.methods.gqa import alignment as alignment_module
from hf_attn_swap.methods.gqa.statistics import from_complex, rotary_pairs, to_complex
from hf_attn_swap.methods.report import load_report
from hf_attn_swap.pipeline.convert import convert_checkpoint
from hf_attn_swap.testing import tiny_model

CALIBRATED = ["group", "align", "fit", "group-align", "group-fit"]
ALL_METHODS = ["mean", *CALIBRATED]
#: family -> extra config: Phi-3 also with partial rotary, so methods meet non-rotary dims
FAMILY_CASES = [(f, {}) for f in NATIVE_FAMILIES] + [("phi3", {"partial_rotary_factor": 0.5})]
CASE_IDS = [f + ("-partial" if kw else "") for f, kw in FAMILY_CASES]


def _ids(batch=2, length=16, seed=0):
    return torch.randint(3, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def _calibration(model, tokens=256, window=64, seed=1):
    return collect_attention_inputs(model, _ids(1, tokens, seed)[0], window=window)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _kl(logits, reference):
    """Mean per-token KL(reference || model) in nats."""
    ref = F.log_softmax(reference.double(), -1)
    return (ref.exp() * (ref - F.log_softmax(logits.double(), -1))).sum(-1).mean().item()


def _rewrite_expanded(model, transform, num_key_value_heads, calibration=None):
    """Give every layer one K/V head per query head, pass it through ``transform(weights, ctx)`` and write the
    result back with H KV heads: the function a transform must preserve *before* any merging."""
    adapter = get_adapter(model)
    layout = adapter.layout(model.config, model)
    for idx, attn in enumerate(adapter.attention_modules(model)):
        ctx = layer_context(
            attn, idx, layout, num_key_value_heads, None if calibration is None else calibration[idx]
        )
        weights = expand_to_query_heads(adapter.read(attn))
        adapter.write(attn, transform(weights, ctx))
    adapter.set_num_key_value_heads(model, layout.num_attention_heads)
    return model


def _max_change(model_a, model_b, name):
    """Largest |difference| of one projection (k or v, expanded per query head) between two models."""
    adapter = get_adapter(model_a)
    out = 0.0
    for a, b in zip(adapter.attention_modules(model_a), adapter.attention_modules(model_b), strict=True):
        wa, wb = (expand_to_query_heads(adapter.read(m)) for m in (a, b))
        out = max(out, (getattr(wa, name) - getattr(wb, name)).abs().max().item())
    return out


# -- function-preserving steps -------------------------------------------------------------------------------
@pytest.mark.parametrize("family,config", FAMILY_CASES, ids=CASE_IDS)
def test_alignment_preserves_the_function(family, config):
    """Aligned heads (rotations folded into q and o) give the original logits: fp32 within 1e-5 (+1e-5 rel),
    float64 within 1e-9 (Qwen3's q/k RMSNorm computes in fp32 even in a float64 model: 1e-5); and the alignment
    really moved K and V."""
    ids = _ids()
    f64 = dict(atol=1e-5 if family == "qwen3" else 1e-9, rtol=0)
    for dtype, tol in ((torch.float32, dict(atol=1e-5, rtol=1e-5)), (torch.float64, f64)):
        model = tiny_model(family, num_attention_heads=4, num_key_value_heads=2, **config).to(dtype)
        calibration = _calibration(model)
        aligned = _rewrite_expanded(copy.deepcopy(model), align_heads, 1, calibration)
        torch.testing.assert_close(_logits(aligned, ids), _logits(model, ids), **tol)
        plain = _rewrite_expanded(copy.deepcopy(model), lambda w, ctx: w, 1)
        assert _max_change(aligned, plain, "k") > 1e-2 and _max_change(aligned, plain, "v") > 1e-2


def _qwen3_with_uneven_norms():
    """Tiny Qwen3 whose q/k norm weights are equal within rotary pairs 0-2 only (rotating others breaks it)."""
    model = tiny_model("qwen3", num_attention_heads=4, num_key_value_heads=4)
    half = model.config.head_dim // 2
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for attn in get_adapter(model).attention_modules(model):
            for norm in (attn.q_norm, attn.k_norm):
                norm.weight.copy_(0.5 + torch.rand(norm.weight.shape, generator=g))
                norm.weight[half : half + 3] = norm.weight[:3]
    return model


def test_qk_norm_restricts_key_rotations_to_commuting_pairs(monkeypatch):
    model = _qwen3_with_uneven_norms()
    ids, calibration = _ids(), _calibration(model)
    aligned = _rewrite_expanded(copy.deepcopy(model), align_heads, 1, calibration)
    torch.testing.assert_close(_logits(aligned, ids), _logits(model, ids), atol=1e-5, rtol=1e-5)
    plain = _rewrite_expanded(copy.deepcopy(model), lambda w, ctx: w, 1)
    pairs, _ = rotary_pairs(get_adapter(model).layout(model.config).rope, model.config.head_dim)
    adapter = get_adapter(model)
    for a, b in zip(adapter.attention_modules(aligned), adapter.attention_modules(plain), strict=True):
        ka, kb = adapter.read(a).k, adapter.read(b).k
        assert torch.equal(
            ka[:, pairs[3:].flatten()], kb[:, pairs[3:].flatten()]
        )  # unequal norm weights: kept
        assert (ka[:, pairs[:3].flatten()] - kb[:, pairs[:3].flatten()]).abs().max() > 1e-2  # equal: rotated
    # control: rotating every pair would change the function, so the restriction is what keeps it exact
    monkeypatch.setattr(
        alignment_module, "commuting_pairs", lambda ctx, p: torch.ones(len(p), dtype=torch.bool)
    )
    unrestricted = _rewrite_expanded(copy.deepcopy(model), align_heads, 1, calibration)
    assert (_logits(unrestricted, ids) - _logits(model, ids)).abs().max() > 1e-3


@pytest.mark.parametrize("family,config", FAMILY_CASES, ids=CASE_IDS)
def test_query_head_permutation_preserves_the_function(family, config):
    """Moving query heads between groups with their own K/V (and o columns) is exact, from a GQA source."""
    model = tiny_model(family, num_attention_heads=4, num_key_value_heads=2, **config)
    ids = _ids()
    permuted = _rewrite_expanded(copy.deepcopy(model), lambda w, ctx: permute_query_heads(w, [3, 0, 2, 1]), 2)
    torch.testing.assert_close(_logits(permuted, ids), _logits(model, ids), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="permutation"):
        permute_query_heads(
            expand_to_query_heads(get_adapter(model).read(get_adapter(model).attention_modules(model)[0])),
            [0, 0, 1, 2],
        )


def test_balanced_partition_finds_the_cheapest_equal_groups():
    # heads 0 & 2 and 1 & 3 are close; contiguous groups {0,1}, {2,3} are the worst choice
    dist = torch.tensor([[0, 5, 1, 5], [5, 0, 5, 1], [1, 5, 0, 5], [5, 1, 5, 0]], dtype=torch.float64)
    assert balanced_partition(dist, 2) == [[0, 2], [1, 3]]
    six = torch.rand(6, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    six = six + six.T
    groups = balanced_partition(six, 3)
    assert sorted(h for g in groups for h in g) == list(range(6)) and all(len(g) == 2 for g in groups)

    def cost(gs):
        return sum(six[a, b] for g in gs for a in g for b in g if a < b)

    assert cost(groups) <= cost([[0, 1], [2, 3], [4, 5]])  # never worse than the stock grouping


@pytest.mark.parametrize("method", ["group", "group-align", "group-fit"])
@pytest.mark.parametrize("family", ["llama", "qwen2", "phi3"])
def test_grouping_recovers_hidden_groups_and_converts_exactly(method, family):
    """Query heads 0 & 2 (and 1 & 3) share identical K/V but sit in different stock groups: grouping must pair
    them, after which pooling to 2 KV heads is exact; stock-order mean pooling is not."""
    model = tiny_model(family, num_attention_heads=4, num_key_value_heads=4)
    adapter = get_adapter(model)
    with torch.no_grad():
        for attn in adapter.attention_modules(model):
            w = adapter.read(attn)
            for t in (w.k, w.v, w.k_bias, w.v_bias):
                if t is not None:
                    t[2], t[3] = t[0].clone(), t[1].clone()
            adapter.write(attn, w)
    ids, calibration = _ids(), _calibration(model)
    reference = _logits(model, ids)
    converted = copy.deepcopy(model)
    report = convert_to_gqa(converted, 2, method=method, calibration=calibration)
    assert report.details["head_order"] == [[0, 2, 1, 3]] * 2
    torch.testing.assert_close(_logits(converted, ids), reference, atol=1e-5, rtol=1e-5)
    mean = copy.deepcopy(model)
    convert_to_gqa(mean, 2, method="mean")
    assert (_logits(mean, ids) - reference).abs().max() > 1e-2


# -- exactness ------------------------------------------------------------------------------------------------
#: grouping methods from MHA to 2 groups (the grouping has a choice to make); the others GQA 3 -> MQA
EXACTNESS_LAYOUTS = {"group": (4, 4, 2), "group-align": (4, 4, 2), "group-fit": (4, 4, 2)}


@pytest.mark.parametrize("method", CALIBRATED)
@pytest.mark.parametrize("family", NATIVE_FAMILIES)
def test_every_method_is_exact_for_identical_heads(method, family):
    heads, kv_before, kv_after = EXACTNESS_LAYOUTS.get(method, (6, 3, 1))
    model = tiny_model(family, num_attention_heads=heads, num_key_value_heads=kv_before)
    make_groups_identical(model, kv_after)
    ids = _ids()
    before = _logits(model, ids)
    convert_to_gqa(model, kv_after, method=method, calibration=_calibration(model))
    assert model.config.num_key_value_heads == kv_after
    torch.testing.assert_close(_logits(model, ids), before, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["align", "fit", "group-fit"])
@pytest.mark.parametrize("name", ["gpt2", "gpt_neox", "opt", "falcon-40b-style", "bert"])
def test_methods_work_through_plugin_adapters(name, method):
    """The methods only use the adapter API (read/write, layout, RoPE pairs), so families without native GQA
    (learned positions, partial rotary, encoders) convert tied heads exactly too."""
    from test_plugin_architectures import ids, make, outputs

    original = make(name)
    make_groups_identical(original, 2)
    converted = copy.deepcopy(original)
    convert_to_gqa(converted, 2, method=method, calibration=_calibration(original))
    x = ids()
    torch.testing.assert_close(outputs(converted, x), outputs(original, x), atol=1e-5, rtol=1e-5)


def _relate_heads(model, scale: bool, noise: float = 0.0, seed: int = 0):
    """Make every head's K and V an exact symmetry image of head 0's (+ optional noise): per rotary pair a
    rotation (times a scale), on non-rotary dims and on V an orthogonal map (times a scale). q and o stay
    random. Mean pooling of such heads is poor; alignment undoes rotations, the fit also undoes scales."""
    g = torch.Generator().manual_seed(seed)
    adapter = get_adapter(model)
    layout = adapter.layout(model.config, model)
    pairs, plain = rotary_pairs(layout.rope, layout.head_dim)

    def magnitude(shape):
        ones = torch.ones(shape, dtype=torch.float64)
        return torch.exp(0.7 * torch.randn(shape, generator=g, dtype=torch.float64)) if scale else ones

    def orthogonal(n):
        return torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0] * magnitude(())

    with torch.no_grad():
        for attn in adapter.attention_modules(model):
            w = adapter.read(attn)
            k, v = with_bias(w.k, w.k_bias), with_bias(w.v, w.v_bias)
            for j in range(1, k.shape[0]):
                turn = torch.polar(
                    magnitude(len(pairs)),
                    2 * math.pi * torch.rand(len(pairs), generator=g, dtype=torch.float64),
                )
                k[j] = from_complex(k[0], pairs, to_complex(k[0], pairs) * turn[:, None])
                if len(plain):
                    k[j, plain] = orthogonal(len(plain)) @ k[0, plain]
                v[j] = orthogonal(v.shape[1]) @ v[0]
            for t in (k, v):
                t += noise * t.std() * torch.randn(t.shape, generator=g, dtype=t.dtype)
            (w.k, w.k_bias), (w.v, w.v_bias) = (
                split_bias(t, b is not None, torch.float32) for t, b in ((k, w.k_bias), (v, w.v_bias))
            )
            adapter.write(attn, w)


@pytest.mark.parametrize(
    "family,config", [("llama", {}), ("qwen2", {}), ("phi3", {"partial_rotary_factor": 0.5})]
)
def test_alignment_and_fit_undo_exact_symmetries_that_defeat_mean_pooling(family, config):
    ids = _ids()
    for scale, exact in ((False, ["align", "fit"]), (True, ["fit"])):
        model = tiny_model(family, num_attention_heads=4, num_key_value_heads=4, **config)
        _relate_heads(model, scale=scale)
        calibration, reference = _calibration(model), _logits(model, ids)
        for method in ["mean", "align", "fit"]:
            converted = copy.deepcopy(model)
            convert_to_gqa(converted, 1, method=method, calibration=calibration)
            error = (_logits(converted, ids) - reference).abs().max().item()
            if method in exact:
                assert error < 1e-4, (method, scale, error)
            else:
                assert error > 1e-2, (method, scale, error)


@pytest.mark.parametrize(
    "family,config", [("llama", {}), ("qwen2", {}), ("phi3", {"partial_rotary_factor": 0.5})]
)
def test_fitted_methods_beat_mean_on_held_out_text(family, config):
    """Near-symmetric heads (symmetry images + 15% noise): calibrated on one token stream, scored on another,
    the fit must cut mean pooling's KL by 4x and beat alignment alone."""
    model = tiny_model(family, num_attention_heads=4, num_key_value_heads=4, **config)
    _relate_heads(model, scale=True, noise=0.15)
    calibration, held_out = _calibration(model, seed=1), _ids(4, 32, seed=99)
    reference = _logits(model, held_out)
    kl = {}
    for method in ["mean", "align", "fit", "group-fit"]:
        converted = copy.deepcopy(model)
        convert_to_gqa(converted, 1, method=method, calibration=calibration)
        kl[method] = _kl(_logits(converted, held_out), reference)
    assert kl["fit"] < kl["mean"] / 4, kl
    assert kl["fit"] < kl["align"] < kl["mean"], kl
    assert kl["group-fit"] == pytest.approx(kl["fit"], rel=1e-6)  # MQA: one group, grouping changes nothing


def test_fit_is_invariant_to_alignment():
    """The fit's objective is invariant under the alignment's transforms: aligning first changes nothing."""
    model = tiny_model("qwen2", num_attention_heads=4, num_key_value_heads=2)
    ids, calibration = _ids(), _calibration(model)
    direct = _rewrite_expanded(copy.deepcopy(model), fit_heads, 1, calibration)
    aligned_first = _rewrite_expanded(
        copy.deepcopy(model), lambda w, ctx: fit_heads(align_heads(w, ctx), ctx), 1, calibration
    )
    torch.testing.assert_close(_logits(aligned_first, ids), _logits(direct, ids), atol=1e-4, rtol=1e-4)


def test_key_weights_are_the_attention_each_token_receives():
    """collect_calibration(key_weights=True) == column sums of the model's own attention probabilities (mean
    over heads), rows aligned with the inputs; the sdpa implementation is restored afterwards."""
    model = tiny_model("llama", num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa")
    ids = _ids(1, 40)[0]
    calibration = collect_calibration(model, ids, window=16, key_weights=True)
    assert model.config._attn_implementation == "sdpa"
    assert [x.shape for x in calibration.inputs] == [(40, 64)] * 2
    torch.testing.assert_close(calibration.inputs[1], collect_attention_inputs(model, ids, window=16)[1])
    eager = tiny_model("llama", num_attention_heads=4, num_key_value_heads=2, attn_implementation="eager")
    for start, stop in ((0, 16), (16, 32), (32, 40)):
        with torch.no_grad():
            probs = eager(ids[None, start:stop], output_attentions=True).attentions
        for layer, p in enumerate(probs):
            expected = p[0].sum(-2).mean(0)
            torch.testing.assert_close(calibration.key_weights[layer][start:stop], expected)
            assert calibration.key_weights[layer][start:stop].mean().item() == pytest.approx(1.0)


def test_fit_weights_keys_by_the_attention_they_receive():
    """With key weights the fit changes (they are used), stays exact for identical heads, and records it."""
    model = tiny_model("qwen2", num_attention_heads=4, num_key_value_heads=4)
    calibration = collect_calibration(model, _ids(1, 192)[0], window=64, key_weights=True)
    uniform, weighted = copy.deepcopy(model), copy.deepcopy(model)
    convert_to_gqa(uniform, 1, method="fit", calibration=calibration.inputs)
    report = convert_to_gqa(weighted, 1, method="fit", calibration=calibration)
    assert report.details["key_weights"] == "attention received"
    adapter = get_adapter(model)
    k_uniform, k_weighted = (adapter.read(m.model.layers[0].self_attn).k for m in (uniform, weighted))
    assert (k_uniform - k_weighted).abs().max() > 1e-3
    make_groups_identical(model, 1)
    ids, before = _ids(), _logits(model, _ids())
    calibration = collect_calibration(model, _ids(1, 192)[0], window=64, key_weights=True)
    convert_to_gqa(model, 1, method="group-fit", calibration=calibration)
    torch.testing.assert_close(_logits(model, ids), before, atol=1e-5, rtol=1e-5)


# -- checkpoints, CLI, errors --------------------------------------------------------------------------------
def test_every_method_reloads_in_stock_transformers(saved_tiny, text_file, tmp_path):
    """convert_checkpoint with calibration text -> a fresh process with the plugin blocked reloads every output
    with the in-memory logits (all methods on Llama/Qwen2, fit on every family)."""
    cases = [(m, f) for m in ALL_METHODS for f in ("llama", "qwen2")]
    cases += [("group-fit", f) for f in NATIVE_FAMILIES if f not in ("llama", "qwen2")]
    ids = _ids(2, 9)
    expected, outs = {}, []
    for method, family in cases:
        src = tmp_path / f"{family}-src"
        if not src.exists():
            saved_tiny(family, name=src.name, num_attention_heads=6, num_key_value_heads=3)
        out = tmp_path / f"{family}-{method}"
        report = convert_checkpoint(
            src, out, num_key_value_heads=1, method=method, calibration_data=[text_file]
        )
        assert load_report(out)["method"] == method
        if method != "mean":
            assert (
                report.details["calibration_tokens"]
                == load_token_ids(load_tokenizer(src), [text_file]).numel()
            )
            uses_key_weights = method in ("fit", "group-fit")
            assert report.details["key_weights"] == ("attention received" if uses_key_weights else None)
        with torch.no_grad():
            expected[str(out)] = load_causal_lm(out, attn_implementation="eager").double()(ids).logits
        outs.append(str(out))
    torch.save(ids, tmp_path / "ids.pt")
    script = tmp_path / "stock_loader.py"
    script.write_text(STOCK_LOADER)
    subprocess.run(
        [PYTHON, str(script), str(tmp_path / "ids.pt"), str(tmp_path / "logits.pt"), *outs],
        check=True,
        env=subprocess_env(PYTHONPATH=""),
        cwd=tmp_path,
    )
    got = torch.load(tmp_path / "logits.pt")
    for folder in outs:
        torch.testing.assert_close(got[folder], expected[folder], atol=1e-10, rtol=0)


@pytest.mark.parametrize("method", CALIBRATED)
def test_methods_without_calibration_name_the_flag(method, saved_tiny, tmp_path, capsys, monkeypatch):
    model = tiny_model("llama", num_attention_heads=4, num_key_value_heads=4)
    with pytest.raises(ValueError, match="--calibration-data"):
        convert_to_gqa(model, 1, method=method)
    assert model.config.num_key_value_heads == 4
    src, out = saved_tiny("llama"), tmp_path / "out"

    def no_loading(*args, **kwargs):
        raise AssertionError("weights must not be loaded before the inputs are checked")

    monkeypatch.setattr("hf_attn_swap.io.checkpoints.load_causal_lm", no_loading)
    with pytest.raises(
        ValueError, match=f"method '{method}' needs calibration text: pass --calibration-data"
    ):
        convert_checkpoint(src, out, num_key_value_heads=1, method=method)
    assert (
        main(["convert", str(src), str(out), "--to", "gqa", "--num-kv-heads", "1", "--method", method]) == 2
    )
    assert "--calibration-data" in capsys.readouterr().err
    assert not out.exists()


def test_demo_takes_several_methods_and_rejects_unknown_ones(capsys):
    args = build_parser().parse_args(["demo", "--method", "mean", "fit", "--method", "group-fit"])
    assert args.method == ["mean", "fit", "group-fit"]
    assert build_parser().parse_args(["demo"]).method is None  # -> mean, the README's main job
    assert main(["demo", "--method", "median"]) == 2
    assert "unknown GQA method(s) ['median']" in capsys.readouterr().err
    assert set(CALIBRATED) | {"mean"} == set(GQA_METHODS)


# -- the packaged real model ------------------------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_mqa_fit_cuts_the_perplexity_excess_of_mean_pooling_tenfold():
    """SmolLM2-135M 3 -> 1 KV heads, calibrated on library/ text, scored on held-out tutorial/ text."""
    from hf_attn_swap.evaluate.metrics import evaluate_models
    from hf_attn_swap.io.examples import example_model_path
    from hf_attn_swap.io.text import PYTHON_DOCS, default_eval_files, default_train_files
    from hf_attn_swap.methods.calibration import collect_calibration_from_files

    if not PYTHON_DOCS.is_dir():
        pytest.skip("apt-get install python3.11-doc")
    src = example_model_path("smollm2")
    original, tokenizer = load_causal_lm(src, dtype="float32"), load_tokenizer(src)
    calibration = collect_calibration_from_files(
        original, tokenizer, default_train_files(), max_tokens=4096, key_weights=True
    )
    models = {}
    for method in ("mean", "fit"):
        models[method] = copy.deepcopy(original)
        convert_to_gqa(models[method], 1, method=method, calibration=calibration)
    ids = load_token_ids(tokenizer, default_eval_files(), max_tokens=2048)
    scores = evaluate_models(
        {"original": original, **models}, ids, window=1024, reference=original, progress=False
    )
    excess = {m: scores[m]["perplexity"] - scores["original"]["perplexity"] for m in models}
    assert excess["fit"] * 10 < excess["mean"], scores
    assert scores["fit"]["kl_to_reference"] < scores["mean"]["kl_to_reference"] / 2, scores
