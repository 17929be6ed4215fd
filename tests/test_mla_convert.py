"""convert_to_mla: exactness where the math says so, rope selection, factorisation, rank budgets, bad input."""

import copy
import itertools

import pytest
import torch

from hf_attn_swap import UnsupportedArchitectureError, convert_to_mla
from hf_attn_swap.methods.calibration import collect_attention_inputs
from hf_attn_swap.methods.mla import allocate_ranks, joint_kv, select_rope_pairs
from hf_attn_swap.modeling.mla import MLAConfig, MLAForCausalLM
from hf_attn_swap.testing import tiny_model

# (family, query heads, KV heads): MHA, GQA with q/k/v biases, MQA
SOURCES = [("llama", 4, 4), ("llama", 4, 2), ("qwen2", 4, 2), ("mistral", 4, 1)]


def logits(model, ids, mask=None):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def calibration_for(model, tokens=96):
    return collect_attention_inputs(model, torch.arange(3, 3 + tokens) % 128, window=48)


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("family,heads,kv", SOURCES)
@pytest.mark.parametrize("factorization", ["svd", "pca"])
def test_full_rank_all_rope_dims_reproduces_source(family, heads, kv, factorization):
    """One rope key per KV head, every rotary pair kept, full rank: the plugin model is the source."""
    ids = torch.randint(3, 128, (2, 14), generator=torch.Generator().manual_seed(1))
    for dtype, tolerance in ((torch.float64, 1e-10), (torch.float32, 1e-5)):
        model = tiny_model(family, num_attention_heads=heads, num_key_value_heads=kv).to(dtype)
        reference = logits(model, ids)
        calibration = calibration_for(model) if factorization == "pca" else None
        full_rank = min(64, 2 * kv * 16)
        report = convert_to_mla(
            model, full_rank, 16, factorization=factorization, calibration=calibration, num_rope_key_heads=kv
        )
        assert isinstance(model, MLAForCausalLM) and model.config.model_type == "hf_attn_swap_mla"
        error = (logits(model, ids) - reference).abs().max().item()
        assert error <= tolerance * max(1.0, reference.abs().max().item()), (dtype, error)
        assert report.kv_bytes_per_token_after == (full_rank + kv * 16) * 2 * dtype.itemsize


def test_shared_rope_key_is_exact_when_kv_heads_are_proportional_per_frequency():
    """RoRoPE: if head 1's slice at each rotary pair is a multiple of head 0's, one shared key loses nothing."""
    model = tiny_model("llama", num_attention_heads=4, num_key_value_heads=2).double()
    for layer in model.model.layers:
        k = layer.self_attn.k_proj.weight.data.view(2, 16, 64)
        scale = torch.linspace(-2.0, 3.0, 8, dtype=torch.float64)  # one factor per rotary pair
        k[1] = k[0] * torch.cat([scale, scale])[:, None]
    ids = torch.randint(3, 128, (1, 16), generator=torch.Generator().manual_seed(2))
    reference = logits(model, ids)
    for calibration in (None, calibration_for(model)):
        converted = copy.deepcopy(model)
        convert_to_mla(converted, 64, 16, num_rope_key_heads=1, calibration=calibration)
        assert (logits(converted, ids) - reference).abs().max().item() < 1e-9
    # without proportional heads the shared key drops rotation on the residual: not exact (the test can fail)
    other = tiny_model("llama", num_attention_heads=4, num_key_value_heads=2).double()
    reference = logits(other, ids)
    convert_to_mla(other, 64, 16, num_rope_key_heads=1)
    assert (logits(other, ids) - reference).abs().max().item() > 1e-3


def test_rope_selection_strategies():
    model = tiny_model("llama")
    layout_args = dict(num_attention_heads=4, num_key_value_heads=4)
    from hf_attn_swap import get_adapter

    layout = get_adapter(model).layout(model.config, model)
    assert select_rope_pairs("uniform", layout, 8) == [0, 2, 4, 6]
    assert select_rope_pairs("high", layout, 8) == [0, 1, 2, 3]
    assert select_rope_pairs("low", layout, 8) == [4, 5, 6, 7]
    # the 2-norm selection picks the pairs whose q.k contribution is largest (with and without calibration)
    boosted = tiny_model("llama", **layout_args)
    for layer in boosted.model.layers:
        for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj):
            w = proj.weight.data.view(4, 16, 64)
            w[:, [5, 13, 7, 15]] *= 20.0  # pairs 5 and 7 (dims p and p + 8)
    calibration = calibration_for(boosted)
    report = convert_to_mla(boosted, 32, 4, rope_selection="norm", calibration=calibration)
    assert report.details["rope_pairs"] == [[5, 7], [5, 7]]


def test_pca_beats_svd_on_the_calibration_activations():
    """PCA minimises E|(M - U U^T M) x|^2 over the calibration rows: never worse than the weight SVD there."""
    generator = torch.Generator().manual_seed(0)
    k, v = (
        torch.randn(32, 64, generator=generator, dtype=torch.float64),
        torch.randn(32, 64, dtype=torch.float64),
    )
    mixing = torch.randn(64, 64, generator=generator, dtype=torch.float64)
    x = torch.randn(512, 64, generator=generator, dtype=torch.float64) @ mixing  # correlated activations
    moment = x.T @ x / len(x)
    target = torch.cat([k, v]) @ x.T
    errors = {}
    for method in ("svd", "pca"):
        factors = joint_kv(k, v, method, moment, balance=False)
        for rank in (4, 16, 40):
            down, up_k, up_v = factors.factors(rank)
            errors[method, rank] = (target - torch.cat([up_k, up_v]) @ down @ x.T).square().sum().item()
    for rank in (4, 16, 40):
        assert errors["pca", rank] <= errors["svd", rank] * (1 + 1e-9)
    assert errors["pca", 4] < 0.99 * errors["svd", 4]
    assert errors["pca", 4] > errors["pca", 16] > errors["pca", 40]


def test_metric_pca_minimises_the_error_in_its_metric_and_key_weights_in_theirs():
    """weighting.py: with metrics (S, T), joint_kv keeps the best rank-r subspace of [S K ; T V] x, so its error
    measured in that metric is never above plain PCA's; with key weights b, the moment E[b x x^T] makes the
    b-weighted error minimal. Both decoders are S^-1 / T^-1 of the metric basis (checked through the error)."""
    from hf_attn_swap.methods.affine import weighted_moment
    from hf_attn_swap.methods.mla.weighting import head_metrics

    generator = torch.Generator().manual_seed(0)
    heads, kv_heads, d, hidden = 4, 2, 8, 24

    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    q, k, v, o = randn(heads, d, hidden), randn(kv_heads * d, hidden), randn(kv_heads * d, hidden), randn(hidden, heads, d)
    x = randn(400, hidden) @ randn(hidden, hidden)
    b = torch.rand(400, generator=generator, dtype=torch.float64) ** 4  # a few keys take most attention
    moment = x.T @ x / len(x)
    assert head_metrics(q, o, moment, kv_heads, 0.0) is None
    (s, s_inv), (t, t_inv) = head_metrics(q, o, moment, kv_heads, 1.0)
    eye = torch.eye(kv_heads * d, dtype=torch.float64)
    torch.testing.assert_close(s @ s_inv, eye)
    torch.testing.assert_close(t @ t_inv, eye)
    assert torch.equal(s[:d, d:], torch.zeros(d, d, dtype=torch.float64))  # block-diagonal: one block per KV head

    def error(factors, rank, rows, metric=(eye, eye)):
        down, up_k, up_v = factors.factors(rank)
        dk = metric[0] @ (k - up_k @ down) @ rows.T
        dv = metric[1] @ (v - up_v @ down) @ rows.T
        return (dk.square().sum() + dv.square().sum()).item()

    plain = joint_kv(k, v, "pca", moment, balance=False)
    metric = joint_kv(k, v, "pca", moment, balance=False, metrics=head_metrics(q, o, moment, kv_heads, 1.0))
    weighted = joint_kv(k, v, "pca", weighted_moment(x, b, 1.0), balance=False)
    root_b = x * b.sqrt()[:, None]
    for rank in (3, 8, 20):
        assert error(metric, rank, x, (s, t)) <= error(plain, rank, x, (s, t)) * (1 + 1e-9)
        assert error(weighted, rank, root_b) <= error(plain, rank, root_b) * (1 + 1e-9)
    assert error(metric, 3, x, (s, t)) < 0.99 * error(plain, 3, x, (s, t))
    assert error(weighted, 3, root_b) < 0.99 * error(plain, 3, root_b)
    full = 2 * kv_heads * d  # full rank: exact whatever the metric
    assert error(metric, full, x) <= 1e-18 * (k @ x.T).square().sum().item()
    torch.testing.assert_close(weighted_moment(x, None, 1.0), moment)
    torch.testing.assert_close(weighted_moment(x, b, 0.0), moment)
    torch.testing.assert_close(weighted_moment(x, torch.full((400,), 3.0, dtype=torch.float64), 1.0), moment)


def test_key_weights_reach_the_latent_from_every_calibration_path():
    """CalibrationText (layer by layer) and collect_calibration(key_weights=True) give the same conversion; plain
    collected inputs (no key weights) convert with unweighted statistics, recorded as key_weight_power 0."""
    from hf_attn_swap.methods.calibration import CalibrationText, collect_calibration

    ids = torch.arange(3, 99) % 128
    model = tiny_model("llama", num_attention_heads=4, num_key_value_heads=2, attn_implementation="eager")
    runs, reports = {}, {}
    for name in ("text", "collected", "inputs", "power 0"):
        converted = copy.deepcopy(model)
        if name == "text":
            calibration = CalibrationText(ids, 48, "original")
        elif name == "collected":
            calibration = collect_calibration(converted, ids, window=48, key_weights=True)
        else:
            calibration = collect_attention_inputs(converted, ids, window=48)
        power = 0.0 if name == "power 0" else 1.0
        reports[name] = convert_to_mla(
            converted, 12, 8, calibration=calibration, key_weight_power=power, output_correction=False
        )
        runs[name] = state(converted)
    assert all(torch.equal(runs["text"][n], t) for n, t in runs["collected"].items())
    assert all(torch.equal(runs["inputs"][n], t) for n, t in runs["power 0"].items())
    assert any(not torch.equal(runs["inputs"][n], t) for n, t in runs["collected"].items())
    assert reports["collected"].details["key_weight_power"] == 1.0
    assert reports["inputs"].details["key_weight_power"] == 0.0


def test_energy_rank_allocation_matches_brute_force_and_budget():
    spectra = [
        torch.tensor([5.0, 3.0, 1.0, 0.5]),
        torch.tensor([9.0, 0.5, 0.4, 0.1]),
        torch.tensor([1.0, 1.0, 1.0, 1.0]),
    ]
    total = 7
    ranks = allocate_ranks(spectra, total, [4, 4, 4])
    assert sum(ranks) == total and all(1 <= r <= 4 for r in ranks)

    def kept(rs):
        return sum(float(s[:r].sum() / s.sum()) for s, r in zip(spectra, rs, strict=True))

    best = max((rs for rs in itertools.product(range(1, 5), repeat=3) if sum(rs) == total), key=kept)
    assert kept(ranks) == pytest.approx(kept(best))
    with pytest.raises(ValueError, match="cannot be split"):
        allocate_ranks(spectra, 2, [4, 4, 4])


def test_energy_allocation_keeps_the_kv_budget_and_saves_and_loads(tmp_path):
    model = tiny_model("qwen2", num_attention_heads=4, num_key_value_heads=2)
    calibration = calibration_for(model)
    report = convert_to_mla(
        model,
        20,
        8,
        rope_selection="norm",
        factorization="pca",
        calibration=calibration,
        rank_allocation="energy",
    )
    ranks = report.details["ranks"]
    assert sum(ranks) == 2 * 20 and report.kv_bytes_per_token_after == (40 + 2 * 8) * 4
    ids = torch.randint(3, 128, (2, 11))
    expected = logits(model, ids)
    model.save_pretrained(tmp_path)
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert isinstance(loaded, MLAForCausalLM) and isinstance(loaded.config, MLAConfig)
    assert loaded.config.kv_lora_rank == (ranks if len(set(ranks)) > 1 else ranks[0])
    assert [loaded.config.layer_rope_pairs(i) for i in range(2)] == report.details["rope_pairs"]
    assert torch.equal(logits(loaded, ids), expected)


def test_truncated_rank_shrinks_cache_and_changes_output():
    model = tiny_model("llama", num_attention_heads=4, num_key_value_heads=2)
    ids = torch.randint(3, 128, (1, 12))
    reference = logits(model, ids)
    report = convert_to_mla(model, 8, 4)
    assert (
        report.kv_bytes_per_token_after == (8 + 4) * 2 * 4
        and report.kv_bytes_per_token_before == 2 * 2 * 16 * 2 * 4
    )
    assert report.kv_reduction == pytest.approx(1 - 12 / 64)
    assert (logits(model, ids) - reference).abs().max() > 1e-3  # a lossy conversion is visibly lossy


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(kv_lora_rank=0, qk_rope_head_dim=8), "kv_lora_rank=0 is out of range"),
        (dict(kv_lora_rank=-3, qk_rope_head_dim=8), "out of range"),
        (dict(kv_lora_rank=65, qk_rope_head_dim=8), r"between 1 and 64"),
        (dict(kv_lora_rank=8.0, qk_rope_head_dim=8), "must be an int"),
        (dict(kv_lora_rank=8, qk_rope_head_dim=7), "must be even"),
        (dict(kv_lora_rank=8, qk_rope_head_dim=18), "larger than the 16 rotary dims"),
        (dict(kv_lora_rank=8, qk_rope_head_dim=0), "at least 2"),
        (
            dict(kv_lora_rank=8, qk_rope_head_dim=6, rope_selection="uniform"),
            "divide the 16 rotary dims evenly",
        ),
        (dict(kv_lora_rank=8, qk_rope_head_dim=8, num_rope_key_heads=3), "must divide the 2 KV heads"),
        (dict(kv_lora_rank=8, qk_rope_head_dim=8, rope_selection="middle"), "unknown rope selection"),
        (dict(kv_lora_rank=8, qk_rope_head_dim=8, factorization="qr"), "unknown factorization"),
        (dict(kv_lora_rank=8, qk_rope_head_dim=8, factorization="pca"), "needs calibration"),
        (dict(kv_lora_rank=8, qk_rope_head_dim=8, rank_allocation="random"), "unknown rank allocation"),
        (dict(kv_lora_rank=8, qk_rope_head_dim=8, key_weight_power=-1), "key_weight_power must be a number"),
        (dict(kv_lora_rank=8, qk_rope_head_dim=8, latent_metric_power="x"), "latent_metric_power must be"),
    ],
)
def test_bad_options_raise_before_touching_the_model(kwargs, match):
    model = tiny_model("llama", num_attention_heads=4, num_key_value_heads=2)
    before = state(model)
    with pytest.raises(ValueError, match=match):
        convert_to_mla(model, **kwargs)
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.model_type == "llama"
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("family", ["qwen3", "gemma", "phi3"])
def test_unsupported_architectures_raise(family):
    model = tiny_model(family, num_attention_heads=4, num_key_value_heads=2)
    with pytest.raises(UnsupportedArchitectureError, match="llama, mistral, qwen2"):
        convert_to_mla(model, 8, 8)
    assert model.config.model_type == family


def test_sliding_window_sources_are_refused():
    model = tiny_model("mistral", sliding_window=8)
    with pytest.raises(ValueError, match="sliding-window"):
        convert_to_mla(model, 8, 8)


def test_in_place_conversion_returns_attentions_and_hidden_states_like_the_reloaded_model(tmp_path):
    """``output_attentions`` / ``output_hidden_states`` on a model converted in place equal those of the same model
    saved and reloaded (whose class transformers built); they returned None when the switched class was missing
    from transformers' output-capture registry (its key changed between 5.15 and 5.25)."""
    model = tiny_model("llama", num_attention_heads=4, num_key_value_heads=2, attn_implementation="eager")
    convert_to_mla(model, 24, 8)
    model.save_pretrained(tmp_path)
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    ids = torch.randint(3, 128, (1, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got = model(input_ids=ids, output_attentions=True, output_hidden_states=True)
        expected = loaded(input_ids=ids, output_attentions=True, output_hidden_states=True)
    assert got.attentions is not None and got.hidden_states is not None
    assert len(got.attentions) == model.config.num_hidden_layers == len(got.hidden_states) - 1
    pairs = zip(got.attentions + got.hidden_states, expected.attentions + expected.hidden_states, strict=True)
    for mine, theirs in pairs:
        assert torch.equal(mine, theirs)
