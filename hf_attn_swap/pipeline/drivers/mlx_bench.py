"""mlx-lm bench driver (see bench_protocol.py), in the venv of ``mlx-lm`` (CPU here; Metal on a Mac).

``mlx_lm.utils.load_model`` (no tokenizer needed), ``set_dtype(options["dtype"])`` (float32 unless told), the
prompt cache ``mlx-lm`` decodes with (``make_prompt_cache``). Prefill: the prompts (one row per sequence) in chunks
of 2048 tokens (mlx-lm's ``prefill_step_size``), ``mx.eval`` after each; decode: ``repeats`` rounds of
``new_tokens`` steps of one token per sequence, ``mx.eval`` on each step's logits, the cache trimmed back to the
prompts (``trim_prompt_cache``) before each round.

KV bytes: the cache arrays' ``nbytes``, divided by the slots they hold (mlx-lm grows them 256 tokens at a time)
and the sequences: bytes per cached token of one sequence. For ``deepseek_v3`` mlx-lm caches the normalised latent
(keys, r values) and the rotated rope key (values, d_rope) and decodes absorbed (its ``L == 1`` branch).
"""

from __future__ import annotations

from pathlib import Path

import bench_protocol

CHUNK = 2048


def version():
    import mlx_lm

    return mlx_lm.__version__


def prepare(model, request) -> dict:
    import mlx.core as mx
    from mlx_lm.utils import load_model

    mx.set_default_device(mx.cpu if (request.get("options") or {}).get("device", "cpu") == "cpu" else mx.gpu)
    net, config = load_model(Path(model["path"]))
    dtype = (request.get("options") or {}).get("dtype", "float32")
    if dtype != "auto":
        net.set_dtype(getattr(mx, dtype))
    return {"net": net, "config": config, "weights": weights(net), "notes": [f"mlx {mx.__version__}"]}


def weights(net) -> dict:
    from mlx.utils import tree_flatten

    params = dict(tree_flatten(net.parameters()))
    tied = not any("lm_head" in name for name in params)
    read = {n: a for n, a in params.items() if tied or "embed_tokens" not in n}
    embedding = next((a for n, a in params.items() if "embed_tokens" in n), None)
    return {
        "bytes": sum(a.nbytes for a in read.values()),
        "values": sum(a.size for a in read.values() if a.ndim >= 2),
        "dtype": str(embedding.dtype).removeprefix("mlx.core.") if embedding is not None else None,
    }


def bench(model, state, context, request) -> dict:
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache, trim_prompt_cache

    net, n_seq, steps = state["net"], request["batch"], request["new_tokens"]
    vocab = state["config"]["vocab_size"]
    prompts = mx.array([bench_protocol.prompt_ids(vocab, context, request["seed"] + s) for s in range(n_seq)])
    cache = make_prompt_cache(net)

    def prefill():
        for start in range(0, context, CHUNK):
            mx.eval(net(prompts[:, start : start + CHUNK], cache=cache))

    def decode_round():
        token = mx.full((n_seq, 1), 3, dtype=mx.int32)
        for _ in range(steps):
            mx.eval(net(token, cache=cache))

    prefill_seconds = bench_protocol.timed(prefill)
    rounds = []
    for _ in range(request["repeats"]):
        trim_prompt_cache(cache, cache[0].offset - context)
        rounds.append(bench_protocol.timed(decode_round))
    per_token = (
        sum(c.keys.nbytes / c.keys.shape[2] + c.values.nbytes / c.values.shape[2] for c in cache) / n_seq
    )
    mla = state["config"].get("model_type") in ("deepseek_v2", "deepseek_v3")
    return {
        "prefill_seconds": prefill_seconds,
        "decode_seconds": rounds,
        "kv": {
            "bytes_per_token": per_token,
            "bytes_at_context": per_token * context,
            "allocated_bytes": sum(c.nbytes for c in cache),
            "source": "mlx-lm cache arrays' nbytes per slot",
            "cache_class": type(cache[0]).__name__,
        },
        "weights": state["weights"],
        "attention": "absorbed" if mla else "heads",
    }


if __name__ == "__main__":
    bench_protocol.main("mlx-lm", version, prepare, bench)
