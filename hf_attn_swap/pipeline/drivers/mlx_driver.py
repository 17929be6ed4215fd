"""mlx-lm driver (see protocol.py): ``mlx_lm.load`` and a greedy loop with mlx-lm's own prompt cache (the cache a
server decodes with), log-probs from ``log_softmax`` of the float32 logits. mlx-lm reads the folder's ``config.json`` itself: a folder without
top-level ``rope_theta`` runs with mlx-lm's default 10 000."""

from __future__ import annotations


def version():
    import mlx_lm

    return mlx_lm.__version__


def generate(model, max_new_tokens, options):
    import mlx.core as mx
    import numpy as np
    from mlx_lm import load
    from mlx_lm.models.cache import make_prompt_cache

    mx.set_default_device(mx.cpu)
    net, _ = load(model["path"])
    net.set_dtype(mx.float32)  # as transformers and the other drivers compute
    outputs = []
    for prompt in model["prompts"]:
        cache = make_prompt_cache(net)
        step = list(prompt)
        tokens, logprobs = [], []
        for _ in range(max_new_tokens):
            logits = net(mx.array([step]), cache=cache)[0, -1].astype(mx.float32)
            row = np.array(logits, dtype=np.float64)
            token = int(row.argmax())
            top = row.max()
            tokens.append(token)
            logprobs.append(float(row[token] - top - np.log(np.exp(row - top).sum())))
            step = [token]
        outputs.append({"tokens": tokens, "logprobs": logprobs})
    return outputs, []


if __name__ == "__main__":
    import protocol

    protocol.main("mlx-lm", version, generate)
