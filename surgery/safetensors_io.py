"""Write safetensors shards tensor by tensor, so that no more than one tensor is held in memory.

The safetensors header lists every tensor's offsets before the data; when the shapes and dtypes are known in
advance (they are for conversion and export), we can write the header first and stream the data after it.
Shards and index follow Hugging Face's naming (model-00001-of-00003.safetensors + model.safetensors.index.json).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from surgery.errors import SurgeryError

DTYPE_CODES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}


def parse_size(text: str | int) -> int:
    """'5GB' -> 5_000_000_000 bytes (decimal units, as transformers' max_shard_size)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)\s*", str(text), re.IGNORECASE)
    if not m:
        raise SurgeryError(f"--max-shard-size {text!r}: expected a size such as 500MB or 5GB")
    unit = m.group(2).upper().rstrip("B")
    scale = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
             "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}[unit]
    size = int(float(m.group(1)) * scale)
    if size <= 0:
        raise SurgeryError(f"--max-shard-size {text!r}: must be positive")
    return size


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return torch.Size(self.shape).numel() * self.dtype.itemsize


def _header_bytes(specs: list[TensorSpec], metadata: dict | None) -> bytes:
    header: dict = {}
    if metadata:
        header["__metadata__"] = {k: str(v) for k, v in metadata.items()}
    offset = 0
    for s in specs:
        header[s.name] = {"dtype": DTYPE_CODES[s.dtype], "shape": list(s.shape),
                          "data_offsets": [offset, offset + s.nbytes]}
        offset += s.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    return raw + b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as the reference writer does


def natural_key(name: str) -> list:
    """'model.layers.10.x' sorts after 'model.layers.9.x': a layer's tensors stay together, in layer order."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


class ShardedWriter:
    """Streams tensors into shards of at most `max_bytes` each (a bigger tensor gets a shard of its own).
    Tensors go in a canonical order (`self.order`: natural name order), so the same tensors always give the
    same bytes. Call write() once per spec in that order, then close()."""

    def __init__(self, folder: Path, specs: list[TensorSpec], max_bytes: int, metadata: dict | None = None):
        self.folder = Path(folder)
        self.metadata = metadata or {"format": "pt"}
        specs = sorted(specs, key=lambda s: natural_key(s.name))
        self.shards: list[list[TensorSpec]] = [[]]
        size = 0
        for s in specs:
            if self.shards[-1] and size + s.nbytes > max_bytes:
                self.shards.append([])
                size = 0
            self.shards[-1].append(s)
            size += s.nbytes
        n = len(self.shards)
        self.names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self.order = [s for shard in self.shards for s in shard]
        self._next = 0
        self._shard_index = -1
        self._file = None
        self.total_bytes = sum(s.nbytes for s in specs)

    def _open_next_shard(self) -> None:
        if self._file:
            self._file.close()
        self._shard_index += 1
        specs = self.shards[self._shard_index]
        header = _header_bytes(specs, self.metadata)
        self._file = open(self.folder / self.names[self._shard_index], "wb")
        self._file.write(len(header).to_bytes(8, "little"))
        self._file.write(header)
        self._remaining_in_shard = len(specs)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        spec = self.order[self._next]
        if name != spec.name:
            raise RuntimeError(f"tensor {name} written out of order; expected {spec.name}")
        if tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype:
            raise RuntimeError(f"tensor {name}: got {tuple(tensor.shape)} {tensor.dtype}, planned {spec.shape} {spec.dtype}")
        if self._file is None or self._remaining_in_shard == 0:
            self._open_next_shard()
        t = tensor.detach().to("cpu").contiguous()
        if t.numel():
            self._file.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))  # no copy of the bytes
        self._remaining_in_shard -= 1
        self._next += 1

    def close(self) -> None:
        if self._next != len(self.order):
            raise RuntimeError(f"only {self._next} of {len(self.order)} planned tensors were written")
        if self._file:
            self._file.close()
            self._file = None
        if len(self.names) > 1:
            index = {"metadata": {"total_size": self.total_bytes},
                     "weight_map": {s.name: self.names[i] for i, shard in enumerate(self.shards) for s in shard}}
            (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def write_state_dict(folder: Path, tensors: dict[str, torch.Tensor], max_bytes: int, metadata: dict | None = None):
    specs = [TensorSpec(k, tuple(v.shape), v.dtype) for k, v in tensors.items()]
    writer = ShardedWriter(folder, specs, max_bytes, metadata)
    for spec in writer.order:
        writer.write(spec.name, tensors[spec.name])
    writer.close()
    return writer.names
