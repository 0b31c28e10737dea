"""Run: the converted model is transformers' own Llama (attention, KV cache, generate) with each `mlp`
replaced by a MoEBlock. This module builds it, saves it in the native format and loads any model back.

Native format (a folder): config.json = the base model's config plus a `surgery` block (MoEConfig),
safetensors (sharded past --max-shard-size, with the standard index) and the tokenizer files.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from torch import nn

from surgery.atomic import atomic_dir
from surgery.checkpoint import (_safetensors_header, check_model_path, check_llama_like,
                                load_gguf_model, read_config_dict, safetensors_files)
from surgery.config import MoEConfig
from surgery.errors import SurgeryError
from surgery.moe import MoEBlock
from surgery.safetensors_io import parse_size, write_state_dict

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "generation_config.json")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    if name is None or isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise SurgeryError(f"--dtype {name!r}: choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def moe_tensor_names(layer: int, shared: bool) -> list[str]:
    p = f"model.layers.{layer}.mlp"
    names = [f"{p}.router.weight", f"{p}.experts.gate_proj", f"{p}.experts.up_proj", f"{p}.experts.down_proj"]
    if shared:
        names += [f"{p}.shared_expert.{w}.weight" for w in ("gate_proj", "up_proj", "down_proj")]
    return names


def make_config(base: dict):
    """A transformers config object from a config.json dict (the `surgery` block removed)."""
    from transformers import AutoConfig

    base = {k: v for k, v in base.items() if k != "surgery"}
    return AutoConfig.for_model(base.pop("model_type"), **base)


def install_moe_blocks(model: nn.Module, moe: MoEConfig, dtype=None, device=None) -> None:
    from surgery.moe import ExpertPool
    from surgery.router import RoutingConfig

    cfg = model.config
    check_layer_top_k(moe, len(model.model.layers))
    for i, layer in enumerate(model.model.layers):
        layer.mlp = MoEBlock(cfg.hidden_size, moe.num_experts, moe.expert_width, moe.shared_width,
                             moe.layer_routing(i), dtype=dtype, device=device)
        for ext in moe.extensions:
            layer.mlp.extensions.append(ExpertPool(cfg.hidden_size, ext["num_experts"], ext["expert_width"],
                                                   RoutingConfig(**ext["routing"]), dtype=dtype, device=device))


def check_layer_top_k(moe: MoEConfig, layers: int) -> None:
    if moe.layer_top_k and len(moe.layer_top_k) != layers:
        raise SurgeryError(f"config.json: layer_top_k has {len(moe.layer_top_k)} entries for {layers} layers")


def set_layer_routing(model: nn.Module, moe: MoEConfig) -> None:
    """Give every MoE block its layer's routing (top-k and scale) from `moe`."""
    blocks = [layer.mlp for layer in model.model.layers]
    check_layer_top_k(moe, len(blocks))
    for i, block in enumerate(blocks):
        block.routing = moe.layer_routing(i)


def _fix_meta_buffers(model: nn.Module) -> None:
    """Non-persistent buffers (rotary inv_freq) are not in the checkpoint: rebuild them on the CPU."""
    rotary = model.model.rotary_emb
    if any(b.is_meta for b in rotary.buffers()):
        model.model.rotary_emb = type(rotary)(config=model.config)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise SurgeryError(f"checkpoint is missing tensors: {', '.join(left[:4])}{' ...' if len(left) > 4 else ''}")


def read_safetensors_folder(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state = {}
    for f in safetensors_files(folder):
        _safetensors_header(f)  # clear error on truncation before safetensors' own
        state.update(load_file(str(f)))
    return state


def meta_model(config_dict: dict, moe: MoEConfig | None):
    """The model's modules with every weight on the meta device (no memory, no initialisation)."""
    from transformers import AutoModelForCausalLM

    config = make_config(config_dict)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
        if moe is not None:
            install_moe_blocks(model, moe)
            if moe.attention:
                from surgery.attention import HeadConfig, install_head_experts

                install_head_experts(model, HeadConfig.from_dict(moe.attention))
    return model


def build_from_state(config_dict: dict, state: dict[str, torch.Tensor], moe: MoEConfig | None):
    """Assemble a model from a config and a full state dict without random initialisation."""
    model = meta_model(config_dict, moe)
    config = model.config
    if config.tie_word_embeddings:
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    expected = {k for k in model.state_dict() if not (config.tie_word_embeddings and k == "lm_head.weight")}
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        bad = sorted(missing)[:3] or sorted(unexpected)[:3]
        what = "missing" if missing else "unexpected"
        raise SurgeryError(f"checkpoint tensors do not match the config: {what} {', '.join(bad)}")
    for name, t in state.items():
        want = tuple(model.get_parameter(name).shape) if name in dict(model.named_parameters()) else None
        if want is not None and tuple(t.shape) != want:
            raise SurgeryError(f"tensor {name} has shape {list(t.shape)}, config implies {list(want)}")
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    _fix_meta_buffers(model)
    model.eval()
    return model


def load_converted(folder: Path, dtype=None, device="cpu"):
    cfg = read_config_dict(folder)
    moe = MoEConfig.from_dict(cfg["surgery"])
    model = build_from_state(cfg, read_safetensors_folder(folder), moe)
    model.surgery_config = moe
    _load_generation_config(model, folder)
    return _place(model, dtype, device)


def _load_generation_config(model, folder: Path) -> None:
    if (folder / "generation_config.json").is_file():
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(str(folder))


def _place(model, dtype, device):
    dtype = parse_dtype(dtype)
    if dtype is not None:
        model = model.to(dtype)
    return model.to(device)


def load_dense_folder(folder: Path, dtype=None, device="cpu"):
    cfg = read_config_dict(folder)
    check_llama_like(cfg, str(folder))
    model = build_from_state(cfg, read_safetensors_folder(folder), None)
    _load_generation_config(model, folder)
    return _place(model, dtype, device)


def load_model(path, dtype=None, device="cpu"):
    """Any model surgery understands: a dense folder, a .gguf file, a converted folder, an exported folder."""
    p = check_model_path(path)
    if p.is_file():
        model, _ = load_gguf_model(p, parse_dtype(dtype) or torch.float32)
        return _place(model, None, device)
    cfg = read_config_dict(p)
    if "surgery" in cfg:
        return load_converted(p, dtype, device)
    if cfg.get("model_type") in ("mixtral", "qwen2_moe"):
        from surgery.export import load_exported

        return load_exported(p, dtype, device)
    return load_dense_folder(p, dtype, device)


def load_tokenizer(path):
    from transformers import AutoTokenizer

    p = Path(path)
    if p.is_file():
        return AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
    if not any((p / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        raise SurgeryError(f"{p}: no tokenizer files (tokenizer.json, tokenizer.model or vocab.json)")
    return AutoTokenizer.from_pretrained(str(p))


def copy_tokenizer_files(src: Path, dst: Path) -> None:
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)


def write_model_folder(out, model, state: dict, cfg: dict, tokenizer_from=None, max_shard_size="5GB",
                       overwrite=False) -> Path:
    """A Hugging Face-style model folder, written atomically: `state` as safetensors shards (a tied lm_head left
    out), config.json from `cfg` with the weights' dtype, the tokenizer files of `tokenizer_from` (a folder, or
    the folder of a file) and the model's generation config."""
    state = {k: v for k, v in state.items() if not (model.config.tie_word_embeddings and k == "lm_head.weight")}
    cfg = {**cfg, "dtype": str(next(iter(state.values())).dtype).removeprefix("torch.")}
    with atomic_dir(out, overwrite=overwrite) as tmp:
        write_state_dict(tmp, state, parse_size(max_shard_size))
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        if tokenizer_from is not None:
            src = Path(tokenizer_from)
            copy_tokenizer_files(src if src.is_dir() else src.parent, tmp)
        if getattr(model, "generation_config", None) is not None and not (tmp / "generation_config.json").exists():
            model.generation_config.save_pretrained(str(tmp))
    return Path(out)


def save_converted(model, out, tokenizer_from=None, max_shard_size="5GB", overwrite=False, state=None) -> Path:
    """Write a converted model in the native format, atomically (`state`: its full state dict, gathered from a
    sharded model; default model.state_dict())."""
    moe: MoEConfig = model.surgery_config
    cfg = model.config.to_dict()
    cfg["surgery"] = moe.to_dict()
    return write_model_folder(out, model, model.state_dict() if state is None else state, cfg, tokenizer_from,
                              max_shard_size, overwrite)


def is_converted(model) -> bool:
    return hasattr(model, "surgery_config")
