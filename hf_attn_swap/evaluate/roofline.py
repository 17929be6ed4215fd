"""What decoding one token costs at best, and what this machine can do: the roofline beside every decode figure.

Decoding a step (``batch`` sequences, one new token each, ``n`` tokens cached per sequence) reads every weight
once and each sequence's whole KV cache once, and does two FLOPs per weight value per sequence plus the
attention over the cache. Nothing faster than the machine's memory bandwidth B and peak FLOP/s P is possible:

    time per step >= max(bytes / B, FLOPs / P),   bytes = W + batch * n * kv_bytes_per_token,
                                                  FLOPs = batch * (2 * weight_values + layers * n * a)

with ``W`` the weight bytes the step reads (every matrix; of the input embedding one row, so none), ``a`` the
attention FLOPs per cached token, per layer and per query token, by what the cache holds (``ATTENTION_FORMS``):

- ``heads`` (MHA/GQA, per-head K/V cached): scores 2 H d_k, weighted sum 2 H d_v: ``4 H d`` for Llama.
  KV values per token and layer: ``2 H_kv d``.
- ``absorbed`` (MLA, the latent cached, queries mapped into it: vLLM's MLA backends, llama.cpp, mlx-lm,
  ``latent_sdpa``): every head scores the r + d_rope latent dims and sums r: ``2 H (r + d_rope) + 2 H r``, about
  4x MHA's at DeepSeek's shape (H 32, r 512, d_rope 64 vs head_dim 128: 69 632 vs 16 384). KV values: r + d_rope.
- ``expanded`` (MLA weights, per-head K/V cached): ``2 H (d_nope + d_rope) + 2 H d_v``; KV values
  ``H (d_nope + d_rope) + H d_v``. ``expanded_padded``: the same with V padded to the query/key head size
  ``d_qk = d_nope + d_rope`` (vLLM with ``VLLM_MLA_DISABLE=1`` caches it so): ``4 H d_qk``, KV values ``2 H d_qk``.
- ``reexpand`` (the latent cached, per-head K/V rebuilt from it every step: transformers' stock
  ``DeepseekV3Attention`` on a latent cache): ``expanded`` + ``2 r H (d_nope + d_v)`` FLOPs, and the expanded K/V
  written and read once more per step.

The absorbed form trades bytes for FLOPs: 32 query heads share each cached row, so its arithmetic intensity is
~H FLOPs per cached byte (f16) where MHA's is ~1. On a CPU whose balance P / B is a few tens of FLOPs per byte, an
absorbed cache can be compute-bound at long context where MHA is memory-bound.

``measure_machine`` measures B (STREAM-like: a read, a copy and a triad over arrays far larger than the caches;
the best of them bounds any read stream) and P (a large float32 GEMM; bfloat16 and int8 GEMMs are recorded
beside it) with torch, on the same number of threads as the engine.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

ATTENTION_FORMS = ("heads", "absorbed", "expanded", "expanded_padded", "reexpand")
MLA_MODEL_TYPES = ("deepseek_v2", "deepseek_v3")


@dataclass(frozen=True)
class AttentionShape:
    """The attention of one decoder layer, from a ``config.json``: GQA (``kv_lora_rank`` None) or MLA."""

    layers: int
    heads: int
    kv_heads: int
    head_dim: int  # GQA: q/k/v head size
    kv_lora_rank: int | None = None
    qk_rope_head_dim: int = 0
    qk_nope_head_dim: int = 0
    v_head_dim: int = 0

    @classmethod
    def from_config(cls, config: dict) -> AttentionShape:
        heads = config["num_attention_heads"]
        layers = config["num_hidden_layers"]
        if config.get("model_type") in MLA_MODEL_TYPES or config.get("kv_lora_rank"):
            return cls(
                layers, heads, heads, 0, config["kv_lora_rank"], config["qk_rope_head_dim"],
                config["qk_nope_head_dim"], config["v_head_dim"],
            )  # fmt: skip
        head_dim = config.get("head_dim") or config["hidden_size"] // heads
        return cls(layers, heads, config.get("num_key_value_heads") or heads, head_dim)

    @property
    def is_mla(self) -> bool:
        return self.kv_lora_rank is not None

    def layouts(self) -> tuple[str, ...]:
        """The cache layouts this attention can be served with (``kv_values``' ``form`` values)."""
        return ("absorbed", "expanded", "expanded_padded") if self.is_mla else ("heads",)

    def kv_values(self, form: str) -> int:
        """Values cached per token and layer."""
        _check_form(self, form)
        if form == "heads":
            return 2 * self.kv_heads * self.head_dim
        if form in ("absorbed", "reexpand"):
            return self.kv_lora_rank + self.qk_rope_head_dim
        qk = self.qk_nope_head_dim + self.qk_rope_head_dim
        return self.heads * (
            2 * max(qk, self.v_head_dim) if form == "expanded_padded" else qk + self.v_head_dim
        )

    def kv_bytes_per_token(self, form: str, dtype_bytes: float) -> float:
        """Cache bytes per token, all layers: the formula engines' reports are checked against."""
        return self.kv_values(form) * self.layers * dtype_bytes

    def attention_flops(self, form: str) -> int:
        """FLOPs per cached token, per layer and per query token (module docstring)."""
        _check_form(self, form)
        h = self.heads
        if form == "heads":
            return 4 * h * self.head_dim
        if form == "absorbed":
            return 2 * h * (2 * self.kv_lora_rank + self.qk_rope_head_dim)
        if form in ("expanded", "expanded_padded"):
            return 2 * self.kv_values(form)
        expanded = 2 * self.kv_values("expanded")
        return expanded + 2 * self.kv_lora_rank * h * (self.qk_nope_head_dim + self.v_head_dim)


def _check_form(shape: AttentionShape, form: str) -> None:
    if form not in ATTENTION_FORMS:
        raise ValueError(f"unknown attention form {form!r}; choose one of {', '.join(ATTENTION_FORMS)}")
    if (form == "heads") == shape.is_mla:
        raise ValueError(f"form {form!r} does not apply to {'an MLA' if shape.is_mla else 'a GQA'} layer")


@dataclass(frozen=True)
class DecodeStep:
    """One decode step: ``batch`` sequences with ``cached`` tokens each, a layer of ``shape`` served in ``form``;
    the weight bytes and matrix values it reads (as the engine stores them) and the engine's KV bytes per token
    (all layers; ``kv_dtype_bytes`` per cached value)."""

    shape: AttentionShape
    form: str
    cached: float
    batch: int
    weight_bytes: float
    weight_values: float
    kv_bytes_per_token: float
    kv_dtype_bytes: float

    @property
    def bytes(self) -> float:
        kv = self.kv_bytes_per_token
        if self.form == "reexpand":  # the rebuilt per-head K/V are written and read back once per step
            kv += 2 * self.shape.kv_bytes_per_token("expanded", self.kv_dtype_bytes)
        return self.weight_bytes + self.batch * self.cached * kv

    @property
    def flops(self) -> float:
        attention = self.shape.layers * self.cached * self.shape.attention_flops(self.form)
        return self.batch * (2 * self.weight_values + attention)


@dataclass(frozen=True)
class Roofline:
    """The machine: memory bandwidth (bytes/s) and peak FLOP/s."""

    bandwidth: float
    flops: float

    def row(self, step: DecodeStep, tokens_per_second: float | None = None) -> dict:
        """The roofline beside one decode figure: the best tokens/s (``batch`` / the step's least time
        max(bytes / bandwidth, FLOPs / peak)), the bound it sits at, the measured fraction of it, and the step's
        bytes, FLOPs and arithmetic intensity."""
        memory, compute = step.bytes / self.bandwidth, step.flops / self.flops
        best = step.batch / max(memory, compute)
        return {
            "roofline_tokens_per_second": best,
            "roofline_bound": "memory" if memory >= compute else "compute",
            "roofline_fraction": None if tokens_per_second is None else tokens_per_second / best,
            "step_bytes": step.bytes,
            "step_flops": step.flops,
            "flops_per_byte": step.flops / step.bytes,
        }


def measure_machine(threads: int | None = None, array_mib: int = 128, gemm_size: int = 2048) -> dict:
    """Memory bandwidth and GEMM FLOP/s of this machine with torch on ``threads`` threads (default: torch's).

    Returns {bandwidth: bytes/s (the best of read, copy, triad), flops: float32 GEMM FLOP/s, and each
    measurement}. The arrays (``array_mib`` each) must be far larger than the last-level cache.
    """
    import torch

    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        streams = _stream(array_mib)
        gemms = {
            "float32": _gemm(gemm_size, torch.float32),
            "bfloat16": _gemm(gemm_size, torch.bfloat16),
            "int8": _gemm(gemm_size, torch.int8),
        }
        threads_used = torch.get_num_threads()
    finally:
        torch.set_num_threads(previous)
    return {
        "bandwidth": max(streams.values()),
        "flops": gemms["float32"],
        "stream_bytes_per_second": streams,
        "gemm_flops_per_second": gemms,
        "threads": threads_used,
        "array_mib": array_mib,
        "gemm_size": gemm_size,
    }


def _best(run, repeats: int) -> float:
    """The shortest of ``repeats`` timed calls, after one warm-up call."""
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def _stream(array_mib: int, repeats: int = 3) -> dict[str, float]:
    """STREAM-like bytes/s: read (a sum), copy (a = b: 2 arrays), triad (a = b + s c: 3 arrays)."""
    import torch

    n = array_mib * 2**20 // 4
    a, b, c = torch.zeros(n), torch.rand(n), torch.rand(n)
    size = 4 * n
    return {
        "read": size / _best(lambda: b.sum(), repeats),
        "copy": 2 * size / _best(lambda: a.copy_(b), repeats),
        "triad": 3 * size / _best(lambda: torch.add(b, c, alpha=3.0, out=a), repeats),
    }


def _gemm(n: int, dtype, repeats: int = 2) -> float | None:
    """FLOP/s of an n x n x n matrix product in ``dtype`` (int8: ``torch._int_mm``; None when unavailable)."""
    import torch

    try:
        if dtype == torch.int8:
            a = torch.randint(-64, 64, (n, n), dtype=torch.int8)
            b = torch.randint(-64, 64, (n, n), dtype=torch.int8)
            seconds = _best(lambda: torch._int_mm(a, b), repeats)
        else:
            a, b = torch.rand(n, n, dtype=dtype), torch.rand(n, n, dtype=dtype)
            seconds = _best(lambda: a @ b, repeats)
    except (RuntimeError, AttributeError, NotImplementedError):
        return None
    return 2 * n**3 / seconds


def machine_summary(machine: dict) -> str:
    """One line: bandwidth and FLOP/s as measured."""
    gemm = machine["gemm_flops_per_second"]
    extra = ", ".join(f"{k} {v / 1e9:.0f}" for k, v in gemm.items() if v is not None and k != "float32")
    return (
        f"roofline: memory {machine['bandwidth'] / 1e9:.1f} GB/s (best of read/copy/triad), compute "
        f"{machine['flops'] / 1e9:.0f} GFLOP/s (float32 GEMM; {extra} GFLOP/s), {machine['threads']} threads"
    )
