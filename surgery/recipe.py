"""Recipes: one YAML file runs the whole pipeline, resumably.

    source -> profile -> convert (cluster + factorize + route) -> layerwise -> e2e -> evaluate

A recipe is the library's own dataclasses in YAML (ProfileConfig, ConvertConfig, CalibrateConfig's two
stages) plus an `evaluate` block. `surgery run RECIPE --out DIR` writes
    DIR/profile.pt            profiling statistics
    DIR/stages/<stage>/       the model after each stage but the last
    DIR/model/                the final model (native format)
    DIR/report.json           dense and converted perplexities, active FFN fraction, per-layer expert load,
                              tokens and seconds per stage, machine
    DIR/expert_load.png, DIR/perplexity_vs_active.png
    DIR/state.json            which stages are done (a rerun skips them: resumable)

A recipe's time_budget_s is kept on any machine: the end-to-end stage gets what profiling, conversion and the
layer-wise stage left of it and plans its steps from their measured time (a slower CPU calibrates on fewer
tokens); the report's "time_budget" says whether the pipeline kept it and what the plan cut.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from surgery.atomic import atomic_file, atomic_write_text
from surgery.data import sampled_tokens, sampling_spec
from surgery.errors import SurgeryError

EVAL_DATA = {"wikitext": "wikitext-test", "stdlib": "stdlib"}


@dataclass
class EvaluateConfig:
    ctx: int = 1024
    batch_size: int = 1
    # dataset name -> max tokens; names: wikitext (WikiText-2 test), stdlib (Python stdlib source), or paths
    datasets: dict = field(default_factory=lambda: {"wikitext": 40960, "stdlib": 40960})
    stages: list = field(default_factory=lambda: ["final"])  # also "converted", "layerwise" for the table
    intermediate_datasets: list | None = None  # datasets for stages before the final one (None: all of them)
    load_tokens: int = 0  # 0: count expert load during the first dataset's evaluation
    # Evaluate the e2e stage's snapshots (e2e.snapshots) on the first dataset: perplexity against
    # calibration time from one run.
    snapshots: bool = True
    # Also build static structured pruning at the converted model's active FFN fraction (one fixed neuron subset
    # per layer, chosen from the same profile, bias-compensated), distil it with the recipe's end-to-end
    # budget on the same calibration text, and evaluate it on the same datasets: the report then shows
    # the baseline a conversion has to beat (issue: "a MoE that does not beat static pruning at equal active
    # width and equal budget has no reason to exist") beside the converted model.
    static_baseline: bool = False
    # Also evaluate gate-decided activation sparsity (TEAL / CATS style, no training) at the same fraction of
    # FFN neurons: per token the neurons with the largest |silu(gate x)| x ||down column||, the gate computed
    # densely (so 2/3 + keep/3 of the FFN's matmuls). The training-free alternative a user might pick instead.
    activation_sparsity: bool = False


def _wants_head_stats(convert: dict) -> bool:
    """Head experts whose shared heads or learned router come from profiled head statistics."""
    return bool(convert.get("attention_experts")) and (convert.get("head_router", "qnorm") == "learned"
                                                       or convert.get("shared_heads", 0) > 0)


@dataclass
class Recipe:
    name: str
    source: str  # a dense folder / .gguf, or "demo" (SmolLM2-135M-Instruct, built once and cached)
    seed: int = 0
    device: str = "auto"
    dtype: str = "float32"
    profile: dict = field(default_factory=dict)  # ProfileConfig fields + data
    convert: dict = field(default_factory=dict)  # ConvertConfig fields
    layerwise: dict | None = None  # LayerwiseConfig fields, or null to skip
    e2e: dict | None = None  # EndToEndConfig fields, or null to skip
    # layerwise/e2e: path, "sample", "mix" (half each), "prompted", "mix-prompted[:categories]"
    # (data.sampling_spec), default WikiText-2 valid
    calibration_data: str | None = None
    evaluate: dict = field(default_factory=dict)
    # The pipeline's budget in seconds, profile to end-to-end (evaluation, baselines and export excluded): the
    # end-to-end stage plans its steps to end within what the earlier stages left (EndToEndConfig.time_limit_s),
    # so a slower machine calibrates on fewer tokens rather than for longer. `surgery run --no-time-budget`
    # runs every e2e token whatever the time. null: no budget.
    time_budget_s: float | None = None
    export: list = field(default_factory=list)  # formats written to DIR/export-<format>/ (native, mixtral, ...)

    @classmethod
    def load(cls, path) -> "Recipe":
        import yaml

        p = Path(path)
        if not p.is_file():
            raise SurgeryError(f"{p}: no such recipe file")
        try:
            d = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            raise SurgeryError(f"{p}: not valid YAML ({e})") from None
        if not isinstance(d, dict):
            raise SurgeryError(f"{p}: a recipe is a YAML mapping")
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise SurgeryError(f"{p}: unknown recipe keys {sorted(unknown)}")
        try:
            r = cls(**d)
        except TypeError as e:
            raise SurgeryError(f"{p}: {e}") from None
        r.check()
        return r

    def check(self) -> None:
        from surgery.calibrate import EndToEndConfig, LayerwiseConfig
        from surgery.convert import ConvertConfig
        from surgery.profile import ProfileConfig

        try:
            ProfileConfig(**{k: v for k, v in self.profile.items() if k != "data"})
            ConvertConfig(**self.convert)
            if self.layerwise is not None:
                LayerwiseConfig(**self.layerwise)
            if self.e2e is not None:
                EndToEndConfig(**self.e2e)
            ec = EvaluateConfig(**self.evaluate)
            from surgery.export import FORMATS
            bad = [f for f in self.export if f not in FORMATS]
            if bad:
                raise SurgeryError(f"recipe {self.name!r}: export names {bad}; choose from {', '.join(FORMATS)}")
        except TypeError as e:
            raise SurgeryError(f"recipe {self.name!r}: {e}") from None
        for where, data in (("calibration_data", self.calibration_data), ("profile.data", self.profile.get("data"))):
            try:
                sampling_spec(data)  # an unknown prompt category fails here, not after the first stages
            except SurgeryError as e:
                raise SurgeryError(f"recipe {self.name!r}: {where}: {e}") from None
        extra = set(ec.intermediate_datasets or []) - set(ec.datasets)
        if extra:
            raise SurgeryError(f"recipe {self.name!r}: evaluate.intermediate_datasets names {sorted(extra)}, "
                               f"which evaluate.datasets does not list")

    def stages(self) -> list[str]:
        return ["profile", "convert"] + (["layerwise"] if self.layerwise is not None else []) + \
            (["e2e"] if self.e2e is not None else []) + ["evaluate"] + (["export"] if self.export else [])


def _device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def _source_path(recipe: Recipe) -> Path:
    if recipe.source == "demo":
        from surgery.demo import build_demo_model, cache_dir

        return Path(build_demo_model(cache_dir() / f"demo-smollm2-{recipe.dtype}", recipe.dtype, progress=False))
    return Path(recipe.source)


class _State:
    def __init__(self, out: Path):
        self.path = out / "state.json"
        self.data = json.loads(self.path.read_text()) if self.path.is_file() else {"stages": {}}

    def done(self, stage: str) -> dict | None:
        return self.data["stages"].get(stage)

    def mark(self, stage: str, info: dict) -> None:
        self.data["stages"][stage] = info
        self.save()

    def save(self) -> None:
        atomic_write_text(self.path, json.dumps(self.data, indent=2) + "\n")


def _sampling_needs(recipe: Recipe) -> list[tuple[int, list[str] | None]]:
    """(sampled tokens, seed prompts or None) of each stage that reads text sampled from the dense model: the
    profile on its own data, the calibration stages on calibration_data."""
    from surgery.calibrate import EndToEndConfig, LayerwiseConfig
    from surgery.profile import ProfileConfig

    pcfg = {k: v for k, v in recipe.profile.items() if k != "data"}
    reads = [(ProfileConfig(**pcfg).tokens, recipe.profile.get("data"))]
    if recipe.layerwise is not None:
        reads.append((LayerwiseConfig(**recipe.layerwise).tokens, recipe.calibration_data))
    if recipe.e2e is not None:
        reads.append((EndToEndConfig(**recipe.e2e).tokens, recipe.calibration_data))
    specs = [(n, sampling_spec(d)) for n, d in reads]
    return [(sampled_tokens(n, spec[0]), spec[1]) for n, spec in specs if spec is not None]


def _without_baselines(recipe: dict) -> dict:
    """The recipe less its baseline switches: switching one on for a finished run adds that baseline to the
    report and leaves the trained stages and their evaluations standing."""
    ev = {k: v for k, v in (recipe.get("evaluate") or {}).items() if k not in ("static_baseline", "activation_sparsity")}
    return {**recipe, "evaluate": ev}


# Seconds of the budget kept back from the end-to-end stage's loop for what the stage does around it (loading
# the student, saving the model).
BUDGET_RESERVE_S = 15.0
# Under a kept budget, the share of what is left that text sampled from the dense model may take (the 50%
# recipe's `mix-prompted` corpus, sized for every e2e token, is 126,976 sampled tokens: ~6.7 of its 30 minutes
# on a 2-core Xeon without AMX, for an e2e stage that then has time for under half of them). Each calibration
# token of a mix costs 1/(2s) seconds of sampling and 1/e of training, so the split that trains on every token
# drawn samples e/(e + 2s) of the time: ~14% on that Xeon (e2e e ~106 tokens/s, sampler s ~315 at batch 128),
# ~26% on the Xeon with AMX (e ~260, bf16 sampler ~375); 20% between the two.
SAMPLE_SHARE = 0.2


def _budget_left(recipe: Recipe, state: "_State") -> float | None:
    """Seconds of the recipe's budget that the finished stages left, less the reserve (None: no budget). The
    end-to-end loop's time limit; text sampled before it may take SAMPLE_SHARE of it."""
    if recipe.time_budget_s is None:
        return None
    spent = sum(state.data["stages"].get(k, {}).get("seconds", 0) for k in ("profile", "convert", "layerwise"))
    return max(0.0, recipe.time_budget_s - spent - BUDGET_RESERVE_S)


def run_recipe(recipe: Recipe, out, progress: bool = True, recipe_path: str | None = None,
               time_budget: bool = True) -> dict:
    """Run (or resume) `recipe` into `out`. time_budget False: the end-to-end stage runs all its tokens
    whatever recipe.time_budget_s says."""
    from surgery.calibrate import (CalibrateConfig, EndToEndConfig, LayerwiseConfig, calibrate)
    from surgery.convert import ConvertConfig, convert
    from surgery.modeling import load_model, load_tokenizer, save_converted
    from surgery.profile import ProfileConfig, calibration_ids, load_profile, profile_model, save_profile

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = _State(out)
    prev_recipe = state.data.get("recipe")
    if prev_recipe is not None and _without_baselines(prev_recipe) != _without_baselines(asdict(recipe)):
        raise SurgeryError(f"{out}: was started with a different recipe; use a fresh --out or delete {out}")
    state.data["recipe"] = asdict(recipe)
    device = _device(recipe.device)
    torch.manual_seed(recipe.seed)
    src = _source_path(recipe)
    stages = recipe.stages()
    model_stages = [s for s in stages if s in ("convert", "layerwise", "e2e")]

    def stage_dir(s):
        return out / "model" if s == model_stages[-1] else out / "stages" / s

    tokenizer = load_tokenizer(src)
    dense = None

    def get_dense():
        nonlocal dense
        if dense is None:
            dense = load_model(src, dtype=recipe.dtype, device=device)
        return dense

    def sampled(tokens: int, data: str = "sample") -> torch.Tensor:
        """Text sampled from the dense model (data: sample, prompted), drawn once for every stage and kept in
        the run folder: the stages then share one corpus and a resumed run does not sample again. data: mix
        (mix-prompted) takes half of each stage's tokens from WikiText-2 valid and half from that corpus,
        interleaved."""
        import hashlib

        from surgery.data import interleave, resolve_data, tokenize_file
        from surgery.profile import MIX_BLOCK

        mode, prompts = sampling_spec(data)
        own = sampled_tokens(tokens, mode)
        path = out / ("sampled_corpus.pt" if prompts is None else
                      f"prompted_corpus-{hashlib.sha256(repr(prompts).encode()).hexdigest()[:8]}.pt")
        ids = torch.load(path, weights_only=True) if path.is_file() else None
        cut = state.data.get("sampling_cut", {})
        if ids is None or (ids.numel() < own and path.name not in cut):
            # draw once what every stage reading this corpus needs, and no more: a profile on `mix` beside
            # calibration on `mix-prompted` reads 8k unprompted tokens, not the calibration's 127k
            need = max([own] + [n for n, stage_prompts in _sampling_needs(recipe) if stage_prompts == prompts])
            ids = calibration_ids(tokenizer, "sample" if prompts is None else data.replace("mix-", "", 1), need,
                                  get_dense(), recipe.seed, progress, deadline=sampling_deadline())
            with atomic_file(path) as tmp:
                torch.save(ids, tmp)
            if ids.numel() < need:  # the time budget ended the draw: the corpus the run's stages read
                state.data["sampling_cut"] = {**cut, path.name: {"tokens": int(ids.numel()), "asked": need}}
                state.save()
        own = min(own, ids.numel())
        if mode == "sample":
            return ids[:own]
        return interleave(tokenize_file(tokenizer, resolve_data(None), min(tokens // 2, own)), ids[:own], MIX_BLOCK)

    def sampling_deadline() -> float | None:
        """Under a kept budget, drawing text may take SAMPLE_SHARE of what the finished stages left of it."""
        left = _budget_left(recipe, state) if time_budget else None
        return None if left is None else time.time() + SAMPLE_SHARE * left

    # 1. profile
    prof_path = out / "profile.pt"
    if not (state.done("profile") and prof_path.is_file()):
        t0 = time.time()
        pcfg = dict(recipe.profile)
        data = pcfg.pop("data", None)
        pc = ProfileConfig(seed=recipe.seed, **pcfg)
        ids = sampled(pc.tokens, data) if sampling_spec(data) is not None else \
            calibration_ids(tokenizer, data, pc.tokens, get_dense(), recipe.seed, progress)
        stats = profile_model(get_dense(), ids, pc, progress)
        save_profile(stats, prof_path, {"data": str(data or "wikitext-valid"), "config": asdict(pc)})
        if _wants_head_stats(recipe.convert):  # same text: shared heads and the learned head router
            from surgery.attention.profile import profile_heads, store_head_stats

            store_head_stats(prof_path, profile_heads(get_dense(), ids, pc.ctx, pc.samples, progress=progress))
        state.mark("profile", {"tokens": int(stats[0].tokens), "seconds": round(time.time() - t0, 2)})
    # 2. convert
    if not (state.done("convert") and stage_dir("convert").is_dir()):
        t0 = time.time()
        stats, _ = load_profile(prof_path)
        cc = ConvertConfig(**{"seed": recipe.seed, **recipe.convert})
        cc.stats = stats
        if _wants_head_stats(recipe.convert):
            from surgery.attention.profile import load_head_stats

            cc.head_stats = load_head_stats(prof_path) or {}
        summary = convert(src, stage_dir("convert"), cc, overwrite=True, progress=progress)
        state.mark("convert", {"seconds": round(time.time() - t0, 2), "tokens": 0,
                               "active_ffn_fraction": summary["active_ffn_fraction"]})
    # 3-4. calibration stages, each from the previous stage's model
    prev = "convert"
    for s in ("layerwise", "e2e"):
        if s not in stages:
            continue
        if not (state.done(s) and stage_dir(s).is_dir()):
            t0 = time.time()
            student = load_model(stage_dir(prev), device=device)
            e2e = None
            if s == "e2e":
                e2e = EndToEndConfig(**recipe.e2e)
                limit = _budget_left(recipe, state) if time_budget else None
                if limit is not None:
                    e2e.time_limit_s = limit if e2e.time_limit_s is None else min(limit, e2e.time_limit_s)
            cfg = CalibrateConfig(layerwise=LayerwiseConfig(**recipe.layerwise) if s == "layerwise" else None,
                                  e2e=e2e, seed=recipe.seed, data=recipe.calibration_data)
            ids = sampled((cfg.layerwise or cfg.e2e).tokens, recipe.calibration_data) \
                if sampling_spec(recipe.calibration_data) is not None else None
            res = calibrate(student, get_dense(), tokenizer, cfg, ckpt=out / "checkpoints" / s, resume=True,
                            progress=progress, ids=ids)
            save_converted(student, stage_dir(s), tokenizer_from=src, overwrite=True)
            tokens = res.get("layerwise", {}).get("tokens", 0) if s == "layerwise" else res["e2e"]["tokens"]
            info = {"seconds": round(time.time() - t0, 2), "tokens": tokens,
                    "corpus_tokens": res.get("calibration_tokens_available")}  # the text the stage drew from
            if s == "e2e":
                hist = res["e2e"]["history"]
                info["curve"] = _curve(hist)
                info["snapshots"] = res["e2e"].get("snapshots", [])
                if "time_limit" in res["e2e"]:
                    info["time_limit"] = res["e2e"]["time_limit"]
            else:
                info["layers"] = res.get("layerwise", {}).get("layers", [])
            state.mark(s, info)
            del student
        prev = s
    # 5. evaluate
    def e2e_ids(tokens: int):  # the calibration text the e2e stage read (None: calibrate reads the file itself)
        data = recipe.calibration_data
        return sampled(tokens, data) if sampling_spec(data) is not None else calibration_ids(tokenizer, data, tokens)

    report = _evaluate(recipe, out, src, tokenizer, get_dense, stage_dir, model_stages, state, device, progress,
                       e2e_ids)
    report["recipe_file"] = recipe_path
    if recipe.export:
        report["exports"] = _export(recipe, out, stage_dir(model_stages[-1]), state)
    atomic_write_text(out / "report.json", json.dumps(report, indent=2) + "\n")
    return report


def _export(recipe: Recipe, out: Path, model_dir: Path, state: _State) -> dict:
    """Write the final model in each requested format, reload it with the tool that consumes it (stock
    transformers for mixtral / qwen2_moe, surgery.load for native) and compare its logits with ours."""
    from surgery.export import export_model
    from surgery.modeling import load_model

    done = dict(state.data.get("exports", {}))
    for fmt in recipe.export:
        if fmt in done:
            continue
        t0 = time.time()
        dest = out / f"export-{fmt}"
        summary = export_model(model_dir, dest, fmt, overwrite=True, progress=False)
        ours = load_model(model_dir)
        if fmt == "native":
            theirs = load_model(dest)
        else:
            from transformers import AutoModelForCausalLM

            theirs = AutoModelForCausalLM.from_pretrained(str(dest), dtype=torch.float32)
        ids = torch.randint(0, ours.config.vocab_size, (1, 64), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            a = ours(input_ids=ids).logits.float()
            b = theirs(input_ids=ids).logits.float()
        done[fmt] = {"path": str(dest), "architecture": summary["architecture"],
                     "output_bytes": summary["output_bytes"], "seconds": round(time.time() - t0, 1),
                     "reloaded_by": "surgery.load" if fmt == "native" else "transformers.AutoModelForCausalLM",
                     "max_abs_logit_diff": float((a - b).abs().max()),
                     "same_argmax": bool(torch.equal(a.argmax(-1), b.argmax(-1)))}
        del ours, theirs
        state.data["exports"] = done
        state.mark("export", {"formats": sorted(done)})
    return done


def _curve(hist: list[dict], points: int = 20) -> list[dict]:
    """Smoothed KD / CE against tokens: ~`points` averages over equal slices of the run."""
    if not hist:
        return []
    n = max(1, len(hist) // points)
    out = []
    for i in range(0, len(hist), n):
        sl = hist[i:i + n]
        out.append({"tokens": sl[-1]["tokens"], "kd": round(sum(h["kd"] for h in sl) / len(sl), 5),
                    "ce": round(sum(h["ce"] for h in sl) / len(sl), 5)})
    return out


def _eval_model(folder: Path, device: str):
    """A stage's model for perplexity: on a CPU the masked path (the same function as the grouped reference,
    tested equal; evaluation is about quality, speed is measured by _prefill_speed and `surgery bench`)."""
    from surgery.modeling import load_model
    from surgery.moe import set_impl

    model = load_model(folder, device=device)
    if device == "cpu":
        set_impl(model, "masked")
    return model


def _snapshot_curve(ec: EvaluateConfig, state: _State, final_dir: Path, tokenizer, device, progress) -> list[dict]:
    """Perplexity on the first dataset of each e2e snapshot and of the final model, against the pipeline's
    seconds when it was taken (profile + convert + layer-wise + e2e so far)."""
    from surgery.data import resolve_data
    from surgery_evals.perplexity import perplexity

    stages = state.data["stages"]
    e2e = stages.get("e2e")
    if not ec.snapshots or not e2e:
        return []
    before = sum(stages.get(k, {}).get("seconds", 0) for k in ("profile", "convert", "layerwise"))
    ds, max_tokens = next(iter(ec.datasets.items()))
    points = {p["step"]: p for p in state.data.get("curve_points", [])}
    for snap in e2e.get("snapshots", []):
        if snap["step"] in points or not Path(snap["path"]).is_file():
            continue
        model = _eval_model(final_dir, device)
        model.load_state_dict(torch.load(snap["path"], map_location=device, weights_only=True), strict=False)
        r = perplexity(model, tokenizer, resolve_data(EVAL_DATA.get(ds, ds)), max_tokens, ec.ctx, ec.batch_size,
                       progress)
        points[snap["step"]] = {"step": snap["step"], "dataset": ds, "perplexity": r["perplexity"],
                                "minutes": round((before + snap["seconds"]) / 60, 2)}
        state.data["curve_points"] = list(points.values())
        state.mark("evaluate-partial", {"curve_points": len(points)})
        del model
    final = next((e for e in state.data.get("evaluations", []) if e["stage"] == "e2e" and e["dataset"] == ds), None)
    out = sorted(points.values(), key=lambda p: p["step"])
    if final:
        out.append({"step": "final", "dataset": ds, "perplexity": final["perplexity"],
                    "minutes": round((before + e2e["seconds"]) / 60, 2)})
    return out


def _prefill_speed(dense, final_dir: Path, device: str) -> dict:
    """Prefill tokens/s (1 x 512) of the dense and the converted model on this machine's real sparse path
    (the CPU inference path, kernels/cpu_moe.py, on a CPU; the Triton kernels on a GPU): a quick figure for the report's table;
    `surgery bench model` is the full benchmark. Measured in interleaved rounds, as the benchmarks are."""
    from surgery.modeling import load_model
    from surgery_evals.throughput import ThroughputConfig, prefill_tokens_per_second

    cfg = ThroughputConfig(warmup=1, repeats=3)
    converted = load_model(final_dir, device=device)
    tps = prefill_tokens_per_second({"dense": dense, "converted": converted}, 1, 512, cfg)
    d, c = tps["dense"], tps["converted"]
    return {"shape": "1x512 prefill", "dense_tokens_per_s": round(d, 1), "converted_tokens_per_s": round(c, 1),
            "speedup": round(c / d, 3), "impl": "triton" if device == "cuda" else "cpu (PyTorch inference path)"}


def _dense_cache_key(src: Path, data: Path, tokens: int, ctx: int, dtype: str) -> str:
    import hashlib

    h = hashlib.sha256()
    for p in sorted(src.glob("*.safetensors")) if src.is_dir() else [src]:
        st = p.stat()
        h.update(f"{p.name}:{st.st_size}:{int(st.st_mtime)}".encode())
    h.update(f"{data.name}:{data.stat().st_size}:{tokens}:{ctx}:{dtype}".encode())
    return h.hexdigest()[:16]


def _static_baseline(recipe: Recipe, src: Path, out: Path, keep: float, get_dense, e2e_ids, device: str,
                     progress: bool, e2e_tokens: int | None = None):
    """The static-pruning baseline at `keep` of the FFN, distilled like the recipe's e2e stage (same tokens,
    context, batch, learning rate and text; every decoder-layer weight). e2e_tokens: the tokens the
    conversion's stage ran (fewer than the recipe's under a time budget). In memory only; returns (model, info)."""
    from surgery.calibrate import EndToEndConfig
    from surgery.modeling import load_model
    from surgery.profile import load_profile
    from surgery_evals.baselines import apply_baseline, distil

    t0 = time.time()
    model = load_model(src, dtype=recipe.dtype, device=device)
    stats, _ = load_profile(out / "profile.pt")
    apply_baseline(model, "static", keep, stats, seed=recipe.seed)
    info = {"keep": keep, "tokens": 0}
    if recipe.e2e is not None:
        e2e = EndToEndConfig(**recipe.e2e)
        cfg = EndToEndConfig(tokens=e2e_tokens or e2e.tokens, ctx=e2e.ctx, batch_size=e2e.batch_size, lr=e2e.lr,
                             train="all", ce_weight=e2e.ce_weight, average_tail=e2e.average_tail,  # the recipe's loss
                             compile=e2e.compile)  # and its compiled or eager layers
        r = distil(model, get_dense(), e2e_ids(cfg.tokens), cfg, recipe.seed, progress)
        info.update(tokens=r["tokens"], first_kd=r["first_kd"], last_kd=r["last_kd"])
    info["seconds"] = round(time.time() - t0, 2)
    model.eval()
    return model, info


def _evaluate(recipe, out, src, tokenizer, get_dense, stage_dir, model_stages, state, device, progress,
              e2e_ids=None):
    from surgery.data import resolve_data
    from surgery.demo import cache_dir
    from surgery_evals.perplexity import perplexity
    from surgery_evals.report import expert_load, machine, plot_expert_load, plot_ppl_vs_active

    ec = EvaluateConfig(**recipe.evaluate)
    names = {"convert": "converted", "layerwise": "layerwise", "e2e": "e2e"}
    wanted = []
    for s in ec.stages:
        s = model_stages[-1] if s == "final" else ("convert" if s == "converted" else s)
        if s not in model_stages:
            raise SurgeryError(f"recipe {recipe.name!r}: evaluate.stages names {s!r}, which this recipe does not run")
        if s not in wanted:
            wanted.append(s)
    done = {(e["stage"], e["dataset"]): e for e in state.data.get("evaluations", [])}

    def record(e):
        done[(e["stage"], e["dataset"])] = e
        state.data["evaluations"] = list(done.values())
        state.mark("evaluate-partial", {"count": len(done)})

    load = state.data.get("expert_load")
    for ds, max_tokens in ec.datasets.items():
        data = resolve_data(EVAL_DATA.get(ds, ds))
        if ("dense", ds) not in done:
            cache = cache_dir() / "dense-perplexity" / f"{_dense_cache_key(src, data, max_tokens, ec.ctx, recipe.dtype)}.json"
            if cache.is_file():
                r = json.loads(cache.read_text())
                r["cached"] = True
            else:
                r = perplexity(get_dense(), tokenizer, data, max_tokens, ec.ctx, ec.batch_size, progress)
                cache.parent.mkdir(parents=True, exist_ok=True)
                cache.write_text(json.dumps(r, indent=2) + "\n")
            record({**r, "stage": "dense", "dataset": ds, "active_ffn_fraction": 1.0})
    for s in wanted:
        model = None
        for j, (ds, max_tokens) in enumerate(ec.datasets.items()):
            if (names[s], ds) in done:
                continue
            if s != model_stages[-1] and ec.intermediate_datasets is not None and ds not in ec.intermediate_datasets:
                continue
            if model is None:
                model = _eval_model(stage_dir(s), device)
            data = resolve_data(EVAL_DATA.get(ds, ds))
            count_load = s == model_stages[-1] and j == 0
            with expert_load(model) as el:
                r = perplexity(model, tokenizer, data, max_tokens, ec.ctx, ec.batch_size, progress)
            if count_load:
                load = {"dataset": ds, **el}
                state.data["expert_load"] = load
            record({**r, "stage": names[s], "dataset": ds})
        del model
    moe_cfg = json.loads((stage_dir(model_stages[-1]) / "config.json").read_text())["surgery"]
    if ec.static_baseline and any(("static", ds) not in done for ds in ec.datasets):
        keep = moe_cfg["active_ffn_fraction"]
        model, info = _static_baseline(recipe, src, out, keep, get_dense, e2e_ids, device, progress,
                                       state.data["stages"].get("e2e", {}).get("tokens"))
        for ds, max_tokens in ec.datasets.items():
            if ("static", ds) not in done:
                r = perplexity(model, tokenizer, resolve_data(EVAL_DATA.get(ds, ds)), max_tokens, ec.ctx,
                               ec.batch_size, progress)
                record({**r, "stage": "static", "dataset": ds, "active_ffn_fraction": keep})
        state.mark("static-baseline", info)
        del model
    if ec.activation_sparsity and any(("gate-sparsity", ds) not in done for ds in ec.datasets):
        from surgery.modeling import load_model
        from surgery_evals.baselines import apply_baseline

        keep = moe_cfg["active_ffn_fraction"]
        model = apply_baseline(load_model(src, dtype=recipe.dtype, device=device), "gate-sparsity", keep)
        for ds, max_tokens in ec.datasets.items():
            if ("gate-sparsity", ds) not in done:
                r = perplexity(model, tokenizer, resolve_data(EVAL_DATA.get(ds, ds)), max_tokens, ec.ctx,
                               ec.batch_size, progress)
                record({**r, "stage": "gate-sparsity", "dataset": ds, "active_ffn_fraction": keep})
        del model
    curve = _snapshot_curve(ec, state, stage_dir(model_stages[-1]), tokenizer, device, progress)
    speed = state.data.get("speed")
    if speed is None:
        speed = _prefill_speed(get_dense(), stage_dir(model_stages[-1]), device)
        state.data["speed"] = speed
        state.mark("speed", speed)
    stages_info = {k: v for k, v in state.data["stages"].items()
                   if k not in ("evaluate-partial", "speed", "static-baseline")}
    order = ["profile", "convert", "layerwise", "e2e"]
    cum, seconds_to, tokens_to, tok = 0.0, {}, {}, 0
    for k in order:
        if k in stages_info:
            cum += stages_info[k].get("seconds", 0)
            tok += stages_info[k].get("tokens", 0)
            if k in names:
                seconds_to[names[k]] = round(cum, 1)
                tokens_to[names[k]] = tok
    evaluations = list(done.values())
    report = {
        "recipe": asdict(recipe),
        "method": f"{moe_cfg['method']} E{moe_cfg['num_experts']} S{moe_cfg['shared_experts']} "
                  f"K{moe_cfg['top_k']} router={moe_cfg['router_init']}",
        "active_ffn_fraction": moe_cfg["active_ffn_fraction"],
        "routing": moe_cfg["routing"],
        **({"attention": moe_cfg["attention"]} if moe_cfg.get("attention") else {}),  # head experts, if any
        "evaluations": evaluations,
        "perplexity": {f"{e['stage']}/{e['dataset']}": round(e["perplexity"], 4) for e in evaluations},
        "expert_load": load,
        "stages": stages_info,
        "seconds_to_stage": seconds_to,
        "calibration_tokens": tokens_to,
        "pipeline_seconds": round(cum, 1),
        "ppl_vs_calibration_time": curve,
        "speed": speed,
        "machine": machine(),
    }
    if recipe.time_budget_s is not None:  # whether the pipeline kept to it, and what the e2e plan cut
        limit = stages_info.get("e2e", {}).get("time_limit")
        report["time_budget"] = {"budget_s": recipe.time_budget_s, "pipeline_s": round(cum, 1),
                                 "within": cum <= recipe.time_budget_s, "enforced": limit is not None,
                                 **({"e2e": limit} if limit else {}),
                                 **({"sampling": state.data["sampling_cut"]} if state.data.get("sampling_cut") else {})}
    if ec.static_baseline:
        report["static_baseline"] = state.data["stages"].get("static-baseline")
    if ec.activation_sparsity:
        keep = moe_cfg["active_ffn_fraction"]
        report["activation_sparsity"] = {"keep": keep, "tokens": 0, "ffn_matmul_fraction": round(2 / 3 + keep / 3, 4)}
    if load:
        plot_expert_load(load["fractions"], out / "expert_load.png", f"{recipe.name}: expert load ({load['dataset']})")
    points = [{"label": e["stage"], "active": e.get("active_ffn_fraction", 1.0), "dataset": e["dataset"],
               "perplexity": e["perplexity"]} for e in evaluations]
    plot_ppl_vs_active(points, out / "perplexity_vs_active.png", f"{recipe.name}")
    if curve:
        from surgery_evals.report import plot_curve

        dense_ppl = next((e["perplexity"] for e in evaluations
                          if e["stage"] == "dense" and e["dataset"] == curve[0]["dataset"]), None)
        plot_curve(curve, out / "ppl_vs_minutes.png", f"{recipe.name}: perplexity against calibration time",
                   dense_ppl)
    state.mark("evaluate", {"count": len(evaluations)})
    return report
