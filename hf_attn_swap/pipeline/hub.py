"""Publish a converted (and possibly uptrained) checkpoint folder to the Hugging Face Hub.

One commit holds the folder's safetensors weights, config, tokenizer, conversion.json, training log and loss
curve, plus a generated model card (``README.md``) unless the folder has its own. Pickle-based weight files
(``.bin``, ``.pt``, ...) are never uploaded. The token comes from huggingface_hub's usual sources (``HF_TOKEN``,
``hf auth login``) and is never printed; ``HF_ENDPOINT`` selects another Hub.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..io.folders import check_source
from ..methods.report import load_report

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
PICKLE_INDEX_SUFFIXES = tuple(
    f"{suffix}.index.json" for suffix in PICKLE_SUFFIXES
)  # shard maps of skipped files
#: attention implementation the card recommends per conversion target (``conversion.json`` may name its own)
RECOMMENDED_ATTENTION = {"mla": "latent_sdpa"}
EVAL_FILE = "eval.json"


def files_to_upload(folder: Path) -> tuple[list[Path], list[Path]]:
    """(files to upload, pickle files and their shard indexes skipped): every non-hidden file under ``folder``, sorted."""
    keep, skipped = [], []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if not path.is_file() or any(part.startswith(".") for part in rel.parts):
            continue
        pickled = path.suffix in PICKLE_SUFFIXES or path.name.endswith(PICKLE_INDEX_SUFFIXES)
        (skipped if pickled else keep).append(path)
    if not any(p.suffix == ".safetensors" for p in keep):
        found = ", ".join(p.name for p in skipped) or "none"
        raise ValueError(
            f"{str(folder)!r} has no .safetensors weights (pickle files found: {found}); re-save it with "
            "model.save_pretrained(folder) (safetensors is the default) before pushing"
        )
    return keep, skipped


def _stock_model_type(model_type: str | None) -> bool:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    return model_type in CONFIG_MAPPING_NAMES


def _load_eval(folder: Path, eval_json: str | Path | None) -> dict | None:
    path = Path(eval_json).expanduser() if eval_json else folder / EVAL_FILE
    if eval_json and not path.is_file():
        raise FileNotFoundError(f"eval JSON {str(path)!r} does not exist")
    if not path.is_file():
        return None
    payload = json.loads(path.read_text())
    if "models" in payload:
        return payload["models"]
    if "perplexity" in payload:
        return {Path(str(payload.get("model", folder.name))).name: payload}
    raise ValueError(f"{path} is not an `hf-attn-swap eval --json` file (no 'models' or 'perplexity')")


def model_card(folder: str | Path, repo_id: str, eval_json=None, base_model: str | None = None) -> str:
    """The README.md for ``folder``: metadata, conversion, uptraining, evaluation, how to load."""
    from huggingface_hub import ModelCardData

    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    report = load_report(folder) or {}
    evals = _load_eval(folder, eval_json)
    details = report.get("details") or {}
    target = report.get("target")
    tags = ["hf_attn_swap", "kv-cache-compression"] + ([target] if target else [])
    data = ModelCardData(
        base_model=base_model,
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=tags,
    )
    name = repo_id.split("/")[-1]
    lines = [f"---\n{data.to_yaml()}\n---", "", f"# {name}", ""]
    source = base_model or (Path(details["source"]).name if details.get("source") else "the original model")
    if report:
        before, after = report.get("kv_bytes_per_token_before"), report.get("kv_bytes_per_token_after")
        lines += [
            f"`{source}` with its attention converted by hf_attn_swap to "
            f"**{target}** (method `{report.get('method')}`): KV cache {before} → {after} bytes per token "
            f"({-100 * report.get('kv_reduction', 0):+.2f}%).",
            "",
            "## Conversion",
            "",
            "| | before | after |",
            "|---|---|---|",
        ]
        for key in sorted(set(report.get("before", {})) | set(report.get("after", {}))):
            lines.append(f"| {key} | {report['before'].get(key, '—')} | {report['after'].get(key, '—')} |")
        lines += [
            f"| KV cache bytes / token ({report.get('dtype')}) | {before} | {after} |",
            "",
            f"Family `{report.get('family')}`, {report.get('num_layers')} layers, "
            f"{report.get('num_attention_heads')} query heads of dimension {report.get('head_dim')}.",
            "",
        ]
        extra = {k: v for k, v in details.items() if k != "source" and not isinstance(v, (dict, list))}
        if extra:
            lines += [", ".join(f"`{k}` = {v}" for k, v in sorted(extra.items())), ""]
    else:
        lines += [f"A `{config.get('model_type')}` checkpoint published with hf_attn_swap.", ""]
    training = report.get("training") or []
    if training:
        lines += [
            "## Uptraining",
            "",
            "| mode | tokens | steps | learning rate | loss first → last | wall s |",
            "|---|---|---|---|---|---|",
        ]
        for t in training:
            lines.append(
                f"| {t.get('mode')} | {t.get('tokens_trained')} | {t.get('steps')} | {t.get('learning_rate')} | "
                f"{_num(t.get('first_loss'))} → {_num(t.get('final_loss'))} | {t.get('wall_seconds')} |"
            )
        lines.append("")
        if (folder / "loss_curve.png").is_file():
            lines += ["![loss curve](loss_curve.png)", ""]
    if evals:
        from ..evaluate.suite import suite_markdown

        first = next(iter(evals.values()))
        data = first.get("data") or []
        lines += [
            "## Evaluation",
            "",
            f"Held-out text: {', '.join(Path(str(d)).name for d in data[:3])}{' ...' if len(data) > 3 else ''}; "
            f"{first.get('tokens')} scored tokens in windows of {first.get('window')} (`hf-attn-swap eval`).",
            "",
            suite_markdown(evals),
            "",
        ]
    attn = details.get("attn_implementation") or RECOMMENDED_ATTENTION.get(target)
    lines += _how_to_load(repo_id, config, attn)
    return "\n".join(lines) + "\n"


def _num(value) -> str:
    return "—" if value is None else f"{value:.4g}"


def _how_to_load(repo_id: str, config: dict, attn: str | None) -> list[str]:
    stock = _stock_model_type(config.get("model_type")) and "auto_map" not in config
    lines = ["## How to load", ""]
    if stock:
        lines += [
            "Stock transformers, no plugin needed:",
            "",
            "```python",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")',
            f'model = AutoModelForCausalLM.from_pretrained("{repo_id}")',
            "```",
            "",
        ]
    if attn or not stock:
        lines += [
            "With the plugin (`pip install hf_attn_swap`)"
            + (
                f", which adds the `{attn}` attention:" if attn else ", which registers this model's classes:"
            ),
            "",
            "```python",
            "import hf_attn_swap  # registers the attention implementations and Auto classes",
            "from transformers import AutoModelForCausalLM",
            "",
            f'model = AutoModelForCausalLM.from_pretrained("{repo_id}"'
            + (f', attn_implementation="{attn}")' if attn else ")"),
            "```",
            "",
        ]
    return lines


def push_to_hub(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    eval_json: str | Path | None = None,
    base_model: str | None = None,
    commit_message: str | None = None,
    token: str | None = None,
    dry_run: bool = False,
) -> dict:
    """Upload ``folder`` to ``repo_id`` in one commit (creating the repo and ``revision`` branch if needed).

    Returns {repo_url, commit_url, revision, files, skipped}. ``dry_run`` builds the card and file list only.
    """
    from huggingface_hub import CommitOperationAdd, HfApi, get_token

    folder = check_source(folder)
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise ValueError(f"--repo-id must look like ORG/NAME, got {repo_id!r}")
    files, skipped = files_to_upload(folder)
    has_card = (folder / "README.md").is_file()
    card = None if has_card else model_card(folder, repo_id, eval_json, base_model)
    names = [str(p.relative_to(folder)) for p in files] + ([] if has_card else ["README.md"])
    result = {
        "repo_id": repo_id,
        "revision": revision or "main",
        "files": names,
        "skipped": [p.name for p in skipped],
    }
    if dry_run:
        return {**result, "card": card}
    token = token or get_token()
    if not token:
        raise ValueError(
            "no Hugging Face token found: run `hf auth login` or set the HF_TOKEN environment variable"
        )
    api = HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None, token=token)
    repo_url = _create_repo(api, repo_id, private)
    if revision and revision != "main" and not revision.startswith("refs/pr/"):  # a PR ref exists already
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    operations = [
        CommitOperationAdd(path_in_repo=p.relative_to(folder).as_posix(), path_or_fileobj=str(p))
        for p in files
    ]
    if card is not None:
        operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card.encode()))
    report = load_report(folder) or {}
    commit = api.create_commit(
        repo_id,
        operations,
        commit_message=commit_message
        or f"Upload {report.get('target', 'model')} checkpoint with hf_attn_swap",
        revision=revision,
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
