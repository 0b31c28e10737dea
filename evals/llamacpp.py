"""llama.cpp (through llama-cpp-python) as a consumer of our GGUF exports: logits and greedy tokens for the
export checks, and llama-bench-style throughput (prompt processing of N tokens in one batch, then decode of M
tokens one at a time, batch 1) for `surgery bench llamacpp`.

Build llama-cpp-python portably (no -march=native: the native build puts weights in an AMX buffer on Intel
AMX CPUs and crashes on the first decode), as the README's test command does:
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON
                -DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF -DLLAVA_BUILD=OFF"
"""

from __future__ import annotations

import json
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from surgery.errors import SurgeryError

CMAKE_ARGS = ("-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON "
              "-DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF -DLLAVA_BUILD=OFF")


def llama_cpp_module():
    try:
        import llama_cpp
    except ImportError:
        raise SurgeryError("llama-cpp-python is not installed: pip install llama-cpp-python==0.3.36 with "
                           f'CMAKE_ARGS="{CMAKE_ARGS}" (the README\'s test command does)') from None
    return llama_cpp


def load(path, n_ctx: int = 1024, threads: int = 2, logits_all: bool = True, n_batch: int = 512,
         kv_f32: bool = False):
    """A llama_cpp.Llama on the GGUF file `path`, quiet, CPU only. kv_f32: keep the KV cache in float32
    (llama.cpp's default is f16), for comparisons with a float32 reference."""
    llama_cpp = llama_cpp_module()
    path = Path(path)
    if not path.is_file():
        raise SurgeryError(f"{path}: no such GGUF file")
    try:
        return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                               n_batch=n_batch, n_ubatch=n_batch, logits_all=logits_all, n_gpu_layers=0,
                               verbose=False, seed=0, **({"type_k": 0, "type_v": 0} if kv_f32 else {}))
    except (ValueError, RuntimeError) as e:
        raise SurgeryError(f"{path}: llama.cpp cannot load it ({e})") from None


def logits(llm, tokens: list[int]) -> np.ndarray:
    """[T, V] float32 logits of every position of `tokens`, from an empty cache."""
    llm.reset()
    llm.eval(list(tokens))
    return np.array(llm.scores[: len(tokens)], dtype=np.float32)


def greedy(llm, prompt: list[int], steps: int) -> list[int]:
    """`steps` greedy tokens after `prompt` (argmax of llama.cpp's logits, KV cache kept between steps)."""
    llm.reset()
    llm.eval(list(prompt))
    out = []
    for _ in range(steps):
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(tok)
        llm.eval([tok])
    return out


# ---- throughput -----------------------------------------------------------------------------------------

def _decode(lib, ctx, tokens: list[int]) -> None:
    arr = (lib.llama_token * len(tokens))(*tokens)
    batch = lib.llama_batch_get_one(arr, len(tokens))
    rc = lib.llama_decode(ctx, batch)
    if rc != 0:
        raise RuntimeError(f"llama_decode returned {rc}")


class _Runner:
    """One GGUF loaded for llama-bench's two figures: run() processes `prompt` random tokens in one batch, then
    generates `decode` tokens one at a time after it (batch 1, KV cache growing), and returns the two tokens/s
    (wall-clock around llama_decode); the KV cache is cleared before each run."""

    def __init__(self, path, prompt: int, decode: int, threads: int, seed: int = 0):
        self.llm = load(path, n_ctx=prompt + decode + 8, threads=threads, logits_all=False, n_batch=prompt)
        self.lib = llama_cpp_module().llama_cpp
        self.mem = self.lib.llama_get_memory(self.llm.ctx)
        rng = random.Random(seed)
        vocab = self.llm.n_vocab()
        self.toks = [rng.randrange(vocab) for _ in range(prompt + decode)]
        self.prompt, self.decode = prompt, decode

    def run(self) -> tuple[float, float]:
        lib, ctx = self.lib, self.llm.ctx
        lib.llama_memory_clear(self.mem, True)
        t0 = time.perf_counter()
        _decode(lib, ctx, self.toks[:self.prompt])
        t1 = time.perf_counter()
        for i in range(self.decode):
            _decode(lib, ctx, [self.toks[self.prompt + i]])
        t2 = time.perf_counter()
        return self.prompt / (t1 - t0), self.decode / (t2 - t1)


def _summary(runs: list[tuple[float, float]], prompt: int, decode: int) -> dict:
    pp, tg = [r[0] for r in runs], [r[1] for r in runs]
    return {"pp": {"tokens": prompt, "tokens_per_s": statistics.median(pp), "runs": [round(x, 2) for x in pp]},
            "tg": {"tokens": decode, "tokens_per_s": statistics.median(tg), "runs": [round(x, 2) for x in tg]}}


def throughput_interleaved(paths: list, prompt: int = 512, decode: int = 128, threads: int = 2, repeats: int = 5,
                           warmup: int = 1, seed: int = 0) -> list[dict]:
    """throughput() of several GGUFs loaded together and measured in turn: `warmup` untimed runs of each, then
    `repeats` rounds in which each runs once, so that a shared machine's drifting speed lands on every model
    alike (it moves by 10-20% within minutes here). Medians of the rounds, one dict per path."""
    import torch

    from surgery_evals.throughput import interleaved_rounds

    runners = {k: _Runner(p, prompt, decode, threads, seed) for k, p in enumerate(paths)}
    runs = interleaved_rounds(runners, _Runner.run, torch.device("cpu"), warmup, repeats)
    del runners
    return [_summary(runs[k], prompt, decode) for k in range(len(paths))]


def throughput(path, prompt: int = 512, decode: int = 128, threads: int = 2, repeats: int = 5,
               warmup: int = 1, seed: int = 0) -> dict:
    """llama-bench's two figures on one model (_Runner.run), median of `repeats` runs after `warmup`."""
    return throughput_interleaved([path], prompt, decode, threads, repeats, warmup, seed)[0]


def system_info() -> dict:
    llama_cpp = llama_cpp_module()
    # which build ran: its CPU features (system_info) and where it was imported from (a second build can be put
    # first on PYTHONPATH, e.g. one with AVX-512 for this machine; the flags it was built with are not recorded)
    info = {"llama_cpp_python": llama_cpp.__version__, "module": str(Path(llama_cpp.__file__).parent)}
    try:
        info["system_info"] = llama_cpp.llama_print_system_info().decode().strip()
    except Exception:  # pragma: no cover - informational only
        pass
    return info


def _gguf_arch(path: Path) -> dict:
    import gguf

    r = gguf.GGUFReader(str(path))
    arch = r.fields["general.architecture"].contents()
    ftype = r.fields.get("general.file_type")
    out = {"architecture": arch, "file_type": int(ftype.contents()) if ftype else None}
    for key in ("expert_count", "expert_used_count", "expert_shared_feed_forward_length", "feed_forward_length"):
        f = r.fields.get(f"{arch}.{key}")
        if f is not None:
            out[key] = int(f.contents())
    return out


def bench(dense, converted: list, dtypes: list[str], json_path, threads: int = 2, repeats: int = 5,
          prompt: int = 512, decode: int = 128, workdir=None, progress: bool = True) -> dict:
    """Dense vs converted GGUF of the same dtype on llama.cpp. DENSE / CONVERTED: model folders (exported to
    GGUF here, once per dtype) or .gguf files (taken as they are; then `dtypes` must be the file's)."""
    from surgery.atomic import atomic_write_text
    from surgery_evals.throughput import paired_speedup
    from surgery_evals.report import machine
    from surgery.export.gguf import export_gguf, parse_gguf_dtype

    dtypes = [parse_gguf_dtype(d) for d in dtypes]
    paths = [Path(dense), *[Path(c) for c in converted]]
    for p in paths:
        if not p.exists():
            raise SurgeryError(f"{p}: no such model folder or .gguf file")
        if p.is_file() and p.suffix != ".gguf":
            raise SurgeryError(f"{p}: expected a model folder or a .gguf file")
    if any(p.is_file() for p in paths) and len(dtypes) != 1:
        raise SurgeryError("--dtype: with .gguf files give exactly the one dtype they were written in")
    info = system_info()
    rows = []
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        for dtype in dtypes:
            files = []
            for k, p in enumerate(paths):
                if p.is_file():
                    files.append(p)
                    continue
                f = Path(tmp) / f"{k}-{dtype}.gguf"
                export_gguf(p, f, dtype=dtype, progress=False)
                files.append(f)
            dense_row = None
            load_before = os.getloadavg()[0]
            measured = throughput_interleaved(files, prompt=prompt, decode=decode, threads=threads, repeats=repeats)
            load_after = os.getloadavg()[0]
            for k, (p, f, t) in enumerate(zip(paths, files, measured)):
                row = {"model": str(p), "role": "dense" if k == 0 else "converted", "dtype": dtype,
                       "gguf_bytes": os.path.getsize(f), **_gguf_arch(f), **t,
                       "loadavg_1min": [round(load_before, 2), round(load_after, 2)]}
                if k == 0:
                    dense_row = row
                else:
                    row["speedup_vs_dense"] = {
                        "pp": round(t["pp"]["tokens_per_s"] / dense_row["pp"]["tokens_per_s"], 3),
                        "tg": round(t["tg"]["tokens_per_s"] / dense_row["tg"]["tokens_per_s"], 3)}
                    row["speedup_paired"] = {k: paired_speedup(t[k]["runs"], dense_row[k]["runs"])
                                             for k in ("pp", "tg")}
                rows.append(row)
                if progress:
                    sp = row.get("speedup_vs_dense")
                    pr = row.get("speedup_paired")
                    print(f"{dtype} {p}: pp{prompt} {t['pp']['tokens_per_s']:.1f} tok/s, tg{decode} "
                          f"{t['tg']['tokens_per_s']:.1f} tok/s" + (f"  ({sp['pp']}x / {sp['tg']}x dense; paired "
                                                                    f"{pr['pp']}x / {pr['tg']}x)" if sp else ""),
                          flush=True)
    result = {"benchmark": "llama.cpp CPU throughput (llama-bench style)", "machine": machine(), **info,
              "config": {"threads": threads, "repeats": repeats, "prompt_tokens": prompt, "decode_tokens": decode,
                         "batch": 1, "statistic": "median",
                         "protocol": "every dtype's models loaded together, measured in turn (one warm-up run each, "
                                     "then `repeats` rounds of one run each)"},
              "results": rows}
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(json_path, json.dumps(result, indent=2) + "\n")
    return result
