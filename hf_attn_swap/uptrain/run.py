"""``uptrain(config)``: train a converted checkpoint back towards the original model on local text.

Everything checkable is checked before any model is loaded; checkpoints go to ``OUTPUT.checkpoints`` and a
rerun of the same command resumes from the newest complete one (same final weights as an uninterrupted run);
``OUTPUT`` appears only when training finished, written in one step, in the same format as the input folder.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch

from ..io.checkpoints import copy_tokenizer_files, load_causal_lm, load_tokenizer
from ..io.folders import atomic_output_dir, check_output, check_source, overlaps, write_json
from ..io.text import default_eval_files, default_train_files, resolve_text_files
from ..methods.report import REPORT_FILE, load_report
from .base import Objective, exposed_scaled_latents, freeze_matching
from .config import UptrainConfig
from .data import packed_blocks, steps_for_budget
from .distill import Distill
from .full import FullFineTune
from .layerwise import Layerwise
from .lora import LoRA
from .trainer import UptrainTrainer, check_same_run, latest_checkpoint, write_run_identity

MODES: dict[str, type[Objective]] = {m.name: m for m in (FullFineTune, LoRA, Distill, Layerwise)}
LOSS_CURVE = "loss_curve.png"
TRAINING_LOG = "training_log.json"


def resolve_teacher(teacher: str | None, model: Path, mode: str) -> Path:
    """``teacher`` or, by default, the source checkpoint recorded in ``model/conversion.json``."""
    if teacher is None:
        source = ((load_report(model) or {}).get("details") or {}).get("source")
        if not source:
            raise ValueError(
                f"mode {mode!r} needs the original model as teacher, and {str(model)!r} has no conversion.json "
                "recording its source: pass --teacher SRC"
            )
        teacher = source
    return check_source(teacher)


def cpu_only() -> bool:
    """No GPU-like accelerator: train on CPU (several processes under torchrun/accelerate use gloo DDP)."""
    xpu = getattr(torch, "xpu", None)
    return not (
        torch.cuda.is_available() or torch.backends.mps.is_available() or (xpu and xpu.is_available())
    )


def _normalised(config: UptrainConfig) -> UptrainConfig:
    """Absolute paths, so a resumed run is recognised whatever the working directory."""

    def absolute(p):
        return None if p is None else os.path.realpath(Path(p).expanduser())  # no RuntimeError on a link loop

    return dataclasses.replace(
        config,
        model=absolute(config.model),
        output=absolute(config.output),
        teacher=absolute(config.teacher),
        checkpoint_dir=absolute(config.checkpoint_dir),
        data=[absolute(p) for p in config.data] if config.data else None,
        eval_data=[absolute(p) for p in config.eval_data] if config.eval_data else None,
    )


def check_settings(config: UptrainConfig) -> tuple[Objective, list[Path]]:
    """Every check that reads neither checkpoint: mode, budget, ranges, output and checkpoint paths, data
    files. Returns (objective, data files). A recipe runs it before its ``convert:`` section builds MODEL."""
    if not config.model or not config.output:
        raise ValueError("uptrain needs a MODEL folder and an OUT folder")
    if config.mode not in MODES:
        raise ValueError(f"unknown uptrain mode {config.mode!r}; choose one of {sorted(MODES)}")
    objective = MODES[config.mode]()
    steps_for_budget(config.max_tokens, 1)  # budget must be a positive int
    for key in ("block_size", "batch_size", "gradient_accumulation_steps", "save_steps", "logging_steps"):
        if getattr(config, key) < 1:
            raise ValueError(f"{key} must be at least 1, got {getattr(config, key)}")
    for key, in_range, what in RANGES:
        value = getattr(config, key)
        if value is not None and not in_range(value):
            raise ValueError(f"{key} {what}, got {value}")
    if config.trainable not in (None, "attention", "all"):
        raise ValueError(f"trainable must be 'attention' or 'all', got {config.trainable!r}")
    if objective.default_trainable == "attention" and config.trainable not in (None, "attention"):
        raise ValueError(
            f"{config.mode} trains the attention layers only: leave trainable unset or 'attention'"
        )
    output = check_output(config.output, src=config.model, overwrite=config.overwrite)
    checkpoints = config.checkpoint_path()
    if overlaps(checkpoints, config.model):
        raise ValueError(f"the checkpoint folder must not overlap the model checkpoint {config.model!r}")
    if overlaps(checkpoints, output):
        raise ValueError("the checkpoint folder must not be inside OUTPUT (OUTPUT is written in one step)")
    if checkpoints.exists() and not checkpoints.is_dir():
        raise ValueError(f"checkpoint folder {str(checkpoints)!r} exists and is not a folder")
    files = resolve_text_files(config.data or default_train_files())
    if config.eval_tokens:
        resolve_text_files(config.eval_data or default_eval_files())
    return objective, files


#: (setting, whether a value is in range, the range in words) checked by ``check_settings`` (None: the default)
RANGES = (
    ("learning_rate", lambda v: v > 0, "must be positive"),
    ("warmup_ratio", lambda v: 0 <= v < 1, "is a fraction of the steps in [0, 1)"),
    ("weight_decay", lambda v: v >= 0, "must be at least 0"),
    ("max_grad_norm", lambda v: v >= 0, "must be at least 0 (0: no clipping)"),
    ("lora_r", lambda v: v >= 1, "must be at least 1"),
    ("lora_alpha", lambda v: v > 0, "must be positive"),
    ("lora_dropout", lambda v: 0 <= v < 1, "is a probability in [0, 1)"),
    ("kl_temperature", lambda v: v > 0, "must be positive"),
    ("ce_weight", lambda v: v >= 0, "must be at least 0"),
    ("eval_tokens", lambda v: v == 0 or v >= 2, "must be 0 (off) or at least 2"),
    ("eval_window", lambda v: v >= 2, "must be at least 2 tokens"),
)


def validate(config: UptrainConfig) -> tuple[Objective, Path, Path, Path | None, list[Path]]:
    """All checks that need no model: ``check_settings``, then the checkpoints (MODEL and the teacher) are
    real folders that do not overlap the outputs. Returns (objective, model, output, teacher, data files).
    Nothing is written."""
    objective, files = check_settings(config)
    model = check_source(config.model)
    exposed = exposed_scaled_latents(model, config.freeze)
    if exposed:
        raise ValueError(
            f"{str(model)!r} is a stock deepseek_v3 MLA export whose kv_a_layernorm runs in its linear regime "
            f"(latent rows of kv_a_proj_with_mqa scaled to ~1e-8; {len(exposed)} layers): training them breaks "
            "the latent. Add --freeze kv_a_proj_with_mqa (recipes: freeze: [kv_a_proj_with_mqa])"
        )
    output = check_output(config.output, src=model, overwrite=config.overwrite)
    teacher = resolve_teacher(config.teacher, model, config.mode) if objective.needs_teacher else None
    checkpoints = config.checkpoint_path()
    for name, path in (("model", model), ("teacher", teacher)):
        if path is not None and (overlaps(output, path) or overlaps(checkpoints, path)):
            raise ValueError(
                f"output/checkpoint folders must not overlap the {name} checkpoint {str(path)!r}"
            )
    return objective, model, output, teacher, files


def _eval_perplexity(model, tokenizer, config: UptrainConfig) -> dict:
    from ..evaluate.metrics import evaluate_models
    from ..io.text import load_token_ids

    ids = load_token_ids(tokenizer, config.eval_data or default_eval_files(), config.eval_tokens)
    result = evaluate_models({"m": model}, ids, window=config.eval_window, progress=config.progress)["m"]
    return {k: result[k] for k in ("perplexity", "tokens", "window")}


def training_arguments(config: UptrainConfig, learning_rate: float):
    """Trainer settings of a run (``max_steps`` is set once the world size, hence the step size, is known)."""
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(config.checkpoint_path()),
        max_steps=1,
        per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        learning_rate=learning_rate,
        lr_scheduler_type=config.lr_scheduler,
        warmup_steps=config.warmup_ratio,
        weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm,
        logging_steps=config.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=2,
        seed=config.seed,
        data_seed=config.seed,
        bf16=config.bf16,
        report_to="none",
        remove_unused_columns=False,
        dataloader_drop_last=True,
        disable_tqdm=not config.progress,
        dataloader_pin_memory=torch.cuda.is_available(),
        use_cpu=cpu_only(),
        ddp_find_unused_parameters=False,
    )


def uptrain(config: UptrainConfig, callbacks=()) -> dict | None:
    """Run (or resume) one uptraining run; returns the training record also stored in OUTPUT (None on the
    non-main processes of a distributed run)."""
    from transformers import default_data_collator, set_seed

    started = time.time()
    config = _normalised(config)
    objective, model_path, output, teacher_path, files = validate(config)
    checkpoint_dir = config.checkpoint_path()
    model_config = json.loads((model_path / "config.json").read_text())
    learning_rate = config.learning_rate or objective.learning_rate_for(model_config)
    args = training_arguments(config, learning_rate)
    tokens_per_step = (
        config.block_size * config.batch_size * config.gradient_accumulation_steps * args.world_size
    )
    args.max_steps = max_steps = steps_for_budget(config.max_tokens, tokens_per_step)
    main = args.process_index == 0

    tokenizer = load_tokenizer(model_path)
    dataset, files = packed_blocks(
        tokenizer, files, config.block_size, max_steps * tokens_per_step // config.block_size
    )

    resume_from = None
    identity = config.run_identity()
    if config.resume:
        check_same_run(checkpoint_dir, identity)
        resume_from = latest_checkpoint(checkpoint_dir, remove_incomplete=main)
    elif main and checkpoint_dir.exists():
        shutil.rmtree(checkpoint_dir)

    set_seed(config.seed)
    student = load_causal_lm(model_path, torch.float32, config.attn_implementation)
    teacher = None
    if teacher_path is not None:
        teacher = load_causal_lm(teacher_path, torch.float32, config.attn_implementation)
        if teacher.get_output_embeddings().weight.shape[0] != student.get_output_embeddings().weight.shape[0]:
            raise ValueError(f"teacher {str(teacher_path)!r} has a different vocabulary than the model")
    objective.bind(student, teacher)
    eval_before = _eval_perplexity(student, tokenizer, config) if config.eval_tokens and main else None
    model = objective.prepare(student, config)
    freeze_matching(model, config.freeze)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    trainer = UptrainTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=default_data_collator,
        objective=objective,
        run_config=config,
        teacher=teacher,
        callbacks=list(callbacks),
    )
    sharded = trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled
    if isinstance(objective, Layerwise) and sharded:
        objective.skip_mlps, objective.through_output = False, True
    if main:
        print(
            f"uptrain {config.mode}: {max_steps} steps x {tokens_per_step} tokens = {max_steps * tokens_per_step} "
            f"tokens ({len(dataset)} blocks of {config.block_size} from {len(files)} file(s)), "
            f"{trainable:,} trainable parameters, lr {learning_rate:g}"
            + (f"; resuming from {resume_from.name}" if resume_from else ""),
            file=sys.stderr,
        )
    if main:
        write_run_identity(checkpoint_dir, identity)
    result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)

    trained = _gather_trained_model(trainer, objective, model_path, checkpoint_dir / "final", sharded)
    record = None
    if main:
        final = objective.finalize(trained)
        final.config.use_cache = json.loads((model_path / "config.json").read_text()).get("use_cache", True)
        losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
        record = {
            "mode": config.mode,
            "max_tokens": config.max_tokens,
            "tokens_trained": max_steps * tokens_per_step,
            "steps": max_steps,
            "tokens_per_step": tokens_per_step,
            "block_size": config.block_size,
            "learning_rate": learning_rate,
            "trainable": config.trainable or objective.default_trainable,
            "trainable_parameters": trainable,
            "frozen": config.freeze,
            "teacher": None if teacher_path is None else str(teacher_path),
            "data": [str(f) for f in files[:20]]
            + ([f"... {len(files) - 20} more"] if len(files) > 20 else []),
            "seed": config.seed,
            "world_size": args.world_size,
            "device": str(args.device),
            "first_loss": losses[0] if losses else None,
            "final_loss": losses[-1] if losses else None,
            "resumed_from_step": None if resume_from is None else int(resume_from.name.split("-")[1]),
            "train_runtime_seconds": round(result.metrics.get("train_runtime", 0.0), 2),
            "eval_before": eval_before,
            "eval_after": _eval_perplexity(final, tokenizer, config) if config.eval_tokens else None,
            "config": dataclasses.asdict(config),
        }
        saved_dtype = checkpoint_dtype(model_path)
        if saved_dtype is not None and saved_dtype != torch.float32:
            final = final.to(saved_dtype)
        record["wall_seconds"] = round(time.time() - started, 2)
        _write_output(final, model_path, output, config, record, trainer.state.log_history, tokens_per_step)
        if not config.keep_checkpoints:
            shutil.rmtree(checkpoint_dir, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    return record


def checkpoint_dtype(model_path: Path):
    """The dtype the checkpoint was saved in (``config.json``), to save the trained model the same way."""
    config = json.loads((model_path / "config.json").read_text())
    name = config.get("dtype") or config.get("torch_dtype")
    return getattr(torch, name, None) if isinstance(name, str) else None


def _gather_trained_model(trainer, objective, model_path: Path, stage: Path, sharded: bool):
    """The trained model on the main process. Sharded runs (FSDP, DeepSpeed) go through ``save_model``,
    which gathers the full weights, and a reload. FSDP checkpoints may be sharded (``SHARDED_STATE_DICT``:
    one ``.distcp`` file per rank); the final weights are always gathered whole (``FULL_STATE_DICT``)."""
    if not sharded:
        return trainer.model
    if trainer.is_fsdp_enabled:
        plugin = trainer.accelerator.state.fsdp_plugin
        if "FULL_STATE_DICT" not in str(plugin.state_dict_type):
            plugin.set_state_dict_type("FULL_STATE_DICT")  # save_model saves nothing for a sharded type
    trainer.save_model(str(stage))
    if not trainer.is_world_process_zero():
        return None
    if (stage / "adapter_config.json").is_file():
        from peft import PeftModel

        return PeftModel.from_pretrained(load_causal_lm(model_path, torch.float32), str(stage))
    return load_causal_lm(stage, torch.float32)


def _write_output(final, model_path, output, config, record, history, tokens_per_step) -> None:
    from ..evaluate.plots import plot_loss_curve

    with atomic_output_dir(output, overwrite=config.overwrite) as tmp:
        final.save_pretrained(tmp)
        copy_tokenizer_files(model_path, tmp)
        report = load_report(model_path)
        if report is not None:
            report.setdefault("training", []).append({k: v for k, v in record.items() if k != "config"})
            write_json(tmp / REPORT_FILE, report)
        log = {"record": record, "log_history": history}
        write_json(tmp / TRAINING_LOG, log)
        plot_loss_curve(
            history,
            tokens_per_step,
            tmp / LOSS_CURVE,
            title=f"uptrain {config.mode}: {Path(model_path).name}",
        )
