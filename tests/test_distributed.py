"""End-to-end calibration under torchrun (2 processes, FSDP2 over gloo on CPU) against the single-process run.

Tolerance: the 2-process run computes the same update from the same windows, but not with the same float
operations: each rank's matmuls see half the batch (other blocking), the gradients of the two halves are
summed by a reduce-scatter (another order), and the clipping norm is summed over shards. Each of these is a
float32 round-off, ~1e-7 relative. The loss curves must agree to rtol 1e-4 per step (we see ~1e-6). The
weights are compared by their update d = trained - initial over all tensors together, |d2 - d1| / |d1| <
1e-3 (we see ~1e-5): not per tensor, because AdamW divides each gradient by its running RMS, so a tensor whose
gradient is round-off-small (a top-1 router's, whose renormalised weight is always 1) takes lr-sized steps
in directions set by the round-off. Further apart, a token whose top-k choice sits within round-off of a
tie can pick another expert in one run than in the other, and the curves part by ~1e-3 from that step: the
runs here are short enough that none does (seen at step 10 of 12 in a longer run at lr 3e-3).
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import surgery
from surgery.calibrate import CalibrateConfig, calibrate
from surgery.cli import main
from surgery.errors import SurgeryError
from surgery.convert import ConvertConfig, convert_model
from surgery.modeling import save_converted

from helpers import make_llama

HERE = Path(__file__).resolve().parent
RTOL, UPDATE_TOL = 1e-4, 1e-3


def _env():
    # The workers import exactly what this process imports (the checkout's surgery, tests/helpers), one thread each.
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p), "OMP_NUM_THREADS": "1"}


def _torchrun(*args, timeout=180):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *map(str, args)]
    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.fixture
def models(tmp_path):
    """A dense teacher whose logits are sharp enough for KD to matter, and its E4 K1 conversion, on disk."""
    src = make_llama(tmp_path / "raw", ffn=96, layers=2)
    dense = surgery.load(src)
    with torch.no_grad():
        dense.model.norm.weight.fill_(4.0)
        for layer in dense.model.layers:
            for lin in (layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):
                lin.weight.mul_(3.0)
    dense.save_pretrained(str(tmp_path / "dense"))
    for f in src.glob("tokenizer*"):
        (tmp_path / "dense" / f.name).write_bytes(f.read_bytes())
    save_converted(convert_model(surgery.load(tmp_path / "dense"), ConvertConfig(experts=4, top_k=1, seed=1)),
                   tmp_path / "moe", tokenizer_from=tmp_path / "dense")
    return tmp_path / "dense", tmp_path / "moe"


def _close_updates(start: dict, a: dict, b: dict) -> None:
    """The trained update d = trained - initial, over all tensors together: |d_b - d_a| / |d_a| < UPDATE_TOL."""
    assert a.keys() == b.keys()
    da = torch.cat([(a[k] - w).flatten().double() for k, w in start.items()])
    db = torch.cat([(b[k] - w).flatten().double() for k, w in start.items()])
    assert da.norm() > 0
    assert ((db - da).norm() / da.norm()).item() < UPDATE_TOL


def _close_curves(a: list[dict], b: list[dict]) -> None:
    assert [h["step"] for h in a] == [h["step"] for h in b] and [h["tokens"] for h in a] == [h["tokens"] for h in b]
    for x, y in zip(a, b):
        for key in ("kd", "ce"):
            assert y[key] == pytest.approx(x[key], rel=RTOL), (x, y)


@pytest.mark.slow
@pytest.mark.parametrize("train", ["moe", "lora"])
def test_torchrun_calibrate_matches_single_process(tmp_path, models, text_file, train):
    """--train lora: peft's adapters on the attention projections, sharded with the rest and merged before
    saving, so the saved model is as plain as with moe (and its attention weights moved)."""
    if train == "lora":
        pytest.importorskip("peft")
    dense, moe = models
    flags = ["--teacher", dense, "--data", text_file, "--tokens", "1024", "--layerwise-tokens", "128", "--ctx", "32",
             "--batch-size", "4", "--lr", "3e-3", "--seed", "3", "--device", "cpu", "--train", train,
             "--lora-rank", "4", "--autocast", "off"]  # float32 on both sides (auto differs on AMX CPUs)
    one = CliRunner().invoke(main, ["calibrate", str(moe), str(tmp_path / "one"), *map(str, flags)])
    assert one.exit_code == 0, one.output
    r = _torchrun("-m", "surgery", "calibrate", moe, tmp_path / "two", *flags)
    summary = json.loads(r.stdout)  # one JSON document: rank 0 alone reports
    assert summary["processes"] == 2 and summary["e2e"]["steps"] == 8
    assert "error" not in r.stderr
    h1 = json.loads((tmp_path / "one.ckpt" / "history.json").read_text())
    h2 = json.loads((tmp_path / "two.ckpt" / "history.json").read_text())
    _close_curves(h1, h2)
    assert h2[-1]["kd"] < h2[0]["kd"]  # it trained
    assert (tmp_path / "two.ckpt" / "dcp-000008").is_dir()  # the final checkpoint is a distributed one
    # the saved model is an ordinary converted model: loads, equals the single-process one, evaluates alike
    a, b = surgery.load(tmp_path / "one").state_dict(), surgery.load(tmp_path / "two").state_dict()
    start = surgery.load(moe).state_dict()
    _close_updates(start, a, b)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not any("lora_" in k for k in b) and torch.equal(b[q], start[q]) == (train == "moe")
    ppl = []
    for name in ("one", "two"):
        e = CliRunner().invoke(main, ["eval", "perplexity", str(tmp_path / name), "--data", str(text_file),
                                      "--max-tokens", "256", "--ctx", "64", "--device", "cpu"])
        assert e.exit_code == 0, e.output
        ppl.append(json.loads(e.stdout)["perplexity"])
    assert ppl[1] == pytest.approx(ppl[0], rel=1e-4)


def test_an_uneven_batch_is_refused_once(tmp_path, monkeypatch):
    from surgery.distributed import Dist

    with pytest.raises(SurgeryError, match="--batch-size 3: not divisible by the 2 processes"):
        Dist(rank=0, world=2, local_rank=0, device=torch.device("cpu")).check_batch(3)
    # under torchrun every rank fails alike; only rank 0 prints the error (all exit with status 2)
    args = ["calibrate", str(tmp_path / "none"), str(tmp_path / "out"), "--teacher", str(tmp_path / "none")]
    for rank, printed in (("0", True), ("1", False)):
        monkeypatch.setenv("RANK", rank)
        r = CliRunner().invoke(main, args)
        assert r.exit_code == 2 and ("error:" in r.output) == printed


def test_local_batches_tile_the_global_batch():
    from surgery.distributed import Dist

    batch = torch.arange(24).reshape(6, 4)
    parts = [Dist(rank=r, world=3, local_rank=r, device=torch.device("cpu")).local(batch) for r in range(3)]
    assert torch.equal(torch.cat(parts), batch)


def _e2e(**kw):
    return CalibrateConfig.from_dict({"layerwise": None, "seed": 5, "e2e": {
        "tokens": 1536, "ctx": 32, "batch_size": 4, "lr": 3e-3, "checkpoint_every": 2, "autocast": "off", **kw}})


@pytest.mark.slow
def test_resume_from_a_distributed_checkpoint(tmp_path, models):
    """A 2-process run's step-6 checkpoint (of 12), as a kill then would leave it, resumed with 2 processes ends
    exactly where the uninterrupted 2-process run ends; resumed on 1 process (torch.distributed.checkpoint
    reshards) it goes on along the same curve."""
    dense, moe = models
    ids = torch.randint(1, 128, (2048,), generator=torch.Generator().manual_seed(0))
    torch.save(ids, tmp_path / "ids.pt")
    cfg = _e2e()
    common = ["--teacher", dense, "--student", moe, "--ids", tmp_path / "ids.pt", "--config", json.dumps(cfg.to_dict())]
    _torchrun(HERE / "dist_worker.py", *common, "--ckpt", tmp_path / "ck", "--out", tmp_path / "full.pt",
              "--copy-at", "6", "--copy-to", tmp_path / "killed")
    full = torch.load(tmp_path / "full.pt")
    state = json.loads((tmp_path / "killed" / "state.json").read_text())
    assert state["step"] == 6 and [p.name for p in (tmp_path / "killed").glob("dcp-*")] == ["dcp-000006"]
    shutil.copytree(tmp_path / "killed", tmp_path / "killed1")  # for the 1-process resume

    _torchrun(HERE / "dist_worker.py", *common, "--ckpt", tmp_path / "killed", "--resume", "--out", tmp_path / "two.pt")
    two = torch.load(tmp_path / "two.pt")
    assert two["history"] == full["history"] and len(full["history"]) == 12
    for k, v in full["state"].items():
        assert torch.equal(two["state"][k], v), k

    one = surgery.load(moe)
    res = calibrate(one, surgery.load(dense), None, cfg, tmp_path / "killed1", resume=True, ids=ids, progress=False)
    assert res["e2e"]["history"][:6] == full["history"][:6]
    _close_curves(full["history"], res["e2e"]["history"])
    _close_updates(surgery.load(moe).state_dict(), {k: full["state"][k] for k in one.state_dict()}, one.state_dict())


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs (nccl: one GPU a rank)")
def test_torchrun_on_two_gpus(tmp_path, models, text_file):
    dense, moe = models
    flags = ["--teacher", dense, "--data", text_file, "--tokens", "1024", "--layerwise-tokens", "128", "--ctx", "32",
             "--batch-size", "4", "--lr", "3e-3", "--seed", "3", "--device", "cuda"]
    r = _torchrun("-m", "surgery", "calibrate", moe, tmp_path / "two", *flags)
    summary = json.loads(r.stdout)
    assert summary["processes"] == 2 and summary["e2e"]["steps"] == 8
    h = json.loads((tmp_path / "two.ckpt" / "history.json").read_text())
    assert h[-1]["kd"] < h[0]["kd"]
    assert surgery.load(tmp_path / "two") is not None


def test_a_single_process_checkpoint_is_not_resumed_sharded(tmp_path, models):
    """Its optimizer state is per whole parameter: refused in one line rather than loaded into shards."""
    import torch.distributed as tdist

    from surgery.distributed import Dist

    dense, moe = models
    ids = torch.randint(1, 128, (2048,), generator=torch.Generator().manual_seed(0))
    cfg = _e2e(tokens=256)
    calibrate(surgery.load(moe), surgery.load(dense), None, cfg, tmp_path / "ck", ids=ids, progress=False)
    tdist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        with pytest.raises(SurgeryError, match="written by a single process; resume it without torchrun"):
            calibrate(surgery.load(moe), surgery.load(dense), None, cfg, tmp_path / "ck", resume=True, ids=ids,
                      progress=False, dist=Dist(rank=0, world=1, local_rank=0, device=torch.device("cpu")))
    finally:
        tdist.destroy_process_group()
