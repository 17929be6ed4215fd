"""``transformers.Trainer`` with a pluggable objective and a frozen teacher, plus crash-safe resumption.

Trainer writes ``checkpoint-N/`` non-atomically (weights, optimizer, scheduler, RNG states, then
``trainer_state.json`` last). A checkpoint counts as complete only when its ``trainer_state.json`` parses and
names step N; anything else is what a ``kill -9`` left behind and is deleted before resuming.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from pathlib import Path

from transformers import Trainer

from ..io.folders import write_json

CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
RUN_FILE = "uptrain_run.json"


class UptrainTrainer(Trainer):
    """``compute_loss`` delegates to ``objective.loss(model, input_ids, teacher, config)``."""

    def __init__(self, *args, objective, run_config, teacher=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.objective = objective
        self.run_config = run_config
        self.teacher = None if teacher is None else teacher.to(self.args.device).eval()

    def create_accelerator_and_postprocess(self) -> None:
        with fsdp_on_cpu():
            super().create_accelerator_and_postprocess()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = self.objective.loss(model, inputs["input_ids"], self.teacher, self.run_config)
        return (loss, None) if return_outputs else loss


@contextlib.contextmanager
def fsdp_on_cpu():
    """Let ``accelerate launch`` with an FSDP config shard the model over CPU processes (gloo).

    accelerate 1.16 turns ``ACCELERATE_USE_FSDP`` into FSDP only for accelerator process groups
    (``MULTI_GPU``, ``MULTI_XPU``, ...): on CPU (``MULTI_CPU``, gloo) it silently falls back to DDP.
    PyTorch's ``fully_shard`` (FSDP2) runs on CPU tensors over gloo, so while the Trainer builds its
    ``Accelerator`` the process group is presented as a multi-device one, which ``AcceleratorState`` turns
    into ``FSDP`` as on GPUs (the device stays ``cpu``, the backend gloo). A no-op everywhere else.
    """
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    shared = PartialState._shared_state
    if (
        os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true"
        or shared.get("distributed_type") != DistributedType.MULTI_CPU
    ):
        yield
        return
    shared["distributed_type"] = DistributedType.MULTI_GPU
    try:
        yield
    finally:  # AcceleratorState has set it to FSDP (kept: accelerate reads it back); else undo
        if shared.get("distributed_type") == DistributedType.MULTI_GPU:
            shared["distributed_type"] = DistributedType.MULTI_CPU


def _is_complete(folder: Path, step: int) -> bool:
    try:
        state = json.loads((folder / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    return state.get("global_step") == step


def latest_checkpoint(checkpoint_dir: Path, remove_incomplete: bool = False) -> Path | None:
    """The newest complete ``checkpoint-N`` folder (optionally deleting incomplete ones)."""
    if not checkpoint_dir.is_dir():
        return None
    found = []
    for folder in checkpoint_dir.iterdir():
        match = CHECKPOINT.match(folder.name)
        if not match or not folder.is_dir():
            continue
        step = int(match.group(1))
        if _is_complete(folder, step):
            found.append((step, folder))
        elif remove_incomplete:
            shutil.rmtree(folder, ignore_errors=True)
    return max(found)[1] if found else None


def check_same_run(checkpoint_dir: Path, identity: dict) -> None:
    """Refuse to resume checkpoints written by a run with different settings (names the differing keys)."""
    path = checkpoint_dir / RUN_FILE
    if not path.is_file():
        return
    saved = json.loads(path.read_text())
    differ = sorted(k for k in set(saved) | set(identity) if saved.get(k) != identity.get(k))
    if differ:
        details = ", ".join(f"{k}: {saved.get(k)!r} -> {identity.get(k)!r}" for k in differ)
        raise ValueError(
            f"the checkpoints in {str(checkpoint_dir)!r} belong to a run with other settings ({details}): "
            "pass --no-resume to start over, or choose another --checkpoint-dir"
        )


def write_run_identity(checkpoint_dir: Path, identity: dict) -> None:
    write_json(checkpoint_dir / RUN_FILE, identity)
