"""What each end-to-end training mode costs and buys: `surgery calibrate --train moe|lora|all` on the same
converted model, budget and seed, each in its own process, then `surgery eval perplexity` of each result.

    python -m surgery_evals.bench_train_modes --student runs/quickstart-e40/convert/model --teacher runs/smollm2 \\
        --work runs/train-modes --tokens 8192 --json results/scale/train-modes-cpu.json --lock /tmp/surgery-heavy.lock

Per mode: trainable parameters (AdamW keeps two float32 states of each), the calibration process's peak
resident memory (from the kernel, wait4) and seconds, the first and last KD loss, and the perplexity of the
saved model. The memory argument for `lora` is the optimizer state it does not keep for attention weights.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from surgery.atomic import write_json


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--student", required=True, help="a converted model folder")
    ap.add_argument("--teacher", required=True, help="its dense source")
    ap.add_argument("--work", required=True, help="folder for the calibrated models")
    ap.add_argument("--modes", default="moe,lora,all")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--lora-rank", type=int, default=16)
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--lock", default=None, help="run each command under this flock (a shared machine)")
    ap.add_argument("--json", dest="json_path")
    a = ap.parse_args(argv)
    from surgery_evals.locked_run import run_locked as _run
    from surgery_evals.report import machine

    surgery = [sys.executable, "-m", "surgery"]
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for mode in a.modes.split(","):
        out = work / mode
        cmd = surgery + ["calibrate", a.student, str(out), "--teacher", a.teacher, "--tokens", str(a.tokens),
                         "--layerwise-tokens", "0", "--ctx", str(a.ctx), "--batch-size", str(a.batch_size),
                         "--lr", str(a.lr), "--train", mode, "--lora-rank", str(a.lora_rank), "--device", "cpu",
                         "--overwrite"]
        seconds, rss, stdout = _run(cmd, a.lock)
        summary = json.loads(stdout)
        e2e = summary["e2e"]
        _, _, ev = _run(surgery + ["eval", "perplexity", str(out), "--max-tokens", str(a.eval_tokens), "--ctx", "1024",
                                   "--device", "cpu"], a.lock)
        row = {"train": mode, "trainable_parameters": e2e["trainable_parameters"],
               "peak_rss_mb": round(rss, 1), "seconds": round(seconds, 1), "e2e_seconds": e2e["seconds"],
               "first_kd": e2e["first_kd"], "last_kd": e2e["last_kd"],
               "wikitext_perplexity": round(json.loads(ev)["perplexity"], 3)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {"what": f"surgery calibrate --train MODE, {a.tokens} tokens, ctx {a.ctx}, batch {a.batch_size}, "
                      f"lr {a.lr}, no layer-wise stage; perplexity on WikiText-2 test, {a.eval_tokens} tokens, "
                      "ctx 1024", "student": a.student, "teacher": a.teacher, "machine": machine(), "rows": rows,
              "command": "python -m surgery_evals.bench_train_modes " + " ".join(argv if argv is not None else sys.argv[1:])}
    if a.json_path:
        write_json(a.json_path, result, indent=1)
    return result


if __name__ == "__main__":
    main()
