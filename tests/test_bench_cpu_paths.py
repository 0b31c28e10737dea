"""evals/bench_cpu_paths.py: every path timed on a converted model's real FFN inputs, against dense."""

import json

import pytest

import surgery
from surgery.convert import ConvertConfig, convert_model
from surgery.modeling import save_converted
from surgery.moe import moe_blocks
from surgery_evals import bench_cpu_paths
from surgery_kernels import cpu_moe

from helpers import make_llama


def test_times_each_path_and_names_the_auto_choice(tmp_path, text_file):
    src = make_llama(tmp_path / "dense", ffn=96, layers=2)
    model = convert_model(surgery.load(src), ConvertConfig(experts=6, top_k=2, shared_experts=1, seed=1))
    save_converted(model, tmp_path / "conv", tokenizer_from=src)
    out = tmp_path / "paths.json"
    r = bench_cpu_paths.main(["--converted", str(tmp_path / "conv"), "--dense", str(src), "--tokens", "4,64",
                              "--paths", "masked,grouped", "--rounds", "2", "--data", str(text_file),
                              "--json", str(out)])
    assert r["layers"] == 2 and set(r["tokens"]) == {4, 64}
    width = moe_blocks(model)[0].experts.gate_proj.shape[1]
    for T, row in r["tokens"].items():
        assert set(row["ms_all_layers"]) == {"dense", "masked", "grouped"}
        assert all(v > 0 for v in row["ms_all_layers"].values())
        assert row["auto"] == cpu_moe.choose_path(T, 6, 2, width)
        assert row["busiest_expert_over_mean"] >= 1.0
        # float32 paths against the reference: summation order only
        assert set(row["max_abs_diff_vs_reference"]) == {"masked", "grouped"}
        assert all(d < 1e-4 for d in row["max_abs_diff_vs_reference"].values())
    saved = json.loads(out.read_text())
    assert saved["command"].startswith("python -m surgery_evals.bench_cpu_paths") and "64" in saved["tokens"]


def test_refuses_a_dense_model_and_bad_flags(tmp_path, text_file, capsys):
    src = make_llama(tmp_path / "dense", ffn=96, layers=2)
    with pytest.raises(SystemExit) as e:
        bench_cpu_paths.main(["--converted", str(src), "--dense", str(src), "--tokens", "4",
                              "--data", str(text_file)])
    assert e.value.code == 2 and "not a converted model" in capsys.readouterr().err
    for args, named in ((["--paths", "masked,warp"], "--paths"), (["--tokens", "4,x"], "--tokens")):
        with pytest.raises(SystemExit) as e:
            bench_cpu_paths.main(["--converted", str(src)] + args)
        assert e.value.code == 2 and named in capsys.readouterr().err
