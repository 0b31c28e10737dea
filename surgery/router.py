"""Route: how router scores become routing weights (decided here, once), and router initialisation.

The export writers read RoutingConfig rather than re-deriving it: softmax + renormalise is Mixtral's and
Qwen2-MoE's (norm_topk_prob) rule, and `scale` is folded into the experts' down-projections on export.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as Fn

from surgery.errors import SurgeryError


@dataclass
class RoutingConfig:
    top_k: int
    score_func: str = "softmax"  # softmax over all experts, or an independent sigmoid per expert
    renormalize: bool = True  # divide the selected scores by their sum
    # Multiplies every routing weight. With renormalised weights summing to 1, scale = top_k gives the
    # selected experts their dense (unit) weight on average, which is what the dense FFN gave them.
    scale: float = 1.0

    def validate(self, num_experts: int) -> None:
        if self.top_k < 1:
            raise SurgeryError(f"--top-k {self.top_k}: must be at least 1")
        if self.top_k > num_experts:
            raise SurgeryError(f"--top-k {self.top_k}: larger than --experts {num_experts}")
        if self.score_func not in ("softmax", "sigmoid"):
            raise SurgeryError(f"score function {self.score_func!r}: choose softmax or sigmoid")

    def to_dict(self) -> dict:
        return asdict(self)


def centroid_init(gate: torch.Tensor, groups: list[torch.Tensor]) -> torch.Tensor:
    """Router row e = mean of expert e's gate rows: its logit is the expert's mean gate pre-activation, a
    data-free guess at how strongly the expert fires for a token. Returns [E, D] in float32."""
    g = gate.float()
    return torch.stack([g[idx].mean(0) for idx in groups])


ROUTER_INITS = {"centroid": centroid_init}


# ---- data-aware initialisation: fit the router to the experts that matter on profiled tokens -------------

def group_outputs(x_ND: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor,
                  groups: list[torch.Tensor]) -> torch.Tensor:
    """Each neuron group's output on x: [N, G, D] (float32)."""
    from surgery_kernels.reference import swiglu

    x = x_ND.float()
    g, u, d = gate.float(), up.float(), down.float()
    return torch.stack([swiglu(x, g[i], u[i], d[:, i]) for i in groups], dim=1)


def oracle_scores(y_NED: torch.Tensor, target_ND: torch.Tensor) -> torch.Tensor:
    """How much each expert alone reduces the squared error to the target: 2<y_e, t> - ||y_e||^2 [N, E].
    Its top-k are the oracle labels (experts whose outputs matter most for this token)."""
    return 2 * torch.einsum("ned,nd->ne", y_NED, target_ND) - y_NED.pow(2).sum(-1)


def expert_output_sq_norms(x_TD: torch.Tensor, gate_EFD: torch.Tensor, up_EFD: torch.Tensor,
                           down_EDF: torch.Tensor) -> torch.Tensor:
    """||expert_e(x_t)||^2 for every token and routed expert [T, E] (float32), without the [T, E, D] outputs:
    with h = silu(W_gate x) * (W_up x) [T, E, F], ||W_down h||^2 = h^T (W_down^T W_down) h. Its top-k are the
    output-norm oracle's choices (`surgery_evals.routing_probe --modes oracle`), the end-to-end stage's
    prior-approximate labels (EndToEndConfig.prior_weight)."""
    x = x_TD.float()
    h = Fn.silu(torch.einsum("td,efd->tef", x, gate_EFD.float())) * torch.einsum("td,efd->tef", x, up_EFD.float())
    d = down_EDF.float()
    gram = torch.einsum("edf,edg->efg", d, d)
    return (torch.einsum("tef,efg->teg", h, gram) * h).sum(-1).clamp_min(0)


def route_weights(logits_NE: torch.Tensor, routing: RoutingConfig):
    """The model's routing rule (the kernels' reference, differentiable in the logits) under this config."""
    from surgery_kernels import reference

    return reference.route(logits_NE, routing.top_k, routing.score_func, routing.renormalize, routing.scale)


def fit_router(x_ND: torch.Tensor, y_NED: torch.Tensor, target_ND: torch.Tensor, routing: RoutingConfig,
               w0_ED: torch.Tensor | None = None, steps: int = 300, lr: float = 1e-2, prior_weight: float = 1.0,
               batch: int = 4096, seed: int = 0) -> torch.Tensor:
    """Train a router [E, D] on fixed expert outputs so that routing reproduces `target` (the routed part of
    the dense FFN output): relative squared error of the routed combination (pooled plus per token, as
    losses.block_error), plus `prior_weight` times the
    cross-entropy of the router's softmax against the oracle top-k labels (FactorLLM's prior-approximate
    loss). Starts from least squares onto the standardised oracle scores unless w0 is given.

    The squared error of a combination w (dense [N, E], zero off the top-k) is w^T G w - 2 w.b + c with
    G = <y_e, y_f>, b = <y_e, t>, c = ||t||^2 per token: precomputed once, so a step costs O(N E^2)."""
    x = x_ND.float()
    N, E, D = y_NED.shape
    K = routing.top_k
    y, t = y_NED.float(), target_ND.float()
    G = torch.einsum("ned,nfd->nef", y, y)
    b = torch.einsum("ned,nd->ne", y, t)
    c = t.pow(2).sum(-1)
    scores = 2 * b - torch.diagonal(G, dim1=1, dim2=2)  # = oracle_scores(y, t)
    labels = torch.zeros(N, E).scatter_(1, scores.topk(K, -1).indices, 1.0 / K)
    if w0_ED is None:
        z = (scores - scores.mean(1, keepdim=True)) / scores.std(1, keepdim=True).clamp_min(1e-6)
        reg = 1e-3 * (x.pow(2).sum() / N) * torch.eye(D)
        w0_ED = torch.linalg.solve(x.T @ x / N + reg, x.T @ z / N).T
    W = torch.nn.Parameter(w0_ED.float().clone())
    opt = torch.optim.Adam([W], lr=lr)
    g = torch.Generator().manual_seed(seed)
    cnorm = c.mean().clamp_min(1e-12)
    ctok = c.clamp_min(1e-12)
    for _ in range(steps):
        idx = torch.randint(0, N, (batch,), generator=g) if batch < N else slice(None)
        logits = x[idx] @ W.T
        w, ids = route_weights(logits, routing)
        wd = torch.zeros_like(logits).scatter(1, ids, w)
        e_n = torch.einsum("ne,nef,nf->n", wd, G[idx], wd) - 2 * (wd * b[idx]).sum(-1) + c[idx]
        err = e_n.mean() / cnorm + (e_n / ctok[idx]).mean()  # = losses.block_error, pooled + per token
        ce = -(labels[idx] * torch.log_softmax(logits, -1)).sum(-1).mean()
        loss = err + prior_weight * ce
        opt.zero_grad()
        loss.backward()
        opt.step()
    return W.detach()


def fitted_init(ffn, groups: list[torch.Tensor], shared: int, stats, routing: RoutingConfig, seed: int = 0,
                steps: int = 300) -> torch.Tensor:
    """Router fitted on the profiled FFN inputs (stats.inputs) to pick the experts whose outputs matter."""
    if stats is None:
        raise SurgeryError("--router-init fitted needs profiling statistics (give --profile PATH)")
    x = stats.inputs.float()
    y = group_outputs(x, ffn.gate, ffn.up, ffn.down, groups[shared:])
    target = y.sum(1)  # the dense FFN output minus the shared experts' part
    return fit_router(x, y, target, routing, steps=steps, seed=seed)


fitted_init.data_aware = True
ROUTER_INITS["fitted"] = fitted_init
