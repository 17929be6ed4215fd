"""A real multi-process engine run: ``accelerate launch`` with the shipped FSDP2 config (full shard) on 2 CPU
processes (gloo), ``recipes/uptrain.py`` in ``full`` mode on a tiny MQA checkpoint.

Proves: (a) the 2-process loss curve equals the 1-process curve on the same data, seed and global batch
(float32, measured max |Δloss|/loss 8e-8 on this CPU; asserted <= 1e-5); (b) checkpoints are saved sharded
(one ``.distcp`` file per rank for the model and for the optimizer, no whole ``model.safetensors``);
(c) a 2-process run SIGKILLed after its step-4 checkpoint resumes from it and ends on the uninterrupted
run's loss curve and weights; (d) OUT loads with ``from_pretrained`` and holds exactly the weights of the
final sharded checkpoint (consolidated with ``dcp_to_torch_save``); (e) ``layerwise`` under FSDP equals one
process accumulating the same 2 micro-batches. ~70 s on 2 slow cores: slow.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
import yaml
from _recipes_fixtures import REPO, make_tiny_setup
from safetensors.torch import load_file

from hf_attn_swap.uptrain import UptrainConfig, uptrain

pytestmark = pytest.mark.slow

FSDP_CONFIG = REPO / "recipes" / "configs" / "accelerate_fsdp.yaml"
STEPS, SAVE_STEPS = 8, 4
LOSS_RTOL = 1e-5  # measured: 8e-8 (float32 reduction order); 1e-5 leaves room for other BLAS builds

STALL_SCRIPT = """
import os, sys, time
from pathlib import Path
from transformers import TrainerCallback
from hf_attn_swap.uptrain import UptrainConfig, uptrain

class Stall(TrainerCallback):  # every rank: report its pid once the step-4 checkpoint is written, then hang
    def on_save(self, args, state, control, **kwargs):
        if state.global_step == 4:
            Path(sys.argv[2] + f".{args.process_index}").write_text(str(os.getpid()))
            time.sleep(600)

uptrain(UptrainConfig.from_yaml(sys.argv[1]), callbacks=[Stall()])
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(script, *args, **popen) -> list[str]:
    """``accelerate launch`` with the shipped FSDP config, 2 processes, float32 (no bf16 on this CPU)."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(FSDP_CONFIG)]
    command += ["--num_processes", "2", "--mixed_precision", "no", "--main_process_port", str(free_port())]
    return [*command, str(script), *map(str, args)]


def env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def run_recipe(recipe, *overrides) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        launch(REPO / "recipes" / "uptrain.py", "--config", recipe, *overrides),
        env=env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def log(out) -> tuple[dict, list[float]]:
    saved = json.loads((out / "training_log.json").read_text())
    return saved["record"], [e["loss"] for e in saved["log_history"] if "loss" in e]


def write_recipe(tiny, path, out) -> None:
    values = {"model": str(tiny["mqa"]), "output": str(out), "data": str(tiny["data"]), "mode": "full"}
    values |= {"max_tokens": STEPS * 2 * 64, "block_size": 64, "save_steps": SAVE_STEPS, "progress": False}
    path.write_text(yaml.safe_dump(values | {"keep_checkpoints": True}))


def consolidated(checkpoint) -> dict[str, torch.Tensor]:
    """The full model weights of a sharded FSDP checkpoint (``.distcp`` files of every rank)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    target = checkpoint / "consolidated.pt"
    dcp_to_torch_save(checkpoint / "pytorch_model_fsdp_0", target)
    return torch.load(target)["model"]


def assert_sharded(checkpoint) -> None:
    for part in ("pytorch_model_fsdp_0", "optimizer_0"):
        files = sorted(p.name for p in (checkpoint / part).iterdir())
        assert files == [".metadata", "__0_0.distcp", "__1_0.distcp"], (part, files)
    assert (checkpoint / "trainer_state.json").is_file() and not (checkpoint / "model.safetensors").exists()
    assert {p.name for p in checkpoint.glob("rng_state_*.pth")} == {"rng_state_0.pth", "rng_state_1.pth"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The 1-process reference (in this process, batch 2) and the uninterrupted 2-process FSDP run (batch 1
    per process): same data, seed and global batch of 2 x 64 tokens, 8 steps."""
    root = tmp_path_factory.mktemp("fsdp")
    tiny = make_tiny_setup(root)
    write_recipe(tiny, root / "fsdp.yaml", root / "fsdp")
    started = time.time()
    proc = run_recipe(root / "fsdp.yaml")
    fsdp_seconds = time.time() - started
    one = UptrainConfig.from_yaml(root / "fsdp.yaml", [f"output={root / 'one'}", "batch_size=2"])
    uptrain(one)
    return {"root": root, "tiny": tiny, "stdout": proc.stdout, "fsdp_seconds": fsdp_seconds}


def test_two_fsdp_processes_match_one_process_and_checkpoint_sharded(runs):
    root = runs["root"]
    record, losses = log(root / "fsdp")
    one_record, one_losses = log(root / "one")
    assert record["world_size"] == 2 and one_record["world_size"] == 1
    assert record["steps"] == one_record["steps"] == STEPS
    assert record["tokens_per_step"] == one_record["tokens_per_step"] == 128
    assert len(losses) == len(one_losses) == STEPS
    worst = max(abs(a - b) / abs(b) for a, b in zip(losses, one_losses, strict=True))
    assert worst <= LOSS_RTOL, (losses, one_losses)
    print(f"2-process FSDP vs 1 process: max |dloss|/loss {worst:.2g}; FSDP run {runs['fsdp_seconds']:.0f} s")

    checkpoints = root / "fsdp.checkpoints"
    for step in (SAVE_STEPS, STEPS):
        assert_sharded(checkpoints / f"checkpoint-{step}")
    # (d) OUT is what from_pretrained loads, and it is exactly the final sharded state, gathered
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(root / "fsdp", dtype=torch.float32).state_dict()
    final = consolidated(checkpoints / f"checkpoint-{STEPS}")
    assert set(final) == set(loaded) and all(torch.equal(final[k], loaded[k]) for k in final)
    one = load_file(root / "one" / "model.safetensors")
    assert max((one[k] - loaded[k]).abs().max().item() for k in one) < 1e-5
    assert runs["stdout"].count('"tokens_trained": 1024') == 1  # the main process alone reports


def test_killed_two_process_fsdp_run_resumes_on_the_same_curve(runs):
    root, tiny = runs["root"], runs["tiny"]
    out, recipe, marker = root / "killed", root / "killed.yaml", root / "saved"
    write_recipe(tiny, recipe, out)
    script = root / "stall.py"
    script.write_text(STALL_SCRIPT)
    launcher = subprocess.Popen(
        launch(script, recipe, marker), env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        start_new_session=True,
    )  # fmt: skip
    ranks = [marker.with_name(f"saved.{rank}") for rank in (0, 1)]
    try:
        deadline = time.time() + 240
        while not all(m.is_file() for m in ranks):
            assert launcher.poll() is None, launcher.stderr.read().decode()[-4000:]
            assert time.time() < deadline, "the 2-process run never reached its step-4 checkpoint"
            time.sleep(0.2)
        # the workers run in sessions of their own (torch elastic): kill each, then the launcher
        for m in ranks:
            os.kill(int(m.read_text()), signal.SIGKILL)
        os.killpg(launcher.pid, signal.SIGKILL)
        launcher.wait(timeout=60)
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
    assert not out.exists()
    checkpoints = root / "killed.checkpoints"
    assert_sharded(checkpoints / f"checkpoint-{SAVE_STEPS}")
    assert not (checkpoints / f"checkpoint-{STEPS}").exists()

    run_recipe(recipe)  # the same command again: resumes
    record, losses = log(out)
    straight_record, straight = log(root / "fsdp")
    assert record["resumed_from_step"] == SAVE_STEPS and record["world_size"] == 2
    assert losses == straight, (losses, straight)  # restored history, then the same steps 5-8
    a, b = load_file(out / "model.safetensors"), load_file(root / "fsdp" / "model.safetensors")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_layerwise_under_fsdp_equals_one_process_with_the_same_micro_batches(runs):
    """layerwise's loss is a ratio per micro-batch, so a 2-process step equals 2 accumulated 1-process
    micro-steps (not one batch of 2); its weights are unsharded for backward through the logits (Layerwise
    ``through_output``): without it FSDP2 never unshards them and backward fails."""
    root = runs["root"]
    run_recipe(root / "fsdp.yaml", "mode=layerwise", f"output={root / 'lw'}", "keep_checkpoints=false")
    one = UptrainConfig.from_yaml(
        root / "fsdp.yaml", ["mode=layerwise", f"output={root / 'lw-one'}", "gradient_accumulation_steps=2"]
    )
    uptrain(one)
    (record, losses), (_, one_losses) = log(root / "lw"), log(root / "lw-one")
    assert record["world_size"] == 2 and len(losses) == STEPS
    assert max(abs(a - b) / abs(b) for a, b in zip(losses, one_losses, strict=True)) <= LOSS_RTOL
    a, b = load_file(root / "lw" / "model.safetensors"), load_file(root / "lw-one" / "model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
