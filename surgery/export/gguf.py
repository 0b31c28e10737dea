"""gguf: one .gguf file that llama.cpp runs, for converted models and for dense ones (so that both sides of a
comparison are written the same way). Written with the `gguf` package; nothing here imports llama.cpp.

Which llama.cpp architecture (chosen from the model, never silently approximated):
    dense Llama                                  -> "llama"       ffn_{gate,up,down}
    MoE, no shared expert, routing renormalised  -> "llama"       ffn_gate_inp + ffn_{gate,up,down}_exps
                                                                  (Mixtral's layout)
    MoE with shared experts, renormalised        -> "granitemoe"  the same + ffn_{gate,up,down}_shexp
                                                                  (Granite-MoE-shared: an always-on, ungated
                                                                  shared MLP; logit_scale 1, other multipliers unset)
    MoE, routing not renormalised                -> "deepseek"    (DeepSeek-MoE v1: softmax top-k without
                                                                  renormalisation, ungated shared MLP whose width
                                                                  is a multiple of the expert width)
Not "qwen2moe": llama.cpp's Qwen2-MoE never renormalises the top-k weights and gates its shared expert with
sigmoid(w.x) computed as silu(z)/z, so a constant gate cannot be written (zero weights give 0/0 = NaN). The
three above compute our routing exactly: softmax over all experts in float32 (the router is kept in F32),
top-k, renormalised iff we do; the routing scale is folded into the experts' down projections as in the other
exports; several shared experts are our one concatenated shared MLP.

Exact padding: experts narrower than the widest are zero-padded (zero gate/up rows, zero down columns add
exactly nothing, as in our stacked tensors); for q8_0 every FFN width is also padded to a multiple of 32 (Q8_0's
block), and DeepSeek's shared MLP to a multiple of the expert width.

Tensor types: 1-D tensors (norms), the router and rope factors in F32; every other matrix in the chosen type
(f32 | f16 | bf16 | q8_0; Q8_0 with the `gguf` package's reference quantizer). Q and K rows are permuted to
llama.cpp's interleaved RoPE layout, as llama.cpp's own converter does.

Tokenizer: a Hugging Face BPE tokenizer (tokenizer.json) with a pre-tokenizer llama.cpp knows (identified as
llama.cpp's converter does, from the hash of a test string's tokens), its merges, special tokens, add-BOS
behaviour and chat template. Anything else is a SurgeryError.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from surgery.atomic import atomic_file
from surgery.config import MoEConfig
from surgery.errors import SurgeryError
from surgery.export.common import (base_config_dict, check_common, check_no_head_experts, check_uniform_top_k,
                                   head_dim, pad_neurons,
                                   rope_parameters, sha256_file)

FORMAT = "gguf"
DTYPES = ("f32", "f16", "bf16", "q8_0")
_ALIASES = {"float32": "f32", "float16": "f16", "bfloat16": "bf16", "fp32": "f32", "fp16": "f16"}
Q8_BLOCK = 32


def parse_gguf_dtype(dtype, model=None) -> str:
    """--dtype for GGUF: f32 | f16 | bf16 | q8_0 (torch names accepted); None -> the model's own float type."""
    if dtype is None:
        if model is None:
            return "f32"
        t = next(model.parameters()).dtype
        return {torch.float16: "f16", torch.bfloat16: "bf16"}.get(t, "f32")
    name = _ALIASES.get(str(dtype).lower().removeprefix("torch."), str(dtype).lower())
    if name not in DTYPES:
        raise SurgeryError(f"--dtype {dtype}: --format gguf writes one of {', '.join(DTYPES)}")
    return name


@dataclass
class GTensor:
    name: str
    shape: tuple[int, ...]  # row-major (torch order); GGUF stores the reverse
    qtype: object  # gguf.GGMLQuantizationType
    make: Callable[[], torch.Tensor]  # float32 tensor of `shape`


def _qtype(name: str):
    import gguf

    return {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
            "bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0}[name]


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m if n else 0


def _permute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF's rotate-half RoPE rows -> llama.cpp's interleaved pairs (llama.cpp's LlamaModel.permute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def layout(model) -> dict:
    """Which llama.cpp architecture and FFN widths this model is written with (see the module docstring)."""
    moe: MoEConfig | None = getattr(model, "surgery_config", None)
    if moe is None:
        return {"arch": "llama", "moe": None}
    check_no_head_experts(moe, FORMAT)
    check_uniform_top_k(moe, FORMAT)
    if moe.routing.score_func != "softmax":
        raise SurgeryError(f"--format gguf: this model's router scores experts with {moe.routing.score_func}; "
                           "llama.cpp's Llama-family MoE architectures take a softmax over all experts; "
                           "export it with --format native")
    if moe.routing.renormalize:
        arch = "granitemoe" if moe.shared_width else "llama"
    else:
        arch = "deepseek"
    return {"arch": arch, "moe": moe}


def _check(base: dict) -> None:
    check_common(base, FORMAT)
    if base.get("sliding_window"):
        raise SurgeryError(f"--format gguf: the source uses sliding-window attention ({base['sliding_window']}), "
                           "which llama.cpp's Llama-family architectures do not apply; use --format native")
    rope = rope_parameters(base)
    kind = rope.get("rope_type", "default")
    if kind not in ("default", "linear", "llama3"):
        raise SurgeryError(f"--format gguf: RoPE type {kind!r} is not written by this exporter "
                           "(default, linear and llama3 are); use --format native")


def _rope_factors(base: dict) -> torch.Tensor | None:
    """Llama-3.1 RoPE scaling as llama.cpp wants it: per-frequency factors (llama.cpp's converter's formula)."""
    rope = rope_parameters(base)
    if rope.get("rope_type") != "llama3":
        return None
    dim = head_dim(base)
    freqs = 1.0 / (rope["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor = rope.get("factor", 8.0)
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old = rope.get("original_max_position_embeddings", 8192)
    out = []
    for f in freqs.tolist():
        wavelen = 2 * math.pi / f
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(out, dtype=torch.float32)


def plan(model, dtype: str) -> tuple[dict, list[GTensor]]:
    """(layout info, tensors) for `model` written in `dtype`."""
    base = base_config_dict(model)
    _check(base)
    info = layout(model)
    moe = info["moe"]
    if info["arch"] == "deepseek" and rope_parameters(base).get("rope_type") == "llama3":
        raise SurgeryError("--format gguf: routing that is not renormalised is written as llama.cpp's DeepSeek-MoE, "
                           "which does not read Llama-3.1 RoPE factors (rope_type llama3); use --format native")
    cfg = model.config
    n_head = cfg.num_attention_heads
    n_kv = cfg.num_key_value_heads or n_head
    main = _qtype(dtype)
    f32 = _qtype("f32")
    pad = Q8_BLOCK if dtype == "q8_0" else 1
    out: list[GTensor] = []

    def add(name, make, shape, qtype=None):
        out.append(GTensor(name, tuple(shape), qtype if qtype is not None else main, make))

    def w(t):  # a parameter as float32, detached (the maker runs under no_grad)
        return lambda: t.detach().float()

    emb = model.model.embed_tokens.weight
    add("token_embd.weight", w(emb), emb.shape)
    add("output_norm.weight", w(model.model.norm.weight), model.model.norm.weight.shape, f32)
    if not cfg.tie_word_embeddings:
        add("output.weight", w(model.lm_head.weight), model.lm_head.weight.shape)
    factors = _rope_factors(base)
    if factors is not None:
        add("rope_freqs.weight", lambda: factors, factors.shape, f32)

    D = cfg.hidden_size
    for i, layer in enumerate(model.model.layers):
        b, a = f"blk.{i}", layer.self_attn
        add(f"{b}.attn_norm.weight", w(layer.input_layernorm.weight), (D,), f32)
        add(f"{b}.attn_q.weight", lambda a=a: _permute_qk(a.q_proj.weight.detach().float(), n_head), a.q_proj.weight.shape)
        add(f"{b}.attn_k.weight", lambda a=a: _permute_qk(a.k_proj.weight.detach().float(), n_kv), a.k_proj.weight.shape)
        add(f"{b}.attn_v.weight", w(a.v_proj.weight), a.v_proj.weight.shape)
        add(f"{b}.attn_output.weight", w(a.o_proj.weight), a.o_proj.weight.shape)
        add(f"{b}.ffn_norm.weight", w(layer.post_attention_layernorm.weight), (D,), f32)
        m = layer.mlp
        if moe is None:
            Fd = _round_up(m.gate_proj.weight.shape[0], pad)
            add(f"{b}.ffn_gate.weight", lambda m=m: pad_neurons(m.gate_proj.weight.detach().float(), Fd, 0), (Fd, D))
            add(f"{b}.ffn_up.weight", lambda m=m: pad_neurons(m.up_proj.weight.detach().float(), Fd, 0), (Fd, D))
            add(f"{b}.ffn_down.weight", lambda m=m: pad_neurons(m.down_proj.weight.detach().float(), Fd, 1), (D, Fd))
            info["ffn_width"] = Fd
            continue
        E = moe.num_experts
        F = _round_up(moe.expert_width, pad)
        scale = float(moe.routing.scale)
        add(f"{b}.ffn_gate_inp.weight", w(m.router.weight), (E, D), f32)
        ex = m.experts
        add(f"{b}.ffn_gate_exps.weight", lambda ex=ex: pad_neurons(ex.gate_proj.detach().float(), F, 1), (E, F, D))
        add(f"{b}.ffn_up_exps.weight", lambda ex=ex: pad_neurons(ex.up_proj.detach().float(), F, 1), (E, F, D))
        add(f"{b}.ffn_down_exps.weight",
            lambda ex=ex: pad_neurons(ex.down_proj.detach().float() * scale, F, 2), (E, D, F))
        S = moe.shared_width
        if info["arch"] == "deepseek":
            S = max(_round_up(S, F), F)  # DeepSeek's shared MLP is n_expert_shared x the expert width (>= 1)
        else:
            S = _round_up(S, pad)
        if S:
            se = m.shared_expert

            def shared(proj, dim, se=se, S=S):
                if se is None:
                    return lambda: torch.zeros((S, D) if dim == 0 else (D, S))
                return lambda: pad_neurons(getattr(se, proj).weight.detach().float(), S, dim)

            add(f"{b}.ffn_gate_shexp.weight", shared("gate_proj", 0), (S, D))
            add(f"{b}.ffn_up_shexp.weight", shared("up_proj", 0), (S, D))
            add(f"{b}.ffn_down_shexp.weight", shared("down_proj", 1), (D, S))
        info.update(expert_width=F, shared_width=S, folded_routing_scale=scale)
    # Q8_0 blocks run along the rows: a row length that is not a multiple of 32 stays F16 (llama.cpp's rule).
    fallback = []
    for t in out:
        if t.qtype == _qtype("q8_0") and t.shape[-1] % Q8_BLOCK:
            t.qtype = _qtype("f16")
            fallback.append(t.name)
    info["f16_fallback"] = fallback
    info["base"] = base
    return info, out


# ---- tokenizer ----------------------------------------------------------------------------------------

def _tokenizer_metadata(folder: Path, vocab_size: int) -> dict:
    """Everything llama.cpp's BPE ('gpt2') vocabulary needs, read through transformers and gguf.SpecialVocab."""
    import gguf
    from transformers import AutoTokenizer

    from surgery.export.gguf_pretokenizers import CHKTXT, PRE_TOKENIZERS

    where = f"--format gguf: tokenizer in {folder}"
    tj = folder / "tokenizer.json"
    if not tj.is_file():
        raise SurgeryError(f"{where}: no tokenizer.json (a Hugging Face fast tokenizer is needed for GGUF)")
    try:
        kind = json.loads(tj.read_text()).get("model", {}).get("type")
    except json.JSONDecodeError as e:
        raise SurgeryError(f"{tj}: not valid JSON ({e.msg})") from None
    if kind != "BPE":
        raise SurgeryError(f"{where}: a {kind} tokenizer; the GGUF export writes byte-level BPE tokenizers only")
    try:
        tok = AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError) as e:
        raise SurgeryError(f"{where}: transformers cannot load it ({e})") from None
    chkhsh = hashlib.sha256(str(tok.encode(CHKTXT)).encode()).hexdigest()
    pre = PRE_TOKENIZERS.get(chkhsh)
    if pre is None:
        raise SurgeryError(f"{where}: its pre-tokenizer (hash {chkhsh[:16]}...) is not one llama.cpp knows; "
                           "llama.cpp would tokenize text differently")
    vocab = tok.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise SurgeryError(f"{where}: token ids reach {max(vocab.values())}, the model's vocab_size is {vocab_size}")
    reverse = {i: t for t, i in vocab.items()}
    added = tok.get_added_vocab()
    decoder = tok.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        t = reverse.get(i)
        if t is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif t in added:
            special = decoder[i].special or (t.startswith("<|") and t.endswith("|>"))
            tokens.append(t)
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(t)
            types.append(gguf.TokenType.NORMAL)
    special = gguf.SpecialVocab(str(folder), load_merges=True, n_vocab=vocab_size)
    if not special.merges:
        raise SurgeryError(f"{where}: tokenizer.json has no BPE merges")
    # add-BOS as the tokenizer behaves, not as a config flag may say
    ids = tok("a")["input_ids"]
    special.add_special_token["bos"] = bool(tok.bos_token_id is not None and ids and ids[0] == tok.bos_token_id)
    return {"pre": pre, "tokens": tokens, "types": types, "special": special}


# ---- writer -------------------------------------------------------------------------------------------

def _file_type(dtype: str):
    import gguf

    return {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
            "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype]


def _encode(t: torch.Tensor, qtype) -> np.ndarray:
    import gguf

    a = t.contiguous().float().numpy()
    if qtype == gguf.GGMLQuantizationType.F32:
        return a.astype(np.float32, copy=False)
    if qtype == gguf.GGMLQuantizationType.F16:
        return a.astype(np.float16)
    return gguf.quants.quantize(a, qtype)


def _nbytes(shape, qtype) -> int:
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[qtype]
    n = math.prod(shape)
    return n // block * size


def write_gguf(model, out, dtype=None, tokenizer_from=None, name: str | None = None, overwrite: bool = False,
               progress: bool = True) -> dict:
    """Write `model` (converted or dense) to the single file `out`. Returns a summary dict."""
    import gguf
    from tqdm import tqdm

    t0 = time.time()
    out = Path(out)
    if out.exists() and not overwrite:
        raise SurgeryError(f"{out}: already exists (choose another path or pass --overwrite)")
    if out.is_dir():
        raise SurgeryError(f"{out}: is a folder; --format gguf writes one .gguf file")
    dtype = parse_gguf_dtype(dtype, model)
    info, tensors = plan(model, dtype)
    base, moe, arch = info["base"], info["moe"], info["arch"]
    if tokenizer_from is None:
        raise SurgeryError("--format gguf: the model folder's tokenizer is needed (tokenizer.json)")
    src = Path(tokenizer_from)
    vocab = _tokenizer_metadata(src if src.is_dir() else src.parent, base["vocab_size"])
    cfg = model.config
    hd = head_dim(base)
    rope = rope_parameters(base)

    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(out) as tmp, torch.no_grad():
        wr = gguf.GGUFWriter(str(tmp), arch)
        wr.add_type("model")
        wr.add_name(name or Path(str(getattr(moe, "source", "") or src)).name or "model")
        wr.add_file_type(_file_type(dtype))
        wr.add_quantization_version(gguf.GGML_QUANT_VERSION)
        wr.add_vocab_size(base["vocab_size"])
        wr.add_context_length(int(base.get("max_position_embeddings") or 2048))
        wr.add_embedding_length(cfg.hidden_size)
        wr.add_block_count(cfg.num_hidden_layers)
        wr.add_head_count(cfg.num_attention_heads)
        wr.add_head_count_kv(cfg.num_key_value_heads or cfg.num_attention_heads)
        wr.add_key_length(hd)
        wr.add_value_length(hd)
        wr.add_rope_dimension_count(hd)
        wr.add_rope_freq_base(float(rope["rope_theta"]))
        if rope.get("rope_type") == "linear":
            wr.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            wr.add_rope_scaling_factor(float(rope["factor"]))
        wr.add_layer_norm_rms_eps(float(base["rms_norm_eps"]))
        if moe is None:
            wr.add_feed_forward_length(info["ffn_width"])
        else:
            wr.add_feed_forward_length(info["expert_width"])
            wr.add_expert_count(moe.num_experts)
            wr.add_expert_used_count(moe.top_k)
            if arch == "granitemoe":
                wr.add_expert_shared_feed_forward_length(info["shared_width"])
                wr.add_logit_scale(1.0)  # Granite divides the logits by it
            elif arch == "deepseek":
                wr.add_leading_dense_block_count(0)
                wr.add_expert_feed_forward_length(info["expert_width"])
                wr.add_expert_shared_count(info["shared_width"] // info["expert_width"])
                wr.add_expert_weights_scale(1.0)  # folded into ffn_down_exps
            wr.add_string("surgery.moe", json.dumps(moe.to_dict() | {"permutations": []}, sort_keys=True))
        wr.add_tokenizer_model("gpt2")
        wr.add_tokenizer_pre(vocab["pre"])
        wr.add_token_list(vocab["tokens"])
        wr.add_token_types(vocab["types"])
        vocab["special"].add_to_gguf(wr, quiet=True)
        for t in tensors:
            wr.add_tensor_info(t.name, t.shape, np.dtype(np.float32), _nbytes(t.shape, t.qtype), raw_dtype=t.qtype)
        wr.write_header_to_file()
        wr.write_kv_data_to_file()
        wr.write_ti_data_to_file()
        for t in tqdm(tensors, desc="exporting gguf", unit="tensor", disable=not progress):
            data = t.make()
            if tuple(data.shape) != t.shape:
                raise RuntimeError(f"gguf export: {t.name} has shape {tuple(data.shape)}, planned {t.shape}")
            wr.write_tensor_data(_encode(data, t.qtype))
        wr.close()
    summary = {
        "output": str(out), "format": FORMAT, "architecture": arch, "dtype": dtype,
        "tensors": len(tensors), "output_bytes": os.path.getsize(out), "sha256": sha256_file(out),
        "tokenizer_pre": vocab["pre"], "f16_fallback": info["f16_fallback"],
        "seconds": round(time.time() - t0, 2),
    }
    if moe is not None:
        summary.update(experts=moe.num_experts, top_k=moe.top_k, expert_width=info["expert_width"],
                       shared_width=info["shared_width"], folded_routing_scale=info["folded_routing_scale"])
    return summary


def export_gguf(model_path, out, dtype=None, overwrite: bool = False, progress: bool = True) -> dict:
    """`surgery export MODEL OUT.gguf --format gguf`: MODEL a converted, exported or dense model folder."""
    from surgery.modeling import load_model

    src, out = Path(model_path), Path(out)
    parse_gguf_dtype(dtype)
    if out.exists() and not overwrite:
        raise SurgeryError(f"{out}: already exists (choose another path or pass --overwrite)")
    if not src.is_dir():
        raise SurgeryError(f"{src}: expected a model folder (dense, converted or exported)")
    model = load_model(src)
    summary = write_gguf(model, out, dtype=dtype, tokenizer_from=src, name=src.name if src.name != "model" else
                         src.parent.name, overwrite=overwrite, progress=progress)
    summary["source"] = str(src)
    return summary
