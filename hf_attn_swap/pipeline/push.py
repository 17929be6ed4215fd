"""The ``hf-attn-swap push`` job: ``hf_attn_swap.pipeline.hub.push_to_hub`` with the command's flags."""

from __future__ import annotations

from dataclasses import dataclass, field


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


def run_push(args: PushArguments) -> int:
    from .hub import push_to_hub

    result = push_to_hub(
        args.model,
        args.repo_id,
        private=args.private,
        revision=args.revision,
        eval_json=args.eval_json,
        base_model=args.base_model,
        commit_message=args.commit_message,
        dry_run=args.dry_run,
    )
    for name in result["skipped"]:
        print(f"skipped {name} (pickle-based weights are never uploaded; safetensors only)")
    if args.dry_run:
        print("files:", ", ".join(result["files"]))
        print(result["card"] or "(the folder's own README.md is used as the model card)")
        return 0
    print(
        f"uploaded {len(result['files'])} files to {result['repo_url']} ({result['revision']}): {result['commit_url']}"
    )
    return 0
