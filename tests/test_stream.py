"""The layer-streamed pipeline (surgery/stream.py) against the in-memory one, on tiny random float32 Llamas:
profile -> convert -> layer-wise calibration with the same settings gives the same tensors bit for bit, a run
killed between layers resumes to the same model, and bad input is refused before anything is written."""

import json
from dataclasses import replace

import pytest
import torch
from click.testing import CliRunner

import surgery
from surgery.calibrate import LayerwiseConfig, calibrate
from surgery.cli import main
from surgery.convert import ConvertConfig, convert_model
from surgery.errors import SurgeryError
from surgery.modeling import load_tokenizer
from surgery.profile import ProfileConfig, calibration_ids, profile_model
from surgery.stream import StreamConfig, run_stream

from helpers import make_llama


def _config(**convert) -> StreamConfig:
    # samples < profiled tokens: the reservoir overflows, so its random replacement order is exercised;
    # coactivation + fitted make the conversion depend on every profiled statistic.
    conv = dict(experts=4, top_k=2, shared_experts=1, method="coactivation", router_init="fitted", router_steps=30)
    conv.update(convert)
    return StreamConfig(convert=ConvertConfig(**conv),
                        profile=ProfileConfig(tokens=600, ctx=64, samples=96, batch_size=3),
                        layerwise=LayerwiseConfig(tokens=512, ctx=64, router_steps=25, expert_epochs=0.5,
                                                  batch_tokens=128),
                        seed=3)


def in_memory(src, cfg: StreamConfig, data):
    """The reference: the library's whole-model functions, one after the other, with the same settings."""
    tok = load_tokenizer(src)
    stats = profile_model(surgery.load(src), calibration_ids(tok, data, cfg.profile.tokens, progress=False),
                          cfg.profile, progress=False)
    student = convert_model(surgery.load(src), replace(cfg.convert, stats=stats))
    ids = calibration_ids(tok, data, cfg.layerwise.tokens, progress=False)
    calibrate(student, surgery.load(src), tok, cfg.calibration_config(), ids=ids, progress=False)
    return student


def _assert_same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.fixture
def dense(tmp_path):
    return make_llama(tmp_path / "dense", hidden=64, ffn=96, layers=3, tied=False)


def test_streamed_equals_in_memory_bit_for_bit(tmp_path, dense, text_file):
    cfg = _config()
    summary = run_stream(dense, tmp_path / "moe", replace(cfg, data=str(text_file)), progress=False)
    streamed = surgery.load(tmp_path / "moe")
    ref = in_memory(dense, _config(), str(text_file))
    _assert_same(streamed, ref)
    # Calibration did something (not a vacuous equality): the fitted routers lowered every layer's error.
    assert all(e["after"] < e["before"] for e in summary["layer_errors"])
    assert summary["layers"] == 3 and summary["resumed_at_layer"] == 0
    assert set(summary["stages"]) == {"read", "profile", "convert", "calibrate", "write"}
    assert all(len(s["seconds_per_layer"]) == 3 for s in summary["stages"].values())
    moe = streamed.surgery_config
    assert moe.permutations == ref.surgery_config.permutations
    assert moe.calibration["layerwise_tokens"] == 512 and moe.calibration["streamed"]
    # No work folder is left behind, and the output is the usual layout (sharded, with its index).
    assert not (tmp_path / ".moe.stream").exists()
    assert (tmp_path / "moe" / "model.safetensors.index.json").is_file()


def test_streamed_equals_in_memory_without_profiling(tmp_path, text_file):
    """The default conversion (random clusters, centroid routers) needs no profile: that stage is skipped.
    Tied embeddings (no lm_head tensor) as the demo model has them."""
    dense = make_llama(tmp_path / "tied", hidden=64, ffn=96, layers=2, tied=True)
    cfg = replace(_config(method="random", router_init="centroid", shared_experts=0), profile=None,
                  data=str(text_file))
    summary = run_stream(dense, tmp_path / "moe", cfg, progress=False)
    assert summary["stages"]["profile"]["seconds_per_layer"] == []
    tok = load_tokenizer(dense)
    ref = convert_model(surgery.load(dense), cfg.convert)
    calibrate(ref, surgery.load(dense), tok, cfg.calibration_config(),
              ids=calibration_ids(tok, cfg.data, cfg.layerwise.tokens, progress=False), progress=False)
    _assert_same(surgery.load(tmp_path / "moe"), ref)


class Killed(Exception):
    pass


def test_killed_run_resumes_at_the_next_layer_and_gives_the_same_model(tmp_path, dense, text_file):
    cfg = replace(_config(), data=str(text_file))
    run_stream(dense, tmp_path / "whole", cfg, progress=False)

    def kill_after_0(layer):
        if layer == 0:
            raise Killed

    with pytest.raises(Killed):
        run_stream(dense, tmp_path / "cut", _config_copy(cfg), progress=False, after_layer=kill_after_0)
    assert not (tmp_path / "cut").exists()  # OUT appears only when complete
    progress = json.loads((tmp_path / ".cut.stream" / "progress.json").read_text())
    assert progress["next_layer"] == 1
    summary = run_stream(dense, tmp_path / "cut", _config_copy(cfg), progress=False)
    assert summary["resumed_at_layer"] == 1
    assert [len(s["seconds_per_layer"]) for s in summary["stages"].values()] == [3] * 5
    _assert_same(surgery.load(tmp_path / "cut"), surgery.load(tmp_path / "whole"))
    a, b = (json.loads((tmp_path / n / "config.json").read_text())["surgery"] for n in ("cut", "whole"))
    assert a == b


def _config_copy(cfg):
    return replace(cfg, convert=replace(cfg.convert), layerwise=replace(cfg.layerwise), profile=replace(cfg.profile))


def test_resume_with_other_settings_is_refused(tmp_path, dense, text_file):
    cfg = replace(_config(), data=str(text_file))

    def kill(layer):
        raise Killed

    with pytest.raises(Killed):
        run_stream(dense, tmp_path / "m", _config_copy(cfg), progress=False, after_layer=kill)
    other = _config_copy(cfg)
    other.convert.top_k = 1
    with pytest.raises(SurgeryError, match="other settings"):
        run_stream(dense, tmp_path / "m", other, progress=False)
    run_stream(dense, tmp_path / "m", other, progress=False, restart=True)  # --restart discards it
    assert surgery.load(tmp_path / "m").surgery_config.top_k == 1


def test_output_evaluates_like_any_converted_model(tmp_path, dense, text_file):
    from surgery.moe import set_dense_routing

    cfg = replace(_config(experts=4, top_k=4, shared_experts=0), data=str(text_file))
    cfg.layerwise.router_steps, cfg.layerwise.expert_epochs = 0, 0.0  # no calibration change: top-4 of 4
    run_stream(dense, tmp_path / "moe", cfg, progress=False)
    moe, ref = surgery.load(tmp_path / "moe"), surgery.load(dense)
    set_dense_routing(moe)  # every expert, unit weights: the dense model (the conversion is a permutation)
    ids = torch.randint(0, 11, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = moe(input_ids=ids).logits, ref(input_ids=ids).logits
    assert (a - b).abs().max() / b.abs().max() < 1e-5  # float32 summation order of the split FFN


def test_cli_stream_and_bad_input(tmp_path, dense, text_file):
    runner = CliRunner()
    out = tmp_path / "moe"
    args = ["stream", str(dense), str(out), "-E", "4", "-K", "2", "--profile-tokens", "256", "--samples", "64",
            "--calibrate-tokens", "256", "--ctx", "64", "--router-steps", "10", "--data", str(text_file),
            "--json", str(tmp_path / "s.json")]
    r = runner.invoke(main, args)
    assert r.exit_code == 0, r.output
    s = json.loads((tmp_path / "s.json").read_text())
    assert s["experts"] == 4 and s["top_k"] == 2 and s["peak_rss_bytes"] > 0
    assert surgery.load(out).surgery_config.num_experts == 4
    # OUT exists -> refused; bad flags name themselves; nothing is left half-written.
    for extra, msg in [([], "already exists"), (["--overwrite", "--method", "nope"], "--method 'nope'"),
                       (["--overwrite", "--profile-tokens", "0", "--router-init", "fitted"], "needs profiling"),
                       (["--overwrite", "-K", "9"], "top"), (["--overwrite", "--data", "sample"], "--data sample")]:
        r = runner.invoke(main, args + extra)
        assert r.exit_code == 2 and msg in r.output, (extra, r.output)
    r = runner.invoke(main, ["stream", str(tmp_path / "nope"), str(tmp_path / "x"), "-E", "4", "-K", "2"])
    assert r.exit_code == 2 and "no such file" in r.output
    assert not (tmp_path / "x").exists() and not (tmp_path / ".x.stream").exists()
    assert not (tmp_path / ".moe.stream").exists()
