"""GGUF driver, in the venv of ``llama-cpp-python`` (``scripts/install_runtimes.sh llama.cpp``): HF folder -> GGUF
with llama.cpp's own tools, and llama.cpp's greedy tokens / logits on that file. Also the one definition of the
conversion and decoding that ``llama_cpp_driver.py`` (``verify``) runs.

Called ``python gguf_driver.py REQUEST.json RESPONSE.json``; the request is ``{"steps": [...]}``, run in order
(a step that fails ends the run), each one of:

- ``{"op": "convert", "model": FOLDER, "outfile": PATH, "outtype": "f32"|"f16"|"bf16", "protect": true}``:
  llama.cpp's ``convert_hf_to_gguf.py`` (vendored in llama-cpp-python's sdist, kept in ``<venv>/llama.cpp``, or
  ``"converter"``) in this process, with two additions of ours:
  1. ``deepseek2.attention.q_lora_rank = 0`` when ``q_lora_rank`` is null: the converter writes the key only when
     it is not None, and llama.cpp's ``deepseek2`` loader requires it unless the layer count matches a known
     "lite" model (26, 27 or 48 layers), so the file would not load; 0 makes the loader build the plain ``wq``.
  2. ``protect``: the tensors the export's exactness rests on (``PROTECTED``) are written float32 whatever the
     outtype (through the converter's ``tensor_force_quant`` hook).
- ``{"op": "quantize", "infile": F32_GGUF, "outfile": PATH, "outtype": "q8_0"|"q4_k_m", "protect": true}``:
  llama.cpp's own quantiser, ``llama_cpp.llama_model_quantize`` (what ``llama-quantize`` runs: its per-tensor
  mixture, e.g. Q4_K_M's Q6_K rows, and its fallbacks for rows not divisible by the block size), with
  ``protect`` passed as its per-tensor type override (``tt_overrides``: regex -> GGML_TYPE_F32).
- ``{"op": "evaluate", "gguf": PATH, "prompts": [[ids]], "max_new_tokens": N, "text": [ids] | null,
  "logits_out": PATH.npy}``: ``llama_cpp.Llama`` with a float32 KV cache, greedy tokens and their log-probs per
  prompt, and the float32 logits of every position of ``text`` (saved as ``[len(text), vocab]`` .npy).

After a convert or quantize step with ``protect`` the file is read back with gguf-py: a protected tensor that is
not float32 (bindings without ``tt_overrides``) is rewritten from the float32 source (``restore_protected``,
every metadata key and every other tensor copied unchanged), and the step says so in its notes.

Why those tensors (``export/deepseek_v3.py``, item 1): the linear-regime ``kv_a_layernorm`` scales the latent rows
of ``kv_a_proj_with_mqa`` (GGUF ``blk.N.attn_kv_a_mqa.weight``) by kappa ~ 1e-8 and sets the norm weight
(``blk.N.attn_kv_a_norm.weight``) to sqrt(eps) / kappa ~ 1e5. Float16 holds neither: its smallest subnormal is
6e-8 (those rows round to zero) and its largest value 65504 (the norm weight becomes inf). Q8_0 and the k-quants
store a float16 scale per block of 32 / 256 values, max|w| / 127 ~ 1e-10 for a latent row: it underflows to 0,
so the quantised latent is exactly zero, and with it every k_nope and value (numbers: ``pipeline/gguf.py``).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import time
import traceback
from pathlib import Path

#: GGUF tensors stored float32 in every file (regex, searched in the tensor name)
PROTECTED = r"attn_kv_a_(mqa|norm)\.weight$"
GGML_TYPE_F32 = 0  # ggml_type enum
LLAMA_FTYPES = {"q8_0": 7, "q4_k_m": 15}  # llama_ftype enum (llama.h)
CONVERTER_OUTTYPES = ("f32", "f16", "bf16")
Q_LORA_NOTE = (
    "GGUF: deepseek2.attention.q_lora_rank = 0 written (q_lora_rank is null; the converter omits it)"
)


def version():
    import llama_cpp

    return llama_cpp.__version__


def is_protected(name: str) -> bool:
    return re.search(PROTECTED, name) is not None


def converter_dir(converter: str | None = None) -> Path:
    folder = Path(converter or Path(sys.prefix) / "llama.cpp")
    if not (folder / "convert_hf_to_gguf.py").is_file():
        raise FileNotFoundError(
            f"no convert_hf_to_gguf.py in {folder}: rerun `bash scripts/install_runtimes.sh llama.cpp`"
        )
    return folder


def import_gguf(converter: str | None = None):
    """gguf-py: the converter's own copy when it is there (it must match the converter), else the installed one."""
    vendor = Path(converter or Path(sys.prefix) / "llama.cpp")
    for path in (str(vendor / "gguf-py"), str(vendor)):
        if Path(path).is_dir() and path not in sys.path:
            sys.path.insert(0, path)
    import gguf

    return gguf


@contextlib.contextmanager
def converter_patches(notes: list[str], protect: bool):
    """The q_lora_rank key (always) and float32 for ``PROTECTED`` tensors (``protect``), while converting."""
    from conversion import ModelBase
    from conversion.deepseek import DeepseekV2Model
    from gguf import GGMLQuantizationType

    set_params = DeepseekV2Model.__dict__["set_gguf_parameters"]
    force_quant = ModelBase.__dict__["tensor_force_quant"]

    def set_gguf_parameters(self):
        set_params(self)
        if self.hparams.get("q_lora_rank") is None:
            self.gguf_writer.add_q_lora_rank(0)
            notes.append(Q_LORA_NOTE)

    def tensor_force_quant(self, name, new_name, bid, n_dims):
        if protect and is_protected(new_name):
            return GGMLQuantizationType.F32
        return force_quant(self, name, new_name, bid, n_dims)

    DeepseekV2Model.set_gguf_parameters = set_gguf_parameters
    ModelBase.tensor_force_quant = tensor_force_quant
    try:
        yield
    finally:
        DeepseekV2Model.set_gguf_parameters = set_params
        ModelBase.tensor_force_quant = force_quant


def convert(folder: str, outfile: str | Path, outtype: str = "f32", protect: bool = True, converter=None):
    """``convert_hf_to_gguf.py FOLDER --outtype OUTTYPE --outfile OUTFILE`` in this process, with the q_lora_rank
    key and the protected tensors in float32; returns notes."""
    if outtype not in CONVERTER_OUTTYPES:
        raise ValueError(f"the converter step writes {CONVERTER_OUTTYPES}, not {outtype!r}")
    vendor = converter_dir(converter)
    import_gguf(converter)
    import convert_hf_to_gguf

    notes: list[str] = []
    argv = sys.argv
    sys.argv = ["convert_hf_to_gguf.py", str(folder), "--outtype", outtype, "--outfile", str(outfile)]
    try:
        with converter_patches(notes, protect):
            convert_hf_to_gguf.main()
    except SystemExit as err:  # the converter exits 1 for an architecture it does not know
        if err.code:
            raise RuntimeError(f"convert_hf_to_gguf.py ({vendor}) exited with {err.code}") from None
    finally:
        sys.argv = argv
    return sorted(set(notes)) + [f"GGUF: convert_hf_to_gguf.py --outtype {outtype}"]


def quantize(infile: str | Path, outfile: str | Path, outtype: str, protect: bool = True) -> list[str]:
    """``llama_model_quantize(infile, outfile)`` to ``outtype`` (Q8_0 / Q4_K_M), ``PROTECTED`` kept float32 through
    its per-tensor override when these bindings have one; returns notes."""
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = LLAMA_FTYPES[outtype]
    params.nthread = int(os.environ.get("OMP_NUM_THREADS", "0"))
    names = [f for f, _ in llama_cpp.llama_model_quantize_params._fields_]
    overrides = None
    if protect and "tt_overrides" in names:
        overrides = (llama_cpp.llama_model_tensor_override * 2)()
        overrides[0].pattern, overrides[0].type = PROTECTED.encode(), GGML_TYPE_F32
        overrides[1].pattern = None  # the list ends at a null pattern
        params.tt_overrides = ctypes.cast(overrides, type(params.tt_overrides))
    status = llama_cpp.llama_model_quantize(str(infile).encode(), str(outfile).encode(), ctypes.byref(params))
    if status != 0:
        raise RuntimeError(f"llama_model_quantize({outtype}) returned {status}")
    note = f"GGUF: llama_model_quantize {outtype}"
    if protect:
        note += (
            " with tt_overrides " + PROTECTED + " -> F32" if overrides is not None else " (no tt_overrides)"
        )
    return [note]


def tensor_types(path: str | Path, converter=None) -> dict[str, str]:
    """Every tensor of a GGUF file: name -> GGML type name (gguf-py)."""
    gguf = import_gguf(converter)
    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}


def restore_protected(path: str | Path, source: str | Path, converter=None) -> list[str]:
    """Rewrite ``path`` in place with every ``PROTECTED`` tensor that is not float32 taken from the float32 GGUF
    ``source`` (same tensor names); all metadata and every other tensor are copied unchanged. Returns the names
    rewritten (nothing is written when there are none)."""
    gguf = import_gguf(converter)
    reader = gguf.GGUFReader(str(path))
    stale = [t.name for t in reader.tensors if is_protected(t.name) and t.tensor_type.name != "F32"]
    if not stale:
        return []
    originals = {t.name: t for t in gguf.GGUFReader(str(source)).tensors if t.name in stale}
    if set(originals) != set(stale) or any(t.tensor_type.name != "F32" for t in originals.values()):
        raise ValueError(f"{source} has no float32 copy of every tensor of {stale}")
    tensors = [originals.get(t.name, t) for t in reader.tensors]
    tmp = Path(path).with_name(Path(path).name + ".restore.tmp")
    arch = reader.get_field(gguf.Keys.General.ARCHITECTURE).contents()
    writer = gguf.GGUFWriter(str(tmp), arch=arch, endianess=reader.endianess)
    alignment = reader.get_field(gguf.Keys.General.ALIGNMENT)
    if alignment is not None:
        writer.data_alignment = alignment.contents()
    for field in reader.fields.values():  # GGUF.* are the reader's virtual fields; the writer sets the arch
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), field.types[0], sub_type=sub_type)
    for t in tensors:
        writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in tensors:
        writer.write_tensor_data(t.data, tensor_endianess=reader.endianess)
    writer.close()
    del reader
    os.replace(tmp, path)
    return stale


def check_protected(path, source, protect: bool, converter=None) -> dict:
    """The types of ``path`` (counts) and of its protected tensors, after restoring them from ``source`` when
    the tool left one of them below float32."""
    notes = []
    if protect and source is not None:
        restored = restore_protected(path, source, converter)
        if restored:
            notes.append(f"GGUF: {len(restored)} protected tensors rewritten float32 with gguf-py")
    types = tensor_types(path, converter)
    counts: dict[str, int] = {}
    for kind in types.values():
        counts[kind] = counts.get(kind, 0) + 1
    return {"types": counts, "protected": {n: k for n, k in types.items() if is_protected(n)}, "notes": notes}


def open_gguf(path: str | Path, n_ctx: int, logits_all: bool = True):
    """``llama_cpp.Llama`` on ``path`` with a float32 KV cache (its float16 default alone moves log-probs by ~1e-2)."""
    from llama_cpp import Llama

    return Llama(
        model_path=str(path),
        n_ctx=max(256, n_ctx),
        n_batch=min(512, max(256, n_ctx)),
        logits_all=logits_all,
        type_k=GGML_TYPE_F32,
        type_v=GGML_TYPE_F32,
        n_threads=int(os.environ.get("OMP_NUM_THREADS", "2")),
        seed=0,
        verbose=False,
    )


def greedy(llm, prompts: list[list[int]], max_new_tokens: int) -> list[dict]:
    """[{tokens, logprobs}] per prompt: ``max_new_tokens`` greedy steps with llama.cpp's KV cache, the log-prob of
    each chosen token from the float32 logits (EOS does not stop them)."""
    import numpy as np

    outputs = []
    for prompt in prompts:
        llm.reset()
        llm.eval(list(prompt))
        tokens, logprobs = [], []
        for _ in range(max_new_tokens):
            row = np.asarray(llm.scores[llm.n_tokens - 1], dtype=np.float64)
            token = int(row.argmax())
            top = row.max()
            tokens.append(token)
            logprobs.append(float(row[token] - top - np.log(np.exp(row - top).sum())))
            llm.eval([token])
        outputs.append({"tokens": tokens, "logprobs": logprobs})
    return outputs


def text_logits(llm, ids: list[int]):
    """float32 logits [len(ids), vocab]: row i scores the token after ids[i] (one pass, no sampling)."""
    import numpy as np

    llm.reset()
    llm.eval(list(ids))
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def evaluate(step: dict) -> dict:
    import numpy as np

    prompts, text = step.get("prompts") or [], step.get("text") or []
    longest = max([len(p) for p in prompts] or [0]) + step.get("max_new_tokens", 0)
    llm = open_gguf(step["gguf"], max(longest, len(text)))
    result = {"outputs": greedy(llm, prompts, step.get("max_new_tokens", 0)), "notes": ["KV cache float32"]}
    if text:
        np.save(step["logits_out"], text_logits(llm, text))
        result["logits_out"] = step["logits_out"]
    del llm
    return result


def run_step(step: dict) -> dict:
    op, protect, converter = step["op"], step.get("protect", True), step.get("converter")
    if op == "convert":
        notes = convert(step["model"], step["outfile"], step["outtype"], protect, converter)
        checked = check_protected(step["outfile"], None, protect, converter)
    elif op == "quantize":
        notes = quantize(step["infile"], step["outfile"], step["outtype"], protect)
        checked = check_protected(step["outfile"], step["infile"], protect, converter)
    elif op == "evaluate":
        return evaluate(step)
    else:
        raise ValueError(f"unknown step {op!r}")
    return {**checked, "notes": notes + checked["notes"], "bytes": Path(step["outfile"]).stat().st_size}


def main() -> None:
    request_path, response_path = sys.argv[1:3]
    with open(request_path) as f:
        request = json.load(f)
    response = {"runtime": "llama.cpp", "version": version(), "steps": []}
    for step in request["steps"]:
        start = time.perf_counter()
        record = {"op": step["op"], "error": None}
        try:
            record.update(run_step(step))
        except Exception as err:  # reported; the later steps depend on this one
            record["error"] = f"{type(err).__name__}: {err}"
            record["traceback"] = traceback.format_exc()[-4000:]
        record["seconds"] = round(time.perf_counter() - start, 2)
        response["steps"].append(record)
        with open(response_path, "w") as f:
            json.dump(response, f)
        if record["error"]:
            break


if __name__ == "__main__":
    main()
