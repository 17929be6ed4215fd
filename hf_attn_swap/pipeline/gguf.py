"""The ``hf-attn-swap gguf`` job: an HF folder (a stock ``deepseek_v3`` export, or any Llama/Qwen2 folder llama.cpp's
converter knows) -> one GGUF file llama.cpp loads, checked against transformers on the same folder.

How the file is made (``drivers/gguf_driver.py``, in the llama.cpp venv of ``scripts/install_runtimes.sh``):

- ``f32`` / ``f16`` / ``bf16``: llama.cpp's ``convert_hf_to_gguf.py --outtype`` (float types: the converter only
  casts), plus the ``deepseek2.attention.q_lora_rank = 0`` key its DeepSeek class omits for ``q_lora_rank: null``
  (without it llama.cpp refuses the file).
- ``q8_0`` / ``q4_k_m``: the f32 file, then llama.cpp's own quantiser ``llama_model_quantize`` (what
  ``llama-quantize`` runs: Q4_K_M's per-tensor mixture and its fallbacks for rows that are not a multiple of the
  block size). The converter's own ``--outtype q8_0`` is not used: one path for every block-quantised type.
- Every type: ``attn_kv_a_mqa.weight`` (``kv_a_proj_with_mqa``) and ``attn_kv_a_norm.weight`` (``kv_a_layernorm``)
  stay float32 (the converter's ``tensor_force_quant`` hook; the quantiser's per-tensor override
  ``tt_overrides``; read back with gguf-py and rewritten from the f32 file if a tool left them lower). The
  export's latent norm runs in its linear regime (``export/deepseek_v3.py``, item 1): latent rows scaled by
  kappa ~ 1e-8, norm weight sqrt(eps)/kappa ~ 1e5. float16 flushes those rows to zero (smallest subnormal 6e-8)
  and overflows the norm weight (max 65504); Q8_0 and the k-quants keep a float16 scale per block,
  max|w|/127 ~ 1e-10 for a latent row, which underflows to 0: the latent, so every k_nope and value, is zero.
  Measured on SmolLM2 at -68.75 % KV, 1023 tutorial tokens (``scripts/gguf_quality.py``): q8_0 without the
  override is KL 7.35 nats/token from its own f32 file (top-1 agreement 1.4 %, NLL 11.0 > ln 49152) and decodes
  "_---------------" where f32 decodes " a 100% of the original"; f16 without it, KL 9.60. With it, q8_0 is KL
  0.0039 from f32 (the original's q8_0: 0.0043), q4_k_m 0.044 (original: 0.055).

The check: the GGUF's greedy tokens (``llama_cpp.Llama``, float32 KV cache) on the prompts (``verify``'s
``DEFAULT_PROMPTS`` or ``--prompts``) against transformers' on the folder (tokens equal per prompt, first
divergence, max |Δ log-prob| up to it), and KL(transformers || GGUF) per token on the first ``--text-tokens``
of ``--text`` (default: the Python tutorial). A quantised file does not agree exactly: the numbers are printed,
stored in ``OUT.json`` next to the file, and the exit status is 0 unless ``--require-exact`` is given and a
prompt's greedy tokens differ (1; the file is kept). The GGUF is written in a hidden temporary folder next to
OUT (``.OUT.partial-*``, with the f32 intermediate) and renamed only when the check has run: an error leaves OUT
as it was and removes the folder.
"""

from __future__ import annotations

import shlex
import shutil
import tempfile
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch

from ..io.checkpoints import load_causal_lm, load_tokenizer
from ..io.folders import check_source, write_json
from ..io.text import PYTHON_DOCS, default_eval_files, load_token_ids
from .verify import compare, load_prompts, reference, run_driver, runtime_python, tokenize

#: GGUF types the command writes; the first three through the converter, the others through the quantiser
OUTTYPES = ("f32", "f16", "bf16", "q8_0", "q4_k_m")
CONVERTER_OUTTYPES = ("f32", "f16", "bf16")
GGUF_DRIVER = "gguf_driver.py"
INSTALL = "bash scripts/install_runtimes.sh llama.cpp"


@dataclass
class GGUFArguments:
    model: str = field(metadata={"help": "HF checkpoint folder (deepseek_v3 export, Llama, Qwen2, ...)"})
    out: str = field(metadata={"help": "GGUF file to write (the check goes to OUT.json)"})
    outtype: str = field(default="f32", metadata={"help": f"GGUF type: {' | '.join(OUTTYPES)}"})
    python: str | None = field(
        default=None,
        metadata={"help": "interpreter with llama-cpp-python and <prefix>/llama.cpp/convert_hf_to_gguf.py "
                  "(default: the llama.cpp venv of scripts/install_runtimes.sh)"},
    )  # fmt: skip
    prompts: str | None = field(
        default=None,
        metadata={"help": "text file, one prompt per line (default: 3 built-in English prompts)"},
    )
    max_new_tokens: int = field(default=16, metadata={"help": "greedy tokens compared per prompt"})
    text: str | None = field(
        default=None,
        metadata={
            "help": "text file or folder for the KL check (default: the Python tutorial, else the prompts)"
        },
    )
    text_tokens: int = field(default=256, metadata={"help": "tokens of --text scored (KL per token)"})
    require_exact: bool = field(
        default=False, metadata={"help": "exit 1 when a prompt's greedy tokens differ from transformers'"}
    )
    overwrite: bool = field(default=False, metadata={"help": "replace an existing OUT"})

    def __post_init__(self):
        if self.outtype not in OUTTYPES:
            raise ValueError(f"--outtype must be one of {', '.join(OUTTYPES)}, got {self.outtype!r}")
        if self.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens must be at least 1, got {self.max_new_tokens}")
        if self.text_tokens < 2:
            raise ValueError(f"--text-tokens must be at least 2, got {self.text_tokens}")


def llama_cpp_python(python: str | None = None) -> Path:
    """The interpreter that runs the GGUF driver; ``FileNotFoundError`` naming the install command when it or
    its converter is missing."""
    path = runtime_python("llama.cpp", python)
    converter = path.parent.parent / "llama.cpp" / "convert_hf_to_gguf.py"
    if not python and not converter.is_file():
        raise FileNotFoundError(f"no llama.cpp converter at {converter}: run `{INSTALL}`")
    return path


def gguf_steps(folder: Path, outfile: Path, outtype: str, work: Path, protect: bool = True) -> list[dict]:
    """The driver steps that write ``outfile``: the converter alone for float types, else converter to f32 in
    ``work`` and the quantiser. ``protect=False`` only to measure what the float32 override prevents. Paths are
    made absolute: the driver runs in a temporary working directory."""
    folder, outfile, work = Path(folder).resolve(), Path(outfile).resolve(), Path(work).resolve()
    if outtype in CONVERTER_OUTTYPES:
        return [{"op": "convert", "model": str(folder), "outfile": str(outfile), "outtype": outtype,
                 "protect": protect}]  # fmt: skip
    f32 = work / "model-f32.gguf"
    return [
        {"op": "convert", "model": str(folder), "outfile": str(f32), "outtype": "f32", "protect": protect},
        {
            "op": "quantize",
            "infile": str(f32),
            "outfile": str(outfile),
            "outtype": outtype,
            "protect": protect,
        },
    ]


def evaluate_step(gguf: Path, prompts: list[list[int]], max_new_tokens: int, text, logits_out: Path) -> dict:
    """The driver step that decodes ``prompts`` greedily and scores ``text`` (token ids) with ``gguf`` (absolute
    paths, as in ``gguf_steps``)."""
    gguf, logits_out = Path(gguf).resolve(), Path(logits_out).resolve()
    return {"op": "evaluate", "gguf": str(gguf), "prompts": prompts, "max_new_tokens": max_new_tokens,
            "text": list(text), "logits_out": str(logits_out)}  # fmt: skip


def run_gguf_driver(python: Path, steps: list[dict], timeout: float | None = None) -> dict:
    """Run ``steps`` in the GGUF driver; {version, steps: [records]}. A failed step raises ``RuntimeError``;
    a protected tensor (``attn_kv_a_*``) that ended below float32 after a protected step raises too."""
    response = run_driver("llama.cpp", python, {"steps": steps}, timeout, driver=GGUF_DRIVER)
    for step, record in zip(steps, response["steps"], strict=False):
        if record["error"]:
            tail = record.get("traceback", "").strip().splitlines()[-12:]
            raise RuntimeError(f"GGUF driver step {step['op']} failed: {record['error']}\n" + "\n".join(tail))
        low = {n: t for n, t in record.get("protected", {}).items() if t != "F32"}
        if step.get("protect", True) and low:
            raise RuntimeError(f"{step['op']} left protected tensors below float32: {low}")
    if len(response["steps"]) < len(steps):
        raise RuntimeError(
            f"the GGUF driver exited with {response['returncode']} after {len(response['steps'])} steps"
        )
    return response


def text_token_ids(folder: Path, text: str | None, tokens: int, prompts: list[str]) -> tuple[list[int], str]:
    """The token ids the KL check scores and where they come from: ``text`` (file or folder), else the Python
    tutorial when installed, else the prompts joined."""
    tokenizer = load_tokenizer(folder, "the KL check")
    if text is None and not PYTHON_DOCS.is_dir():
        ids = tokenizer(" ".join(prompts), add_special_tokens=False)["input_ids"][:tokens]
        return ids, "the prompts (the Python tutorial is not installed)"
    files = [text] if text is not None else default_eval_files()
    return load_token_ids(tokenizer, files, tokens).tolist(), str(files[0])


def reference_logits(folder: Path, ids: list[int]) -> torch.Tensor:
    """transformers' float32 logits [len(ids), vocab] on ``ids`` (eager attention, like verify's reference)."""
    model = load_causal_lm(folder, "float32", attn_implementation="eager")
    with torch.inference_mode():
        return model(input_ids=torch.tensor([ids])).logits[0].float()


def kl_stats(reference: torch.Tensor, other: torch.Tensor, ids: list[int]) -> dict:
    """KL(reference || other) per position (nats) and the gap in the log-prob of the text's next token.

    Args:
        reference, other: logits [N, V] of the same N tokens ``ids`` (row i scores token i + 1).
    Returns:
        {positions, kl_mean, kl_max, nll_reference, nll, dlogprob_mean, dlogprob_max, top1_agreement}, over the
        N - 1 positions whose next token is known.
    """
    n = len(ids) - 1
    lp_ref = torch.log_softmax(torch.as_tensor(reference[:n]).double(), -1)
    lp = torch.log_softmax(torch.as_tensor(other[:n]).double(), -1)
    kl = (lp_ref.exp() * (lp_ref - lp)).sum(-1)
    target = torch.tensor(ids[1:]).unsqueeze(-1)
    t_ref, t = lp_ref.gather(-1, target)[:, 0], lp.gather(-1, target)[:, 0]
    return {
        "positions": n,
        "kl_mean": kl.mean().item(),
        "kl_max": kl.max().item(),
        "nll_reference": -t_ref.mean().item(),
        "nll": -t.mean().item(),
        "dlogprob_mean": (t - t_ref).abs().mean().item(),
        "dlogprob_max": (t - t_ref).abs().max().item(),
        "top1_agreement": (lp_ref.argmax(-1) == lp.argmax(-1)).double().mean().item(),
    }


def greedy_agreement(expected: list[dict], got: list[dict]) -> dict:
    """``verify.compare`` plus each prompt's own verdict (tokens equal)."""
    result = compare(expected, got)
    result["equal_per_prompt"] = [d is None for d in result["first_divergence"]]
    return result


def check_output_file(out: str, overwrite: bool) -> Path:
    path = Path(out).expanduser()
    if path.is_dir():
        raise FileExistsError(f"output {str(path)!r} is a folder: name a file, e.g. {path / 'model.gguf'}")
    if path.exists() and not overwrite:
        raise FileExistsError(f"output {str(path)!r} already exists: pass --overwrite or choose another OUT")
    return path


def command_line(args: GGUFArguments) -> str:
    """The ``hf-attn-swap gguf`` command that reproduces ``args`` (for OUT.json)."""
    words = ["hf-attn-swap", "gguf", args.model, args.out]
    for f in fields(args):
        value = getattr(args, f.name)
        if f.name in ("model", "out") or value == f.default:
            continue
        flag = "--" + f.name.replace("_", "-")
        words += [flag] if value is True else [flag, str(value)]
    return shlex.join(words)


def gguf_table(report: dict) -> str:
    g, kl = report["greedy"], report["kl"]
    divergence = ", ".join("—" if d is None else str(d) for d in g["first_divergence"])
    return "\n".join([
        "| GGUF | type | MiB | tokens equal | first divergence | max abs Δ log-prob | KL mean | KL max | NLL ref → GGUF |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| {Path(report['gguf']).name} | {report['outtype']} | {report['bytes'] / 2**20:.1f} | "
        f"{g['tokens_equal']}/{g['prompts']} | {divergence} | {g['max_dlogprob']:.2e} | {kl['kl_mean']:.2e} | "
        f"{kl['kl_max']:.2e} | {kl['nll_reference']:.4f} → {kl['nll']:.4f} |",
    ])  # fmt: skip


def build_gguf(args: GGUFArguments, folder: Path, out: Path, python: Path, work: Path) -> dict:
    """Write the GGUF to a temporary file in ``work``, check it, and return the report (with ``tmp``: the file)."""
    prompts = load_prompts(args.prompts)
    prompt_ids = tokenize(folder, prompts)
    ids, source = text_token_ids(folder, args.text, args.text_tokens, prompts)
    tmp = work / out.name
    steps = gguf_steps(folder, tmp, args.outtype, work)
    steps.append(evaluate_step(tmp, prompt_ids, args.max_new_tokens, ids, work / "logits.npy"))
    start = time.perf_counter()
    response = run_gguf_driver(python, steps)
    made, evaluated = response["steps"][-2], response["steps"][-1]
    request = [{"name": folder.name, "path": str(folder), "prompts": prompt_ids}]
    expected = reference(request, args.max_new_tokens)[folder.name]
    kl = kl_stats(reference_logits(folder, ids), torch.from_numpy(np.load(work / "logits.npy")), ids)
    greedy = greedy_agreement(expected, evaluated["outputs"])
    return {
        "command": command_line(args),
        "model": str(folder),
        "gguf": str(out),
        "outtype": args.outtype,
        "bytes": tmp.stat().st_size,
        "tensor_types": made["types"],
        "protected_tensors": made["protected"],
        "llama_cpp": response["version"],
        "prompts": prompts,
        "max_new_tokens": args.max_new_tokens,
        "greedy": greedy,
        "exact": greedy["tokens_equal"] == greedy["prompts"],
        "text": {"source": source, "tokens": len(ids)},
        "kl": kl,
        "notes": [n for r in response["steps"] for n in r.get("notes", [])],
        "seconds": round(time.perf_counter() - start, 1),
        "tmp": str(tmp),
    }


def run_gguf(args: GGUFArguments) -> int:
    folder = check_source(args.model).resolve()
    out = check_output_file(args.out, args.overwrite)
    python = llama_cpp_python(args.python)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        report = build_gguf(args, folder, out, python, work)
        Path(report.pop("tmp")).replace(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    path = write_json(out.with_name(out.name + ".json"), report)
    print(gguf_table(report))
    print("tensor types: " + ", ".join(f"{k} {v}" for k, v in sorted(report["tensor_types"].items())))
    if report["protected_tensors"]:
        print(f"kv_a tensors (attn_kv_a_mqa, attn_kv_a_norm): {len(report['protected_tensors'])}, all F32")
    print(f"KL on {report['text']['tokens']} tokens of {report['text']['source']}")
    print(f"saved {out} and {path}")
    print("gguf: " + ("greedy tokens equal to transformers'" if report["exact"] else "greedy tokens differ"))
    return 1 if args.require_exact and not report["exact"] else 0
