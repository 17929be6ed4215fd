"""Screening runs for MLA conversion options on the packaged SmolLM2-135M (developer tool; the README figures come
from scripts/compare_peers.py).

Each variant is a JSON dict of MLAConversionConfig fields plus ``calibration_mode`` (``sequential``, the default, or
``original``). Calibration activations of the original model are cached under --cache.

    OMP_NUM_THREADS=1 python scripts/mla_screen.py --eval-tokens 2048 \
        --variant '{"kv_lora_rank": 88, "qk_rope_head_dim": 32, "rope_selection": "freqfold", "rope_fold": 2}'
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's hf_attn_swap

from hf_attn_swap import convert_to_mla  # noqa: E402
from hf_attn_swap.evaluate.metrics import evaluate_models  # noqa: E402
from hf_attn_swap.io.checkpoints import load_causal_lm, load_tokenizer  # noqa: E402
from hf_attn_swap.io.examples import example_model_path  # noqa: E402
from hf_attn_swap.io.text import default_eval_files, default_train_files, load_token_ids  # noqa: E402
from hf_attn_swap.methods.calibration import CalibrationText, collect_calibration  # noqa: E402
from hf_attn_swap.methods.mla import MLAConversionConfig  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--variant", action="append", required=True)
    p.add_argument("--eval-tokens", type=int, default=2048)
    p.add_argument("--eval-text", default=None)
    p.add_argument("--calibration-tokens", type=int, default=8192)
    p.add_argument("--calibration-window", type=int, default=512)
    p.add_argument("--cache", default="/tmp/mla_screen_cache")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    src = example_model_path("smollm2")
    tok = load_tokenizer(src)
    original = load_causal_lm(src, "float32")
    eval_files = [args.eval_text] if args.eval_text else default_eval_files()
    eval_ids = load_token_ids(tok, eval_files, args.eval_tokens)
    calib_ids = load_token_ids(tok, default_train_files(), args.calibration_tokens)
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    orig_file = cache / f"original_kw_{args.calibration_tokens}_{args.calibration_window}.pt"
    if orig_file.exists():
        calibration = torch.load(orig_file, weights_only=False)
    else:
        # with key weights, so that "original" variants weigh their statistics as the sequential ones do
        calibration = collect_calibration(original, calib_ids, window=args.calibration_window, key_weights=True)
        torch.save(calibration, orig_file)
    models, rows = {}, []
    for text in args.variant:
        spec = json.loads(text)
        mode = spec.pop("calibration_mode", "sequential")
        options = MLAConversionConfig(**spec)
        started = time.time()
        model = copy.deepcopy(original)
        given = calibration if mode == "original" else CalibrationText(calib_ids, args.calibration_window, mode)
        convert_to_mla(model, options, calibration=given)
        print(f"{text}: converted in {time.time() - started:.0f} s", flush=True)
        models[text] = model
    results = evaluate_models(models, eval_ids, window=1024, reference=original, progress=False)
    for name, r in results.items():
        print(f"{name}: ppl {r['perplexity']:.2f} KL {r['kl_to_reference']:.3f}", flush=True)
        rows.append({"variant": name, **r})
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
