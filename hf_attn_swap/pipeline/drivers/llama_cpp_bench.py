"""llama.cpp bench driver (see bench_protocol.py), in the venv of ``llama-cpp-python``.

Per model, once: the HF folder -> a GGUF (``model["gguf"]``, kept between runs) with llama.cpp's own converter and
quantiser (``gguf_driver.convert`` / ``quantize``, what ``hf-attn-swap gguf`` runs: the MLA export's
``attn_kv_a_*`` tensors stay float32). A folder without tokenizer files (``bench --random-weights``) gets a
synthetic vocabulary of its ``vocab_size`` (256 byte tokens + placeholders, tokenizer model ``gpt2``): the
converter insists on a tokenizer it recognises, and decoding speed depends on the vocabulary's size only.

Per context: a fresh ``llama_context`` (the low-level C API: n_ctx = batch x (context + new tokens), one
sequence per prompt in a unified cache, n_batch = n_ubatch = ``options["ubatch"]``, K/V type
``options["kv_type"]``, flash attention ``options["flash_attn"]`` on or off, never auto, ``options["threads"]``).
Prefill: each prompt in chunks of n_batch, logits for its last token only. Decode: ``repeats`` rounds of
``new_tokens`` steps, a batch of one token per sequence, the cache cut back to the prompts (``llama_memory_seq_rm``)
before each round.

KV bytes, as llama.cpp reports them:
- ``bytes_per_token``: ``llama_state_seq_get_size`` (what llama.cpp serialises for sequence 0) grows by exactly
  (12 bytes of cell metadata: pos, n_seq_id, seq id) + (the K and V rows of all layers) per cached token; the
  growth over the decoded tokens, less 12, is the cache's bytes per token, to the byte.
- ``buffer``: the log line of its cache constructor (``llama_kv_cache: size = ... MiB (N cells, L layers, ...),
  K (f16): ... MiB, V (f16): ... MiB``): for ``deepseek2`` with MLA there is no V buffer (V is a view of the first
  ``kv_lora_rank`` values of each K row).

Profile (``options["profile"]``): the prefilled cache is copied (``llama_state_seq_get/set_data``) into a second
context whose scheduler calls back before and after every graph node (``cb_eval``); ``profile_steps`` decode steps
are timed node by node (sum per op and node name, e.g. ``MUL_MAT kq``), with each matrix product's FLOPs.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import time
from pathlib import Path

import bench_protocol
from gguf_driver import check_protected, convert, converter_dir, import_gguf, quantize, version

GGML_TYPES = {"f32": 0, "f16": 1, "q8_0": 8, "bf16": 30}  # ggml_type enum (ggml.h)
CELL_METADATA_BYTES = 12  # per cached token in a sequence's state: pos, n_seq_id, one seq id (int32 each)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")
KV_LINE = re.compile(
    r"llama_kv_cache: size = +([\d.]+) MiB \( *(\d+) cells, +(\d+) layers.*?K \((\w+)\): +([\d.]+) MiB, "
    r"V \((\w+)\): +([\d.]+) MiB"
)
LOG: list[str] = []


def _log_callback(level, text, user_data):
    LOG.append(text.decode("utf-8", "replace") if text else "")


def prepare(model, request) -> dict:
    import llama_cpp

    global _CALLBACK
    llama_cpp.llama_backend_init()
    _CALLBACK = llama_cpp.llama_log_callback(_log_callback)  # kept referenced while llama.cpp may call it
    llama_cpp.llama_log_set(_CALLBACK, ctypes.c_void_p(0))
    options = request.get("options") or {}
    path, notes = make_gguf(model, options)
    params = llama_cpp.llama_model_default_params()
    handle = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
    if not handle:
        raise RuntimeError(f"llama.cpp could not load {path}:\n{''.join(LOG[-20:])}")
    weights = gguf_weights(path, options.get("converter"))
    return {"model": handle, "gguf": str(path), "weights": weights, "notes": notes,
            "close": lambda: llama_cpp.llama_model_free(handle)}  # fmt: skip


def make_gguf(model, options) -> tuple[Path, list[str]]:
    """The model's GGUF of type ``options["weight_type"]`` at ``model["gguf"]`` (made when missing)."""
    path, outtype = Path(model["gguf"]), options.get("weight_type", "q8_0")
    notes = [f"GGUF {outtype} by llama.cpp's converter" + ("" if outtype in ("f32", "f16", "bf16") else
             " (f32) and llama_model_quantize") + "; attn_kv_a_* kept float32"]  # fmt: skip
    if path.is_file():
        return path, notes
    path.parent.mkdir(parents=True, exist_ok=True)
    converter = options.get("converter")
    tmp = path.with_name(path.name + ".f32.tmp")
    with synthetic_vocab(model["path"], notes, converter):
        if outtype in ("f32", "f16", "bf16"):
            convert(model["path"], tmp, outtype, True, converter)
            check_protected(tmp, None, True, converter)
        else:
            convert(model["path"], tmp, "f32", True, converter)
            final = path.with_name(path.name + ".tmp")
            quantize(tmp, final, outtype, True)
            check_protected(final, tmp, True, converter)
            tmp.unlink()
            tmp = final
    os.replace(tmp, path)
    return path, notes


@contextlib.contextmanager
def synthetic_vocab(folder: str, notes: list[str], converter=None):
    """For a folder without tokenizer files: the converter's ``set_vocab`` of its architecture writes a
    vocabulary of ``vocab_size`` tokens (256 byte tokens, then placeholders) instead of reading one."""
    if any((Path(folder) / name).is_file() for name in TOKENIZER_FILES):
        yield
        return
    converter_dir(converter)
    import_gguf(converter)
    from conversion import get_model_class

    config = json.loads((Path(folder) / "config.json").read_text())
    cls = get_model_class(config["architectures"][0])
    own = cls.__dict__.get("set_vocab")

    def set_vocab(self):
        n = self.hparams["vocab_size"]
        tokens = byte_tokens() + [f"<t{i}>" for i in range(256, n)]
        self.gguf_writer.add_tokenizer_model("gpt2")
        self.gguf_writer.add_tokenizer_pre("default")
        self.gguf_writer.add_token_list(tokens[:n])
        self.gguf_writer.add_token_types([1] * n)  # NORMAL
        self.gguf_writer.add_token_merges(["Ġ Ġ"])
        self.gguf_writer.add_bos_token_id(1)
        self.gguf_writer.add_eos_token_id(2)

    cls.set_vocab = set_vocab
    notes.append("no tokenizer in the folder: a synthetic vocabulary of vocab_size tokens was written")
    try:
        yield
    finally:
        if own is None:
            del cls.set_vocab
        else:
            cls.set_vocab = own


def byte_tokens() -> list[str]:
    """GPT-2's byte-level alphabet: the 256 characters its BPE maps the bytes 0-255 to."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def gguf_weights(path, converter=None) -> dict:
    """What a decode step reads: every tensor but the input embedding (one row of it is read; it is the output
    matrix too when there is no ``output.weight``) and, for MLA, ``attn_kv_b`` (decode uses ``attn_k_b`` /
    ``attn_v_b``). ``values``: the elements of the matrices (2 FLOPs each per token)."""
    gguf = import_gguf(converter)
    tensors = gguf.GGUFReader(str(path)).tensors
    names = {t.name for t in tensors}
    skip = {"token_embd.weight"} if "output.weight" in names else set()
    mla = any(".attn_k_b." in n for n in names)
    read = [t for t in tensors if t.name not in skip and not (mla and ".attn_kv_b." in t.name)]
    types: dict[str, int] = {}
    for t in read:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + int(t.n_bytes)
    return {
        "bytes": sum(int(t.n_bytes) for t in read),
        "values": sum(int(t.n_elements) for t in read if len(t.shape) >= 2),
        "file_bytes": Path(path).stat().st_size,
        "bytes_by_type": types,
        "dtype": max(types, key=types.get),
        "mla": mla,
    }


def new_context(state, n_ctx: int, n_seq: int, options, cb_eval=None):
    import llama_cpp

    params = llama_cpp.llama_context_default_params()
    params.n_ctx = n_ctx
    params.n_batch = params.n_ubatch = options.get("ubatch", 512)
    params.n_seq_max = n_seq
    params.kv_unified = True
    threads = options.get("threads") or os.cpu_count()
    params.n_threads = params.n_threads_batch = threads
    params.type_k = params.type_v = GGML_TYPES[options.get("kv_type", "f16")]
    params.flash_attn_type = 1 if options.get("flash_attn") else 0  # enabled / disabled, never auto
    params.no_perf = False
    if cb_eval is not None:
        params.cb_eval = cb_eval
    start = len(LOG)
    ctx = llama_cpp.llama_init_from_model(state["model"], params)
    if not ctx:
        raise RuntimeError(f"llama_init_from_model failed (n_ctx {n_ctx}):\n{''.join(LOG[start:])[-2000:]}")
    return ctx, "".join(LOG[start:])


class Batch:
    """A ``llama_batch`` of up to ``size`` tokens, one sequence id each."""

    def __init__(self, size: int):
        import llama_cpp

        self.llama_cpp, self.size = llama_cpp, size
        self.batch = llama_cpp.llama_batch_init(size, 0, 1)

    def decode(
        self, ctx, tokens: list[int], positions: list[int], seqs: list[int], last_logits: bool
    ) -> None:
        b = self.batch
        for i, (t, p, s) in enumerate(zip(tokens, positions, seqs, strict=True)):
            b.token[i], b.pos[i], b.n_seq_id[i], b.seq_id[i][0] = t, p, 1, s
            b.logits[i] = 1 if last_logits and i == len(tokens) - 1 else 0
        b.n_tokens = len(tokens)
        status = self.llama_cpp.llama_decode(ctx, b)
        if status != 0:
            raise RuntimeError(f"llama_decode returned {status} (n_tokens {len(tokens)})")

    def free(self):
        self.llama_cpp.llama_batch_free(self.batch)


def prefill(ctx, batch: Batch, prompts: list[list[int]], chunk: int) -> None:
    for seq, prompt in enumerate(prompts):
        for start in range(0, len(prompt), chunk):
            part = prompt[start : start + chunk]
            last = start + len(part) == len(prompt)
            batch.decode(ctx, part, list(range(start, start + len(part))), [seq] * len(part), last)


def decode_round(ctx, batch: Batch, context: int, n_seq: int, steps: int, token: int) -> None:
    for step in range(steps):
        batch.decode(ctx, [token] * n_seq, [context + step] * n_seq, list(range(n_seq)), True)


def bench(model, state, context, request) -> dict:
    import llama_cpp

    options = request.get("options") or {}
    n_seq, steps = request["batch"], request["new_tokens"]
    vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(state["model"]))
    prompts = [bench_protocol.prompt_ids(vocab, context, request["seed"] + s) for s in range(n_seq)]
    chunk = options.get("ubatch", 512)
    ctx, log = new_context(state, n_seq * (context + steps), n_seq, options)
    batch = Batch(max(chunk, n_seq))
    mem = llama_cpp.llama_get_memory(ctx)
    try:
        prefill_seconds = bench_protocol.timed(lambda: prefill(ctx, batch, prompts, chunk))
        before = llama_cpp.llama_state_seq_get_size(ctx, 0)
        rounds = []
        for _ in range(request["repeats"]):
            llama_cpp.llama_memory_seq_rm(mem, -1, context, -1)
            rounds.append(bench_protocol.timed(lambda: decode_round(ctx, batch, context, n_seq, steps, 3)))
        after = llama_cpp.llama_state_seq_get_size(ctx, 0)
        run = {
            "prefill_seconds": prefill_seconds,
            "decode_seconds": rounds,
            "kv": kv_report(state, log, before, after, steps, context),
            "weights": state["weights"],
            "attention": "absorbed" if state["weights"]["mla"] else "heads",
            "engine": {"n_ctx": llama_cpp.llama_n_ctx(ctx), "flash_attn": bool(options.get("flash_attn")),
                       "kv_type": options.get("kv_type", "f16"), "ubatch": chunk, "gguf": state["gguf"],
                       "threads": options.get("threads") or os.cpu_count()},
        }  # fmt: skip
        if options.get("profile"):
            run["profile"] = profile(state, ctx, n_seq, context, options, batch)
        return run
    finally:
        batch.free()
        llama_cpp.llama_free(ctx)


def kv_report(state, log: str, before: int, after: int, steps: int, context: int) -> dict:
    """llama.cpp's own numbers for its cache (module docstring)."""
    report = {
        "bytes_per_token": (after - before) / steps - CELL_METADATA_BYTES,
        "source": "llama_state_seq_get_size growth per cached token less 12 bytes of cell metadata",
        "bytes_at_context": None,
    }
    found = KV_LINE.search(log)
    if found:
        total, cells, layers, k_type, k_mib, v_type, v_mib = found.groups()
        report.update(
            buffer_mib=float(total), cells=int(cells), layers=int(layers), k_type=k_type,
            k_buffer_mib=float(k_mib), v_type=v_type, v_buffer_mib=float(v_mib), log_line=found.group(0),
        )  # fmt: skip
    report["bytes_at_context"] = report["bytes_per_token"] * context
    return report


# ---- profile: time per graph node through the scheduler's eval callback --------------------------------------


class GGMLTensor(ctypes.Structure):
    """The leading fields of ``struct ggml_tensor`` (ggml.h of this llama.cpp), up to its name."""

    _fields_ = [
        ("type", ctypes.c_int),
        ("buffer", ctypes.c_void_p),
        ("ne", ctypes.c_int64 * 4),
        ("nb", ctypes.c_size_t * 4),
        ("op", ctypes.c_int),
        ("op_params", ctypes.c_int32 * 16),
        ("flags", ctypes.c_int32),
        ("src", ctypes.c_void_p * 10),
        ("view_src", ctypes.c_void_p),
        ("view_offs", ctypes.c_size_t),
        ("data", ctypes.c_void_p),
        ("name", ctypes.c_char * 64),
    ]


def _ggml():
    import llama_cpp

    lib = ctypes.CDLL(str(Path(llama_cpp.__file__).with_name("lib") / "libggml-base.so"))
    lib.ggml_op_desc.restype = ctypes.c_char_p
    lib.ggml_op_desc.argtypes = [ctypes.c_void_p]
    lib.ggml_nbytes.restype = ctypes.c_size_t
    lib.ggml_nbytes.argtypes = [ctypes.c_void_p]
    return lib


def node_cost(lib, address: int, node: GGMLTensor, op: str) -> tuple[int, int]:
    """(FLOPs, bytes touched: its inputs and its output) of one graph node; FLOPs of matrix products and
    flash attention only."""
    sources = [GGMLTensor.from_address(src) for src in node.src if src]
    touched = lib.ggml_nbytes(address) + sum(lib.ggml_nbytes(src) for src in node.src if src)
    flops = 0
    if op == "MUL_MAT":  # out[i, j] = a[:, i] . b[:, j]: 2 a.ne0 FLOPs per output value
        flops = 2 * sources[0].ne[0] * node.ne[0] * node.ne[1] * node.ne[2] * node.ne[3]
    elif op == "FLASH_ATTN_EXT":  # q [D, tokens, heads], k [D, n_kv, ...], v [Dv, n_kv, ...]
        q, k, v = sources[:3]
        flops = 2 * q.ne[1] * q.ne[2] * q.ne[3] * k.ne[1] * (k.ne[0] + v.ne[0])
    return flops, touched


def profile(state, ctx, n_seq: int, context: int, options, batch: Batch) -> dict:
    """Per (op, node name) seconds per decode step and FLOPs of matrix products (module docstring)."""
    import llama_cpp

    lib, records, clock = _ggml(), {}, [time.perf_counter()]
    steps = options.get("profile_steps", 4)

    def observe(tensor, ask, user_data):
        if ask:
            return True
        now = time.perf_counter()
        node = GGMLTensor.from_address(tensor)
        op = lib.ggml_op_desc(tensor).decode()
        name = re.sub(r"[-_]\d+$", "", node.name.decode(errors="replace"))  # kq-0, node_28: per layer
        entry = records.setdefault(f"{op} {name}", {"seconds": 0.0, "calls": 0, "flops": 0, "bytes": 0})
        flops, touched = node_cost(lib, tensor, node, op)
        entry["seconds"] += now - clock[0]
        entry["calls"] += 1
        entry["flops"] += flops
        entry["bytes"] += touched
        entry["shapes"] = [list(node.ne)] + [list(GGMLTensor.from_address(s).ne) for s in node.src if s]
        clock[0] = time.perf_counter()
        return True

    callback = llama_cpp.ggml_backend_sched_eval_callback(observe)
    size = llama_cpp.llama_state_seq_get_size(ctx, -1)
    data = (ctypes.c_uint8 * size)()
    llama_cpp.llama_state_seq_get_data(ctx, data, size, -1)
    ctx2, _ = new_context(state, llama_cpp.llama_n_ctx(ctx), n_seq, options, cb_eval=callback)
    try:
        llama_cpp.llama_state_seq_set_data(ctx2, data, size, -1)
        mem = llama_cpp.llama_get_memory(ctx2)
        llama_cpp.llama_memory_seq_rm(mem, -1, context, -1)
        decode_round(ctx2, batch, context, n_seq, 1, 3)  # warm-up step
        records.clear()
        llama_cpp.llama_memory_seq_rm(mem, -1, context, -1)
        clock[0] = time.perf_counter()
        total = bench_protocol.timed(lambda: decode_round(ctx2, batch, context, n_seq, steps, 3))
    finally:
        llama_cpp.llama_free(ctx2)
    nodes = sorted(records.items(), key=lambda item: -item[1]["seconds"])
    return {
        "steps": steps,
        "step_seconds": total / steps,
        "nodes": [{"node": k, **v, "seconds": v["seconds"] / steps, "flops": v["flops"] / steps,
                   "bytes": v["bytes"] / steps, "calls": v["calls"] // steps} for k, v in nodes],
    }  # fmt: skip


if __name__ == "__main__":
    bench_protocol.main("llama.cpp", version, prepare, bench)
