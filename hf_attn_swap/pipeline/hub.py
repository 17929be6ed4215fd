"""Publish a converted (and possibly uptrained) checkpoint folder to the Hugging Face Hub.

One commit (``HfApi.upload_folder``) holds the folder's safetensors weights, config, tokenizer, conversion.json,
training log and loss curve, plus a model card (``README.md``, built with ``ModelCard``/``ModelCardData``, the
eval results in its ``model-index``) unless the folder has its own. Pickle-based weight files (``.bin``, ``.pt``,
...), their shard indexes and hidden files are never uploaded (``IGNORE_PATTERNS``). The token comes from
huggingface_hub's usual sources (``HF_TOKEN``, ``hf auth login``) and is never printed; ``HF_ENDPOINT`` selects
another Hub.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..io.folders import check_source
from ..io.recipes import coerce_fields
from ..methods.report import load_report

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
#: pickle-based weights and their shard maps (``pytorch_model.bin.index.json``): never uploaded, listed as skipped
PICKLE_PATTERNS = [f"*{suffix}" for suffix in PICKLE_SUFFIXES] + [
    f"*{suffix}.index.json" for suffix in PICKLE_SUFFIXES
]
#: hidden files and folders at any depth (``.git``, ``.cache``, editor files): never uploaded, not listed
HIDDEN_PATTERNS = [".*", "*/.*"]
#: what ``HfApi.upload_folder`` leaves out (``fnmatch`` on the path relative to the folder, ``*`` spans ``/``)
IGNORE_PATTERNS = PICKLE_PATTERNS + HIDDEN_PATTERNS
#: attention implementation the card recommends per conversion target (``conversion.json`` may name its own)
RECOMMENDED_ATTENTION = {"mla": "latent_sdpa"}
EVAL_FILE = "eval.json"
CARD_FILE = "README.md"


def files_to_upload(folder: Path) -> tuple[list[Path], list[Path]]:
    """(files to upload, pickle files and their shard indexes skipped), sorted: what ``upload_folder`` with
    ``IGNORE_PATTERNS`` uploads from ``folder``, filtered the same way (``filter_repo_objects``)."""
    from huggingface_hub.utils import filter_repo_objects

    files = {}
    for root, dirs, names in os.walk(folder):  # never descends into a linked folder (it may lie anywhere)
        root = Path(root)
        linked = [d for d in dirs if (root / d).is_symlink()]
        if linked:
            raise ValueError(
                f"{str(root / linked[0])!r} is a link to a folder: push never follows those; copy its files "
                "into the model folder or remove the link"
            )
        files.update(
            {(root / n).relative_to(folder).as_posix(): root / n for n in names if (root / n).is_file()}
        )
    files = dict(sorted(files.items()))
    visible = list(filter_repo_objects(files, ignore_patterns=HIDDEN_PATTERNS))
    keep = [files[name] for name in filter_repo_objects(visible, ignore_patterns=PICKLE_PATTERNS)]
    skipped = [files[name] for name in filter_repo_objects(visible, allow_patterns=PICKLE_PATTERNS)]
    if not any(p.suffix == ".safetensors" for p in keep):
        found = ", ".join(p.name for p in skipped) or "none"
        raise ValueError(
            f"{str(folder)!r} has no .safetensors weights (pickle files found: {found}); re-save it with "
            "model.save_pretrained(folder) (safetensors is the default) before pushing"
        )
    return keep, skipped


#: the model card (Jinja, rendered by ``ModelCard.from_template``, which fills ``card_data`` with the metadata)
CARD_TEMPLATE = """---
{{ card_data }}
---

# {{ name }}

{% if report -%}
`{{ source }}` with its attention converted by hf_attn_swap to **{{ report.target }}** (method \
`{{ report.method }}`): KV cache {{ report.kv_bytes_per_token_before }} → {{ report.kv_bytes_per_token_after }} \
bytes per token ({{ "%+.2f" | format(-100 * (report.kv_reduction or 0)) }}%).

## Conversion

| | before | after |
|---|---|---|
{% for key, before, after in conversion -%}
| {{ key }} | {{ before }} | {{ after }} |
{% endfor -%}
| KV cache bytes / token ({{ report.dtype }}) | {{ report.kv_bytes_per_token_before }} | \
{{ report.kv_bytes_per_token_after }} |

Family `{{ report.family }}`, {{ report.num_layers }} layers, {{ report.num_attention_heads }} query heads of \
dimension {{ report.head_dim }}.

{% if details -%}
{% for key, value in details %}`{{ key }}` = {{ value }}{{ ", " if not loop.last }}{% endfor %}

{% endif -%}
{% else -%}
A `{{ model_type }}` checkpoint published with hf_attn_swap.

{% endif -%}
{% if training -%}
## Uptraining

| mode | tokens | steps | learning rate | loss first → last | wall s |
|---|---|---|---|---|---|
{% for t in training -%}
| {{ t.mode }} | {{ t.tokens_trained }} | {{ t.steps }} | {{ t.learning_rate }} | \
{{ t.first_loss }} → {{ t.final_loss }} | {{ t.wall_seconds }} |
{% endfor %}
{% if loss_curve -%}
![loss curve](loss_curve.png)

{% endif -%}
{% endif -%}
{% if eval_table -%}
## Evaluation

Held-out text: {{ eval_data }}; {{ eval_tokens }} scored tokens in windows of {{ eval_window }} \
(`hf-attn-swap eval`).

{{ eval_table }}

{% endif -%}
{% if serving -%}
## Serving engines

`hf-attn-swap verify` on this folder: greedy tokens and per-position log-probs of each engine vs transformers \
(float32, same token ids).

{% for table, notes in serving -%}
{{ table }}

{% for note in notes -%}
- {{ note }}
{% endfor %}
{% endfor -%}
{% endif -%}
## How to load

{% if stock -%}
Stock transformers, no plugin needed:

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained("{{ repo_id }}")
model = AutoModelForCausalLM.from_pretrained("{{ repo_id }}")
```

{% endif -%}
{% if attn or not stock -%}
With the plugin (`pip install hf_attn_swap`), \
{{ "which adds the `" ~ attn ~ "` attention:" if attn else "which registers this model's classes:" }}

```python
import hf_attn_swap  # registers the attention implementations and Auto classes
from transformers import AutoModelForCausalLM

model = AutoModelForCausalLM.from_pretrained("{{ repo_id }}"\
{{ ', attn_implementation="' ~ attn ~ '")' if attn else ")" }}
```

{% endif -%}
"""


def _stock_model_type(model_type: str | None) -> bool:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    return model_type in CONFIG_MAPPING_NAMES


def _load_eval(folder: Path, eval_json: str | Path | None) -> dict | None:
    path = Path(eval_json).expanduser() if eval_json else folder / EVAL_FILE
    if eval_json and not path.is_file():
        raise FileNotFoundError(f"eval JSON {str(path)!r} does not exist or is not a file")
    if not path.is_file():
        return None
    payload = _read_json(path, "an `hf-attn-swap eval --json` file")
    if isinstance(payload.get("models"), dict) and all(
        isinstance(r, dict) for r in payload["models"].values()
    ):
        return payload["models"]
    if "perplexity" in payload:
        return {Path(str(payload.get("model", folder.name))).name: payload}
    raise ValueError(
        f"{path} is not an `hf-attn-swap eval --json` file (no 'models' mapping or 'perplexity'): pass the "
        "file eval --json wrote"
    )


def _read_json(path: Path, what: str) -> dict:
    """The JSON object in ``path``; ``ValueError`` naming the file when it is not one."""
    try:
        payload = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{str(path)!r} is not {what} (not JSON: {err}): fix or remove it") from None
    if not isinstance(payload, dict):
        raise ValueError(f"{str(path)!r} is not {what} (a JSON {type(payload).__name__}): fix or remove it")
    return payload


def _eval_results(evals: dict | None, folder: Path) -> list:
    """``EvalResult``s (perplexity, KL to the reference) of the eval entry for ``folder``: the one whose ``model``
    is this folder, else the only one; none when the eval JSON compares several other models."""
    from huggingface_hub import EvalResult

    if not evals:
        return []
    own = [
        r
        for r in evals.values()
        if r.get("model") and os.path.realpath(str(r["model"])) == os.path.realpath(folder)
    ]
    own = own or (list(evals.values()) if len(evals) == 1 else [])
    if not own:
        return []
    result = own[0]
    data = result.get("data") or []
    dataset = ", ".join(Path(str(d)).name for d in data[:3]) + (" ..." if len(data) > 3 else "")
    metrics = [
        ("perplexity", "perplexity", "perplexity"),
        ("kl_to_reference", "kl_divergence", "KL to reference (nats)"),
    ]
    return [
        EvalResult(
            task_type="text-generation",
            dataset_type="text",  # local text files (the `datasets` loader), not a Hub dataset
            dataset_name=dataset or "held-out text",
            metric_type=metric_type,
            metric_name=metric_name,
            metric_value=result[key],
        )
        for key, metric_type, metric_name in metrics
        if result.get(key) is not None
    ]


def _num(value) -> str:
    return "—" if value is None else f"{value:.4g}"


def model_card(folder: str | Path, repo_id: str, eval_json=None, base_model: str | None = None) -> str:
    """The README.md for ``folder``: metadata (with the eval results of this model), conversion, uptraining,
    evaluation, how to load."""
    from huggingface_hub import ModelCard, ModelCardData

    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    report = load_report(folder) or {}
    evals = _load_eval(folder, eval_json)
    details = report.get("details") or {}
    target = report.get("target")
    name = repo_id.split("/")[-1]
    results = _eval_results(evals, folder)
    data = ModelCardData(
        base_model=base_model,
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=["hf_attn_swap", "kv-cache-compression"] + ([target] if target else []),
        model_name=name if results else None,
        eval_results=results or None,
    )
    first = next(iter(evals.values())) if evals else {}
    eval_data = first.get("data") or []
    attn = details.get("attn_implementation") or RECOMMENDED_ATTENTION.get(target)
    before, after = report.get("before", {}), report.get("after", {})
    card = ModelCard.from_template(
        data,
        template_str=CARD_TEMPLATE,
        name=name,
        repo_id=repo_id,
        model_type=config.get("model_type"),
        report=report,
        source=base_model
        or (Path(details["source"]).name if details.get("source") else "the original model"),
        conversion=[
            (key, before.get(key, "—"), after.get(key, "—")) for key in sorted(set(before) | set(after))
        ],
        details=sorted(
            (k, v) for k, v in details.items() if k != "source" and not isinstance(v, (dict, list))
        ),
        training=[
            {**t, "first_loss": _num(t.get("first_loss")), "final_loss": _num(t.get("final_loss"))}
            for t in report.get("training") or []
        ],
        loss_curve=(folder / "loss_curve.png").is_file(),
        eval_table=_eval_table(evals),
        eval_data=", ".join(Path(str(d)).name for d in eval_data[:3])
        + (" ..." if len(eval_data) > 3 else ""),
        eval_tokens=first.get("tokens"),
        eval_window=first.get("window"),
        stock=_stock_model_type(config.get("model_type")) and "auto_map" not in config,
        serving=_serving(folder),
        attn=attn,
    )
    return str(card)


def _serving(folder: Path) -> list[tuple[str, list[str]]]:
    """(markdown table, notes) per runtime of the folder's ``verify.json``, if any."""
    from .verify import VERIFY_FILE, verify_table

    path = folder / VERIFY_FILE
    if not path.is_file():
        return []
    runtimes = _read_json(path, "a verify JSON").get("runtimes") or {}
    if not isinstance(runtimes, dict) or not all(isinstance(r, dict) for r in runtimes.values()):
        raise ValueError(f"{str(path)!r} is not a verify JSON (no runtimes mapping): fix or remove it")
    return [(verify_table(result), result.get("notes") or []) for result in runtimes.values()]


def _eval_table(evals: dict | None) -> str | None:
    if not evals:
        return None
    from ..evaluate.suite import suite_markdown

    return suite_markdown(evals)


@dataclass
class PushArguments:
    model: str = field(metadata={"help": "checkpoint folder (safetensors weights)"})
    repo_id: str = field(metadata={"help": "ORG/NAME on the Hub"})
    private: bool = field(default=False, metadata={"help": "create the repository as private"})
    revision: str | None = field(
        default=None, metadata={"help": "branch to commit to (created if missing; default main)"}
    )
    eval_json: str | None = field(
        default=None,
        metadata={"help": "`hf-attn-swap eval --json` output for the card (default: MODEL/eval.json)"},
    )
    base_model: str | None = field(
        default=None, metadata={"help": "Hub id of the original model, for the card metadata"}
    )
    commit_message: str | None = field(default=None, metadata={"help": "message of the upload commit"})
    dry_run: bool = field(
        default=False, metadata={"help": "print the file list and model card; upload nothing"}
    )

    def __post_init__(self):
        coerce_fields(self)


def push_to_hub(folder: str | Path, repo_id: str, token: str | None = None, **options) -> dict:
    """Upload ``folder`` to ``repo_id`` in one commit (creating the repo and ``revision`` branch if needed), with
    a generated model card unless the folder has its own README.md.

    Args:
        token: a Hugging Face token (default: the logged-in one, or ``HF_TOKEN``).
        options: the other fields of ``PushArguments`` (private, revision, eval_json, base_model, commit_message,
            dry_run: build the card and file list only).

    Returns:
        {repo_id, revision, files, skipped, card} and, after an upload, {repo_url, commit_url}.
    """
    return push(PushArguments(str(folder), repo_id, **options), token)


def push(args: PushArguments, token: str | None = None) -> dict:
    """``push_to_hub`` with its options as one ``PushArguments`` (what ``hf-attn-swap push`` parses)."""
    import tempfile

    from huggingface_hub import HfApi, get_token

    folder, repo_id, revision = check_source(args.model).resolve(), args.repo_id, args.revision
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise ValueError(f"--repo-id must look like ORG/NAME, got {repo_id!r}")
    files, skipped = files_to_upload(folder)
    has_card = (folder / CARD_FILE).is_file()
    card = None if has_card else model_card(folder, repo_id, args.eval_json, args.base_model)
    names = [p.relative_to(folder).as_posix() for p in files] + ([] if has_card else [CARD_FILE])
    result = {
        "repo_id": repo_id,
        "revision": revision or "main",
        "files": names,
        "skipped": [p.name for p in skipped],
    }
    if args.dry_run:
        return {**result, "card": card}
    token = token or get_token()
    if not token:
        raise ValueError(
            "no Hugging Face token found: run `hf auth login` or set the HF_TOKEN environment variable"
        )
    api = HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None, token=token)
    repo_url = _create_repo(api, repo_id, args.private)
    if revision and revision != "main" and not revision.startswith("refs/pr/"):  # a PR ref exists already
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    report = load_report(folder) or {}
    # upload_folder uploads one folder in one commit; the generated card must be in that commit but the source
    # folder is only ever read, so the upload goes through a mirror of it: real folders, a symlink per file
    # (upload_folder reads through them), plus the card.
    with tempfile.TemporaryDirectory(prefix="hf_attn_swap_push_") as tmp:
        staged = Path(tmp) / folder.name
        for path in files:  # exactly what files_to_upload listed (and --dry-run shows)
            link = staged / path.relative_to(folder)
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(path.resolve())
        if card is not None:
            (staged / CARD_FILE).write_text(card, encoding="utf-8")
        commit = api.upload_folder(
            repo_id=repo_id,
            folder_path=staged,
            commit_message=args.commit_message
            or f"Upload {report.get('target', 'model')} checkpoint with hf_attn_swap",
            revision=revision,
            ignore_patterns=list(IGNORE_PATTERNS),  # upload_folder appends its defaults to the list it gets
        )
    return {**result, "repo_url": str(repo_url), "commit_url": commit.commit_url, "card": card}


def _create_repo(api, repo_id: str, private: bool):
    """``create_repo(exist_ok=True)``, except that ``private`` never uploads into an existing public repo."""
    from huggingface_hub import RepoUrl
    from huggingface_hub.errors import HfHubHTTPError

    if not private:
        return api.create_repo(repo_id, private=False, exist_ok=True, repo_type="model")
    try:
        return api.create_repo(repo_id, private=True, repo_type="model")
    except HfHubHTTPError as err:  # 409: it exists; 401/402/403: it may exist (as create_repo's exist_ok)
        if err.response is None or err.response.status_code not in (401, 402, 403, 409):
            raise
        try:
            info = api.repo_info(repo_id, repo_type="model")
        except HfHubHTTPError:
            raise err from None
    if not info.private:
        raise ValueError(
            f"--private: the repository {repo_id} already exists and is public; make it private on the Hub "
            "first, or push without --private"
        )
    return RepoUrl(f"{api.endpoint}/{repo_id}", endpoint=api.endpoint)
