"""Export plumbing shared by every format: what a format module provides, the tensor plan, checks on the
source config, the model card and the sha256 manifest.

A format module (native.py, mixtral.py, qwen2_moe.py) is a name map plus a config map:
    FORMAT, MODEL_TYPE             names
    check(model, moe)              refuse (SurgeryError) whatever the target cannot express exactly
    config(model, moe, dtype)      the target config.json dict (without the `surgery_export` block)
    tensors(model, moe, dtype)     list of Planned(name, shape, dtype, make) in any order
    from_exported(cfg, state)      (llama config dict, MoEConfig | None, our state dict, info) for load_exported
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from surgery.config import MoEConfig
from surgery.errors import SurgeryError

EXPORT_KEY = "surgery_export"  # not "surgery": that key marks the native format to load_model
MANIFEST = "SHA256SUMS"
# Keys of a transformers config dict that describe the run or the library, not the model.
VOLATILE_KEYS = ("transformers_version", "dtype", "torch_dtype", "_name_or_path", "surgery", EXPORT_KEY,
                 "quantization_config", "_attn_implementation_autoset")


@dataclass
class Planned:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    make: Callable[[], torch.Tensor]  # produces the tensor (already in `dtype`) when the writer reaches it


def base_config_dict(model) -> dict:
    """The converted model's own (Llama / Mistral) config as a plain dict, without run-specific keys."""
    d = model.config.to_dict()
    return {k: v for k, v in sorted(d.items()) if k not in VOLATILE_KEYS}


def rope_parameters(cfg: dict) -> dict:
    """The source's RoPE settings in transformers 5 form ({"rope_type", "rope_theta", ...})."""
    rope = cfg.get("rope_parameters")
    if isinstance(rope, dict) and rope:
        return dict(rope)
    out = {"rope_type": "default", "rope_theta": float(cfg.get("rope_theta", 10000.0))}
    if isinstance(cfg.get("rope_scaling"), dict):
        scaling = dict(cfg["rope_scaling"])
        scaling["rope_type"] = scaling.pop("type", scaling.get("rope_type", "default"))
        out.update(scaling)
    return out


def head_dim(cfg: dict) -> int:
    return cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]


def decoder_fields(base: dict, architecture: str, model_type: str) -> dict:
    """The config fields every Llama-style decoder target shares (attention, norms, RoPE, vocabulary)."""
    rope = rope_parameters(base)
    return {
        "architectures": [architecture],
        "model_type": model_type,
        "vocab_size": base["vocab_size"],
        "hidden_size": base["hidden_size"],
        "num_hidden_layers": base["num_hidden_layers"],
        "num_attention_heads": base["num_attention_heads"],
        "num_key_value_heads": base.get("num_key_value_heads") or base["num_attention_heads"],
        "head_dim": head_dim(base),
        "hidden_act": "silu",
        "max_position_embeddings": base.get("max_position_embeddings", 2048),
        "initializer_range": base.get("initializer_range", 0.02),
        "rms_norm_eps": base["rms_norm_eps"],
        "use_cache": True,
        "bos_token_id": base.get("bos_token_id"),
        "eos_token_id": base.get("eos_token_id"),
        "pad_token_id": base.get("pad_token_id"),
        "tie_word_embeddings": bool(base.get("tie_word_embeddings", False)),
        "rope_parameters": rope,
        "rope_theta": rope["rope_theta"],  # what transformers 4.x reads (it ignores rope_parameters)
        "attention_dropout": 0.0,
    }


def check_no_head_experts(moe: MoEConfig | dict | None, fmt: str) -> None:
    """No stock architecture routes attention heads: refuse a model with head experts (surgery/attention/)."""
    attention = moe.get("attention") if isinstance(moe, dict) else getattr(moe, "attention", None)
    if attention:
        raise SurgeryError(f"--format {fmt}: this model routes its attention heads as experts "
                           f"(--attention-experts), which no stock architecture does; use --format native")


def check_no_extensions(moe: MoEConfig | dict | None, fmt: str) -> None:
    """No stock architecture routes a second pool of experts: refuse an extended model (`surgery extend`)."""
    extensions = moe.get("extensions") if isinstance(moe, dict) else getattr(moe, "extensions", None)
    if extensions:
        raise SurgeryError(f"--format {fmt}: this model was extended (`surgery extend`) with a second pool of "
                           f"experts, which no stock MoE architecture routes; use --format native")


def check_uniform_top_k(moe: MoEConfig, fmt: str) -> None:
    """Stock formats hold one num_experts_per_tok for every layer: refuse per-layer budgets."""
    if not moe.uniform_top_k:
        raise SurgeryError(f"--format {fmt}: this model's layers route to different numbers of experts (top-k "
                           f"{min(moe.layer_top_k)} to {moe.max_top_k}, --layer-budgets), but {fmt} has one "
                           f"top-k for all layers; use --format native")


def rope_scaling_field(base: dict) -> dict:
    """Non-default RoPE also as `rope_scaling`, the key older releases read."""
    rope = rope_parameters(base)
    if rope.get("rope_type", "default") != "default":
        return {"rope_scaling": {k: v for k, v in rope.items() if k != "rope_theta"}}
    return {}


def decoder_checks(base: dict) -> dict:
    """Fields of the reloaded target config that must come out exactly as the source's."""
    return {"hidden_size": base["hidden_size"], "num_hidden_layers": base["num_hidden_layers"],
            "num_attention_heads": base["num_attention_heads"],
            "num_key_value_heads": base.get("num_key_value_heads") or base["num_attention_heads"],
            "head_dim": head_dim(base), "rms_norm_eps": base["rms_norm_eps"], "vocab_size": base["vocab_size"],
            "tie_word_embeddings": bool(base.get("tie_word_embeddings", False))}


def check_common(base: dict, fmt: str) -> None:
    """What no stock MoE target here can express about the attention/embedding side of the source."""
    if base.get("model_type") not in ("llama", "mistral"):
        raise SurgeryError(f"--format {fmt}: source model_type {base.get('model_type')!r} is not Llama or Mistral")
    if base.get("hidden_act", "silu") not in ("silu", "swish"):
        raise SurgeryError(f"--format {fmt}: hidden_act {base.get('hidden_act')!r} cannot be exported (experts are SwiGLU)")
    if base.get("attention_bias"):
        raise SurgeryError(f"--format {fmt}: the source has attention_bias=true (a bias on o_proj too), which "
                           f"{fmt} cannot express; use --format native")
    if base.get("mlp_bias"):
        raise SurgeryError(f"--format {fmt}: the source has mlp_bias=true, which {fmt} cannot express")
    if (base.get("pretraining_tp") or 1) != 1:
        raise SurgeryError(f"--format {fmt}: pretraining_tp={base['pretraining_tp']} cannot be exported")


def verify_target_config(target: dict, base: dict, checks: dict[str, object], fmt: str) -> None:
    """Build the target's config class from our dict and make sure transformers reads back every field that
    changes the computation as we meant it (defaults and legacy-key handling differ between classes)."""
    from transformers import AutoConfig

    t = {k: v for k, v in target.items() if k not in ("model_type", EXPORT_KEY)}
    cfg = AutoConfig.for_model(target["model_type"], **t)
    got_rope = dict(getattr(cfg, "rope_parameters", None) or {})
    want_rope = rope_parameters(base)
    if {k: v for k, v in got_rope.items()} != want_rope:
        raise SurgeryError(f"--format {fmt}: transformers reads the RoPE settings {want_rope} back as {got_rope}; "
                           f"{fmt} cannot express this source's RoPE, use --format native")
    for key, want in checks.items():
        got = getattr(cfg, key, None)
        if got != want:
            raise SurgeryError(f"--format {fmt}: config field {key} would be read as {got!r}, the source needs "
                               f"{want!r}; use --format native")


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_manifest(folder: Path) -> dict[str, str]:
    """SHA256SUMS in `sha256sum -c` format, over every other file of the folder, sorted by name."""
    sums = {p.name: sha256_file(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST}
    (folder / MANIFEST).write_text("".join(f"{h}  {name}\n" for name, h in sums.items()))
    return sums


def read_manifest(folder: Path) -> dict[str, str]:
    out = {}
    for line in (Path(folder) / MANIFEST).read_text().splitlines():
        h, name = line.split("  ", 1)
        out[name] = h
    return out


def verify_manifest(folder: Path) -> list[str]:
    """Names of the files whose sha256 does not match the manifest (missing files included)."""
    folder = Path(folder)
    return [name for name, h in read_manifest(folder).items()
            if not (folder / name).is_file() or sha256_file(folder / name) != h]


def model_card(fmt: str, architecture: str, base: dict, moe: MoEConfig, dtype: torch.dtype,
               perplexity: dict | None, folded_scale: float = 1.0) -> str:
    """README.md: deterministic (no dates, no timings), so that re-exporting gives the same bytes."""
    source = moe.source or "unknown"
    sizes = sorted(set(moe.expert_sizes))
    width = str(sizes[0]) if len(sizes) == 1 else f"{sizes[0]}-{sizes[-1]} (zero-padded to {moe.expert_width})"
    r = moe.routing
    rule = f"{r.score_func} over all {moe.num_experts} experts, top-{r.top_k}"
    rule += ", renormalised to sum 1" if r.renormalize else ", not renormalised"
    if r.scale * folded_scale != 1.0:
        rule += f", times {r.scale * folded_scale:g}"
    if folded_scale != 1.0:
        rule += " (folded into the experts' down projections)"
    ffn = base.get("intermediate_size")
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: text-generation",
        "tags:",
        "- mixture-of-experts",
        f"- {fmt}",
        "- surgery",
        "---",
        "",
        f"# Sparse mixture-of-experts made from `{Path(source).name or source}`",
        "",
        f"This model was converted from a dense {base.get('model_type', 'llama')} checkpoint by splitting every "
        "feed-forward layer's neurons into experts (the `surgery` tool). With every expert on and unit weights it "
        "computes exactly the dense model; with top-k routing each token runs only a fraction of its FFN.",
        "",
        "| | |",
        "|---|---|",
        f"| Source checkpoint | `{source}` |",
        f"| Source hash | `{moe.source_hash or 'unknown'}` |",
        f"| Method | {moe.method} (seed {moe.seed}), router init {moe.router_init} |",
        f"| Layers | {base.get('num_hidden_layers')} |",
        f"| Dense FFN width | {ffn} |",
        f"| Routed experts per layer | {moe.num_experts}, width {width} |",
        f"| Shared experts | {moe.shared_experts} (width {moe.shared_width}) |",
        f"| Top-k | {moe.top_k if moe.uniform_top_k else f'{moe.top_k} on average; per layer {moe.layer_top_k}'} |",
        f"| Routing | {rule} |",
        f"| Active FFN fraction | {moe.active_ffn_fraction:.4f}"
        f"{'' if moe.uniform_top_k else f' (mean over layers; densest layer {moe.max_active_ffn_fraction:.4f})'} |",
        f"| Format | {fmt} (`{architecture}`), {str(dtype).removeprefix('torch.')} |",
    ]
    if perplexity and "perplexity" in perplexity:
        what = f"{float(perplexity['perplexity']):.4f}"
        details = [f"{k} {perplexity[k]}" for k in ("tokens", "ctx", "dtype") if k in perplexity]
        if "data" in perplexity:
            details.append(f"on `{Path(str(perplexity['data'])).name}`")
        if perplexity.get("dense_routing"):
            details.append("dense routing")
        lines.append(f"| Measured perplexity | {what}{' (' + ', '.join(map(str, details)) + ')' if details else ''} |")
    else:
        lines.append("| Measured perplexity | not measured (`surgery eval perplexity MODEL`) |")
    lines += ["", "## Use", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
              'model = AutoModelForCausalLM.from_pretrained("PATH")  # no trust_remote_code needed'
              if fmt != "native" else
              'import surgery\nmodel = surgery.load("PATH")  # the native format needs the surgery package',
              "```", "",
              f"`{MANIFEST}` lists the sha256 of every other file (`sha256sum -c {MANIFEST}`).", ""]
    return "\n".join(lines)


def read_perplexity_json(path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise SurgeryError(f"--perplexity-json {p}: no such file")
    try:
        d = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise SurgeryError(f"--perplexity-json {p}: not valid JSON ({e.msg})") from None
    if not isinstance(d, dict) or not isinstance(d.get("perplexity"), (int, float)):
        raise SurgeryError(f"--perplexity-json {p}: expected the JSON of `surgery eval perplexity` (a 'perplexity' number)")
    keep = ("perplexity", "nll", "tokens", "ctx", "data", "dtype", "dense_routing", "model")
    return {k: d[k] for k in keep if k in d}


def non_moe_tensors(model, dtype: torch.dtype) -> list[Planned]:
    """Embeddings, attention, norms and lm_head: the same names in Llama, Mixtral and Qwen2-MoE."""
    tied = model.config.tie_word_embeddings
    plan = []
    for name, t in model.state_dict().items():
        if ".mlp." in name or (tied and name == "lm_head.weight"):
            continue
        plan.append(Planned(name, tuple(t.shape), dtype, lambda t=t: t.to(dtype)))
    return plan


# Stock transformers runs stacked experts through torch._grouped_mm, which wants every row stride a multiple of
# 16 bytes: expert widths are written zero-padded to a multiple of 8 neurons (zero rows/columns: exact).
EXPERT_ALIGN = 8


def aligned(width: int) -> int:
    return -(-width // EXPERT_ALIGN) * EXPERT_ALIGN


def pad_neurons(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """Zero-pad `t` along `dim` (its neuron axis) to `width`: zero neurons add exactly nothing."""
    if t.shape[dim] == width:
        return t
    shape = list(t.shape)
    shape[dim] = width - t.shape[dim]
    return torch.cat([t, t.new_zeros(shape)], dim=dim)


def scaled(t: torch.Tensor, factor: float, dtype: torch.dtype) -> torch.Tensor:
    """t * factor in float32, then cast: a factor folded into weights rounds once, in the output dtype."""
    if factor == 1.0:
        return t.to(dtype)
    return (t.float() * factor).to(dtype)


def stack(state: dict, names: list[str], where: str) -> torch.Tensor:
    missing = [n for n in names if n not in state]
    if missing:
        raise SurgeryError(f"{where}: tensor {missing[0]} is missing")
    return torch.stack([state.pop(n) for n in names])


def take(state: dict, name: str, where: str) -> torch.Tensor:
    if name not in state:
        raise SurgeryError(f"{where}: tensor {name} is missing")
    return state.pop(name)


def llama_config_from(cfg: dict, ffn_width: int) -> dict:
    """A Llama (Mistral when there is a sliding window) config for a stock MoE config without our export
    block: every attention-side field carried over, the FFN width set to the experts' total."""
    sliding = cfg.get("sliding_window") if cfg.get("model_type") == "mixtral" else (
        cfg.get("sliding_window") if cfg.get("use_sliding_window") else None)
    out = {
        "architectures": ["MistralForCausalLM" if sliding else "LlamaForCausalLM"],
        "model_type": "mistral" if sliding else "llama",
        "vocab_size": cfg["vocab_size"], "hidden_size": cfg["hidden_size"], "intermediate_size": ffn_width,
        "num_hidden_layers": cfg["num_hidden_layers"], "num_attention_heads": cfg["num_attention_heads"],
        "num_key_value_heads": cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
        "head_dim": head_dim(cfg), "hidden_act": cfg.get("hidden_act", "silu"),
        "max_position_embeddings": cfg.get("max_position_embeddings", 4096),
        "rms_norm_eps": cfg.get("rms_norm_eps", 1e-6), "rope_parameters": rope_parameters(cfg),
        "tie_word_embeddings": cfg.get("tie_word_embeddings", False),
        "bos_token_id": cfg.get("bos_token_id"), "eos_token_id": cfg.get("eos_token_id"),
        "pad_token_id": cfg.get("pad_token_id"),
    }
    if sliding:
        out["sliding_window"] = sliding
    return out


def export_block(cfg: dict) -> dict | None:
    block = cfg.get(EXPORT_KEY)
    return block if isinstance(block, dict) else None
