"""``UptrainConfig``: every knob of an uptraining run, loadable from a YAML recipe with ``key=value`` overrides."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from ..io.recipes import coerce_fields, load_recipe_yaml, parse_settings

#: fields that may differ between a run and its resumption (everything else must match the checkpoints)
NOT_PART_OF_RUN = (
    "output",
    "overwrite",
    "resume",
    "keep_checkpoints",
    "checkpoint_dir",
    "save_steps",
    "logging_steps",
    "progress",
    "eval_data",
    "eval_tokens",
    "eval_window",
    "convert",
)


@dataclass
class UptrainConfig:
    """One uptraining run. ``model`` is a converted checkpoint folder (any format ``from_pretrained`` loads
    after ``import hf_attn_swap``); ``output`` receives the trained model in the same format.

    Token budget: ``max_tokens`` training tokens, rounded up to whole optimizer steps of
    ``block_size * batch_size * gradient_accumulation_steps * world_size`` tokens; the text is cycled when it
    holds fewer tokens than the budget.

    The fields are ``hf-attn-swap uptrain``'s flags (``HfArgumentParser``) and the recipes' YAML keys
    (``from_yaml``); YAML strings such as ``1e-3`` become numbers here, and a value of the wrong type is a
    one-line ``ValueError`` (``io.recipes.coerce_fields``). The ranges are checked by ``uptrain.run.check_settings``.
    """

    model: str | None = field(
        default=None, metadata={"help": "converted checkpoint folder (any format from_pretrained loads)"}
    )
    output: str | None = field(
        default=None,
        metadata={"help": "folder for the trained model (same format as MODEL)", "metavar": "out"},
    )
    data: list[str] | None = field(
        default=None, metadata={"help": "training text (default: Python library docs)", "metavar": "FILE"}
    )
    max_tokens: int | None = field(
        default=None, metadata={"help": "training-token budget (rounded up to whole steps)"}
    )
    mode: str = field(default="layerwise", metadata={"help": "layerwise | distill | lora | full"})
    teacher: str | None = field(
        default=None, metadata={"help": "original model (default: the source in MODEL/conversion.json)"}
    )
    block_size: int = field(default=512, metadata={"help": "tokens per training sequence"})
    batch_size: int = field(default=1, metadata={"help": "sequences per device per micro-step"})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "micro-steps per optimizer step"})
    learning_rate: float | None = field(
        default=None,
        metadata={
            "help": "default: the mode's (layerwise 1e-3, on MLA 1e-4; lora 1e-3; distill 1e-4; full 1e-4)"
        },
    )
    lr_scheduler: str = field(default="cosine", metadata={"help": "transformers scheduler name"})
    warmup_ratio: float = field(default=0.05, metadata={"help": "warm-up fraction of the steps, in [0, 1)"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping norm"})
    seed: int = field(default=0, metadata={"help": "seed of the data order and initialisation"})
    trainable: str | None = field(
        default=None, metadata={"help": "full/distill: what trains, attention | all (default: the mode's)"}
    )
    freeze: list[str] | None = field(
        default=None,
        metadata={
            "help": "keep parameters whose name contains NAME frozen (e.g. kv_a_proj_with_mqa for deepseek_v3 MLA "
            "exports)",
            "metavar": "NAME",
        },
    )
    lora_r: int = field(default=16, metadata={"help": "lora: adapter rank"})
    lora_alpha: int = field(default=32, metadata={"help": "lora: adapter scale numerator"})
    lora_dropout: float = field(default=0.0, metadata={"help": "lora: adapter dropout"})
    kl_temperature: float = field(default=1.0, metadata={"help": "distill: softmax temperature"})
    ce_weight: float = field(default=0.0, metadata={"help": "distill: weight of the next-token loss added"})
    bf16: bool = field(default=False, metadata={"help": "bf16 autocast (GPU); weights stay float32"})
    attn_implementation: str | None = field(default=None, metadata={"help": "e.g. sdpa, eager"})
    save_steps: int = field(default=50, metadata={"help": "checkpoint every N optimizer steps"})
    logging_steps: int = field(default=1, metadata={"help": "log the loss every N optimizer steps"})
    checkpoint_dir: str | None = field(default=None, metadata={"help": "default: OUT.checkpoints"})
    resume: bool = field(
        default=True, metadata={"help": "continue from the newest complete checkpoint of the same run"}
    )
    keep_checkpoints: bool = field(default=False, metadata={"help": "keep OUT.checkpoints when done"})
    overwrite: bool = field(default=False, metadata={"help": "replace OUT if it exists"})
    progress: bool = field(default=True, metadata={"help": "progress bars"})
    eval_data: list[str] | None = field(
        default=None, metadata={"help": "held-out text (default: tutorial)", "metavar": "FILE"}
    )
    eval_tokens: int = field(
        default=0, metadata={"help": "score N held-out tokens before and after (0: off)"}
    )
    eval_window: int = field(default=1024, metadata={"help": "tokens per held-out window"})
    convert: dict | None = field(
        default=None,
        metadata={
            "help": "recipes and --config: how to build MODEL when it does not exist yet (source: FOLDER or "
            "example:NAME, plus convert_checkpoint arguments)"
        },
    )

    def __post_init__(self):
        coerce_fields(
            self
        )  # YAML reads "1e-3" as a string; a list[int] or a dict where a number goes fails here

    def run_identity(self) -> dict:
        """The fields a resumed run must share with the run that wrote the checkpoints."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in NOT_PART_OF_RUN}

    def checkpoint_path(self) -> Path:
        if self.checkpoint_dir:
            return Path(self.checkpoint_dir).expanduser()
        out = Path(self.output).expanduser()
        return out.with_name(out.name + ".checkpoints")

    @classmethod
    def from_dict(cls, values: dict) -> UptrainConfig:
        """``HfArgumentParser(UptrainConfig).parse_dict(values)``, naming unknown keys."""
        return parse_settings(values, (cls,), "uptrain")[0]

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: list[str] | None = None) -> UptrainConfig:
        """A YAML mapping of fields, then ``key=value`` overrides (values parsed as YAML: ``lr=3e-4``)."""
        return cls.from_dict(load_recipe_yaml(path, overrides))
