"""Measured KV-cache bytes per token before and after GQA conversion, for the families converted through
hf_attn_swap's plugin attention (GPT-2, GPT-NeoX, OPT, Falcon, BERT decoder).

The cache is measured from a real forward (``measure_kv_cache_bytes_per_token``: bytes held by the returned
``DynamicCache`` / batch x tokens), on the tiny random test models (hidden 64, 2 layers, 4 heads) and on a
BERT decoder with the packaged all-MiniLM-L6-v2's shape (6 layers, 12 heads, hidden 384; random weights).

    python scripts/plugin_kv_cache.py
"""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from hf_attn_swap import convert_to_gqa
from hf_attn_swap.evaluate.metrics import measure_kv_cache_bytes_per_token
from hf_attn_swap.evaluate.suite import markdown_table
from hf_attn_swap.io.examples import example_model_path
from hf_attn_swap.testing import tiny_model

TINY = {
    "gpt2": {},
    "gpt_neox": {},
    "opt": {},
    "falcon": {},  # new_decoder_architecture (Falcon-40B layout)
    "bert": {"is_decoder": True},
}


def minilm_shaped_decoder():
    config = AutoConfig.from_pretrained(example_model_path("minilm"), is_decoder=True)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def main() -> int:
    rows = []
    cases = [(f"{name} (tiny)", lambda n=name: tiny_model(n, **TINY[n]), (2, 1)) for name in TINY]
    cases.append(("bert decoder, MiniLM-L6 shape", minilm_shaped_decoder, (4, 2, 1)))
    for label, build, targets in cases:
        for num_kv in targets:
            model = build()
            before = measure_kv_cache_bytes_per_token(model)
            report = convert_to_gqa(model, num_kv)
            after = measure_kv_cache_bytes_per_token(model)
            rows.append(
                {
                    "model": label,
                    "heads": f"{report.before['num_key_value_heads']} -> {num_kv}",
                    "before": before,
                    "after": after,
                    "ratio": before / after,
                    "formula_after": report.kv_bytes_per_token_after,
                }
            )
    columns = [
        ("model", "model (fp32)"),
        ("heads", "KV heads"),
        ("before", "measured bytes/token before"),
        ("after", "measured after"),
        ("ratio", "before / after"),
        ("formula_after", "formula after"),
    ]
    print(markdown_table(rows, columns))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
