"""Perplexity of a model larger than memory: layer by layer over all windows (`surgery eval perplexity --stream`).

The evaluation windows' hidden states are all kept (windows x ctx x hidden, in the model's dtype) and moved
through the network one decoder layer at a time; each layer's weights are read from the safetensors folder
(a plain read, no mmap), used on every window, and dropped. Peak memory is about the hidden states plus one
layer plus the embeddings (or the head), not the model. The batches, the mask and position embeddings (taken
from the model's own forward), the layers and the loss are the ordinary evaluation's, in the same order, so
the result equals `perplexity` on the loaded model.
"""

from __future__ import annotations

import resource
import time

import torch
from torch import nn
from tqdm import tqdm

from surgery.errors import SurgeryError
from surgery_evals.perplexity import eval_batches, eval_windows, summary, window_nll


class _Stop(Exception):
    pass


class _Capture(nn.Module):
    """Stands in for the first decoder layer: records the embeddings and what the model passes each layer."""

    def forward(self, hidden_states, **kwargs):
        self.h, self.kwargs = hidden_states, kwargs
        raise _Stop


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (Linux reports ru_maxrss in KiB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _open(model_path):
    from surgery.checkpoint import check_model_path, open_tensors, read_config_dict
    from surgery.config import MoEConfig
    from surgery.modeling import meta_model

    p = check_model_path(model_path)
    cfg = read_config_dict(p) if p.is_dir() else {}
    if p.is_file() or cfg.get("model_type") in ("mixtral", "qwen2_moe"):
        raise SurgeryError(f"{model_path}: --stream reads a dense or converted (native) model folder, not a .gguf "
                           "file or an exported one")
    moe = MoEConfig.from_dict(cfg["surgery"]) if "surgery" in cfg else None
    source = open_tensors(p, cfg)
    model = meta_model(cfg, moe)
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()
            if not (model.config.tie_word_embeddings and k == "lm_head.weight")}
    missing, unexpected = sorted(set(want) - set(source.keys())), sorted(set(source.keys()) - set(want))
    if missing or unexpected:
        what, names = ("missing", missing) if missing else ("unexpected", unexpected)
        raise SurgeryError(f"{model_path}: checkpoint tensors do not match the config: {what} {', '.join(names[:3])}")
    for k, shape in want.items():
        if tuple(source.infos[k].shape) != shape:
            raise SurgeryError(f"{model_path}: tensor {k} has shape {list(source.infos[k].shape)}, config implies "
                               f"{list(shape)}")
    return model, moe, source


def _load(module: nn.Module, prefix: str, source, dtype, device, rename: dict | None = None) -> nn.Module:
    """Give a meta module its weights from the checkpoint (in `dtype` if given)."""
    state = {}
    for name in module.state_dict():
        t = source.get((rename or {}).get(prefix + name, prefix + name))
        state[name] = t.to(device=device, dtype=dtype if dtype is not None and t.is_floating_point() else t.dtype)
    module.load_state_dict(state, assign=True, strict=True)
    return module


def _drop(module: nn.Module) -> None:
    module.to("meta")  # the weights' memory goes back; the module stays for the next _load


@torch.no_grad()
def perplexity_streaming(model_path, tokenizer, data, max_tokens: int = 40960, ctx: int = 1024, batch_size: int = 1,
                         dtype=None, device="cpu", dense_routing: bool = False, progress: bool = True) -> dict:
    from surgery.modeling import parse_dtype
    from surgery.moe import set_dense_routing

    windows = eval_windows(tokenizer, data, max_tokens, ctx)
    dtype = parse_dtype(dtype)
    model, moe, source = _open(model_path)
    inner, config = model.model, model.config
    t0 = time.time()
    # the rotary tables as the ordinary load makes them (rebuilt on the CPU, then cast with the model)
    inner.rotary_emb = type(inner.rotary_emb)(config=config)
    inner.rotary_emb.to(device=device, dtype=dtype)
    _load(inner.embed_tokens, "model.embed_tokens.", source, dtype, device)
    layers = inner.layers
    inner.layers = nn.ModuleList([_Capture()])
    hs, kws = [], []
    try:
        for batch in eval_batches(windows, batch_size):
            try:
                inner(input_ids=batch.to(device), use_cache=False)
            except _Stop:
                pass
            hs.append(inner.layers[0].h)
            kws.append(inner.layers[0].kwargs)
    finally:
        inner.layers = layers
    _drop(inner.embed_tokens)
    bar = tqdm(total=len(layers), desc="perplexity (streamed)", unit="layer", disable=not progress)
    for i, layer in enumerate(layers):
        _load(layer, f"model.layers.{i}.", source, dtype, device)
        if dense_routing:
            set_dense_routing(layer, True)
        for j, kw in enumerate(kws):
            out = layer(hs[j], **kw)
            hs[j] = out[0] if isinstance(out, tuple) else out
        _drop(layer)
        bar.update(1)
    bar.close()
    _load(inner.norm, "model.norm.", source, dtype, device)
    tied = {"lm_head.weight": "model.embed_tokens.weight"} if config.tie_word_embeddings else None
    _load(model.lm_head, "lm_head.", source, dtype, device, rename=tied)
    nll, count = 0.0, 0
    for h, batch in zip(hs, eval_batches(windows, batch_size)):
        s, n = window_nll(model.lm_head(inner.norm(h)), batch.to(device))
        nll, count = nll + s, count + n
    out = summary(nll, count, windows, data, ctx, time.time() - t0, moe, dtype or source.infos[
        "model.norm.weight"].dtype, device)
    held = sum(h.numel() * h.element_size() for h in hs)
    out["stream"] = {"layers": len(layers), "hidden_states_mb": round(held / 2**20, 1),
                     "checkpoint_mb": round(source.total_bytes() / 2**20, 1)}
    return out
