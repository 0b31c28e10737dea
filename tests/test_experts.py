"""Modularity on a tiny converted model: expert statistics, pruning, extension (issue 12)."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from helpers import WORDS, relative_error
from surgery.cli import main
from surgery.convert import ConvertConfig, convert
from surgery.experts.extend import ExtendConfig, extend_model
from surgery.experts.prune import prune_model, reconstruction_keep
from surgery.experts.stats import domain_stats, expert_outputs
from surgery.modeling import load_model, save_converted
from surgery.moe import moe_blocks, set_dense_routing


@pytest.fixture
def tiny_moe(tmp_path, tiny_llama):
    """6 routed experts (top-2) + 2 shared on a 96-wide FFN: 12 neurons each."""
    out = tmp_path / "moe"
    convert(tiny_llama, out, ConvertConfig(experts=6, top_k=2, shared_experts=2, seed=3), progress=False)
    return out


@pytest.fixture
def domain(tmp_path):
    g = torch.Generator().manual_seed(0)
    words = [WORDS[i] for i in torch.randint(0, len(WORDS), (3000,), generator=g).tolist()]
    path = tmp_path / "domain.txt"
    path.write_text(" ".join(words))
    return path


def _ids(n=600, seed=0):
    return torch.randint(0, 128, (n,), generator=torch.Generator().manual_seed(seed))


def test_stats_fractions_sum_to_top_k(tiny_moe):
    model = load_model(tiny_moe)
    s = domain_stats(model, _ids(), ctx=100, progress=False)
    assert len(s["layers"]) == 2
    for layer in s["layers"]:
        assert sum(layer["fraction"]) == pytest.approx(2.0, abs=1e-9)  # every token picks top-2 experts
        assert 0 < layer["usage_entropy"] <= 1 + 1e-9 and 0 < layer["router_entropy"] <= 1 + 1e-9
        # contribution = fraction x mean(weight x norm | routed), so it cannot exceed fraction x max norm
        assert all(c >= 0 for c in layer["contribution"])


def test_stats_cli_two_domains_overlap_and_plot(tmp_path, tiny_moe, domain):
    other = tmp_path / "other.txt"
    other.write_text(" ".join(["router token layer"] * 400))
    res = CliRunner().invoke(main, ["experts", "stats", str(tiny_moe), "--data", f"a={domain}", "--data",
                                    f"b={other}", "--tokens", "500", "--ctx", "100", "--json",
                                    str(tmp_path / "s.json"), "--plot", str(tmp_path / "s.png")])
    assert res.exit_code == 0, res.output
    full = json.loads((tmp_path / "s.json").read_text())
    ov = full["overlap"]["a|b"]
    assert len(ov["jaccard_top_k"]) == 2 and all(0 <= j <= 1 for j in ov["jaccard_top_k"])
    assert (tmp_path / "s.png").stat().st_size > 1000
    # a domain against itself overlaps completely
    from surgery.experts.stats import overlap

    d = full["domains"]["a"]
    assert overlap(d, d)["mean_histogram_intersection"] == pytest.approx(1.0)


def test_prune_keeps_experts_bit_identical_and_routes_among_them(tmp_path, tiny_moe):
    model = load_model(tiny_moe)
    before = [(b.experts.gate_proj.clone(), b.experts.up_proj.clone(), b.experts.down_proj.clone(),
               b.router.weight.clone(), b.shared_expert.gate_proj.weight.clone()) for b in moe_blocks(model)]
    x = torch.randn(50, 64)
    blk0 = moe_blocks(model)[0]
    kept = [[0, 2, 5], [1, 3, 4]]
    # expected pruned output: the unpruned block's routing with the pruned experts' logits at -inf
    from surgery.experts.stats import route

    keep0 = torch.zeros(6, dtype=torch.bool)
    keep0[kept[0]] = True
    w, ids = route(blk0, x, keep0)
    y_all = expert_outputs(blk0, x)
    want = (y_all.gather(1, ids[..., None].expand(-1, -1, 64)) * w[..., None]).sum(1) + blk0.shared_expert(x)
    want_dense = y_all[:, kept[0]].sum(1) + blk0.shared_expert(x)
    prune_model(model, kept, record={"op": "prune"})
    for b, k, (g, u, d, r, s) in zip(moe_blocks(model), kept, before):
        assert torch.equal(b.experts.gate_proj, g[k]) and torch.equal(b.experts.up_proj, u[k])
        assert torch.equal(b.experts.down_proj, d[k]) and torch.equal(b.router.weight, r[k])
        assert torch.equal(b.shared_expert.gate_proj.weight, s)
    assert relative_error(blk0(x), want) < 1e-5
    blk0.dense_routing = True  # dense routing of the pruned block = its kept experts + shared, unit weights
    assert relative_error(blk0(x), want_dense) < 1e-5
    # saved and loaded back: same config and same logits
    save_converted(model, tmp_path / "pruned", tokenizer_from=tiny_moe)
    again = load_model(tmp_path / "pruned")
    assert again.surgery_config.num_experts == 3 and again.surgery_config.modules[-1]["op"] == "prune"
    assert len(again.surgery_config.permutations[0]) == again.surgery_config.shared_width + sum(
        again.surgery_config.expert_sizes)
    ids_ = _ids(40)[None]
    set_dense_routing(model, False)
    assert torch.equal(again(input_ids=ids_).logits, model(input_ids=ids_).logits)


def test_reconstruction_exact_search_beats_or_ties_frequency(tiny_moe):
    model = load_model(tiny_moe)
    blk = moe_blocks(model)[0]
    x = torch.randn(300, 64)
    from surgery.experts.prune import _routed_error
    from surgery.experts.stats import route

    y = expert_outputs(blk, x)
    w, ids = route(blk, x)
    target = (y.gather(1, ids[..., None].expand(-1, -1, 64)) * w[..., None]).sum(1)
    best = reconstruction_keep(blk, x, 3)  # C(6, 3) = 20 subsets: exact search
    freq = torch.bincount(ids.flatten(), minlength=6).float().topk(3).indices.tolist()

    def err(k):
        m = torch.zeros(6, dtype=torch.bool)
        m[k] = True
        return _routed_error(blk, y, x, target, m)

    assert err(best) <= err(freq) + 1e-9
    assert err(list(range(6))) < 1e-9  # keeping everything reproduces the unpruned output


@pytest.mark.parametrize("criterion", ["frequency", "weighted-norm", "reconstruction"])
def test_prune_cli_writes_a_model_every_command_reads(tmp_path, tiny_moe, domain, criterion):
    out = tmp_path / "p"
    res = CliRunner().invoke(main, ["prune", str(tiny_moe), str(out), "--data", str(domain), "--keep-experts", "4",
                                    "--criterion", criterion, "--tokens", "400"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.output[res.output.index("{"):])
    assert summary["kept_experts"] == 4 and len(summary["kept"]) == 2
    assert summary["bytes"] < summary["source_bytes"]
    info = CliRunner().invoke(main, ["info", str(out), "--json"])
    assert info.exit_code == 0 and json.loads(info.output)["experts"] == 4
    ev = CliRunner().invoke(main, ["eval", "perplexity", str(out), "--data", str(domain), "--max-tokens", "200",
                                   "--ctx", "100"])
    assert ev.exit_code == 0, ev.output
    ex = CliRunner().invoke(main, ["export", str(out), str(tmp_path / "q"), "--format", "qwen2_moe"])
    assert ex.exit_code == 0, ex.output


@pytest.mark.parametrize("args, message", [
    (["--keep-experts", "1"], "fewer than top-k"),
    (["--keep-fraction", "0.1"], "fewer than top-k"),
    (["--keep-experts", "9"], "between 1 and"),
    (["--keep-experts", "3", "--keep-fraction", "0.5"], "exactly one"),
])
def test_prune_bad_flags(tmp_path, tiny_moe, domain, args, message):
    res = CliRunner().invoke(main, ["prune", str(tiny_moe), str(tmp_path / "p"), "--data", str(domain), *args])
    assert res.exit_code == 2 and message in res.output
    assert not (tmp_path / "p").exists()


def test_prune_empty_domain_file(tmp_path, tiny_moe):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    res = CliRunner().invoke(main, ["prune", str(tiny_moe), str(tmp_path / "p"), "--data", str(empty),
                                    "--keep-experts", "3"])
    assert res.exit_code == 2 and "empty.txt" in res.output and "fewer than 2 tokens" in res.output
    assert not (tmp_path / "p").exists()


def _logits(model, ids):
    with torch.no_grad():  # one kernel path (the CPU inference path) on both sides of every comparison
        return model(input_ids=ids).logits


def test_extend_zero_init_is_unchanged_then_trains_only_new_parameters(tmp_path, tiny_moe):
    model = load_model(tiny_moe)
    probe = _ids(64, seed=5)[None]
    before_logits = _logits(model, probe)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    from surgery.experts import extend as ext

    # zero init alone (no training): logits bit-identical
    ext.add_pools(model, 3, 1, "zero", [[0, 1, 2]] * 2)
    assert torch.equal(_logits(model, probe), before_logits)
    model = load_model(tiny_moe)
    cfg = ExtendConfig(new_experts=3, init="zero", tokens=2 * 2 * 64, ctx=64, batch_size=2, lr=1e-2,
                       memory_tokens=128, balance=0.01, concentration=0.01)
    rec = extend_model(model, _ids(800, 1), cfg, memory_ids=_ids(400, 2), progress=False)
    assert rec["train"]["steps"] == 2 and rec["router_tuning"]["steps"] == 2
    after = model.state_dict()
    for k, v in before.items():  # every old parameter bit-identical
        assert torch.equal(after[k], v), k
    new = [k for k in after if ".extensions." in k]
    assert new and any(not torch.equal(after[k], torch.zeros_like(after[k])) for k in new if "down_proj" in k)
    # the base model is the extended one with its pools off
    from surgery.experts.extend import set_extensions

    set_extensions(model, False)
    assert torch.equal(_logits(model, probe), before_logits)
    set_extensions(model, True)
    assert not torch.equal(_logits(model, probe), before_logits)
    # dense routing switches pools off too: the dense model again
    set_dense_routing(model)
    set_extensions(model, True)
    dense = load_model(tiny_moe)
    set_dense_routing(dense)
    assert torch.equal(_logits(model, probe), _logits(dense, probe))
    # saved and loaded back exactly, pools included
    set_dense_routing(model, False)
    save_converted(model, tmp_path / "ext", tokenizer_from=tiny_moe)
    again = load_model(tmp_path / "ext")
    assert len(again.surgery_config.extensions) == 1 and again.surgery_config.modules[-1]["op"] == "extend"
    assert torch.equal(_logits(again, probe), _logits(model, probe))


def test_extend_cli_and_errors(tmp_path, tiny_moe, tiny_llama, domain):
    out = tmp_path / "e"
    args = ["extend", str(tiny_moe), str(out), "--data", str(domain), "--new-experts", "2", "--tokens", "256"]
    res = CliRunner().invoke(main, args + ["--memory", str(domain), "--memory-tokens", "256"])
    assert res.exit_code == 0, res.output
    info = CliRunner().invoke(main, ["info", str(out), "--json"])
    assert info.exit_code == 0, info.output
    ex = CliRunner().invoke(main, ["export", str(out), str(tmp_path / "q"), "--format", "qwen2_moe"])
    assert ex.exit_code == 2 and "extend" in ex.output and not (tmp_path / "q").exists()
    dense = CliRunner().invoke(main, ["extend", str(tiny_llama), str(tmp_path / "d"), "--data", str(domain),
                                      "--new-experts", "2"])
    assert dense.exit_code == 2 and "dense" in dense.output and not (tmp_path / "d").exists()
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    bad = CliRunner().invoke(main, ["extend", str(tiny_moe), str(tmp_path / "x"), "--data", str(empty),
                                    "--new-experts", "2"])
    assert bad.exit_code == 2 and "empty.txt" in bad.output
    nomem = CliRunner().invoke(main, args[:2] + [str(tmp_path / "y")] + args[3:] + ["--memory-tokens", "64"])
    assert nomem.exit_code == 2 and "--memory" in nomem.output


def test_stdlib_split_is_disjoint_and_deterministic():
    from surgery.data import stdlib_split_part, stdlib_split_text

    train, evl = stdlib_split_text("train"), stdlib_split_text("eval")
    names = lambda t: {line[8:] for line in t.splitlines() if line.startswith("# file: ")}
    assert names(train) and names(evl) and not names(train) & names(evl)
    assert all(stdlib_split_part(n[:-3]) == "eval" for n in names(evl))
    assert stdlib_split_text("eval") == evl


def test_prune_with_calibration_trains_only_the_kept_experts(tmp_path, tiny_moe, domain):
    out = tmp_path / "pc"
    res = CliRunner().invoke(main, ["prune", str(tiny_moe), str(out), "--data", str(domain), "--keep-experts", "3",
                                    "--calibrate-tokens", "1024", "--lr", "1e-2", "--tokens", "1200"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.output[res.output.index("{"):])
    assert summary["calibration"]["tokens"] == 1024
    pruned = load_model(out)
    assert pruned.surgery_config.modules[-1]["calibration"]["teacher"] == "unpruned"
    base = load_model(tiny_moe)
    kept = summary["kept"][0]
    # calibration moved the kept experts away from their unpruned values (it trained them)
    assert not torch.equal(moe_blocks(pruned)[0].experts.gate_proj, moe_blocks(base)[0].experts.gate_proj[kept])
