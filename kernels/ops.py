"""Entry points the model calls: the Triton path on CUDA when available, else the PyTorch reference."""

from __future__ import annotations

import torch

from surgery_kernels import reference


def route(logits_TE, top_k, score_func="softmax", renormalize=True, scale=1.0):
    return reference.route(logits_TE, top_k, score_func, renormalize, scale)


def moe_ffn(x_TD, gate_EFD, up_EFD, down_EDF, weights_TK, ids_TK, shared=None, impl="auto"):
    return reference.moe_ffn(x_TD, gate_EFD, up_EFD, down_EDF, weights_TK, ids_TK, shared)
