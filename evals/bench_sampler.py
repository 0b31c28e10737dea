"""Throughput of the calibration sampler (surgery.data.sample_corpus) on the demo model: the old settings (batch
32, nucleus over a full sort of the vocabulary, float32), the new (batches up to 128, nucleus among the 1,024
most likely tokens, float32) and the new from a bfloat16 copy of the model (what sample_corpus does by default
on CPUs with AMX / AVX-512 BF16). Writes results/quality/sampler-cpu.json.

    python -m surgery_evals.bench_sampler [--tokens 16384] [--model runs/smollm2] [--runs old,new,new-bf16]
"""

from __future__ import annotations

import argparse
import time

import torch

from surgery.atomic import write_json


def main(argv=None) -> dict:
    from surgery.data import sample_corpus
    from surgery.modeling import load_model, load_tokenizer
    from surgery_evals.report import machine

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--model", default="runs/smollm2")
    ap.add_argument("--out", default="results/quality/sampler-cpu.json")
    ap.add_argument("--runs", default="old,new,new-bf16", help="which settings, comma-separated")
    args = ap.parse_args(argv)
    model, tok = load_model(args.model), load_tokenizer(args.model)
    runs = []
    settings = {"old": ("old: batch 32, full sort", 32, 10 ** 9, False),
                "new": ("new: batch up to 128, top-1024", 128, 1024, False),
                "new-bf16": ("new, from a bfloat16 copy", 128, 1024, True)}
    unknown = [k for k in args.runs.split(",") if k not in settings]
    if unknown:
        ap.error(f"--runs: unknown setting {unknown[0]!r} (choose from {', '.join(settings)})")
    for key in args.runs.split(","):
        name, batch, candidates, bf16 = settings[key]
        t0 = time.time()
        sample_corpus(model, tok, args.tokens, batch_size=batch, candidates=candidates, progress=False, bf16=bf16)
        dt = time.time() - t0
        runs.append({"setting": name, "batch": min(batch, -(-args.tokens // 256)), "seconds": round(dt, 1),
                     "tokens_per_s": round(args.tokens / dt, 1)})
        print(runs[-1], flush=True)
    res = {"tokens": args.tokens, "seq_len": 256, "threads": torch.get_num_threads(), "runs": runs,
           "machine": machine()["summary"]}
    write_json(args.out, res)
    return res


if __name__ == "__main__":
    main()
