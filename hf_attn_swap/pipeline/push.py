"""The ``hf-attn-swap push`` job: ``hf_attn_swap.pipeline.hub.push`` with the command's flags (``PushArguments``)."""

from __future__ import annotations

from .hub import PushArguments, push


def run_push(args: PushArguments) -> int:
    result = push(args)
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
