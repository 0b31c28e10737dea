"""Evaluate: perplexity over non-overlapping windows of a text file."""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from surgery.data import tokenize_file
from surgery.errors import SurgeryError


def eval_windows(tokenizer, data, max_tokens: int, ctx: int) -> list[torch.Tensor]:
    """The first `max_tokens` tokens as windows of `ctx` (a last shorter window is kept if it has at least 2)."""
    if ctx < 2:
        raise SurgeryError(f"--ctx {ctx}: must be at least 2")
    if max_tokens < 2:
        raise SurgeryError(f"--max-tokens {max_tokens}: must be at least 2")
    ids = tokenize_file(tokenizer, data, max_tokens)
    if ids.numel() < 2:
        raise SurgeryError(f"{data}: fewer than 2 tokens")
    windows = [ids[i:i + ctx] for i in range(0, ids.numel(), ctx)]
    return [w for w in windows if w.numel() >= 2]


def eval_batches(windows: list[torch.Tensor], batch_size: int) -> list[torch.Tensor]:
    """Groups of `batch_size` windows, stacked when of one length (else one window a batch), in order."""
    out = []
    for i in range(0, len(windows), batch_size):
        group = windows[i:i + batch_size]
        same = all(w.numel() == group[0].numel() for w in group)
        out += [torch.stack(group)] if same else [w[None] for w in group]
    return out


def window_nll(logits: torch.Tensor, batch: torch.Tensor) -> tuple[float, int]:
    """(summed next-token NLL, predicted tokens) of one batch."""
    logits = logits.float()
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum")
    return loss.item(), batch[:, 1:].numel()


def summary(nll: float, count: int, windows: list[torch.Tensor], data, ctx: int, seconds: float, moe,
            dtype: torch.dtype, device) -> dict:
    tokens = int(sum(w.numel() for w in windows))
    return {
        "perplexity": math.exp(nll / count),
        "nll": nll / count,
        "tokens": tokens,
        "predicted_tokens": count,
        "ctx": ctx,
        "windows": len(windows),
        "data": str(data),
        "seconds": round(seconds, 3),
        "tokens_per_second": round(tokens / seconds, 2),
        "active_ffn_fraction": round(moe.active_ffn_fraction, 6) if moe else 1.0,
        "dtype": str(dtype).removeprefix("torch."),
        "device": str(device),
    }


@torch.no_grad()
def perplexity(model, tokenizer, data, max_tokens: int = 40960, ctx: int = 1024, batch_size: int = 1,
               progress: bool = True) -> dict:
    """Split the first `max_tokens` tokens into windows of `ctx` (a last shorter window is kept if it has at
    least 2 tokens); each window predicts its own tokens 2..n from scratch. Returns the JSON-ready result."""
    windows = eval_windows(tokenizer, data, max_tokens, ctx)
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    t0 = time.time()
    bar = tqdm(total=sum(w.numel() for w in windows), desc="perplexity", unit="tok", disable=not progress)
    for batch in eval_batches(windows, batch_size):
        batch = batch.to(device)
        s, n = window_nll(model(input_ids=batch, use_cache=False).logits, batch)
        nll += s
        count += n
        bar.update(batch.numel())
        bar.set_postfix(ppl=f"{math.exp(nll / count):.2f}")
    bar.close()
    return summary(nll, count, windows, data, ctx, time.time() - t0, getattr(model, "surgery_config", None),
                   next(model.parameters()).dtype, device)
