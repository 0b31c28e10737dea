"""Profile: stream calibration text through the dense model and keep, per layer, what clustering and routing
need, within a token budget and bounded memory.

Shape legend: T tokens, D hidden, F FFN width, N sampled tokens per layer.

Per layer we keep
  * a uniform reservoir sample of N FFN inputs x [N, D] (float16): intermediate activations
    h = silu(x gate^T) * (x up^T) are recomputed from it on demand, so they are never stored;
  * running statistics over every profiled token, per neuron: mean |h| (`abs_mean`), mean h^2 (`sq_mean`),
    how often the neuron is among the token's top quarter by |h| (`top_freq`), and `importance`, the mean
    squared contribution E[h^2] * ||down[:, i]||^2 of the neuron to the FFN output.
Memory is N * D per layer however many tokens are profiled.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as Fn
from tqdm import tqdm

from surgery.data import windows_of
from surgery.errors import SurgeryError


@dataclass
class ProfileConfig:
    tokens: int = 16384  # token budget
    ctx: int = 512  # window length
    samples: int = 4096  # FFN inputs kept per layer (reservoir sample)
    batch_size: int = 4
    seed: int = 0
    top_fraction: float = 0.25  # a neuron is "active" for a token when among its top quarter by |h|


@dataclass
class LayerStats:
    inputs: torch.Tensor  # [N, D] float16 sample of FFN inputs
    abs_mean: torch.Tensor  # [F] float32
    sq_mean: torch.Tensor  # [F]
    top_freq: torch.Tensor  # [F]
    importance: torch.Tensor  # [F]
    tokens: int

    def activations(self, gate: torch.Tensor, up: torch.Tensor, limit: int | None = None) -> torch.Tensor:
        """Intermediate activations h [N, F] (float32) of the sampled inputs."""
        x = self.inputs[:limit].float()
        return Fn.silu(x @ gate.float().T) * (x @ up.float().T)


class _Collector:
    def __init__(self, mlp, samples: int, top_fraction: float, gen: torch.Generator):
        self.gate = mlp.gate_proj.weight.detach()
        self.up = mlp.up_proj.weight.detach()
        self.down_sq = mlp.down_proj.weight.detach().float().pow(2).sum(0)  # [F]
        F, D = self.gate.shape
        self.samples, self.top_fraction, self.gen = samples, top_fraction, gen
        self.abs_sum = torch.zeros(F, dtype=torch.float64)
        self.sq_sum = torch.zeros(F, dtype=torch.float64)
        self.top_count = torch.zeros(F, dtype=torch.float64)
        self.seen = 0
        self.reservoir = torch.zeros(samples, D, dtype=torch.float16)
        self.filled = 0

    def __call__(self, module, args):
        x = args[0].detach().reshape(-1, args[0].shape[-1])
        h = (Fn.silu(x @ self.gate.T) * (x @ self.up.T)).float()
        a = h.abs()
        self.abs_sum += a.sum(0).double().cpu()
        self.sq_sum += h.pow(2).sum(0).double().cpu()
        k = max(1, int(round(a.shape[1] * self.top_fraction)))
        thresh = a.topk(k, dim=1).values[:, -1:]
        self.top_count += (a >= thresh).sum(0).double().cpu()
        self._reservoir(x.cpu().to(torch.float16))
        self.seen += x.shape[0]

    def _reservoir(self, x: torch.Tensor) -> None:
        """Algorithm R, vectorised: after the reservoir fills, token number i replaces a random slot with
        probability samples / i."""
        n = x.shape[0]
        take = min(self.samples - self.filled, n)
        if take > 0:
            self.reservoir[self.filled:self.filled + take] = x[:take]
            self.filled += take
        if take < n:
            idx = torch.arange(self.seen + take + 1, self.seen + n + 1, dtype=torch.float64)
            slots = (torch.rand(n - take, generator=self.gen, dtype=torch.float64) * idx).long()
            keep = slots < self.samples
            rows, slots = x[take:][keep], slots[keep]
            # Later tokens overwrite earlier ones, as in the serial form. index_put with repeated indices is
            # unordered across threads, so only each slot's last writer is kept: the same sample at any count.
            last = torch.full((self.samples,), -1, dtype=torch.long).scatter_reduce(
                0, slots, torch.arange(slots.numel()), reduce="amax")
            last = last[last >= 0]
            self.reservoir[slots[last]] = rows[last]

    def result(self) -> LayerStats:
        n = max(self.seen, 1)
        sq = (self.sq_sum / n).float()
        return LayerStats(inputs=self.reservoir[: self.filled].clone(), abs_mean=(self.abs_sum / n).float(),
                          sq_mean=sq, top_freq=(self.top_count / n).float(),
                          importance=sq * self.down_sq.to(sq.device), tokens=self.seen)


@torch.no_grad()
def profile_model(model, ids: torch.Tensor, cfg: ProfileConfig, progress: bool = True) -> dict[int, LayerStats]:
    """Run the dense `model` over the first cfg.tokens of `ids` (1-D) in windows of cfg.ctx; per-layer stats."""
    ids = ids[: cfg.tokens]
    wins = windows_of(ids, cfg.ctx, short_ok=True)
    gen = torch.Generator().manual_seed(cfg.seed)
    layers = model.model.layers
    collectors, hooks = [], []
    for layer in layers:
        mlp = layer.mlp
        if not hasattr(mlp, "gate_proj"):
            raise SurgeryError("profile needs a dense model (its layers' mlp must be a SwiGLU FFN)")
        c = _Collector(mlp, cfg.samples, cfg.top_fraction, gen)
        collectors.append(c)
        hooks.append(mlp.register_forward_pre_hook(c))
    run_hooked(model, wins, cfg.batch_size, hooks, "profiling", progress)
    return {i: c.result() for i, c in enumerate(collectors)}


@torch.no_grad()
def run_hooked(model, wins: torch.Tensor, batch_size: int, hooks: list, desc: str, progress: bool = True) -> None:
    """Run `model` over the windows [W, T] in batches, for the side effects of its registered `hooks` (the
    profilers' collectors); the hooks are removed afterwards, whatever happens."""
    device = next(model.parameters()).device
    bar = tqdm(total=wins.numel(), desc=desc, unit="tok", disable=not progress)
    try:
        for i in range(0, wins.shape[0], batch_size):
            batch = wins[i:i + batch_size].to(device)
            model(input_ids=batch, use_cache=False)
            bar.update(batch.numel())
    finally:
        for h in hooks:
            h.remove()
        bar.close()


def save_profile(stats: dict[int, LayerStats], path, meta: dict | None = None) -> Path:
    from surgery.atomic import atomic_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        torch.save({"meta": meta or {}, "layers": {i: asdict(s) for i, s in stats.items()}}, tmp)
    return path


def load_profile(path) -> tuple[dict[int, LayerStats], dict]:
    p = Path(path)
    if not p.is_file():
        raise SurgeryError(f"{p}: no such profile file (run `surgery profile` first)")
    try:
        blob = torch.load(p, map_location="cpu", weights_only=True)
        return {int(i): LayerStats(**s) for i, s in blob["layers"].items()}, blob.get("meta", {})
    except Exception as e:  # a truncated or foreign file
        raise SurgeryError(f"{p}: not a surgery profile ({type(e).__name__})") from None


MIX_BLOCK = 512  # a multiple of every stage's window, so each window is from one source


def calibration_ids(tokenizer, data=None, tokens: int = 16384, model=None, seed: int = 0,
                    progress: bool = True, deadline: float | None = None) -> torch.Tensor:
    """Token ids for calibration: the first `tokens` of a text/JSONL file (default WikiText-2 valid), or, with
    data="sample", text sampled from `model` itself (data-free), or with data="mix", half and half of the two
    interleaved in blocks of MIX_BLOCK tokens (the model's own text keeps domains the file lacks in step);
    "prompted" / "mix-prompted" sample the model's answers to seed prompts instead (data.sampling_spec).
    deadline: sampling stops there (data.sample_corpus), and a mix keeps its halves equal."""
    from surgery.data import interleave, resolve_data, sample_corpus, sampled_tokens, sampling_spec, tokenize_file

    spec = sampling_spec(data)
    if spec is not None:
        mode, prompts = spec
        if model is None:
            raise SurgeryError(f"--data {data} needs the dense model to sample from")
        n = sampled_tokens(tokens, mode)
        sampled = sample_corpus(model, tokenizer, n, seed=seed, progress=progress, batch_size=128, prompts=prompts,
                                deadline=deadline)
        if mode == "sample":
            return sampled
        half = min(tokens // 2, sampled.numel())
        return interleave(tokenize_file(tokenizer, resolve_data(None), half), sampled, MIX_BLOCK)
    path = resolve_data(data)
    return tokenize_file(tokenizer, path, tokens)  # a short file gives what it has; callers report the count


def run_profile(model_path, out, cfg: ProfileConfig, data=None, device="cpu", dtype=None,
                progress: bool = True) -> dict:
    """`surgery profile`: load a dense model, profile it, write the stats file. Returns a summary."""
    from surgery.modeling import load_model, load_tokenizer

    t0 = time.time()
    tokenizer = load_tokenizer(model_path)
    model = load_model(model_path, dtype=dtype, device=device)
    if hasattr(model, "surgery_config"):
        raise SurgeryError(f"{model_path}: already converted; profile the dense model")
    ids = calibration_ids(tokenizer, data, cfg.tokens, model, cfg.seed, progress)
    stats = profile_model(model, ids, cfg, progress)
    meta = {"model": str(model_path), "data": str(data or "wikitext-valid"), "config": asdict(cfg),
            "tokens": int(stats[0].tokens), "seconds": round(time.time() - t0, 2)}
    save_profile(stats, out, meta)
    return {**meta, "output": str(out), "layers": len(stats), "samples_per_layer": int(stats[0].inputs.shape[0]),
            "bytes": Path(out).stat().st_size}


class LayerCollector(_Collector):
    """A _Collector for one layer profiled on its own (surgery/stream.py), drawing the same reservoir random
    numbers as profile_model: there every layer's collector shares one generator and, per batch, layers draw
    in order, so this one skips the draws of the `index` layers before it and the layers after it."""

    def __init__(self, mlp, cfg: ProfileConfig, index: int, layers: int):
        super().__init__(mlp, cfg.samples, cfg.top_fraction, torch.Generator().manual_seed(cfg.seed))
        self.index, self.layers = index, layers

    def _skip(self, draws: int, times: int) -> None:
        for _ in range(times):  # one call per layer: the same sequence as the shared generator's
            torch.rand(draws, generator=self.gen, dtype=torch.float64)

    def _reservoir(self, x: torch.Tensor) -> None:
        draws = x.shape[0] - min(self.samples - self.filled, x.shape[0])  # every layer draws as many
        if draws > 0:
            self._skip(draws, self.index)
        super()._reservoir(x)
        if draws > 0:
            self._skip(draws, self.layers - 1 - self.index)
