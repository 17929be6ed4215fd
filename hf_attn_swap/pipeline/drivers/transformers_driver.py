"""transformers driver (see protocol.py); also the reference ``verify`` computes in its own process (``greedy``).

Greedy decoding with the model's own cache (passed as ``cache=`` from transformers 5.24, ``past_key_values=``
before), float32, ``eager`` attention unless ``options["attn_implementation"]`` says otherwise; log-probs are
``log_softmax`` of the float32 logits in float64.
"""

from __future__ import annotations

import inspect


def version():
    import transformers

    return transformers.__version__


def greedy(path: str, prompts: list[list[int]], max_new_tokens: int, attn_implementation: str = "eager"):
    """[{tokens, logprobs}] per prompt: ``max_new_tokens`` greedy steps (EOS does not stop them)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation=attn_implementation
    ).eval()
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    outputs = []
    with torch.inference_mode():
        for prompt in prompts:
            step, cache = torch.tensor([prompt]), {}
            tokens, logprobs = [], []
            for _ in range(max_new_tokens):
                out = model(input_ids=step, use_cache=True, **cache)
                cache = {name: out[name]}
                logits = out.logits[0, -1].double()
                token = int(logits.argmax())
                tokens.append(token)
                logprobs.append(float(torch.log_softmax(logits, -1)[token]))
                step = torch.tensor([[token]])
            outputs.append({"tokens": tokens, "logprobs": logprobs})
    return outputs


def generate(model, max_new_tokens, options):
    attn = options.get("attn_implementation") or "eager"
    return greedy(model["path"], model["prompts"], max_new_tokens, attn), [f"attn_implementation={attn}"]


if __name__ == "__main__":
    import protocol

    protocol.main("transformers", version, generate)
