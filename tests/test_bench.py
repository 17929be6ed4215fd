"""``hf-attn-swap bench``: the roofline formulas against hand-computed values, the rows / table / JSON it writes,
one-line errors, and (``pytest -m runtimes``) a tiny model and its MLA export in llama.cpp whose KV bytes per token
are llama.cpp's own and equal the formula."""

from __future__ import annotations

import json

import pytest

from hf_attn_swap.cli import main
from hf_attn_swap.evaluate.roofline import AttentionShape, DecodeStep, Roofline
from hf_attn_swap.pipeline import bench
from hf_attn_swap.pipeline.bench import BenchArguments, add_ratios, bench_table, make_row

GQA = {"model_type": "llama", "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
       "head_dim": 16, "hidden_size": 64}  # fmt: skip
MLA = {"model_type": "deepseek_v3", "num_hidden_layers": 2, "num_attention_heads": 4, "kv_lora_rank": 32,
       "qk_rope_head_dim": 8, "qk_nope_head_dim": 16, "v_head_dim": 16, "hidden_size": 64}  # fmt: skip


def test_kv_and_attention_formulas_by_hand():
    gqa, mla = AttentionShape.from_config(GQA), AttentionShape.from_config(MLA)
    assert gqa.kv_values("heads") == 2 * 2 * 16 == 64
    assert gqa.kv_bytes_per_token("heads", 2) == 64 * 2 * 2 == 256
    assert gqa.attention_flops("heads") == 4 * 4 * 16 == 256  # scores 2 H d + sum 2 H d
    assert mla.kv_values("absorbed") == 32 + 8
    assert mla.kv_values("expanded") == 4 * (16 + 8) + 4 * 16 == 160
    assert mla.kv_values("expanded_padded") == 2 * 4 * (16 + 8) == 192  # vLLM pads V to the q/k head size
    assert mla.kv_bytes_per_token("absorbed", 4) == 40 * 2 * 4 == 320
    assert mla.attention_flops("absorbed") == 2 * 4 * (32 + 8) + 2 * 4 * 32 == 576
    assert mla.attention_flops("expanded") == 2 * 4 * 24 + 2 * 4 * 16 == 320
    assert mla.attention_flops("expanded_padded") == 4 * 4 * 24 == 384
    assert mla.attention_flops("reexpand") == 320 + 2 * 32 * 4 * (16 + 16) == 8512
    with pytest.raises(ValueError, match="does not apply"):
        gqa.kv_values("absorbed")
    # DeepSeek's decode shape against Llama-2's MHA: the absorbed form does ~4x the FLOPs per cached token
    deepseek = AttentionShape(1, 32, 32, 0, 512, 64, 128, 128)
    assert (
        deepseek.attention_flops("absorbed") == 69632
        and AttentionShape(1, 32, 32, 128).attention_flops("heads") == 16384
    )


def test_decode_step_and_roofline_by_hand():
    shape = AttentionShape.from_config(GQA)
    step = DecodeStep(shape, "heads", cached=100, batch=2, weight_bytes=1000, weight_values=400,
                      kv_bytes_per_token=256, kv_dtype_bytes=2)  # fmt: skip
    assert step.bytes == 1000 + 2 * 100 * 256 == 52200
    assert step.flops == 2 * (2 * 400 + 2 * 100 * 256) == 104000
    row = Roofline(bandwidth=1e4, flops=1e5).row(step, tokens_per_second=0.2)
    assert row["roofline_bound"] == "memory"
    assert row["roofline_tokens_per_second"] == pytest.approx(2 / 5.22)
    assert row["roofline_fraction"] == pytest.approx(0.2 / (2 / 5.22))
    compute = Roofline(bandwidth=1e9, flops=1e4).row(step)
    assert compute["roofline_bound"] == "compute" and compute["roofline_tokens_per_second"] == pytest.approx(
        2 / 10.4
    )
    latent = DecodeStep(AttentionShape.from_config(MLA), "reexpand", 10, 1, 0, 0, 320, 4)
    assert latent.bytes == 10 * (320 + 2 * 160 * 2 * 4)  # the rebuilt K/V written and read once per step


def _run(model, context, per_token, attention=None, decode=(0.5, 0.7), kv_type="f16"):
    return {"model": model, "context": context, "batch": 1, "error": None, "version": "x", "prefill_seconds": 2.0,
            "decode_seconds": list(decode), "attention": attention,
            "kv": {"bytes_per_token": per_token, "source": "test", "k_type": kv_type},
            "weights": {"bytes": 10_000, "values": 4_000, "dtype": "Q8_0"}}  # fmt: skip


def test_rows_table_ratios_and_budget():
    args = BenchArguments(
        models=["a"], runtime="llama.cpp", context=["100,200"], new_tokens=4, kv_budget_mib=1
    )
    roofline = Roofline(1e10, 1e11)
    rows = [
        make_row(_run("gqa", 100, 256), GQA, args, roofline),
        make_row(_run("mla", 100, 160, "absorbed"), MLA, args, roofline),  # (32 + 8) x 2 layers x 2 bytes
        make_row(_run("wrong", 100, 999, "absorbed"), MLA, args, roofline),
    ]
    add_ratios(rows)
    gqa, mla, wrong = rows
    assert gqa["decode_tokens_per_second"] == pytest.approx(4 / 0.6) and gqa["x_decode"] == 1
    assert gqa["prefill_tokens_per_second"] == 50 and gqa["kv_mib"] == pytest.approx(256 * 100 / 2**20)
    assert gqa["kv_layout"] == "heads" and gqa["kv_matches_formula"]
    assert (
        mla["kv_layout"] == "latent" and mla["kv_matches_formula"] and mla["kv_formulas"]["expanded"] == 640
    )
    assert mla["x_kv"] == pytest.approx(160 / 256) and mla["attention"] == "absorbed"
    assert wrong["kv_layout"] == "no formula" and not wrong["kv_matches_formula"]
    # 1 MiB holds 1 MiB / (256 B x 256 tokens: 104 rounded up to llama.cpp's 256-token steps) = 16 sequences
    assert (
        gqa["max_batch_at_budget"] == 16
        and mla["max_batch_at_budget"] == 25
        and mla["x_max_batch"] == 25 / 16
    )
    assert gqa["max_context_at_budget"] == 4096
    for key in (
        "roofline_tokens_per_second",
        "roofline_bound",
        "roofline_fraction",
        "step_bytes",
        "step_flops",
    ):
        assert key in gqa
    table = bench_table(rows)
    assert table.count("\n") == 4 and "latent 160 B/tok (= formula)" in table and "(≠ formula)" in table


def test_batched_decode_counts_every_sequence():
    """``measure_decode_speed(batch=B)``: tokens/s counts B tokens a step, and the cache bytes per token are per
    sequence: 2 H_kv d x layers x 4 bytes (float32), as at batch 1."""
    from hf_attn_swap.evaluate.speed import measure_decode_speed
    from hf_attn_swap.testing import tiny_model

    model = tiny_model("llama", num_attention_heads=4, num_key_value_heads=2, head_dim=16).eval()
    formula = 2 * 2 * 16 * model.config.num_hidden_layers * 4
    one = measure_decode_speed(model, 12, 3, min_run_time=0.01, check_positions=False)
    three = measure_decode_speed(model, 12, 3, min_run_time=0.01, check_positions=False, batch=3)
    assert one["cache_bytes_per_token"] == three["cache_bytes_per_token"] == formula
    assert three["batch"] == 3
    step_seconds = three["median_step_ms"] / 1000  # rounded to the microsecond
    assert three["decode_tokens_per_second"] == pytest.approx(3 / step_seconds, rel=1e-2)
    with pytest.raises(ValueError, match="--batch must be at least 1"):
        measure_decode_speed(model, 12, 3, batch=0)


def test_random_weight_exports_have_the_asked_shapes(saved_tiny):
    """``--mla`` / ``--kv-budget`` / ``--pad`` exports: each folder's latent + rope is the one asked for (a budget:
    its fraction of the source's 2 H_kv d values), a split already at the pad size is not exported twice, and a
    rerun reuses the folders."""
    from hf_attn_swap.pipeline.bench_models import MLAShape, mla_exports

    src = saved_tiny("llama", num_attention_heads=4, num_key_value_heads=2, head_dim=32, hidden_size=128)
    exports = mla_exports(src, [MLAShape.parse("40+8:48+16")], ["0.5"], MLAShape.parse("64+32"))
    shapes = {label: json.loads((f / "config.json").read_text()) for label, f in exports}
    sizes = {label: (c["kv_lora_rank"], c["qk_rope_head_dim"]) for label, c in shapes.items()}
    rank, rope = sizes["MLA budget 0.5"]
    assert rank + rope == 2 * 2 * 32 // 2  # half the GQA cache's values per token and layer
    assert sizes == {
        "MLA 40+8 padded to 48+16": (48, 16),
        "MLA budget 0.5": (rank, rope),
        f"MLA budget 0.5 ({rank}+{rope}) padded to 64+32": (64, 32),
    }
    stamps = {f: (f / "config.json").stat().st_mtime_ns for _, f in exports}
    again = mla_exports(src, [], ["0.5"], MLAShape(rank, rope))  # the pad is the split's own size: no copy
    assert [label for label, _ in again] == ["MLA budget 0.5"]
    assert (again[0][1] / "config.json").stat().st_mtime_ns == stamps[again[0][1]]


def test_bench_json_and_plot_schema(tmp_path, monkeypatch, saved_tiny):
    """run_bench end to end with the engine and the machine measurement stubbed: the JSON's fields and a plot."""
    folder = saved_tiny("llama", num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    config = json.loads((folder / "config.json").read_text())
    per_token = 2 * 2 * 16 * config["num_hidden_layers"] * 4
    monkeypatch.setattr(bench, "measure_machine", lambda threads: {"bandwidth": 1e10, "flops": 1e11, "threads": 1,
                        "gemm_flops_per_second": {"float32": 1e11}, "stream_bytes_per_second": {"read": 1e10}})  # fmt: skip
    monkeypatch.setattr(bench, "run_engine", lambda args, name, folder, python: [
        {**_run(name, c, per_token, kv_type=None), "weights": {"bytes": 1, "values": 1, "dtype": "float32"}}
        for c in args.context])  # fmt: skip
    out, plot = tmp_path / "bench.json", tmp_path / "bench.png"
    argv = [
        "bench",
        str(folder),
        str(folder),
        "--context",
        "32",
        "64",
        "--json",
        str(out),
        "--plot",
        str(plot),
    ]
    assert main(argv) == 0
    payload = json.loads(out.read_text())
    assert set(payload) >= {"runtime", "rows", "table", "roofline", "command", "machine"}
    assert payload["machine"]["cpu_count"] and isinstance(payload["command"], list)
    assert [(r["model"], r["context"]) for r in payload["rows"]] == [
        (f"{folder.name} #0", 32),
        (f"{folder.name} #0", 64),
        (f"{folder.name} #1", 32),
        (f"{folder.name} #1", 64),
    ]
    row = payload["rows"][0]
    for key in ("prefill_tokens_per_second", "decode_tokens_per_second", "kv_bytes_per_token", "kv_mib",
                "kv_layout", "kv_matches_formula", "max_batch_at_budget", "max_context_at_budget", "x_decode",
                "roofline_tokens_per_second", "roofline_fraction", "roofline_bound"):  # fmt: skip
        assert row[key] is not None, key
    assert row["kv_matches_formula"] and plot.stat().st_size > 0


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--runtime", "tgi"], "--runtime must be one of transformers, llama.cpp, vllm, mlx, got 'tgi'"),
        (["--context", "0"], "--context must be whole numbers of tokens >= 1, got '0'"),
        (["--runtime", "vllm"], "run `bash scripts/install_runtimes.sh vllm` or pass --python"),
        (["--random-weights", "gpt5"], "--random-weights must be one of llama2-7b, llama3-8b, qwen2.5-7b"),
        (["--random-weights", "llama2-7b", "--pad", "512"], "--pad '512': write RANK+ROPE"),
        (
            ["--random-weights", "llama2-7b", "--mla", "448+64:256+64"],
            "the padded size must hold the unpadded",
        ),
        (["--mla", "256+64"], "--mla and --kv-budget choose the exports of --random-weights: give it too"),
    ],
)
def test_bad_input_is_one_line(argv, message, saved_tiny, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_ATTN_SWAP_RUNTIMES", str(tmp_path / "no-venvs"))
    folder = saved_tiny()
    capsys.readouterr()
    assert main(["bench", str(folder), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


@pytest.mark.runtimes
def test_llama_cpp_reports_the_formula_bytes(tmp_path, saved_tiny):
    """A tiny Llama (GQA) and its MLA export (stock deepseek_v3) in llama.cpp, one repeat: llama.cpp's own bytes
    per token (its serialised sequence state) equal 2 H_kv d and r + d_rope values x layers x 2 bytes (f16)."""
    from hf_attn_swap.pipeline.convert import convert_checkpoint

    src = saved_tiny("llama", num_attention_heads=4, num_key_value_heads=2, head_dim=32, hidden_size=128,
                     intermediate_size=256, vocab_size=512, max_position_embeddings=1024)  # fmt: skip
    (src / "tokenizer.json").unlink()  # the synthetic vocabulary path, as --random-weights models have
    mla = tmp_path / "mla"
    convert_checkpoint(
        src, mla, to="mla", mla={"kv_lora_rank": 48, "qk_rope_head_dim": 16, "factorization": "svd"}
    )
    out = tmp_path / "bench.json"
    argv = ["bench", str(src), str(mla), "--runtime", "llama.cpp", "--context", "300", "--new-tokens", "4",
            "--repeats", "1", "--workdir", str(tmp_path / "work"), "--json", str(out)]  # fmt: skip
    assert main(argv) == 0
    gqa, latent = json.loads(out.read_text())["rows"]
    assert gqa["kv_bytes_per_token"] == 2 * 2 * 32 * 2 * 2 and gqa["kv_layout"] == "heads"
    assert latent["kv_bytes_per_token"] == (48 + 16) * 2 * 2 and latent["kv_layout"] == "latent"
    assert gqa["kv_matches_formula"] and latent["kv_matches_formula"] and latent["attention"] == "absorbed"
    assert latent["kv_engine"]["v_buffer_mib"] == 0  # no V buffer: V is a view of the latent K rows
    assert gqa["decode_tokens_per_second"] > 0 and 0 < latent["roofline_fraction"] < 1
