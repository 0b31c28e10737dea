"""File-level entry points behind `surgery experts stats`, `surgery prune` and `surgery extend`: load, call the
library function, write the model (native format, atomically) and a JSON-ready summary."""

from __future__ import annotations

from pathlib import Path

import torch

from surgery.errors import SurgeryError

NAMED = ("wikitext-valid", "wikitext-test", "stdlib", "stdlib-train", "stdlib-eval")


def checkpoint_bytes(folder) -> int:
    """Bytes of a model folder's safetensors shards (what pruning or extension changes)."""
    return sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))


def parse_domain(spec: str) -> tuple[str, Path]:
    """`NAME=PATH`, a named data set (wikitext-valid, stdlib-train, ...) or a text/JSONL path (named by its
    file stem)."""
    from surgery.data import resolve_data

    if "=" in spec:
        name, path = spec.split("=", 1)
        return name, resolve_data(path)
    if spec in NAMED:
        return spec, resolve_data(spec)
    return Path(spec).stem, Path(spec)


def domain_ids(tokenizer, spec: str, tokens: int, flag: str = "--data") -> tuple[str, Path, torch.Tensor]:
    from surgery.data import tokenize_file

    name, path = parse_domain(spec)
    if not Path(path).is_file():
        raise SurgeryError(f"{path}: no such file ({flag} expects a text or JSONL file or one of {', '.join(NAMED)})")
    ids = tokenize_file(tokenizer, path, tokens)
    if ids.numel() < 2:
        raise SurgeryError(f"{path}: fewer than 2 tokens ({flag} {spec})")
    return name, path, ids


def _load_converted(model_path, device):
    from surgery.modeling import is_converted, load_model, load_tokenizer

    from surgery.moe import set_impl

    model = load_model(model_path, device=device)
    if not is_converted(model):
        raise SurgeryError(f"{model_path}: a dense model has no experts (run `surgery convert` first)")
    if str(device) == "cpu":
        set_impl(model, "masked")  # training on a CPU: the routed MoE as three masked matmuls (= the reference)
    return model, load_tokenizer(model_path)


def run_stats(model_path, data: list[str], tokens: int, ctx: int, plot_path=None, device="cpu",
              progress=True) -> dict:
    from surgery.experts import stats

    if not data:
        raise SurgeryError("--data: give at least one domain")
    model, tok = _load_converted(model_path, device)
    domains = {}
    for spec in data:
        name, path = parse_domain(spec)
        if name in domains:
            raise SurgeryError(f"--data {spec}: domain name {name!r} given twice (use NAME=PATH)")
        domains[name] = path
        if not Path(path).is_file():
            raise SurgeryError(f"{path}: no such file (--data {spec})")
    result = stats.collect(model, tok, domains, tokens, ctx, progress)
    result["model"] = str(model_path)
    if plot_path:
        stats.plot(result, plot_path)
        result["plot"] = str(plot_path)
    return result


def run_prune(model_path, out, data: str, cfg, calibrate_tokens: int = 0, lr: float = 1e-4, device="cpu",
              overwrite=False, progress=True) -> dict:
    import copy

    from surgery.experts.prune import choose_experts, prune_model
    from surgery.modeling import save_converted

    out = Path(out)
    if out.exists() and not overwrite:
        raise SurgeryError(f"{out}: already exists (choose another path or pass --overwrite)")
    model, tok = _load_converted(model_path, device)
    name, path, ids = domain_ids(tok, data, cfg.tokens)
    before = model.surgery_config.num_experts
    kept, stats = choose_experts(model, ids, cfg, progress)
    teacher = copy.deepcopy(model) if calibrate_tokens > 0 else None  # before slicing: the unpruned model
    record = {"op": "prune", "data": str(path), "criterion": cfg.criterion, "tokens": int(ids.numel()),
              "from_experts": before, "keep": cfg.keep, "kept": kept}
    prune_model(model, kept, cfg.top_k, record)
    result = {"output": str(out), "domain": name, "from_experts": before, "kept_experts": cfg.keep,
              "top_k": model.surgery_config.top_k, "criterion": cfg.criterion, "kept": kept,
              "kept_share_of_domain_routing": [
                  round(sum(l["fraction"][e] for e in k) / stats["top_k"], 4) for l, k in zip(stats["layers"], kept)]}
    if calibrate_tokens > 0:
        from surgery.calibrate import EndToEndConfig, run_end_to_end

        e2e = EndToEndConfig(tokens=calibrate_tokens, ctx=256, batch_size=2, lr=lr, train="moe")
        cal = run_end_to_end(model, teacher, ids, e2e, progress=progress)
        result["calibration"] = {k: v for k, v in cal.items() if k != "history"}
        model.surgery_config.modules[-1]["calibration"] = {"tokens": cal["tokens"], "lr": lr, "teacher": "unpruned"}
    save_converted(model, out, tokenizer_from=model_path, overwrite=overwrite)
    result["bytes"] = checkpoint_bytes(out)
    src = Path(model_path)
    if src.is_dir():
        result["source_bytes"] = checkpoint_bytes(src)
    return result


def run_extend(model_path, out, data: str, cfg, memory: str | None = None, device="cpu", overwrite=False,
               progress=True) -> dict:
    import json

    from surgery.experts.extend import extend_model
    from surgery.modeling import save_converted

    out = Path(out)
    if out.exists() and not overwrite:
        raise SurgeryError(f"{out}: already exists (choose another path or pass --overwrite)")
    model, tok = _load_converted(model_path, device)
    need = max(cfg.tokens, 2 * cfg.ctx)
    name, path, ids = domain_ids(tok, data, need)
    if ids.numel() < cfg.ctx:
        raise SurgeryError(f"{path}: {ids.numel()} tokens, fewer than one window of {cfg.ctx} (--data {data})")
    mem_ids = None
    if memory is not None:
        if cfg.memory_tokens <= 0:
            raise SurgeryError("--memory needs --memory-tokens N > 0")
        _, mpath, mem_ids = domain_ids(tok, memory, cfg.memory_tokens, flag="--memory")
        if mem_ids.numel() < cfg.ctx:
            raise SurgeryError(f"{mpath}: fewer than one window of {cfg.ctx} tokens (--memory {memory})")
    elif cfg.memory_tokens > 0:
        raise SurgeryError("--memory-tokens needs --memory OLD_DOMAIN")
    record = extend_model(model, ids, cfg, mem_ids, progress)
    model.surgery_config.modules[-1].update(data=str(path), memory=str(memory) if memory else None)
    save_converted(model, out, tokenizer_from=model_path, overwrite=overwrite)
    hist = {k: record[k]["history"] for k in ("train", "router_tuning") if k in record}
    (out / "extend_history.json").write_text(json.dumps(hist) + "\n")
    summary = dict(model.surgery_config.modules[-1])
    summary.update(output=str(out), domain=name)
    return summary
