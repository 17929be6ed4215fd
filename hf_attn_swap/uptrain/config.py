"""``UptrainConfig``: every knob of an uptraining run, loadable from a YAML recipe with ``key=value`` overrides."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

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
    """

    model: str | None = None
    output: str | None = None
    data: list[str] | None = None  # default: hf_attn_swap.io.text.default_train_files() (Python library docs)
    max_tokens: int | None = None
    mode: str = "layerwise"  # full | lora | distill | layerwise
    teacher: str | None = None  # default: the source recorded in MODEL/conversion.json
    block_size: int = 512
    batch_size: int = 1  # blocks per device per micro-step
    gradient_accumulation_steps: int = 1
    learning_rate: float | None = None  # default: the mode's
    lr_scheduler: str = "cosine"
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    trainable: str | None = None  # attention | all (full, distill); default: the mode's
    freeze: list[str] | None = None  # parameters whose name contains one of these strings stay frozen
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    kl_temperature: float = 1.0
    ce_weight: float = 0.0  # distill: weight of the plain next-token loss added to the KL
    bf16: bool = False  # bf16 autocast (GPU); weights stay float32 while training
    attn_implementation: str | None = None
    save_steps: int = 50
    logging_steps: int = 1
    checkpoint_dir: str | None = None  # default: OUTPUT.checkpoints next to OUTPUT
    resume: bool = True  # continue from the newest complete checkpoint of the same run
    keep_checkpoints: bool = False
    overwrite: bool = False
    progress: bool = True
    eval_data: list[str] | None = None  # held-out text scored before and after training (eval_tokens > 0)
    eval_tokens: int = 0
    eval_window: int = 1024
    convert: dict | None = field(default=None)  # recipes: how to build ``model`` when it does not exist yet

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
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown uptrain setting(s) {unknown}; known: {sorted(known)}")
        values = dict(values)
        for f in dataclasses.fields(cls):  # YAML reads "1e-3" as a string
            if isinstance(values.get(f.name), str) and str(f.type).split(" |")[0] in ("int", "float"):
                try:
                    values[f.name] = float(values[f.name]) if "float" in str(f.type) else int(values[f.name])
                except ValueError:
                    raise ValueError(f"{f.name} must be a number, got {values[f.name]!r}") from None
        for key in ("data", "eval_data", "freeze"):
            if isinstance(values.get(key), (str, Path)):
                values[key] = [str(values[key])]
        return cls(**values)

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: list[str] | None = None) -> UptrainConfig:
        """A YAML mapping of fields, then ``key=value`` overrides (values parsed as YAML: ``lr=3e-4``)."""
        return cls.from_dict(load_recipe_yaml(path, overrides))


def load_recipe_yaml(
    path: str | Path, overrides: list[str] | None = None, required: tuple[str, ...] = ()
) -> dict:
    """A recipe config: the YAML mapping at ``path`` updated by ``key=value`` overrides (values parsed as YAML);
    every key in ``required`` must be set by one of them."""
    import yaml

    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"recipe config {str(path)!r} does not exist")
    values = yaml.safe_load(path.read_text()) or {}
    if not isinstance(values, dict):
        raise ValueError(f"{path} must hold a YAML mapping of settings")
    for item in overrides or []:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not key=value")
        key, raw = item.split("=", 1)
        values[key.strip().replace("-", "_")] = yaml.safe_load(raw)
    missing = [key for key in required if values.get(key) in (None, "", {})]
    if missing:
        raise ValueError(
            f"{path} does not set {', '.join(missing)}: add `{missing[0]}: ...` to the YAML "
            f"or pass {missing[0]}=... on the command line"
        )
    return values


def resolve_source(source: str | Path) -> Path:
    """Recipe paths: ``example:NAME`` is the packaged example model's folder, anything else a path."""
    source = str(source)
    if source.startswith("example:"):
        from ..io.examples import example_model_path

        return example_model_path(source.split(":", 1)[1])
    return Path(source).expanduser()
