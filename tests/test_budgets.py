"""Per-layer budgets (--layer-budgets): allocation at the same mean top-k, per-layer routing in the model,
the dense-routing invariant, the native round trip, refusal by stock exports, `surgery info`, old configs."""

import json

import pytest
import torch
from click.testing import CliRunner

import surgery
from surgery.budgets import floor_k, sensitivity
from surgery.cli import main
from surgery.config import MoEConfig
from surgery.convert import ConvertConfig, convert
from surgery.errors import SurgeryError
from surgery.export import export, export_model
from surgery.modeling import save_converted
from surgery.moe import moe_blocks, set_dense_routing
from surgery.profile import ProfileConfig, profile_model, save_profile
from surgery.router import route_weights

from helpers import make_llama, relative_error

LAYERS, E, K, S = 4, 8, 3, 2


@pytest.fixture(scope="module")
def budgeted(tmp_path_factory):
    """A 4-layer random Llama, its profile, and its conversion with sensitivity budgets (E8 S2 K3)."""
    root = tmp_path_factory.mktemp("budgets")
    src = make_llama(root / "dense", ffn=96, layers=LAYERS)
    # Random layers are alike (their budgets come out uniform); layer 1's output is made to come from a few
    # neurons (heavy-tailed down-projection columns), so few experts reproduce it: it should get fewer.
    dense = surgery.load(src)
    with torch.no_grad():
        w = dense.model.layers[1].mlp.down_proj.weight
        w.mul_(torch.exp(2.5 * torch.randn(w.shape[1], generator=torch.Generator().manual_seed(1))))
    dense.save_pretrained(str(src))
    ids = torch.randint(0, 128, (1024,), generator=torch.Generator().manual_seed(0))
    stats = profile_model(surgery.load(src), ids, ProfileConfig(tokens=1024, ctx=64, samples=512), progress=False)
    save_profile(stats, root / "profile.pt")
    cfg = ConvertConfig(experts=E, top_k=K, shared_experts=S, method="weights", router_init="fitted",
                        router_steps=30, layer_budgets="sensitivity", stats=stats)
    summary = convert(src, root / "moe", cfg, progress=False)
    return src, root, stats, summary


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_sensitivity_budgets_keep_the_mean(budgeted):
    _, root, _, summary = budgeted
    ks = summary["layer_top_k"]
    assert len(ks) == LAYERS and len(set(ks)) > 1  # a real non-uniform allocation on this model
    assert ks[1] == min(ks) < K  # the concentrated layer needs the fewest experts
    assert sum(ks) == LAYERS * K
    assert all(floor_k(K) <= k <= E for k in ks)
    block = json.loads((root / "moe" / "config.json").read_text())["surgery"]
    assert block["layer_top_k"] == ks and block["top_k"] == K
    # Mean active width is the uniform model's; the worst case is the densest layer's.
    sizes, shared = block["expert_sizes"], block["shared_width"]
    frac = lambda k: (k * sum(sizes) / E + shared) / (sum(sizes) + shared)
    assert block["active_ffn_fraction"] == pytest.approx(frac(K), abs=1e-6)
    assert block["max_active_ffn_fraction"] == pytest.approx(frac(max(ks)), abs=1e-6)
    assert block["max_active_ffn_fraction"] > block["active_ffn_fraction"]


def test_greedy_allocation_on_hand_made_curves():
    """Layer 0's error falls steeply with k, layer 1's barely: layer 0 takes experts up to the cap E."""
    ks_range = range(1, 5)
    steep = {k: 1.0 / k ** 2 for k in ks_range}
    flat = {k: 0.01 * (4 - k) for k in ks_range}
    ks = sensitivity([steep, flat], 2, 3, 4)  # mean 3 of 4 experts: budget 6, floor 1
    assert ks == [4, 2]
    assert sensitivity([flat, steep, flat], 3, 2, 4) == [1, 4, 1]
    # Equal curves stay uniform (stored as the empty list); top-k 1 has nothing to move.
    assert sensitivity([steep, steep], 2, 2, 4) == []
    assert sensitivity([steep, flat], 2, 1, 4) == []


def test_each_block_routes_to_its_own_k(budgeted):
    _, root, _, summary = budgeted
    model = surgery.load(root / "moe")
    ks = summary["layer_top_k"]
    assert [b.routing.top_k for b in moe_blocks(model)] == ks
    # Default scale = k per layer: the selected experts keep their dense weight on average.
    assert [b.routing.scale for b in moe_blocks(model)] == [float(k) for k in ks]
    x = torch.randn(16, 64)
    for b, k in zip(moe_blocks(model), ks):
        w, ids = route_weights(b.router_logits(x), b.routing)
        assert ids.shape == (16, k) and torch.allclose(w.sum(-1), torch.full((16,), float(k)))


def test_explicit_scale_is_kept_per_selected_expert(budgeted):
    src, _, stats, _ = budgeted
    from surgery.convert import convert_model

    m = convert_model(surgery.load(src), ConvertConfig(experts=E, top_k=K, shared_experts=S, method="weights",
                                                       router_init="centroid", layer_budgets="sensitivity",
                                                       scale=1.5, stats=stats))
    ks = m.surgery_config.layer_top_k
    assert sum(ks) == LAYERS * K
    assert [b.routing.scale for b in moe_blocks(m)] == pytest.approx([1.5 * k / K for k in ks])


def test_dense_routing_invariant_with_budgets(budgeted):
    src, root, _, _ = budgeted
    dense, moe = surgery.load(src), surgery.load(root / "moe")
    set_dense_routing(moe, True)
    ids = torch.randint(0, 128, (2, 17))
    assert relative_error(logits(moe, ids), logits(dense, ids)) <= 1e-5


def test_native_round_trip_keeps_layer_ks_and_logits(budgeted, tmp_path):
    _, root, _, summary = budgeted
    a = surgery.load(root / "moe")
    save_converted(a, tmp_path / "again")
    b = surgery.load(tmp_path / "again")
    assert b.surgery_config.layer_top_k == summary["layer_top_k"]
    assert [blk.routing for blk in moe_blocks(b)] == [blk.routing for blk in moe_blocks(a)]
    ids = torch.randint(0, 128, (2, 13))
    assert torch.equal(logits(a, ids), logits(b, ids))
    # --format native carries them too.
    export(a, tmp_path / "native", "native", progress=False)
    c = surgery.load(tmp_path / "native")
    assert c.surgery_config.layer_top_k == summary["layer_top_k"]
    assert torch.equal(logits(a, ids), logits(c, ids))


@pytest.mark.parametrize("fmt", ["mixtral", "qwen2_moe", "gguf"])
def test_stock_exports_refuse_per_layer_budgets(budgeted, tmp_path, fmt):
    _, root, _, summary = budgeted
    out = tmp_path / ("out.gguf" if fmt == "gguf" else "out")
    with pytest.raises(SurgeryError, match="different numbers of experts") as e:
        export_model(root / "moe", out, fmt, progress=False)
    assert "\n" not in str(e.value) and f"--format {fmt}" in str(e.value)
    assert not out.exists()


def test_info_shows_mean_and_worst_case(budgeted, tmp_path):
    """Through the CLI: convert --layer-budgets sensitivity --profile, then `surgery info`."""
    src, root, _, _ = budgeted
    runner = CliRunner()
    out = tmp_path / "moe"
    r = runner.invoke(main, ["convert", str(src), str(out), "-E", str(E), "-K", str(K), "-S", str(S),
                             "--method", "weights", "--layer-budgets", "sensitivity", "--profile",
                             str(root / "profile.pt")])
    assert r.exit_code == 0, r.output
    ks = json.loads(r.stdout)["layer_top_k"]
    assert sum(ks) == LAYERS * K and len(set(ks)) > 1
    info = json.loads(runner.invoke(main, ["info", str(out), "--json"]).stdout)
    assert info["top_k"] == K and info["layer_top_k"] == ks
    assert info["max_active_ffn_fraction"] > info["active_ffn_fraction"]
    moe = MoEConfig.from_dict(json.loads((out / "config.json").read_text())["surgery"])
    assert info["active_ffn_fraction"] == round(moe._active_fraction(K), 6)
    assert info["max_active_ffn_fraction"] == round(moe._active_fraction(max(ks)), 6)
    table = runner.invoke(main, ["info", str(out)]).stdout
    assert "max_active_ffn_fraction" in table and "active_ffn_fraction" in table


def test_sensitivity_needs_a_profile_and_a_known_rule(tiny_llama, tmp_path):
    with pytest.raises(SurgeryError, match="needs profiling statistics"):
        convert(tiny_llama, tmp_path / "a", ConvertConfig(experts=4, top_k=2, layer_budgets="sensitivity"),
                progress=False)
    with pytest.raises(SurgeryError, match="--layer-budgets 'greedy'"):
        convert(tiny_llama, tmp_path / "b", ConvertConfig(experts=4, top_k=2, layer_budgets="greedy"),
                progress=False)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_old_config_without_layer_top_k_loads_uniform(tiny_llama, tmp_path):
    convert(tiny_llama, tmp_path / "moe", ConvertConfig(experts=4, top_k=2, shared_experts=1), progress=False)
    path = tmp_path / "moe" / "config.json"
    cfg = json.loads(path.read_text())
    assert cfg["surgery"]["layer_top_k"] == []  # uniform is the default
    for key in ("layer_top_k", "max_active_ffn_fraction"):  # as written before per-layer budgets
        del cfg["surgery"][key]
    path.write_text(json.dumps(cfg))
    model = surgery.load(tmp_path / "moe")
    assert model.surgery_config.layer_top_k == [] and model.surgery_config.uniform_top_k
    assert [b.routing.top_k for b in moe_blocks(model)] == [2, 2]
    assert model.surgery_config.max_active_ffn_fraction == model.surgery_config.active_ffn_fraction
    export(model, tmp_path / "mixtral", "mixtral", progress=False)  # uniform models export as before


@pytest.mark.parametrize("ks,match", [([2, 2, 2], "3 entries for 2 layers"), ([0, 4], "outside 1..4")])
def test_bad_layer_top_k_is_refused(tiny_llama, tmp_path, ks, match):
    convert(tiny_llama, tmp_path / "moe", ConvertConfig(experts=4, top_k=2), progress=False)
    path = tmp_path / "moe" / "config.json"
    cfg = json.loads(path.read_text())
    cfg["surgery"]["layer_top_k"] = ks
    path.write_text(json.dumps(cfg))
    with pytest.raises(SurgeryError, match=match):
        surgery.load(tmp_path / "moe")


def test_transition_schedule_ends_at_each_layers_k(budgeted):
    from surgery.calibrate import EndToEndConfig, _routing_at

    _, root, _, summary = budgeted
    model = surgery.load(root / "moe")
    cfg = EndToEndConfig(k_start=E, transition=0.5)
    for b, k in zip(moe_blocks(model), summary["layer_top_k"]):
        start, mix0 = _routing_at(0, 100, cfg, b.routing, E)
        end, mix1 = _routing_at(100, 100, cfg, b.routing, E)
        assert (start.top_k, mix0) == (E, 1.0)
        assert (end.top_k, end.scale, mix1) == (k, float(k), 0.0)


@pytest.mark.parametrize("renormalize", [True, False])
def test_layer_errors_match_the_routing_rule(budgeted, renormalize):
    """The one-sort error curve equals routing each k with route_weights and summing the selected experts."""
    from surgery.budgets import layer_errors
    from surgery.cluster import FFNWeights, balanced_sizes, get_method
    from surgery.config import routing_at_k
    from surgery.router import RoutingConfig, centroid_init, group_outputs

    src, _, stats, _ = budgeted
    mlp = surgery.load(src).model.layers[2].mlp
    ffn = FFNWeights(mlp.gate_proj.weight.data, mlp.up_proj.weight.data, mlp.down_proj.weight.data)
    groups = get_method("random")(ffn, balanced_sizes(96, E + S), seed=0, stats=None, shared=S)
    router = centroid_init(ffn.gate, groups[S:])
    routing = RoutingConfig(K, renormalize=renormalize, scale=2.0)
    errors = layer_errors(ffn, groups, S, stats[2], router, routing, range(1, E + 1))
    x = stats[2].inputs.float()
    y = group_outputs(x, ffn.gate, ffn.up, ffn.down, groups[S:])
    dense = mlp(x)
    for k in (1, K, E):
        w, ids = route_weights(x @ router.T, routing_at_k(routing, k))
        out = (w[..., None] * y[torch.arange(len(x))[:, None], ids]).sum(1)
        want = (out - y.sum(1)).pow(2).sum() / dense.pow(2).sum()
        assert errors[k] == pytest.approx(want.item(), rel=1e-4)


def test_prune_keeps_per_layer_budgets(budgeted):
    from surgery.experts.prune import prune_model

    _, root, _, summary = budgeted
    ks = summary["layer_top_k"]
    model = surgery.load(root / "moe")
    prune_model(model, [list(range(E - 1))] * LAYERS)
    assert model.surgery_config.layer_top_k == ks and model.surgery_config.num_experts == E - 1
    assert [b.routing.top_k for b in moe_blocks(model)] == ks
    with pytest.raises(SurgeryError, match="more than the"):
        prune_model(surgery.load(root / "moe"), [list(range(max(ks) - 1))] * LAYERS)
    pruned = surgery.load(root / "moe")
    prune_model(pruned, [list(range(E - 1))] * LAYERS, top_k=2)  # a new top-k is uniform
    assert pruned.surgery_config.layer_top_k == [] and [b.routing.top_k for b in moe_blocks(pruned)] == [2] * LAYERS
