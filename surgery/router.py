"""Route: how router scores become routing weights (decided here, once), and router initialisation.

The export writers read RoutingConfig rather than re-deriving it: softmax + renormalise is Mixtral's and
Qwen2-MoE's (norm_topk_prob) rule, and `scale` is folded into the experts' down-projections on export.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

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
