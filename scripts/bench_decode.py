"""Decode tokens/s of SmolLM2-135M: original (sdpa) vs MLA stock deepseek_v3 (sdpa: the latent cache is
re-expanded through kv_b_proj every step) vs MLA with ``latent_sdpa`` (absorbed, LatentCache), at several contexts,
in one run. Each measurement is a fresh ``python -m hf_attn_swap bench`` process (its own peak RSS; decode tokens/s
as ``hf_attn_swap.evaluate.speed`` defines it); rounds are interleaved and the best round per cell is reported
(the CPU is shared with other jobs).

    python scripts/bench_decode.py --json runs/mla/bench.json

With --prefill it measures prompt tokens/s instead: one forward of each context into a fresh cache (as generate()
prefills), in this process, for the original, the MLA checkpoint with stock sdpa, and latent_sdpa with the absorbed
form forced and with its per-call choice (expanded for a prompt); one warm-up, then --repeats interleaved rounds, the
median per cell.

    python scripts/bench_decode.py --prefill --contexts 1024 4096 --threads 2 --repeats 3 --mla MLA_DIR

The MLA checkpoint is converted once (stock deepseek_v3 format, --kv-lora-rank/--rope-dim; weights do not change
the speed) unless --mla PATH is given.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hf_attn_swap.evaluate.suite import markdown_table  # noqa: E402
from hf_attn_swap.io.examples import example_model_path  # noqa: E402
from hf_attn_swap.io.folders import machine_info, write_json  # noqa: E402
from hf_attn_swap.pipeline.convert import convert_checkpoint  # noqa: E402

CONFIGS = [
    ("original (sdpa)", "original", "sdpa", "auto"),
    ("MLA stock deepseek_v3 (sdpa, re-expands)", "mla", "sdpa", "auto"),
    ("MLA latent_sdpa (absorbed, LatentCache)", "mla", "latent_sdpa", "latent"),
]

PREFILL_CONFIGS = [
    ("original (sdpa)", "original", "sdpa", "auto"),
    ("MLA stock deepseek_v3 (sdpa, expands)", "mla", "sdpa", "auto"),
    ("MLA latent_sdpa, absorbed prefill (forced)", "mla", "latent_sdpa", "absorbed"),
    ("MLA latent_sdpa, per-call form (expanded prefill)", "mla", "latent_sdpa", "auto"),
]


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 8192])
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument(
        "--threads", type=int, default=1, help="torch threads per run (1 is the stablest on a shared CPU)"
    )
    p.add_argument(
        "--repeats", type=int, default=2, help="interleaved rounds; the best round per cell is reported"
    )
    p.add_argument(
        "--prefill", action="store_true", help="prompt tokens/s instead of decode (module docstring)"
    )
    p.add_argument("--mla", help="an MLA checkpoint (default: convert the packaged SmolLM2)")
    p.add_argument("--kv-lora-rank", type=int, default=104)
    p.add_argument("--rope-dim", type=int, default=16)
    p.add_argument("--workdir", default="runs/mla")
    p.add_argument("--json", default="runs/mla/bench.json")
    return p.parse_args()


def bench(model: str, context: int, args, attn: str, cache: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bench.json"
        command = [
            sys.executable, "-m", "hf_attn_swap", "bench", model, "--context", str(context),
            "--new-tokens", str(args.new_tokens), "--attn-implementation", attn, "--cache", cache,
            "--threads", str(args.threads), "--json", str(out),
        ]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(args.threads)}
        done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
        (row,) = json.loads(out.read_text())["rows"]
        print(f"{Path(model).name} [{attn}, {cache}] context {context}: {row['decode_tokens_per_second']:.2f} "
              f"tokens/s, prefill {row['prefill_seconds']:.1f} s", flush=True)  # fmt: skip
        return {**row, "cache_bytes_per_token": row["kv_bytes_per_token"]}


def main() -> int:
    args = parse_args()
    original = str(example_model_path("smollm2"))
    mla = args.mla
    if mla is None:
        mla = Path(args.workdir) / f"SmolLM2-135M-mla-r{args.kv_lora_rank}-d{args.rope_dim}-deepseek_v3"
        if not mla.exists():
            print(convert_checkpoint(original, mla, to="mla", mla={"kv_lora_rank": args.kv_lora_rank,
                                                                    "qk_rope_head_dim": args.rope_dim,
                                                                    "factorization": "svd"}))  # fmt: skip
    paths = {"original": original, "mla": str(mla)}
    if args.prefill:
        return prefill(paths, args)
    runs = {(context, name): [] for context in args.contexts for name, *_ in CONFIGS}
    for _ in range(args.repeats):  # interleaved, so a busy spell on the shared CPU hits every configuration
        for context in args.contexts:
            for name, model, attn, cache in CONFIGS:
                runs[context, name].append(bench(paths[model], context, args, attn, cache))
    rows = []
    for context in args.contexts:
        measured = {
            name: max(runs[context, name], key=lambda r: r["decode_tokens_per_second"])
            for name, *_ in CONFIGS
        }
        base = measured[CONFIGS[0][0]]["decode_tokens_per_second"]
        stock = measured[CONFIGS[1][0]]["decode_tokens_per_second"]
        for name, result in measured.items():
            rows.append(
                {"context": context, "name": name, **result,
                 "vs_original": result["decode_tokens_per_second"] / base,
                 "vs_stock_mla": result["decode_tokens_per_second"] / stock}
            )  # fmt: skip
    columns = [
        ("context", "context"),
        ("name", "model"),
        ("decode_tokens_per_second", "decode tokens/s"),
        ("vs_original", "x original"),
        ("vs_stock_mla", "x MLA stock"),
        ("cache_bytes_per_token", "cache bytes/token"),
        ("prefill_seconds", "prefill s"),
        ("peak_rss_mib", "peak RSS MiB"),
    ]
    table = markdown_table(rows, columns)
    print()
    print(table)
    payload = {
        "rows": rows,
        "all_runs": [{"context": c, "name": n, "runs": r} for (c, n), r in runs.items()],
        "repeats": args.repeats,
        "new_tokens": args.new_tokens,
        "threads": args.threads,
        "mla": str(mla),
        "command": [sys.executable, *sys.argv],
        "machine": machine_info(),
        "table": table,
    }
    print(f"\nwrote {write_json(args.json, payload)}")
    return 0


def prefill(paths: dict[str, str], args) -> int:
    """Prompt tokens/s per PREFILL_CONFIGS row and context (module docstring); writes the table and --json."""
    import statistics

    import torch
    from torch.utils import benchmark
    from transformers import AutoModelForCausalLM

    from hf_attn_swap import LatentCache
    from hf_attn_swap.modeling.compat import cache_kwargs
    from hf_attn_swap.modeling.latent_attention import force_latent_form

    torch.set_num_threads(args.threads)
    loads = dict.fromkeys((model, attn) for _, model, attn, _ in PREFILL_CONFIGS)  # each pair once
    models = {
        key: AutoModelForCausalLM.from_pretrained(
            paths[key[0]], attn_implementation=key[1], dtype=torch.float32
        )
        for key in loads
    }

    def seconds(context: int, model: str, attn: str, form: str) -> float:
        network = models[model, attn].eval()
        ids = torch.randint(
            3, network.config.vocab_size, (1, context), generator=torch.Generator().manual_seed(0)
        )
        cache = LatentCache(config=network.config) if attn == "latent_sdpa" else None
        with torch.no_grad(), force_latent_form(form):
            start = benchmark.timer()
            network(input_ids=ids, use_cache=True, logits_to_keep=1, **cache_kwargs(cache))
            return benchmark.timer() - start

    runs = {(context, name): [] for context in args.contexts for name, *_ in PREFILL_CONFIGS}
    for round_ in range(1 + args.repeats):  # round 0 warms up; interleaved, so busy spells hit every row
        for context in args.contexts:
            for name, *config in PREFILL_CONFIGS:
                elapsed = seconds(context, *config)
                print(f"round {round_} context {context} {name}: {elapsed:.2f} s", flush=True)
                if round_:
                    runs[context, name].append(elapsed)
    rows = []
    for context in args.contexts:
        speed = {name: context / statistics.median(runs[context, name]) for name, *_ in PREFILL_CONFIGS}
        for name, tokens_per_second in speed.items():
            rows.append(
                {"context": context, "name": name, "prefill_tokens_per_second": tokens_per_second,
                 "vs_original": tokens_per_second / speed[PREFILL_CONFIGS[0][0]],
                 "vs_absorbed": tokens_per_second / speed[PREFILL_CONFIGS[2][0]]}
            )  # fmt: skip
    columns = [("context", "context"), ("name", "model"), ("prefill_tokens_per_second", "prefill tokens/s"),
               ("vs_original", "x original"), ("vs_absorbed", "x absorbed prefill")]  # fmt: skip
    table = markdown_table(rows, columns)
    print(f"\n{table}")
    payload = {"rows": rows, "all_runs": [{"context": c, "name": n, "seconds": r} for (c, n), r in runs.items()],
               "repeats": args.repeats, "threads": args.threads, "mla": paths["mla"],
               "command": [sys.executable, *sys.argv], "machine": machine_info(), "table": table}  # fmt: skip
    print(f"\nwrote {write_json(args.json, payload)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
