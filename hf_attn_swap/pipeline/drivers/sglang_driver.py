"""SGLang driver (see protocol.py), in a venv holding SGLang's Python sources.

SGLang publishes no CPU kernels on PyPI (``sgl-kernel`` is CUDA-only), so without CUDA this driver does not decode:
it reads the installed ``sglang/srt/models/deepseek_v2.py`` (and its weight loader) as text and checks that what
its DeepSeek loader builds is what the folder holds (architecture registered, no attention biases since it builds
those projections bias-free and skips unknown ``.bias`` tensors silently, rope layout and theta it reads, eps of
``kv_a_layernorm``, untied ``lm_head``, the q path for ``q_lora_rank``, every tensor name). Each check carries the
source line it relies on, so a changed SGLang fails loudly instead of passing on stale assumptions. With CUDA and a
full SGLang install it decodes with ``sglang.Engine`` (greedy, ``return_logprob``); not run on the CPU CI.
"""

from __future__ import annotations

import importlib.util
import json
import re
import struct
from pathlib import Path

#: the names SGLang's DeepseekV2/V3 model loads (attention and dense MLP of a layer, plus the embeddings)
TENSOR_PATTERNS = [
    r"model\.embed_tokens\.weight",
    r"model\.norm\.weight",
    r"lm_head\.weight",
    r"model\.layers\.\d+\.(input_layernorm|post_attention_layernorm)\.weight",
    r"model\.layers\.\d+\.self_attn\.(q_proj|q_a_proj|q_a_layernorm|q_b_proj|kv_a_proj_with_mqa|kv_a_layernorm"
    r"|kv_b_proj|o_proj)\.weight",
    r"model\.layers\.\d+\.mlp\.(gate_proj|up_proj|down_proj)\.weight",
    r"model\.layers\.\d+\.mlp\.(gate\.weight|gate\.e_score_correction_bias)",
    r"model\.layers\.\d+\.mlp\.(experts\.\d+|shared_experts)\.(gate_proj|up_proj|down_proj)\.weight",
]


def version():
    try:
        from importlib.metadata import version as dist_version

        return dist_version("sglang")
    except Exception:
        return None


def sources() -> dict[str, str]:
    spec = importlib.util.find_spec("sglang")  # locates the package without importing it (no torch here)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "sglang is not installed in this interpreter: scripts/install_runtimes.sh sglang"
        )
    models = Path(next(iter(spec.submodule_search_locations))) / "srt" / "models"
    found = {
        "model": models / "deepseek_v2.py",
        "loader": models / "deepseek_common" / "deepseek_weight_loader.py",
    }
    return {k: p.read_text() if p.is_file() else "" for k, p in found.items()}


def tensor_names(folder: Path) -> list[str]:
    """Tensor names from the safetensors headers (8-byte little-endian length, then JSON)."""
    names = []
    for file in sorted(folder.glob("*.safetensors")):
        with open(file, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            names += [n for n in json.loads(f.read(length)) if n != "__metadata__"]
    return names


def source_line(text: str, pattern: str) -> str | None:
    match = re.search(pattern, text, re.S)
    if match is None:
        return None
    return " ".join(match.group(0).split())[:160]


def source_checks(folder: Path, config: dict, src: dict) -> list[dict]:
    model, loader = src["model"], src["loader"]
    names = tensor_names(folder)
    checks = []

    def check(name, ok, detail, evidence):
        checks.append({"name": name, "ok": bool(ok and evidence), "detail": detail, "source": evidence})

    entry = source_line(model, r"EntryClass = \[[^\]]*\]")
    arch = (config.get("architectures") or [None])[0]
    check("architecture", entry and arch and re.search(rf"\b{arch}\b", entry), f"{arch} registered", entry)
    bias_free = [
        source_line(model, rf"self\.{name} = \w+Linear\((?:(?!\)\n).)*?bias=False")
        for name in ("q_proj", "kv_a_proj_with_mqa", "o_proj")
    ]
    skip = source_line(loader, r'name\.endswith\("\.bias"\) and name not in params_dict')
    biases = [n for n in names if n.endswith(".bias") and ".self_attn." in n]
    check(
        "no attention biases",
        not biases,
        f"SGLang builds q_proj/kv_a_proj_with_mqa/o_proj bias-free and skips unknown .bias tensors; folder has "
        f"{len(biases)} attention bias tensors" + (f" (e.g. {biases[0]})" if biases else ""),
        all(bias_free) and skip and "; ".join([*bias_free, skip]),
    )
    rope = source_line(model, r'is_neox_style = not getattr\(config, "rope_interleave", True\)')
    check(
        "rope layout",
        config.get("rope_interleave", True) is True,
        f"SGLang follows rope_interleave (default true); folder: {config.get('rope_interleave')}; vLLM and "
        "llama.cpp hard-code interleaved, so it must be true",
        rope,
    )
    theta = source_line(model, r'rope_theta = config\.rope_parameters\["rope_theta"\]')
    params = config.get("rope_parameters") or {}
    check(
        "rope theta",
        params.get("rope_theta") is not None or config.get("rope_theta") is not None,
        f"rope_parameters.rope_theta={params.get('rope_theta')}, rope_theta={config.get('rope_theta')}",
        theta,
    )
    eps = source_line(
        model, r"self\.kv_a_layernorm = RMSNorm\(self\.kv_lora_rank, eps=config\.rms_norm_eps\)"
    )
    check(
        "kv_a_layernorm eps",
        config.get("rms_norm_eps") == 1e-6,
        f"SGLang uses rms_norm_eps ({config.get('rms_norm_eps')}) for kv_a_layernorm; transformers uses 1e-6",
        eps,
    )
    tie = source_line(model, r"config\.tie_word_embeddings")
    tied = config.get("tie_word_embeddings", False)
    check(
        "lm_head",
        tied or "lm_head.weight" in names,
        "tied embeddings"
        if tied
        else f"lm_head.weight {'present' if 'lm_head.weight' in names else 'MISSING'}",
        tie,
    )
    q_path = source_line(model, r"if self\.q_lora_rank is not None:\s*self\.fused_qkv_a_proj_with_mqa")
    lora = config.get("q_lora_rank") is not None
    want = ["q_a_proj", "q_a_layernorm", "q_b_proj"] if lora else ["q_proj"]
    missing = [w for w in want if not any(f".self_attn.{w}.weight" in n for n in names)]
    check(
        "q path",
        not missing,
        f"q_lora_rank={config.get('q_lora_rank')}; missing {missing or 'nothing'}",
        q_path,
    )
    unknown = [n for n in names if not any(re.fullmatch(p, n) for p in TENSOR_PATTERNS)]
    layers = [w for w in ("kv_a_proj_with_mqa", "kv_a_layernorm", "kv_b_proj") if f"self.{w} =" in model]
    check(
        "tensor names",
        not unknown,
        f"{len(names)} tensors; not loaded by SGLang: {unknown[:5] or 'none'}",
        len(layers) == 3 and "attention modules " + ", ".join(layers),
    )
    return checks


def generate(model, max_new_tokens, options):
    import sglang
    import torch  # only reached with CUDA (checked in main)

    engine = sglang.Engine(model_path=model["path"], dtype="float32", skip_tokenizer_init=True, random_seed=0)
    try:
        params = {"temperature": 0.0, "max_new_tokens": max_new_tokens, "ignore_eos": True}
        outputs = []
        for prompt in model["prompts"]:
            out = engine.generate(input_ids=prompt, sampling_params=params, return_logprob=True)
            steps = out["meta_info"]["output_token_logprobs"]  # (logprob, token id, text)
            outputs.append({"tokens": [int(s[1]) for s in steps], "logprobs": [float(s[0]) for s in steps]})
    finally:
        engine.shutdown()
        torch.cuda.empty_cache()
    return outputs, []


def cuda() -> bool:
    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return torch.cuda.is_available()


def main():
    import sys
    import time

    request_path, response_path = sys.argv[1:3]
    request = json.loads(Path(request_path).read_text())
    configs = request["options"]["configs"]
    if cuda() and importlib.util.find_spec("sgl_kernel") is not None:
        import protocol

        return protocol.main("sglang", version, generate)
    response = {
        "runtime": "sglang",
        "version": version(),
        "notes": [
            "SGLang cannot run on this machine (no CUDA; its PyPI kernels, sgl-kernel, are CUDA-only): checked "
            "from its sources (srt/models/deepseek_v2.py) instead of decoding"
        ],
        "runs": [],
    }
    src = sources()
    for model in request["models"]:
        start = time.perf_counter()
        run = {"model": model["name"], "backend": "source", "variant": None, "error": None, "outputs": []}
        config = configs[model["name"]]
        if config.get("model_type") not in ("deepseek_v2", "deepseek_v3"):
            run["checks"] = [
                {
                    "name": "model type",
                    "ok": True,
                    "detail": f"{config.get('model_type')}: not an MLA folder, SGLang's own model code "
                    "(not checked here)",
                    "source": None,
                }
            ]
        else:
            run["checks"] = source_checks(Path(model["path"]), config, src)
        run["seconds"] = round(time.perf_counter() - start, 2)
        response["runs"].append(run)
    Path(response_path).write_text(json.dumps(response))


if __name__ == "__main__":
    main()
