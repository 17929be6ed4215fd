"""The ``hf-attn-swap bench`` job: served speed and memory of several models in one serving engine, against the
roofline.

    hf-attn-swap bench MODEL [MODEL ...] --runtime transformers|llama.cpp|vllm|mlx --context 4096 16384
        [--batch N] [--kv-budget-mib M] [--random-weights llama2-7b --layers 2 --mla 448+64:512+64 256+64]

Per model and context, in the engine's own interpreter (a driver script of ``drivers/``, one process per model:
``*_bench.py``, protocol in ``drivers/bench_protocol.py``): prefill tokens/s, decode tokens/s (``batch``
sequences, ``new_tokens`` steps, the median of ``repeats`` rounds), the engine's own KV-cache bytes per token
(llama.cpp: its serialised sequence state; vLLM: its KV-cache block config; mlx-lm: the cache arrays; transformers:
the cache's tensors), and from them the KV MiB at that context and the most sequences (at this context) or the
longest context (at ``batch`` sequences) that a KV budget of ``--kv-budget-mib`` holds, in the engine's units
(vLLM blocks, llama.cpp / mlx-lm 256-token steps). Ratios are to the first model at the same context.

Which engines cache the latent: each model's engine bytes per token are compared with the formulas of every
layout its attention can be served in (``evaluate/roofline.py``: GQA 2 H_kv d, MLA latent r + d_rope, MLA expanded
H (d_nope + d_rope + d_v) or with V padded 2 H (d_nope + d_rope); x layers x dtype bytes). The row names the layout
that matches, or says none does.

The roofline beside every decode figure: this machine's bandwidth and float32 GEMM FLOP/s (measured here, with
torch, on the engine's thread count), the bytes (weights + KV) and FLOPs (weights + the attention of the layout
the engine decodes in) of a step; the figure as a fraction of the best it could be and the bound it sits at.

Output: a table (printed), ``--json`` (rows, the KV checks, the machine, the command) and ``--plot``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..evaluate.roofline import AttentionShape, DecodeStep, Roofline, machine_summary, measure_machine
from ..io.folders import check_output_file, check_output_folder, check_source, machine_info, write_json
from .verify import run_driver, runtime_python

RUNTIMES = ("transformers", "llama.cpp", "vllm", "mlx")
BENCH_DRIVERS = {
    "transformers": "transformers_bench.py",
    "llama.cpp": "llama_cpp_bench.py",
    "vllm": "vllm_bench.py",
    "mlx": "mlx_bench.py",
}
WEIGHT_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_k_m")
KV_TYPES = ("f16", "f32", "q8_0")
#: the cache layout each attention form's formula describes
LAYOUT_NAMES = {
    "heads": "heads",
    "absorbed": "latent",
    "expanded": "expanded",
    "expanded_padded": "expanded, V padded",
}
DTYPE_BYTES = {"f32": 4, "float32": 4, "f16": 2, "float16": 2, "bf16": 2, "bfloat16": 2, "q8_0": 34 / 32}


@dataclass
class BenchArguments:
    # typed per item: HfArgumentParser gives the list (nargs *), so --random-weights needs no folder
    models: str = field(
        default_factory=list,
        metadata={"nargs": "*", "help": "checkpoint folders; the first is the baseline of every ratio"},
    )
    runtime: str = field(default="transformers", metadata={"help": f"engine: {' | '.join(RUNTIMES)}"})
    context: list[str] = field(
        default_factory=lambda: ["4096"],
        metadata={"help": "prompt tokens before decoding (several: 4096 16384)"},
    )
    batch: int = field(default=1, metadata={"help": "sequences decoded at once (each its own prompt)"})
    new_tokens: int = field(default=16, metadata={"help": "decode steps timed per round"})
    repeats: int = field(default=2, metadata={"help": "decode rounds per prefill (the median is reported)"})
    kv_budget_mib: float = field(
        default=1024.0,
        metadata={"help": "KV memory for the 'most sequences / longest context that fit' columns"},
    )
    threads: int | None = field(default=None, metadata={"help": "engine threads (default: all cores)"})
    python: str | None = field(
        default=None,
        metadata={"help": "interpreter with the engine (default: its venv of install_runtimes.sh)"},
    )
    dtype: str = field(
        default="float32", metadata={"help": "transformers / vLLM / mlx-lm: float32 | bfloat16 | auto"}
    )
    attn_implementation: str | None = field(
        default=None, metadata={"help": "transformers: e.g. sdpa, latent_sdpa"}
    )
    cache: str = field(default="auto", metadata={"help": "transformers: auto | latent | dynamic"})
    weight_type: str = field(default="q8_0", metadata={"help": f"llama.cpp GGUF: {' | '.join(WEIGHT_TYPES)}"})
    kv_type: str = field(default="f16", metadata={"help": f"llama.cpp KV cache: {' | '.join(KV_TYPES)}"})
    flash_attn: bool = field(default=False, metadata={"help": "llama.cpp: flash attention on (default off)"})
    ubatch: int = field(default=512, metadata={"help": "llama.cpp: prefill chunk (n_batch = n_ubatch)"})
    profile: bool = field(
        default=False, metadata={"help": "llama.cpp: time every graph node of a decode step"}
    )
    vllm_backend: str = field(
        default="auto",
        metadata={"help": "vLLM on MLA folders: auto | mla | mla-disabled (VLLM_MLA_DISABLE=1)"},
    )
    random_weights: str | None = field(
        default=None,
        metadata={"help": "build random-weight models of a real shape: llama2-7b | llama3-8b | qwen2.5-7b"},
    )
    layers: int = field(default=2, metadata={"help": "--random-weights: decoder layers"})
    mla: list[str] = field(
        default_factory=list,
        metadata={
            "help": "--random-weights: MLA exports RANK+ROPE[:PADRANK+PADROPE] (default 448+64:512+64 256+64)"
        },
    )
    kv_budget: list[str] = field(
        default_factory=list,
        metadata={"help": "--random-weights: MLA exports at these KV budgets (0.0625 or 512)"},
    )
    pad: str = field(
        default="512+64", metadata={"help": "--kv-budget exports also padded to this size ('' for none)"}
    )
    workdir: str = field(
        default="runs/bench", metadata={"help": "random-weight models and GGUF files are kept here"}
    )
    json: str | None = field(
        default=None, metadata={"help": "write rows, checks and machine here", "metavar": "OUT"}
    )
    plot: str | None = field(default=None, metadata={"help": "write the figure (PNG) here", "metavar": "OUT"})

    def __post_init__(self):
        self.models = [self.models] if isinstance(self.models, str) else list(self.models)
        self.context = parse_contexts(self.context)
        _choice("--runtime", self.runtime, RUNTIMES)
        _choice("--weight-type", self.weight_type, WEIGHT_TYPES)
        _choice("--kv-type", self.kv_type, KV_TYPES)
        _choice("--vllm-backend", self.vllm_backend, ("auto", "mla", "mla-disabled"))
        for name in ("batch", "new_tokens", "repeats", "layers", "ubatch"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"--threads must be at least 1, got {self.threads}")
        if not (math.isfinite(self.kv_budget_mib) and self.kv_budget_mib > 0):
            raise ValueError(f"--kv-budget-mib must be a number > 0, got {self.kv_budget_mib}")
        _choice("--dtype", self.dtype, ("float32", "bfloat16", "float16", "auto"))
        _choice("--cache", self.cache, ("auto", "latent", "dynamic"))
        if not self.models and not self.random_weights:
            raise ValueError("give at least one MODEL folder or --random-weights SHAPE")
        if (self.mla or self.kv_budget) and not self.random_weights:
            raise ValueError("--mla and --kv-budget choose the exports of --random-weights: give it too")
        for path, flag in ((self.json, "--json"), (self.plot, "--plot")):
            if path is not None:
                check_output_file(path, flag)
        check_output_folder(self.workdir, "--workdir")
        if self.random_weights:
            from ..methods.mla.budget import parse_kv_budget
            from .bench_models import SHAPES, MLAShape

            _choice("--random-weights", self.random_weights, tuple(SHAPES))
            for spec in self.mla:
                MLAShape.parse(spec)
            if self.pad:
                pad = MLAShape.parse(self.pad, "--pad")
                if pad.pad_rank is not None:
                    raise ValueError(f"--pad {self.pad!r}: write RANK+ROPE, e.g. 512+64")
            for budget in self.kv_budget:
                parse_kv_budget(budget)


def _choice(flag: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{flag} must be one of {', '.join(choices)}, got {value!r}")


def parse_contexts(values) -> list[int]:
    """``["4096", "16384,32768"]`` -> [4096, 16384, 32768]; each a whole number >= 1."""
    contexts = []
    for text in [values] if isinstance(values, (str, int)) else values:
        for part in str(text).replace(",", " ").split():
            if not part.lstrip("-").isdigit() or int(part) < 1:
                raise ValueError(f"--context must be whole numbers of tokens >= 1, got {part!r}")
            contexts.append(int(part))
    if not contexts:
        raise ValueError("--context needs at least one length")
    return contexts


# ---- the models ---------------------------------------------------------------------------------------------


def bench_models(args: BenchArguments) -> list[tuple[str, Path]]:
    """[(name, folder)]: the random-weight models (original first, then its MLA exports), then the folders."""
    from .bench_models import MLAShape, mla_exports, random_model

    folders = [check_source(path) for path in args.models]  # bad paths fail before any model is built
    models = []
    if args.random_weights:
        source = random_model(args.random_weights, args.layers, args.workdir)
        specs = args.mla or ([] if args.kv_budget else ["448+64:512+64", "256+64"])
        pad = MLAShape.parse(args.pad, "--pad") if args.pad else None
        exports = mla_exports(source, [MLAShape.parse(s) for s in specs], args.kv_budget, pad)
        models += [(f"{args.random_weights} L{args.layers} original", source), *exports]
    models += [(folder.name, folder) for folder in folders]
    names = [n for n, _ in models]
    return [(n if names.count(n) == 1 else f"{n} #{i}", f) for i, (n, f) in enumerate(models)]


def gguf_path(folder: Path, weight_type: str, workdir: str) -> Path:
    """Where the GGUF of ``folder`` is kept: keyed by its path, config and weight files (sizes, times)."""
    digest = hashlib.sha256(str(folder.resolve()).encode())
    for file in sorted(folder.glob("*.json")) + sorted(folder.glob("*.safetensors")):
        stat = file.stat()
        digest.update(f"{file.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return (
        Path(workdir).expanduser().resolve()
        / "gguf"
        / f"{folder.name}-{digest.hexdigest()[:12]}.{weight_type}.gguf"
    )


def driver_options(args: BenchArguments, config: dict) -> dict:
    """What the engine's driver is told (the flags that apply to it)."""
    threads = args.threads or os.cpu_count()
    if args.runtime == "llama.cpp":
        return {"weight_type": args.weight_type, "kv_type": args.kv_type, "flash_attn": args.flash_attn,
                "ubatch": args.ubatch, "threads": threads, "profile": args.profile}  # fmt: skip
    if args.runtime == "transformers":
        return {"dtype": args.dtype, "attn_implementation": args.attn_implementation, "cache": args.cache,
                "threads": threads}  # fmt: skip
    if args.runtime == "vllm":
        need = _kv_upper_bound(config, args) / 2**30
        return {"dtype": args.dtype, "mla_disable": vllm_mla_disabled(config, args.vllm_backend),
                "kv_space_gib": max(1, math.ceil(need * 1.25))}  # fmt: skip
    return {"dtype": args.dtype}


def vllm_mla_disabled(config: dict, backend: str) -> bool:
    """Whether vLLM runs an MLA folder expanded (``VLLM_MLA_DISABLE=1``): asked for, or ``auto`` and a latent
    other than 512 + rope 64 (the only size its CPU_MLA kernel takes)."""
    if not config.get("model_type", "").startswith("deepseek") or backend == "mla":
        return False
    kernel_sized = config.get("kv_lora_rank") == 512 and config.get("qk_rope_head_dim") == 64
    return backend == "mla-disabled" or not kernel_sized


def _kv_upper_bound(config: dict, args: BenchArguments) -> float:
    """Bytes of the largest cache a run needs, in float32 and the expanded layout (vLLM's KV pool size)."""
    shape = AttentionShape.from_config(config)
    values = max(shape.kv_values(form) for form in shape.layouts())
    return values * shape.layers * 4 * args.batch * (max(args.context) + args.new_tokens + 16)


def run_engine(args: BenchArguments, name: str, folder: Path, python: Path) -> list[dict]:
    """One driver process for one model: its runs (one per context)."""
    config = json.loads((folder / "config.json").read_text())
    model = {"name": name, "path": str(folder.resolve())}
    if args.runtime == "llama.cpp":
        model["gguf"] = str(gguf_path(folder, args.weight_type, args.workdir))
    request = {
        "models": [model], "contexts": args.context, "batch": args.batch, "new_tokens": args.new_tokens,
        "repeats": args.repeats, "seed": 0, "options": driver_options(args, config),
    }  # fmt: skip
    response = run_driver(args.runtime, python, request, driver=BENCH_DRIVERS[args.runtime])
    for run in response["runs"]:
        run.update(
            version=response.get("version"), notes=response.get("notes", []), options=request["options"]
        )
    return response["runs"]


# ---- rows: ratios, KV checks, budget, roofline ----------------------------------------------------------------


def kv_check(shape: AttentionShape, measured: float, dtype_bytes: float, attention: str | None) -> dict:
    """Which layout the engine's bytes per token match (formula x layers x dtype bytes), and the attention form
    it decodes in (told by the driver, else by the layout: a latent cache without absorption is re-expanded)."""
    formulas = {form: shape.kv_bytes_per_token(form, dtype_bytes) for form in shape.layouts()}
    layout = next((form for form, value in formulas.items() if abs(value - measured) < 0.5), None)
    if attention is None:
        attention = {"absorbed": "reexpand", None: "absorbed" if shape.is_mla else "heads"}.get(
            layout, layout
        )
    expected = "absorbed" if attention in ("absorbed", "reexpand") else attention
    return {
        "kv_layout": LAYOUT_NAMES.get(layout, "no formula"),
        "kv_formula_bytes_per_token": formulas[expected],
        "kv_matches_formula": layout == expected,
        "kv_formulas": {LAYOUT_NAMES[form]: value for form, value in formulas.items()},
        "attention": attention,
    }


def kv_dtype(run: dict, args: BenchArguments) -> str:
    if args.runtime == "llama.cpp":
        return run["kv"].get("k_type") or args.kv_type
    if args.runtime == "vllm":
        return run["kv"]["groups"][0]["dtype"].removeprefix("torch.")
    return run["weights"].get("dtype") or args.dtype


def make_row(run: dict, config: dict, args: BenchArguments, roofline: Roofline) -> dict:
    """One table row from a driver run: speeds, KV (engine, formula, budget) and the roofline."""
    row = {k: run.get(k) for k in ("model", "context", "batch", "error", "version", "notes", "options")}
    row.update(runtime=args.runtime, path=run.get("path"))
    if run.get("error"):
        return row
    shape = AttentionShape.from_config(config)
    context, batch = run["context"], run["batch"]
    decode = statistics.median(run["decode_seconds"])
    dtype = kv_dtype(run, args)
    per_token = run["kv"]["bytes_per_token"]
    row.update(
        prefill_seconds=run["prefill_seconds"],
        prefill_tokens_per_second=batch * context / run["prefill_seconds"],
        decode_seconds=decode,
        decode_rounds=run["decode_seconds"],
        decode_tokens_per_second=batch * args.new_tokens / decode,
        decode_tokens_per_second_best=batch * args.new_tokens / min(run["decode_seconds"]),
        kv_bytes_per_token=per_token,
        kv_mib=per_token * context * batch / 2**20,
        kv_dtype=dtype,
        kv_source=run["kv"].get("source"),
        kv_engine=run["kv"],
        weights=run["weights"],
        engine=run.get("engine", {}),
        profile=run.get("profile"),
        peak_rss_mib=run.get("peak_rss_mib"),
        **kv_check(shape, per_token, DTYPE_BYTES.get(dtype, 4), run.get("attention")),
        **budget_fit(per_token, context, batch, args, run["kv"].get("granularity_tokens")),
    )
    step = DecodeStep(shape, row["attention"], context + (args.new_tokens + 1) / 2, batch,
                      run["weights"]["bytes"] or 0, run["weights"]["values"] or 0, per_token,
                      DTYPE_BYTES.get(dtype, 4))  # fmt: skip
    row.update(roofline.row(step, row["decode_tokens_per_second"]))
    return row


def budget_fit(per_token: float, context: int, batch: int, args: BenchArguments, granularity=None) -> dict:
    """The most sequences of ``context`` (+ new tokens) tokens and the longest context for ``batch`` sequences
    that ``--kv-budget-mib`` holds, the engine's cache growing ``granularity`` tokens at a time."""
    step = granularity or {"llama.cpp": 256, "mlx": 256}.get(args.runtime, 1)
    budget = args.kv_budget_mib * 2**20
    tokens = math.ceil((context + args.new_tokens) / step) * step
    longest = int(budget / (per_token * batch) // step * step) if per_token else None
    return {
        "max_batch_at_budget": int(budget // (per_token * tokens)) if per_token else None,
        "max_context_at_budget": longest,
        "kv_budget_mib": args.kv_budget_mib,
        "kv_granularity_tokens": step,
    }


def add_ratios(rows: list[dict]) -> None:
    """Each row's figures over the first model's at the same context (``x_*``)."""
    keys = {"decode_tokens_per_second": "x_decode", "prefill_tokens_per_second": "x_prefill",
            "kv_bytes_per_token": "x_kv", "max_batch_at_budget": "x_max_batch"}  # fmt: skip
    for row in rows:
        base = next((r for r in rows if r["context"] == row["context"] and not r.get("error")), None)
        for key, ratio in keys.items():
            if row.get(key) is not None and base and base.get(key):
                row[ratio] = row[key] / base[key]


# ---- output -------------------------------------------------------------------------------------------------


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def bench_table(rows: list[dict]) -> str:
    """The markdown table: speed, KV and roofline per model and context."""
    budget = f"{rows[0]['kv_budget_mib']:g}" if rows else "?"
    lines = [
        f"| context | model | caches | KV MiB | x KV | prefill tok/s | x | decode tok/s | x | roofline tok/s "
        f"(bound) | % of roofline | max seqs @ {budget} MiB | x |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.get("error"):
            lines.append(
                f"| {r['context']} | {r['model']} | error: {r['error'].splitlines()[0][:150]} |" + " |" * 10
            )
            continue
        check = "=" if r["kv_matches_formula"] else "≠"
        lines.append(
            f"| {r['context']} | {r['model']} | {r['kv_layout']} {_fmt(r['kv_bytes_per_token'], 6)} B/tok "
            f"({check} formula) | {_fmt(r['kv_mib'])} | {_fmt(r.get('x_kv'))} | "
            f"{_fmt(r['prefill_tokens_per_second'])} | {_fmt(r.get('x_prefill'))} | "
            f"{_fmt(r['decode_tokens_per_second'])} | {_fmt(r.get('x_decode'))} | "
            f"{_fmt(r['roofline_tokens_per_second'])} ({r['roofline_bound']}) | "
            f"{100 * r['roofline_fraction']:.0f} % | {_fmt(r['max_batch_at_budget'])} | {_fmt(r.get('x_max_batch'))} |"
        )
    return "\n".join(lines)


def profile_table(rows: list[dict], top: int = 8) -> str:
    """llama.cpp ``--profile``: the costliest graph nodes of a decode step per model and context."""
    lines = [
        "| context | model | node | ms / step | share | GFLOP/s | GB/s touched |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        profile = r.get("profile")
        if not profile:
            continue
        total = sum(n["seconds"] for n in profile["nodes"])
        for node in profile["nodes"][:top]:
            rate = node["flops"] / node["seconds"] / 1e9 if node["flops"] and node["seconds"] else None
            traffic = node.get("bytes", 0) / node["seconds"] / 1e9 if node["seconds"] else None
            lines.append(
                f"| {r['context']} | {r['model']} | {node['node']} | {1000 * node['seconds']:.3g} | "
                f"{100 * node['seconds'] / total:.0f} % | {_fmt(rate)} | {_fmt(traffic)} |"
            )
    return "\n".join(lines) if len(lines) > 2 else ""


def run_bench(args: BenchArguments) -> int:
    # a missing venv fails here, naming the install command, before any model is built
    python = runtime_python(args.runtime, args.python)
    models = bench_models(args)
    machine = measure_machine(args.threads or os.cpu_count())
    print(machine_summary(machine), flush=True)
    roofline = Roofline(machine["bandwidth"], machine["flops"])
    rows = []
    for name, folder in models:
        config = json.loads((folder / "config.json").read_text())
        try:
            runs = run_engine(args, name, folder, python)
        except RuntimeError as err:  # the driver died (e.g. out of memory): the other models still run
            runs = [
                {"model": name, "context": c, "batch": args.batch, "error": str(err)} for c in args.context
            ]
        for run in runs:
            run["path"] = str(folder)
            rows.append(make_row(run, config, args, roofline))
            print(_progress(rows[-1]), flush=True)
    add_ratios(rows)
    table = bench_table(rows)
    print("\n" + table)
    profile = profile_table(rows)
    if profile:
        print("\n" + profile)
    payload = {"runtime": args.runtime, "rows": rows, "table": table, "profile_table": profile,
               "roofline": machine, "command": [sys.executable, *sys.argv],
               "machine": {**machine_info(), "load_average": os.getloadavg()}}  # fmt: skip
    if args.json:
        print(f"wrote {write_json(args.json, payload)}")
    if args.plot:
        from ..evaluate.plots import plot_serving

        print(f"wrote {plot_serving(rows, args.plot)}")
    return 1 if any(r.get("error") for r in rows) else 0


def _progress(row: dict) -> str:
    if row.get("error"):
        return f"{row['model']} @ {row['context']}: error: {row['error'].splitlines()[0]}"
    return (
        f"{row['model']} @ {row['context']}: prefill {row['prefill_tokens_per_second']:.1f} tok/s, decode "
        f"{row['decode_tokens_per_second']:.2f} tok/s ({100 * row['roofline_fraction']:.0f} % of the "
        f"{row['roofline_bound']} roofline), KV {row['kv_bytes_per_token']:.0f} B/token ({row['kv_layout']})"
    )
