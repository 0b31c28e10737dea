"""Throughput of the calibration sampler (surgery.data.sample_corpus), before and after its speed-up: the old
settings (batch 32, nucleus over a full sort of the vocabulary) against the new (batches up to 128, nucleus
among the 1,024 most likely tokens), on the demo model. Writes results/quality/sampler-cpu.json.

    python -m surgery_evals.bench_sampler [--tokens 16384] [--model runs/smollm2]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def main(argv=None) -> dict:
    from surgery.data import sample_corpus
    from surgery.modeling import load_model, load_tokenizer
    from surgery_evals.report import machine

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--model", default="runs/smollm2")
    ap.add_argument("--out", default="results/quality/sampler-cpu.json")
    args = ap.parse_args(argv)
    model, tok = load_model(args.model), load_tokenizer(args.model)
    runs = []
    for name, batch, candidates in (("old: batch 32, full sort", 32, 10 ** 9), ("new: batch up to 128, top-1024", 128, 1024)):
        t0 = time.time()
        sample_corpus(model, tok, args.tokens, batch_size=batch, candidates=candidates, progress=False)
        dt = time.time() - t0
        runs.append({"setting": name, "batch": min(batch, -(-args.tokens // 256)), "seconds": round(dt, 1),
                     "tokens_per_s": round(args.tokens / dt, 1)})
        print(runs[-1], flush=True)
    res = {"tokens": args.tokens, "seq_len": 256, "threads": torch.get_num_threads(), "runs": runs,
           "machine": machine()["summary"]}
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    return res


if __name__ == "__main__":
    main()
