"""vLLM driver (runs in vLLM's interpreter; see protocol.py). Options: ``mla_disable`` (sets
``VLLM_MLA_DISABLE=1``: MLA runs through the expanded path; otherwise vLLM picks its MLA backend, CPU_MLA on CPU,
which takes latent 512 + rope 64 only), ``variants``: ``"patched"`` / ``"unpatched"``.

``patched``: vLLM's CPU rotary kernel (``RotaryEmbedding.forward_cpu`` = ``ops.rotary_embedding``) mis-rotates a
3-D query ``[T, H, d]`` with H > 1: it walks the tokens with the head stride, so it rotates the first T rows of
the query seen as ``[T*H, d]`` (positions 0..T-1) and leaves the rest untouched; its DeepSeek model passes
``q_pe`` that way. The patch routes the op to ``forward_native`` (same math in PyTorch) in this process only
(``VLLM_ENABLE_V1_MULTIPROCESSING=0`` keeps the engine in this process so the patch reaches it). Every response
carries ``rotary_bug``: the stock kernel vs ``forward_native`` on a 3-D non-neox query.
"""

from __future__ import annotations

import gc
import os

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; the default reserves far more than tiny runs need

import protocol  # noqa: E402  (this folder is sys.path[0] when the driver runs)

PATCH_NOTE = (
    "vLLM CPU rotary workaround applied in this process: RotaryEmbedding.forward_cpu = "
    "RotaryEmbedding.forward_native"
)


def version():
    import vllm

    return vllm.__version__


def rotary_bug(options) -> dict:
    """Stock CPU kernel vs ``forward_native`` on a 3-D ``[T, H, d]`` query, interleaved (non-neox) rope."""
    import torch
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.rotary_embedding import RotaryEmbedding

    torch.manual_seed(0)
    tokens, heads, dim = 5, 4, 16
    with set_current_vllm_config(VllmConfig()):
        rope = RotaryEmbedding(dim, dim, 64, 10000.0, is_neox_style=False, dtype=torch.float32)
    positions = torch.arange(tokens)
    query, key = torch.randn(tokens, heads, dim), torch.randn(tokens, 1, dim)
    native, _ = RotaryEmbedding.forward_native(rope, positions, query.clone(), key.clone())
    stock, _ = ORIGINAL_FORWARD_CPU(rope, positions, query.clone(), key.clone())
    flat, _ = ORIGINAL_FORWARD_CPU(
        rope, positions, query.clone().view(tokens, -1), key.clone().view(tokens, -1)
    )
    diff = (native - stock).abs().max().item()
    return {
        "rotary_bug": {
            "present": diff > 1e-5,
            "max_abs_diff_3d_query": diff,
            "max_abs_diff_2d_query": (native.view(tokens, -1) - flat).abs().max().item(),
            "shape": [tokens, heads, dim],
        }
    }


def generate(model, max_new_tokens, options):
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.model_executor.layers.rotary_embedding import RotaryEmbedding

    patched = options["variant"] == "patched"
    RotaryEmbedding.forward_cpu = RotaryEmbedding.forward_native if patched else ORIGINAL_FORWARD_CPU
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    longest = max(len(p) for p in model["prompts"]) + max_new_tokens
    llm = None
    try:  # a failed start leaves the process group half built: clean up so the next model can start
        llm = LLM(
            model=model["path"],
            dtype="float32",
            enforce_eager=True,
            skip_tokenizer_init=True,
            max_model_len=max(256, longest),
            max_num_seqs=len(model["prompts"]),
            seed=0,
        )
        params = SamplingParams(
            temperature=0.0, max_tokens=max_new_tokens, ignore_eos=True, logprobs=1, detokenize=False
        )
        results = llm.generate([TokensPrompt(prompt_token_ids=p) for p in model["prompts"]], params)
        outputs = []
        for result in results:
            completion = result.outputs[0]
            tokens = list(completion.token_ids)
            outputs.append(
                {
                    "tokens": tokens,
                    "logprobs": [
                        step[t].logprob for step, t in zip(completion.logprobs, tokens, strict=False)
                    ],
                }
            )
    finally:
        del llm
        gc.collect()
        cleanup_dist_env_and_memory()
    notes = [PATCH_NOTE] if patched else []
    return outputs, notes


if __name__ == "__main__":
    import json
    import sys

    with open(sys.argv[1]) as f:
        request_options = json.load(f).get("options") or {}
    if request_options.get("mla_disable"):
        os.environ["VLLM_MLA_DISABLE"] = "1"
    from vllm.model_executor.layers.rotary_embedding import RotaryEmbedding

    ORIGINAL_FORWARD_CPU = RotaryEmbedding.forward_cpu
    protocol.main("vllm", version, generate, extra=rotary_bug)
