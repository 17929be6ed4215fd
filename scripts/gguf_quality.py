"""GGUF quality of the SmolLM2-135M MLA export (-68.75 % KV) against the original, per GGUF type, in llama.cpp.

Every GGUF is made as ``hf-attn-swap gguf`` makes it (llama.cpp's converter, then ``llama_model_quantize`` for
q8_0 / q4_k_m, kv_a tensors float32): f32, q8_0 and q4_k_m of the original folder and of the MLA export, plus the
MLA export's q8_0 and f16 *without* the float32 override (what a stock converter / llama-quantize writes). Each file
runs in ``llama_cpp.Llama`` (float32 KV cache) on the first ``--tokens`` tokens of the Python tutorial (files
concatenated, the model's tokenizer) and greedily on verify's 3 prompts (``--max-new-tokens``). Reported:

- per type q: KL(original-q || MLA-q) per token and greedy agreement of MLA-q with original-q, next to the same for
  f32 (the acceptance: every quantised pair agrees at least as well as the f32 pair);
- each file against its own f32 file (KL, greedy agreement): what the quantisation alone costs;
- NLL per token of every file on the text.

    python scripts/gguf_quality.py --mla /tmp/smollm2-mla --json runs/gguf/gguf_quality.json

``--mla`` is built first when missing, with
``hf-attn-swap convert $(hf-attn-swap example-model smollm2) MLA --to mla --kv-budget 0.3125 --calibration-tokens
2048``. GGUF files and logits are kept in ``--work`` and reused by a rerun.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hf_attn_swap.io.checkpoints import load_tokenizer  # noqa: E402
from hf_attn_swap.io.examples import example_model_path  # noqa: E402
from hf_attn_swap.io.folders import machine_info, write_json  # noqa: E402
from hf_attn_swap.io.text import default_eval_files, load_token_ids  # noqa: E402
from hf_attn_swap.pipeline.gguf import (  # noqa: E402
    evaluate_step,
    gguf_steps,
    greedy_agreement,
    kl_stats,
    llama_cpp_python,
    run_gguf_driver,
)
from hf_attn_swap.pipeline.verify import DEFAULT_PROMPTS, tokenize  # noqa: E402

QUANTS = ("f32", "q8_0", "q4_k_m")
#: files of the MLA export written without the float32 override of its kv_a tensors
UNPROTECTED = ("q8_0", "f16")


def mla_command(mla: Path) -> list[str]:
    src = subprocess.run(
        [sys.executable, "-m", "hf_attn_swap", "example-model", "smollm2"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    return [sys.executable, "-m", "hf_attn_swap", "convert", src, str(mla), "--to", "mla", "--kv-budget", "0.3125",
            "--calibration-tokens", "2048"]  # fmt: skip


def make_files(name: str, folder: Path, work: Path, python: Path, prompts, text, max_new_tokens) -> dict:
    """GGUF files of ``folder`` (``name-TYPE[-unprotected].gguf``) and their outputs (greedy + logits .npy), all in
    one driver call; files already in ``work`` are reused. Returns {label: {gguf, logits, outputs, step}}."""
    labels = [(q, True) for q in QUANTS] + ([(q, False) for q in UNPROTECTED] if name == "mla" else [])
    steps, files, f32 = [], {}, work / f"{name}-f32.gguf"
    for quant, protect in labels:
        label = f"{name}-{quant}" + ("" if protect else "-unprotected")
        gguf = work / f"{label}.gguf"
        for step in gguf_steps(folder, gguf, quant, work, protect) if not gguf.is_file() else []:
            if step["op"] == "quantize":  # every quantised file from the one f32 file
                step["infile"] = str(f32)
            elif Path(step["outfile"]) != gguf:
                continue  # the f32 file: made (or reused) as its own label
            steps.append(step)
        files[label] = {"gguf": gguf, "logits": work / f"{label}.npy", "record": work / f"{label}.json"}
        if not files[label]["record"].is_file():  # outputs of an earlier run with these settings are reused
            steps.append(evaluate_step(gguf, prompts, max_new_tokens, text, files[label]["logits"]))
    response = run_gguf_driver(python, steps) if steps else {"steps": []}
    made = {s["outfile"]: r for s, r in zip(steps, response["steps"], strict=True) if s["op"] != "evaluate"}
    for s, r in zip(steps, response["steps"], strict=True):
        if s["op"] == "evaluate":
            entry = next(f for f in files.values() if str(f["gguf"]) == s["gguf"])
            run = {"outputs": r["outputs"], "seconds": r["seconds"], "made": made.get(s["gguf"]),
                   "prompts": prompts, "text_tokens": len(text)}  # fmt: skip
            write_json(entry["record"], run)
    for entry in files.values():
        run = json.loads(entry["record"].read_text())
        assert run["prompts"] == prompts and run["text_tokens"] == len(text), f"stale {entry['record']}"
        entry.update(outputs=run["outputs"], seconds=run["seconds"], made=run["made"])
    return files


def pair(files: dict, ref: str, other: str, ids: list[int]) -> dict:
    """KL(ref || other) on the text and greedy agreement of ``other`` with ``ref``."""
    a, b = np.load(files[ref]["logits"]), np.load(files[other]["logits"])
    return {
        "reference": ref,
        "other": other,
        "kl": kl_stats(torch.from_numpy(a), torch.from_numpy(b), ids),
        "greedy": greedy_agreement(files[ref]["outputs"], files[other]["outputs"]),
    }


def table(rows: list[dict]) -> str:
    lines = [
        "| reference | compared | KL mean | KL max | top-1 agree | NLL ref → compared | greedy tokens equal | first divergence |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        kl, g = r["kl"], r["greedy"]
        div = ", ".join("—" if d is None else str(d) for d in g["first_divergence"])
        lines.append(
            f"| {r['reference']} | {r['other']} | {kl['kl_mean']:.4f} | {kl['kl_max']:.3f} | "
            f"{kl['top1_agreement']:.3f} | {kl['nll_reference']:.3f} → {kl['nll']:.3f} | "
            f"{g['tokens_equal']}/{g['prompts']} | {div} |"
        )
    return "\n".join(lines)


def acceptance(rows: list[dict]) -> dict:
    """Does original-q vs MLA-q agree at least as well as original-f32 vs MLA-f32 (KL on the text, greedy tokens
    on the prompts, top-1 on the text)? ``literal``: all three, no tolerance. ``within_quantisation_cost``: the
    KL grows by no more than quantising the original alone costs (KL(original-f32 || original-q)), and the
    export loses no more to the quantisation than the original does (KL(MLA-f32 || MLA-q) <= that cost)."""
    by = {(r["reference"], r["other"]): r for r in rows}
    base = by[("original-f32", "mla-f32")]
    result = {}
    for quant in QUANTS[1:]:
        r = by[(f"original-{quant}", f"mla-{quant}")]
        cost = by[("original-f32", f"original-{quant}")]["kl"]["kl_mean"]
        mla_cost = by[("mla-f32", f"mla-{quant}")]["kl"]["kl_mean"]
        kl, kl32 = r["kl"]["kl_mean"], base["kl"]["kl_mean"]
        top1, top1_32 = r["kl"]["top1_agreement"], base["kl"]["top1_agreement"]
        tokens, tokens32 = r["greedy"]["tokens_equal"], base["greedy"]["tokens_equal"]
        result[quant] = {
            "kl_mean": kl, "kl_mean_f32": kl32, "kl_increase": kl - kl32,
            "top1_agreement": top1, "top1_agreement_f32": top1_32,
            "tokens_equal": tokens, "tokens_equal_f32": tokens32,
            "quantisation_kl_original": cost, "quantisation_kl_mla": mla_cost,
            "literal": kl <= kl32 and top1 >= top1_32 and tokens >= tokens32,
            "within_quantisation_cost": kl - kl32 <= cost and mla_cost <= cost,
        }  # fmt: skip
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--mla", default="/tmp/smollm2-mla", help="the SmolLM2 MLA export (built when missing)"
    )
    parser.add_argument("--work", default="/tmp/gguf_quality", help="GGUF files and logits (reused)")
    parser.add_argument("--tokens", type=int, default=1024, help="tutorial tokens scored")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--json", default="runs/gguf/gguf_quality.json")
    args = parser.parse_args()
    start = time.perf_counter()
    original, mla, work = example_model_path("smollm2"), Path(args.mla).resolve(), Path(args.work).resolve()
    convert = mla_command(mla)
    if not mla.is_dir():
        subprocess.run(convert, check=True)
    work.mkdir(parents=True, exist_ok=True)
    python = llama_cpp_python()
    ids = load_token_ids(load_tokenizer(original), default_eval_files(), args.tokens).tolist()
    prompts = tokenize(original, list(DEFAULT_PROMPTS))
    assert prompts == tokenize(mla, list(DEFAULT_PROMPTS))  # same tokenizer: same ids for both
    files = {}
    for name, folder in (("original", original), ("mla", mla)):
        files.update(make_files(name, folder, work, python, prompts, ids, args.max_new_tokens))
    rows = [pair(files, f"original-{q}", f"mla-{q}", ids) for q in QUANTS]
    rows += [pair(files, f"{n}-f32", f"{n}-{q}", ids) for n in ("original", "mla") for q in QUANTS[1:]]
    rows += [pair(files, "mla-f32", f"mla-{q}-unprotected", ids) for q in UNPROTECTED]
    rows += [pair(files, "original-q8_0", "mla-q8_0-unprotected", ids)]
    print(table(rows))
    result = {
        "command": [sys.executable, *sys.argv],
        "mla_command": convert,
        "models": {"original": str(original), "mla": str(mla)},
        "text": {"files": [str(f) for f in default_eval_files()], "tokens": len(ids)},
        "prompts": list(DEFAULT_PROMPTS),
        "max_new_tokens": args.max_new_tokens,
        "files": {
            label: {"bytes": f["gguf"].stat().st_size, "made": f["made"], "eval_seconds": f["seconds"]}
            for label, f in files.items()
        },
        "rows": rows,
        "acceptance": acceptance(rows),
        "machine": machine_info(),
        "seconds": round(time.perf_counter() - start, 1),
    }
    for quant, verdict in result["acceptance"].items():
        print(
            f"{quant}: "
            + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in verdict.items())
        )
    print(f"saved {write_json(REPO / args.json if not Path(args.json).is_absolute() else args.json, result)}")


if __name__ == "__main__":
    main()
