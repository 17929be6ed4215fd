"""The deepseek_v3 export of SmolLM2-135M (-68.75 % KV: r 72, d_rope 48, high, data-free svd) against the plugin
model it comes from, plain and padded: max relative logits error on 256 tutorial tokens (float32; bfloat16 against the
float32 plugin, next to the bfloat16 plugin's own error; mean over positions of the max |delta log-prob|), greedy
tokens of 3 prompts x 32 (tokens before the first difference: bfloat16 plugin vs float32 plugin, bfloat16 export
vs bfloat16 plugin), the proven latent-norm bound and the KV cache measured in transformers.

    python scripts/export_fidelity.py --json runs/mla/export_fidelity.json
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hf_attn_swap import convert_to_mla  # noqa: E402
from hf_attn_swap.evaluate.metrics import measure_kv_cache_bytes_per_token  # noqa: E402
from hf_attn_swap.export.deepseek_v3 import to_deepseek_v3  # noqa: E402
from hf_attn_swap.io.checkpoints import load_causal_lm, load_tokenizer  # noqa: E402
from hf_attn_swap.io.examples import example_model_path  # noqa: E402
from hf_attn_swap.io.folders import machine_info, write_json  # noqa: E402
from hf_attn_swap.io.text import default_eval_files, load_token_ids  # noqa: E402

PROMPTS = (
    "The Python tutorial explains how to",
    "def fibonacci(n):\n    ",
    "Lists, tuples and dictionaries are",
)


def relative(a, b):
    return ((a.float() - b).abs().max() / b.abs().max()).item()


def greedy(model, ids):
    return model.generate(ids, max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=0)[
        0, ids.shape[1] :
    ]


def common_prefix(a, b):
    """Greedy tokens generated before the first difference (32 = all equal)."""
    diff = (a != b).nonzero()
    return int(diff[0, 0]) if len(diff) else len(a)


def logprob_gap(a, b):
    """Mean over positions of max |log p_a - log p_b| over the vocabulary (nats)."""
    return (a.float().log_softmax(-1) - b.float().log_softmax(-1)).abs().amax(-1).mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", required=True)
    args = parser.parse_args()
    src = example_model_path("smollm2")
    tokenizer = load_tokenizer(src)
    ids = load_token_ids(tokenizer, default_eval_files(), 256)[None]
    prompts = [tokenizer(p, return_tensors="pt").input_ids for p in PROMPTS]
    model = load_causal_lm(src, "float32", "eager")
    convert_to_mla(model, 72, 48, factorization="svd")
    low = copy.deepcopy(model).to(torch.bfloat16)
    rows = []
    with torch.no_grad():
        reference = model(input_ids=ids).logits
        plugin_bf16 = relative(low(input_ids=ids).logits, reference)
        fp32_tokens = [greedy(model, p) for p in prompts]
        bf16_tokens = [greedy(low, p) for p in prompts]
        plugin_bf16_logits = low(input_ids=ids).logits
        print(
            json.dumps(
                {
                    "bf16_plugin_vs_fp32_plugin_greedy_prefix": list(
                        map(common_prefix, bf16_tokens, fp32_tokens)
                    ),
                    "bf16_plugin_vs_fp32_plugin_logprob_gap": logprob_gap(plugin_bf16_logits, reference),
                }
            ),
            flush=True,
        )
        for pads in [(None, None), (256, 64), (512, 64)]:
            fp32, details = to_deepseek_v3(model, *pads)
            bf16, details_bf16 = to_deepseek_v3(low, *pads)
            row = {
                "pads": pads,
                "fp32_relative_logits_error": relative(fp32(input_ids=ids).logits, reference),
                "fp32_bound": details["norm_relative_error_bound"],
                "bf16_relative_logits_error": relative(bf16(input_ids=ids).logits, reference),
                "bf16_plugin_relative_logits_error": plugin_bf16,
                "bf16_bound": details_bf16["norm_relative_error_bound"],
                "bf16_export_vs_bf16_plugin_greedy_prefix": [
                    common_prefix(greedy(bf16, p), t) for p, t in zip(prompts, bf16_tokens, strict=True)
                ],
                "bf16_export_vs_fp32_plugin_logprob_gap": logprob_gap(bf16(input_ids=ids).logits, reference),
                "bf16_export_vs_bf16_plugin_logprob_gap": logprob_gap(
                    bf16(input_ids=ids).logits, plugin_bf16_logits
                ),
                "kv_bytes_per_token_fp32": measure_kv_cache_bytes_per_token(fp32, ids[:, :16]),
                "kv_bytes_per_token_bf16": measure_kv_cache_bytes_per_token(bf16, ids[:, :16]),
                "rope_theta": details["rope_theta"],
                "residual_scale": details["residual_scale"],
                "kappa_range": details["kappa_range"],
                "kv_a_latent_rows_rms_range": [
                    f(
                        layer.self_attn.kv_a_proj_with_mqa.weight[:72].pow(2).mean().sqrt().item()
                        for layer in fp32.model.layers
                    )
                    for f in (min, max)
                ],
                "kv_a_layernorm_weight_range": [
                    f(layer.self_attn.kv_a_layernorm.weight[0].item() for layer in fp32.model.layers)
                    for f in (min, max)
                ],
            }
            print(json.dumps(row), flush=True)
            rows.append(row)
    write_json(args.json, {"machine": machine_info(), "rows": rows})


if __name__ == "__main__":
    main()
