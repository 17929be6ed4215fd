"""Long-context evaluation, offline and deterministic: RULER-style retrieval and perplexity by position.

Retrieval (``needle``, ``multikey``, ``multivalue``, ``vartrack``). A prompt of ``length - new_tokens`` tokens
of the model's tokenizer is built from token pieces (never re-tokenised across a seam): the tokenizer's own
special prefix (BOS where it adds one), a one-line instruction, a haystack of real text (a window of the
``data`` text, default the Python *tutorial*, starting at a line start the trial's generator picks) with
statements inserted at line starts, and a plain-continuation question (no chat template):

- ``needle``: "The special magic number for <key> is <7 digits>." at depth d (the line start nearest to
  d x haystack tokens); the prompt ends "What is the special magic number for <key>? The special magic number
  for <key> is".
- ``multikey``: the same plus ``needles - 1`` distractor needles (other keys and values) at random places.
- ``multivalue``: ``needles`` values for one key (the first at depth d); the question asks for all of them.
- ``vartrack``: a chain "VAR A = 12345", "VAR B = VAR A", ... of ``needles`` variables (the first at depth d,
  the rest after it) and a distractor chain with another value; the question asks which variables hold it.

Every random choice (keys, values, haystack offset, distractor places) comes from a ``random.Random`` seeded
with (seed, task, length, depth, trial): the same seed gives the same prompts. The model continues greedily
(``generate``: one prefill into its cache, then cached decoding) for ``max_new_tokens`` tokens (default: the
answer's own token count + 4). Score of a trial: of the first k distinct answer-shaped strings in the output
(7-digit numbers; 5 capital letters for vartrack; k = expected answers), the share that are expected: exact
match for one answer, recall for several, and listing every candidate does not score. Accuracy of a (length,
depth) cell = mean score over its trials.

Perplexity by position (``ppl-position``): the data text tokenised once without special tokens (as in
``metrics``); its first ``ppl_sequences`` consecutive pieces of ``max(lengths)`` tokens, each prefilled in
chunks through the model's cache. The NLL of the token at position t (predicted from positions < t) goes to
bucket t // ``ppl_bucket``; a bucket's perplexity is exp(mean NLL of its tokens over all pieces).
"""

from __future__ import annotations

import math
import random
import re
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..io.text import default_eval_files, load_token_ids, resolve_text_files
from ..modeling.compat import cache_kwargs, output_cache
from .speed import pad_token_id

RETRIEVAL_TASKS = ("needle", "multikey", "multivalue", "vartrack")
TASKS = (*RETRIEVAL_TASKS, "ppl-position")
#: tokens of margin the model gets beyond the expected answer's own length
ANSWER_MARGIN = 4
#: the haystack corpus holds at least this many times the longest prompt (so trials start at varied places)
HAYSTACK_SPAN = 4
#: tokens per cached prefill step of ``ppl-position`` (bounds the logits' memory)
PPL_CHUNK = 1024
ANSWER_PATTERNS = {
    "needle": r"(?<!\d)\d{7}(?!\d)",
    "multikey": r"(?<!\d)\d{7}(?!\d)",
    "multivalue": r"(?<!\d)\d{7}(?!\d)",
    "vartrack": r"\b[A-Z]{5}\b",
}
PREAMBLES = {
    "needle": "A special magic number is hidden in the text below. Remember it.\n\n",
    "multikey": "Special magic numbers are hidden in the text below. Remember them.\n\n",
    "multivalue": "Special magic numbers are hidden in the text below. Remember them.\n\n",
    "vartrack": "Chains of variable assignments are hidden in the text below. Track them.\n\n",
}
_ADJECTIVES = (
    "amber brave calm dusty eager fancy gentle hollow icy jolly kind lively misty noisy odd proud quick "
    "rusty silent tidy upbeat vivid witty young zesty bold crisp dim fuzzy grumpy humble lucky"
).split()
_NOUNS = (
    "anchor bicycle candle dragon engine falcon garden harbor island jacket kettle lantern meadow needle "
    "orchard pencil quarry river saddle tunnel umbrella valley wagon yacht zipper bridge castle forest "
    "helmet ladder mirror"
).split()


@dataclass(frozen=True)
class LongContextConfig:
    """Options of the long-context suite (``hf-attn-swap eval --task ...`` and ``evaluate_long_context``)."""

    task: list[str] | None = field(
        default=None,
        metadata={
            "help": "long-context tasks: needle, multikey, multivalue, vartrack (RULER-style retrieval) and "
            "ppl-position (perplexity by position bucket); lm-eval tasks go to --tasks",
            "metavar": "TASK",
        },
    )
    lengths: list[int] = field(
        default_factory=lambda: [1024, 2048, 4096],
        metadata={"help": "context lengths in the model's tokens (prompt + answer)", "metavar": "N"},
    )
    depths: list[float] = field(
        default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0],
        metadata={"help": "needle depths, fractions of the haystack before it", "metavar": "D"},
    )
    trials: int = field(default=2, metadata={"help": "retrieval prompts per (length, depth) cell"})
    seed: int = field(default=0, metadata={"help": "seed of keys, values and haystack offsets"})
    needles: int = field(
        default=4,
        metadata={
            "help": "multikey: keys in all; multivalue: values of the key; vartrack: variables per chain"
        },
    )
    max_new_tokens: int | None = field(
        default=None, metadata={"help": "retrieval: tokens generated (default: the answer's tokens + 4)"}
    )
    ppl_sequences: int = field(
        default=4, metadata={"help": "ppl-position: sequences of max(--lengths) tokens"}
    )
    ppl_bucket: int = field(default=1024, metadata={"help": "ppl-position: tokens per position bucket"})

    def __post_init__(self):
        for name in ("task", "lengths", "depths"):  # one value from the API stands for a list of one
            value = getattr(self, name)
            if value is not None and not isinstance(value, (list, tuple)):
                object.__setattr__(self, name, [value])
        unknown = [t for t in self.task or [] if t not in TASKS]
        if unknown:
            raise ValueError(
                f"unknown --task {unknown[0]!r}: choose from {', '.join(TASKS)} (lm-eval tasks go to --tasks)"
            )
        lengths, depths, new = self.lengths, self.depths, self.max_new_tokens
        checks = [
            (not lengths or min(lengths) < 2, f"--lengths must be token counts ≥ 2, got {lengths}"),
            (
                not depths or not all(0 <= d <= 1 for d in depths),
                f"--depths must lie in [0, 1], got {depths}",
            ),
            (self.trials < 1, f"--trials must be at least 1, got {self.trials}"),
            (self.needles < 1, f"--needles must be at least 1, got {self.needles}"),
            (new is not None and new < 1, f"--max-new-tokens must be at least 1, got {new}"),
            (self.ppl_sequences < 1, f"--ppl-sequences must be at least 1, got {self.ppl_sequences}"),
            (self.ppl_bucket < 1, f"--ppl-bucket must be at least 1, got {self.ppl_bucket}"),
        ]
        for bad, message in checks:
            if bad:
                raise ValueError(message)


@dataclass(frozen=True)
class Sample:
    """One retrieval prompt. ``needle_positions``: the prompt index where each inserted statement starts (the
    asked one first); ``prefix_tokens``: tokens before the haystack; ``haystack_tokens``: filler tokens;
    ``question_tokens``: the question and answer prefix that end the prompt (``question_ids``), after the
    ``context_ids`` (special prefix, instruction, haystack with its statements): a press compresses the context."""

    task: str
    length: int
    depth: float
    trial: int
    input_ids: tuple[int, ...]
    answers: tuple[str, ...]
    needle_positions: tuple[int, ...]
    prefix_tokens: int
    haystack_tokens: int
    max_new_tokens: int
    question_tokens: int

    @property
    def context_ids(self) -> tuple[int, ...]:
        return self.input_ids[: len(self.input_ids) - self.question_tokens]

    @property
    def question_ids(self) -> tuple[int, ...]:
        return self.input_ids[len(self.input_ids) - self.question_tokens :]


@dataclass(frozen=True)
class Haystack:
    """Filler token ids (the corpus, tiled to at least ``HAYSTACK_SPAN`` x the longest prompt) and the sorted
    indices right after a token that ends with a newline (line starts), where statements may go."""

    ids: tuple[int, ...]
    line_starts: tuple[int, ...]

    @classmethod
    def from_tokens(cls, tokenizer, ids: list[int], min_tokens: int) -> Haystack:
        tiled = list(ids)
        while len(tiled) < min_tokens:
            tiled += ids
        newline = {i for i in set(tiled) if tokenizer.decode([i]).endswith("\n")}
        starts = [0] + [p + 1 for p, i in enumerate(tiled[:-1]) if i in newline]
        return cls(tuple(tiled), tuple(starts))

    def window(self, rng: random.Random, size: int) -> tuple[list[int], list[int]]:
        """``size`` tokens starting at a random line start, and the line starts in it (0 included; ``size``
        when the window ends with a newline) relative to its first token."""
        starts = [s for s in self.line_starts if s + size <= len(self.ids)] or [0]
        start = rng.choice(starts)
        inside = [s - start for s in self.line_starts if start < s <= start + size]
        return list(self.ids[start : start + size]), [0, *inside]


@dataclass(frozen=True)
class LongContextInputs:
    """Everything tokenised for one model before its weights load: retrieval samples per task, the
    ``ppl-position`` sequences ``[S, L]`` (or None), the data files and corpus size."""

    config: LongContextConfig
    tokenizer: object
    samples: dict[str, list[Sample]]
    ppl_ids: torch.Tensor | None
    files: list[str]
    corpus_tokens: int


def task_text(task: str, rng: random.Random, needles: int) -> tuple[list[str], str, tuple[str, ...]]:
    """(statements, question, expected answers) of one prompt; the asked statement first (vartrack: the asked
    chain in order, then the distractor chain)."""
    if task == "vartrack":
        return _variable_chains(rng, needles)
    count = 1 if task == "needle" else needles
    keys = rng.sample([f"{a}-{n}" for a in _ADJECTIVES for n in _NOUNS], 1 if task == "multivalue" else count)
    values = [str(v) for v in rng.sample(range(1_000_000, 10_000_000), count)]
    statements = [
        f"The special magic number for {keys[i % len(keys)]} is {v}.\n" for i, v in enumerate(values)
    ]
    if task == "multivalue":
        question = (
            f"\n\nWhat are all the special magic numbers for {keys[0]}? "
            f"The special magic numbers for {keys[0]} are"
        )
        return statements, question, tuple(values)
    question = (
        f"\n\nWhat is the special magic number for {keys[0]}? The special magic number for {keys[0]} is"
    )
    return statements, question, (values[0],)


def _variable_chains(rng: random.Random, needles: int) -> tuple[list[str], str, tuple[str, ...]]:
    """vartrack: the asked chain of ``needles`` distinct 5-letter variables and a distractor chain."""
    names: list[str] = []
    while len(names) < 2 * needles:
        name = "".join(rng.choices("ABCDEFGHIJKLMNOPQRSTUVWXYZ", k=5))
        names += [name] if name not in names else []
    value, other = (str(v) for v in rng.sample(range(10_000, 100_000), 2))
    statements = []
    for chain, start in ((names[:needles], value), (names[needles:], other)):
        statements.append(f"VAR {chain[0]} = {start}\n")
        statements += [f"VAR {b} = VAR {a}\n" for a, b in zip(chain, chain[1:], strict=False)]
    question = (
        f"\n\nQuestion: Find all variables that are assigned the value {value} in the text above. Answer: "
        f"According to the chain of variable assignments in the text above, {needles} variables are assigned "
        f"the value {value}, they are:"
    )
    return statements, question, tuple(names[:needles])


def place_statements(
    task: str, rng: random.Random, bounds: list[int], size: int, depth: float, count: int
) -> list[int]:
    """Haystack offsets (line starts in ``bounds``) of ``count`` statements: the first at the line start
    nearest to ``depth`` x ``size`` (the haystack's tokens); vartrack's asked chain after it in order, every
    other one anywhere."""
    first = min(bounds, key=lambda b: (abs(b - depth * size), b))
    if task != "vartrack":
        return [first] + [rng.choice(bounds) for _ in range(count - 1)]
    chain = count // 2
    later = [b for b in bounds if b >= first]
    return [first, *sorted(rng.choices(later, k=chain - 1)), *sorted(rng.choices(bounds, k=count - chain))]


def build_sample(
    task: str, tokenizer, haystack: Haystack, length: int, depth: float, trial: int, config: LongContextConfig
) -> Sample:
    """The prompt of one trial (the module docstring); ``ValueError`` when ``length`` leaves no haystack."""
    rng = random.Random(f"{config.seed}/{task}/{length}/{depth}/{trial}")
    statements, question, answers = task_text(task, rng, config.needles)

    def encode(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    head = tokenizer("", add_special_tokens=True)["input_ids"] + encode(PREAMBLES[task])
    pieces, tail = [encode(s) for s in statements], encode(question)
    new_tokens = config.max_new_tokens or len(encode(" " + ", ".join(answers) + ".")) + ANSWER_MARGIN
    fixed = len(head) + sum(map(len, pieces)) + len(tail) + new_tokens
    if length <= fixed:
        raise ValueError(
            f"--lengths {length} is too short for {task}: its instruction, statements, question and answer "
            f"take {fixed} tokens; use lengths above {fixed}"
        )
    filler, bounds = haystack.window(rng, length - fixed)
    places = place_statements(task, rng, bounds, len(filler), depth, len(pieces))
    ids, positions, cursor = list(head), [0] * len(pieces), 0
    for i in sorted(range(len(pieces)), key=lambda i: (places[i], i)):
        ids += filler[cursor : places[i]]
        cursor = places[i]
        positions[i] = len(ids)
        ids += pieces[i]
    ids += filler[cursor:] + tail
    return Sample(
        task, length, depth, trial, tuple(ids), answers, tuple(positions), len(head), len(filler), new_tokens,
        len(tail),
    )  # fmt: skip


def score_answer(task: str, output: str, answers: tuple[str, ...]) -> float:
    """Share of ``answers`` among the first ``len(answers)`` distinct answer-shaped strings of ``output``."""
    found: list[str] = []
    for match in re.findall(ANSWER_PATTERNS[task], output):
        if match not in found:
            found.append(match)
    return len(set(found[: len(answers)]) & set(answers)) / len(answers)


def check_positions(config: LongContextConfig, model_config, name: str = "the model") -> None:
    """``ValueError`` naming the fix when a length exceeds the model's ``max_position_embeddings``."""
    limit = getattr(model_config, "max_position_embeddings", None)
    longest = max(config.lengths)
    if config.task and limit is not None and longest > limit:
        raise ValueError(
            f"--lengths {longest} exceeds {name}'s max_position_embeddings {limit}: use lengths ≤ {limit}"
        )


def prepare_long_context(tokenizer, model_config, config: LongContextConfig, data=None, name="the model"):
    """Check the lengths and tokenise every prompt and ``ppl-position`` sequence (no weights needed).

    Args: tokenizer, model_config (for ``max_position_embeddings``), config, data (text files or folders;
    default: the Python tutorial), name (for errors). Returns ``LongContextInputs``."""
    check_positions(config, model_config, name)
    tasks = config.task or []
    files = resolve_text_files(data or default_eval_files())
    longest = max(config.lengths)
    wanted = longest * max(HAYSTACK_SPAN, config.ppl_sequences if "ppl-position" in tasks else 0)
    corpus = load_token_ids(tokenizer, files, wanted)
    ppl_ids = None
    if "ppl-position" in tasks:
        if corpus.numel() < config.ppl_sequences * longest:
            raise ValueError(
                f"ppl-position: the data holds {corpus.numel()} tokens, fewer than --ppl-sequences "
                f"{config.ppl_sequences} x {longest}: lower one of them or pass more text with --data"
            )
        ppl_ids = corpus[: config.ppl_sequences * longest].view(config.ppl_sequences, longest)
    samples = {}
    retrieval = [t for t in RETRIEVAL_TASKS if t in tasks]
    if retrieval:
        haystack = Haystack.from_tokens(tokenizer, corpus.tolist(), HAYSTACK_SPAN * longest)
        trials = range(config.trials)
        cells = [(n, d, t) for n in config.lengths for d in config.depths for t in trials]
        samples = {
            t: [build_sample(t, tokenizer, haystack, *cell, config) for cell in cells] for t in retrieval
        }
    return LongContextInputs(config, tokenizer, samples, ppl_ids, [str(f) for f in files], corpus.numel())


@torch.inference_mode()
def generate_answer(model: nn.Module, tokenizer, sample: Sample) -> str:
    """Greedy continuation of the sample's prompt (a prefill into the model's cache, then cached decoding)."""
    ids = torch.tensor([sample.input_ids], device=model.device)
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=sample.max_new_tokens,
        do_sample=False,
        pad_token_id=pad_token_id(model.generation_config),
    )
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def run_retrieval(model: nn.Module, tokenizer, samples: list[Sample], progress: bool = True) -> dict:
    """Generate and score every sample: ``summarise``'s accuracies, ``outputs`` (every trial: its length,
    depth, prompt tokens, needle position, answers, generated text and score) and ``seconds``."""
    start, outputs = time.perf_counter(), []
    for sample in tqdm(samples, desc=samples[0].task if samples else "", disable=not progress):
        outputs.append(trial_row(sample, generate_answer(model, tokenizer, sample)))
    return {**summarise(outputs), "outputs": outputs, "seconds": round(time.perf_counter() - start, 2)}


def trial_row(sample: Sample, text: str) -> dict:
    """One scored trial of ``run_retrieval``'s ``outputs``: the sample's cell, sizes, answers, ``text`` and score."""
    return {
        "length": sample.length,
        "depth": sample.depth,
        "trial": sample.trial,
        "prompt_tokens": len(sample.input_ids),
        "needle_position": sample.needle_positions[0],
        "answers": list(sample.answers),
        "output": text,
        "score": score_answer(sample.task, text, sample.answers),
    }


def summarise(outputs: list[dict]) -> dict:
    """``accuracy`` (mean score of all trials), ``cells`` (mean per length and depth), ``by_length``,
    ``trials_per_cell`` of scored trials (``{"length", "depth", "score", ...}``)."""

    def mean(**where):
        rows = [o for o in outputs if all(o[k] == v for k, v in where.items())]
        return sum(r["score"] for r in rows) / len(rows)

    cells = sorted({(o["length"], o["depth"]) for o in outputs})
    return {
        "accuracy": mean(),
        "cells": [{"length": n, "depth": d, "accuracy": mean(length=n, depth=d)} for n, d in cells],
        "by_length": [{"length": n, "accuracy": mean(length=n)} for n in sorted({n for n, _ in cells})],
        "trials_per_cell": len(outputs) // len(cells),
    }


@torch.inference_mode()
def token_nll(model: nn.Module, ids: torch.Tensor, chunk: int = PPL_CHUNK) -> torch.Tensor:
    """[L] float64: NLL of token t given tokens < t (0 at t = 0), prefilled ``chunk`` tokens at a time through
    the model's cache."""
    nll, cache = torch.zeros(ids.numel(), dtype=torch.float64), None
    for start in range(0, ids.numel(), chunk):
        piece = ids[start : start + chunk].view(1, -1).to(model.device)
        out = model(input_ids=piece, use_cache=True, **(cache_kwargs(cache) if cache is not None else {}))
        cache = output_cache(out)
        targets = ids[start + 1 : start + piece.shape[1] + 1]  # the last chunk predicts one token less
        logp = F.log_softmax(out.logits[0, : targets.numel()].float(), dim=-1).cpu()
        nll[start + 1 : start + 1 + targets.numel()] = -logp.gather(-1, targets[:, None])[:, 0]
    return nll


def perplexity_by_position(
    model: nn.Module, sequences: torch.Tensor, bucket: int, chunk: int = PPL_CHUNK
) -> dict:
    """sequences: [S, L] token ids. Returns per bucket [start, end): predicted ``tokens`` (over all
    sequences), mean ``nll`` and ``perplexity``; plus the overall perplexity and the protocol's sizes."""
    start_time = time.perf_counter()
    total = sum(token_nll(model, seq, chunk) for seq in sequences)
    count, length = sequences.shape
    buckets = []
    for start in range(0, length, bucket):
        end, first = min(start + bucket, length), max(start, 1)
        tokens = (end - first) * count
        nll = total[first:end].sum().item() / tokens if tokens else None
        ppl = None if nll is None else math.exp(nll)
        buckets.append({"start": start, "end": end, "tokens": tokens, "nll": nll, "perplexity": ppl})
    return {
        "perplexity": math.exp(total[1:].sum().item() / ((length - 1) * count)),
        "sequence_length": length,
        "sequences": count,
        "bucket": bucket,
        "buckets": buckets,
        "seconds": round(time.perf_counter() - start_time, 2),
    }


def run_long_context(model: nn.Module, inputs: LongContextInputs, progress: bool = True) -> dict:
    """The JSON-able results of one model: ``tasks`` (task -> results) plus the settings, data and sizes."""
    tasks = {t: run_retrieval(model, inputs.tokenizer, s, progress) for t, s in inputs.samples.items()}
    if inputs.ppl_ids is not None:
        tasks["ppl-position"] = perplexity_by_position(model, inputs.ppl_ids, inputs.config.ppl_bucket)
    return long_context_result(inputs, tasks)


def long_context_result(inputs: LongContextInputs, tasks: dict) -> dict:
    """A model's suite entry: ``tasks`` (task -> results) plus the settings, data and corpus size."""
    return {
        "config": asdict(inputs.config),
        "data": inputs.files[:50],
        "corpus_tokens": inputs.corpus_tokens,
        "tasks": tasks,
    }


def evaluate_long_context(model: nn.Module, tokenizer, config: LongContextConfig, data=None) -> dict:
    """The long-context suite on a loaded model (``prepare_long_context`` + ``run_long_context``).

    Args: model (a causal LM with ``generate``), tokenizer (its own), config, data (text files or folders;
    default: the Python tutorial). Returns the results dict (see ``run_long_context``)."""
    return run_long_context(model, prepare_long_context(tokenizer, model.config, config, data))


def summary_tables(results: dict[str, dict]) -> list[tuple[str, list[dict], list[tuple[str, str]]]]:
    """(title, rows, columns) per long-context task over the models that ran it: retrieval accuracy per length
    and overall; ppl-position perplexity per bucket."""
    tables = []
    for task in TASKS:
        ran = {n: long_context_tasks(r)[task] for n, r in results.items() if task in long_context_tasks(r)}
        if not ran:
            continue
        rows, columns = [], [("name", "model")]
        for name, result in ran.items():
            row = {"name": name}
            if task == "ppl-position":
                row |= {f"{b['start']}-{b['end']}": b["perplexity"] for b in result["buckets"]}
            else:
                row |= {str(x["length"]): x["accuracy"] for x in result["by_length"]}
                row["all"] = result["accuracy"]
            rows.append(row)
            columns += [(k, k) for k in row if (k, k) not in columns and k != "name"]
        title = "perplexity by position" if task == "ppl-position" else "accuracy by context length"
        tables.append((f"**{task}** ({title})", rows, columns))
    return tables


def long_context_tasks(result: dict) -> dict:
    """task -> results of one model's suite entry ({} when it ran no long-context task)."""
    return (result.get("long_context") or {}).get("tasks") or {}
