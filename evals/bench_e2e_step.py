"""Tokens per second of the end-to-end calibration stage (teacher forward, student forward and backward, KD,
fused AdamW) on the demo model's conversion, for each precision setting and KD path, in one process and on the
same windows. Writes JSON with the machine.

    python -m surgery_evals.bench_e2e_step [--convert '{"experts": 10, "shared_experts": 6, "top_k": 2}'] \\
        [--tokens 4096] [--settings off:logits,off,auto:student32,auto] [--repeats 2] \\
        [--json results/bench/e2e-step-cpu.json]

A setting is `autocast[:logits][:student32][:eager]`: autocast is EndToEndConfig.autocast (off, on, auto: what
each runs in bf16 is surgery.precision.Precision); `:logits` takes the whole-vocabulary logits path instead of the
chunked KD from final hidden states (e2e.chunked_kd false); `:student32` keeps the student in float32 (and its
float32 MoE paths) whatever the setting gives it: round 10's `auto` on a CPU with AMX; `:eager` runs the layers
eager (e2e.compile off; without it e2e.compile is on: every decoder layer compiled, surgery/compiled.py). The
first two steps of each run are warm-up (compiles included) and are not timed. The conversion is cached as the
quick ablations' (runs/ablation-cache/).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--convert", default='{"experts": 10, "shared_experts": 6, "top_k": 2}',
                    help="ConvertConfig fields as JSON (coactivation clustering and fitted routers unless given)")
    ap.add_argument("--tokens", type=int, default=4096, help="end-to-end tokens per timed run")
    ap.add_argument("--settings", default="off:logits,off,auto:student32,auto")
    ap.add_argument("--repeats", type=int, default=2, help="runs per setting, interleaved")
    ap.add_argument("--source", default="runs/smollm2")
    ap.add_argument("--json", dest="json_path", default="results/bench/e2e-step-cpu.json")
    a = ap.parse_args(argv)
    settings = a.settings.split(",")
    for s in settings:
        ac, *flags = s.split(":")
        if ac not in ("off", "on", "auto") or not set(flags) <= {"logits", "student32", "eager"}:
            ap.error(f"--settings: {s!r} is not autocast[:logits][:student32][:eager] with autocast off, on or auto")
    try:
        spec = {"method": "coactivation", "router_init": "fitted", **json.loads(a.convert)}
    except json.JSONDecodeError as e:
        ap.error(f"--convert: not JSON ({e})")

    import dataclasses

    import surgery.calibrate as calibrate
    from surgery.calibrate import EndToEndConfig, run_end_to_end
    from surgery.data import resolve_data, tokenize_file
    from surgery.modeling import load_model, load_tokenizer
    from surgery.moe import set_training_impl
    from surgery.precision import fast_bf16, precision_plan
    from surgery_evals.quick_ablation import converted_student
    from surgery_evals.report import machine

    torch.set_num_threads(min(2, torch.get_num_threads()))
    ids = tokenize_file(load_tokenizer(a.source), resolve_data(None), max(16384, 2 * a.tokens))
    teacher = load_model(a.source)
    cpu = torch.device("cpu")
    runs = {s: [] for s in settings}

    def plan(ac, student32):
        p = precision_plan(ac, cpu)
        return lambda *_, **__: dataclasses.replace(p, student_autocast=False) if student32 else p

    for r in range(a.repeats):
        for s in settings:
            ac, *flags = s.split(":")
            student = converted_student(spec, source=a.source)
            set_training_impl(student)
            cfg = EndToEndConfig(tokens=a.tokens + 512, ctx=256, batch_size=2, lr=3e-4, train="all", autocast=ac,
                                 chunked_kd="logits" not in flags, compile="off" if "eager" in flags else "on")
            marks = []
            calibrate.precision_plan = plan(ac, "student32" in flags)
            try:
                res = run_end_to_end(student, teacher, ids, cfg, progress=False,
                                     on_step=lambda: marks.append(time.time()))
            finally:
                calibrate.precision_plan = precision_plan
            timed = marks[-1] - marks[1]  # after two warm-up steps (compiled: the first forward and backward)
            tok = (len(marks) - 2) * 512
            runs[s].append({"tokens_per_s": round(tok / timed, 1), "kd_last": res["history"][-1]["kd"]})
            print(s, runs[s][-1], flush=True)
    out = {"convert": spec, "tokens": a.tokens, "ctx": 256, "batch_size": 2, "threads": torch.get_num_threads(),
           "fast_bf16": fast_bf16(cpu),
           "settings": {s: {"precision": {k: str(v) for k, v in
                                          vars(plan(s.split(":")[0], ":student32" in s)()).items()},
                            "kd": "logits" if ":logits" in s else "chunked",
                            "compile": "off" if ":eager" in s else "on",
                            "tokens_per_s": [x["tokens_per_s"] for x in runs[s]],
                            "median_tokens_per_s": sorted(x["tokens_per_s"] for x in runs[s])[len(runs[s]) // 2]}
                        for s in settings},
           "machine": machine()["summary"],
           "command": "python -m surgery_evals.bench_e2e_step " + " ".join(sys.argv[1:] if argv is None else argv)}
    if a.json_path:
        from surgery.atomic import write_json

        write_json(a.json_path, out)
    return out


if __name__ == "__main__":
    main()
