"""Load: read a dense checkpoint's config and tensors, lazily, and refuse what is not Llama-like.

A checkpoint is a Hugging Face folder (config.json + model.safetensors, or shards with
model.safetensors.index.json) or a single .gguf file. Weights are only ever read from safetensors or GGUF:
pickled .bin files are refused, never unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from surgery.errors import SurgeryError

# Architectures whose decoder block is Llama's: RMSNorm, attention, SwiGLU FFN of gate/up/down projections.
SUPPORTED_MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}

_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


def ffn_names(layer: int) -> dict[str, str]:
    prefix = f"model.layers.{layer}.mlp"
    return {p: f"{prefix}.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj")}


def read_config_dict(folder: Path) -> dict:
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise SurgeryError(f"{folder}: no config.json (expected a Hugging Face model folder or a .gguf file)")
    try:
        return json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise SurgeryError(f"{cfg_path}: not valid JSON ({e.msg} at line {e.lineno})") from None


def check_llama_like(cfg: dict, where: str) -> None:
    """Refuse architectures whose FFN is not a bias-free SwiGLU of gate/up/down projections."""
    model_type = cfg.get("model_type")
    archs = cfg.get("architectures") or []
    if model_type not in SUPPORTED_MODEL_TYPES:
        name = archs[0] if archs else model_type
        raise SurgeryError(
            f"{where}: architecture {name!r} (model_type {model_type!r}) is not supported; "
            f"surgery converts Llama-family models ({', '.join(SUPPORTED_MODEL_TYPES.values())})"
        )
    act = cfg.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise SurgeryError(f"{where}: hidden_act {act!r} is not supported (the FFN must be SwiGLU with silu)")
    if cfg.get("mlp_bias"):
        raise SurgeryError(f"{where}: mlp_bias=true is not supported (expert FFNs are bias-free)")
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers"):
        if not isinstance(cfg.get(key), int):
            raise SurgeryError(f"{where}: config.json lacks an integer {key!r}")


def _safetensors_header(path: Path) -> dict:
    """Parse and check a safetensors header against the file size, so truncation is caught up front."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise SurgeryError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > 100_000_000:
            raise SurgeryError(f"{path}: corrupt or truncated safetensors (header length {n} exceeds file size {size})")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise SurgeryError(f"{path}: corrupt safetensors (its header is not valid JSON)") from None
    if not isinstance(header, dict):
        raise SurgeryError(f"{path}: corrupt safetensors (its header is not a JSON object)")
    end = 0
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            start, stop = meta["data_offsets"]
            dtype = meta["dtype"]
            shape = meta["shape"]
        except (KeyError, TypeError, ValueError):
            raise SurgeryError(f"{path}: corrupt safetensors (bad entry for tensor {name!r})") from None
        if dtype not in _ST_DTYPES:
            raise SurgeryError(f"{path}: tensor {name!r} has unsupported dtype {dtype}")
        numel = 1
        for s in shape:
            numel *= s
        if stop - start != numel * _ST_DTYPES[dtype].itemsize:
            raise SurgeryError(f"{path}: corrupt safetensors (tensor {name!r} has {stop - start} bytes for shape {shape})")
        end = max(end, stop)
    if 8 + n + end != size:
        raise SurgeryError(
            f"{path}: corrupt or truncated safetensors (header describes {8 + n + end} bytes, file has {size})"
        )
    return header


def _data_start(path: Path) -> int:
    with open(path, "rb") as f:
        return 8 + struct.unpack("<Q", f.read(8))[0]


def safetensors_files(folder: Path) -> list[Path]:
    """The weight files of a folder, in index order; refuses pickled weights."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise SurgeryError(f"{index}: not a valid safetensors index (no weight_map)") from None
        files = list(dict.fromkeys(weight_map.values()))
        for name in files:
            if not (folder / name).is_file():
                raise SurgeryError(f"{index}: shard {name} is missing from {folder}")
        return [folder / name for name in files]
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    if any(folder.glob("*.bin")) or any(folder.glob("*.pt")) or any(folder.glob("*.pth")):
        raise SurgeryError(f"{folder}: only pickled weights (.bin/.pt) found; surgery reads safetensors only "
                           "(convert them with `transformers` save_pretrained(safe_serialization=True))")
    raise SurgeryError(f"{folder}: no model.safetensors or model.safetensors.index.json")


@dataclass
class TensorInfo:
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: Path | None = None
    offset: int = 0  # byte offset of the data in `file`


class TensorSource:
    """Lazy access to a checkpoint's tensors by name: nothing is read until get() asks for it."""

    def __init__(self, config: dict, infos: dict[str, TensorInfo], files: list[Path], tensors: dict | None = None):
        self.config = config
        self.infos = infos
        self.files = files
        self._tensors = tensors  # in-memory tensors (GGUF), else None

    def keys(self) -> list[str]:
        return list(self.infos)

    def get(self, name: str) -> torch.Tensor:
        if name not in self.infos:
            raise SurgeryError(f"checkpoint has no tensor {name!r}")
        if self._tensors is not None:
            return self._tensors[name]
        # A plain read rather than safetensors' mmap: mapped pages stay resident (and count as ours) for as
        # long as the file is open, which would make a streaming conversion's memory grow to the whole file.
        info = self.infos[name]
        out = torch.empty(torch.Size(info.shape).numel() * info.dtype.itemsize, dtype=torch.uint8)
        with open(info.file, "rb") as f:
            f.seek(info.offset)
            if f.readinto(out.numpy()) != out.numel():
                raise SurgeryError(f"{info.file}: truncated while reading tensor {name}")
        return out.view(info.dtype).reshape(info.shape)

    @property
    def dtype(self) -> torch.dtype:
        name = ffn_names(0)["gate_proj"]
        return self.infos[name].dtype

    def total_bytes(self) -> int:
        return sum(torch.Size(i.shape).numel() * i.dtype.itemsize for i in self.infos.values())


def open_folder(folder: Path) -> TensorSource:
    cfg = read_config_dict(folder)
    check_llama_like(cfg, str(folder))
    source = open_tensors(folder, cfg)
    check_ffn_tensors(source, str(folder))
    return source


def open_tensors(folder: Path, cfg: dict) -> TensorSource:
    """Lazy access to any safetensors folder's tensors (dense or converted), nothing read yet."""
    files = safetensors_files(folder)
    infos: dict[str, TensorInfo] = {}
    for f in files:
        header = _safetensors_header(f)
        data_start = _data_start(f)
        for name, meta in header.items():
            if name != "__metadata__":
                infos[name] = TensorInfo(tuple(meta["shape"]), _ST_DTYPES[meta["dtype"]], f,
                                         data_start + meta["data_offsets"][0])
    return TensorSource(cfg, infos, files)


def check_ffn_tensors(source: TensorSource, where: str) -> None:
    cfg = source.config
    d, f = cfg["hidden_size"], cfg["intermediate_size"]
    want = {"gate_proj": (f, d), "up_proj": (f, d), "down_proj": (d, f)}
    for layer in range(cfg["num_hidden_layers"]):
        for proj, name in ffn_names(layer).items():
            info = source.infos.get(name)
            if info is None:
                raise SurgeryError(f"{where}: tensor {name} is missing")
            if tuple(info.shape) != want[proj]:
                raise SurgeryError(f"{where}: tensor {name} has shape {list(info.shape)}, expected {list(want[proj])}")


def load_gguf_model(path: Path, dtype: torch.dtype = torch.float32):
    """Dequantize a GGUF file through transformers; returns (model, tokenizer) with no quantization config."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
    except (ValueError, KeyError, OSError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise SurgeryError(f"{path}: cannot read this GGUF file ({msg})") from None
    check_llama_like(model.config.to_dict(), str(path))
    # The weights are dequantized now: drop the GGUF quantizer so save_pretrained writes plain safetensors.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if getattr(model, "is_quantized", False) and not isinstance(type(model).__dict__.get("is_quantized"), property):
        model.is_quantized = False
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return model, tokenizer


def open_gguf(path: Path, dtype: torch.dtype = torch.float32) -> tuple[TensorSource, object, object]:
    model, tokenizer = load_gguf_model(path, dtype)
    cfg = model.config.to_dict()
    state = {k: v.detach() for k, v in model.state_dict().items()}
    infos = {k: TensorInfo(tuple(v.shape), v.dtype) for k, v in state.items()}
    source = TensorSource(cfg, infos, [path], tensors=state)
    check_ffn_tensors(source, str(path))
    return source, model, tokenizer


def check_model_path(path: str | os.PathLike) -> Path:
    """A model path must be an existing folder or a .gguf file."""
    p = Path(path)
    if not p.exists():
        raise SurgeryError(f"{p}: no such file or directory")
    if p.is_file() and p.suffix.lower() != ".gguf":
        raise SurgeryError(f"{p}: expected a model folder or a .gguf file")
    return p


def open_source(path: str | os.PathLike):
    """A dense checkpoint for conversion: (TensorSource, tokenizer). A folder is read lazily, tensor by tensor
    (tokenizer None: its files are copied); a .gguf file is dequantized whole (its tokenizer is returned)."""
    p = check_model_path(path)
    if p.is_file():
        source, _, tokenizer = open_gguf(p)
        return source, tokenizer
    return open_folder(p), None


def file_hash(paths: list[Path], chunk: int = 1 << 22) -> str:
    """sha256 over the given files' bytes, in order: identifies the exact source checkpoint."""
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            while block := f.read(chunk):
                h.update(block)
    return "sha256:" + h.hexdigest()
