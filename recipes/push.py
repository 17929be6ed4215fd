"""Publishing recipe: upload a converted / uptrained folder with a generated model card.

    HF_TOKEN=... python recipes/push.py runs/smollm2-mqa-layerwise --repo-id ORG/SmolLM2-135M-MQA [--private]

Same as ``hf-attn-swap push`` (``hf_attn_swap.pipeline.hub.push_to_hub``); ``--dry-run`` prints the card only.
"""

import sys

from hf_attn_swap.cli import main

if __name__ == "__main__":
    sys.exit(main(["push", *sys.argv[1:]]))
