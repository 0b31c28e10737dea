"""Export: write a converted model in a stock MoE format that transformers loads with no custom code
(`mixtral`, `qwen2_moe`), or in the native format again (`native`, e.g. in another dtype); load such a
folder back into our MoE model (`load_exported`) so that every surgery command works on it.

Every export folder holds sharded safetensors (+ the standard index), config.json and generation_config.json,
the tokenizer files, a README.md model card and SHA256SUMS over every other file. Nothing in it depends on the
time or the machine: export -> load -> export gives byte-identical files.

Exact equivalence: the target computes the same function as our top-k routing. Unequal expert widths are
written zero-padded (exact); Mixtral, which has no shared expert, gets the shared MLP appended to every routed
expert (exact with renormalised weights; see mixtral.py). What a target cannot express (sigmoid scoring,
attention biases, RoPE it reads back differently, ...) is refused with a SurgeryError naming the format that
fits, never silently changed. `--format gguf` (gguf.py) writes one file for llama.cpp instead of a folder.

The stock config.json carries a `surgery_export` block (the source's Llama config, the MoEConfig with the
routing scale as the weights now need it, the scale folded into the weights, a measured perplexity) which
stock transformers ignores and load_exported uses to restore the converted model's metadata.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import torch
from tqdm import tqdm

from surgery.atomic import atomic_dir
from surgery.checkpoint import read_config_dict
from surgery.config import MoEConfig
from surgery.errors import SurgeryError
from surgery.export import mixtral, native, qwen2_moe
from surgery.export.common import (EXPORT_KEY, MANIFEST, base_config_dict, check_no_extensions, check_no_head_experts,
                                   check_uniform_top_k, export_block,
                                   model_card, read_manifest, read_perplexity_json, verify_manifest,
                                   verify_target_config, write_manifest)
from surgery.modeling import (_load_generation_config, _place, build_from_state, copy_tokenizer_files, parse_dtype,
                              read_safetensors_folder)
from surgery.safetensors_io import ShardedWriter, TensorSpec, parse_size

FORMATS = {"native": native, "mixtral": mixtral, "qwen2_moe": qwen2_moe}
LOADERS = {"mixtral": mixtral, "qwen2_moe": qwen2_moe}

__all__ = ["FORMATS", "MANIFEST", "export", "export_model", "load_exported", "read_manifest", "verify_manifest"]


def _format(fmt: str):
    if fmt not in FORMATS:
        raise SurgeryError(f"--format {fmt!r}: choose one of {', '.join([*FORMATS, 'gguf'])}")
    return FORMATS[fmt]


def export(model, out, fmt: str, dtype=None, max_shard_size="5GB", overwrite: bool = False, progress: bool = True,
           tokenizer_from=None, info: dict | None = None, perplexity: dict | None = None) -> dict:
    """Write the converted `model` (with `surgery_config`) to `out` in format `fmt`. `info` is what an earlier
    export recorded (folded routing scale, perplexity); `perplexity` a `surgery eval perplexity` result."""
    t0 = time.time()
    module = _format(fmt)
    moe: MoEConfig | None = getattr(model, "surgery_config", None)
    if moe is None:
        raise SurgeryError("this is a dense model, not a converted one: run `surgery convert` first, then export")
    max_bytes = parse_size(max_shard_size)
    info = dict(info or getattr(model, "surgery_export_info", None) or {})
    base = base_config_dict(model)
    if fmt != "native":
        check_no_extensions(moe, fmt)
        check_no_head_experts(moe, fmt)
        check_uniform_top_k(moe, fmt)
    module.check(model, moe, base)
    dtype = parse_dtype(dtype) or next(model.parameters()).dtype

    fold = module.fold_scale(moe)
    folded = float(info.get("folded_routing_scale", 1.0)) * fold
    # The routing as the written weights need it: a folded scale is 1 from now on.
    moe_out = dataclasses.replace(moe, routing=dataclasses.replace(moe.routing, scale=1.0 if fold != 1.0 else moe.routing.scale))
    perplexity = perplexity or info.get("perplexity") or _recorded_perplexity(moe)

    cfg = module.config(model, moe_out, base, dtype)
    if fmt != "native":
        verify_target_config(cfg, base, module.config_checks(base, moe_out), fmt)
    cfg["dtype"] = str(dtype).removeprefix("torch.")
    block = {"format": fmt, "folded_routing_scale": folded}
    if fmt != "native":
        block.update(base_config=base, moe=moe_out.to_dict())
    if perplexity:
        block["perplexity"] = perplexity
    cfg[EXPORT_KEY] = block

    plan = module.tensors(model, moe, dtype)
    makers = {p.name: p.make for p in plan}
    if len(makers) != len(plan):
        raise RuntimeError(f"export {fmt}: duplicate tensor names in the plan")
    card = model_card(fmt, module.architecture(base), base, moe_out, dtype, perplexity, folded)
    note = module.card_note(moe) if hasattr(module, "card_note") else None
    if note:
        card += f"\n## Layout\n\n{note}\n"
    with atomic_dir(out, overwrite=overwrite) as tmp:
        writer = ShardedWriter(tmp, [TensorSpec(p.name, p.shape, p.dtype) for p in plan], max_bytes)
        with torch.no_grad():
            for spec in tqdm(writer.order, desc=f"exporting {fmt}", unit="tensor", disable=not progress):
                writer.write(spec.name, makers.pop(spec.name)())
        writer.close()
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        if tokenizer_from is not None:
            src = Path(tokenizer_from)
            copy_tokenizer_files(src if src.is_dir() else src.parent, tmp)
        if not (tmp / "generation_config.json").exists() and getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(str(tmp))
        (tmp / "README.md").write_text(card)
        sums = write_manifest(tmp)
    return {
        "output": str(out),
        "format": fmt,
        "architecture": module.architecture(base),
        "dtype": str(dtype).removeprefix("torch."),
        "experts": moe.num_experts,
        "top_k": moe.top_k,
        "shared_width": moe.shared_width,
        "folded_routing_scale": folded,
        **({"note": note} if note else {}),
        "tensors": len(writer.order),
        "output_bytes": writer.total_bytes,
        "shards": len(writer.names),
        "files": sorted([*sums, MANIFEST]),
        "sha256": sums,
        "seconds": round(time.time() - t0, 2),
    }


def _recorded_perplexity(moe: MoEConfig) -> dict | None:
    ppl = (moe.calibration or {}).get("perplexity")
    if isinstance(ppl, dict) and isinstance(ppl.get("perplexity"), (int, float)):
        return ppl
    if isinstance(ppl, (int, float)):
        return {"perplexity": ppl}
    return None


def export_model(model_path, out, fmt: str, dtype=None, max_shard_size="5GB", overwrite: bool = False,
                 progress: bool = True, perplexity_json=None) -> dict:
    """Export the converted (or already exported) model folder `model_path` to `out`. Returns a summary."""
    from surgery.modeling import load_model

    if fmt not in ("native",) and Path(model_path).is_dir() and (Path(model_path) / "config.json").is_file():
        block = read_config_dict(Path(model_path)).get("surgery")
        check_no_extensions(block, fmt)
        check_no_head_experts(block, fmt)
    if fmt == "gguf":  # one file for llama.cpp, dense models too: its own writer (surgery/export/gguf.py)
        from surgery.export.gguf import export_gguf

        return export_gguf(model_path, out, dtype=dtype, overwrite=overwrite, progress=progress)
    _format(fmt)
    if str(dtype).lower() in ("f32", "f16", "bf16", "q8_0"):
        raise SurgeryError(f"--dtype {dtype}: a GGUF type; --format {fmt} takes float32, bfloat16 or float16")
    parse_dtype(dtype)
    parse_size(max_shard_size)
    src, out = Path(model_path), Path(out)
    if out.exists() and not overwrite:
        raise SurgeryError(f"{out}: already exists (choose another path or pass --overwrite)")
    perplexity = read_perplexity_json(perplexity_json) if perplexity_json else None
    if not src.is_dir():
        raise SurgeryError(f"{src}: expected a converted model folder (`surgery convert` writes one)")
    info = export_block(read_config_dict(src)) or {}
    model = load_model(src)
    summary = export(model, out, fmt, dtype=dtype, max_shard_size=max_shard_size, overwrite=overwrite,
                     progress=progress, tokenizer_from=src, info=info, perplexity=perplexity)
    summary["source"] = str(src)
    return summary


def load_exported(folder, dtype=None, device="cpu"):
    """A Mixtral / Qwen2-MoE folder (ours or a compatible stock one) as our MoE model, with `surgery_config`."""
    folder = Path(folder)
    cfg = read_config_dict(folder)
    model_type = cfg.get("model_type")
    if model_type not in LOADERS:
        raise SurgeryError(f"{folder}: model_type {model_type!r} is not an exported format ({', '.join(LOADERS)})")
    module = LOADERS[model_type]
    stock = _stock_config(cfg, folder)
    base, moe, state = module.from_exported(stock, read_safetensors_folder(folder), str(folder))
    block = export_block(cfg) or {}
    info = {k: block[k] for k in ("folded_routing_scale", "perplexity") if k in block}
    if block.get("format") == model_type and isinstance(block.get("moe"), dict) and isinstance(block.get("base_config"), dict):
        recorded = MoEConfig.from_dict(block["moe"])
        # config.json's stock fields decide the computation; the block only restores metadata that agrees.
        if (recorded.num_experts, recorded.shared_width, dataclasses.astuple(recorded.routing)) == \
                (moe.num_experts, moe.shared_width, dataclasses.astuple(moe.routing)) and \
                _trim_padding(state, recorded.expert_width, moe.expert_width):
            moe = recorded
            base = block["base_config"]
    model = build_from_state(base, state, moe)
    model.surgery_config = moe
    model.surgery_export_info = info
    _load_generation_config(model, folder)
    return _place(model, dtype, device)


def _trim_padding(state: dict, width: int, written: int) -> bool:
    """Drop the zero neurons an export appended to the experts (written width `written` -> `width`); False,
    and nothing changed, when the widths cannot match or any dropped neuron is not zero."""
    if width == written:
        return True
    if width > written:
        return False
    names = [k for k in state if k.endswith((".mlp.experts.gate_proj", ".mlp.experts.up_proj", ".mlp.experts.down_proj"))]
    axis = {k: (2 if k.endswith("down_proj") else 1) for k in names}
    if any(state[k].narrow(axis[k], width, written - width).count_nonzero() for k in names):
        return False
    for k in names:
        state[k] = state[k].narrow(axis[k], 0, width).contiguous()
    return True


def _stock_config(cfg: dict, folder: Path) -> dict:
    """config.json as the stock config class reads it (its defaults filled in, legacy keys standardised)."""
    from transformers import AutoConfig

    rest = {k: v for k, v in cfg.items() if k not in ("model_type", EXPORT_KEY)}
    try:
        return AutoConfig.for_model(cfg["model_type"], **rest).to_dict()
    except (TypeError, ValueError) as e:
        raise SurgeryError(f"{folder}/config.json: transformers cannot read it ({e})") from None
