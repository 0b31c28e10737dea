"""Shared fixtures: tiny random Llama checkpoints written to disk, and the real demo model (cached)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # The Triton kernel tests run under the interpreter without a GPU. Set here, before any test module is
    # imported: triton reads it when first imported, and importing torch._dynamo (torch.compile, anywhere in
    # the session) imports triton.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from helpers import WORDS, make_llama

SHARED = Path(__file__).resolve().parent.parent.parent / "shared"


@pytest.fixture
def tiny_llama(tmp_path):
    return make_llama(tmp_path / "dense")


def _skips_without_cuda(item) -> bool:
    return any("CUDA" in str(m.kwargs.get("reason", "")) for m in item.iter_markers("skipif"))


def pytest_collection_modifyitems(config, items):
    for item in items:
        # The demo model is built once (download + dequantize, ~30 s) and cached for later runs.
        if "demo_model" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.demo)
        # Every test that skips without CUDA is a GPU test: `pytest -m gpu` selects them (evals/gpu_check.sh).
        if _skips_without_cuda(item):
            item.add_marker(pytest.mark.gpu)


@pytest.fixture(scope="session")
def demo_model():
    from surgery.demo import build_demo_model, cache_dir

    return build_demo_model(cache_dir() / "demo-smollm2-float32", "float32", progress=False)


@pytest.fixture(scope="session")
def wikitext_test():
    path = SHARED / "data" / "wikitext-2-raw" / "wiki.test.raw"
    if not path.is_file():
        pytest.skip(f"{path} is not present")
    return path


@pytest.fixture
def text_file(tmp_path):
    """A small text corpus any tokenizer can read."""
    path = tmp_path / "text.txt"
    words = WORDS
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, len(words), (3000,), generator=g).tolist()
    path.write_text(" ".join(words[i] for i in idx))
    return path
