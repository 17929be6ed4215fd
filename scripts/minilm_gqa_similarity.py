"""How close GQA/MQA-converted all-MiniLM-L6-v2 (12 heads, MHA) stays to the original, training-free.

For each --method and --num-kv-heads: convert a copy of the encoder with ``convert_to_gqa``, embed held-out
text paragraphs the sentence-transformers way (mean pooling, 256 tokens) and compare with the original's
embeddings (cosine per paragraph, self-retrieval top-1; see ``hf_attn_swap.evaluate.embeddings``).

    python scripts/minilm_gqa_similarity.py --method mean --json results/minilm_mean.json

Defaults: the first 256 prose paragraphs of at least 12 words (``hf_attn_swap.io.text.prose_paragraphs``) of the
Python tutorial (held out), and for methods that need calibration the first 8192 tokens of the library reference
(disjoint from the tutorial).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModel, AutoTokenizer

from hf_attn_swap import convert_to_gqa, get_adapter
from hf_attn_swap.evaluate.embeddings import embedding_agreement, mean_pooled_embeddings
from hf_attn_swap.evaluate.suite import markdown_table
from hf_attn_swap.io.examples import example_model_path
from hf_attn_swap.io.folders import machine_info, write_json
from hf_attn_swap.io.text import (
    default_eval_files,
    default_train_files,
    prose_paragraphs,
    read_text,
    resolve_text_files,
)
from hf_attn_swap.methods.calibration import collect_calibration_from_files
from hf_attn_swap.methods.gqa import GQA_METHODS, kv_bytes_per_token

MIN_WORDS = 12  # a paragraph embeds at least one full sentence


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", help="BERT encoder folder (default: the packaged all-MiniLM-L6-v2)")
    parser.add_argument(
        "--method", nargs="+", default=["mean"], help=f"GQA methods ({', '.join(GQA_METHODS)})"
    )
    parser.add_argument("--num-kv-heads", type=int, nargs="+", default=[4, 2, 1])
    parser.add_argument("--data", nargs="+", help="held-out text files/folders (default: Python tutorial)")
    parser.add_argument("--paragraphs", type=int, default=256, help="number of prose paragraphs to embed")
    parser.add_argument(
        "--calibration-data", nargs="+", help="calibration text (default: Python library docs)"
    )
    parser.add_argument("--calibration-tokens", type=int, default=8192)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    unknown = [m for m in args.method if m not in GQA_METHODS]
    if unknown:
        parser.error(f"unknown method(s) {unknown}; available: {sorted(GQA_METHODS)}")

    torch.manual_seed(0)
    path = Path(args.model) if args.model else example_model_path("minilm")
    tokenizer = AutoTokenizer.from_pretrained(path)
    original = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    data = args.data or default_eval_files()
    texts = prose_paragraphs(read_text(resolve_text_files(data)), min_words=MIN_WORDS, limit=args.paragraphs)
    reference = mean_pooled_embeddings(original, tokenizer, texts)

    calibration = None
    if any(GQA_METHODS[m].needs_calibration for m in args.method):
        calibration = collect_calibration_from_files(
            original,
            tokenizer,
            args.calibration_data or default_train_files(),
            max_tokens=args.calibration_tokens,
            window=256,
            key_weights=any(GQA_METHODS[m].uses_key_weights for m in args.method),
        )

    rows = []
    for method in args.method:
        for num_kv in args.num_kv_heads:
            start = time.perf_counter()
            model = copy.deepcopy(original)
            report = convert_to_gqa(
                model,
                num_kv,
                method=method,
                calibration=calibration if GQA_METHODS[method].needs_calibration else None,
            )
            scores = embedding_agreement(reference, mean_pooled_embeddings(model, tokenizer, texts))
            rows.append(
                {
                    "method": method,
                    "num_key_value_heads": num_kv,
                    "kv_bytes_per_token": report.kv_bytes_per_token_after,
                    **scores,
                    "seconds": round(time.perf_counter() - start, 1),
                }
            )
            print(f"{method} {report.before['num_key_value_heads']}->{num_kv}: {scores}", file=sys.stderr)

    columns = [
        ("method", "method"),
        ("num_key_value_heads", "KV heads"),
        ("kv_bytes_per_token", "K/V bytes/token (fp32)"),
        ("cosine_mean", "cos mean"),
        ("cosine_median", "cos median"),
        ("cosine_min", "cos min"),
        ("retrieval_top1", "self-retrieval top-1"),
    ]
    print(markdown_table(rows, columns))
    neighbour = embedding_agreement(reference, reference)["reference_neighbour_cosine"]
    layout = get_adapter(original).layout(original.config)
    print(
        f"\n{len(texts)} paragraphs from {[str(p) for p in data]}; original: {layout.num_key_value_heads} KV "
        f"heads, {kv_bytes_per_token(layout, layout.num_key_value_heads, torch.float32)} K/V bytes/token. "
        f"Mean cosine between an original embedding and its nearest other paragraph: {neighbour:.4f}"
    )
    if args.json:
        write_json(
            args.json,
            {
                "model": str(path),
                "data": [str(p) for p in data],
                "paragraphs": len(texts),
                "calibration_data": [str(p) for p in args.calibration_data or default_train_files()]
                if calibration is not None
                else None,
                "calibration_tokens": args.calibration_tokens if calibration is not None else None,
                "reference_neighbour_cosine": neighbour,
                "results": rows,
                "machine": machine_info(),
                "command": " ".join(["python", *sys.argv]),
            },
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
