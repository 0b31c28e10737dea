"""The kernel benchmark's quick CPU run: it finishes fast and writes the documented JSON schema."""

from __future__ import annotations

import json

import torch

from surgery_evals.bench_kernels import bench_kernels


def test_bench_kernels_quick_cpu_schema(tmp_path):
    out = tmp_path / "bench" / "kernels.json"
    result = bench_kernels(out, device="cpu", quick=True)
    on_disk = json.loads(out.read_text())
    assert on_disk == json.loads(json.dumps(result))
    assert not list(out.parent.glob(".*tmp*"))  # written atomically: no temporary left behind
    assert result["path"] == "reference (CPU)"
    assert isinstance(result["device"], str)
    assert {"torch", "triton", "cuda"} <= set(result["versions"])
    assert result["versions"]["torch"] == torch.__version__
    rows = result["rows"]
    assert rows
    for row in rows:
        assert set(row) == {"shape", "experts", "top_k", "tokens", "impl", "ms", "ratio_to_dense", "ratio_to_ideal"}
        assert row["shape"] in ("llama2-7b", "mixtral")
        assert row["impl"] in ("ours", "dense", "ideal")  # only the reference path runs on CPU, beside the anchors
        assert row["tokens"] <= 16 and row["top_k"] <= row["experts"]
        assert row["ms"] > 0 and row["ratio_to_dense"] > 0 and row["ratio_to_ideal"] > 0
    for key in {(r["shape"], r["experts"], r["top_k"], r["tokens"]) for r in rows}:
        got = {r["impl"]: r for r in rows if (r["shape"], r["experts"], r["top_k"], r["tokens"]) == key}
        assert set(got) == {"ours", "dense", "ideal"}
        assert got["dense"]["ratio_to_dense"] == 1.0 and got["ideal"]["ratio_to_ideal"] == 1.0


def test_ffn_block_breakdown_times_every_piece(tmp_path):
    """evals/ffn_block_breakdown.py on a tiny converted model: every piece timed, for each token count."""
    from helpers import make_llama
    from surgery.convert import ConvertConfig, convert
    from surgery_evals.ffn_block_breakdown import main

    src = make_llama(tmp_path / "dense", ffn=96)
    convert(src, tmp_path / "moe", ConvertConfig(experts=6, shared_experts=2, top_k=2), progress=False)
    r = main(["--converted", str(tmp_path / "moe"), "--dense", str(src), "--layer", "1", "--tokens", "1,4",
              "--rounds", "1", "--calls", "3", "--json", str(tmp_path / "b.json")])
    pieces = {"dense", "block", "routing+masked", "masked", "sorted", "grouped", "two matmuls"}
    assert set(r["tokens"]) == {1, 4} and all(set(v) == pieces and min(v.values()) > 0 for v in r["tokens"].values())
    assert json.loads((tmp_path / "b.json").read_text())["layer"] == 1
