"""Folder-level jobs built from the layers below, one module per ``hf-attn-swap`` command, each with the option
dataclasses its flags are generated from (``hf_attn_swap.cli``) and a ``run_*`` function: ``convert``
(checkpoint folder -> converted folder, atomic), ``evaluate`` (the eval suite to JSON / markdown / plots), ``bench``,
``demo`` (the README's main job), ``train`` (uptrain), ``push`` (over ``hub``: model card + upload), ``examples``.
The CLI, recipes and notebooks call these."""
