"""What every runtime driver shares (stdlib only: a driver runs in the runtime's own interpreter, without
hf_attn_swap). A driver is called ``python DRIVER.py REQUEST.json RESPONSE.json``.

Request: ``{"models": [{"name", "path", "prompts": [[token ids], ...]}], "max_new_tokens": N, "options": {...}}``.
Response: ``{"runtime", "version", "notes": [...], "runs": [{"model", "variant", "seconds", "error",
"outputs": [{"tokens": [N ids], "logprobs": [N floats]}]}], ...}`` where ``logprobs[i]`` is the log-softmax of
the full logits at generated position i, read at the greedy (top-1) token ``tokens[i]``.
"""

from __future__ import annotations

import json
import sys
import time
import traceback


def main(runtime: str, version, generate, extra=None) -> None:
    """Read the request, call ``generate(model, max_new_tokens, options) -> (outputs, notes)`` per model (and
    per ``variant`` of ``options["variants"]``, passed as ``options["variant"]``), write the response."""
    request_path, response_path = sys.argv[1:3]
    with open(request_path) as f:
        request = json.load(f)
    options = request.get("options") or {}
    response = {"runtime": runtime, "version": version(), "notes": [], "runs": []}
    if extra is not None:
        response.update(extra(options))
    for model in request["models"]:
        for variant in options.get("variants") or [None]:
            start = time.perf_counter()
            run = {"model": model["name"], "variant": variant, "outputs": [], "error": None}
            try:
                outputs, notes = generate(model, request["max_new_tokens"], {**options, "variant": variant})
                run["outputs"] = outputs
                response["notes"] += [n for n in notes if n not in response["notes"]]
            except Exception as err:  # reported per model: the other models still run
                run["error"] = f"{type(err).__name__}: {err}"
                run["traceback"] = traceback.format_exc()[-4000:]
            run["seconds"] = round(time.perf_counter() - start, 2)
            response["runs"].append(run)
            _write(response_path, response)  # partial results survive a crash of a later model
    _write(response_path, response)


def _write(path: str, payload: dict) -> None:
    with open(path, "w") as f:
        json.dump(payload, f)
