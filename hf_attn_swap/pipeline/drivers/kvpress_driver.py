"""kvpress driver: NVIDIA's KV-cache presses on a model folder, for ``scripts/compare_kvpress.py``.

Run in the kvpress venv (``bash scripts/install_runtimes.sh kvpress``: kvpress pins transformers < 5.3, ours needs
>= 5.15), never imported with kvpress by the package: ``python kvpress_driver.py REQUEST.json RESPONSE.json``.
This file's top level is stdlib only (``PRESSES`` is read by the job that writes requests).

Request: ``{"model": folder, "samples": [{"context_ids": [ids], "question_ids": [ids], "max_new_tokens": N}],
"presses": [{"name", "compression_ratio", "kwargs": {...}}], "options": {"attn_implementation", "threads"}}``.
Response: ``{"runtime": "kvpress", "version", "transformers", "torch", "model", "notes", "runs": [{"press", "class",
"compression_ratio", "question_aware", "seconds", "error", "outputs": [{"tokens", "context_tokens",
"prefill_tokens", "kept", "cache_bytes", "seconds"}]}]}``; ``kept``: the tokens each layer's cache holds after the
press (the compressed prefill), ``cache_bytes`` its keys + values.

How a press is applied is kvpress's own ``KVPressTextGenerationPipeline._forward`` (0.5.5) on our token ids: the
prefill runs ``with press(model): model.model(context_ids, past_key_values=cache)``, then the question tokens go
through the compressed cache at positions continuing from the uncompressed context length, then greedy decoding
(``max_new_tokens`` at most; kvpress stops after an EOS from the second token on). Only ``generate_answer`` is
overridden, to return token ids rather than text (the same loop). Question-agnostic presses prefill the context only. Question-aware ones (SnapKV) get
the question inside the compressed prefill, as kvpress's ``evaluation/evaluate.py --query_aware`` does
(``context + question``); the pipeline needs one token after the prefill, so the prompt's last token is it.
Press name ``none`` is the uncompressed baseline (``press=None``), decoded by the same code.
"""

from __future__ import annotations

import json
import sys
import time
import traceback

#: name -> (kvpress class, question-aware: the question is in the compressed prefill)
PRESSES = {
    "none": (None, False),
    "expected_attention": ("ExpectedAttentionPress", False),
    "knorm": ("KnormPress", False),
    "streaming_llm": ("StreamingLLMPress", False),
    "tova": ("TOVAPress", False),
    "keydiff": ("KeyDiffPress", False),
    "compactor": ("CompactorPress", False),
    "snapkv": ("SnapKVPress", True),
}


def versions() -> dict:
    from importlib.metadata import version

    import kvpress  # noqa: F401  (an interpreter without kvpress fails here, with ModuleNotFoundError)

    return {name: version(name) for name in ("kvpress", "transformers", "torch")}


def load(path: str, options: dict):
    """The model (float32, eval) and kvpress's pipeline subclass that returns token ids."""
    import torch
    from kvpress import KVPressTextGenerationPipeline
    from transformers import AutoModelForCausalLM, AutoTokenizer

    class TokenPipeline(KVPressTextGenerationPipeline):
        def generate_answer(self, question_ids, cache, context_length, max_new_tokens):
            """kvpress 0.5.5's ``generate_answer`` loop, returning the generated ids instead of decoded text."""
            position_ids = torch.arange(
                context_length, context_length + question_ids.shape[1], device=self.model.device
            ).unsqueeze(0)
            outputs = self.model(
                input_ids=question_ids, past_key_values=cache, position_ids=position_ids, logits_to_keep=1
            )
            position_ids = position_ids[:, -1:] + 1
            generated = [outputs.logits[0, -1].argmax()]
            stop = self.model.generation_config.eos_token_id
            stop = stop if isinstance(stop, list) else [stop]
            for i in range(max_new_tokens - 1):
                outputs = self.model(
                    input_ids=generated[-1].view(1, 1), past_key_values=cache, position_ids=position_ids + i
                )
                generated.append(outputs.logits[0, -1].argmax())
                if generated[-1].item() in stop:
                    break
            return [int(t) for t in generated]

    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation=options.get("attn_implementation") or "sdpa"
    ).eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError):
        tokenizer = None
    return model, TokenPipeline(model=model, tokenizer=tokenizer, device="cpu")


def make_press(spec: dict):
    """(press or None, class name, question-aware) of a request's press entry."""
    import kvpress

    class_name, question_aware = PRESSES[spec["name"]]
    if class_name is None:
        return None, None, False
    press = getattr(kvpress, class_name)(
        compression_ratio=spec["compression_ratio"], **spec.get("kwargs", {})
    )
    return press, class_name, question_aware


def run_sample(pipe, press, question_aware: bool, sample: dict) -> dict:
    """One prompt through kvpress's pipeline: tokens, kept tokens per layer, cache bytes."""
    import torch
    from transformers import DynamicCache

    context, question = list(sample["context_ids"]), list(sample["question_ids"])
    if question_aware:  # kvpress's --query_aware: the question joins the compressed context
        context, question = context + question[:-1], question[-1:]
    cache, start = DynamicCache(), time.perf_counter()
    with torch.inference_mode():
        torch.manual_seed(0)  # presses with random sketches (compactor) are repeatable
        inputs = {"context_ids": torch.tensor([context]), "questions_ids": [torch.tensor([question])]}
        (tokens,) = pipe._forward(inputs, max_new_tokens=sample["max_new_tokens"], press=press, cache=cache)
    layers = [cache.layers[i] for i in range(len(cache))]  # the answer was removed: the compressed prefill
    return {
        "tokens": tokens,
        "context_tokens": len(sample["context_ids"]),
        "prefill_tokens": len(context),
        "kept": [int(layer.keys.shape[-2]) for layer in layers],
        "cache_bytes": sum(
            t.numel() * t.element_size() for layer in layers for t in (layer.keys, layer.values)
        ),
        "seconds": round(time.perf_counter() - start, 3),
    }


def run_press(pipe, spec: dict, samples: list[dict]) -> dict:
    run = {
        "press": spec["name"],
        "compression_ratio": spec["compression_ratio"],
        "outputs": [],
        "error": None,
    }
    start = time.perf_counter()
    try:
        press, run["class"], run["question_aware"] = make_press(spec)
        run["outputs"] = [run_sample(pipe, press, run["question_aware"], s) for s in samples]
    except Exception as err:  # reported per press: the other presses still run
        run["error"] = f"{type(err).__name__}: {err}"
        run["traceback"] = traceback.format_exc()[-4000:]
    run["seconds"] = round(time.perf_counter() - start, 2)
    return run


def main() -> None:
    request_path, response_path = sys.argv[1:3]
    with open(request_path) as f:
        request = json.load(f)
    options = request.get("options") or {}
    if options.get("threads"):
        import torch

        torch.set_num_threads(int(options["threads"]))
    found = versions()
    response = {"runtime": "kvpress", "version": found["kvpress"], **found, "model": request["model"]}
    response |= {"notes": [f"attn_implementation={options.get('attn_implementation') or 'sdpa'}"], "runs": []}
    _, pipe = load(request["model"], options)
    for spec in request["presses"]:
        response["runs"].append(run_press(pipe, spec, request["samples"]))
        write(response_path, response)  # partial results survive a crash of a later press
    write(response_path, response)


def write(path: str, payload: dict) -> None:
    with open(path, "w") as f:
        json.dump(payload, f)


if __name__ == "__main__":
    main()
