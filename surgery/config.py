"""The `surgery` block of a converted model's config.json: everything needed to rebuild its MoE blocks."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from surgery.errors import SurgeryError
from surgery.router import RoutingConfig


@dataclass
class MoEConfig:
    num_experts: int
    routing: RoutingConfig
    expert_sizes: list[int]  # real neurons per routed expert; stacked tensors are padded to the largest
    shared_experts: int = 0
    shared_width: int = 0  # neurons in the (single, concatenated) always-on shared expert
    method: str = "random"
    seed: int = 0
    router_init: str = "centroid"
    source: str = ""
    source_hash: str = ""
    # Per layer: for each new neuron position (shared neurons first, then experts in order, unpadded), the
    # index of the dense FFN neuron it came from. Undoing it recovers the dense FFN.
    permutations: list[list[int]] = field(default_factory=list)
    calibration: dict = field(default_factory=dict)
    version: str = ""
    # Expert pools added after conversion (`surgery extend`): [{"num_experts", "expert_width", "routing"}]
    extensions: list[dict] = field(default_factory=list)
    # What was done to the experts after conversion, in order (prune, extend): one record per operation.
    modules: list[dict] = field(default_factory=list)

    @property
    def top_k(self) -> int:
        return self.routing.top_k

    @property
    def expert_width(self) -> int:
        return max(self.expert_sizes)

    @property
    def active_ffn_fraction(self) -> float:
        """Fraction of the dense FFN's neurons a token uses on average (top-k of mean expert size + shared)."""
        routed = sum(self.expert_sizes)
        mean = routed / self.num_experts
        return (self.top_k * mean + self.shared_width) / (routed + self.shared_width)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["top_k"] = self.top_k
        d["expert_width"] = self.expert_width
        d["active_ffn_fraction"] = round(self.active_ffn_fraction, 6)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "MoEConfig":
        try:
            known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
            known["routing"] = RoutingConfig(**d["routing"])
            return cls(**known)
        except (KeyError, TypeError) as e:
            raise SurgeryError(f"config.json: malformed 'surgery' block ({e})") from None
