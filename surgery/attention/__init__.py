"""Attention heads as experts (issue 14): a mixture of attention heads converted from a dense Llama.

Each decoder layer's query heads become experts with their own query rows (q_proj) and output columns
(o_proj); keys and values stay dense and shared in the source's grouped-query layout and are cached by
transformers as before. S heads are always on; a per-layer router picks the top-K of the other H - S heads
per token, and the routing weights scale the chosen heads' outputs before o_proj.

    config.py   HeadConfig: what config.json's `surgery.attention` block records
    router.py   head scores (qnorm, learned), routing weights, shared-head choice and router initialisation
    heads.py    HeadExpertAttention: the module that replaces `self_attn` (dense, masked and sparse paths)
    sparse.py   the sparse path: per head, only the tokens that chose it
    stick_breaking.py  ModuleFormer's stick-breaking attention (HeadConfig.attention_fn), PyTorch reference
    profile.py  per-head statistics on calibration text (`surgery profile --heads`)
    convert.py  conversion: streaming tensors for `surgery convert`, and in memory
"""

from surgery.attention.config import ATTENTION_FNS, HEAD_ROUTERS, HeadConfig
from surgery.attention.heads import HeadExpertAttention, head_expert_modules, install_head_experts

__all__ = ["ATTENTION_FNS", "HEAD_ROUTERS", "HeadConfig", "HeadExpertAttention", "head_expert_modules", "install_head_experts"]
