"""Measure issue 13's CPU numbers: end-to-end calibration on 1 process against `torchrun --nproc-per-node 2`
(FSDP2 over gloo) at the same global batch and seed, and `eval perplexity` ordinary against `--stream`.

Every command runs as its own process, each under `flock LOCK` when --lock is given (one heavy job on a
shared machine at a time; the wait for the lock is not timed). Both calibrations use the same 2 cores: the
single process with 2 threads, each of the 2 ranks with 1.

    python evals/bench_scale_cpu.py --student runs/h13b-conv --teacher runs/smollm2 --work runs/h13b-bench \\
        --json results/scale/distributed-cpu.json --lock /tmp/surgery-heavy.lock
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

from surgery.atomic import write_json


def _run(cmd: list[str], threads: int, lock: str | None) -> tuple[float, str]:
    """(seconds inside the lock, stdout), with `threads` torch threads."""
    from surgery_evals.locked_run import run_locked

    seconds, _, out = run_locked(cmd, lock, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    return seconds, out


def _update_gap(start: Path, a: Path, b: Path) -> dict:
    """|d_b - d_a| / |d_a| over all trained tensors (d = calibrated - converted), and the largest |b - a|."""
    from surgery.modeling import load_model

    s0, sa, sb = (load_model(p).state_dict() for p in (start, a, b))
    num = den = 0.0
    worst = 0.0
    for k, w in s0.items():
        da, db = (sa[k] - w).double(), (sb[k] - w).double()
        num += float(((db - da) ** 2).sum())
        den += float((da ** 2).sum())
        worst = max(worst, float((sa[k] - sb[k]).abs().max()))
    return {"relative_update_gap": (num / den) ** 0.5 if den else None, "max_abs_weight_gap": worst}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--student", required=True, help="converted model")
    ap.add_argument("--teacher", required=True, help="its dense source")
    ap.add_argument("--work", required=True, help="folder for the calibrated models (replaced)")
    ap.add_argument("--json", required=True)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--ctx", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--eval-ctx", type=int, default=1024)
    ap.add_argument("--lock", default=None)
    a = ap.parse_args()
    work = Path(a.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    surgery = [sys.executable, "-m", "surgery"]
    flags = ["--teacher", a.teacher, "--tokens", str(a.tokens), "--layerwise-tokens", "0", "--ctx", str(a.ctx),
             "--batch-size", str(a.batch_size), "--lr", str(a.lr), "--seed", str(a.seed), "--device", "cpu"]
    runs = {}
    for name, launcher, threads in (
            ("1-process", surgery, 2),
            ("2-process-gloo", [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                                "-m", "surgery"], 1)):
        cmd = [*launcher, "calibrate", a.student, str(work / name), *flags]
        seconds, out = _run(cmd, threads, a.lock)
        result = json.loads(out)
        hist = json.loads((work / f"{name}.ckpt" / "history.json").read_text())
        runs[name] = {"command": " ".join(cmd), "omp_threads_per_process": threads, "wall_seconds": round(seconds, 2),
                      "e2e_seconds": result["e2e"]["seconds"], "steps": result["e2e"]["steps"],
                      "kd": [h["kd"] for h in hist], "ce": [h["ce"] for h in hist]}
    one, two = runs["1-process"], runs["2-process-gloo"]
    gaps = [abs(x - y) / abs(x) for x, y in zip(one["kd"], two["kd"])]
    compare = {"max_relative_kd_gap": max(gaps), **_update_gap(Path(a.student), work / "1-process",
                                                                work / "2-process-gloo")}

    evals = {}
    for name, model, extra in (("converted", a.student, []), ("converted --stream", a.student, ["--stream"]),
                               ("2-process output", str(work / "2-process-gloo"), []),
                               ("1-process output", str(work / "1-process"), [])):
        cmd = [*surgery, "eval", "perplexity", model, "--max-tokens", str(a.eval_tokens), "--ctx", str(a.eval_ctx),
               "--device", "cpu", *extra]
        seconds, out = _run(cmd, 2, a.lock)
        r = json.loads(out)
        evals[name] = {"command": " ".join(cmd), "perplexity": r["perplexity"], "nll": r["nll"],
                       "peak_rss_mb": r["peak_rss_mb"], "wall_seconds": round(seconds, 2),
                       **({"stream": r["stream"]} if "stream" in r else {})}
    report = {
        "machine": {"cpu": "AMD EPYC, 2 cores, AVX2, no GPU", "platform": platform.platform(),
                    "python": platform.python_version(), "torch": __import__("torch").__version__},
        "calibration": {"student": a.student, "teacher": a.teacher, "tokens": a.tokens, "ctx": a.ctx,
                        "global_batch": a.batch_size, "lr": a.lr, "seed": a.seed, "runs": runs, "compare": compare},
        "evaluation": {"data": "WikiText-2 test", "tokens": a.eval_tokens, "ctx": a.eval_ctx, "runs": evals,
                       "stream_equals_ordinary": evals["converted --stream"]["nll"] == evals["converted"]["nll"]},
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    write_json(a.json, report)
    print(json.dumps({"compare": compare, "seconds": {k: v["wall_seconds"] for k, v in runs.items()},
                      "eval": {k: (round(v["perplexity"], 4), v["peak_rss_mb"]) for k, v in evals.items()}}, indent=2))


if __name__ == "__main__":
    main()
