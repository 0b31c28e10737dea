"""Stream: profile, convert and layer-wise calibrate a dense checkpoint with one decoder layer in memory.

Per layer l, read from the sharded checkpoint (float32 for compute):
  profile    the dense layer runs on the dense model's hidden states of the profiling windows, with the same
             collector (and reservoir random numbers) as profile.profile_model;
  convert    convert.convert_layer on the layer's FFN and its profile;
  calibrate  calibrate.layerwise_step: the MoE block is fitted on the STUDENT's hidden states (the calibration
             windows after the already converted layers) to the dense FFN's output on them;
  write      the layer's tensors go to their own shard (model-000{l+2}-of-...), in the output dtype.
Two hidden-state streams (dense for profiling, student for calibration) move from layer to layer. After each
layer the streams and the progress are saved atomically in the work folder (.OUT.stream beside OUT), so a
killed run started again with the same command resumes at the next unfinished layer; the work folder becomes
OUT when the last layer is written. On a float32 checkpoint the result equals, bit for bit, profile ->
convert -> layer-wise calibration of the model in memory with the same settings (tests/test_stream.py).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

import surgery
from surgery.atomic import atomic_file, publish_dir
from surgery.calibrate import CalibrateConfig, LayerwiseConfig, layerwise_inputs, layerwise_step
from surgery.checkpoint import _safetensors_header, check_model_path, file_hash, open_folder
from surgery.cluster import FFNWeights
from surgery.convert import ConvertConfig, allocate_budgets, convert_layer, moe_block, plan_moe_config
from surgery.errors import SurgeryError
from surgery.modeling import copy_tokenizer_files, load_tokenizer, make_config, parse_dtype
from surgery.moe import training_impl
from surgery.profile import LayerCollector, ProfileConfig, calibration_ids
from surgery.data import windows_of
from surgery.safetensors_io import write_state_dict

STAGES = ("read", "profile", "convert", "calibrate", "write")


@dataclass
class StreamConfig:
    convert: ConvertConfig
    layerwise: LayerwiseConfig = field(default_factory=LayerwiseConfig)
    profile: ProfileConfig | None = field(default_factory=ProfileConfig)  # None: no profiling stage
    seed: int = 0  # profile, conversion and calibration seed (each stage's own in the in-memory path)
    data: str | None = None  # a text/JSONL file; None: WikiText-2 valid

    def __post_init__(self):
        self.convert.seed = self.seed
        if self.profile is not None:
            self.profile.seed = self.seed

    def validate(self, width: int) -> None:
        self.convert.validate(width)
        from surgery.data import sampling_spec

        if sampling_spec(self.data) is not None:
            raise SurgeryError(f"--data {self.data}: sampling text needs the whole model in memory; give a file")
        if self.convert.layer_budgets != "uniform":
            raise SurgeryError(f"--layer-budgets {self.convert.layer_budgets}: a streamed conversion needs every "
                               "layer's top-k before the first is calibrated; use uniform")
        if self.convert.attention_experts:
            raise SurgeryError("--attention-experts is not supported by `surgery stream`")
        needs_stats = self.convert.method == "coactivation" or self.convert.router_init == "fitted"
        if needs_stats and self.profile is None:
            raise SurgeryError(f"--method {self.convert.method} --router-init {self.convert.router_init} needs "
                               "profiling (--profile-tokens > 0)")
        if self.layerwise.tokens <= 0:
            raise SurgeryError(f"--calibrate-tokens {self.layerwise.tokens}: must be positive")

    def calibration_config(self) -> CalibrateConfig:
        return CalibrateConfig(layerwise=self.layerwise, e2e=None, seed=self.seed, data=self.data)

    def fingerprint(self) -> dict:
        conv = {k: v for k, v in asdict(self.convert).items() if k not in ("stats", "head_stats")}
        return {"convert": conv, "layerwise": asdict(self.layerwise),
                "profile": asdict(self.profile) if self.profile else None, "seed": self.seed, "data": self.data}


# ---- memory and time per stage -------------------------------------------------------------------------

def _vm(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
    return 0


class StageMeter:
    """Seconds and peak RSS of each stage. The kernel's high-water mark is reset before each stage (writing 5
    to /proc/self/clear_refs), so a stage's peak is its own; where that is refused, peaks only grow."""

    def __init__(self):
        self.last: dict[str, float] = {}  # the latest seconds of each stage
        self.peaks: dict[str, int] = {}  # each stage's peak RSS over this process
        self.layer_peak = 0  # the peak of the stages since it was last zeroed (one layer's)
        self.peak = _vm("VmHWM")

    def read_peak(self) -> int:
        """The process's peak so far: every reading before a reset is kept, so nothing between stages is lost."""
        self.peak = max(self.peak, _vm("VmHWM"))
        return self.peak

    @contextmanager
    def stage(self, name: str):
        self.read_peak()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass
        t0 = time.perf_counter()
        yield
        peak = _vm("VmHWM")
        self.read_peak()
        self.peaks[name] = max(self.peaks.get(name, 0), peak)
        self.layer_peak = max(self.layer_peak, peak)
        self.last[name] = round(time.perf_counter() - t0, 3)


# ---- the model's skeleton, one layer at a time ----------------------------------------------------------

class Skeleton:
    """The model on the meta device (structure, config and attention implementation as surgery.load builds
    them); the embeddings and one decoder layer at a time get real tensors, then are dropped again."""

    def __init__(self, base: dict):
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            self.model = AutoModelForCausalLM.from_config(make_config(base))
        self.inner = self.model.model
        self.config = self.model.config
        self.inner.rotary_emb = type(self.inner.rotary_emb)(config=self.config)  # its buffers, on the CPU

    def load_embeddings(self, source) -> None:
        w = source.get("model.embed_tokens.weight").to(torch.float32)
        self.inner.embed_tokens.load_state_dict({"weight": w}, assign=True)

    def drop_embeddings(self) -> None:
        self.inner.embed_tokens.to("meta")

    def load_layer(self, source, l: int):
        prefix = f"model.layers.{l}."
        state = {k[len(prefix):]: source.get(k).to(torch.float32) for k in source.keys() if k.startswith(prefix)}
        layer = self.inner.layers[l]
        missing, unexpected = layer.load_state_dict(state, strict=False, assign=True)
        if missing or unexpected:
            what = f"missing {prefix}{missing[0]}" if missing else f"unexpected {prefix}{unexpected[0]}"
            raise SurgeryError(f"checkpoint layer {l} does not match its config: {what}")
        return layer

    def drop_layer(self, l: int) -> None:
        self.inner.layers[l] = torch.nn.Identity()  # the real tensors go with the module


@torch.no_grad()
def profile_batches(skel: Skeleton, ids: torch.Tensor, cfg: ProfileConfig) -> list[torch.Tensor]:
    """The profiling windows' embeddings, in profile_model's batches."""
    wins = windows_of(ids[: cfg.tokens], cfg.ctx, short_ok=True)
    return [skel.inner.embed_tokens(wins[i:i + cfg.batch_size]) for i in range(0, wins.shape[0], cfg.batch_size)]


@torch.no_grad()
def profile_layer(skel: Skeleton, layer, l: int, batches: list, cfg: ProfileConfig):
    """Run the dense `layer` on the dense hidden states `batches` as LlamaModel.forward does, collecting its
    FFN statistics. Returns (the next layer's hidden states, LayerStats)."""
    from transformers.masking_utils import create_causal_mask

    c = LayerCollector(layer.mlp, cfg, l, skel.config.num_hidden_layers)
    hook = layer.mlp.register_forward_pre_hook(c)
    out = []
    try:
        for h in batches:
            pos = torch.arange(h.shape[1])[None]
            mask = create_causal_mask(config=skel.config, inputs_embeds=h, attention_mask=None, cache=None,
                                      position_ids=pos)
            y = layer(h, attention_mask=mask, position_ids=pos, cache=None, use_cache=False,
                      position_embeddings=skel.inner.rotary_emb(h, position_ids=pos))
            out.append(y[0] if isinstance(y, tuple) else y)
    finally:
        hook.remove()
    return out, c.result()


# ---- output shards --------------------------------------------------------------------------------------

def shard_name(i: int, n: int) -> str:
    return f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def write_shard(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """One complete safetensors file at `path`, or none: written beside it, then renamed."""
    tmp = path.parent / f".{path.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    write_state_dict(tmp, tensors, max_bytes=1 << 62)
    os.replace(tmp / "model.safetensors", path)
    tmp.rmdir()


def _cast(tensors: dict, dtype: torch.dtype) -> dict:
    return {k: v.detach().to(dtype) if v.is_floating_point() else v.detach() for k, v in tensors.items()}


# ---- resume state ---------------------------------------------------------------------------------------

def _fingerprint(src: Path, source, cfg: StreamConfig) -> dict:
    files = [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in source.files]
    return {"source": str(src.resolve()), "files": files, "config": cfg.fingerprint()}


def _load_state(work: Path, fingerprint: dict) -> dict | None:
    p = work / "state.pt"
    if not p.is_file():
        return None
    try:
        state = torch.load(p, map_location="cpu", weights_only=False)
    except Exception as e:
        raise SurgeryError(f"{p}: unreadable resume state ({type(e).__name__}); delete {work} to start over") from None
    if state.get("fingerprint") != fingerprint:
        raise SurgeryError(f"{work}: an unfinished run of another source or other settings; rerun it with the same "
                           "flags to resume, or pass --restart to discard it")
    return state


def _save_state(work: Path, state: dict) -> None:
    with atomic_file(work / "state.pt") as tmp:
        torch.save(state, tmp)
    brief = {k: state[k] for k in ("next_layer", "layers", "report")}
    (work / "progress.json").write_text(json.dumps(brief, indent=1) + "\n")


# ---- the pipeline ---------------------------------------------------------------------------------------

def run_stream(src, out, cfg: StreamConfig, overwrite: bool = False, restart: bool = False,
               progress: bool = True, after_layer=None) -> dict:
    """`surgery stream`: the converted, layer-wise calibrated model of the dense folder `src` at `out`.
    `after_layer(l)` is called once layer l is saved (tests use it to simulate a kill). Returns a summary."""
    t_start = time.time()
    src, out = check_model_path(src), Path(out)
    if src.is_file():
        raise SurgeryError(f"{src}: `surgery stream` reads a safetensors folder (a .gguf is dequantized whole); "
                           "use `surgery convert` then `surgery calibrate`")
    if out.exists() and not overwrite:
        raise SurgeryError(f"{out}: already exists (choose another path or pass --overwrite)")
    source = open_folder(src)
    base = source.config
    L, width = base["num_hidden_layers"], base["intermediate_size"]
    cfg.validate(width)
    out_dtype = parse_dtype(cfg.convert.dtype) or source.dtype
    tokenizer = load_tokenizer(src)
    pids = calibration_ids(tokenizer, cfg.data, cfg.profile.tokens, progress=progress) if cfg.profile else None
    cids = calibration_ids(tokenizer, cfg.data, cfg.layerwise.tokens, progress=progress)

    work = out.parent / f".{out.name}.stream"
    fingerprint = _fingerprint(src, source, cfg)
    if restart:
        shutil.rmtree(work, ignore_errors=True)
    state = _load_state(work, fingerprint)
    n_shards = L + 2  # the embeddings, one per layer, then the final norm and head
    skel = Skeleton(base)
    meter = StageMeter()
    baseline = _vm("VmRSS")  # Python, torch, transformers' Llama code and the tokenizer: no weight read yet
    moe, sizes = plan_moe_config(cfg.convert, width)
    if state is None:
        work.mkdir(parents=True, exist_ok=True)
        with meter.stage("hash"):  # the source's identity in the output's config, as `convert` records it
            source_hash = file_hash(source.files + [src / "config.json"])
        with meter.stage("read"):
            skel.load_embeddings(source)
        with meter.stage("write"):
            emb = {"model.embed_tokens.weight": skel.inner.embed_tokens.weight}
            write_shard(work / shard_name(0, n_shards), _cast(emb, out_dtype))
        with torch.no_grad():
            h_prof = profile_batches(skel, pids, cfg.profile) if cfg.profile else None
            h_cal, _ = layerwise_inputs(skel.inner, cids, cfg.layerwise, torch.device("cpu"))
        skel.drop_embeddings()
        state = {"fingerprint": fingerprint, "next_layer": 0, "layers": L, "source_hash": source_hash,
                 "h_prof": h_prof, "h_cal": h_cal, "permutations": [], "report": [], "stages": {},
                 "setup_seconds": dict(meter.last)}
    elif progress:
        print(f"resuming {work} at layer {state['next_layer']} of {L}", flush=True)
    h_prof, h_cal = state["h_prof"], state["h_cal"]
    # The per-window constants depend only on the window shape: rebuilt, never stored.
    consts = _calibration_consts(skel, cids, cfg.layerwise)
    resumed_at = state["next_layer"]

    bar = tqdm(total=L, initial=resumed_at, desc="streaming layers", unit="layer", disable=not progress)
    for l in range(resumed_at, L):
        meter.last.clear()
        meter.layer_peak = 0
        with meter.stage("read"):
            layer = skel.load_layer(source, l)
            layer.requires_grad_(False)
            dense_mlp = layer.mlp
        stats = None
        if cfg.profile is not None:
            with meter.stage("profile"):
                h_prof, stats = profile_layer(skel, layer, l, h_prof, cfg.profile)
        with meter.stage("convert"):
            ffn = FFNWeights(dense_mlp.gate_proj.weight.data, dense_mlp.up_proj.weight.data,
                             dense_mlp.down_proj.weight.data)
            cfg.convert.stats = {l: stats} if stats is not None else {}
            tensors, perm, _ = convert_layer(ffn, cfg.convert, sizes, l, moe)
            cfg.convert.stats = {}
            block = moe_block(tensors, moe, base["hidden_size"], dense_mlp.gate_proj.weight).requires_grad_(False)
            block.routing = moe.layer_routing(l)
            block.impl = training_impl(block)  # as calibrate() on a CPU: the same function, faster to train
            del ffn, tensors, stats
        with meter.stage("calibrate"):
            layer.mlp = block
            h_cal, report = layerwise_step(layer, dense_mlp, h_cal, consts, cfg.layerwise, cfg.seed, l)
        with meter.stage("write"):
            prefix = f"model.layers.{l}."
            tensors = {prefix + k: v for k, v in layer.state_dict().items()}
            write_shard(work / shard_name(l + 1, n_shards), _cast(tensors, out_dtype))
            del tensors
        for name, secs in meter.last.items():  # this layer's seconds per stage, kept across a resume
            state["stages"].setdefault(name, []).append(secs)
        state.setdefault("layer_peaks", []).append(meter.layer_peak)  # peak RSS of read..write of this layer
        state.update(next_layer=l + 1, h_prof=h_prof, h_cal=h_cal)
        state["permutations"].append(perm)
        state["report"].append(report)
        with meter.stage("save"):
            _save_state(work, state)
        del layer, dense_mlp, block
        skel.drop_layer(l)
        bar.set_postfix(err=f"{report['before']:.3f}->{report['after']:.3f}")
        bar.update(1)
        if after_layer is not None:
            after_layer(l)
    bar.close()
    t_finish = time.perf_counter()
    _finish(src, out, work, source, skel, cfg, moe, state, out_dtype, n_shards, meter, overwrite)
    summary = _summary(src, out, cfg, moe, state, meter, resumed_at, time.time() - t_start)
    meter.read_peak()
    summary["peak_rss_bytes"], summary["baseline_rss_bytes"] = meter.peak, baseline
    summary["setup_seconds"] = state["setup_seconds"]  # source hash; embeddings read and written
    summary["finish_seconds"] = round(time.perf_counter() - t_finish, 3)  # final norm/head, index, config
    return summary


def _calibration_consts(skel: Skeleton, cids: torch.Tensor, cfg: LayerwiseConfig):
    """layerwise_inputs' per-window constants, from a meta embedding (no embedding tensor is read)."""
    from surgery.calibrate import _causal_mask, _windows

    T = _windows(cids, cfg.ctx, cfg.tokens).shape[1]
    pos = torch.arange(T)[None]
    probe = torch.zeros(1, T, skel.config.hidden_size)
    return skel.inner.rotary_emb(probe, pos), _causal_mask(T, torch.device("cpu")), pos


def _finish(src, out, work, source, skel, cfg, moe, state, out_dtype, n_shards, meter, overwrite) -> None:
    """The last shard, index, config and tokenizer; then the work folder becomes OUT."""
    L = state["layers"]
    with meter.stage("write"):
        rest = [k for k in source.keys() if not k.startswith("model.layers.") and k != "model.embed_tokens.weight"
                and not (source.config.get("tie_word_embeddings") and k == "lm_head.weight")]
        write_shard(work / shard_name(L + 1, n_shards), _cast({k: source.get(k) for k in rest}, out_dtype))
    weight_map, total = {}, 0
    for i in range(n_shards):
        for name, meta in _safetensors_header(work / shard_name(i, n_shards)).items():
            if name != "__metadata__":
                weight_map[name] = shard_name(i, n_shards)
                total += meta["data_offsets"][1] - meta["data_offsets"][0]
    (work / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    moe.source, moe.source_hash = str(src), state["source_hash"]
    moe.permutations = state["permutations"]
    allocate_budgets(cfg.convert, moe, [None] * L)
    moe.calibration = {"seed": cfg.seed, "data": str(cfg.data or "wikitext-valid"),
                       "layerwise_tokens": int(state["h_cal"].shape[0] * state["h_cal"].shape[1]), "e2e_tokens": 0,
                       "config": cfg.calibration_config().to_dict(), "streamed": True}
    config = dict(source.config)
    config["dtype"] = str(out_dtype).removeprefix("torch.")
    config.pop("quantization_config", None)
    config.pop("torch_dtype", None)
    config["surgery"] = moe.to_dict()
    (work / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    copy_tokenizer_files(src, work)
    (work / "state.pt").unlink()
    (work / "progress.json").unlink()
    publish_dir(work, out)  # --overwrite: swapped, so OUT is never missing or partial


def _summary(src, out, cfg, moe, state, meter, resumed_at, seconds) -> dict:
    stages = {}
    for name in STAGES:
        secs = state["stages"].get(name, [])
        stages[name] = {"seconds_per_layer": secs,
                        "mean_seconds_per_layer": round(sum(secs) / len(secs), 3) if secs else None,
                        "peak_rss_bytes": meter.peaks.get(name)}  # None: not run in this process
    return {
        "output": str(out), "source": str(src), "layers": state["layers"], "resumed_at_layer": resumed_at,
        "experts": cfg.convert.experts, "top_k": cfg.convert.top_k, "shared_experts": cfg.convert.shared_experts,
        "method": cfg.convert.method, "router_init": cfg.convert.router_init,
        "profile_tokens": cfg.profile.tokens if cfg.profile else 0,
        "calibrate_tokens": moe.calibration["layerwise_tokens"],
        "layer_errors": [{"layer": r["layer"], "before": r["before"], "after": r["after"]} for r in state["report"]],
        "stages": stages, "layer_peak_rss_bytes": state.get("layer_peaks", []),  # this process's layers' peaks
        "seconds": round(seconds, 2), "version": surgery.__version__,
    }
