"""Uptraining recipes on tiny models: every mode trains what it should and saves the converted format;
resumption after a crash or ``kill -9`` gives bit-identical weights; bad input fails before anything is written."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from _recipes_fixtures import REPO, folder_digest, make_tiny_setup, sample_text
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, TrainerCallback

from hf_attn_swap.cli import main as cli_main
from hf_attn_swap.testing import tiny_model
from hf_attn_swap.uptrain import UptrainConfig, uptrain
from hf_attn_swap.uptrain.distill import distillation_kl
from hf_attn_swap.uptrain.layerwise import (
    Layerwise,
    attention_on_inputs,
    capture_attention,
    relative_mse,
    residual_scale,
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_setup(tmp_path_factory.mktemp("uptrain"))


def config(tiny, out, **kw):
    values = dict(
        model=str(tiny["mqa"]),
        output=str(out),
        data=[str(tiny["data"])],
        max_tokens=12 * 64,
        block_size=64,
        save_steps=3,
        progress=False,
    )
    values.update(kw)
    return UptrainConfig(**values)


def weights(folder):
    return load_file(folder / "model.safetensors")


ATTENTION = (".q_proj.", ".k_proj.", ".v_proj.", ".o_proj.")


@pytest.mark.parametrize("mode", ["layerwise", "lora", "distill", "full"])
def test_mode_trains_and_keeps_the_converted_format(tiny, tmp_path, mode):
    """Every mode lowers held-out perplexity (the slow SmolLM2 test checks by how much)."""
    before = folder_digest(tiny["mqa"])
    heldout = dict(eval_data=[str(tiny["heldout"])], eval_tokens=512, eval_window=128)
    record = uptrain(config(tiny, tmp_path / "out", mode=mode, **heldout))
    out = tmp_path / "out"
    assert folder_digest(tiny["mqa"]) == before, "the source checkpoint was modified"
    assert not (tmp_path / "out.checkpoints").exists()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "conversion.json", "loss_curve.png"):
        assert (out / name).is_file(), name
    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob("adapter_*")), "LoRA must be merged into the weights"

    src_config = json.loads((tiny["mqa"] / "config.json").read_text())
    out_config = json.loads((out / "config.json").read_text())
    assert out_config == src_config
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert type(loaded).__name__ == "LlamaForCausalLM" and loaded.config.num_key_value_heads == 1

    report = json.loads((out / "conversion.json").read_text())
    assert report["target"] == "gqa" and report["training"][-1]["mode"] == mode
    assert record["tokens_trained"] == 12 * 64 and record["steps"] == 12
    assert record["teacher"] == (str(tiny["src"].resolve()) if mode in ("layerwise", "distill") else None)
    assert record["eval_after"]["perplexity"] < record["eval_before"]["perplexity"], "held-out perplexity"
    assert record["eval_after"]["tokens"] == record["eval_before"]["tokens"] > 0

    old, new = weights(tiny["mqa"]), weights(out)
    changed = {k for k in old if not torch.equal(old[k], new[k])}
    attention = {k for k in old if any(a in k for a in ATTENTION)}
    if mode in ("layerwise", "lora"):
        assert changed == attention, "exactly the attention weights train"
    else:
        assert changed == set(old)


def test_layerwise_hooks_reproduce_the_original_attention_exactly():
    """With student == teacher, substituting the captured inputs reproduces the captured outputs (loss 0),
    with or without the MLPs skipped; a different student gives a positive loss."""
    teacher = tiny_model("llama", seed=1, num_attention_heads=4, num_key_value_heads=2)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    inputs, outputs = capture_attention(teacher, ids)
    assert len(inputs) == 2 and inputs[0].shape == (2, 16, 64)
    for skip in (True, False):
        again = attention_on_inputs(teacher, ids, inputs, skip_mlps=skip)
        for a, b in zip(again, outputs, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    # layer 1's captured input comes from the teacher's own layer 0, not from the student's
    other = tiny_model("llama", seed=2, num_attention_heads=4, num_key_value_heads=2)
    other.model.layers[1].self_attn.load_state_dict(teacher.model.layers[1].self_attn.state_dict())
    mixed = attention_on_inputs(other, ids, inputs)
    torch.testing.assert_close(mixed[1], outputs[1], rtol=0, atol=1e-6)
    assert relative_mse(mixed[0], outputs[0]) > 0.1


def test_distillation_kl_matches_the_definition():
    s, t = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    p = torch.softmax(t / 2, -1)
    expected = (p * (p.log() - torch.log_softmax(s / 2, -1))).sum(-1).mean() * 4
    torch.testing.assert_close(distillation_kl(s, t, 2.0), expected)
    assert distillation_kl(t, t).abs() < 1e-6


class Crash(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 7:
            raise RuntimeError("simulated crash")


@pytest.mark.parametrize("mode", ["layerwise", "lora"])
def test_resume_after_crash_gives_identical_weights(tiny, tmp_path, mode):
    uptrain(config(tiny, tmp_path / "straight", mode=mode))
    with pytest.raises(RuntimeError, match="simulated crash"):
        uptrain(config(tiny, tmp_path / "resumed", mode=mode), callbacks=[Crash()])
    assert not (tmp_path / "resumed").exists()
    record = uptrain(config(tiny, tmp_path / "resumed", mode=mode))
    assert record["resumed_from_step"] == 6
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "resumed")
    assert all(torch.equal(a[k], b[k]) for k in a)


KILL_SCRIPT = """
import sys, time
from pathlib import Path
from transformers import TrainerCallback
from hf_attn_swap.uptrain import UptrainConfig, uptrain

class Stall(TrainerCallback):
    def on_save(self, args, state, control, **kwargs):
        if state.global_step == 6:
            Path(sys.argv[2]).write_text("saved")
            time.sleep(600)

uptrain(UptrainConfig.from_dict(__import__("json").loads(sys.argv[1])), callbacks=[Stall()])
"""


def test_resume_after_kill_9_gives_identical_weights(tiny, tmp_path):
    """A subprocess is SIGKILLed after its step-6 checkpoint; a debris checkpoint-9 (what a kill during a save
    leaves) is ignored; rerunning the same config finishes with the weights of an uninterrupted run."""
    cfg = config(tiny, tmp_path / "resumed", mode="full", trainable="all")
    marker = tmp_path / "saved.marker"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-c", KILL_SCRIPT, json.dumps(cfg.__dict__), str(marker)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.time() + 120
        while not marker.exists():
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.time() < deadline, "the training subprocess never reached its checkpoint"
            time.sleep(0.2)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
    checkpoints = tmp_path / "resumed.checkpoints"
    assert not (tmp_path / "resumed").exists()
    assert (checkpoints / "checkpoint-6" / "trainer_state.json").is_file()
    debris = checkpoints / "checkpoint-9"
    debris.mkdir()
    (debris / "model.safetensors").write_bytes(b"half-written")

    record = uptrain(cfg)
    assert record["resumed_from_step"] == 6
    uptrain(config(tiny, tmp_path / "straight", mode="full", trainable="all"))
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "resumed")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_checkpoints_of_another_run(tiny, tmp_path):
    with pytest.raises(RuntimeError):
        uptrain(config(tiny, tmp_path / "out", mode="layerwise"), callbacks=[Crash()])
    with pytest.raises(ValueError, match="other settings.*learning_rate"):
        uptrain(config(tiny, tmp_path / "out", mode="layerwise", learning_rate=0.1))
    record = uptrain(config(tiny, tmp_path / "out", mode="layerwise", learning_rate=0.1, resume=False))
    assert record["resumed_from_step"] is None


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--data", "{missing}"], "does not exist"),
        (["--data", "{empty}"], "is empty"),
        (["--max-tokens", "0"], "positive number of training tokens, got 0"),
        (["--block-size", "100000"], "less than one block"),
        (["--mode", "distill", "--teacher", "{missing}"], "does not exist"),
        (["--freeze", "no_such_parameter"], "match no parameter"),
        (["--eval-tokens", "64", "--eval-data", "{missing}"], "does not exist"),
        (["--warmup-ratio", "2"], "warmup_ratio is a fraction of the steps in [0, 1), got 2.0"),
        (["--mode", "lora", "--trainable", "all"], "lora trains the attention layers only"),
        (["--mode", "layerwise", "--trainable", "all"], "layerwise trains the attention layers only"),
    ],
)
def test_bad_input_fails_clearly_and_writes_nothing(tiny, tmp_path, capsys, flags, message):
    empty = tmp_path / "empty.txt"
    empty.touch()
    flags = [f.format(missing=tmp_path / "nope", empty=empty) for f in flags]
    base = ["--data", str(tiny["data"]), "--max-tokens", "128", "--block-size", "64"]
    before = folder_digest(tiny["mqa"])
    code = cli_main(["uptrain", str(tiny["mqa"]), str(tmp_path / "out"), *base, *flags])
    assert code == 2
    assert message in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.txt"]
    assert folder_digest(tiny["mqa"]) == before


def test_a_deepseek_v3_exports_scaled_latent_must_be_frozen(tiny, tmp_path, capsys):
    """A stock deepseek_v3 export keeps kv_a_layernorm linear by scaling the latent rows of kv_a_proj_with_mqa to
    ~1e-8 (Adam's first step would swamp them): every mode refuses to train them (one line naming the fix,
    nothing written) unless a --freeze pattern covers them; LoRA's parameters under them are frozen too."""
    from hf_attn_swap.pipeline.convert import convert_checkpoint
    from hf_attn_swap.uptrain.base import LINEAR_REGIME_NORM_WEIGHT, exposed_scaled_latents

    mla = tmp_path / "mla"
    convert_checkpoint(tiny["src"], mla, to="mla", mla={"kv_lora_rank": 8, "qk_rope_head_dim": 8})
    norms = [v for k, v in weights(mla).items() if k.endswith("kv_a_layernorm.weight")]
    assert norms and min(float(v.abs().median()) for v in norms) > LINEAR_REGIME_NORM_WEIGHT
    layers = len(norms)
    assert len(exposed_scaled_latents(mla, None)) == layers
    assert len(exposed_scaled_latents(mla, ["kv_a_proj_with_mqa.weight"])) == layers  # misses LoRA's A/B
    assert exposed_scaled_latents(mla, ["kv_a_proj"]) == []
    assert exposed_scaled_latents(tiny["mqa"], None) == []  # no latent norm
    before = folder_digest(mla)
    for mode in ("layerwise", "lora"):
        flags = ["--mode", mode, "--data", str(tiny["data"]), "--max-tokens", "128", "--block-size", "64"]
        assert cli_main(["uptrain", str(mla), str(tmp_path / "out"), *flags]) == 2
        err = capsys.readouterr().err
        assert "--freeze kv_a_proj_with_mqa" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists() and folder_digest(mla) == before
    cfg = config(tiny, tmp_path / "lora", model=str(mla), mode="lora", max_tokens=128, freeze=["kv_a_proj"])
    uptrain(cfg)
    old, new = weights(mla), weights(tmp_path / "lora")
    changed = {k for k in old if not torch.equal(old[k], new[k])}
    assert changed and not [k for k in changed if "kv_a_proj_with_mqa" in k]


def test_distill_without_teacher_names_the_fix(tiny, tmp_path, capsys):
    code = cli_main(
        ["uptrain", str(tiny["src"]), str(tmp_path / "o"), "--max-tokens", "64", "--mode", "distill"]
    )
    assert code == 2 and "pass --teacher SRC" in capsys.readouterr().err


def test_cli_uptrain_with_recipe_config(tiny, tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"mode: lora\nblock_size: 64\nlora_r: 4\nlearning_rate: 1e-3\ndata: {tiny['data']}\n")
    code = cli_main(
        ["uptrain", str(tiny["mqa"]), str(tmp_path / "out"), "--config", str(recipe), "--max-tokens", "256"]
        + ["--no-progress", "--json", str(tmp_path / "record.json")]
    )
    assert code == 0, capsys.readouterr().err
    record = json.loads((tmp_path / "record.json").read_text())
    assert record["mode"] == "lora" and record["config"]["lora_r"] == 4 and record["steps"] == 4
    assert record["learning_rate"] == 1e-3


def layerwise_error(student, teacher, ids) -> float:
    inputs, targets = capture_attention(teacher, ids)
    with torch.no_grad():
        outputs = attention_on_inputs(student, ids, inputs)
    return torch.stack([relative_mse(o, t) for o, t in zip(outputs, targets, strict=True)]).mean().item()


def test_layerwise_target_follows_the_exports_residual_scale():
    """A stock deepseek_v3 export computes what its plugin-format model computes with the residual stream times
    s = sqrt(1e-6 / eps) (0.1 here), so its attention layers write s y: the layerwise loss must be the same for
    both (before the fix the export's target was y, a relative error of (1 - s)^2 = 0.81 at every layer)."""
    import copy

    from hf_attn_swap import convert_to_mla
    from hf_attn_swap.export.deepseek_v3 import to_deepseek_v3

    teacher = tiny_model("llama", num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-4).eval()
    plugin = copy.deepcopy(teacher)
    convert_to_mla(plugin, 24, 8)
    exported, details = to_deepseek_v3(copy.deepcopy(plugin))
    assert details["residual_scale"] == pytest.approx(0.1)
    ids = torch.randint(3, 128, (2, 24), generator=torch.Generator().manual_seed(0))
    losses = []
    for model, scale in ((plugin.eval(), 1.0), (exported.eval(), 0.1)):
        assert residual_scale(model, teacher) == pytest.approx(scale, rel=1e-6)
        with torch.no_grad():
            losses.append(float(Layerwise().loss(model, ids, teacher, None)))
    assert 0 < losses[0] < 1
    assert losses[1] == pytest.approx(losses[0], rel=1e-4)
    # MLA starts from a least-squares o_proj: the measured default learning rate is 10x lower there
    assert Layerwise().learning_rate_for(exported.config.to_dict()) == 1e-4
    assert Layerwise().learning_rate_for(teacher.config.to_dict()) == Layerwise.default_learning_rate == 1e-3
    other = tiny_model("llama", seed=5, num_attention_heads=4, num_key_value_heads=2)
    with pytest.raises(ValueError, match="scaled copy of the teacher's"):
        residual_scale(other, teacher)


def test_layerwise_and_lora_work_on_an_mla_form_attention(tiny, tmp_path):
    """The recipes are format-agnostic: a DeepSeek-V3 (MLA) student of the same width and depth learns the
    Llama teacher's attention outputs; the output keeps the deepseek_v3 classes; only attention trains."""
    from transformers import AutoConfig, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny["src"])
    config = AutoConfig.for_model(
        "deepseek_v3",
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        kv_lora_rank=16,
        q_lora_rank=None,
        qk_rope_head_dim=8,
        qk_nope_head_dim=16,
        v_head_dim=16,
        first_k_dense_replace=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        initializer_range=0.2,
    )
    torch.manual_seed(0)
    mla = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(tiny["src"]).eval()
    with torch.no_grad():  # layerwise needs the student's residual stream to be the teacher's (up to a scale)
        mla.get_input_embeddings().weight.copy_(teacher.get_input_embeddings().weight)
    mla.save_pretrained(tmp_path / "mla")
    tokenizer.save_pretrained(tmp_path / "mla")
    ids = tokenizer(sample_text("tutorial", 2000), return_tensors="pt")["input_ids"][:, :128]
    for mode in ("layerwise", "lora"):
        cfg = UptrainConfig(
            model=str(tmp_path / "mla"),
            output=str(tmp_path / mode),
            teacher=str(tiny["src"]),
            data=[str(tiny["data"])],
            mode=mode,
            max_tokens=2048 if mode == "layerwise" else 512,
            block_size=64,
            learning_rate=3e-3,
            save_steps=100,
            progress=False,
            freeze=["kv_a_proj_with_mqa"] if mode == "lora" else None,
        )
        uptrain(cfg)
        trained = AutoModelForCausalLM.from_pretrained(tmp_path / mode).eval()
        assert type(trained).__name__ == "DeepseekV3ForCausalLM"
        old, new = weights(tmp_path / "mla"), weights(tmp_path / mode)
        changed = {k for k in old if not torch.equal(old[k], new[k])}
        assert changed and all(".self_attn." in k for k in changed)
        if mode == "lora":
            assert not [k for k in changed if "kv_a_proj_with_mqa" in k], "frozen by freeze=[...]"
        if mode == "layerwise":
            assert layerwise_error(trained, teacher, ids) < 0.9 * layerwise_error(mla.eval(), teacher, ids)


def test_output_keeps_the_source_dtype(tiny, tmp_path):
    """Training runs in float32; a bfloat16 checkpoint comes back as bfloat16 (after the float32 eval)."""
    from hf_attn_swap.pipeline.convert import convert_checkpoint

    convert_checkpoint(tiny["src"], tmp_path / "bf16", to="gqa", num_key_value_heads=1, dtype="bfloat16")
    cfg = config(tiny, tmp_path / "out", model=str(tmp_path / "bf16"), mode="lora", max_tokens=256)
    cfg.eval_tokens, cfg.eval_window, cfg.eval_data = 128, 64, [str(tiny["data"])]
    record = uptrain(cfg)
    assert record["eval_after"]["perplexity"] > 0
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"
    assert {t.dtype for t in weights(tmp_path / "out").values()} == {torch.bfloat16}
