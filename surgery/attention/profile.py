"""Per-head statistics on calibration text, for choosing shared heads and fitting the learned router.

Shape legend: N sampled tokens per layer, D hidden, H query heads.

Per layer: a strided sample of N attention inputs x [N, D] (after input_layernorm, float16) with each head's
output norm ||o_proj_h(attn_h)|| on those tokens [N, H], and over every profiled token each head's mean squared
contribution to the attention output [H]. Stored in a `surgery profile` file under the key "heads"
(`surgery profile ... --heads`), beside the FFN statistics.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from surgery.errors import SurgeryError

KEY = "heads"


@dataclass
class HeadStats:
    inputs: torch.Tensor  # [N, D] float16
    out_norms: torch.Tensor  # [N, H] float32
    contribution: torch.Tensor  # [H] float32, mean squared output contribution over all profiled tokens
    tokens: int


class _HeadCollector:
    def __init__(self, attn, samples: int, stride: int):
        cfg = attn.config
        self.H = cfg.num_attention_heads
        self.d = attn.head_dim
        self.Wo = attn.o_proj.weight.detach()  # [D, H*d]
        self.samples, self.stride = samples, stride
        self.x, self.norms = [], []
        self.kept = 0
        self.seen = 0
        self.sq_sum = torch.zeros(self.H, dtype=torch.float64)
        self._pending = None

    def attn_input(self, module, args, kwargs):
        hs = kwargs.get("hidden_states", args[0] if args else None)
        self._pending = hs.detach().reshape(-1, hs.shape[-1])

    def o_input(self, module, args):
        a = args[0].detach().reshape(-1, self.H, self.d)  # [T, H, d]
        Wo = self.Wo.view(self.Wo.shape[0], self.H, self.d)
        norms = torch.einsum("thd,ehd->the", a.float(), Wo.float()).norm(dim=-1)  # [T, H]
        self.sq_sum += norms.pow(2).sum(0).double().cpu()
        T = norms.shape[0]
        idx = torch.arange(T)
        take = idx[(idx + self.seen) % self.stride == 0][: max(0, self.samples - self.kept)]
        if len(take):
            self.x.append(self._pending[take].cpu().to(torch.float16))
            self.norms.append(norms[take].cpu())
            self.kept += len(take)
        self.seen += T

    def result(self) -> HeadStats:
        D = self.Wo.shape[0]
        x = torch.cat(self.x) if self.x else torch.zeros(0, D, dtype=torch.float16)
        n = torch.cat(self.norms) if self.norms else torch.zeros(0, self.H)
        return HeadStats(x, n, (self.sq_sum / max(self.seen, 1)).float(), self.seen)


@torch.no_grad()
def profile_heads(model, ids: torch.Tensor, ctx: int = 512, samples: int = 4096, batch_size: int = 4,
                  progress: bool = True) -> dict[int, HeadStats]:
    """Run the dense `model` over `ids` (1-D) in windows of ctx; per-layer HeadStats."""
    from surgery.data import windows_of
    from surgery.profile import run_hooked

    wins = windows_of(ids, ctx, short_ok=True)
    stride = max(1, wins.numel() // samples)
    collectors, hooks = [], []
    for layer in model.model.layers:
        attn = layer.self_attn
        if getattr(attn, "is_head_experts", False):
            raise SurgeryError("head profiling needs the dense model (its attention already has head experts)")
        c = _HeadCollector(attn, samples, stride)
        collectors.append(c)
        hooks.append(attn.register_forward_pre_hook(c.attn_input, with_kwargs=True))
        hooks.append(attn.o_proj.register_forward_pre_hook(c.o_input))
    run_hooked(model, wins, batch_size, hooks, "profiling heads", progress)
    return {i: c.result() for i, c in enumerate(collectors)}


def add_head_stats(path, model_path, data=None, tokens: int = 16384, ctx: int = 512, samples: int = 4096,
                   seed: int = 0, device: str = "cpu", progress: bool = True) -> dict:
    """Profile the heads of the dense model at `model_path` and store them in the profile file `path` (which
    `surgery profile` wrote) under "heads". Returns a summary."""
    from surgery.modeling import load_model, load_tokenizer
    from surgery.profile import calibration_ids

    p = Path(path)
    blob = torch.load(p, map_location="cpu", weights_only=True)
    tokenizer = load_tokenizer(model_path)
    model = load_model(model_path, device=device)
    ids = calibration_ids(tokenizer, data, tokens, model, seed, progress)
    stats = profile_heads(model, ids, ctx, samples, progress=progress)
    store_head_stats(p, stats, blob)
    return {"head_tokens": int(stats[0].tokens), "head_samples_per_layer": int(stats[0].inputs.shape[0])}


def store_head_stats(path, stats: dict[int, HeadStats], blob: dict | None = None) -> None:
    """Add head statistics to the profile file `path` (its FFN statistics kept), atomically."""
    from surgery.atomic import atomic_file

    p = Path(path)
    blob = blob if blob is not None else torch.load(p, map_location="cpu", weights_only=True)
    blob[KEY] = {i: asdict(s) for i, s in stats.items()}
    with atomic_file(p) as tmp:
        torch.save(blob, tmp)


def load_head_stats(path) -> dict[int, HeadStats] | None:
    """The "heads" statistics of a profile file, or None when it has none."""
    p = Path(path)
    if not p.is_file():
        raise SurgeryError(f"{p}: no such profile file (run `surgery profile` first)")
    try:
        blob = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        raise SurgeryError(f"{p}: not a surgery profile ({type(e).__name__})") from None
    if KEY not in blob:
        return None
    return {int(i): HeadStats(**s) for i, s in blob[KEY].items()}
