"""Synthetic checkpoints: a Llama-2-7B-shaped dense model with random weights, for tests and benchmarks of the
paths built for checkpoints larger than memory (`surgery stream`).

Written tensor by tensor straight to sharded safetensors (peak memory ~ the largest tensor), with the
config.json and index Hugging Face writes and a byte-level tokenizer (any text maps into the vocabulary).
Each tensor has its own generator, seeded from the seed and its name, so a tensor can be regenerated alone.
Weights are N(0, 0.02) as Llama's initialisation, the output projections (o_proj, down_proj) scaled by
1/sqrt(2 * layers) so the residual stream stays O(1) through the layers; norms are ones.
"""

from __future__ import annotations

import json
import math
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from surgery.atomic import atomic_dir
from surgery.errors import SurgeryError
from surgery.modeling import parse_dtype
from surgery.safetensors_io import ShardedWriter, TensorSpec, parse_size

SPECIALS = ("<unk>", "<s>", "</s>")
CHUNK_ELEMENTS = 1 << 24  # float32 values drawn at a time (64 MB)


@dataclass
class SyntheticConfig:
    hidden: int = 4096  # Llama-2-7B's shape
    intermediate: int = 11008
    heads: int = 32
    kv_heads: int = 32
    layers: int = 32
    vocab: int = 32000
    dtype: str = "bfloat16"
    seed: int = 0
    max_shard_size: str = "5GB"
    shrink: int = 1  # divide hidden, intermediate and vocab by this (heads kept): a small model of the same build

    def shape(self) -> dict:
        """The model's dimensions after --shrink; raises on a shape Llama cannot have."""
        if self.shrink < 1:
            raise SurgeryError(f"--shrink {self.shrink}: must be 1 or more")
        d, f, v = self.hidden // self.shrink, self.intermediate // self.shrink, self.vocab // self.shrink
        if self.layers < 1:
            raise SurgeryError(f"--layers {self.layers}: must be 1 or more")
        if self.heads < 1 or self.kv_heads < 1 or self.heads % self.kv_heads:
            raise SurgeryError(f"heads {self.heads} / kv_heads {self.kv_heads}: heads must be a multiple of kv_heads")
        if d % self.heads or (d // self.heads) % 2:
            raise SurgeryError(f"--shrink {self.shrink}: hidden {d} is not an even head size times {self.heads} heads")
        if v < 256 + len(SPECIALS):
            raise SurgeryError(f"--shrink {self.shrink}: vocabulary {v} is below the byte tokenizer's "
                               f"{256 + len(SPECIALS)} tokens")
        if f < 1:
            raise SurgeryError(f"--shrink {self.shrink}: no FFN neurons left")
        parse_dtype(self.dtype)
        parse_size(self.max_shard_size)
        return {"hidden": d, "intermediate": f, "vocab": v, "head_dim": d // self.heads}


def tensor_shapes(cfg: SyntheticConfig) -> dict[str, tuple[tuple[int, ...], float]]:
    """name -> (shape, standard deviation; 0 means a norm weight of ones)."""
    s = cfg.shape()
    d, f, v, kv = s["hidden"], s["intermediate"], s["vocab"], cfg.kv_heads * s["head_dim"]
    std, out_std = 0.02, 0.02 / math.sqrt(2 * cfg.layers)
    shapes = {"model.embed_tokens.weight": ((v, d), std), "model.norm.weight": ((d,), 0.0),
              "lm_head.weight": ((v, d), std)}
    for i in range(cfg.layers):
        p = f"model.layers.{i}"
        shapes.update({
            f"{p}.input_layernorm.weight": ((d,), 0.0), f"{p}.post_attention_layernorm.weight": ((d,), 0.0),
            f"{p}.self_attn.q_proj.weight": ((d, d), std), f"{p}.self_attn.k_proj.weight": ((kv, d), std),
            f"{p}.self_attn.v_proj.weight": ((kv, d), std), f"{p}.self_attn.o_proj.weight": ((d, d), out_std),
            f"{p}.mlp.gate_proj.weight": ((f, d), std), f"{p}.mlp.up_proj.weight": ((f, d), std),
            f"{p}.mlp.down_proj.weight": ((d, f), out_std),
        })
    return shapes


def make_tensor(name: str, shape: tuple, std: float, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """One weight, drawn in float32 chunks of rows straight into the output dtype (no float32 copy of it)."""
    if std == 0.0:
        return torch.ones(shape, dtype=dtype)
    g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    out = torch.empty(shape, dtype=dtype)
    row = math.prod(shape[1:])
    rows = max(1, CHUNK_ELEMENTS // row)
    for a in range(0, shape[0], rows):
        b = min(a + rows, shape[0])
        out[a:b] = torch.randn((b - a, *shape[1:]), generator=g).mul_(std)
    return out


def llama_config(cfg: SyntheticConfig) -> dict:
    s = cfg.shape()
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": s["hidden"],
        "intermediate_size": s["intermediate"], "num_hidden_layers": cfg.layers, "num_attention_heads": cfg.heads,
        "num_key_value_heads": cfg.kv_heads, "head_dim": s["head_dim"], "vocab_size": s["vocab"],
        "hidden_act": "silu", "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False, "initializer_range": 0.02,
        "bos_token_id": SPECIALS.index("<s>"), "eos_token_id": SPECIALS.index("</s>"), "dtype": cfg.dtype,
    }


def save_byte_tokenizer(folder: Path) -> None:
    """A byte-level BPE tokenizer without merges: every UTF-8 byte is a token, ids < 259 whatever the text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS)}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(str(folder))


def write_synthetic(out, cfg: SyntheticConfig, overwrite: bool = False, progress: bool = True) -> dict:
    """Write the checkpoint to `out` (appears only when complete). Returns a summary with its peak memory."""
    from surgery.convert import peak_rss_bytes

    t0 = time.time()
    shapes = tensor_shapes(cfg)
    dtype = parse_dtype(cfg.dtype)
    specs = [TensorSpec(k, shape, dtype) for k, (shape, _) in shapes.items()]
    with atomic_dir(out, overwrite=overwrite) as tmp:
        writer = ShardedWriter(tmp, specs, parse_size(cfg.max_shard_size))
        bar = tqdm(total=writer.total_bytes, desc="writing synthetic weights", unit="B", unit_scale=True,
                   disable=not progress)
        for spec in writer.order:
            t = make_tensor(spec.name, spec.shape, shapes[spec.name][1], dtype, cfg.seed)
            writer.write(spec.name, t)
            bar.update(spec.nbytes)
            del t
        bar.close()
        writer.close()
        (tmp / "config.json").write_text(json.dumps(llama_config(cfg), indent=2) + "\n")
        (tmp / "synthetic.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
        save_byte_tokenizer(tmp)
    return {"output": str(out), **cfg.shape(), "layers": cfg.layers, "dtype": cfg.dtype,
            "parameters": sum(math.prod(s) for s, _ in shapes.values()), "bytes": writer.total_bytes,
            "shards": len(writer.names), "largest_tensor_bytes": max(s.nbytes for s in specs),
            "seconds": round(time.time() - t0, 2), "peak_rss_bytes": peak_rss_bytes()}
