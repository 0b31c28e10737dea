"""Ceilings and baselines a converted MoE is judged against, on the same dense model and the same data.

Shape legend: T tokens, D hidden, F FFN width, E groups (experts), G neurons per group.

Each baseline replaces every dense FFN of a model in memory with a module that keeps `keep` of the neurons:
  * oracle          per token, the E*keep groups with the largest true output norm ||down_e h_e|| (a router
                    at that granularity that never errs; G=1 is the per-neuron oracle). A ceiling: it needs
                    the whole FFN to decide, so it saves nothing.
  * gate-sparsity   activation sparsity decided by the gate (TEAL / CATS style): per token, the neurons with
                    the largest |silu(gate_i x)| * ||down[:, i]||; gate computed densely (2/3 of the FFN's
                    weights read), up and down only for the kept neurons. What a user might pick instead.
  * static          one fixed neuron subset per layer (largest E[h_i^2] ||down[:, i]||^2 on calibration text),
                    optionally with the mean of the dropped neurons' output as a bias; can be calibrated with
                    the same end-to-end distillation as the MoE recipes (a narrower dense model).
Groups for the oracle come from the same co-activation clustering as the conversion (no shared experts).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as Fn
from torch import nn

from surgery.errors import SurgeryError

KINDS = ("oracle", "gate-sparsity", "static")


def _ffn(mlp):
    return mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight


class OracleFFN(nn.Module):
    """Keeps, per token, the `k` neuron groups whose outputs are largest (unit weights, no router)."""

    def __init__(self, mlp, groups: list[torch.Tensor], k: int):
        super().__init__()
        perm = torch.cat(groups)
        gate, up, down = _ffn(mlp)
        self.E, self.G, self.k = len(groups), len(groups[0]), k
        if any(len(g) != self.G for g in groups):
            raise SurgeryError("oracle: groups must be of equal size (choose a granularity dividing the FFN width)")
        self.gate, self.up, self.down = gate[perm].detach(), up[perm].detach(), down[:, perm].detach()
        d_EDG = self.down.float().reshape(-1, self.E, self.G).permute(1, 0, 2)
        self.M_EGG = d_EDG.transpose(1, 2) @ d_EDG  # ||down_e h_e||^2 = h_e^T M_e h_e

    def forward(self, x):
        shape = x.shape
        x_TD = x.reshape(-1, shape[-1])
        h_TF = Fn.silu(Fn.linear(x_TD, self.gate)) * Fn.linear(x_TD, self.up)
        h_TEG = h_TF.float().reshape(-1, self.E, self.G)
        if self.G == 1:
            score_TE = h_TEG[..., 0].pow(2) * self.M_EGG[:, 0, 0]
        else:
            score_TE = torch.einsum("teg,egh,teh->te", h_TEG, self.M_EGG, h_TEG)
        keep_TE = torch.zeros_like(score_TE).scatter_(1, score_TE.topk(self.k, -1).indices, 1.0)
        h_TF = (h_TEG * keep_TE[..., None]).reshape(h_TF.shape).to(x.dtype)
        return Fn.linear(h_TF, self.down).reshape(shape)


class GateSparseFFN(nn.Module):
    """Per token, keep the `k` neurons with the largest |silu(gate x)| * ||down column|| (gate dense)."""

    def __init__(self, mlp, k: int):
        super().__init__()
        self.gate, self.up, self.down = (w.detach() for w in _ffn(mlp))
        self.col_norm = self.down.float().norm(dim=0)
        self.k = k

    def forward(self, x):
        shape = x.shape
        x_TD = x.reshape(-1, shape[-1])
        a_TF = Fn.silu(Fn.linear(x_TD, self.gate))
        score = a_TF.float().abs() * self.col_norm
        keep = torch.zeros_like(score).scatter_(1, score.topk(self.k, -1).indices, 1.0).to(a_TF.dtype)
        return Fn.linear(a_TF * keep * Fn.linear(x_TD, self.up), self.down).reshape(shape)


class StaticFFN(nn.Module):
    """A narrower SwiGLU on a fixed neuron subset, plus an optional bias standing in for the dropped ones."""

    def __init__(self, mlp, keep_idx: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        gate, up, down = _ffn(mlp)
        self.gate_proj = nn.Linear(gate.shape[1], len(keep_idx), bias=False, dtype=gate.dtype)
        self.up_proj = nn.Linear(gate.shape[1], len(keep_idx), bias=False, dtype=gate.dtype)
        self.down_proj = nn.Linear(len(keep_idx), gate.shape[1], bias=bias is not None, dtype=gate.dtype)
        with torch.no_grad():
            self.gate_proj.weight.copy_(gate[keep_idx])
            self.up_proj.weight.copy_(up[keep_idx])
            self.down_proj.weight.copy_(down[:, keep_idx])
            if bias is not None:
                self.down_proj.bias.copy_(bias)

    def forward(self, x):
        return self.down_proj(Fn.silu(self.gate_proj(x)) * self.up_proj(x))


def static_keep(mlp, stats, keep: float, compensate: bool):
    """(kept neuron ids, bias or None): the top `keep` fraction by mean squared output contribution; the bias
    is the mean output of the dropped neurons on the profiled inputs."""
    gate, up, down = _ffn(mlp)
    F = gate.shape[0]
    n = max(1, round(keep * F))
    order = torch.argsort(stats.importance, descending=True, stable=True)
    kept, dropped = torch.sort(order[:n]).values, order[n:]
    bias = None
    if compensate:
        h_mean = stats.activations(gate, up).mean(0)  # [F] float32
        bias = (down.float()[:, dropped] @ h_mean[dropped]).to(down.dtype)
    return kept, bias


def apply_baseline(model, kind: str, keep: float, stats=None, granularity: int = 1, compensate: bool = True,
                   seed: int = 0):
    """Replace every FFN of a dense model in memory with the baseline `kind`, keeping `keep` of its neurons."""
    if kind not in KINDS:
        raise SurgeryError(f"baseline {kind!r}: choose from {', '.join(KINDS)}")
    if not 0 < keep <= 1:
        raise SurgeryError(f"--keep {keep}: must be in (0, 1]")
    layers = model.model.layers
    for l, layer in enumerate(layers):
        mlp = layer.mlp
        if not hasattr(mlp, "gate_proj"):
            raise SurgeryError("baselines need a dense model (its layers' mlp must be a SwiGLU FFN)")
        F = mlp.gate_proj.weight.shape[0]
        if kind == "gate-sparsity":
            layer.mlp = GateSparseFFN(mlp, max(1, round(keep * F)))
            continue
        if stats is None:
            raise SurgeryError(f"baseline {kind}: needs profiling statistics (--profile PATH)")
        if kind == "static":
            layer.mlp = StaticFFN(mlp, *static_keep(mlp, stats[l], keep, compensate))
            continue
        if F % granularity:
            raise SurgeryError(f"--granularity {granularity}: must divide the FFN width {F}")
        E = F // granularity
        if granularity == 1:
            groups = [torch.tensor([i]) for i in range(F)]
        else:
            from surgery.cluster import FFNWeights, get_method

            ffn = FFNWeights(*(w.detach() for w in _ffn(mlp)))
            groups = get_method("coactivation")(ffn, [granularity] * E, seed=seed * 100_003 + l, stats=stats[l])
        layer.mlp = OracleFFN(mlp, groups, max(1, round(keep * E)))
    return model


def save_static(model, out, tokenizer_from=None, overwrite: bool = False) -> Path:
    """The static baseline as a stock Llama checkpoint that any Llama runtime loads: intermediate_size = the
    neurons kept, and mlp_bias when the dropped neurons' mean output is compensated (the gate and up biases
    are then zero). Written atomically."""
    from surgery.modeling import write_model_folder

    mlps = [layer.mlp for layer in model.model.layers]
    if not all(isinstance(m, StaticFFN) for m in mlps):
        raise SurgeryError("--save: only the static baseline is a model of its own (the others need the dense FFN)")
    widths = {m.gate_proj.weight.shape[0] for m in mlps}
    if len(widths) != 1:
        raise SurgeryError(f"--save: layers kept different widths {sorted(widths)}; a Llama config has one")
    bias = any(m.down_proj.bias is not None for m in mlps)
    cfg = model.config.to_dict()
    cfg.update(intermediate_size=widths.pop(), mlp_bias=bias)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if bias:
        for l, m in enumerate(mlps):
            pre = f"model.layers.{l}.mlp."
            state[pre + "gate_proj.bias"] = torch.zeros_like(m.gate_proj.weight[:, 0])
            state[pre + "up_proj.bias"] = torch.zeros_like(m.up_proj.weight[:, 0])
            state.setdefault(pre + "down_proj.bias", torch.zeros_like(m.down_proj.weight[:, 0]))
    return write_model_folder(out, model, state, cfg, tokenizer_from, overwrite=overwrite)


def reload_check(model, folder, vocab: int, tokens: int = 32) -> float:
    """Max |logit difference| between `model` and the checkpoint at `folder` loaded by stock transformers."""
    from transformers import AutoModelForCausalLM

    ids = torch.randint(0, vocab, (1, tokens), generator=torch.Generator().manual_seed(0))
    stock = AutoModelForCausalLM.from_pretrained(str(folder), dtype=next(model.parameters()).dtype)
    with torch.no_grad():
        return (stock(ids).logits.float() - model(ids).logits.float()).abs().max().item()


def distil(model, teacher, ids: torch.Tensor, cfg, seed: int = 0, progress: bool = True) -> dict:
    """The MoE recipes' end-to-end distillation (`cfg`: an EndToEndConfig) applied to a baseline model, the
    frozen dense teacher's logits as targets. Returns the tokens, seconds and first and last KD loss."""
    from surgery.calibrate import run_end_to_end

    for p in teacher.parameters():
        p.requires_grad_(False)
    r = run_end_to_end(model, teacher, ids, cfg, seed, progress=progress)
    return {"tokens": r["tokens"], "seconds": r["seconds"], "first_kd": r["history"][0]["kd"],
            "last_kd": r["history"][-1]["kd"]}


def run_baseline(model_path, kind: str, keep: float, profile_path=None, granularity: int = 1,
                 compensate: bool = True, calibrate_tokens: int = 0, calibrate_ctx: int = 256, lr: float = 1e-4,
                 datasets: dict | None = None, ctx: int = 1024, seed: int = 0, device: str = "cpu",
                 progress: bool = True, calibrate_data=None, save=None, overwrite: bool = False) -> dict:
    """Apply a baseline to the dense model at `model_path`, optionally calibrate it (static only: the MoE
    recipes' end-to-end distillation, every decoder-layer weight, on `calibrate_data` as `calibration_ids`
    reads it: None for WikiText-2 valid, "mix" for the recipes' corpus), and evaluate it. Returns a JSON-ready
    dict."""
    import time

    from surgery.calibrate import EndToEndConfig
    from surgery.data import resolve_data
    from surgery.modeling import load_model, load_tokenizer
    from surgery.profile import ProfileConfig, calibration_ids, load_profile, profile_model
    from surgery_evals.perplexity import perplexity
    from surgery_evals.report import machine

    if calibrate_tokens and kind != "static":
        raise SurgeryError(f"--calibrate-tokens: only the static baseline is trained (not {kind})")
    if calibrate_data is not None and not calibrate_tokens:
        raise SurgeryError("--data is the calibration text: it goes with --calibrate-tokens")
    if save is not None:
        if kind != "static":
            raise SurgeryError(f"--save: only the static baseline is a model of its own (not {kind})")
        if Path(save).exists() and not overwrite:
            raise SurgeryError(f"{save}: already exists (choose another path or pass --overwrite)")
    tokenizer = load_tokenizer(model_path)
    model = load_model(model_path, device=device)
    t0 = time.time()
    stats = None
    if kind != "gate-sparsity":
        if profile_path is not None:
            stats, _ = load_profile(profile_path)
        else:  # the recipes' profile: 16k tokens of WikiText-2 valid
            pc = ProfileConfig(seed=seed)
            stats = profile_model(model, calibration_ids(tokenizer, None, pc.tokens, model, seed, progress), pc,
                                  progress)
    apply_baseline(model, kind, keep, stats, granularity, compensate, seed)
    result = {"baseline": kind, "keep": keep, "granularity": granularity if kind == "oracle" else None,
              "compensate": compensate if kind == "static" else None, "model": str(model_path)}
    if calibrate_tokens:
        teacher = load_model(model_path, device=device)
        cfg = EndToEndConfig(tokens=calibrate_tokens, ctx=calibrate_ctx, batch_size=2, lr=lr, train="all")
        t_data = time.time()
        ids = calibration_ids(tokenizer, calibrate_data, calibrate_tokens, teacher, seed, progress)
        data_seconds = round(time.time() - t_data, 1)
        r = distil(model, teacher, ids, cfg, seed, progress)
        result["calibration"] = {"tokens": r["tokens"], "seconds": r["seconds"], "lr": lr,
                                 "data": str(calibrate_data or "wikitext-valid"), "data_seconds": data_seconds,
                                 "first_kd": r["first_kd"], "last_kd": r["last_kd"]}
        del teacher
    result["prepare_seconds"] = round(time.time() - t0, 1)
    if save is not None:
        model.eval()
        save_static(model, save, tokenizer_from=model_path, overwrite=overwrite)
        result["saved"] = {"path": str(save), "reloaded_by": "transformers.AutoModelForCausalLM",
                           "max_abs_logit_diff": reload_check(model, save, model.config.vocab_size)}
    result["evaluations"] = {}
    for name, n in (datasets or {"wikitext": 40960, "stdlib": 40960}).items():
        data = resolve_data({"wikitext": "wikitext-test"}.get(name, name))
        r = perplexity(model, tokenizer, data, n, ctx, 1, progress)
        result["evaluations"][name] = {k: r[k] for k in ("perplexity", "tokens", "ctx", "data")}
    result["machine"] = machine()
    return result
