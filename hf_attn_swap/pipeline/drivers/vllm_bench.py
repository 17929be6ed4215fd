"""vLLM bench driver (see bench_protocol.py), in vLLM's interpreter. Options: ``mla_disable`` (``VLLM_MLA_DISABLE=1``:
MLA weights expanded to per-head K/V; otherwise vLLM's MLA backend, CPU_MLA on CPU, latent 512 + rope 64 only),
``kv_space_gib`` (``VLLM_CPU_KVCACHE_SPACE``, the KV pool on CPU), ``dtype``.

One engine per model (``LLM(max_model_len = largest context + new tokens + 1, max_num_seqs = batch,
enforce_eager=True, disable_log_stats=False)``, in this process: ``VLLM_ENABLE_V1_MULTIPROCESSING=0``; vLLM's CPU
rotary kernel is replaced by ``forward_native`` as in ``vllm_driver.py``, whose DeepSeek query it mis-rotates).
Per context, ``repeats`` rounds of ``generate`` on the batch's prompts with ``max_tokens = new_tokens + 1``; from
vLLM's own request timestamps (``RequestOutput.metrics``): prefill = first token - scheduled (the first round;
later rounds hit vLLM's prefix cache), decode = last token - first token, ``new_tokens`` steps.

KV bytes: from the engine's KV-cache config, what it allocates: per layer group ``page_size_bytes / block_size``
times its layers (``MLAAttentionSpec``: one latent row of kv_lora_rank + rope per token and layer;
``FullAttentionSpec``: K and V of every KV head), the pool's tokens (``num_blocks x block_size``) and its bytes.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

import bench_protocol  # noqa: E402  (this folder is sys.path[0] when the driver runs)


def version():
    import vllm

    return vllm.__version__


def prepare(model, request) -> dict:
    from vllm import LLM
    from vllm.model_executor.layers.rotary_embedding import RotaryEmbedding

    RotaryEmbedding.forward_cpu = RotaryEmbedding.forward_native
    options = request.get("options") or {}
    llm = LLM(
        model=model["path"],
        dtype=options.get("dtype", "float32"),
        enforce_eager=True,
        skip_tokenizer_init=True,
        max_model_len=max(request["contexts"]) + request["new_tokens"] + 1,
        max_num_seqs=request["batch"],
        disable_log_stats=False,
        seed=0,
    )
    core = llm.llm_engine.engine_core.engine_core
    notes = ["vLLM CPU rotary workaround applied in this process (forward_cpu = forward_native)"]
    return {
        "llm": llm,
        "kv": kv_config(core.scheduler.kv_cache_config),
        "weights": weights(core),
        "notes": notes,
    }


def kv_config(config) -> dict:
    groups, per_token = [], 0.0
    for group in config.kv_cache_groups:
        spec = group.kv_cache_spec
        layer_bytes = spec.page_size_bytes / spec.block_size
        per_token += layer_bytes * len(group.layer_names)
        groups.append({
            "spec": type(spec).__name__, "layers": len(group.layer_names), "block_size": spec.block_size,
            "page_size_bytes": spec.page_size_bytes, "num_kv_heads": getattr(spec, "num_kv_heads", None),
            "head_size": getattr(spec, "head_size", None), "dtype": str(getattr(spec, "dtype", "")),
        })  # fmt: skip
    block = config.kv_cache_groups[0].kv_cache_spec.block_size
    return {
        "bytes_per_token": per_token,
        "source": "vLLM KV cache config: page_size_bytes / block_size per layer",
        "groups": groups,
        "pool_tokens": config.num_blocks * block,
        "pool_bytes": sum(t.size for t in config.kv_cache_tensors),
        "granularity_tokens": block,
    }


def weights(core) -> dict:
    try:
        net = core.model_executor.driver_worker.worker.model_runner.get_model()
    except AttributeError:
        return {"bytes": None, "values": None, "dtype": None}
    params = dict(net.named_parameters())
    tied = not any("lm_head" in n for n in params)
    read = {n: p for n, p in params.items() if tied or "embed_tokens" not in n}
    dtype = next(iter(params.values())).dtype
    return {
        "bytes": sum(p.numel() * p.element_size() for p in read.values()),
        "values": sum(p.numel() for p in read.values() if p.dim() >= 2),
        "dtype": str(dtype).removeprefix("torch."),
    }


def bench(model, state, context, request) -> dict:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    vocab = state["llm"].llm_engine.model_config.get_vocab_size()
    prompts = [
        TokensPrompt(prompt_token_ids=bench_protocol.prompt_ids(vocab, context, request["seed"] + s))
        for s in range(request["batch"])
    ]
    params = SamplingParams(
        temperature=0.0, max_tokens=request["new_tokens"] + 1, ignore_eos=True, detokenize=False
    )
    prefill, rounds = None, []
    for _ in range(request["repeats"]):
        outputs = state["llm"].generate(prompts, params, use_tqdm=False)
        stats = [o.metrics for o in outputs]
        if any(s is None for s in stats):
            raise RuntimeError("vLLM returned no request metrics (disable_log_stats=False is needed)")
        first = max(s.first_token_ts for s in stats)
        if prefill is None:
            prefill = first - min(s.scheduled_ts for s in stats)
        rounds.append(max(s.last_token_ts for s in stats) - first)
    kv = dict(state["kv"], bytes_at_context=state["kv"]["bytes_per_token"] * context)
    mla = any(g["spec"].startswith("MLA") for g in kv["groups"])
    with open(os.path.join(model["path"], "config.json")) as f:
        deepseek = json.load(f).get("model_type", "").startswith("deepseek")
    return {
        "prefill_seconds": prefill,
        "decode_seconds": rounds,
        "kv": kv,
        "weights": state["weights"],
        "attention": "absorbed" if mla else (None if deepseek else "heads"),  # expanded: told by the layout
        "engine": {"VLLM_MLA_DISABLE": os.environ.get("VLLM_MLA_DISABLE", "0"),
                   "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE")},
    }  # fmt: skip


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        request_options = json.load(f).get("options") or {}
    if request_options.get("mla_disable"):
        os.environ["VLLM_MLA_DISABLE"] = "1"
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(request_options.get("kv_space_gib", 1))
    bench_protocol.main("vllm", version, prepare, bench)
