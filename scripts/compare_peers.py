"""Training-free MHA -> MLA on a packaged real model (``--model``: SmolLM2-135M, or Qwen2.5-Coder-0.5B with its q/k/v
biases): this project's default conversion beside the peers' published training-free pipelines, reimplemented here
from their papers, at -50 / -68.75 / -87.5 % KV (``--budgets``).

Peers (reimplementations, no code of theirs):
    MHA2MLA (Ji et al. 2025): partial RoPE keeping the pairs with the largest 2-norm contribution to q.k per layer
        (our ``norm`` selection), joint SVD of [W_K,nope ; W_V] (``svd``, weights only, no K/V balancing).
    TransMLA (Meng et al. 2025): RoRoPE (PCA across KV heads per frequency into one rope key) with FreqFold (the
        principal components of F neighbouring frequencies turn at the window's first frequency; ``freqfold`` with
        ``rope_fold_ladder=False``, F = twice the ladder step: 4 at d_rope 32 as published), K/V norm balancing, and
        the latent PCA fitted on the activations of the model whose RoPE was already reduced (a full-rank copy).
Every method gets the same split of each budget (``--kv-budget``: r + d_rope = 128 + 64, 88 + 32, 32 + 16, which are
TransMLA's published splits) and the same calibration text (the first 8192 tokens of the Python library reference).
Ours is ``MLAConversionConfig(kv_budget=...)`` with every default, in its default ``deepseek_v3`` format (bias-free:
all r cached latent values are learned, a biased source's biases folded into the weights, and the export equals this
in-memory model to fp32 rounding); "plugin format" is the same conversion keeping the source's biases exactly.
Models are held one budget at a time (the original is the KL reference, run once per window and budget).

Held-out texts: the first 4096 tokens of the Python tutorial (4 windows of 1024) and of a text unlike the
calibration text (default: the GNU GPL v3, /usr/share/common-licenses/GPL-3). Perplexity and KL(original ||
converted) per token, from ``hf_attn_swap.evaluate.metrics.evaluate_models`` (the machinery of ``hf-attn-swap eval``).

    OMP_NUM_THREADS=2 python scripts/compare_peers.py --json runs/mla/peers.json
    python scripts/compare_peers.py --model qwen2.5-coder --budgets 0.5 0.25 \
        --methods "TransMLA (reimpl.)" "this project (default)" "this project (plugin format)" --json runs/mla/qwen.json
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's hf_attn_swap

from hf_attn_swap import convert_to_mla  # noqa: E402
from hf_attn_swap.adapters import get_adapter  # noqa: E402
from hf_attn_swap.evaluate.metrics import evaluate_models, measure_kv_cache_bytes_per_token  # noqa: E402
from hf_attn_swap.evaluate.suite import markdown_table  # noqa: E402
from hf_attn_swap.io.checkpoints import load_causal_lm, load_tokenizer  # noqa: E402
from hf_attn_swap.io.examples import example_model_path  # noqa: E402
from hf_attn_swap.io.folders import machine_info, write_json  # noqa: E402
from hf_attn_swap.io.text import default_eval_files, default_train_files, load_token_ids, windows  # noqa: E402
from hf_attn_swap.methods.calibration import CalibrationText, collect_attention_inputs  # noqa: E402
from hf_attn_swap.methods.mla import MLAConversionConfig  # noqa: E402
from hf_attn_swap.methods.mla.convert import max_kv_lora_rank, resolve_kv_budget  # noqa: E402

BUDGETS = ("0.5", "0.3125", "0.125")
METHODS = (
    "MHA2MLA (reimpl.)",
    "TransMLA (reimpl.)",
    "this project (default)",
    "this project (plugin format)",
)


@torch.no_grad()
def attention_inputs(model, token_ids, window):
    """Per layer, the inputs [N, hidden] of the self-attention modules of a (converted) model."""
    captured = [[] for _ in model.model.layers]
    hooks = [
        layer.self_attn.register_forward_pre_hook(
            lambda module, args, kwargs, idx=idx: captured[idx].append(
                kwargs.get("hidden_states", args[0] if args else None)
                .reshape(-1, model.config.hidden_size)
                .float()
            ),
            with_kwargs=True,
        )
        for idx, layer in enumerate(model.model.layers)
    ]
    try:
        for chunk in windows(token_ids, window):
            model(input_ids=chunk[None], use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    return [torch.cat(rows) for rows in captured]


def mha2mla(original, split, calibration, calib_ids, window):
    model = copy.deepcopy(original)
    options = replace(split, rope_selection="norm", factorization="svd", balance_kv=False, format="plugin")
    convert_to_mla(model, options, calibration=calibration)
    return model


def head_dim(model) -> int:
    return get_adapter(model).layout(model.config).head_dim


def transmla(original, split, calibration, calib_ids, window):
    step = head_dim(original) // split.qk_rope_head_dim
    options = replace(
        split, rope_selection="freqfold", rope_fold=min(2 * step, head_dim(original) // 2),
        rope_fold_ladder=False, factorization="pca", balance_kv=True, format="plugin",
    )  # fmt: skip
    # RoPE reduced, full rank: the model whose activations the PCA is fitted on
    full = copy.deepcopy(original)
    convert_to_mla(full, replace(options, kv_lora_rank=max_kv_lora_rank(get_adapter(original).layout(original.config))),
                   calibration=calibration)  # fmt: skip
    reduced = attention_inputs(full, calib_ids, window)
    del full
    model = copy.deepcopy(original)
    convert_to_mla(model, options, calibration=reduced)
    return model


def ours(original, split, calibration, calib_ids, window):
    model = copy.deepcopy(original)
    convert_to_mla(model, split, calibration=CalibrationText(calib_ids, window, "sequential"))
    return model


def ours_plugin(original, split, calibration, calib_ids, window):
    return ours(original, replace(split, format="plugin"), calibration, calib_ids, window)


BUILDERS = dict(zip(METHODS, (mha2mla, transmla, ours, ours_plugin), strict=True))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", choices=("smollm2", "qwen2.5-coder"), help="packaged model")
    p.add_argument("--budgets", nargs="+", default=list(BUDGETS), help="--kv-budget fractions")
    p.add_argument("--methods", nargs="+", default=list(METHODS[:3]), choices=METHODS)
    p.add_argument("--eval-tokens", type=int, default=4096)
    p.add_argument("--window", type=int, default=1024)
    p.add_argument("--other-text", default="/usr/share/common-licenses/GPL-3")
    p.add_argument("--calibration-tokens", type=int, default=8192)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default="runs/mla/peers.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    src = example_model_path(args.model)
    tokenizer = load_tokenizer(src)
    original = load_causal_lm(src, "float32")
    texts = {
        "tutorial": (
            str(default_eval_files()[0]),
            load_token_ids(tokenizer, default_eval_files(), args.eval_tokens),
        ),
        "other": (args.other_text, load_token_ids(tokenizer, [args.other_text], args.eval_tokens)),
    }
    calib_ids = load_token_ids(tokenizer, default_train_files(), args.calibration_tokens)
    window = 512
    calibration = None
    if any(m != "this project (default)" and m != "this project (plugin format)" for m in args.methods):
        calibration = collect_attention_inputs(original, calib_ids, window=window)
    base = {"key": "original", "method": f"original ({original.config.num_key_value_heads} KV heads)",
            "kv_budget": "1", "split": "—",
            "kv_values": 2 * original.config.num_key_value_heads * head_dim(original),
            "kv_cache_bytes_per_token": measure_kv_cache_bytes_per_token(original, texts["tutorial"][1][:16])}  # fmt: skip
    rows = [base]
    for index, budget in enumerate(args.budgets):  # one budget's models in memory at a time
        split = resolve_kv_budget(original.config, MLAConversionConfig(kv_budget=budget))
        models, budget_rows = {"original": original} if index == 0 else {}, [base] if index == 0 else []
        for method in args.methods:
            started = time.time()
            model = BUILDERS[method](original, split, calibration, calib_ids, window)
            key = f"{method} @ {budget}"
            models[key] = model
            budget_rows.append({
                "key": key, "method": method, "kv_budget": budget,
                "split": f"r {split.kv_lora_rank} + d_rope {split.qk_rope_head_dim}",
                "kv_values": split.kv_lora_rank + split.qk_rope_head_dim,
                "kv_cache_bytes_per_token": measure_kv_cache_bytes_per_token(model, texts["tutorial"][1][:16]),
                "convert_seconds": round(time.time() - started, 1),
            })  # fmt: skip
            print(
                f"converted {key} ({budget_rows[-1]['split']}) in {budget_rows[-1]['convert_seconds']} s",
                flush=True,
            )
        for text, (path, ids) in texts.items():
            started = time.time()
            results = evaluate_models(models, ids, window=args.window, reference=original, progress=False)
            print(f"evaluated {len(models)} models on {path} in {time.time() - started:.0f} s", flush=True)
            for row in budget_rows:
                r = results[row["key"]]
                row[f"{text}_perplexity"] = r["perplexity"]
                row[f"{text}_kl"] = r["kl_to_reference"]
                row[f"{text}_top1"] = r["top1_agreement"]
        rows += [row for row in budget_rows if row is not base]
        del models
    columns = [
        ("kv_values", "KV values / layer / token"), ("method", "method"), ("split", "split"),
        ("kv_cache_bytes_per_token", "KV bytes/token (measured, fp32)"),
        ("tutorial_perplexity", "perplexity, tutorial"), ("tutorial_kl", "KL, tutorial"),
        ("other_perplexity", "perplexity, GPL-3"), ("other_kl", "KL, GPL-3"),
    ]  # fmt: skip
    table = markdown_table(rows, columns)
    print()
    print(table)
    payload = {
        "rows": rows,
        "texts": {
            name: {"file": path, "tokens": len(ids), "window": args.window}
            for name, (path, ids) in texts.items()
        },
        "model": args.model,
        "calibration": {"file": str(default_train_files()[0]), "tokens": len(calib_ids), "window": window},
        "command": [sys.executable, *sys.argv],
        "machine": machine_info(),
        "table": table,
    }
    print(f"\nwrote {write_json(Path(args.json), payload)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
