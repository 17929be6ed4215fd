"""Serving-engine conformance: the folders the project writes decode in vLLM (MLA disabled and CPU_MLA), llama.cpp
and mlx-lm exactly as in transformers; SGLang is checked from its sources (no CPU kernels on PyPI).

Run with ``python -m pytest -m runtimes`` after ``bash scripts/install_runtimes.sh`` (the venvs; a missing one
fails the tests that need it with the install command). Models: a tiny random Llama (GQA 4 -> 2) with SmolLM2's
tokenizer (llama.cpp needs a vocabulary it knows), its MQA and MLA conversions (plain, and padded to latent 512 +
rope 64 for vLLM's CPU_MLA kernel), two tiny stock DeepseekV3 built by transformers itself (random weights,
q_lora_rank null, dense, interleaved rope, no bias, untied), the packaged SmolLM2-135M: original, MQA,
MLA -68.75 % (default export) and MLA padded to 512 + 64, a tiny biased Qwen2 and a tiny Llama-3-scaled Llama with
their default MLA exports, and the first two layers of the packaged Qwen2.5-Coder-0.5B (real weights, biases,
tokenizer): the slice itself and its MLA exports at 128 and 64 values per token and layer and padded to 512 + 64. Every runtime decodes every model in one driver call per
backend (engine start-up is paid once); transformers' reference is computed once. The tables go to
``$HF_ATTN_SWAP_RUNTIMES_REPORT`` (default: pytest's base temp folder, runtimes_report.md).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch

from hf_attn_swap.io.examples import example_model_path
from hf_attn_swap.io.folders import add_legacy_rope_fields
from hf_attn_swap.pipeline.convert import convert_checkpoint
from hf_attn_swap.pipeline.verify import (
    DEFAULT_PROMPTS,
    reference,
    runtime_python,
    tokenize,
    verify_models,
    verify_table,
)
from hf_attn_swap.testing import tiny_model

pytestmark = pytest.mark.runtimes

TOKENS = 32
TOLERANCE = 1e-3  # nats; measured engines agree to ~1e-5 in float32
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
SMOLLM2_MLA = {"kv_lora_rank": 88, "qk_rope_head_dim": 32}  # -68.75 % KV, the split --kv-budget 0.3125 picks
PADDED = {"pad_kv_lora_rank": 512, "pad_rope_dim": 64}  # vLLM CPU_MLA / FlashMLA kernel size
RUNTIMES_DISK_BYTES = 10 * 2**30  # measured peak under the basetemp: 8.7 GiB (4 Qwen slices of 1.2 GiB, engine files)


def save_like_the_hub(model, folder: Path) -> Path:
    """``save_pretrained`` plus the pre-v5 ``rope_theta`` / ``rope_scaling`` that Hub checkpoints carry and the
    engines read (transformers v5 writes only ``rope_parameters``; mlx-lm then decodes with its defaults)."""
    model.save_pretrained(folder)
    add_legacy_rope_fields(folder)
    return folder


def with_smollm2_tokenizer(folder: Path, smollm2: Path) -> Path:
    for name in TOKENIZER_FILES:
        shutil.copy(smollm2 / name, folder / name)
    return folder


def tiny_deepseek(folder: Path, smollm2: Path, kv_lora_rank: int, rope_dim: int) -> Path:
    """A stock DeepseekV3ForCausalLM made by transformers (random weights): the engines' own reading of the
    architecture, independent of the export."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    torch.manual_seed(0)
    config = DeepseekV3Config(
        vocab_size=49152,
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        q_lora_rank=None,
        kv_lora_rank=kv_lora_rank,
        qk_nope_head_dim=16,
        qk_rope_head_dim=rope_dim,
        v_head_dim=16,
        first_k_dense_replace=2,
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_group=1,
        topk_group=1,
        max_position_embeddings=512,
        rope_interleave=True,
        attention_bias=False,
        tie_word_embeddings=False,
        initializer_range=0.2,
        rms_norm_eps=1e-6,
        routed_scaling_factor=1.0,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    save_like_the_hub(DeepseekV3ForCausalLM(config).eval(), folder)
    return with_smollm2_tokenizer(folder, smollm2)


def biased_tiny_qwen2(folder: Path) -> Path:
    """A tiny Qwen2 (q/k/v biases, random and non-zero) with Qwen2.5's own tokenizer and vocabulary: llama.cpp's
    converter only accepts the pre-tokenizers it knows for the architecture (SmolLM2's is refused for qwen2)."""
    from hf_attn_swap.io.checkpoints import copy_tokenizer_files

    model = tiny_model(
        "qwen2", num_attention_heads=4, num_key_value_heads=2, head_dim=64, hidden_size=256, vocab_size=151936,
        tie_word_embeddings=True,
    )  # fmt: skip
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.copy_(0.5 * torch.randn(param.shape, generator=generator))
    model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id = 151643, 151645, 151643
    save_like_the_hub(model, folder)
    copy_tokenizer_files(example_model_path("qwen2.5-coder"), folder)
    return folder


def llama3_tiny(folder: Path, smollm2: Path) -> Path:
    """A tiny Llama with Llama-3's ``llama3`` rope scaling (theta 5e5, original length 8192: the 15 fastest of its
    32 rotary pairs stay unscaled)."""
    scaling = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}  # fmt: skip
    model = tiny_model(
        "llama", num_attention_heads=4, num_key_value_heads=2, head_dim=64, hidden_size=256, vocab_size=49152,
        rope_parameters=scaling, max_position_embeddings=65536,
    )  # fmt: skip
    model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id = 1, 2, 2
    save_like_the_hub(model, folder)
    return with_smollm2_tokenizer(folder, smollm2)


def qwen_slice(folder: Path, layers: int = 2) -> Path:
    """The first ``layers`` decoder layers of the packaged Qwen2.5-Coder-0.5B-Instruct (real weights and biases,
    real tokenizer, untied head): its export is checked in the engines without a 24-layer conversion."""
    from hf_attn_swap.io.checkpoints import copy_tokenizer_files, load_causal_lm

    qwen = example_model_path("qwen2.5-coder")
    model = load_causal_lm(qwen, "float32")
    model.model.layers = model.model.layers[:layers]
    model.config.num_hidden_layers = layers
    model.config.layer_types = model.config.layer_types[:layers]
    save_like_the_hub(model, folder)
    copy_tokenizer_files(qwen, folder)
    return folder


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> dict[str, Path]:
    """name -> folder; vLLM's CPU attention takes head sizes 32, 64, 80, 96, 112, 128, ... so every tiny model's
    (q/k head) size is one of those."""
    root = tmp_path_factory.mktemp("runtimes_models")
    free = shutil.disk_usage(root).free
    if free < RUNTIMES_DISK_BYTES:
        pytest.fail(
            f"the runtimes suite writes ~{RUNTIMES_DISK_BYTES / 2**30:.0f} GiB of exports under {root}; "
            f"{free / 2**30:.1f} GiB free there: free disk space or pass --basetemp on a larger disk",
            pytrace=False,
        )
    smollm2 = example_model_path("smollm2")
    tiny = root / "tiny-llama-gqa2"
    model = tiny_model(
        "llama", num_attention_heads=4, num_key_value_heads=2, head_dim=64, hidden_size=256, vocab_size=49152
    )
    model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id = 1, 2, 2
    save_like_the_hub(model, tiny)
    with_smollm2_tokenizer(tiny, smollm2)
    folders = {
        "tiny-llama-gqa2": tiny,
        "tiny-deepseek-stock": tiny_deepseek(root / "tiny-deepseek-stock", smollm2, 32, 16),
        "tiny-deepseek-stock-512+64": tiny_deepseek(root / "tiny-deepseek-stock-512", smollm2, 512, 64),
        "smollm2": smollm2,
        "tiny-qwen2-biased": biased_tiny_qwen2(root / "tiny-qwen2-biased"),
        "tiny-llama3": llama3_tiny(root / "tiny-llama3", smollm2),
        "qwen-slice": qwen_slice(root / "qwen-slice"),
    }
    jobs = [
        ("tiny-mqa", tiny, "gqa", {"num_key_value_heads": 1}),
        ("tiny-mla", tiny, "mla", {"mla": {"kv_lora_rank": 32, "qk_rope_head_dim": 32}}),
        ("tiny-mla-512+64", tiny, "mla", {"mla": {"kv_lora_rank": 32, "qk_rope_head_dim": 32, **PADDED}}),
        ("smollm2-mqa", smollm2, "gqa", {"num_key_value_heads": 1}),
        (
            "smollm2-mla",
            smollm2,
            "mla",
            {"mla": SMOLLM2_MLA},
        ),  # the default export (freqfold + pca, sequential calibration)
        # padded: svd factorisation (data-free, 5x faster to convert than pca; the runtimes see the same shapes)
        ("smollm2-mla-512+64", smollm2, "mla", {"mla": {**SMOLLM2_MLA, **PADDED, "factorization": "svd"}}),
        # biases folded into the weights, llama3 scaling on its unscaled band: both with default flags
        ("tiny-qwen2-mla", folders["tiny-qwen2-biased"], "mla", {"mla": {"kv_budget": "0.25"}}),
        ("tiny-llama3-mla", folders["tiny-llama3"], "mla", {"mla": {"kv_budget": "0.25"}}),
        # Qwen2.5-Coder (real weights): -50 % and -75 % KV (128 / 64 values), and padded to 512 + 64
        ("qwen-mla-128", folders["qwen-slice"], "mla", {"mla": {"kv_budget": "128"}}),
        ("qwen-mla-64", folders["qwen-slice"], "mla", {"mla": {"kv_budget": "64"}}),
        ("qwen-mla-512+64", folders["qwen-slice"], "mla", {"mla": {"kv_budget": "128", **PADDED}}),
    ]
    for name, src, to, options in jobs:
        convert_checkpoint(src, root / name, to, **options)
        folders[name] = root / name
    return folders


@pytest.fixture(scope="session")
def expected(models) -> dict[str, list[dict]]:
    """transformers' greedy tokens and log-probs per model (once for every runtime)."""
    request = [
        {"name": n, "path": str(f), "prompts": tokenize(f, list(DEFAULT_PROMPTS))} for n, f in models.items()
    ]
    return reference(request, TOKENS)


@pytest.fixture(scope="session")
def report_path(tmp_path_factory) -> Path:
    path = os.environ.get("HF_ATTN_SWAP_RUNTIMES_REPORT")
    return Path(path) if path else tmp_path_factory.getbasetemp() / "runtimes_report.md"


RESULTS: dict[str, dict] = {}


def run_runtime(runtime: str, models, expected, report_path) -> dict:
    """verify every model in ``runtime`` (once per session); the table is appended to the report."""
    if runtime not in RESULTS:
        runtime_python(runtime)  # FileNotFoundError naming the install command
        start = time.perf_counter()
        result = verify_models(
            models, runtime, max_new_tokens=TOKENS, logprob_tolerance=TOLERANCE, expected=expected
        )
        result["wall_seconds"] = round(time.perf_counter() - start, 1)
        RESULTS[runtime] = result
        with open(report_path, "a") as f:
            f.write(f"## {runtime} ({result['wall_seconds']} s)\n\n{verify_table(result)}\n\n")
            f.writelines(f"- {note}\n" for note in result["notes"])
            f.write("\n")
        print(verify_table(result))
    return RESULTS[runtime]


MLA_MODELS = [
    "tiny-mla",
    "tiny-mla-512+64",
    "tiny-deepseek-stock",
    "tiny-deepseek-stock-512+64",
    "smollm2-mla",
    "smollm2-mla-512+64",
    "tiny-qwen2-mla",
    "tiny-llama3-mla",
    "qwen-mla-128",
    "qwen-mla-64",
    "qwen-mla-512+64",
]
KERNEL_SIZED = ["tiny-mla-512+64", "tiny-deepseek-stock-512+64", "smollm2-mla-512+64", "qwen-mla-512+64"]


@pytest.mark.parametrize("runtime", ["vllm", "llama.cpp", "mlx"])
def test_runtime_decodes_every_model_as_transformers(runtime, models, expected, report_path):
    result = run_runtime(runtime, models, expected, report_path)
    rows = [r for r in result["rows"] if r["counts"]]
    wrong = [r for r in rows if not r["passed"]]
    assert not wrong, verify_table({**result, "rows": wrong})
    covered = {(r["model"], r["backend"]) for r in rows}
    if runtime == "vllm":  # MLA through both backends, the padded folders through the real CPU_MLA kernel
        wanted = {(m, "mla-disabled") for m in MLA_MODELS} | {(m, "cpu-mla") for m in KERNEL_SIZED}
        wanted |= {(m, "default") for m in models if m not in MLA_MODELS}
    else:
        wanted = {(m, "default") for m in models}
    assert covered == wanted
    assert all(r["prompts"] >= 3 and r["tokens_equal"] == r["prompts"] for r in rows)
    assert all(r["max_dlogprob"] <= TOLERANCE for r in rows)


def test_vllm_stock_rotary_kernel_breaks_deepseek(models, expected, report_path):
    """The same vLLM without the workaround: every MLA model decodes differently (the kernel bug, end to end).
    When this fails, upstream fixed the kernel: drop the workaround from the vLLM driver."""
    result = run_runtime("vllm", models, expected, report_path)
    stock = [r for r in result["rows"] if not r["counts"]]
    assert {r["model"] for r in stock} == set(MLA_MODELS)
    assert all(r["error"] is None and r["tokens_equal"] < r["prompts"] for r in stock), verify_table(
        {**result, "rows": stock}
    )
    assert result["rotary_bug"]["present"]


REPRO = r"""
import json, torch
from vllm.config import VllmConfig, set_current_vllm_config
from vllm.model_executor.layers.rotary_embedding import RotaryEmbedding

torch.manual_seed(0)
T, H, d = 5, 4, 16
with set_current_vllm_config(VllmConfig()):
    rope = RotaryEmbedding(d, d, 64, 10000.0, is_neox_style=False, dtype=torch.float32)
pos, q, k = torch.arange(T), torch.randn(T, H, d), torch.randn(T, 1, d)

# independent reference: interleaved (GPT-J) rotation of each pair (2i, 2i+1) by pos * theta^(-2i/d)
inv = 10000.0 ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
ang = pos[:, None].double() * inv  # [T, d/2]
cos, sin = ang.cos()[:, None], ang.sin()[:, None]
x1, x2 = q.double()[..., 0::2], q.double()[..., 1::2]
ref = torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).flatten(-2)

stock_3d = rope.forward_cpu(pos, q.clone(), k.clone())[0]
stock_2d = rope.forward_cpu(pos, q.clone().view(T, H * d), k.clone().view(T, d))[0].view(T, H, d)
native = rope.forward_native(pos, q.clone(), k.clone())[0]
# what the stock kernel computes: the first T rows of q seen as [T*H, d] rotated at positions 0..T-1, rest untouched
walk = q.clone().view(T * H, 1, d)
walk[:T] = rope.forward_native(pos, walk[:T].clone(), None)[0]
print(json.dumps({
    "stock_3d_vs_ref": (stock_3d.double() - ref).abs().max().item(),
    "stock_2d_vs_ref": (stock_2d.double() - ref).abs().max().item(),
    "native_vs_ref": (native.double() - ref).abs().max().item(),
    "stock_3d_vs_head_stride_walk": (stock_3d - walk.view(T, H, d)).abs().max().item(),
}))
"""


def test_vllm_cpu_rotary_kernel_bug_minimal_reproduction():
    """vLLM's CPU ``ops.rotary_embedding`` on a 3-D ``[T, H, d]`` non-neox query (how its DeepSeek model passes
    ``q_pe``) is wrong; the 2-D ``[T, H*d]`` call and ``forward_native`` (the workaround) are exact. The bug's
    presence is asserted so the suite notices an upstream fix."""
    out = subprocess.run(
        [str(runtime_python("vllm")), "-c", REPRO],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    diffs = json.loads(out.stdout.strip().splitlines()[-1])
    assert diffs["native_vs_ref"] <= 1e-5  # the workaround is exact
    assert diffs["stock_2d_vs_ref"] <= 1e-5  # the kernel is right on a flat query (Llama's call)
    assert diffs["stock_3d_vs_ref"] > 0.1  # the bug: 3-D query mis-rotated
    assert diffs["stock_3d_vs_head_stride_walk"] == 0.0  # ... exactly by walking tokens with the head stride


def test_sglang_source_check_passes_on_exports_and_catches_a_broken_folder(models, tmp_path):
    runtime_python("sglang")
    mla = {name: models[name] for name in MLA_MODELS}
    result = verify_models(mla, "sglang", max_new_tokens=TOKENS)
    assert result["passed"], verify_table(result)
    assert {r["model"] for r in result["rows"]} == set(mla)
    broken = tmp_path / "broken"
    shutil.copytree(models["tiny-mla"], broken)
    config = json.loads((broken / "config.json").read_text())
    config.update(rope_interleave=False, rms_norm_eps=1e-5)
    (broken / "config.json").write_text(json.dumps(config))
    failed = verify_models({"broken": broken}, "sglang", max_new_tokens=TOKENS)
    assert not failed["passed"]
    names = {c["name"] for c in failed["rows"][0]["checks"] if not c["ok"]}
    assert names == {"rope layout", "kv_a_layernorm eps"}
