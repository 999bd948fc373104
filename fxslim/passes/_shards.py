"""Sharded safetensors checkpoints, read and written one tensor at a time.

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON
(``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``,
offsets relative to the end of the header) and the raw tensor bytes. Reading a tensor
here is a plain positioned read into a fresh tensor, not a memory map: pages of a mapped
file count in the process's resident memory once touched and stay until unmapped, so a
7B checkpoint read through a map would be resident by the end. Writing is the reverse:
the header is known before any data (the shapes come from the plan), so tensors are
written in header order as they are produced, and a tensor that does not change is
copied in chunks of bytes without being built at all.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from fxslim.errors import SaveLoadError

__all__ = ["INDEX", "SINGLE", "ShardWriter", "TensorEntry", "checkpoint_entries", "read_tensor"]

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
_CHUNK = 64 << 20  # bytes per copy step of an unchanged tensor

DTYPES = {
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "F64": torch.float64,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
NAMES = {v: k for k, v in DTYPES.items()}


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lies: its file, dtype, shape and byte range in the file."""

    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


def _header(path: Path) -> tuple[dict, int]:
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > 100 << 20:
                raise SaveLoadError(
                    f"{path}: a safetensors header of {n} bytes is not plausible (corrupt file?)"
                )
            return json.loads(f.read(n)), 8 + n
    except (OSError, struct.error, ValueError) as exc:
        raise SaveLoadError(
            f"{path} is not a readable safetensors file ({type(exc).__name__}: {exc})"
        ) from exc


def checkpoint_entries(folder: Path) -> tuple[dict[str, TensorEntry], list[str]]:
    """Every tensor of a Hugging Face checkpoint folder (``model.safetensors`` or the
    shards its ``model.safetensors.index.json`` names), and the shard file names in order."""
    folder = Path(folder)
    if (folder / INDEX).is_file():
        try:
            weight_map = json.loads((folder / INDEX).read_text())["weight_map"]
        except (OSError, ValueError, KeyError) as exc:
            raise SaveLoadError(f"{folder / INDEX} is not a safetensors index ({exc})") from exc
        files = list(dict.fromkeys(weight_map.values()))
    elif (folder / SINGLE).is_file():
        files = [SINGLE]
    else:
        raise SaveLoadError(
            f"{folder} holds no {SINGLE} or {INDEX}: give a Hugging Face checkpoint folder "
            "saved with safetensors (save_pretrained)"
        )
    out: dict[str, TensorEntry] = {}
    for name in files:
        head, base = _header(folder / name)
        for key, v in head.items():
            if key == "__metadata__":
                continue
            if v["dtype"] not in DTYPES:
                raise SaveLoadError(
                    f"{folder / name}: tensor {key} has dtype {v['dtype']}, not one fxslim reads"
                )
            b, e = v["data_offsets"]
            out[key] = TensorEntry(
                key, folder / name, v["dtype"], tuple(v["shape"]), base + b, base + e
            )
    return out, files


def read_tensor(entry: TensorEntry, rows: slice | None = None) -> torch.Tensor:
    """The tensor (or a contiguous range of its rows) read into fresh memory."""
    shape = list(entry.shape)
    start, nbytes = entry.start, entry.end - entry.start
    if rows is not None:
        row = nbytes // max(shape[0], 1)
        lo, hi, _ = rows.indices(shape[0])
        start, nbytes, shape[0] = start + lo * row, (hi - lo) * row, hi - lo
    out = torch.empty(shape, dtype=DTYPES[entry.dtype])
    view = memoryview(out.reshape(-1).view(torch.uint8).numpy()) if out.numel() else memoryview(b"")
    with open(entry.file, "rb", buffering=0) as f:
        f.seek(start)
        got = 0
        while got < nbytes:
            n = f.readinto(view[got:])
            if not n:
                raise SaveLoadError(
                    f"{entry.file} ends inside tensor {entry.name} (truncated file?)"
                )
            got += n
    return out


class ShardWriter:
    """Writes one safetensors file whose tensors (names, dtypes, shapes) are known upfront.

    Example:
        >>> w = ShardWriter(path, [("a", "F32", (2, 3))]); w.write("a", torch.zeros(2, 3)); w.close()
    """

    def __init__(self, path: Path, layout: list[tuple[str, str, tuple[int, ...]]]):
        header: dict = {"__metadata__": {"format": "pt"}}
        self.sizes: dict[str, int] = {}
        offset = 0
        for name, dtype, shape in layout:
            n = DTYPES[dtype].itemsize
            for s in shape:
                n *= s
            header[name] = {
                "dtype": dtype,
                "shape": list(shape),
                "data_offsets": [offset, offset + n],
            }
            self.sizes[name] = n
            offset += n
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
        self.order, self.next, self.total = [name for name, _, _ in layout], 0, offset
        self.f = open(path, "wb")  # noqa: SIM115 - closed by close(), after the last tensor
        self.f.write(struct.pack("<Q", len(blob)) + blob)

    def _expect(self, name: str) -> int:
        if self.next >= len(self.order) or self.order[self.next] != name:
            want = self.order[self.next] if self.next < len(self.order) else "nothing"
            raise SaveLoadError(f"pass author: shard writer expected {want}, got {name}")
        self.next += 1
        return self.sizes[name]

    def write(self, name: str, t: torch.Tensor) -> None:
        """Append tensor `name` (the next one in the layout)."""
        n = self._expect(name)
        data = t.contiguous().reshape(-1).view(torch.uint8).numpy() if t.numel() else b""
        if len(data) != n:
            raise SaveLoadError(f"pass author: {name} has {len(data)} bytes, its header says {n}")
        self.f.write(memoryview(data))

    def copy(self, name: str, entry: TensorEntry) -> None:
        """Append tensor `name` as the unchanged bytes of `entry` (in chunks, never whole)."""
        n = self._expect(name)
        if n != entry.end - entry.start:
            raise SaveLoadError(
                f"pass author: {name} has {entry.end - entry.start} bytes, its header says {n}"
            )
        with open(entry.file, "rb", buffering=0) as src:
            src.seek(entry.start)
            left = n
            while left:
                chunk = src.read(min(_CHUNK, left))
                if not chunk:
                    raise SaveLoadError(
                        f"{entry.file} ends inside tensor {entry.name} (truncated file?)"
                    )
                self.f.write(chunk)
                left -= len(chunk)

    def close(self) -> None:
        """Finish the file (every tensor of the layout must have been written)."""
        if self.next != len(self.order):
            raise SaveLoadError(
                f"pass author: shard closed after {self.next} of {len(self.order)} tensors"
            )
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
