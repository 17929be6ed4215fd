"""llama.cpp driver (see protocol.py), in the venv of ``llama-cpp-python``.

1. HF folder -> f32 GGUF with llama.cpp's own ``convert_hf_to_gguf.py`` (vendored in llama-cpp-python's sdist;
   ``scripts/install_runtimes.sh`` keeps it, its ``conversion`` package and ``gguf-py`` in ``<venv>/llama.cpp``,
   or ``options["converter"]``), plus one step of ours: its DeepSeek-V2/V3 class writes no
   ``deepseek2.attention.q_lora_rank`` when ``q_lora_rank`` is null, and llama.cpp's ``deepseek2`` loader then
   refuses the file ("key not found") unless the layer count looks like a known lite model; we add the key with
   value 0, which makes the loader build the plain ``wq`` path. The GGUF goes to a temporary folder.
2. ``llama_cpp.Llama(logits_all=True)``, float32 KV cache: greedy decoding with its KV cache, log-probs from the
   float32 logits.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

GGML_TYPE_F32 = 0  # ggml_type enum
Q_LORA_NOTE = (
    "GGUF: deepseek2.attention.q_lora_rank = 0 written (q_lora_rank is null; the converter omits it)"
)


def version():
    import llama_cpp

    return llama_cpp.__version__


def converter_dir(options) -> Path:
    folder = Path(options.get("converter") or Path(sys.prefix) / "llama.cpp")
    if not (folder / "convert_hf_to_gguf.py").is_file():
        raise FileNotFoundError(
            f"no convert_hf_to_gguf.py in {folder}: rerun scripts/install_runtimes.sh llama.cpp"
        )
    return folder


def convert(folder: str, outfile: Path, options) -> list[str]:
    """``convert_hf_to_gguf.py FOLDER --outtype f32 --outfile OUTFILE`` in this process, with the q_lora_rank
    key added; returns notes."""
    vendor = converter_dir(options)
    for path in (str(vendor / "gguf-py"), str(vendor)):
        if path not in sys.path:
            sys.path.insert(0, path)
    import convert_hf_to_gguf
    from conversion.deepseek import DeepseekV2Model

    notes = []
    original = DeepseekV2Model.__dict__["set_gguf_parameters"]

    def set_gguf_parameters(self):
        original(self)
        if self.hparams.get("q_lora_rank") is None:
            self.gguf_writer.add_q_lora_rank(0)
            notes.append(Q_LORA_NOTE)

    DeepseekV2Model.set_gguf_parameters = set_gguf_parameters
    argv = sys.argv
    sys.argv = ["convert_hf_to_gguf.py", folder, "--outtype", "f32", "--outfile", str(outfile)]
    try:
        convert_hf_to_gguf.main()
    finally:
        sys.argv = argv
        DeepseekV2Model.set_gguf_parameters = original
    return notes


def generate(model, max_new_tokens, options):
    import numpy as np
    from llama_cpp import Llama

    with tempfile.TemporaryDirectory(prefix="gguf_") as tmp:
        gguf_file = Path(tmp) / "model-f32.gguf"
        notes = convert(model["path"], gguf_file, options)
        longest = max(len(p) for p in model["prompts"]) + max_new_tokens
        llm = Llama(
            model_path=str(gguf_file),
            n_ctx=max(256, longest),
            n_batch=max(256, longest),
            logits_all=True,
            type_k=GGML_TYPE_F32,  # llama.cpp caches K/V in float16 by default: float32 like the GGUF
            type_v=GGML_TYPE_F32,
            n_threads=int(os.environ.get("OMP_NUM_THREADS", "2")),
            seed=0,
            verbose=False,
        )
        outputs = []
        for prompt in model["prompts"]:
            llm.reset()
            llm.eval(list(prompt))
            tokens, logprobs = [], []
            for _ in range(max_new_tokens):
                row = np.asarray(llm.scores[llm.n_tokens - 1], dtype=np.float64)
                token = int(row.argmax())
                top = row.max()
                tokens.append(token)
                logprobs.append(float(row[token] - top - np.log(np.exp(row - top).sum())))
                llm.eval([token])
            outputs.append({"tokens": tokens, "logprobs": logprobs})
        del llm
    return outputs, notes + ["GGUF: convert_hf_to_gguf.py --outtype f32; KV cache float32"]


if __name__ == "__main__":
    import protocol

    protocol.main("llama.cpp", version, generate)
