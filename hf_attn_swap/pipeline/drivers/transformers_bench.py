"""transformers bench driver (see bench_protocol.py), in this project's interpreter (it imports hf_attn_swap:
``latent_sdpa``, ``LatentCache`` and the one definition of decode speed, ``evaluate.speed.measure_decode_speed``:
one timed prefill, then the median of ``Timer.blocked_autorange`` runs of ``generate`` from that cache, cut back
to the prompt before each run; ``decode_seconds`` holds that median, for ``new_tokens`` tokens).

Options: ``dtype`` (float32 | bfloat16 | float16 | auto), ``attn_implementation``, ``cache`` (auto | latent |
dynamic), ``threads``. KV bytes: the returned cache's tensors (``evaluate.metrics.cache_nbytes``) per cached token
and sequence. Peak RSS is this process's: ``bench`` runs one process per model.
"""

from __future__ import annotations

import bench_protocol


def version():
    import transformers

    return transformers.__version__


def prepare(model, request) -> dict:
    import torch

    from hf_attn_swap.io.checkpoints import load_causal_lm

    options = request.get("options") or {}
    if options.get("threads"):
        torch.set_num_threads(options["threads"])
    net = load_causal_lm(model["path"], options.get("dtype", "float32"), options.get("attn_implementation"))
    return {"net": net, "weights": weights(net), "notes": [f"torch {torch.__version__}"]}


def weights(net) -> dict:
    """Bytes and matrix values a decode step reads: every parameter but the input embedding (one row of it is
    read), unless it is tied to the output."""
    embedding = net.get_input_embeddings().weight
    tied = net.get_output_embeddings() is not None and net.get_output_embeddings().weight is embedding
    params = [p for p in net.parameters() if tied or p is not embedding]
    return {
        "bytes": sum(p.numel() * p.element_size() for p in params),
        "values": sum(p.numel() for p in params if p.dim() >= 2),
        "dtype": str(embedding.dtype).removeprefix("torch."),
    }


def bench(model, state, context, request) -> dict:
    from hf_attn_swap.evaluate.speed import measure_decode_speed

    options = request.get("options") or {}
    net = state["net"]
    prompt = bench_protocol.prompt_ids(net.config.vocab_size, context, request["seed"])
    result = measure_decode_speed(
        net, context, request["new_tokens"], prompt, options.get("cache", "auto"),
        min_run_time=options.get("min_run_time", 0.5), check_positions=False, batch=request["batch"],
    )  # fmt: skip
    latent_sdpa = result["attn_implementation"] == "latent_sdpa"
    return {
        "prefill_seconds": result["prefill_seconds"],
        "decode_seconds": [result["decode_seconds"]],
        "kv": {
            "bytes_per_token": result["cache_bytes_per_token"],
            "bytes_at_context": result["cache_bytes_per_token"] * context,
            "source": f"{result['cache_class']} tensors (evaluate.metrics.cache_nbytes)",
            "cache_class": result["cache_class"],
        },
        "weights": state["weights"],
        "attention": "absorbed" if latent_sdpa else None,  # otherwise told by what the cache holds
        "engine": {
            k: result[k] for k in ("attn_implementation", "torch_threads", "decode_runs", "peak_rss_mib")
        },
        "peak_rss_mib": result["peak_rss_mib"],
    }


if __name__ == "__main__":
    bench_protocol.main("transformers", version, prepare, bench)
