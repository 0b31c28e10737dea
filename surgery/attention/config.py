"""The `attention` entry of config.json's `surgery` block: everything needed to rebuild the head experts."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from surgery.errors import SurgeryError

HEAD_ROUTERS = ("qnorm", "learned")
ATTENTION_FNS = ("softmax", "stick-breaking")


@dataclass
class HeadConfig:
    heads: int  # query heads per layer (H)
    kv_heads: int  # key/value heads (the source's grouped-query layout, unchanged)
    top_k: int  # routed heads each token uses (K of the H - S routable ones)
    shared_heads: int = 0  # always-on heads per layer (S)
    router: str = "qnorm"  # qnorm: parameter-free, log of the query's norm; learned: linear [H - S, D] + bias
    # Routing weights: softmax over the routable heads' scores, top-K, renormalised to sum 1, times `scale`
    # (default K: selected heads keep their dense unit weight on average). Shared heads have weight 1.
    scale: float = 0.0  # 0: top_k
    # Per layer: the always-on heads (sorted). Empty: the first S heads in every layer.
    shared: list[list[int]] = field(default_factory=list)
    init: str = ""  # how shared heads and router were chosen: "first" / "zeros" or "profile"
    # softmax: the source's attention (RoPE); stick-breaking: ModuleFormer's (stick_breaking.py), no RoPE,
    # every head of the layer; a converted model reaches it by calibration (surgery calibrate --head-train attn)
    attention_fn: str = "softmax"

    @property
    def routable(self) -> int:
        return self.heads - self.shared_heads

    @property
    def routing_scale(self) -> float:
        return float(self.scale or self.top_k)

    @property
    def active_heads(self) -> int:
        return self.shared_heads + self.top_k

    @property
    def active_fraction(self) -> float:
        return self.active_heads / self.heads

    def shared_of(self, layer: int) -> list[int]:
        return list(self.shared[layer]) if self.shared else list(range(self.shared_heads))

    def routed_of(self, layer: int) -> list[int]:
        s = set(self.shared_of(layer))
        return [h for h in range(self.heads) if h not in s]

    def validate(self, layers: int | None = None) -> None:
        if self.router not in HEAD_ROUTERS:
            raise SurgeryError(f"--head-router {self.router!r}: choose from {', '.join(HEAD_ROUTERS)}")
        if self.attention_fn not in ATTENTION_FNS:
            raise SurgeryError(f"--attention-fn {self.attention_fn!r}: choose from {', '.join(ATTENTION_FNS)}")
        if not 0 <= self.shared_heads < self.heads:
            raise SurgeryError(f"--shared-heads {self.shared_heads}: must be 0 to {self.heads - 1} "
                               f"(the model has {self.heads} query heads; at least one must be routed)")
        if not 1 <= self.top_k <= self.routable:
            raise SurgeryError(f"--attention-top-k {self.top_k}: must be 1 to {self.routable} (the {self.heads} "
                               f"query heads minus {self.shared_heads} shared)")
        if self.heads % self.kv_heads:
            raise SurgeryError(f"{self.heads} query heads are not a multiple of {self.kv_heads} key/value heads")
        if self.scale < 0:
            raise SurgeryError(f"attention routing scale {self.scale}: must be positive (0 for top-k)")
        if self.shared:
            if layers is not None and len(self.shared) != layers:
                raise SurgeryError(f"config.json: attention.shared has {len(self.shared)} entries for {layers} layers")
            for row in self.shared:
                if len(row) != self.shared_heads or len(set(row)) != len(row) or \
                        any(not isinstance(h, int) or not 0 <= h < self.heads for h in row):
                    raise SurgeryError(f"config.json: attention.shared row {row!r} is not {self.shared_heads} "
                                       f"distinct heads of {self.heads}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["active_heads"] = self.active_heads
        d["active_head_fraction"] = round(self.active_fraction, 6)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "HeadConfig":
        try:
            cfg = cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})
        except TypeError as e:
            raise SurgeryError(f"config.json: malformed 'surgery.attention' block ({e})") from None
        cfg.validate()
        return cfg
