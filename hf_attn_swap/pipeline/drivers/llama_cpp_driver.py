"""llama.cpp driver (see protocol.py), in the venv of ``llama-cpp-python``.

1. HF folder -> f32 GGUF with llama.cpp's own ``convert_hf_to_gguf.py`` plus the ``deepseek2.attention.q_lora_rank``
   key its DeepSeek class omits when ``q_lora_rank`` is null (``gguf_driver.convert``, the one definition, shared
   with ``hf-attn-swap gguf``; converter in ``<venv>/llama.cpp`` or ``options["converter"]``). The GGUF goes to a
   temporary folder.
2. ``llama_cpp.Llama(logits_all=True)``, float32 KV cache: greedy decoding with its KV cache, log-probs from the
   float32 logits (``gguf_driver.open_gguf`` / ``greedy``).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from gguf_driver import convert, greedy, open_gguf, version


def generate(model, max_new_tokens, options):
    with tempfile.TemporaryDirectory(prefix="gguf_") as tmp:
        gguf_file = Path(tmp) / "model-f32.gguf"
        notes = convert(model["path"], gguf_file, "f32", converter=options.get("converter"))
        llm = open_gguf(gguf_file, max(len(p) for p in model["prompts"]) + max_new_tokens)
        outputs = greedy(llm, model["prompts"], max_new_tokens)
        del llm
    return outputs, [n for n in notes if "--outtype" not in n] + [
        "GGUF: convert_hf_to_gguf.py --outtype f32; KV cache float32"
    ]


if __name__ == "__main__":
    import protocol

    protocol.main("llama.cpp", version, generate)
