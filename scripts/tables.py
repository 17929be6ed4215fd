"""Every results table of README.md and docs/ is generated here, from the JSON committed under results/.

A table lives in a markdown file between two markers::

    <!-- table:NAME -->
    ... generated: provenance, freshness, the table ...
    <!-- /table:NAME -->

``python3 scripts/tables.py`` rewrites every such block from ``TABLES[NAME]``; ``--check`` writes nothing and exits
1 naming the blocks that differ from what their JSON gives (``tests/test_tables.py`` runs it in the default suite).
Each block says where its figures come from: the JSON file, and from inside it the machine, commit and command.

Freshness: a table names the code that produced its figures (``producers``: the benchmark script and the modules it
measures). When git has a commit touching a producer that the JSON's recorded commit does not contain (or, for a
JSON that recorded no commit, a commit made after the time it was written, ``provenance.written``), the block is
marked **Stale**. A JSON under results/ that is missing makes the block say "pending: no generating JSON yet" and
how to make it. ``results/archive/*.json`` hold tables transcribed from earlier README versions whose own run JSON
was not kept; their blocks say so ("Archived") and are never called current.

Adding a table: put the benchmark's JSON under results/ (``python3 scripts/tables.py --add runs/x.json results/y.json``
copies it and records when and from where), add a ``Table`` to ``TABLES`` with a renderer, and the two markers to a
page. Stdlib only: it runs without torch.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGES = ("README.md", "docs")
BLOCK = re.compile(r"(<!-- table:([\w.-]+) -->\n)(.*?)(<!-- /table:\2 -->)", re.S)
FRESHNESS_PREFIXES = ("> Freshness:", "> **Stale**")  # lines that depend on git history (ignored without git)


# ----------------------------------------------------------------------------------------------- formatting


def fmt(value) -> str:
    """A table cell: 4 significant digits for floats, integers as they are, "—" for missing."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.3e}"
    return str(value).replace("|", "\\|")


def markdown(columns: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return lines + ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]


def command_text(command) -> str:
    """The recorded command as one line (the interpreter's path dropped)."""
    if isinstance(command, str):
        return command
    parts = [str(p) for p in command or []]
    if parts and re.search(r"(^|/)python[\d.]*$", parts[0]):
        parts = parts[1:]
    quoted = [p if re.fullmatch(r"[\w@%+=:,./-]+", p) else f"'{p}'" for p in parts]
    return " ".join(quoted)


def machine_text(machine) -> str:
    if isinstance(machine, str):
        return machine
    if not machine:
        return "not recorded"
    cores = (
        f"{machine.get('cpu_count')} CPU cores ({machine.get('processor')})"
        if machine.get("cpu_count")
        else ""
    )
    threads = f"{machine['torch_threads']} torch threads" if machine.get("torch_threads") else ""
    parts = [cores, f"torch {machine.get('torch')}", f"transformers {machine.get('transformers')}", threads]
    return ", ".join(p for p in parts if p and "None" not in p)


# ----------------------------------------------------------------------------------------------- provenance


@dataclass(frozen=True)
class Source:
    """One JSON under results/ and what it says about itself."""

    path: str
    data: dict | None

    @property
    def commit(self) -> str | None:
        data = self.data or {}
        machine = data.get("machine")
        return data.get("commit") or (machine.get("commit") if isinstance(machine, dict) else None)

    @property
    def written(self) -> str | None:
        return ((self.data or {}).get("provenance") or {}).get("written")

    def describe(self) -> str:
        data = self.data or {}
        commit = (
            self.commit[:7]
            if self.commit
            else f"not recorded (written {self.written or 'at an unknown time'})"
        )
        return (
            f"`{self.path}` — machine: {machine_text(data.get('machine'))}; commit: {commit}; "
            f"command: `{command_text(data.get('command'))}`"
        )


def load(path: str) -> Source:
    file = ROOT / path
    return Source(path, json.loads(file.read_text()) if file.exists() else None)


def git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def has_git() -> bool:
    return git("rev-parse", "--verify", "HEAD") is not None


def freshness(source: Source, producers: tuple[str, ...]) -> str:
    """One line: fresh, stale, or unknown, judged by the JSON's commit (or its written time) against the last
    commit touching ``producers``."""
    paths = ", ".join(f"`{p}`" for p in producers)
    last = git("log", "-1", "--format=%H %cI", "--", *producers)
    if not last:
        return f"> Freshness: unknown (no git history of {paths} here)."
    last_commit, last_time = last.split()
    if source.commit:
        known = git("cat-file", "-e", f"{source.commit}^{{commit}}") is not None
        if not known:
            return f"> Freshness: unknown (commit {source.commit[:7]} is not in this repository)."
        stale = git("merge-base", "--is-ancestor", last_commit, source.commit) is None
    elif source.written:
        stale = _parse_time(last_time) > _parse_time(source.written)
    else:
        return "> Freshness: unknown (the JSON records neither its commit nor when it was written)."
    if stale:
        return f"> **Stale** — {paths} changed after this JSON was produced: rerun its command and copy the JSON here."
    return f"> Freshness: no commit to {paths} after this JSON."


def _parse_time(text: str) -> datetime.datetime:
    value = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    return value if value.tzinfo else value.replace(tzinfo=datetime.timezone.utc)


# ----------------------------------------------------------------------------------------------- tables


@dataclass(frozen=True)
class Table:
    """A generated table: its JSON ``sources`` (under results/), a ``render(sources) -> lines`` and the code that
    produced the figures (``producers``, for freshness). ``how``: how to make a missing JSON (one text, or one per
    source path)."""

    sources: tuple[str, ...]
    render: Callable[[list[Source]], list[str]]
    producers: tuple[str, ...] = ()
    how: str | dict[str, str] = ""
    archived: bool = False


def block(name: str, table: Table, with_git: bool) -> str:
    """The generated text between the markers of table ``name``."""
    sources = [load(p) for p in table.sources]
    if table.archived:
        return "\n".join([*archive_header(sources[0]), "", *table.render(sources)]) + "\n"
    lines = []
    for source in sources:
        if source.data is None:
            how = table.how.get(source.path, "") if isinstance(table.how, dict) else table.how
            lines.append(f"> Pending: no generating JSON yet (`{source.path}`). To make it: {how}")
            continue
        lines.append(f"> Source: {source.describe()}")
        if with_git:
            lines.append(freshness(source, table.producers))
    return "\n>\n".join(lines) + "\n\n" + "\n".join(table.render(sources)) + "\n"


def archive_header(source: Source) -> list[str]:
    data = source.data or {}
    return [
        f"> **Archived** (`{source.path}`): {data.get('what', '')} {data.get('source', '')} "
        f"Measured {data.get('measured', '?')}; "
        f"machine: {machine_text(data.get('machine'))}; command: `{command_text(data.get('command'))}`. "
        "Not regenerated since: read it as history, not as a current figure."
    ]


def render_archive(sources: list[Source]) -> list[str]:
    data = sources[0].data or {}
    return markdown(data.get("columns", []), data.get("rows", []))


# --- README: the one current table (the main job on both packaged models) --------------------------------------

CURRENT_COLUMNS = [
    "model",
    "conversion",
    "KV bytes/token (measured)",
    "KV vs original",
    "perplexity",
    "KL to original (nats)",
    "top-1 agreement",
    "scored tokens",
    "engines verified",
]
RUNTIMES_JSON = "results/runtimes.json"


def render_current(sources: list[Source]) -> list[str]:
    """Rows of the main job (``hf-attn-swap demo`` JSON, or ``scripts/compare_peers.py`` JSON: the original and
    this project's rows), one group per source; a missing source is one pending row."""
    engines = _engines(load(RUNTIMES_JSON))
    rows = []
    for source in sources:
        if source.path == RUNTIMES_JSON:
            continue
        label = Path(source.path).stem.removeprefix("main_")
        if source.data is None:
            rows.append([label, f"pending: no generating JSON yet (`{source.path}`)", *["—"] * 7])
            continue
        seen = {(row[0], row[4]) for row in rows if str(row[1]).startswith("original")}
        rows += [  # a second JSON of the same model and text (e.g. the Qwen GQA demo) repeats its original
            row
            for row in _current_rows(source.data, label, engines)
            if not (str(row[1]).startswith("original") and (row[0], row[4]) in seen)
        ]
    return markdown(CURRENT_COLUMNS, rows)


def _current_rows(data: dict, label: str, engines: dict[str, list[str]] | None) -> list[list]:
    """(model, conversion, KV bytes, change, perplexity, KL, top-1, scored tokens, engines) per row of one JSON."""
    model = data.get("model", label)
    if "results" in data:  # hf-attn-swap demo
        items = [
            (name, r.get("kv_cache_bytes_per_token"), r.get("perplexity"), r.get("kl_to_reference"),
             r.get("top1_agreement"), r.get("tokens"), None)
            for name, r in data["results"].items()
        ]  # fmt: skip
    else:  # scripts/compare_peers.py: its original and this project's rows, on the tutorial text
        tokens = ((data.get("texts") or {}).get("tutorial") or {}).get("tokens")
        items = [
            (r["method"] + (f", {r['split']}" if r.get("split", "—") != "—" else ""), r.get("kv_cache_bytes_per_token"),
             r.get("tutorial_perplexity"), r.get("tutorial_kl"), r.get("tutorial_top1"), tokens, r.get("kv_values"))
            for r in data.get("rows", [])
            if r["method"].startswith(("original", "this project"))
        ]  # fmt: skip
    base = items[0][1] if items else None
    rows = []
    for name, kv, ppl, kl, top1, tokens, kv_values in items:
        change = f"{100 * (kv / base - 1):+.2f} %" if kv and base and kv != base else "—"
        rows.append([model, name, kv, change, ppl, kl, top1, tokens, _verified(engines, model, name, kv_values)])
    return rows


def _engines(source: Source) -> dict[str, list[str]] | None:
    """model -> engines whose check passed, from ``results/runtimes.json`` (rows: runtime, model, verdict)."""
    if source.data is None:
        return None
    passed: dict[str, list[str]] = {}
    for row in source.data.get("rows", []):
        if row.get("verdict") == "pass":
            runtime = str(row.get("runtime", "")).split()[0]
            passed.setdefault(row.get("model"), [])
            if runtime not in passed[row.get("model")]:
                passed[row.get("model")].append(runtime)
    return passed


def _verified(engines: dict[str, list[str]] | None, model: str, name: str, kv_values: int | None = None) -> str:
    """Engines that passed ``verify`` on this row's folder: ``MODEL[-mla|-mqa]``, or for a compare_peers row at
    several budgets ``MODEL-mla-<KV values>`` (only the budget whose folder was verified)."""
    if engines is None:
        return f"pending (`{RUNTIMES_JSON}`)"
    kind = "-mla" if "MLA" in name or "this project" in name else "-mqa" if "1 KV head" in name else ""
    key = f"{model}{kind}-{kv_values}" if kind and kv_values else f"{model}{kind}"
    return ", ".join(engines.get(key, [])) or "—"


# --- MLA against the peers (scripts/compare_peers.py) ------------------------------------------------------------


def render_peers(sources: list[Source]) -> list[str]:
    """compare_peers rows; a later source's row replaces an earlier one with the same ``key`` (a rerun of one
    method after its code changed), new keys are added, KV values descending."""
    data = next((s.data for s in sources if s.data), None)
    if data is None:
        return []
    merged: dict[str, dict] = {}
    for source in sources:
        for row in (source.data or {}).get("rows", []):
            merged[row.get("key", row["method"])] = row
    ordered = sorted(merged.values(), key=lambda r: -(r.get("kv_values") or 0))
    other = Path((data.get("texts", {}).get("other") or {}).get("file", "other")).name
    columns = [
        "KV values / layer / token",
        "method",
        "split",
        "KV bytes/token (measured)",
        "perplexity, tutorial",
        "KL, tutorial",
        "top-1, tutorial",
        f"perplexity, {other}",
        f"KL, {other}",
    ]
    rows = [
        [
            r.get("kv_values"),
            r["method"],
            r.get("split"),
            r.get("kv_cache_bytes_per_token"),
            r.get("tutorial_perplexity"),
            r.get("tutorial_kl"),
            r.get("tutorial_top1"),
            r.get("other_perplexity"),
            r.get("other_kl"),
        ]
        for r in ordered
    ]
    return markdown(columns, rows)


# --- long context: eval --json shaped files (hf-attn-swap eval --task ..., scripts/compare_kvpress.py) -------------


def render_longcontext(sources: list[Source]) -> list[str]:
    """One row per model of every eval-shaped JSON: KV bytes, kept fraction (presses), accuracy per task and
    length."""
    models = {name: m for s in sources if s.data for name, m in s.data.get("models", {}).items()}
    if not models:
        return []
    keys = sorted(
        {
            (task, c["length"])
            for m in models.values()
            for task, t in (m.get("long_context") or {}).get("tasks", {}).items()
            for c in t.get("by_length", [])
        }
    )
    columns = [
        "model / press",
        "KV bytes/token",
        "kept share of tokens (per layer)",
        *[f"{t} acc. @ {n}" for t, n in keys],
    ]
    rows = []
    for name, m in models.items():
        tasks = (m.get("long_context") or {}).get("tasks", {})
        by = {(t, c["length"]): c["accuracy"] for t, v in tasks.items() for c in v.get("by_length", [])}
        kept = m.get("kept_fraction") or {}
        kept_text = f"{kept['min']:.4f}–{kept['max']:.4f}" if kept and kept.get("max", 1) < 1 else "all"
        kv = m.get("kv_cache_bytes_per_token")
        rows.append([name, round(kv) if kv else None, kept_text, *[by.get(k) for k in keys]])
    return markdown(columns, rows)


def render_longcontext_conversions(sources: list[Source]) -> list[str]:
    """Retrieval by length (``render_longcontext``) and perplexity by position bucket, one row per model."""
    lines = render_longcontext(sources)
    models = {name: m for s in sources if s.data for name, m in s.data.get("models", {}).items()}
    ppl = {n: (m.get("long_context") or {}).get("tasks", {}).get("ppl-position") for n, m in models.items()}
    ppl = {n: t for n, t in ppl.items() if t}
    if not ppl:
        return lines
    buckets = sorted({(b["start"], b["end"]) for t in ppl.values() for b in t["buckets"]})
    columns = ["model", *[f"ppl @ {a}–{b}" for a, b in buckets]]
    rows = [
        [name, *[{(b["start"], b["end"]): b["perplexity"] for b in t["buckets"]}.get(k) for k in buckets]]
        for name, t in ppl.items()
    ]
    return [*lines, "", *markdown(columns, rows)]


def render_prefill(sources: list[Source]) -> list[str]:
    """``scripts/bench_decode.py --prefill`` rows: prompt tokens/s per context and form, ratio to the original."""
    data = sources[0].data
    if not data:
        return []
    columns = ["context", "model / attention", "prefill tokens/s", "vs original", "vs absorbed"]
    rows = [
        [r["context"], r["name"], r["prefill_tokens_per_second"], r["vs_original"], r.get("vs_absorbed")]
        for r in data.get("rows", [])
    ]
    return markdown(columns, rows)


def render_bench(sources: list[Source]) -> list[str]:
    """``hf-attn-swap bench --json`` rows: what the engine caches, prefill / decode tokens/s against the roofline,
    sequences per KV budget; ratios to the first model."""
    if not any(s.data for s in sources):
        return []
    columns = ["context", "model", "engine caches (B/token)", "= formula", "prefill tok/s", "decode tok/s",
               "x decode", "roofline tok/s (bound)", "% of roofline", "KV MiB", "x KV",
               "sequences per KV budget"]  # fmt: skip
    rows = [
        [r["context"], r["model"], f"{r.get('kv_layout')} {fmt(r.get('kv_bytes_per_token'))}",
         r.get("kv_matches_formula"), r.get("prefill_tokens_per_second"), r.get("decode_tokens_per_second"),
         r.get("x_decode"), f"{fmt(r.get('roofline_tokens_per_second'))} ({r.get('roofline_bound')})",
         f"{100 * r['roofline_fraction']:.0f} %" if r.get("roofline_fraction") else None, r.get("kv_mib"),
         r.get("x_kv"), f"{r.get('max_batch_at_budget')} @ {fmt(r.get('kv_budget_mib'))} MiB"]
        for source in sources
        for r in (source.data or {}).get("rows", [])
        if not r.get("error")
    ]  # fmt: skip
    return markdown(columns, rows)


# --- GGUF quality (scripts/gguf_quality.py) ------------------------------------------------------------------------


def render_gguf(sources: list[Source]) -> list[str]:
    data = sources[0].data
    if data is None:
        return []
    files = data.get("files", {})
    columns = [
        "reference",
        "compared",
        "file MiB (compared)",
        "KL mean (nats/token)",
        "KL max",
        "top-1 agreement",
        "prompts with equal greedy tokens",
    ]
    rows = []
    for r in data.get("rows", []):
        size = (files.get(r["other"]) or {}).get("bytes")
        greedy = r.get("greedy") or {}
        rows.append(
            [
                r["reference"],
                r["other"],
                round(size / 2**20, 1) if size else None,
                r["kl"].get("kl_mean"),
                r["kl"].get("kl_max"),
                r["kl"].get("top1_agreement"),
                f"{greedy.get('tokens_equal')}/{greedy.get('prompts')}",
            ]
        )
    return markdown(columns, rows)


def archived(name: str) -> Table:
    return Table((f"results/archive/{name}.json",), render_archive, archived=True)


DEMO_HOW = (
    "`python3 -m hf_attn_swap demo {flags}--workdir runs/demo` (≈ 5 min on 2 CPU cores for SmolLM2), then "
    "`python3 scripts/tables.py --add runs/demo/demo.json {target}` and `python3 scripts/tables.py`."
)
MAIN_PRODUCERS = (
    "hf_attn_swap/pipeline/demo.py",
    "hf_attn_swap/methods",
    "hf_attn_swap/export",
    "hf_attn_swap/evaluate/metrics.py",
)
BENCH_PRODUCERS = ("hf_attn_swap/pipeline/bench.py", "hf_attn_swap/pipeline/bench_models.py",
                   "hf_attn_swap/evaluate/roofline.py")  # fmt: skip
MLA_PRODUCERS = ("scripts/compare_peers.py", "hf_attn_swap/methods/mla", "hf_attn_swap/export")
#: what a kvpress table depends on
KVPRESS_PRODUCERS = ("scripts/compare_kvpress.py", "hf_attn_swap/pipeline/compare_kvpress.py",
                     "hf_attn_swap/pipeline/drivers/kvpress_driver.py", "hf_attn_swap/evaluate/longcontext.py")  # fmt: skip
#: what a long-context table of converted models depends on (the uptrained one adds hf_attn_swap/uptrain)
LONGCONTEXT_PRODUCERS = ("hf_attn_swap/evaluate/longcontext.py", "hf_attn_swap/methods", "hf_attn_swap/export")

TABLES: dict[str, Table] = {
    "current": Table(
        ("results/main_smollm2.json", "results/main_qwen2.5-coder.json", "results/main_qwen2.5-coder_gqa.json",
         RUNTIMES_JSON),  # fmt: skip
        render_current,
        MAIN_PRODUCERS,
        how={
            "results/main_smollm2.json": DEMO_HOW.format(flags="", target="results/main_smollm2.json"),
            "results/main_qwen2.5-coder.json": DEMO_HOW.format(
                flags="--model qwen2.5-coder ", target="results/main_qwen2.5-coder.json"
            ).replace(
                "(≈ 5 min on 2 CPU cores for SmolLM2)",
                "(or `scripts/compare_peers.py --model qwen2.5-coder`'s JSON: its original and this-project rows)",
            ),
            "results/main_qwen2.5-coder_gqa.json": "`python3 -m hf_attn_swap demo --model qwen2.5-coder "
            "--mla-kv-budget none --max-tokens 4096 --workdir runs/demo-qwen` (GQA 2 -> 1 KV heads, `fit`; the "
            "Qwen MLA rows' protocol), then `python3 scripts/tables.py --add runs/demo-qwen/demo.json "
            "results/main_qwen2.5-coder_gqa.json`.",
            RUNTIMES_JSON: "`hf-attn-swap verify FOLDER --runtime vllm|llama.cpp|mlx` on the demo's output folders, "
            "then `python3 scripts/tables.py --verified smollm2-mla=runs/demo/smollm2-mla/verify.json ...` (model "
            "names: `smollm2`, `smollm2-mqa`, `smollm2-mla`; for a compare_peers JSON `qwen2.5-coder-mla-128`: KV "
            "values per token and layer).",
        },
    ),
    "mla_qwen_peers": Table(
        ("results/mla_qwen_peers.json", "results/mla_qwen_ours.json"),
        render_peers,
        MLA_PRODUCERS,
        how={
            "results/mla_qwen_peers.json": "`python3 scripts/compare_peers.py --model qwen2.5-coder --budgets 0.5 "
            "0.25 --json runs/mla/qwen_peers.json`.",
            "results/mla_qwen_ours.json": "`python3 scripts/compare_peers.py --model qwen2.5-coder --budgets 0.5 "
            "0.25 --methods 'this project (default)' --json runs/mla/qwen_ours.json` (its rows replace the "
            "first JSON's).",
        },
    ),
    "mla_smollm2_peers": Table(
        ("results/mla_smollm2_peers.json",),
        render_peers,
        MLA_PRODUCERS,
        how="`OMP_NUM_THREADS=2 python3 scripts/compare_peers.py --json runs/mla/peers.json` (≈ 47 min on 2 cores), "
        "then `python3 scripts/tables.py --add runs/mla/peers.json results/mla_smollm2_peers.json`.",
    ),
    "longcontext_kvpress_smollm2": Table(
        ("results/longcontext_kvpress_smollm2_2048.json",),
        render_longcontext,
        KVPRESS_PRODUCERS,
        how="`python3 scripts/compare_kvpress.py --model smollm2 --lengths 2048 --json runs/longcontext/kvpress.json`.",
    ),
    "longcontext_kvpress_qwen": Table(
        ("results/longcontext_kvpress_qwen2.5-coder.json",),
        render_longcontext,
        KVPRESS_PRODUCERS,
        how="`python3 scripts/compare_kvpress.py --model qwen2.5-coder --lengths 4096 8192 --depths 0.5 --trials 1 "
        "--keep 0.5 --json runs/longcontext/kvpress_qwen_keep0.5.json` (the prompts of the Qwen long-context table).",
    ),
    "longcontext_kvpress_qwen_depths": Table(
        ("results/longcontext_kvpress_qwen2.5-coder_4k_depths.json", "results/longcontext_qwen2.5-coder_4k_depths.json"),
        render_longcontext,
        (*KVPRESS_PRODUCERS, *LONGCONTEXT_PRODUCERS),
        how="`python3 scripts/compare_kvpress.py --model qwen2.5-coder --lengths 4096 --depths 0.1 0.5 0.9 --trials 1 "
        "--keep 0.5 --json runs/longcontext/kvpress_qwen_4k_depths.json` and `hf-attn-swap eval "
        "'MQA fit (-50%)=runs/demo-qwen/Qwen2.5-Coder-0.5B-Instruct-kv1-fit' 'MLA -50%=runs/qwen/qwen2.5-coder-mla' "
        "--task needle --lengths 4096 --depths 0.1 0.5 0.9 --trials 1 --max-tokens 1024 --attn-implementation auto --json "
        "runs/longcontext/qwen_4k_depths.json` (same prompts).",
    ),
    "longcontext_smollm2": Table(
        ("results/longcontext_smollm2.json",),
        render_longcontext_conversions,
        LONGCONTEXT_PRODUCERS,
        how="convert SmolLM2 with `--to mqa --method fit` and `--to mla --kv-budget 0.5 / 0.3125 / 0.125`, then "
        "`hf-attn-swap eval original=... NAME=FOLDER ... --task needle ppl-position --lengths 2048 4096 8192 "
        "--depths 0.1 0.5 0.9 --trials 2 --ppl-sequences 2 --max-tokens 1024 --attn-implementation auto --json "
        "runs/longcontext/smollm2.json`.",
    ),
    "longcontext_qwen": Table(
        ("results/longcontext_qwen2.5-coder.json",),
        render_longcontext_conversions,
        LONGCONTEXT_PRODUCERS,
        how="`hf-attn-swap eval original=$(hf-attn-swap example-model qwen2.5-coder) "
        "'MQA fit (-50%)=runs/demo-qwen/Qwen2.5-Coder-0.5B-Instruct-kv1-fit' 'MLA -50%=runs/qwen/qwen2.5-coder-mla' "
        "'MLA -75%=runs/qwen/qwen2.5-coder-mla-64' --task needle ppl-position --lengths 4096 8192 16384 --depths 0.5 "
        "--trials 1 --ppl-sequences 1 --ppl-bucket 2048 --max-tokens 1024 --attn-implementation auto --json "
        "runs/longcontext/qwen.json` (the exports: Qwen rows of the main table).",
    ),
    "longcontext_uptrain_smollm2": Table(
        ("results/longcontext_uptrain_smollm2.json",),
        render_longcontext_conversions,
        (*LONGCONTEXT_PRODUCERS, "hf_attn_swap/uptrain"),
        how="`hf-attn-swap eval original=SRC 'MLA -68.75%=runs/demo/SmolLM2-135M-Instruct-mla' 'MLA -68.75% "
        "uptrained=runs/uptrain-sweep/mla-0.3125-layerwise-64k-distill-32k' --task needle ppl-position --lengths "
        "2048 4096 8192 --depths 0.1 0.5 0.9 --trials 1 --ppl-sequences 1 --max-tokens 1024 --json "
        "runs/longcontext/v5/uptrained.json --plots runs/longcontext/v5/plots_uptrained` (25 min on 2 idle cores; 66 min shared).",
    ),
    "prefill_smollm2": Table(
        ("results/prefill_smollm2_4096.json",),
        render_prefill,
        ("scripts/bench_decode.py", "hf_attn_swap/modeling", "hf_attn_swap/evaluate/speed.py"),
        how="`python3 scripts/bench_decode.py --prefill --contexts 4096 --threads 2 --repeats 2 --mla "
        "runs/demo/SmolLM2-135M-Instruct-mla --json runs/bench/prefill_4096.json` (≈ 4 min on 2 idle cores).",
    ),
    "bench_llama2_llamacpp": Table(
        (
            "results/bench_llama2_llamacpp_4k.json",
            "results/bench_llama2_llamacpp_16k.json",
            "results/bench_llama2_llamacpp_32k.json",
        ),
        render_bench,
        (*BENCH_PRODUCERS, "hf_attn_swap/pipeline/drivers/llama_cpp_bench.py"),
        how="`hf-attn-swap bench --random-weights llama2-7b --layers 2 --mla 256+64 --pad '' --runtime llama.cpp "
        "--context 4096 --weight-type q8_0 --repeats 2 --threads 2 --json runs/bench/llama2_llamacpp_4k.json` "
        "(and --context 16384 --repeats 1; --context 32768 --mla 256+64 128+32 --repeats 1).",
    ),
    "bench_llama2_vllm": Table(
        ("results/bench_llama2_vllm_4k.json",),
        render_bench,
        (*BENCH_PRODUCERS, "hf_attn_swap/pipeline/drivers/vllm_bench.py"),
        how="`hf-attn-swap bench --random-weights llama2-7b --layers 2 --mla 448+64:512+64 --runtime vllm --context "
        "4096 --dtype bfloat16 --repeats 1 --new-tokens 8 --threads 2 --workdir runs/bench/shapes --json "
        "runs/bench/llama2_vllm_4k.json` (at 16384, CPU_MLA's prefill asks for 32 GiB).",
    ),
    "gguf_quality": Table(
        ("results/gguf_quality.json",),
        render_gguf,
        (
            "scripts/gguf_quality.py",
            "hf_attn_swap/pipeline/gguf.py",
            "hf_attn_swap/pipeline/drivers/gguf_driver.py",
            "hf_attn_swap/export",
        ),
        how="`python3 scripts/gguf_quality.py --json runs/gguf/gguf_quality.json`.",
    ),
    "uptrain_smollm2": Table(
        ("results/uptrain_smollm2.json",),
        render_archive,  # the JSON carries its columns and rows (scripts/uptrain_results.py --json)
        ("scripts/uptrain_sweep.sh", "scripts/uptrain_results.py", "hf_attn_swap/uptrain", "hf_attn_swap/methods",
         "hf_attn_swap/export", "hf_attn_swap/evaluate/metrics.py"),  # fmt: skip
        how="`bash scripts/uptrain_sweep.sh runs/uptrain-sweep` (2 h 13 min on 2 cores shared with other jobs), then `python3 scripts/tables.py "
        "--add runs/uptrain-sweep/uptrain.json results/uptrain_smollm2.json`.",
    ),
    "uptrain_qwen": Table(
        ("results/uptrain_qwen.json",),
        render_archive,  # as uptrain_smollm2
        ("scripts/uptrain_qwen.sh", "scripts/uptrain_results.py", "hf_attn_swap/uptrain", "hf_attn_swap/methods",
         "hf_attn_swap/export", "hf_attn_swap/evaluate/metrics.py"),  # fmt: skip
        how="`bash scripts/uptrain_qwen.sh runs/uptrain-qwen` (43 min on 2 cores shared with other jobs), then `python3 scripts/tables.py "
        "--add runs/uptrain-qwen/uptrain.json results/uptrain_qwen.json`.",
    ),
    "main_job_smollm2": Table(
        ("results/main_smollm2.json",),
        render_current,
        MAIN_PRODUCERS,
        how=DEMO_HOW.format(flags="", target="results/main_smollm2.json"),
    ),
    **{
        name: archived(name)
        for name in (
            "main_job_smollm2_2026-11-30",
            "gqa_methods_smollm2_2026-11-23",
            "gqa_minilm_2026-11-29",
            "mla_rope_factorization_2026-11-23",
            "mla_rope_dims_2026-11-23",
            "mla_variants_2026-11-23",
            "mla_screening_2026-11-29",
            "mla_attention_aware_2026-11-30",
            "mla_peers_smollm2_2026-11-30",
            "decode_speed_2026-11-23",
            "runtimes_vllm_2026-11-29",
            "runtimes_llama_cpp_2026-11-29",
            "runtimes_mlx_2026-11-29",
            "streaming_memory_2026-11-29",
            "streaming_projection_2026-11-29",
            "uptraining_previous_conversions_2026-11-23",
        )
    },
}


# ----------------------------------------------------------------------------------------------- driver


def pages() -> list[Path]:
    found = []
    for entry in PAGES:
        path = ROOT / entry
        found += sorted(path.rglob("*.md")) if path.is_dir() else [path] if path.exists() else []
    return found


def regenerate(text: str, with_git: bool, where: str) -> str:
    def replace(match: re.Match) -> str:
        name = match.group(2)
        if name not in TABLES:
            raise SystemExit(f"{where}: unknown table {name!r}; known: {sorted(TABLES)}")
        return match.group(1) + block(name, TABLES[name], with_git) + match.group(4)

    return BLOCK.sub(replace, text)


def _without_freshness(text: str) -> str:
    """``text`` without the lines that need git history (and the quote separators around them)."""
    keep = [line for line in text.splitlines() if not line.startswith(FRESHNESS_PREFIXES) and line != ">"]
    return "\n".join(keep)


def differing(with_git: bool | None = None) -> list[str]:
    """Files whose table blocks differ from what their JSON gives (freshness lines compared only with git)."""
    with_git = has_git() if with_git is None else with_git
    out = []
    for page in pages():
        text = page.read_text()
        new = regenerate(text, with_git, str(page.relative_to(ROOT)))
        same = new == text if with_git else _without_freshness(new) == _without_freshness(text)
        if not same:
            names = [m.group(2) for m in BLOCK.finditer(text) if m.group(0) not in new]
            out.append(f"{page.relative_to(ROOT)}: {', '.join(names) or 'tables'}")
    return out


def add(src: str, dest: str) -> Path:
    """Copy a benchmark's JSON into results/, recording where from and when it was written (file time, UTC)."""
    src_path, dest_path = Path(src), ROOT / dest
    data = json.loads(src_path.read_text())
    written = datetime.datetime.fromtimestamp(src_path.stat().st_mtime, datetime.timezone.utc)
    data["provenance"] = {"copied_from": str(src), "written": written.isoformat(timespec="seconds")}
    if not (data.get("commit") or (isinstance(data.get("machine"), dict) and data["machine"].get("commit"))):
        head = git("log", "-1", "--format=%H", f"--before={written.isoformat()}")
        data["provenance"]["note"] = (
            "the producer recorded no commit; freshness is judged by the time written"
            + (f" (HEAD then: {head[:7]}, plus any uncommitted changes)" if head else "")
        )
    dest_path.parent.mkdir(parents=True, exist_ok=True)
    dest_path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    return dest_path


def add_verified(pairs: list[str], dest: str = RUNTIMES_JSON) -> Path:
    """Merge ``hf-attn-swap verify`` results into ``results/runtimes.json``: ``pairs`` are MODEL=VERIFY_JSON
    (MODEL as the main table names it: ``smollm2-mla``, ``qwen2.5-coder-mqa``, ...); each runtime stored in that
    verify JSON gives one row (runtime, model, verdict, tokens equal, max |Δ log-prob|), replacing an earlier row
    of the same runtime and model."""
    path = ROOT / dest
    data = json.loads(path.read_text()) if path.exists() else {"rows": []}
    for pair in pairs:
        model, _, file = pair.partition("=")
        if not model or not file:
            raise SystemExit(f"--verified takes MODEL=VERIFY_JSON, got {pair!r}")
        runtimes = json.loads(Path(file).read_text()).get("runtimes", {})
        for runtime, result in runtimes.items():
            rows = [r for r in result.get("rows", []) if r.get("counts")]
            verdict = "pass" if rows and all(r.get("passed") for r in rows) else "fail"
            deltas = [r["max_dlogprob"] for r in rows if r.get("max_dlogprob") is not None]
            data["rows"] = [r for r in data["rows"] if (r["runtime"], r["model"]) != (runtime, model)]
            data["rows"].append({
                "runtime": runtime, "version": result.get("version"), "model": model, "verdict": verdict,
                "tokens_equal": f"{sum(r['tokens_equal'] for r in rows)}/{sum(r['prompts'] for r in rows)}",
                "max_dlogprob": max(deltas) if deltas else None, "folder": str(Path(file).parent),
            })  # fmt: skip
    data["commit"] = git("rev-parse", "HEAD")
    every = dict.fromkeys(f"{r['model']}={r['folder']}/verify.json" for r in data["rows"])  # all rows, in order
    data["command"] = "hf-attn-swap verify FOLDER --runtime R, per folder and runtime; " + command_text(
        ["scripts/tables.py", "--verified", *every]
    )
    data["machine"] = {"platform": platform.platform(), "processor": platform.machine(),
                       "cpu_count": os.cpu_count()}  # fmt: skip
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if a table differs")
    parser.add_argument(
        "--add", nargs=2, metavar=("RUN_JSON", "RESULTS_JSON"), help="copy a run's JSON to results/"
    )
    parser.add_argument(
        "--verified", nargs="+", metavar="MODEL=VERIFY_JSON", help=f"merge verify results into {RUNTIMES_JSON}"
    )
    args = parser.parse_args(argv)
    if args.verified:
        print(f"wrote {add_verified(args.verified)}")
    if args.add:
        print(f"wrote {add(*args.add)}")
    if args.check:
        bad = differing()
        for line in bad:
            print(f"stale table: {line} (run python3 scripts/tables.py)", file=sys.stderr)
        return 1 if bad else 0
    with_git = has_git()
    for page in pages():
        text = page.read_text()
        new = regenerate(text, with_git, str(page.relative_to(ROOT)))
        if new != text:
            page.write_text(new)
            print(f"updated {page.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
