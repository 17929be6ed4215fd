"""Where llama.cpp's CPU time goes in MLA decode attention: ggml's own kernels, one layer, op by op.

llama.cpp (0.3.36, ``src/llama-graph.cpp`` ``build_attn_mha``) decodes a deepseek2 MLA layer as MQA over the
latent cache: one KV "head" of D = r + d_rope f16 values per token, V a view of the first R = r of them. Without
flash attention that is

    kq  = mul_mat(K [D, n_kv], q [D, 1, H])        the H query heads in dimension 2: one matrix-vector product
                                                   per head, each reading the whole latent cache
    v   = cont(transpose(V view))                  the latent cache copied transposed, every step ("v_cont")
    kqv = mul_mat(v [n_kv, R], softmax(kq) [n_kv, 1, H])

and with flash attention one ``flash_attn_ext`` (per head, online softmax over the rows, V read in place).
``scripts/ggml_mla_decode.c`` times each of these in ggml itself, beside the same products with the H heads
packed as the columns of one matrix (``q [D, H]``: one GEMM that reads the cache once) and MHA of the same heads
(per-head K and transposed V, head size 128), then this script prints a table per context:

    python scripts/llama_cpp_mla_kernels.py --contexts 4096 16384 32768 --threads 2 --json runs/bench/kernels.json

It compiles the C file with ``gcc`` against the headers and ``libggml*`` of the llama.cpp venv
(``scripts/install_runtimes.sh llama.cpp``). Shapes default to Llama-2-7B's heads (32) with the 512 + 64 latent.
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

from hf_attn_swap.io.folders import machine_info, write_json  # noqa: E402
from hf_attn_swap.pipeline.verify import runtime_python  # noqa: E402

SOURCE = Path(__file__).with_name("ggml_mla_decode.c")
COLUMNS = [
    ("kq_heads_in_dim2_ms", "kq (llama.cpp) ms"),
    ("kq_heads_packed_ms", "kq packed ms"),
    ("v_cont_ms", "v_cont ms"),
    ("kqv_heads_in_dim2_ms", "kqv (llama.cpp) ms"),
    ("kqv_heads_packed_ms", "kqv packed ms"),
    ("flash_attn_ms", "flash_attn ms"),
    ("mha_kq_ms", "MHA kq ms"),
    ("mha_kqv_ms", "MHA kqv ms"),
]


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--contexts", type=int, nargs="+", default=[4096, 16384, 32768])
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--rank", type=int, default=512, help="latent rank r (V width)")
    p.add_argument("--rope-dim", type=int, default=64)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--repeats", type=int, default=5, help="the best of this many timed runs per op")
    p.add_argument("--json", help="write the measurements here")
    return p.parse_args()


def build(folder: Path) -> Path:
    """``gcc -O2`` of ``ggml_mla_decode.c`` against the llama.cpp venv's ggml; the binary's path."""
    venv = runtime_python("llama.cpp").parent.parent
    site = next(venv.glob("lib/python3*/site-packages"))
    binary = folder / "ggml_mla_decode"
    lib = site / "llama_cpp" / "lib"
    command = ["gcc", "-O2", "-o", str(binary), str(SOURCE), f"-I{site / 'include'}", f"-L{lib}", "-lggml",
               "-lggml-base", "-lggml-cpu", f"-Wl,-rpath,{lib}"]  # fmt: skip
    subprocess.run(command, check=True)
    return binary


def table(rows: list[dict]) -> str:
    lines = [
        "| context | latent MiB | "
        + " | ".join(label for _, label in COLUMNS)
        + " | MLA total ms (llama.cpp) |",
        "|---" * (len(COLUMNS) + 3) + "|",
    ]
    for r in rows:
        total = r["kq_heads_in_dim2_ms"] + r["v_cont_ms"] + r["kqv_heads_in_dim2_ms"]
        cells = " | ".join(f"{r[key]:.3g}" for key, _ in COLUMNS)
        lines.append(f"| {r['n_kv']} | {r['latent_mib']:.3g} | {cells} | {total:.3g} |")
    return "\n".join(lines)


def main() -> int:
    args = parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        binary = build(Path(tmp))
        rows = []
        for n_kv in args.contexts:
            command = [str(binary), str(n_kv), str(args.heads), str(args.rank + args.rope_dim), str(args.rank),
                       str(args.threads), str(args.repeats)]  # fmt: skip
            rows.append(
                json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
            )
            print(json.dumps(rows[-1]), flush=True)
    print("\n" + table(rows))
    if args.json:
        payload = {"rows": rows, "table": table(rows), "command": [sys.executable, *sys.argv],
                   "machine": {**machine_info(), "load_average": os.getloadavg()}}  # fmt: skip
        print(f"wrote {write_json(args.json, payload)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
