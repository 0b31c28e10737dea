"""The CLI end to end on a tiny random Llama: convert -> eval perplexity -> info, JSON all the way."""

import json
import math
import subprocess
import sys

import torch
from click.testing import CliRunner

import surgery
from surgery.cli import main
from surgery.data import tokenize_file
from surgery.modeling import load_tokenizer


def invoke(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


def test_help_teaches():
    out = invoke("--help").stdout
    for command in ("demo-model", "convert", "eval", "info"):
        assert command in out
    assert "--experts" in invoke("convert", "--help").stdout


def test_convert_eval_info_end_to_end(tmp_path, tiny_llama, text_file):
    moe = tmp_path / "moe"
    summary = json.loads(invoke("convert", tiny_llama, moe, "-E", 4, "-K", 2, "-S", 1,
                                "--json", tmp_path / "convert.json").stdout)
    assert summary == json.loads((tmp_path / "convert.json").read_text())
    # 96 neurons in 5 groups: shared 20, experts 4 x 19; a token uses 2 experts + the shared one.
    assert summary["expert_sizes"] == [19, 19, 19, 19]
    assert summary["active_ffn_fraction"] == round((2 * 19 + 20) / 96, 6)
    assert (moe / "tokenizer.json").is_file()

    res = {}
    for name, model, extra in [("dense", tiny_llama, []), ("moe", moe, []), ("moe_dense", moe, ["--dense-routing"])]:
        path = tmp_path / f"{name}.json"
        invoke("eval", "perplexity", model, "--data", text_file, "--max-tokens", 600, "--ctx", 128,
               "--device", "cpu", "--json", path, *extra)
        res[name] = json.loads(path.read_text())
    for r in res.values():
        assert {"perplexity", "tokens", "ctx", "seconds", "tokens_per_second", "active_ffn_fraction"} <= r.keys()
        assert r["tokens"] == 600 and r["ctx"] == 128 and r["windows"] == 5
    assert res["dense"]["active_ffn_fraction"] == 1.0 and res["moe"]["active_ffn_fraction"] < 1.0
    # Dense routing reproduces the dense model, so its perplexity too.
    assert math.isclose(res["moe_dense"]["perplexity"], res["dense"]["perplexity"], rel_tol=1e-5)

    # The perplexity matches a direct computation with the model's own loss.
    model, tok = surgery.load(tiny_llama), load_tokenizer(tiny_llama)
    ids = tokenize_file(tok, text_file, 600)
    nll = n = 0.0
    with torch.no_grad():
        for i in range(0, 600, 128):
            w = ids[i:i + 128][None]
            loss = model(input_ids=w, labels=w).loss
            nll += loss.item() * (w.shape[1] - 1)
            n += w.shape[1] - 1
    assert math.isclose(res["dense"]["perplexity"], math.exp(nll / n), rel_tol=1e-5)

    info = json.loads(invoke("info", moe, "--json").stdout)
    assert info["experts"] == 4 and info["top_k"] == 2 and info["shared_experts"] == 1
    assert info["active_parameters"] < info["total_parameters"]
    dense_info = json.loads(invoke("info", tiny_llama, "--json").stdout)
    assert dense_info["total_parameters"] + 2 * 4 * 64 <= info["total_parameters"]  # routers (+ padding)
    assert "total_parameters" in invoke("info", moe).stdout


def test_console_script_runs_as_module():
    r = subprocess.run([sys.executable, "-m", "surgery.cli", "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and "0.1.0" in r.stdout


def test_kernels_folder_never_shadows_pypi_kernels():
    """Run from the repo root (where the kernels/ folder is): `kernels` must not resolve to our files, and
    transformers must believe the hub `kernels` package is installed exactly when its distribution is (recent
    transformers depend on it; older ones do not)."""
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    code = ("import importlib.util, importlib.metadata as m, surgery_kernels; s = importlib.util.find_spec('kernels');"
            "print(s is not None and s.origin is not None and s.origin.startswith(%r));"
            "from transformers.utils import import_utils as u\n"
            "try:\n    m.distribution('kernels'); installed = True\n"
            "except m.PackageNotFoundError:\n    installed = False\n"
            "print(u.is_kernels_available() == installed)") % str(root / "kernels")
    r = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["False", "True"]
