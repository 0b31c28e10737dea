"""Evaluate: end-to-end tokens/s of a dense and a converted model on the same runtime.

Prefill: forward passes over batch x sequence tokens. Long-context prefill (`prefill_ctx`, batch 1): the
whole model, and its attention modules alone ("attention" rows: every layer's self_attn fed the hidden
states the dense model gives it, the same inputs for dense and converted, so the attention cost is measured
without the FFN's and the routing sees real activations). Decode: greedy steps with a static KV cache, one token
per sequence per step, at several batch sizes. On CUDA the decode step is compiled with CUDA graphs
(torch.compile mode="reduce-overhead") for dense and converted alike, so that the comparison measures
sparsity, not Python and launch overhead (stock `generate` spends most of its time there at batch 1).
Every configuration measures the models in interleaved rounds (dense, converted, dense, converted, ...), so
that a shared machine's drifting speed does not land on one side; each row keeps its rounds' tokens/s and
converted rows both speed-ups: speedup_vs_dense (ratio of the medians) and speedup_paired (median of the
rounds' ratios, the one that cancels drift).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch


@dataclass
class ThroughputConfig:
    prefill: list[tuple[int, int]] = field(default_factory=lambda: [(1, 512), (8, 512)])  # (batch, sequence)
    decode_batches: list[int] = field(default_factory=lambda: [1, 8, 64])
    prompt_len: int = 32
    new_tokens: int = 32
    warmup: int = 2
    repeats: int = 3
    prefill_ctx: list[int] = field(default_factory=list)  # batch-1 contexts: attention alone and whole model
    runtime: str = "auto"  # "auto": graphs on CUDA, eager elsewhere; "eager"; "graphs"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(run, device, cfg: ThroughputConfig) -> list[float]:
    """Seconds of each of cfg.repeats calls of run(), after cfg.warmup untimed ones (interleaved_rounds of one)."""
    return interleaved_rounds({"": run}, lambda r: _seconds(r, device), device, cfg.warmup, cfg.repeats)[""]


def interleaved_rounds(models: dict, run, device, warmup: int, repeats: int) -> dict[str, list[float]]:
    """{name: [run(model) for each repeat]} with the models interleaved: `warmup` untimed calls of each, then
    `repeats` rounds in which every model runs once in turn. A shared machine's speed drifts by 10-20% within
    minutes; measured in turn, a drift slows every side alike instead of whichever model ran later."""
    for model in models.values():
        for _ in range(warmup):
            run(model)
    _sync(device)
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(repeats):
        for name, model in models.items():
            times[name].append(run(model))
    return times


def paired_speedup(converted: list[float], dense: list[float]) -> float:
    """Median over rounds of converted / dense tokens/s measured in the same round: with interleaved rounds
    (interleaved_rounds) the ratio within a round cancels the machine's drift, which the ratio of the two medians
    (speedup_vs_dense) does not when the drift is large."""
    return round(_median([c / d for c, d in zip(converted, dense)]), 3)


def _seconds(call, device) -> float:
    t0 = time.perf_counter()
    call()
    _sync(device)
    return time.perf_counter() - t0


def _median(times: list[float]) -> float:
    return sorted(times)[len(times) // 2]


def _prefill(model, ids) -> None:
    """One prefill forward, without a cache, computing only the last position's logits."""
    model(input_ids=ids, use_cache=False, logits_to_keep=1)


def _uses_graphs(runtime: str, device: torch.device) -> bool:
    return runtime == "graphs" or (runtime == "auto" and device.type == "cuda")


def _prefill_ids(model, batch: int, seq: int, seed: int = 0):
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(seed)  # the same tokens for dense and converted
    return torch.randint(0, model.config.vocab_size, (batch, seq), generator=g).to(device)


@torch.no_grad()
def prefill_rounds(models: dict, batch: int, seq: int, cfg: ThroughputConfig) -> dict[str, list[float]]:
    """{name: seconds of each round} for a batch x seq prefill of every model in `models` ({name: model}, the
    first one's vocabulary and device giving the tokens, the same for all), in interleaved rounds."""
    first = next(iter(models.values()))
    ids = _prefill_ids(first, batch, seq)
    return interleaved_rounds(models, lambda m: _seconds(lambda: _prefill(m, ids), ids.device), ids.device,
                              cfg.warmup, cfg.repeats)


def prefill_tokens_per_second(models: dict, batch: int, seq: int, cfg: ThroughputConfig) -> dict[str, float]:
    """{name: median tokens/s} of prefill_rounds."""
    return {name: batch * seq / _median(t) for name, t in prefill_rounds(models, batch, seq, cfg).items()}


@torch.no_grad()
def attention_inputs(dense, seq: int) -> list[dict]:
    """Per layer, the keyword inputs the dense model's self_attn gets in a batch-1 prefill of `seq` tokens:
    hidden_states [1, seq, D] and position_embeddings, with no mask (causal) and no cache."""
    ids = _prefill_ids(dense, 1, seq)
    layers = dense.model.layers
    got: list[dict] = [{} for _ in layers]

    def grab(i):
        def hook(module, args, kwargs):
            x = kwargs.get("hidden_states", args[0] if args else None)
            pe = kwargs.get("position_embeddings", args[1] if len(args) > 1 else None)
            got[i].update(hidden_states=x, position_embeddings=pe)
        return hook

    handles = [layer.self_attn.register_forward_pre_hook(grab(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        dense(input_ids=ids, use_cache=False, logits_to_keep=1)
    finally:
        for h in handles:
            h.remove()
    return got


def attention_pass(model, inputs: list[dict]) -> None:
    """Every layer's attention module once, each fed its recorded inputs (the layers run one after another, as
    in a forward pass, but on the same inputs whatever the model)."""
    for layer, kw in zip(model.model.layers, inputs):
        layer.self_attn(hidden_states=kw["hidden_states"], position_embeddings=kw["position_embeddings"],
                        attention_mask=None)


@torch.no_grad()
def attention_times(model, inputs: list[dict], cfg: ThroughputConfig) -> list[float]:
    """Seconds of each of cfg.repeats attention passes (attention_pass) after cfg.warmup untimed ones."""
    return _timed(lambda: attention_pass(model, inputs), inputs[0]["hidden_states"].device, cfg)


def _row(name: str, phase: str, seq: int, times: list[float]) -> dict:
    return {"model": name, "phase": phase, "batch": 1, "seq": seq, "tokens_per_second": round(seq / _median(times), 2),
            "median_seconds": round(_median(times), 6), "seconds": [round(t, 6) for t in times],
            "rounds": [round(seq / t, 2) for t in times]}


@torch.no_grad()
def long_prefill_rows(models: dict, cfg: ThroughputConfig) -> list[dict]:
    """For each context in cfg.prefill_ctx: attention alone (inputs from the first model, the dense one) and
    the whole-model prefill, for every model in `models` ({name: model}), in interleaved rounds."""
    rows = []
    first = next(iter(models.values()))
    device = next(first.parameters()).device
    for seq in cfg.prefill_ctx:
        inputs = attention_inputs(first, seq)
        times = interleaved_rounds(models, lambda m: _seconds(lambda: attention_pass(m, inputs), device), device,
                                   cfg.warmup, cfg.repeats)
        rows += [_row(name, "attention", seq, t) for name, t in times.items()]
        del inputs
        rows += [_row(name, "prefill", seq, t) for name, t in prefill_rounds(models, 1, seq, cfg).items()]
    return rows


@torch.no_grad()
def greedy_decode(model, prompt: torch.Tensor, steps: int, runtime: str = "auto", warmup: int = 0):
    """Prefill `prompt` into a static KV cache, then `warmup + steps` greedy one-token decode steps.
    Returns (tokens [B, 1 + warmup + steps], seconds taken by the last `steps` steps). The warmup steps
    (compilation and CUDA-graph capture) are generated but not timed."""
    from surgery.kvcache import static_cache, with_cache

    device = prompt.device
    dtype = next(model.parameters()).dtype
    batch, prompt_len = prompt.shape
    graphs = _uses_graphs(runtime, device)

    def step(tok, pos, cache):
        return model(input_ids=tok, cache_position=pos, use_cache=True, **with_cache(model, cache)).logits[:, -1]

    run_step = torch.compile(step, mode="reduce-overhead", dynamic=False) if graphs else step
    cache = static_cache(model, batch, prompt_len + 1 + warmup + steps, device, dtype)
    logits = model(input_ids=prompt, cache_position=torch.arange(prompt_len, device=device), use_cache=True,
                   **with_cache(model, cache)).logits[:, -1]
    out = [logits.argmax(-1, keepdim=True)]
    t0 = time.perf_counter()
    for i in range(warmup + steps):
        if i == warmup:
            _sync(device)
            t0 = time.perf_counter()
        pos = torch.tensor([prompt_len + i], device=device)
        out.append(run_step(out[-1].clone(), pos, cache).argmax(-1, keepdim=True))
    _sync(device)
    return torch.cat(out, dim=1), time.perf_counter() - t0


@torch.no_grad()
def compare(dense, converted, cfg: ThroughputConfig, label: str, others: dict | None = None) -> dict:
    """Dense and converted on the same runtime; adds converted/dense speed-up per configuration. `others`
    ({name: model}) are measured the same way and get a speed-up against dense too (e.g. stock transformers'
    Mixtral of the converted model's shape). Each configuration measures every model in interleaved rounds
    (`interleaved_rounds`; decode with CUDA graphs once per model, since each call compiles)."""
    models = {"dense": dense, "converted": converted, **(others or {})}
    device = next(converted.parameters()).device
    graphs = _uses_graphs(cfg.runtime, device)
    rows = []
    for batch, seq in cfg.prefill:
        times = prefill_rounds(models, batch, seq, cfg)  # the same tokens for every model
        rows += [{"model": name, "phase": "prefill", "batch": batch, "seq": seq,
                  "tokens_per_second": round(batch * seq / _median(t), 2),
                  "rounds": [round(batch * seq / x, 2) for x in t]} for name, t in times.items()]
    for batch in cfg.decode_batches:
        g = torch.Generator().manual_seed(batch)
        prompt = torch.randint(0, dense.config.vocab_size, (batch, cfg.prompt_len), generator=g).to(device)
        times = interleaved_rounds(models, lambda m: greedy_decode(m, prompt, cfg.new_tokens, cfg.runtime,
                                                                   warmup=cfg.warmup)[1],
                                   device, 0, 1 if graphs else cfg.repeats)
        rows += [{"model": name, "phase": "decode", "batch": batch, "seq": cfg.prompt_len + cfg.new_tokens,
                  "tokens_per_second": round(batch * cfg.new_tokens / _median(t), 2),
                  "rounds": [round(batch * cfg.new_tokens / x, 2) for x in t]} for name, t in times.items()]
    rows += long_prefill_rows(models, cfg)
    by_key = {(r["phase"], r["batch"], r["seq"]): r for r in rows if r["model"] == "dense"}
    for r in rows:
        if r["model"] != "dense":
            d = by_key[(r["phase"], r["batch"], r["seq"])]
            r["speedup_vs_dense"] = round(r["tokens_per_second"] / d["tokens_per_second"], 3)
            r["speedup_paired"] = paired_speedup(r["rounds"], d["rounds"])
    moe = getattr(converted, "surgery_config", None)
    return {
        "label": label,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "machine": machine(),
        "path": "triton kernels" if device.type == "cuda" else "PyTorch CPU inference path (kernels/cpu_moe.py)",
        "dtype": str(next(converted.parameters()).dtype).removeprefix("torch."),
        "active_ffn_fraction": round(moe.active_ffn_fraction, 4) if moe else None,
        "attention": _attention_summary(converted),
        "config": asdict(cfg),
        "versions": versions(),
        "rows": rows,
    }


def _attention_summary(model) -> dict | None:
    """The converted model's head experts (None without them) and the sparse path that ran."""
    from surgery.attention import head_expert_modules

    mods = head_expert_modules(model)
    if not mods:
        return None
    m = mods[0]
    return {"heads": m.heads, "kv_heads": m.kv_heads, "shared_heads": len(m.shared), "top_k": m.top_k,
            "active_head_fraction": round((len(m.shared) + m.top_k) / m.heads, 4), "router": m.router_kind,
            "path": "triton pair attention (kernels/head_attention.py)" if _kernel_runs(model)
            else "PyTorch sparse path (surgery/attention/sparse.py)"}


def _kernel_runs(model) -> bool:
    from surgery_kernels.ops import triton_available

    return next(model.parameters()).is_cuda and triton_available()


def versions() -> dict:
    import platform

    import transformers

    out = {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
           "cuda": torch.version.cuda}
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = None
    return out


def machine() -> dict:
    """What the figures were measured on: processor (and GPU), cores, torch threads."""
    import os
    import platform

    cpu = platform.processor() or platform.machine()
    flags = set()
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name") and cpu in ("", platform.machine()):
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    out = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
           "simd": [f for f in ("avx2", "avx512f", "amx_tile") if f in flags]}
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(0)
    return out


def stock_mixtral_like(converted_config, experts: int, top_k: int):
    """transformers' own MixtralConfig with the shape of a model converted from `converted_config` (a Llama
    config) into `experts` equal experts, `top_k` active: stock transformers' MoE, for comparison."""
    from transformers import MixtralConfig

    c = converted_config
    return MixtralConfig(hidden_size=c.hidden_size, intermediate_size=c.intermediate_size // experts,
                         num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
                         num_key_value_heads=c.num_key_value_heads, vocab_size=c.vocab_size,
                         max_position_embeddings=c.max_position_embeddings, num_local_experts=experts,
                         num_experts_per_tok=top_k, tie_word_embeddings=c.tie_word_embeddings)


def llama32_1b_config(layers: int | None = None):
    """Llama-3.2-1B's shape: 32 query heads on 8 key/value heads of 64 dims (the issue's grouped-query case)."""
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=layers or 16,
                       num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256,
                       max_position_embeddings=8192, rope_theta=500000.0, tie_word_embeddings=True)


SYNTHETIC = {"llama2-7b": lambda layers: llama2_7b_config(layers), "llama3.2-1b": lambda layers: llama32_1b_config(layers)}


def llama2_7b_config(layers: int | None = None):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers or 32,
                       num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                       max_position_embeddings=4096, tie_word_embeddings=False)


def random_dense_model(config, device, dtype):
    """A random-weight model built directly on the device (no checkpoint on disk)."""
    from transformers import AutoModelForCausalLM

    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config).to(dtype)
    return model.eval()
