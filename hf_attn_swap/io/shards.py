"""Safetensors checkpoints read and written a few tensors at a time, for conversions larger than memory.

``CheckpointReader``: the tensors of a checkpoint folder (``model.safetensors`` or the shards named by
``model.safetensors.index.json``), memory-mapped with ``safe_open``; ``read(names)`` loads only those tensors
(one decoder layer's), never the whole state dict.

``ShardWriter``: tensors added in groups (one layer) go to disk at once and make one shard until the next group
would take it past ``max_shard_size`` bytes (a group larger than that is a shard of its own);
``finish()`` names the shards ``model-0000i-of-0000N.safetensors`` (``model.safetensors`` when there is one) and
writes ``model.safetensors.index.json``, as ``save_pretrained`` does. Every ``sync`` (and flush) is a resumable
point: the writer's own state (``state()``) lists the finished shards and the tensors already in the shard being
filled, and ``ShardWriter(folder, ..., state=...)`` continues from it, cutting off whatever a killed run wrote
after that point.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections import defaultdict
from pathlib import Path

import torch

from .folders import durable_replace

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_size(size: str | int) -> int:
    """``"500MB"`` / ``"2GiB"`` / ``1000`` -> bytes."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        match = _SIZE.match(str(size))
        if not match:
            raise ValueError(f"unreadable size {size!r}: write e.g. 500MB, 2GB or 1GiB")
        value = int(float(match.group(1)) * _UNITS[(match.group(2) or "B").lower()])
    if value < 1:
        raise ValueError(f"size must be positive, got {size!r}")
    return value


def tensor_bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


class CheckpointReader:
    """The tensors of one checkpoint folder, by name, read from memory-mapped safetensors files.

    Each ``read`` maps the files it needs and unmaps them when done: mapped pages count as resident memory, so
    keeping every shard mapped would grow the process to the checkpoint's size as its tensors are read.
    """

    def __init__(self, folder: str | Path):
        from safetensors import safe_open

        self.folder = Path(folder)
        index = self.folder / INDEX_FILE
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif (self.folder / SINGLE_FILE).is_file():
            with safe_open(str(self.folder / SINGLE_FILE), framework="pt") as f:
                weight_map = dict.fromkeys(f.keys(), SINGLE_FILE)
        else:
            raise FileNotFoundError(
                f"{str(self.folder)!r} has no {SINGLE_FILE} or {INDEX_FILE}: layer-by-layer conversion reads "
                "safetensors checkpoints (re-save the model with save_pretrained)"
            )
        self.weight_map: dict[str, str] = weight_map

    def keys(self) -> list[str]:
        return list(self.weight_map)

    def _check(self, names) -> None:
        missing = [n for n in names if n not in self.weight_map]
        if missing:
            raise KeyError(f"{str(self.folder)!r} has no tensor(s) {missing[:3]}")

    def read(self, names) -> dict[str, torch.Tensor]:
        """The named tensors (each copied out of its file)."""
        from safetensors import safe_open

        self._check(names)
        by_file = defaultdict(list)
        for name in names:
            by_file[self.weight_map[name]].append(name)
        out = {}
        for file, members in by_file.items():
            with safe_open(str(self.folder / file), framework="pt") as f:
                out.update({name: f.get_tensor(name) for name in members})
        return {name: out[name] for name in names}

    def rows(self, name: str, index: torch.Tensor, block: int = 4096) -> torch.Tensor:
        """``tensor[index]`` for a 2-D tensor (an embedding), reading ``block`` rows at a time."""
        from safetensors import safe_open

        self._check([name])
        index = index.long()
        with safe_open(str(self.folder / self.weight_map[name]), framework="pt") as f:
            view = f.get_slice(name)
            count = view.get_shape()[0]
            parts, positions = [], []
            for first in range(0, count, block):
                wanted = ((index >= first) & (index < first + block)).nonzero().flatten()
                if len(wanted):
                    chunk = view[first : min(first + block, count)]
                    parts.append(chunk[index[wanted] - first])
                    positions.append(wanted)
        order = torch.cat(positions).argsort()
        return torch.cat(parts)[order]

    def blocks(self, name: str, rows: int = 4096):
        """(dtype, shape) of tensor ``name`` and an iterator over it in blocks of ``rows`` leading rows: copies a
        large tensor (an embedding) without holding it whole."""
        from safetensors import safe_open

        self._check([name])
        path = str(self.folder / self.weight_map[name])
        with safe_open(path, framework="pt") as f:
            view = f.get_slice(name)
            shape = list(view.get_shape())
            dtype = f.get_tensor(name).dtype if not shape else view[:1].dtype

        def iterate():
            with safe_open(path, framework="pt") as f:
                view = f.get_slice(name)
                for first in range(0, max(shape[0], 1) if shape else 1, rows):
                    yield view[first : first + rows] if shape else f.get_tensor(name)

        return dtype, shape, iterate()

    def total_bytes(self) -> int:
        """Bytes of all the checkpoint's tensor files."""
        return sum((self.folder / f).stat().st_size for f in set(self.weight_map.values()))

    def close(self) -> None:
        pass


#: safetensors' names of torch dtypes
_DTYPE_NAMES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}  # fmt: skip


def _header(entries, metadata: dict | None) -> bytes:
    """The safetensors header (8-byte length + JSON, space-padded to 8 bytes) of tensors stored back to back:
    ``entries`` = (name, dtype, shape) in file order."""
    header, offset = {}, 0
    for name, dtype, shape in entries:
        size = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        header[name] = {
            "dtype": _DTYPE_NAMES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    if metadata:
        header = {"__metadata__": metadata, **header}
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    return len(encoded).to_bytes(8, "little") + encoded


def _write_bytes(f, tensor: torch.Tensor) -> None:
    if tensor.numel():
        f.write(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)


def save_safetensors(
    tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict | None = None
) -> None:
    """Write ``tensors`` as one safetensors file, one tensor's bytes at a time (``safetensors.torch.save_file``
    first copies every tensor into one bytes buffer: twice the shard in memory)."""
    with open(path, "wb") as f:
        f.write(_header([(n, t.dtype, t.shape) for n, t in tensors.items()], metadata))
        for tensor in tensors.values():
            _write_bytes(f, tensor)
        f.flush()
        os.fsync(f.fileno())


class ShardWriter:
    """Write tensors into shards of at most ``max_shard_size`` bytes (a larger single group gets its own shard)
    in ``folder``; see the module docstring. ``state``: what ``state()`` returned at a flush, to resume.

    Added tensors go straight to disk (``shard-<i>.data``, their bytes back to back), so the shard being filled
    costs no memory; ``flush`` writes the header and copies the bytes after it (in the kernel where it can).
    """

    def __init__(self, folder: str | Path, max_shard_size: int | str, state: dict | None = None):
        self.folder = Path(folder)
        self.max_shard_size = parse_size(max_shard_size)
        state = state or {}
        self.shards: list[list[str]] = [list(s) for s in state.get("shards", [])]
        self.total = int(state.get("total", 0))
        self.pending: list[tuple[str, torch.dtype, list[int]]] = [
            (name, getattr(torch, dtype), list(shape)) for name, dtype, shape in state.get("pending", [])
        ]
        self.pending_bytes = int(state.get("pending_bytes", 0))
        self._data = None
        if self.pending and (self.folder / self._name(len(self.shards))).is_file():
            # killed after ``flush`` renamed the shard into place, before the caller saved the new state
            self.shards.append([name for name, _, _ in self.pending])
            self.total += self.pending_bytes
            self.pending, self.pending_bytes = [], 0
        keep = {self._name(i) for i in range(len(self.shards))}
        if self.pending:
            keep.add(self._data_path().name)
        for stale in self.folder.glob("shard-*"):  # what a killed run was writing after its last state
            if stale.name not in keep:
                stale.unlink()
        if self.pending:  # bytes written after the last state are cut off
            data = self._data_path()
            if not data.is_file() or data.stat().st_size < self.pending_bytes:
                raise RuntimeError(
                    f"{str(data)!r} is shorter than its saved state: delete the folder {str(self.folder)!r} "
                    "and run again"
                )
            self._data = open(data, "r+b")  # noqa: SIM115 - closed by flush
            self._data.truncate(self.pending_bytes)
            self._data.seek(self.pending_bytes)
        if not state:  # a run killed inside finish() left final names behind
            for stale in [*self.folder.glob("model-*-of-*.safetensors"), self.folder / SINGLE_FILE]:
                stale.unlink(missing_ok=True)
            (self.folder / INDEX_FILE).unlink(missing_ok=True)

    @staticmethod
    def _name(i: int) -> str:
        return f"shard-{i + 1:05d}.safetensors"

    def _data_path(self) -> Path:
        return self.folder / self._name(len(self.shards)).replace(".safetensors", ".data")

    def overflows(self, nbytes: int) -> bool:
        """Whether adding ``nbytes`` more would take the shard past ``max_shard_size`` (flush first)."""
        return bool(self.pending) and self.pending_bytes + nbytes > self.max_shard_size

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        """Append ``tensors`` to the shard being filled; the caller flushes (``overflows`` says when)."""
        if self._data is None:
            self._data = open(self._data_path(), "wb")  # noqa: SIM115 - closed by flush
        for name, tensor in tensors.items():
            _write_bytes(self._data, tensor)
            self.pending.append((name, tensor.dtype, list(tensor.shape)))
            self.pending_bytes += tensor_bytes(tensor)

    def add_blocks(self, name: str, dtype: torch.dtype, shape: list[int], blocks) -> None:
        """Append one tensor given as consecutive blocks of its leading rows (``CheckpointReader.blocks``)."""
        if self._data is None:
            self._data = open(self._data_path(), "wb")  # noqa: SIM115 - closed by flush
        size = 0
        for block in blocks:
            block = block.to(dtype)
            _write_bytes(self._data, block)
            size += tensor_bytes(block)
        expected = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        if size != expected:
            raise ValueError(f"{name}: the blocks hold {size} bytes, its shape {shape} needs {expected}")
        self.pending.append((name, dtype, list(shape)))
        self.pending_bytes += size

    def written(self) -> set[str]:
        """Names of the tensors already written (finished shards and the one being filled)."""
        return {name for shard in self.shards for name in shard} | {name for name, _, _ in self.pending}

    def sync(self) -> None:
        """Put the bytes added so far on disk (fsync): ``state()`` is then a point a rerun can resume from."""
        if self._data is not None:
            self._data.flush()
            os.fsync(self._data.fileno())

    def flush(self) -> None:
        """Write the shard being filled (atomically: a temporary name, then renamed)."""
        if not self.pending:
            return
        self._data.close()
        self._data = None
        data = self._data_path()
        path = self.folder / self._name(len(self.shards))
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as out, open(data, "rb") as f:
            out.write(_header(self.pending, {"format": "pt"}))
            out.flush()
            shutil.copyfileobj(f, out, 16 * 2**20)
            out.flush()
            os.fsync(out.fileno())
        durable_replace(tmp, path)
        data.unlink()
        self.shards.append([name for name, _, _ in self.pending])
        self.total += self.pending_bytes
        self.pending, self.pending_bytes = [], 0

    def state(self) -> dict:
        """The finished shards and the tensors of the one being filled (JSON-able; call ``sync`` first): pass
        it back as ``state`` to continue after a kill."""
        pending = [[name, str(dtype).removeprefix("torch."), shape] for name, dtype, shape in self.pending]
        shards = [list(names) for names in self.shards]
        return {
            "shards": shards,
            "total": self.total,
            "pending": pending,
            "pending_bytes": self.pending_bytes,
        }

    def finish(self) -> list[str]:
        """Flush, give the shards their final names and write the index; returns the file names."""
        self.flush()
        count = len(self.shards)
        names = (
            [SINGLE_FILE]
            if count == 1
            else [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        )
        weight_map = {}
        for i, (tensors, final) in enumerate(zip(self.shards, names, strict=True)):
            durable_replace(self.folder / self._name(i), self.folder / final)
            weight_map.update(dict.fromkeys(tensors, final))
        if count > 1:
            index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))}
            (self.folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        return names


def layer_names(names, prefix: str = "model.layers.") -> dict[int, list[str]]:
    """Tensor names grouped by decoder layer index (``model.layers.<i>.``); names outside layers are left out."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    grouped: dict[int, list[str]] = defaultdict(list)
    for name in names:
        match = pattern.match(name)
        if match:
            grouped[int(match.group(1))].append(name)
    return dict(grouped)
