"""Training-free quality of MLA conversions of the packaged SmolLM2-135M at several KV budgets.

For each KV budget (values cached per token and layer, r + d_rope), rope selection and factorisation: convert a
copy of the model in memory, measure its KV bytes/token from a real cache, and score perplexity / KL to the
original on held-out text (the Python tutorial; calibration on the library reference, disjoint). Prints a
markdown table and writes JSON.

    python scripts/mla_quality.py --json runs/mla/quality.json
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's hf_attn_swap

from hf_attn_swap import convert_to_mla  # noqa: E402
from hf_attn_swap.evaluate.metrics import evaluate_models, measure_kv_cache_bytes_per_token  # noqa: E402
from hf_attn_swap.evaluate.suite import markdown_table
from hf_attn_swap.export.deepseek_v3 import to_deepseek_v3  # noqa: E402
from hf_attn_swap.io.checkpoints import load_causal_lm, load_tokenizer  # noqa: E402
from hf_attn_swap.io.examples import example_model_path  # noqa: E402
from hf_attn_swap.io.folders import machine_info, write_json  # noqa: E402
from hf_attn_swap.io.text import default_eval_files, default_train_files, load_token_ids  # noqa: E402
from hf_attn_swap.methods.calibration import collect_attention_inputs  # noqa: E402

COLUMNS = [
    ("budget", "KV budget"),
    ("name", "conversion"),
    ("calibration", "calibration"),
    ("kv_cache_bytes_per_token", "KV bytes/token (measured)"),
    ("perplexity", "perplexity"),
    ("kl_to_reference", "KL to original (nats)"),
    ("top1_agreement", "top-1 agreement"),
]


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budgets", type=int, nargs="+", default=[192, 120, 48], help="r + d_rope per layer")
    p.add_argument("--rope-dim", type=int, default=16)
    p.add_argument("--selections", nargs="+", default=["uniform", "high", "low", "norm"])
    p.add_argument("--factorizations", nargs="+", default=["svd", "pca"])
    p.add_argument("--eval-tokens", type=int, default=4096)
    p.add_argument("--window", type=int, default=1024)
    p.add_argument("--calibration-tokens", type=int, default=8192)
    p.add_argument("--group", type=int, default=6, help="models scored per reference pass")
    p.add_argument("--no-extras", action="store_true", help="skip the data-free, ablation and export rows")
    p.add_argument("--json", default="runs/mla/quality.json")
    return p.parse_args()


def main() -> int:
    args = parse_args()
    src = example_model_path("smollm2")
    tokenizer = load_tokenizer(src)
    original = load_causal_lm(src, "float32")
    eval_ids = load_token_ids(tokenizer, default_eval_files(), args.eval_tokens)
    calib_ids = load_token_ids(tokenizer, default_train_files(), args.calibration_tokens)
    start = time.time()
    calibration = collect_attention_inputs(original, calib_ids, window=512)
    print(f"calibration: {len(calib_ids)} tokens of {default_train_files()[0]} ({time.time() - start:.0f} s)")
    full_kv = 2 * original.config.num_key_value_heads * original.config.head_dim

    # (budget label, row name, calibration used, factory returning a converted copy)
    jobs = []
    for budget in args.budgets:
        label = f"{budget}/{full_kv} ({-100 * (1 - budget / full_kv):+.2f}%)"
        rank = budget - args.rope_dim
        for selection in args.selections:
            for factorization in args.factorizations:
                jobs.append(
                    (label, f"{selection} + {factorization}", "yes",
                     dict(kv_lora_rank=rank, qk_rope_head_dim=args.rope_dim, rope_selection=selection,
                          factorization=factorization, calibration=calibration))
                )  # fmt: skip
        if not args.no_extras:
            jobs.append(
                (
                    label,
                    "uniform + svd, data-free",
                    "no",
                    dict(
                        kv_lora_rank=rank,
                        qk_rope_head_dim=args.rope_dim,
                        rope_selection="uniform",
                        factorization="svd",
                    ),
                )
            )
            jobs.append(
                (label, "norm + pca, energy ranks", "yes",
                 dict(kv_lora_rank=rank, qk_rope_head_dim=args.rope_dim, rope_selection="norm", factorization="pca",
                      calibration=calibration, rank_allocation="energy"))
            )  # fmt: skip
            jobs.append(
                (label, "uniform + pca, stock deepseek_v3 export", "yes",
                 dict(kv_lora_rank=rank, qk_rope_head_dim=args.rope_dim, rope_selection="uniform", factorization="pca",
                      calibration=calibration, export=True))
            )  # fmt: skip
    if not args.no_extras:
        # ablations: each approximation alone (their caches are larger than any budget above)
        kv = original.config.num_key_value_heads
        jobs.append(
            ("ablation", f"partial RoPE only: shared {args.rope_dim}-dim rope key, full rank", "yes",
             dict(kv_lora_rank=2 * kv * 64, qk_rope_head_dim=args.rope_dim, rope_selection="uniform", factorization="pca",
                  calibration=calibration))
        )  # fmt: skip
        for rank in (176, 104, 32):
            jobs.append(
                ("ablation", f"low rank only: r={rank}, all RoPE dims, a rope key per KV head", "yes",
                 dict(kv_lora_rank=rank, qk_rope_head_dim=64, num_rope_key_heads=kv, factorization="pca",
                      calibration=calibration))
            )  # fmt: skip

    rows = []
    for first in range(0, len(jobs), args.group):
        group = {}
        for label, name, calibrated, options in jobs[first : first + args.group]:
            options = dict(options)
            export = options.pop("export", False)
            model = copy.deepcopy(original)
            started = time.time()
            report = convert_to_mla(model, **options)
            print(f"converted {label} | {name} in {time.time() - started:.0f} s", flush=True)
            if export:
                model, _ = to_deepseek_v3(model)
            key = f"{label} | {name}"
            group[key] = model
            rows.append(
                {"key": key, "budget": label, "name": name, "calibration": calibrated, "report": report.to_dict(),
                 "kv_cache_bytes_per_token": measure_kv_cache_bytes_per_token(model, eval_ids[:16])}
            )  # fmt: skip
        results = evaluate_models(group, eval_ids, window=args.window, reference=original, progress=False)
        for row in rows[-len(group) :]:
            row.update(results[row["key"]])
            print(f"{row['key']}: ppl {row['perplexity']:.2f}, KL {row['kl_to_reference']:.3f}", flush=True)
        del group

    base = evaluate_models({"original": original}, eval_ids, window=args.window, progress=False)["original"]
    base.update(
        budget=f"{full_kv}/{full_kv} (original)",
        name="original (GQA, 3 KV heads)",
        calibration="—",
        kv_cache_bytes_per_token=measure_kv_cache_bytes_per_token(original, eval_ids[:16]),
        kl_to_reference=0.0,
        top1_agreement=1.0,
    )
    rows.insert(0, base)
    table = markdown_table(rows, COLUMNS)
    print()
    print(table)
    payload = {
        "rows": rows,
        "eval": {"files": str(default_eval_files()[0]), "tokens": len(eval_ids), "window": args.window},
        "calibration": {"files": str(default_train_files()[0]), "tokens": len(calib_ids), "window": 512},
        "rope_dim": args.rope_dim,
        "command": [sys.executable, *sys.argv],
        "machine": machine_info(),
        "table": table,
    }
    print(f"\nwrote {write_json(Path(args.json), payload)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
