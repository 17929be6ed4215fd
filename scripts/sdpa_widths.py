"""Why ``latent_sdpa``'s expanded prefill stays below the original's on SmolLM2 (docs/guides/serving.md): one causal
``F.scaled_dot_product_attention`` of a 4 096-token prompt per head layout, on this CPU, as each form calls it.

- original: 9 query heads of q/k/v 64 (the 3 KV heads repeated, as transformers' sdpa path does);
- MLA expanded: 9 heads of q/k 96 (d_nope 64 + d_rope 32) and v 64 zero-padded to 96 (CPU SDPA fuses only equal
  head dims; unpadded v 64 is shown too);
- MLA absorbed: 9 heads of q/k/v 120 (latent 88 + rope 32; the keys are the values).

Attention work per token grows with d_qk + d_v; the 30 layers of a 4 096-token prefill call it 30 times.

    python scripts/sdpa_widths.py [--tokens 4096] [--heads 9] [--threads 2] [--repeats 5] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hf_attn_swap.io.folders import machine_info  # noqa: E402

LAYOUTS = (  # name, d_qk, d_v
    ("original (q/k/v 64)", 64, 64),
    ("MLA expanded (q/k 96, v padded to 96)", 96, 96),
    ("MLA expanded, v unpadded (q/k 96, v 64)", 96, 64),
    ("MLA absorbed (q/k/v 120)", 120, 120),
)


def seconds(tokens: int, heads: int, d_qk: int, d_v: int, repeats: int) -> float:
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, heads, tokens, d_qk, generator=g) for _ in range(2))
    v = torch.randn(1, heads, tokens, d_v, generator=g)
    F.scaled_dot_product_attention(q, k, v, is_causal=True)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        F.scaled_dot_product_attention(q, k, v, is_causal=True)
        best = min(best, time.perf_counter() - start)
    return best


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--heads", type=int, default=9)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for name, d_qk, d_v in LAYOUTS:
        s = seconds(args.tokens, args.heads, d_qk, d_v, args.repeats)
        rows.append({"layout": name, "d_qk": d_qk, "d_v": d_v, "seconds_per_call": s})
    base = rows[0]["seconds_per_call"]
    print(f"| layout | seconds per call ({args.tokens} tokens, {args.heads} heads, best of {args.repeats}) | x original |")
    print("|---|---|---|")
    for row in rows:
        row["vs_original"] = row["seconds_per_call"] / base
        print(f"| {row['layout']} | {row['seconds_per_call']:.4f} | {row['vs_original']:.2f} |")
    if args.json:
        record = {"rows": rows, "args": vars(args), "command": sys.argv, "machine": machine_info()}
        Path(args.json).write_text(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
