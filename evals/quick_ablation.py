"""Quick ablations on the demo model: one JSON spec -> convert in memory, calibrate, evaluate 8k tokens each of
WikiText-2 test and stdlib source, append one JSON line to results/quality/ablations.jsonl.

    python -m surgery_evals.quick_ablation '{"convert": {"experts": 48, "shared_experts": 16, "top_k": 16,
        "method": "coactivation", "router_init": "fitted"}, "layerwise": {...}, "e2e": {...}, "data": "mix"}'

The spec's blocks are ConvertConfig, LayerwiseConfig and EndToEndConfig fields (omit a block to skip that
stage); "data" is the calibration data (default WikiText-2 valid), "profile_data" the profile's (the statistics
clusters and fitted routers come from; default WikiText-2 valid, as the recipes' until round 20, which moved them
to "mix"); "layer_top_k" (a list, one k per layer) sets
per-layer budgets on the converted model, as `python -m surgery_evals.layer_kl` proposes them. With "dense": true
and no "convert" block the dense model itself goes through the "e2e" block (distilled from its own copy: the
control for losses that adapt to the text, such as e2e.ce_weight). The profile
(16k tokens) and each conversion are cached under runs/ablation-cache/, so
ablations of calibration on one structure do not convert again. `--save DIR` also writes the calibrated
student as a native model folder (for `surgery_evals.routing_probe` and the like). Short budgets, 8k-token evaluations: for
choosing, not for final numbers.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path

import torch


def converted_student(convert_spec: dict, cache_dir="runs/ablation-cache", source="runs/smollm2",
                      profile_data: str | None = None):
    """The demo model converted by `convert_spec` (ConvertConfig fields), from runs/ablation-cache when the same
    structure was converted before. The profile (16k tokens of WikiText-2 valid, or of `profile_data`: a file
    or a sampling mode such as "mix") is cached too, one file per data."""
    from surgery.convert import ConvertConfig, convert_model
    from surgery.modeling import load_model, load_tokenizer, set_layer_routing
    from surgery.profile import ProfileConfig, calibration_ids, load_profile, profile_model, save_profile

    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    slug = hashlib.sha256(str(profile_data).encode()).hexdigest()[:8] if profile_data else ""
    prof = cache / (f"profile-{slug}.pt" if slug else "profile.pt")
    if not prof.exists():
        dense = load_model(source)
        pc = ProfileConfig(tokens=16384, ctx=512, samples=4096)
        tok = load_tokenizer(source)
        ids = calibration_ids(tok, profile_data, pc.tokens, dense, 0, False)
        save_profile(profile_model(dense, ids, pc, False), prof, {"data": str(profile_data or "wikitext-valid")})
    stats, _ = load_profile(prof)
    student = load_model(source)
    cc = ConvertConfig(**convert_spec)
    cc.stats = stats
    keyed = {**convert_spec, "profile_data": profile_data} if profile_data else convert_spec  # old keys stay valid
    key = hashlib.sha256(json.dumps(keyed, sort_keys=True).encode()).hexdigest()[:12]
    conv = cache / f"convert-{key}.pt"
    if conv.exists():  # same structure as an earlier ablation: reuse its conversion
        blob = torch.load(conv, weights_only=False)
        convert_model(student, ConvertConfig(**{**convert_spec, "method": "random", "router_init": "centroid",
                                                 "layer_budgets": "uniform"}))
        student.load_state_dict(blob["state"])
        blob["cfg"].__dict__.setdefault("layer_top_k", [])  # cached before per-layer budgets existed
        student.surgery_config = blob["cfg"]
        set_layer_routing(student, blob["cfg"])  # each layer's own top-k, when the budgets are not uniform
    else:
        convert_model(student, cc)
        torch.save({"state": student.state_dict(), "cfg": student.surgery_config}, conv)
    return student


def main(spec_text: str, out="results/quality/ablations.jsonl", cache_dir="runs/ablation-cache",
         source="runs/smollm2", save: str | None = None) -> dict:
    from surgery.calibrate import CalibrateConfig, EndToEndConfig, LayerwiseConfig, calibrate
    from surgery.modeling import load_model, load_tokenizer, set_layer_routing
    from surgery.moe import set_impl

    spec = json.loads(spec_text)
    tok = load_tokenizer(source)
    teacher = load_model(source)
    t0 = time.time()
    if spec.get("dense"):
        return _dense_control(spec, tok, teacher, source, out)
    student = converted_student(spec["convert"], cache_dir, source, spec.get("profile_data"))
    if spec.get("layer_top_k"):  # explicit per-layer budgets (e.g. from surgery_evals.layer_kl), native-only
        student.surgery_config.layer_top_k = list(spec["layer_top_k"])
        set_layer_routing(student, student.surgery_config)
    res = {"spec": spec, "convert_seconds": round(time.time() - t0, 1)}
    if student.surgery_config.layer_top_k:
        res["layer_top_k"] = student.surgery_config.layer_top_k
    lw = LayerwiseConfig(**spec["layerwise"]) if spec.get("layerwise") else None
    e2e = EndToEndConfig(**spec["e2e"]) if spec.get("e2e") else None
    if lw or e2e:
        t0 = time.time()
        r = calibrate(student, teacher, tok, CalibrateConfig(layerwise=lw, e2e=e2e, seed=0, data=spec.get("data")))
        res["calibration_seconds"] = round(time.time() - t0, 1)
        layers = r.get("layerwise", {}).get("layers", [])
        if layers:  # mean block error over layers, before and after layer-wise calibration
            res["layerwise_error"] = [round(sum(x[k] for x in layers) / len(layers), 5) for k in ("before", "after")]
        if "e2e" in r:
            h = r["e2e"]["history"]
            res["e2e_kd_first_last10"] = [h[0]["kd"], round(sum(x["kd"] for x in h[-10:]) / min(10, len(h)), 5)]
            res["e2e_tokens_per_s"] = round(r["e2e"]["tokens"] / max(1e-9, r["e2e"]["seconds"]), 1)
    set_impl(student, "masked")  # the same function as the grouped path, faster to evaluate on a CPU
    if save:  # the calibrated student as a native model folder, for diagnostics (routing_probe, layer_kl)
        from surgery.modeling import save_converted

        save_converted(student, save, tokenizer_from=source, overwrite=True)
        res["saved"] = save
    return _evaluate(student, tok, res, out)


def _evaluate(model, tok, res: dict, out) -> dict:
    """8k tokens each of WikiText-2 test and stdlib source into `res`, appended as one JSON line to `out`."""
    from surgery.data import resolve_data
    from surgery_evals.perplexity import perplexity
    from surgery_evals.report import machine

    for name, data in (("wikitext", "wikitext-test"), ("stdlib", "stdlib")):
        res[name] = round(perplexity(model, tok, resolve_data(data), 8192, 1024, 1, False)["perplexity"], 3)
    res["eval_tokens"] = 8192
    res["machine"] = machine()["summary"]
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a") as f:
        f.write(json.dumps(res) + "\n")
    print(json.dumps(res))
    return res


def _dense_control(spec: dict, tok, teacher, source, out) -> dict:
    """The dense model through the spec's end-to-end stage (its teacher an untouched copy), evaluated as above."""
    from surgery.calibrate import EndToEndConfig, run_end_to_end
    from surgery.errors import SurgeryError
    from surgery.modeling import load_model
    from surgery.profile import calibration_ids

    if spec.get("convert") or spec.get("layerwise") or not spec.get("e2e"):
        raise SurgeryError('quick_ablation: "dense" takes an "e2e" block only')
    cfg = EndToEndConfig(**spec["e2e"])
    student = load_model(source)
    ids = calibration_ids(tok, spec.get("data"), cfg.tokens, teacher, 0, False)  # as calibrate() reads it
    r = run_end_to_end(student, teacher, ids, cfg, seed=0, progress=True)
    res = {"spec": spec, "calibration_seconds": r["seconds"],
           "e2e_kd_first_last10": [r["history"][0]["kd"],
                                   round(sum(x["kd"] for x in r["history"][-10:]) / min(10, len(r["history"])), 5)],
           "e2e_tokens_per_s": round(r["tokens"] / max(1e-9, r["seconds"]), 1)}
    return _evaluate(student, tok, res, out)


if __name__ == "__main__":
    torch.set_num_threads(2)
    args = sys.argv[1:]
    if len(args) not in (1, 3) or (len(args) == 3 and args[1] != "--save"):
        print("usage: python -m surgery_evals.quick_ablation 'JSON spec' [--save DIR]", file=sys.stderr)
        sys.exit(2)
    main(args[0], save=args[2] if len(args) == 3 else None)
