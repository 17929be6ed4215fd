"""The long-context suite (``hf_attn_swap.evaluate.longcontext``): an oracle that reads the answer out of the
prompt scores 1.0 and a random model 0, prompts are seeded and put the needle at the asked depth,
perplexity by position equals a direct computation, and ``eval --task`` writes JSON and PNGs or refuses bad
values with one line."""

from __future__ import annotations

import json
import math
import re
from types import SimpleNamespace

import pytest
import torch
from _recipes_fixtures import sample_text
from transformers import GenerationConfig

from hf_attn_swap.cli import main as cli_main
from hf_attn_swap.evaluate.longcontext import (
    RETRIEVAL_TASKS,
    LongContextConfig,
    evaluate_long_context,
    perplexity_by_position,
    prepare_long_context,
    run_long_context,
    score_answer,
)
from hf_attn_swap.io.checkpoints import load_causal_lm, load_tokenizer
from hf_attn_swap.io.text import load_token_ids
from hf_attn_swap.testing import save_tiny_checkpoint, tiny_model, tiny_tokenizer

POSITIONS = SimpleNamespace(max_position_embeddings=4096)


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    path = tmp_path_factory.mktemp("longcontext") / "tutorial.txt"
    path.write_text(sample_text("tutorial", 20_000))
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("longcontext") / "tiny")


def oracle_answer(prompt: str) -> str:
    """What a perfect reader of the prompt answers (found with regular expressions, not from the sample)."""
    asked = re.search(r"assigned the value (\d+) in the text above", prompt)
    if asked:
        values: dict[str, str] = {}
        for name, source in re.findall(r"^VAR ([A-Z]{5}) = (VAR [A-Z]{5}|\d+)$", prompt, re.M):
            values[name] = values.get(source[4:], "") if source.startswith("VAR ") else source
        return " " + ", ".join(n for n, v in values.items() if v == asked.group(1))
    key = re.search(r"What (?:is|are all) the special magic numbers? for (\S+)\?", prompt).group(1)
    found = re.findall(rf"^The special magic number for {re.escape(key)} is (\d{{7}})\.$", prompt, re.M)
    return " " + ", ".join(found) + "."


class OracleModel:
    """Stands in for a causal LM: ``generate`` appends ``oracle_answer`` of the decoded prompt."""

    config = POSITIONS
    device = torch.device("cpu")
    generation_config = GenerationConfig(eos_token_id=2)

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def generate(self, input_ids, max_new_tokens, **kwargs):
        answer = oracle_answer(self.tokenizer.decode(input_ids[0]))
        ids = self.tokenizer(answer, add_special_tokens=False)["input_ids"][:max_new_tokens]
        return torch.cat([input_ids, torch.tensor([ids])], dim=1)


def test_an_oracle_that_reads_the_prompt_scores_one(text):
    tokenizer = tiny_tokenizer()
    config = LongContextConfig(task=list(RETRIEVAL_TASKS), lengths=[700, 900], depths=[0, 0.5, 1], trials=2)
    inputs = prepare_long_context(tokenizer, POSITIONS, config, [text])
    results = run_long_context(OracleModel(tokenizer), inputs, progress=False)["tasks"]
    for task in RETRIEVAL_TASKS:
        assert results[task]["accuracy"] == 1.0, (task, results[task]["outputs"][0])
        assert [(c["length"], c["depth"]) for c in results[task]["cells"]] == [
            (n, d) for n in (700, 900) for d in (0, 0.5, 1)
        ]
        assert results[task]["trials_per_cell"] == 2 and len(results[task]["outputs"]) == 12
    for samples in inputs.samples.values():  # prompt + answer budget fill the length exactly
        assert all(len(s.input_ids) + s.max_new_tokens == s.length for s in samples)


def test_a_random_model_scores_zero(checkpoint, text):
    """The real path: ``generate`` on a tiny random checkpoint (its own cache) finds no needle."""
    model, tokenizer = load_causal_lm(checkpoint), load_tokenizer(checkpoint)
    config = LongContextConfig(task=["needle", "vartrack"], lengths=[500], depths=[0, 1], trials=2, needles=2)
    results = evaluate_long_context(model, tokenizer, config, [text])
    for task in ("needle", "vartrack"):
        assert results["tasks"][task]["accuracy"] == 0.0
        assert any(o["output"] for o in results["tasks"][task]["outputs"])  # it did generate
    assert results["config"]["seed"] == 0 and results["corpus_tokens"] == 4 * 500


@pytest.mark.parametrize(
    "task, output, answers, score",
    [
        ("needle", " 1234567.", ("1234567",), 1.0),
        ("needle", " 7654321, or maybe 1234567", ("1234567",), 0.0),  # only the first number counts
        ("needle", " 12345678", ("1234567",), 0.0),  # eight digits are not the seven-digit answer
        ("multivalue", " 1111111, 1111111, 3333333", ("1111111", "3333333"), 1.0),
        ("multivalue", " 1111111, 2222222, 3333333", ("1111111", "3333333"), 0.5),
        ("vartrack", " VAR ABCDE, VAR FGHIJ", ("FGHIJ", "ABCDE"), 1.0),
        ("vartrack", " ABCDE QWERT FGHIJ", ("FGHIJ", "ABCDE"), 0.5),
    ],
)
def test_the_scorer_counts_the_first_answers_only(task, output, answers, score):
    assert score_answer(task, output, answers) == score


def test_prompts_depend_on_the_seed_only(text):
    tokenizer = tiny_tokenizer()

    def samples(seed):
        config = LongContextConfig(
            task=list(RETRIEVAL_TASKS), lengths=[800], depths=[0.5], trials=3, seed=seed
        )
        return prepare_long_context(tokenizer, POSITIONS, config, [text]).samples

    first, again, other = samples(0), samples(0), samples(1)
    assert first == again
    for task in RETRIEVAL_TASKS:
        assert {s.answers for s in first[task]} != {s.answers for s in other[task]}
        assert len({s.input_ids for s in first[task]}) == 3  # trials differ from each other

    def keys(samples):
        return [re.search(r"number for (\S+)\? The", tokenizer.decode(s.input_ids))[1] for s in samples]

    assert keys(first["needle"]) == keys(again["needle"]) and keys(first["needle"]) != keys(other["needle"])


def test_the_needle_sits_at_the_requested_depth(tmp_path):
    """Filler lines of 8 tokens: the asked statement starts at the line start nearest to depth x haystack
    tokens (the haystack before it, less the statements inserted before it, counted in tokens)."""
    tokenizer = tiny_tokenizer()
    filler = tmp_path / "lines.txt"
    filler.write_text("".join(f"line{i % 1000:03d}\n" for i in range(1000)))
    depths = [0, 0.1, 0.25, 0.5, 0.75, 0.9, 1]
    config = LongContextConfig(
        task=["needle", "multikey", "vartrack"], lengths=[1000], depths=depths, trials=1
    )
    samples = prepare_long_context(tokenizer, POSITIONS, config, [filler]).samples
    for task, task_samples in samples.items():
        for sample in task_samples:
            start = sample.needle_positions[0]
            earlier = [p for p in sample.needle_positions[1:] if p < start]  # statements before the asked one
            inserted = sum(len(tokenizer.decode(sample.input_ids[p:]).split("\n", 1)[0]) + 1 for p in earlier)
            before = start - sample.prefix_tokens - inserted
            size = sample.haystack_tokens  # the haystack's line starts: every 8 tokens from its first one
            nearest = min(range(0, size + 1, 8), key=lambda b: (abs(b - sample.depth * size), b))
            assert before == nearest and abs(before - sample.depth * size) < 8, (task, sample.depth)
            statement = tokenizer.decode(sample.input_ids[start:]).split("\n", 1)[0]
            assert statement.startswith("The special magic number" if task != "vartrack" else "VAR ")
            assert tokenizer.decode(sample.input_ids[start - 1 : start]) == "\n"
        chain = samples["vartrack"][0].needle_positions[: config.needles]
        assert list(chain) == sorted(chain)  # the asked chain in assignment order


@pytest.mark.parametrize("kind", ["llama", "mla"])
def test_perplexity_by_position_equals_a_direct_computation(kind):
    """Chunked cached prefill (chunks of 24, buckets of 16) against one uncached forward per sequence."""
    if kind == "mla":
        from hf_attn_swap import convert_to_mla

        model = tiny_model("qwen2", num_attention_heads=4, num_key_value_heads=2)
        convert_to_mla(model, 24, 8)
    else:
        model = tiny_model("llama")
    sequences = torch.randint(3, 128, (3, 64), generator=torch.Generator().manual_seed(0))
    result = perplexity_by_position(model, sequences, bucket=16, chunk=24)
    with torch.no_grad():
        logp = torch.log_softmax(model(sequences).logits[:, :-1].double(), -1)
    nll = -logp.gather(-1, sequences[:, 1:, None])[..., 0]  # [S, 63]: the token at position t = 1..63
    assert [(b["start"], b["end"], b["tokens"]) for b in result["buckets"]] == [
        (0, 16, 45),
        (16, 32, 48),
        (32, 48, 48),
        (48, 64, 48),
    ]
    for b in result["buckets"]:
        expected = nll[:, max(b["start"], 1) - 1 : b["end"] - 1].mean().item()
        assert b["nll"] == pytest.approx(expected, rel=1e-5)
        assert b["perplexity"] == pytest.approx(math.exp(expected), rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(nll.mean().item()), rel=1e-5)


def test_ppl_sequences_are_consecutive_pieces_of_the_text(text):
    tokenizer = tiny_tokenizer()
    config = LongContextConfig(task=["ppl-position"], lengths=[100, 300], ppl_sequences=3)
    inputs = prepare_long_context(tokenizer, POSITIONS, config, [text])
    assert inputs.ppl_ids.shape == (3, 300) and not inputs.samples
    assert torch.equal(inputs.ppl_ids.flatten(), load_token_ids(tokenizer, [text], 900))


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--task", "needle", "--trials", "0"], "--trials must be at least 1, got 0"),
        (["--task", "haystack"], "unknown --task 'haystack': choose from needle, multikey"),
        (["--task", "needle", "--depths", "1.5"], "--depths must lie in [0, 1]"),
        (
            ["--task", "needle", "--lengths", "8192"],
            "exceeds tiny's max_position_embeddings 4096: use lengths ≤ 4096",
        ),
        (["--task", "needle", "--lengths", "100"], "--lengths 100 is too short for needle"),
        (
            ["--task", "ppl-position", "--lengths", "4000", "--ppl-sequences", "9"],
            "lower one of them or pass more",
        ),
    ],
)
def test_bad_values_give_one_line_and_exit_2(checkpoint, text, flags, message, capsys):
    assert cli_main(["eval", str(checkpoint), "--data", str(text), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("hf-attn-swap eval: error: ") and "\n" not in err and message in err, err


def test_eval_task_writes_json_markdown_and_plots(checkpoint, text, tmp_path, capsys):
    out, plots = tmp_path / "out.json", tmp_path / "plots"
    flags = ["--task", "needle", "ppl-position", "--lengths", "300", "--trials", "2", "--ppl-bucket", "100"]
    flags += ["--ppl-sequences", "2", "--max-tokens", "200", "--window", "100", "--data", str(text)]
    code = cli_main(["eval", str(checkpoint), *flags, "--json", str(out), "--plots", str(plots)])
    code_md = cli_main(["eval", f"a={checkpoint}", *flags, "--markdown", str(tmp_path / "e.md")])
    assert code == 0 == code_md, capsys.readouterr().err
    payload = json.loads(out.read_text())
    result = payload["long_context"]
    assert payload["models"]["tiny"]["long_context"] == result
    assert result["config"]["lengths"] == [300] and result["config"]["seed"] == 0
    needle = result["tasks"]["needle"]
    assert len(needle["cells"]) == 5 and len(needle["outputs"]) == 10 and 0 <= needle["accuracy"] <= 1
    assert [b["start"] for b in result["tasks"]["ppl-position"]["buckets"]] == [0, 100, 200]
    for png in ("longcontext_tiny.png", "ppl_by_position.png", "quality_vs_kv.png"):
        assert (plots / png).read_bytes()[:4] == b"\x89PNG"
    table = (tmp_path / "e.md").read_text()
    assert "needle acc" in table and "**needle** (accuracy by context length)" in table
    assert "| a | 0 | 0 |" in table and "**ppl-position** (perplexity by position)" in table
