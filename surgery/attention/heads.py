"""HeadExpertAttention: a Llama attention layer whose query heads are experts.

Shape legend: B batch, T query tokens, S_k key positions (cache included), D hidden, H query heads,
G key/value heads, d head dim, R routable heads, K routed heads per token.

The module keeps the source's projections under their own names (q_proj, k_proj, v_proj, o_proj), so a
converted checkpoint only adds `self_attn.router.{weight,bias}` (learned router). Keys and values are computed
for every token and cached by transformers' cache as before. Three paths, one function:
  * dense_routing: the source attention's own forward, every head with weight 1 (the dense model, exactly);
  * masked (the reference, and training): every head computed, each head's output times its weight
    (0 for unselected heads), then o_proj;
  * sparse (inference default): per head only the tokens that chose it (surgery/attention/sparse.py).
`impl` = "auto" takes sparse when no gradient is needed, masked otherwise.
With attention_fn = "stick-breaking" (surgery/attention/stick_breaking.py) queries and keys get no RoPE, every
path runs the masked reference (the sparse path is softmax-only), and dense routing is every head at unit
weight through stick-breaking (the source's own forward would be softmax).
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from surgery.attention.config import HeadConfig
from surgery.attention.router import head_weights, learned_logits, qnorm_logits, route_heads
from surgery.kvcache import _name_for

_SKIP = {"training"}


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """transformers' rotary embedding (rotate-half form) for x [..., d] with cos/sin broadcastable to it."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x * cos) + (rotated * sin)


def heads_index(heads: list[int]):
    """A slice for a contiguous run of heads (indexing by it is a view, not a copy), else the list."""
    if heads == list(range(heads[0], heads[0] + len(heads))):
        return slice(heads[0], heads[0] + len(heads))
    return heads


def _attention_function(module, impl: str):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    eager = module._source_module.eager_attention_forward
    if hasattr(ALL_ATTENTION_FUNCTIONS, "get_interface"):
        return ALL_ATTENTION_FUNCTIONS.get_interface(impl, eager)
    return eager if impl == "eager" else ALL_ATTENTION_FUNCTIONS[impl]


class HeadExpertAttention(nn.Module):
    is_head_experts = True  # what surgery.moe.set_dense_routing looks for (no import of this module there)

    def __init__(self, dense_attn: nn.Module, cfg: HeadConfig, layer: int):
        super().__init__()
        for k, v in vars(dense_attn).items():  # config, layer_idx, head_dim, scaling, num_key_value_groups, ...
            if not k.startswith("_") and k not in _SKIP:
                setattr(self, k, v)
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (dense_attn.q_proj, dense_attn.k_proj,
                                                              dense_attn.v_proj, dense_attn.o_proj)
        self._dense_forward = type(dense_attn).forward
        # transformers >= 5.25 with the hub `kernels` package wraps the attention class's forward
        # (kernels' use_kernelized_func): the wrapper reads the per-instance kernel table its __init__ made
        if "_kernel_funcs" in vars(dense_attn):
            self._kernel_funcs = vars(dense_attn)["_kernel_funcs"]
        self._source_module = sys.modules[type(dense_attn).__module__]
        self.heads, self.kv_heads, self.top_k = cfg.heads, cfg.kv_heads, cfg.top_k
        self.shared = cfg.shared_of(layer)
        self.routed = cfg.routed_of(layer)
        self.router_kind = cfg.router
        self.scale = cfg.routing_scale
        self.attention_fn = cfg.attention_fn
        hidden = self.q_proj.in_features
        w = self.q_proj.weight
        self.router = (nn.Linear(hidden, len(self.routed), bias=True, dtype=w.dtype, device=w.device)
                       if cfg.router == "learned" else None)
        self.dense_routing = False  # every head on with weight 1: the dense attention exactly
        self.impl = "auto"  # "auto" (sparse without grad, masked with grad), "sparse" or "masked"
        self.last_router_logits: torch.Tensor | None = None  # [B*T, R] float32, for calibration losses
        self.last_head_weights: torch.Tensor | None = None  # [B*T, H] float32

    def extra_repr(self) -> str:
        return (f"heads={self.heads}, kv_heads={self.kv_heads}, shared={self.shared}, top_k={self.top_k}, "
                f"router={self.router_kind}, attention_fn={self.attention_fn}")

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None,
                past_key_values=None, **kwargs):
        cache = cache if cache is not None else past_key_values
        softmax = self.attention_fn == "softmax"
        if self.dense_routing and softmax:
            kw = {_name_for(self._dense_forward): cache}
            return self._dense_forward(self, hidden_states, position_embeddings, attention_mask, **kw, **kwargs)
        B, T, _ = hidden_states.shape
        d, H, G = self.head_dim, self.heads, self.kv_heads
        cos, sin = position_embeddings
        k = self.k_proj(hidden_states).view(B, T, G, d).transpose(1, 2)
        v = self.v_proj(hidden_states).view(B, T, G, d).transpose(1, 2)
        if softmax:
            k = rope(k, cos.unsqueeze(1), sin.unsqueeze(1))
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)

        x_TD = hidden_states.reshape(B * T, -1)
        q_full = None  # [B*T, H, d] before RoPE, when the router needs every query
        if self.router is None:
            q_full = self.q_proj(x_TD).view(B * T, H, d)
            logits = qnorm_logits(q_full[:, heads_index(self.routed)])
        else:
            logits = learned_logits(x_TD, self.router.weight, self.router.bias)
        self.last_router_logits = logits
        weights_TK, ids_TK = route_heads(logits, self.top_k, self.scale)
        if self.dense_routing:  # stick-breaking: every head, unit weights
            ids_TK = torch.arange(len(self.routed), device=logits.device).expand(logits.shape[0], -1)
            weights_TK = torch.ones(ids_TK.shape, dtype=torch.float32, device=logits.device)

        impl = self.impl
        if impl == "auto":
            impl = "masked" if torch.is_grad_enabled() and (self.training or hidden_states.requires_grad) else "sparse"
        if impl == "sparse" and softmax:
            from surgery.attention.sparse import sparse_attention

            self.last_head_weights = None
            y = sparse_attention(self, hidden_states, q_full, k, v, cos, sin, attention_mask, weights_TK, ids_TK)
            return y, None
        w_TH = head_weights(weights_TK, ids_TK, self.shared, self.routed, H)
        self.last_head_weights = w_TH
        return self._masked(hidden_states, q_full, k, v, cos, sin, attention_mask, w_TH, **kwargs)

    def _masked(self, x, q_full, k, v, cos, sin, attention_mask, w_TH, **kwargs):
        """The reference: every head computed by the model's own attention function, each head's output scaled
        by its weight (0 when not selected) before o_proj."""
        B, T, _ = x.shape
        d, H = self.head_dim, self.heads
        q = (q_full.view(B, T, H, d) if q_full is not None else self.q_proj(x).view(B, T, H, d)).transpose(1, 2)
        if self.attention_fn == "stick-breaking":
            from surgery.attention.stick_breaking import stick_breaking_attention

            out = stick_breaking_attention(q, k, v, self.scaling, attention_mask)
            out = out * w_TH.view(B, T, H, 1).to(out.dtype)
            return self.o_proj(out.reshape(B, T, H * d).contiguous()), None
        q = rope(q, cos.unsqueeze(1), sin.unsqueeze(1))
        attend = _attention_function(self, self.config._attn_implementation)
        out, _ = attend(self, q, k, v, attention_mask, dropout=0.0 if not self.training else self.attention_dropout,
                        scaling=self.scaling, **kwargs)  # [B, T, H, d]
        out = out * w_TH.view(B, T, H, 1).to(out.dtype)
        return self.o_proj(out.reshape(B, T, H * d).contiguous()), None


def head_expert_modules(model: nn.Module) -> list[HeadExpertAttention]:
    return [m for m in model.modules() if isinstance(m, HeadExpertAttention)]


def install_head_experts(model: nn.Module, cfg: HeadConfig) -> None:
    """Replace every decoder layer's self_attn by a HeadExpertAttention around the same projections."""
    layers = model.model.layers
    cfg.validate(len(layers))
    for i, layer in enumerate(layers):
        layer.self_attn = HeadExpertAttention(layer.self_attn, cfg, i)
