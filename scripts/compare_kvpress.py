"""kvpress (NVIDIA's KV-cache presses: drop tokens from the cache at prefill) at the KV bytes of a conversion, on the
long-context retrieval suite (``hf-attn-swap eval --task needle ...``'s prompts, scorer and result format).

A conversion keeping a fraction --keep of the KV bytes per token (MLA -68.75 %: 0.3125; SmolLM2's MQA: 0.3333) is
compared with every press at compression_ratio = 1 - keep. Question-agnostic presses compress the context only (the
question comes after, as a user's next turn would); question-aware ones (snapkv) see the question in the prefill,
as kvpress's own evaluation runs them, and are labelled "(question-aware)". The model without a press is decoded by
the same driver as the baseline. kvpress runs in its own venv: `bash scripts/install_runtimes.sh kvpress` once.

    python scripts/compare_kvpress.py --model smollm2 --lengths 2048 4096 --depths 0.25 0.5 0.75 --trials 2 \
        --keep 0.3125 --presses expected_attention knorm streaming_llm snapkv --json runs/longcontext/kvpress_smollm2.json

Flags:
    --model        smollm2 | qwen2.5-coder (packaged, materialised on first use) | a transformers folder kvpress
                   supports (Llama, Qwen2/3, Mistral, Phi-3, Gemma 3); default smollm2
    --task         retrieval tasks: needle multikey multivalue vartrack (default needle)
    --lengths      prompt + answer lengths in the model's tokens (default 2048)
    --depths       needle depths in [0, 1] (default 0.25 0.5 0.75)
    --trials       prompts per (length, depth) cell (default 2)
    --seed         seed of keys, values and haystack offsets (default 0)
    --needles      multikey / multivalue / vartrack: statements per prompt (default 4)
    --keep         fraction of KV bytes per token kept; each press runs at compression_ratio 1 - keep (default 0.3125)
    --presses      presses to run (default expected_attention knorm streaming_llm snapkv; also tova keydiff compactor)
    --no-baseline  skip the no-press run
    --python       interpreter with kvpress (default: the venv of scripts/install_runtimes.sh kvpress)
    --threads      torch threads in the kvpress process (default 2)
    --attn-implementation  the model's attention kernel in kvpress (default sdpa)
    --data         haystack text files or folders (default: the Python tutorial)
    --json         results, shaped like `hf-attn-swap eval --json` (default runs/longcontext/kvpress_<model>.json)
    --markdown     also write the tables here
    --plots        folder for longcontext_<name>.png (accuracy per length x depth) per press
Exit status: 0, 1 when a press failed (its error is in the JSON), 2 on bad input (one line).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's hf_attn_swap

from hf_attn_swap.cli import run_script  # noqa: E402
from hf_attn_swap.evaluate.longcontext import RETRIEVAL_TASKS, LongContextConfig  # noqa: E402
from hf_attn_swap.evaluate.suite import long_context_plots, suite_markdown  # noqa: E402
from hf_attn_swap.io.examples import EXAMPLES, example_model_path  # noqa: E402
from hf_attn_swap.io.folders import machine_info, write_json  # noqa: E402
from hf_attn_swap.pipeline.compare_kvpress import (  # noqa: E402
    DEFAULT_PRESSES,
    KVPressOptions,
    compare_kvpress,
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", help="smollm2 | qwen2.5-coder | a model folder")
    p.add_argument("--task", nargs="+", default=["needle"], choices=RETRIEVAL_TASKS, help="retrieval tasks")
    p.add_argument("--lengths", nargs="+", type=int, default=[2048], help="prompt + answer tokens")
    p.add_argument("--depths", nargs="+", type=float, default=[0.25, 0.5, 0.75], help="needle depths")
    p.add_argument("--trials", type=int, default=2, help="prompts per (length, depth) cell")
    p.add_argument("--seed", type=int, default=0, help="seed of keys, values and haystack offsets")
    p.add_argument("--needles", type=int, default=4, help="statements per prompt (multikey, ...)")
    p.add_argument("--keep", type=float, default=0.3125, help="fraction of KV bytes kept (ratio 1 - keep)")
    p.add_argument("--presses", nargs="+", default=list(DEFAULT_PRESSES), help="kvpress presses")
    p.add_argument("--no-baseline", action="store_true", help="skip the no-press run")
    p.add_argument("--python", default=None, help="interpreter with kvpress (default: its cached venv)")
    p.add_argument("--threads", type=int, default=2, help="torch threads in the kvpress process")
    p.add_argument("--attn-implementation", default="sdpa", help="attention kernel in kvpress")
    p.add_argument("--data", nargs="+", default=None, help="haystack text files or folders")
    p.add_argument("--json", default=None, help="results (default runs/longcontext/kvpress_<model>.json)")
    p.add_argument("--markdown", default=None, help="also write the tables here")
    p.add_argument("--plots", default=None, help="folder for the accuracy heatmaps")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    config = LongContextConfig(
        task=args.task, lengths=args.lengths, depths=args.depths, trials=args.trials, seed=args.seed,
        needles=args.needles,
    )  # fmt: skip
    options = KVPressOptions(
        keep=args.keep, presses=args.presses, baseline=not args.no_baseline, python=args.python,
        attn_implementation=args.attn_implementation, threads=args.threads,
    )  # fmt: skip
    model = example_model_path(args.model) if args.model in EXAMPLES else Path(args.model).expanduser()
    if not (model / "config.json").is_file():
        raise FileNotFoundError(
            f"--model {args.model!r}: no config.json there; name one of smollm2, qwen2.5-coder"
        )
    start = time.perf_counter()
    results = compare_kvpress(model, config, options, args.data)
    seconds = round(time.perf_counter() - start, 1)
    table = suite_markdown(results)
    print(table)
    failed = {name: r["error"] for name, r in results.items() if r.get("error")}
    for name, error in failed.items():
        print(f"{name}: {error}", file=sys.stderr)
    meta = {"command": sys.argv, "machine": machine_info(), "keep": args.keep, "wall_seconds": seconds}
    out = Path(
        args.json or f"runs/longcontext/kvpress_{args.model if args.model in EXAMPLES else model.name}.json"
    )
    print(f"wrote {write_json(out, {**meta, 'models': results})} ({seconds} s)")
    if args.markdown:
        path = Path(args.markdown).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"{table}\n\nCommand: `{' '.join(sys.argv)}`\n")
        print(f"wrote {path}")
    if args.plots:
        for path in long_context_plots(results, Path(args.plots).expanduser()):
            print(f"wrote {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(run_script("compare_kvpress.py", main))
