"""``transformers.Trainer`` with a pluggable objective and a frozen teacher, plus crash-safe resumption.

Trainer writes ``checkpoint-N/`` non-atomically (weights, optimizer, scheduler, RNG states, then
``trainer_state.json`` last). A checkpoint counts as complete only when its ``trainer_state.json`` parses and
names step N; anything else is what a ``kill -9`` left behind and is deleted before resuming.
"""

from __future__ import annotations

import json
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

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = self.objective.loss(model, inputs["input_ids"], self.teacher, self.run_config)
        return (loss, None) if return_outputs else loss


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
