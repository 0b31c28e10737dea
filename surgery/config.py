"""The `surgery` block of a converted model's config.json: everything needed to rebuild its MoE blocks."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

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
    # Per-layer top-k (`--layer-budgets`); empty: every layer routes to routing.top_k. The ks sum to
    # layers * routing.top_k, so routing.top_k is their mean. Each layer's scale follows routing_at_k.
    layer_top_k: list[int] = field(default_factory=list)
    # Attention heads as experts (surgery/attention/config.py HeadConfig as a dict); empty: attention is dense.
    attention: dict = field(default_factory=dict)

    @property
    def top_k(self) -> int:
        """The mean top-k over layers (every layer's, when budgets are uniform)."""
        return self.routing.top_k

    @property
    def uniform_top_k(self) -> bool:
        return len(set(self.layer_top_k)) <= 1

    @property
    def max_top_k(self) -> int:
        return max(self.layer_top_k, default=self.top_k)

    def layer_routing(self, layer: int) -> RoutingConfig:
        return routing_at_k(self.routing, self.layer_top_k[layer]) if self.layer_top_k else self.routing

    @property
    def expert_width(self) -> int:
        return max(self.expert_sizes)

    def _active_fraction(self, k: float) -> float:
        """Fraction of the dense FFN's neurons a token uses in a layer routing to k experts (k of mean expert
        size + shared)."""
        routed = sum(self.expert_sizes)
        mean = routed / self.num_experts
        return (k * mean + self.shared_width) / (routed + self.shared_width)

    @property
    def active_ffn_fraction(self) -> float:
        """Mean over layers of the fraction of FFN neurons a token uses."""
        ks = self.layer_top_k or [self.top_k]
        return sum(self._active_fraction(k) for k in ks) / len(ks)

    @property
    def max_active_ffn_fraction(self) -> float:
        """Worst case over layers: the densest layer's active fraction."""
        return self._active_fraction(self.max_top_k)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["top_k"] = self.top_k
        d["expert_width"] = self.expert_width
        d["active_ffn_fraction"] = round(self.active_ffn_fraction, 6)
        d["max_active_ffn_fraction"] = round(self.max_active_ffn_fraction, 6)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "MoEConfig":
        try:
            known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
            known["routing"] = RoutingConfig(**d["routing"])
            moe = cls(**known)
        except (KeyError, TypeError) as e:
            raise SurgeryError(f"config.json: malformed 'surgery' block ({e})") from None
        bad = [k for k in moe.layer_top_k if not isinstance(k, int) or not 1 <= k <= moe.num_experts]
        if bad:
            raise SurgeryError(f"config.json: layer_top_k holds {bad[0]!r}, outside 1..{moe.num_experts} experts")
        return moe


def routing_at_k(routing: RoutingConfig, k: int) -> RoutingConfig:
    """`routing` with top-k = k and the scale per selected expert kept (scale * k / top_k): with the default
    scale = top_k that is scale = k, so every layer's selected experts keep their dense weight on average.
    Calibration's transition schedule moves k by the same rule."""
    if k == routing.top_k:
        return routing
    return replace(routing, top_k=k, scale=routing.scale * k / routing.top_k)
