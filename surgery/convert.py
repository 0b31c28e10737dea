"""Convert: stream a dense checkpoint layer by layer into the native MoE format.

Only one layer's FFN (and the expert tensors made from it) is in memory at a time: the output header is
planned from shapes alone, then tensors are written in order as they are produced.
"""

from __future__ import annotations

import json
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

import surgery
from surgery.attention import convert as head_convert
from surgery.atomic import atomic_dir
from surgery.budgets import candidate_ks, get_budget, layer_errors
from surgery.checkpoint import TensorSource, ffn_names, file_hash, open_source
from surgery.cluster import FFNWeights, balanced_sizes, check_partition, get_method
from surgery.config import MoEConfig
from surgery.errors import SurgeryError
from surgery.factorize import permutation, split_ffn
from surgery.modeling import copy_tokenizer_files, moe_tensor_names, parse_dtype, set_layer_routing
from surgery.router import ROUTER_INITS, RoutingConfig
from surgery.safetensors_io import ShardedWriter, TensorSpec, parse_size


@dataclass
class ConvertConfig:
    experts: int
    top_k: int
    shared_experts: int = 0
    method: str = "random"
    seed: int = 0
    router_init: str = "centroid"
    router_steps: int = 300  # `fitted` router: optimisation steps per layer on the profiled inputs
    score_func: str = "softmax"
    renormalize: bool = True
    scale: float | None = None  # None: top_k (selected experts keep their dense weight on average)
    dtype: str | None = None  # None: keep the checkpoint's dtype
    max_shard_size: str = "5GB"
    # How many experts each layer routes to at the same mean top_k (surgery/budgets.py): uniform, or
    # sensitivity (more experts where the profiled routing error drops most; needs stats)
    layer_budgets: str = "uniform"
    stats: dict = field(default_factory=dict, repr=False)  # per-layer profiling statistics, for data methods
    # Attention heads as experts (surgery/attention/): S shared heads, top-K of the others per token, router
    # qnorm or learned; head_stats (per-layer HeadStats from `surgery profile --heads`) choose the shared heads
    # and fit the learned router. attention_top_k None: 75% of the heads active.
    attention_experts: bool = False
    attention_top_k: int | None = None
    shared_heads: int = 0
    head_router: str = "qnorm"
    attention_fn: str = "softmax"  # or "stick-breaking" (surgery/attention/stick_breaking.py)
    head_stats: dict = field(default_factory=dict, repr=False)

    def routing(self) -> RoutingConfig:
        scale = float(self.top_k) if self.scale is None else float(self.scale)
        return RoutingConfig(self.top_k, self.score_func, self.renormalize, scale)

    def plan_heads(self, base: dict):
        """The HeadConfig of this conversion (None without --attention-experts); raises on bad head flags."""
        if not self.attention_experts:
            return None
        return head_convert.plan_heads(base, self.attention_top_k, self.shared_heads, self.head_router,
                                       self.head_stats, self.attention_fn)

    def validate(self, width: int) -> None:
        if self.experts < 1:
            raise SurgeryError(f"--experts {self.experts}: must be at least 1")
        if self.shared_experts < 0:
            raise SurgeryError(f"--shared-experts {self.shared_experts}: must be 0 or more")
        self.routing().validate(self.experts)
        groups = self.experts + self.shared_experts
        if groups > width:
            raise SurgeryError(f"--experts {self.experts} + --shared-experts {self.shared_experts} = {groups} "
                               f"exceeds the FFN width {width}: every expert needs at least one neuron")
        get_method(self.method)
        if self.router_init not in ROUTER_INITS:
            raise SurgeryError(f"--router-init {self.router_init!r}: choose from {', '.join(ROUTER_INITS)}")
        if getattr(get_budget(self.layer_budgets), "data_aware", False) and not self.stats:
            raise SurgeryError(f"--layer-budgets {self.layer_budgets} needs profiling statistics (give --profile PATH)")
        parse_size(self.max_shard_size)


def plan_moe_config(cfg: ConvertConfig, width: int) -> tuple[MoEConfig, list[int]]:
    """Group sizes (shared groups first) and the MoEConfig they imply. Unequal widths are allowed: when E+S
    does not divide the FFN width, sizes differ by one and narrower experts are zero-padded."""
    sizes = balanced_sizes(width, cfg.experts + cfg.shared_experts)
    # Larger groups first, so shared groups (first) are never the narrow ones.
    moe = MoEConfig(num_experts=cfg.experts, routing=cfg.routing(), expert_sizes=sizes[cfg.shared_experts:],
                    shared_experts=cfg.shared_experts, shared_width=sum(sizes[:cfg.shared_experts]),
                    method=cfg.method, seed=cfg.seed, router_init=cfg.router_init, version=surgery.__version__)
    return moe, sizes


def convert_layer(ffn: FFNWeights, cfg: ConvertConfig, sizes: list[int], layer: int, moe: MoEConfig):
    """One FFN -> (tensors in moe_tensor_names order, permutation, {k: error} for a data-aware layer budget
    rule or None)."""
    method = get_method(cfg.method)
    groups = method(ffn, sizes, seed=cfg.seed * 100_003 + layer, stats=cfg.stats.get(layer), shared=cfg.shared_experts)
    check_partition(groups, sizes, ffn.width)
    parts = split_ffn(ffn, groups, cfg.shared_experts, moe.expert_width)
    init = ROUTER_INITS[cfg.router_init]
    if getattr(init, "data_aware", False):  # fitted on profiled inputs
        router = init(ffn, groups, cfg.shared_experts, cfg.stats.get(layer), moe.routing, seed=cfg.seed + layer,
                      steps=cfg.router_steps)
    else:
        router = init(ffn.gate, groups[cfg.shared_experts:])
    router = router.to(ffn.gate.dtype)
    errors = None
    if getattr(get_budget(cfg.layer_budgets), "data_aware", False):  # the router as it will be written
        errors = layer_errors(ffn, groups, cfg.shared_experts, cfg.stats.get(layer), router, moe.routing,
                              candidate_ks(cfg.top_k, cfg.experts))
    tensors = [router, parts["gate"], parts["up"], parts["down"]]
    if cfg.shared_experts:
        tensors += [parts["shared_gate"], parts["shared_up"], parts["shared_down"]]
    return tensors, permutation(groups), errors


def allocate_budgets(cfg: ConvertConfig, moe: MoEConfig, errors: list) -> None:
    """Set moe.layer_top_k by the configured rule, once every layer's errors are known."""
    moe.layer_top_k = get_budget(cfg.layer_budgets)(errors, len(errors), cfg.top_k, cfg.experts)


def convert(src, out, cfg: ConvertConfig, overwrite: bool = False, progress: bool = True) -> dict:
    """Convert `src` (folder or .gguf) into a native MoE folder at `out`. Returns a summary dict."""
    t0 = time.time()
    src, out = Path(src), Path(out)
    source, gguf_tokenizer = open_source(src)
    base = source.config
    width, layers = base["intermediate_size"], base["num_hidden_layers"]
    cfg.validate(width)
    heads = cfg.plan_heads(base)
    dtype = parse_dtype(cfg.dtype) or source.dtype
    moe, sizes = plan_moe_config(cfg, width)
    moe.source = str(src)
    moe.source_hash = file_hash([src] if src.is_file() else source.files + [src / "config.json"])

    specs, producers = _plan(source, moe, dtype)
    head_makers = {}
    if heads is not None:
        moe.attention = heads.to_dict()
        specs += head_convert.head_specs(heads, layers, base["hidden_size"], dtype)
        head_makers = head_convert.head_makers(heads, layers, base["hidden_size"], cfg.head_stats)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        writer = ShardedWriter(tmp, specs, parse_size(cfg.max_shard_size))
        moe.permutations = [[] for _ in range(layers)]
        errors = [None] * layers
        pending: dict[str, torch.Tensor] = {}
        bar = tqdm(total=layers, desc="converting layers", unit="layer", disable=not progress)
        for spec in writer.order:
            layer = producers.get(spec.name)
            if spec.name in head_makers:
                t = head_makers.pop(spec.name)()
            elif layer is None:
                t = source.get(spec.name)
            else:
                if spec.name not in pending:
                    names = ffn_names(layer)
                    ffn = FFNWeights(*(source.get(names[p]) for p in ("gate_proj", "up_proj", "down_proj")))
                    tensors, perm, errors[layer] = convert_layer(ffn, cfg, sizes, layer, moe)
                    del ffn  # the dense FFN is no longer needed: keep one layer in memory, not two
                    moe.permutations[layer] = perm
                    pending = dict(zip(moe_tensor_names(layer, bool(cfg.shared_experts)), tensors))
                    bar.update(1)
                t = pending.pop(spec.name)
            writer.write(spec.name, t.to(dtype) if t.is_floating_point() else t)
            del t
        bar.close()
        writer.close()
        allocate_budgets(cfg, moe, errors)  # only the config depends on it: the tensors are the same
        config = dict(base)
        config["dtype"] = str(dtype).removeprefix("torch.")
        config.pop("quantization_config", None)
        config.pop("torch_dtype", None)
        config["surgery"] = moe.to_dict()
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if gguf_tokenizer is not None:
            gguf_tokenizer.save_pretrained(str(tmp))
        else:
            copy_tokenizer_files(src, tmp)
    return {
        "output": str(out),
        "source": str(src),
        "experts": cfg.experts,
        "top_k": cfg.top_k,
        "shared_experts": cfg.shared_experts,
        "method": cfg.method,
        "expert_sizes": moe.expert_sizes,
        "active_ffn_fraction": round(moe.active_ffn_fraction, 6),
        "max_active_ffn_fraction": round(moe.max_active_ffn_fraction, 6),
        **({"layer_top_k": moe.layer_top_k} if moe.layer_top_k else {}),
        **(head_convert.summary(heads) if heads is not None else {}),
        "checkpoint_bytes": source.total_bytes(),
        "output_bytes": writer.total_bytes,
        "shards": len(writer.names),
        "seconds": round(time.time() - t0, 2),
        "peak_rss_bytes": peak_rss_bytes(),
    }


def _plan(source: TensorSource, moe: MoEConfig, dtype: torch.dtype):
    """Output tensor specs in writing order, and which of them come from which layer's FFN."""
    cfg = source.config
    D = cfg["hidden_size"]
    E, F, S = moe.num_experts, moe.expert_width, moe.shared_width
    tied = cfg.get("tie_word_embeddings", False)
    ffn_to_layer = {}
    for layer in range(cfg["num_hidden_layers"]):
        for name in ffn_names(layer).values():
            ffn_to_layer[name] = layer
    specs, producers = [], {}
    for name in source.keys():
        if tied and name == "lm_head.weight":
            continue
        info = source.infos[name]
        layer = ffn_to_layer.get(name)
        if layer is None:
            specs.append(TensorSpec(name, info.shape, dtype if info.dtype.is_floating_point else info.dtype))
        elif name.endswith("gate_proj.weight"):
            shapes = [(E, D), (E, F, D), (E, F, D), (E, D, F)] + ([(S, D), (S, D), (D, S)] if S else [])
            for n, shape in zip(moe_tensor_names(layer, bool(S)), shapes):
                specs.append(TensorSpec(n, shape, dtype))
                producers[n] = layer
    return specs, producers


def peak_rss_bytes() -> int:
    """This process's peak resident memory. VmHWM belongs to the current program image; ru_maxrss is
    inherited across fork+exec from a bigger parent (a test runner, say), so it is only the fallback."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def moe_block(tensors: list, moe: MoEConfig, hidden: int, like: torch.Tensor):
    """A MoEBlock (dtype and device of `like`) holding convert_layer's tensors."""
    from surgery.moe import MoEBlock

    new = MoEBlock(hidden, moe.num_experts, moe.expert_width, moe.shared_width, moe.routing,
                   dtype=like.dtype, device=like.device)
    params = [new.router.weight, new.experts.gate_proj, new.experts.up_proj, new.experts.down_proj]
    if moe.shared_width:
        params += list(new.shared_expert.weights())
    with torch.no_grad():
        for p, t in zip(params, tensors):
            p.copy_(t)
    return new


def convert_model(dense, cfg: ConvertConfig, progress: bool = False):
    """Convert a dense model already in memory (any device), in place: each layer's `mlp` becomes a MoEBlock.
    Used for benchmarks on synthetic models and by tests; `convert` is the streaming path for checkpoints."""
    config = dense.config
    width = config.intermediate_size
    cfg.validate(width)
    heads = cfg.plan_heads(config.to_dict())
    moe, sizes = plan_moe_config(cfg, width)
    moe.permutations = []
    errors = []
    for layer, block in enumerate(tqdm(dense.model.layers, desc="converting layers", disable=not progress)):
        mlp = block.mlp
        ffn = FFNWeights(mlp.gate_proj.weight.data, mlp.up_proj.weight.data, mlp.down_proj.weight.data)
        tensors, perm, err = convert_layer(ffn, cfg, sizes, layer, moe)
        errors.append(err)
        block.mlp = moe_block(tensors, moe, config.hidden_size, mlp.gate_proj.weight)
        moe.permutations.append(perm)
        del ffn, tensors, mlp
    allocate_budgets(cfg, moe, errors)
    set_layer_routing(dense, moe)
    if heads is not None:
        head_convert.convert_heads(dense, heads, cfg.head_stats)
        moe.attention = heads.to_dict()
    dense.surgery_config = moe
    return dense
