"""evals/router_drift.py: router movement between a start and a calibrated model, from folders or cache files."""

import json

import pytest
import torch

import surgery
from surgery.convert import ConvertConfig, convert_model
from surgery.modeling import save_converted
from surgery.moe import moe_blocks
from surgery_evals import router_drift

from helpers import make_llama


def test_drift_is_zero_for_the_same_routers_and_measures_a_moved_one(tmp_path):
    src = make_llama(tmp_path / "dense", ffn=96, layers=2)
    model = convert_model(surgery.load(src), ConvertConfig(experts=4, top_k=1, seed=1))
    torch.save({"state": model.state_dict()}, tmp_path / "convert-x.pt")  # quick_ablation's cache layout
    save_converted(model, tmp_path / "start", tokenizer_from=src)
    w = moe_blocks(model)[1].router.weight
    with torch.no_grad():
        delta = torch.zeros_like(w)
        delta[0, :3] = 0.5
        w.add_(delta)
    want = float(delta.norm() / (w.detach() - delta).norm())
    save_converted(model, tmp_path / "moved", tokenizer_from=src)
    same = router_drift.main([str(tmp_path / "start"), str(tmp_path / "convert-x.pt")])
    assert same["blocks"] == 2 and same["relative_change_max"] == 0.0 and same["changed_fraction_mean"] == 0.0
    res = router_drift.main([str(tmp_path / "moved"), str(tmp_path / "start"), "--json", str(tmp_path / "d.json")])
    rows = {r["router"]: r for r in res["per_block"]}
    assert rows["model.layers.0.mlp.router.weight"]["relative_change"] == 0.0
    moved = rows["model.layers.1.mlp.router.weight"]
    assert moved["relative_change"] == pytest.approx(want, rel=1e-5)
    assert moved["changed_fraction"] == pytest.approx(3 / w.numel())
    assert json.loads((tmp_path / "d.json").read_text())["relative_change_max"] == pytest.approx(want, rel=1e-5)


def test_bad_paths_exit_2_naming_them(tmp_path, capsys):
    src = make_llama(tmp_path / "dense", ffn=96, layers=2)
    for args, named in (([str(tmp_path / "nope"), str(src)], "nope"), ([str(src), str(src)], "no MoE router")):
        with pytest.raises(SystemExit) as e:
            router_drift.main(args)
        assert e.value.code == 2 and named in capsys.readouterr().err
