"""What every bench driver shares (stdlib only: a driver runs in its engine's interpreter). A bench driver is called
``python ENGINE_bench.py REQUEST.json RESPONSE.json`` (``pipeline/bench.py`` writes the request).

Request: ``{"models": [{"name", "path", ...engine fields}], "contexts": [N, ...], "batch": B, "new_tokens": T,
"repeats": R, "seed": S, "options": {...}}``.

Response: ``{"runtime", "version", "notes": [...], "runs": [run, ...]}``, one run per model and context:

- ``prefill_seconds``: the B prompts of N random token ids prefilled (one timed pass);
- ``decode_seconds``: R rounds, each T steps of B new tokens (one per sequence) after the prompts, every round
  starting from the prefilled cache (the engine's cache cut back to the prompts);
- ``kv``: the engine's own account of its cache: ``bytes_per_token`` (per cached token of one sequence, all
  layers), ``layout`` (what it holds per token and layer, in values), ``source`` (where the number comes from) and
  engine details;
- ``weights``: ``bytes`` and ``values`` a decode step reads / multiplies (the input embedding excluded: one row
  of it is read), ``dtype``;
- ``attention``: the form the engine decodes in (``evaluate/roofline.py``: heads | absorbed | expanded | reexpand);
- ``error`` / ``traceback`` when this run failed (the other runs still go on).
"""

from __future__ import annotations

import json
import random
import sys
import time
import traceback


def prompt_ids(vocab_size: int, length: int, seed: int) -> list[int]:
    """``length`` token ids drawn uniformly from [3, vocab_size) (ids 0-2 are often special), seeded."""
    rng = random.Random(seed)
    return [rng.randrange(3, vocab_size) for _ in range(length)]


def timed(call) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def main(runtime: str, version, prepare, bench) -> None:
    """Read the request; per model ``state = prepare(model, request)`` (load, convert: once), then per context
    ``bench(model, state, context, request) -> run fields``; write the response after every run."""
    request_path, response_path = sys.argv[1:3]
    with open(request_path) as f:
        request = json.load(f)
    response = {"runtime": runtime, "version": version(), "notes": [], "runs": []}
    for model in request["models"]:
        state, error = None, None
        try:
            state = prepare(model, request)
            response["notes"] += [n for n in state.get("notes", []) if n not in response["notes"]]
        except Exception as err:  # reported per context row: the other models still run
            error = (f"{type(err).__name__}: {err}", traceback.format_exc()[-4000:])
        for context in request["contexts"]:
            run = {"model": model["name"], "context": context, "batch": request["batch"], "error": None}
            if error is None:
                try:
                    run.update(bench(model, state, context, request))
                except Exception as err:
                    run["error"] = f"{type(err).__name__}: {err}"
                    run["traceback"] = traceback.format_exc()[-4000:]
            else:
                run["error"], run["traceback"] = error
            response["runs"].append(run)
            _write(response_path, response)  # partial results survive a crash of a later run
        if state and state.get("close"):
            state["close"]()
    _write(response_path, response)


def _write(path: str, payload: dict) -> None:
    with open(path, "w") as f:
        json.dump(payload, f)
