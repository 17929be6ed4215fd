"""``hf-attn-swap``: argument parsing only.

Each sub-command is a tuple of option dataclasses (the method configs of ``hf_attn_swap.methods``, the argument
classes of its job in ``hf_attn_swap.pipeline``), turned into flags by ``transformers.HfArgumentParser``, and the
job function the validated instances are handed to. Bad input (a ``ValueError`` from a dataclass's
``__post_init__`` or from the job, a missing file, ...) exits with status 2 and one line
``hf-attn-swap <command>: error: ...``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

from transformers import HfArgumentParser

from .io.recipes import load_recipe_yaml
from .methods.calibration import CalibrationConfig
from .methods.gqa import GQAConversionConfig
from .methods.mla import MLAConversionConfig
from .pipeline.bench import BenchArguments, run_bench
from .pipeline.convert import ConvertArguments, run_convert
from .pipeline.demo import DemoConfig, run_demo
from .pipeline.evaluate import EvalConfig, EvalDataConfig, EvalOutputs, LongContextConfig, run_eval
from .pipeline.examples import ExampleModelArguments, run_example_model
from .pipeline.gguf import GGUFArguments, run_gguf
from .pipeline.push import PushArguments, run_push
from .pipeline.train import UptrainCommandArguments, run_uptrain
from .pipeline.verify import VerifyArguments, run_verify
from .uptrain import UptrainConfig

#: what a job may raise for bad input: exit status 2 and one line
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, ModuleNotFoundError)


class OneLineErrors:
    """Parser mixin: a usage error (a missing argument, an unknown flag, a value of the wrong type) prints one
    line ``PROG: error: ... (`PROG --help` lists the arguments)`` and exits with status 2, like every other bad
    input; argparse itself prints its whole usage block first."""

    def error(self, message):
        print(
            f"{self.prog}: error: {one_line(message)} (`{self.prog} --help` lists the arguments)",
            file=sys.stderr,
        )
        raise SystemExit(2)


@dataclass(frozen=True)
class Command:
    """One sub-command: ``run(*instances of options)``. ``positional``: fields taken as positional arguments;
    ``aliases``: extra flag spellings; ``exclude``: fields that are not flags (still settable by ``defaults_from``);
    ``defaults_from``: a field naming a YAML file whose settings become the defaults of the other flags."""

    help: str
    options: tuple[type, ...]
    run: Callable[..., int]
    positional: tuple[str, ...] = ()
    aliases: dict[str, list[str]] = field(default_factory=dict)
    exclude: tuple[str, ...] = ()
    defaults_from: str | None = None
    description: str | None = None


COMMANDS: dict[str, Command] = {
    "example-model": Command(
        "materialise a packaged real model as a safetensors folder; prints its path",
        (ExampleModelArguments,),
        run_example_model,
        positional=("name",),
    ),
    "convert": Command(
        "convert a checkpoint folder SRC into a new folder OUT",
        (ConvertArguments, GQAConversionConfig, MLAConversionConfig, CalibrationConfig),
        run_convert,
        positional=("src", "out"),
        aliases={"num_key_value_heads": ["--num-kv-heads"], "qk_rope_head_dim": ["--rope-dim"]},
        description="--to gqa takes --num-kv-heads and --method; --to mla takes --kv-lora-rank, --rope-dim and the "
        "other MLA options. Calibrating methods read --calibration-data.",
    ),
    "eval": Command(
        "perplexity, KL to a reference, measured KV bytes/token, lm-eval tasks, decode speed, long context",
        (EvalOutputs, EvalDataConfig, EvalConfig, LongContextConfig),
        run_eval,
        positional=("model",),
    ),
    "bench": Command(
        "served speed and memory: prefill / decode tokens/s, engine KV bytes, sequences per KV budget, roofline",
        (BenchArguments,),
        run_bench,
        positional=("models",),
        description="Every MODEL in one engine (--runtime transformers | llama.cpp | vllm | mlx, run in its venv "
        "of scripts/install_runtimes.sh) at each --context: prefill and decode tokens/s, the engine's own KV-cache "
        "bytes per token checked against the GQA / MLA-latent / MLA-expanded formulas, the sequences or context a "
        "--kv-budget-mib holds, and each decode figure against this machine's roofline (bandwidth and GEMM "
        "measured here); ratios to the first MODEL. --random-weights SHAPE --layers N builds a random model of a "
        "real shape and its MLA exports (--mla, --kv-budget) first.",
    ),
    "demo": Command(
        "main job: convert a packaged model (SmolLM2; --model qwen2.5-coder) to MQA and MLA, evaluate beside the original",
        (DemoConfig, CalibrationConfig, EvalDataConfig),
        run_demo,
        aliases={"num_key_value_heads": ["--num-kv-heads"]},
    ),
    "uptrain": Command(
        "train a converted checkpoint MODEL back towards the original on local text; saves OUT",
        (UptrainConfig, UptrainCommandArguments),
        run_uptrain,
        positional=("model", "output"),
        aliases={"learning_rate": ["--lr"]},
        exclude=("convert",),
        defaults_from="config",
        description="Modes: layerwise (attention regresses the original attention outputs), distill (KL to the "
        "original logits), lora (adapters on the converted attention, merged), full (next-token loss). "
        "Rerunning the same command resumes from the newest checkpoint in OUT.checkpoints.",
    ),
    "push": Command(
        "upload a checkpoint folder to the Hugging Face Hub with a generated model card",
        (PushArguments,),
        run_push,
        positional=("model",),
    ),
    "verify": Command(
        "check that a serving engine (vLLM, SGLang, llama.cpp, mlx-lm) decodes MODEL as transformers does",
        (VerifyArguments,),
        run_verify,
        positional=("model",),
        description="Runs the engine in its own interpreter (the venv of scripts/install_runtimes.sh, or "
        "--python) on the prompts, compares greedy tokens and per-position log-probs with transformers on the "
        "same folder, prints the table, stores it in MODEL/verify.json (push puts it in the model card). "
        "Exit status 1 on a mismatch.",
    ),
    "gguf": Command(
        "write a GGUF of MODEL for llama.cpp (f32 | f16 | bf16 | q8_0 | q4_k_m), checked against transformers",
        (GGUFArguments,),
        run_gguf,
        positional=("model", "out"),
        description="llama.cpp's converter (plus the q_lora_rank key DeepSeek folders need) and its quantiser, "
        "in the llama.cpp venv of scripts/install_runtimes.sh; the MLA export's kv_a tensors stay float32. "
        "Prints and stores in OUT.json the greedy-token agreement and KL to transformers on the same folder.",
    ),
}


class _Recorder:
    """Stands in for a parser to catch the ``add_argument`` calls HfArgumentParser derives from a field."""

    def __init__(self):
        self.calls: list[tuple[tuple, dict]] = []

    def add_argument(self, *flags, **kwargs):
        self.calls.append((flags, kwargs))


class ArgumentParser(OneLineErrors, HfArgumentParser):
    """``HfArgumentParser`` plus what it cannot express and this CLI needs (each a few lines below):

    - positional arguments (it makes every field an ``--option``): ``positional`` fields become ``SRC OUT`` style
      arguments with the type, choices and help HfArgumentParser derives;
    - flags spelled otherwise than the field (``--num-kv-heads``, ``--rope-dim``, ``--lr``): ``flag_aliases``,
      per command so the method configs stay free of CLI spellings;
    - plain switches: it turns a ``bool = False`` field into ``--flag [true|false]``, which would swallow a
      following positional (``convert --overwrite SRC OUT``), and a ``bool = True`` one into a no-op ``--flag``
      plus ``--no-flag``; here they are ``--flag`` (store_true) and ``--no-flag`` (store_false) as before;
    - one spelling per flag: ``--max-tokens`` (it also adds ``--max_tokens``, doubling every line of --help).
    ``exclude`` leaves fields out (settable only through ``set_defaults``, e.g. a recipe's ``convert:`` section).
    """

    def __init__(self, dataclass_types=None, positional=(), flag_aliases=None, exclude=(), **kwargs):
        self.positional = set(positional)
        self.flag_aliases = dict(flag_aliases or {})
        self.exclude = set(exclude)
        super().__init__(dataclass_types, **kwargs)

    def _parse_dataclass_field(self, parser, field):
        if field.name in self.exclude:
            return
        recorder = _Recorder()
        HfArgumentParser._parse_dataclass_field(recorder, field)
        (flags, kwargs), *complement = recorder.calls
        if field.name in self.positional:
            kwargs.pop("required", None)
            parser.add_argument(field.name, **kwargs)
            return
        dashed = "--" + field.name.replace("_", "-")
        kwargs["dest"] = field.name
        if complement:  # bool defaulting to True: only --no-FLAG
            off = complement[0][1]
            parser.add_argument(
                "--no-" + dashed[2:], **{**off, "default": True, "help": f"turn off: {off['help']}"}
            )
            return
        if kwargs.get("nargs") == "?" and kwargs.get("const") is True:  # bool defaulting to False: a switch
            kwargs = {k: v for k, v in kwargs.items() if k not in ("type", "nargs", "const")}
            kwargs["action"] = "store_true"
        parser.add_argument(*self.flag_aliases.get(field.name, []), dashed, **kwargs)


class TopLevelParser(OneLineErrors, argparse.ArgumentParser):
    pass


def recipe_parser(prog: str, doc: str) -> argparse.ArgumentParser:
    """The command line of a recipe script (``recipes/*.py``): ``--config YAML`` and ``key=value`` overrides,
    usage errors in one line like the commands'."""
    parser = TopLevelParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config (recipes/configs/*.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="settings replacing the YAML's")
    return parser


class HelpFormatter(argparse.HelpFormatter):
    """``--help`` with ``(default: X)`` where it tells something: not for required arguments and positionals,
    switches, a None default, or a help text that already says its default."""

    def _get_help_string(self, action):
        text = action.help or ""
        silent = action.required or not action.option_strings or action.nargs == 0
        if silent or action.default in (None, argparse.SUPPRESS) or "default" in text:
            return text
        return f"{text} (default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    """The ``hf-attn-swap`` parser; ``parser.commands[NAME]`` is each sub-command's ``ArgumentParser``."""
    parser = TopLevelParser(
        prog="hf-attn-swap",
        description="Attention surgery for Hugging Face transformers: convert checkpoints (MHA/GQA -> GQA/MQA or "
        "MLA), evaluate, benchmark, uptrain and publish them. `hf-attn-swap COMMAND --help` lists each command's "
        "flags.",
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)
    parser.commands = {}
    for name, command in COMMANDS.items():
        parser.commands[name] = sub.add_parser(
            name,
            help=command.help,
            description=command.description or command.help,
            dataclass_types=command.options,
            positional=command.positional,
            flag_aliases=command.aliases,
            exclude=command.exclude,
            formatter_class=HelpFormatter,
        )
    return parser


def parse(argv: list[str] | None = None) -> tuple[str, tuple]:
    """(command, its option instances). Raises ``SystemExit`` for what argparse rejects (status 2, after one
    line) and for ``--help`` (status 0), and the dataclasses' ``ValueError`` for invalid values."""
    parser = build_parser()
    args = _parse_args(parser, argv)
    command = COMMANDS[args.command]
    path = getattr(args, command.defaults_from, None) if command.defaults_from else None
    if path:  # the recipe's settings become the flags' defaults: flags given on the command line win
        settings = load_recipe_yaml(path)
        known = {f.name for cls in command.options for f in dataclasses.fields(cls)} - {command.defaults_from}
        unknown = sorted(set(settings) - known)
        if unknown:
            raise ValueError(f"unknown {args.command} setting(s) {unknown} in {path}; known: {sorted(known)}")
        parser.commands[args.command].set_defaults(**settings)
        args = _parse_args(parser, argv)
    values = vars(args)
    options = tuple(
        cls(**{f.name: values[f.name] for f in dataclasses.fields(cls) if f.init and f.name in values})
        for cls in command.options
    )
    return args.command, options


def _parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """``parser.parse_args``, with unknown arguments reported by the command's parser (its name and --help)."""
    args, extra = parser.parse_known_args(argv)
    if extra:
        parser.commands[args.command].error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    name = next((a for a in argv if not a.startswith("-")), "")  # the command is the first positional
    name = name if name in COMMANDS else ""

    def run() -> int:
        command, options = parse(argv)
        return COMMANDS[command].run(*options)

    return run_script(f"hf-attn-swap {name}".strip(), run)


def run_script(prog: str, job: Callable[[], int]) -> int:
    """Run ``job`` (a command, or a recipe script's ``main``): bad input prints one line ``PROG: error: ...`` and
    returns 2, never a traceback."""
    try:
        return job()
    except USER_ERRORS as err:
        print(f"{prog}: error: {one_line(err)}", file=sys.stderr)
        return 2


def one_line(err: BaseException | str) -> str:
    """The message of ``err`` on one line (a value with a newline, a library's multi-line message)."""
    text = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
    return text or (type(err).__name__ if isinstance(err, BaseException) else "")


if __name__ == "__main__":
    sys.exit(main())
