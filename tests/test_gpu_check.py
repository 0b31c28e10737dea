"""evals/gpu_check.sh's logic that needs no GPU: the stage list, stage selection, bad input, refusing to run
without a GPU, and the receive stage. (The stages themselves run only on a GPU machine.)"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "evals" / "gpu_check.sh"
STAGES = ["receive", "env", "demo", "tests", "kernels", "model", "attention", "tiles", "profile", "graphs", "recipe"]


def run(*args, env=None, cwd=ROOT, script=SCRIPT):
    e = dict(os.environ, **(env or {}))
    return subprocess.run(["bash", str(script), *args], capture_output=True, text=True, env=e, cwd=cwd)


def run_in_copy(tmp_path, *args, env):
    """The script run from a copy of it in a fresh tree under tmp_path (its results/ land there, not in the
    repository). Returns (completed process, the tree)."""
    work = tmp_path / "tree"
    (work / "evals").mkdir(parents=True)
    (work / "evals" / "gpu_check.sh").write_text(SCRIPT.read_text())
    return run(*args, env=env, cwd=work, script=work / "evals" / "gpu_check.sh"), work


def failing_env(tmp_path):
    """Nothing carried and no venv: the demo stage fails (no GGUF parts), and so does kernels (no surgery)."""
    return {"GPU_CHECK_STASH": str(tmp_path / "stash"), "GPU_CHECK_NAME": "testgpu", "GPU_CHECK_ALLOW_NO_GPU": "1",
            "SURGERY_CACHE": str(tmp_path / "cache")}


def test_dry_run_lists_every_stage_in_order_within_30_minutes():
    r = run("--dry-run")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert [line.split()[0] for line in lines[:-1]] == STAGES
    limits = [int(line.split()[1].rstrip("s")) for line in lines[:-1]]
    assert sum(limits) <= 30 * 60 and lines[-1] == f"limit in all: {sum(limits)}s"
    text = r.stdout
    assert "bench kernels --json results/bench/kernels-NAME.json" in text
    assert "--synthetic llama2-7b -E 16 -K 4 --stock --runtime eager" in text
    assert "recipes/smollm2-50pct-gpu.yaml" in text and "-m gpu" in text
    assert "profile_layer attention --tokens 4096" in text and "--runtime graphs --decode-batch 1,8" in text


def test_stages_and_skip_select():
    r = run("--dry-run", "--stages", "tests,kernels")
    assert [line.split()[0] for line in r.stdout.splitlines()[:-1]] == ["tests", "kernels"]
    r = run("--dry-run", "--skip", "recipe,demo")
    assert [line.split()[0] for line in r.stdout.splitlines()[:-1]] == [s for s in STAGES if s not in ("recipe", "demo")]


@pytest.mark.parametrize("args", [["--stages", "tests,bogus"], ["--skip", "nope"], ["--frobnicate"], ["--stages"]])
def test_bad_input_is_one_line_and_status_2(args):
    r = run(*args)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("gpu_check: error:")


def test_refuses_to_run_gpu_stages_without_a_gpu(tmp_path):
    # PATH without nvidia-smi: the script must stop before doing anything, loudly.
    r = run("--stages", "tests", env={"PATH": "/usr/bin:/bin", "GPU_CHECK_STASH": str(tmp_path / "stash")})
    assert r.returncode == 1 and "no NVIDIA GPU" in r.stderr
    assert not (tmp_path / "stash").exists()


def test_receive_stage_keeps_what_was_carried_and_writes_a_timed_summary(tmp_path):
    carry, stash = tmp_path / "carry", tmp_path / "stash"
    (carry / "base" / "wheels").mkdir(parents=True)
    (carry / "base" / "wheels" / "x.whl").write_text("w")
    (carry / "part1").mkdir()
    (carry / "part1" / "a.part-aa").write_text("1")
    env = {"GPU_CHECK_CARRY": str(carry), "GPU_CHECK_STASH": str(stash), "GPU_CHECK_NAME": "testgpu"}
    r, work = run_in_copy(tmp_path, "--stages", "receive", env=env)
    assert r.returncode == 0, r.stderr
    assert (stash / "wheels" / "x.whl").read_text() == "w" and (stash / "a.part-aa").read_text() == "1"
    summary = json.loads((work / "results" / "gpu-check" / "gpu-check-testgpu.json").read_text())
    assert summary["gpu"] == "testgpu" and summary["exit_status"] == 0
    assert [s["stage"] for s in summary["stages"]] == ["receive"] and summary["stages"][0]["status"] == "ok"
    assert isinstance(summary["stages"][0]["seconds"], int)


def test_a_failing_stage_stops_the_check_with_its_name(tmp_path):
    # The demo stage with nothing carried fails (no GGUF parts), and says so; later stages do not run.
    r, work = run_in_copy(tmp_path, "--stages", "demo,kernels", env=failing_env(tmp_path))
    assert r.returncode == 1
    assert "no parts of SmolLM2-135M-Instruct.Q4_1.gguf" in r.stderr and "stage 'demo' failed" in r.stderr
    summary = json.loads((work / "results" / "gpu-check" / "gpu-check-testgpu.json").read_text())
    assert [s["stage"] for s in summary["stages"]] == ["demo"] and summary["exit_status"] == 1


def test_keep_going_runs_the_later_stages_and_still_fails(tmp_path):
    # Both stages fail here (no GGUF parts; no venv holding surgery): with --keep-going both are tried and
    # recorded, and the script still ends with status 1 naming them.
    r, work = run_in_copy(tmp_path, "--stages", "demo,kernels", "--keep-going", env=failing_env(tmp_path))
    assert r.returncode == 1
    assert "--keep-going: on to the next stage" in r.stderr and "failed stages: demo kernels" in r.stderr
    summary = json.loads((work / "results" / "gpu-check" / "gpu-check-testgpu.json").read_text())
    assert [s["stage"] for s in summary["stages"]] == ["demo", "kernels"] and summary["exit_status"] == 1
    assert all(s["status"].startswith("failed") for s in summary["stages"])


def test_only_what_this_call_wrote_goes_back_in_OUT(tmp_path):
    """The lent machine returns a few files from $OUT: results committed earlier (older than the call) are not
    copied there, results the call wrote and the summary are."""
    out = tmp_path / "out"
    out.mkdir()
    work = tmp_path / "tree"
    (work / "results" / "bench").mkdir(parents=True)
    (work / "results" / "attention").mkdir(parents=True)
    old = work / "results" / "bench" / "kernels-testgpu.json"
    new = work / "results" / "attention" / "prefill-llama2-7b-testgpu.json"
    old.write_text("{}")
    new.write_text("{}")
    os.utime(old, (1e9, 1e9))  # 2001: before the call
    future = 4e9  # 2096: as if written during the call
    os.utime(new, (future, future))
    env = dict(failing_env(tmp_path), OUT=str(out))
    r, _ = run_in_copy(tmp_path, "--stages", "receive", env=env)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["gpu-check-testgpu.json", "prefill-llama2-7b-testgpu.json"]
