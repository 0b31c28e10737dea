"""Diagnostic: how far is the fitted linear router from the oracle top-k on held-out profiled inputs, and does a
router with more capacity (an MLP on x) or one that reads the gate close the gap? On the E48 S16 K16 conversion
that `python -m surgery_evals.quick_ablation` caches (run its uncalibrated E48 S16 K16 spec first), layers 2, 8,
15, 22, 28. Prints one JSON line (results/quality/router-gap.json holds the measured one)."""
import json, torch, torch.nn.functional as Fn
from surgery.modeling import load_model
from surgery.convert import ConvertConfig, convert_model
from surgery.profile import load_profile
from surgery.moe import moe_blocks
from surgery.router import route_weights
from surgery.calibrate import _expert_outputs
from surgery import losses
torch.set_num_threads(2); torch.manual_seed(0)
stats, _ = load_profile("runs/ablation-cache/profile.pt")
dense = load_model("runs/smollm2")
student = load_model("runs/smollm2")
spec = {"experts": 48, "shared_experts": 16, "top_k": 16, "method": "coactivation", "router_init": "fitted"}
convert_model(student, ConvertConfig(**{**spec, "method": "random", "router_init": "centroid"}))
blob = torch.load("runs/ablation-cache/convert-e01509e4e74c.pt", weights_only=False)
student.load_state_dict(blob["state"])
blocks = moe_blocks(student)
def err_of(block, x, t, y, shared, w_NE):
    out = shared + torch.einsum("ne,ned->nd", w_NE, y)
    return losses.block_error(out, t).item()
def dense_w(block, logits):
    w, ids = route_weights(logits, block.routing)
    return torch.zeros_like(logits).scatter(1, ids, w)
res = {}
for l in (2, 8, 15, 22, 28):
    b = blocks[l]; x = stats[l].inputs.float(); N = x.shape[0]; tr, te = slice(0, 3072), slice(3072, N)
    mlp = dense.model.layers[l].mlp
    with torch.no_grad():
        t = mlp(x); shared = b.shared_expert(x); y = _expert_outputs(b, x)
    tt = t - shared
    r = {}
    with torch.no_grad():
        r["fitted"] = err_of(b, x[te], t[te], y[te], shared[te], dense_w(b, b.router_logits(x[te])))
        sc = 2 * torch.einsum("ned,nd->ne", y, tt) - y.pow(2).sum(-1)  # router.oracle_scores
        # unit weights on the oracle's top-k (weights as dense)
        ids = sc[te].topk(16, -1).indices
        r["oracle_unit"] = err_of(b, x[te], t[te], y[te], shared[te], torch.zeros(len(ids), 48).scatter(1, ids, 1.0))
        ids = b.router_logits(x[te]).topk(16, -1).indices
        r["fitted_unit"] = err_of(b, x[te], t[te], y[te], shared[te], torch.zeros(len(ids), 48).scatter(1, ids, 1.0))
    # MLP router trained on train split with the same objective as fit_router
    for hidden in (256,):
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(576, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, 48))
        with torch.no_grad():
            net[2].weight.zero_(); net[2].bias.zero_()
        lin = b.router.weight.detach().clone().requires_grad_(True)
        opt = torch.optim.Adam(list(net.parameters()) + [lin], lr=1e-3)
        labels = torch.zeros(N, 48).scatter_(1, sc.topk(16, -1).indices, 1 / 16)
        for step in range(600):
            idx = torch.randint(0, 3072, (1024,))
            lg = x[idx] @ lin.T + net(x[idx])
            w = dense_w(b, lg)
            out = shared[idx] + torch.einsum("ne,ned->nd", w, y[idx])
            loss = losses.block_error(out, t[idx]) - (labels[idx] * torch.log_softmax(lg, -1)).sum(-1).mean()
            opt.zero_grad(); loss.backward(); opt.step()
        with torch.no_grad():
            lg = x[te] @ lin.T + net(x[te])
            r[f"mlp{hidden}"] = err_of(b, x[te], t[te], y[te], shared[te], dense_w(b, lg))
            lg = x[tr] @ lin.T + net(x[tr])
            r[f"mlp{hidden}_train"] = err_of(b, x[tr], t[tr], y[tr], shared[tr], dense_w(b, lg))
    # gate-reading score: sum over expert neurons of |h_i| * ||down_i||, computed densely (upper bound of gate readers)
    with torch.no_grad():
        e = b.experts; E, F, D = e.gate_proj.shape
        h = Fn.silu(x[te] @ e.gate_proj.reshape(E * F, D).T) * (x[te] @ e.up_proj.reshape(E * F, D).T)
        dn = e.down_proj.permute(0, 2, 1).norm(dim=-1).reshape(E * F)
        s = (h.abs() * dn).reshape(-1, E, F).sum(-1)
        ids = s.topk(16, -1).indices
        r["hscore_unit"] = err_of(b, x[te], t[te], y[te], shared[te], torch.zeros(len(ids), 48).scatter(1, ids, 1.0))
        g = Fn.silu(x[te] @ e.gate_proj.reshape(E * F, D).T).abs()
        s = (g * dn).reshape(-1, E, F).sum(-1); ids = s.topk(16, -1).indices
        r["gatescore_unit"] = err_of(b, x[te], t[te], y[te], shared[te], torch.zeros(len(ids), 48).scatter(1, ids, 1.0))
    res[l] = {k: round(v, 4) for k, v in r.items()}
    print(l, res[l], flush=True)
print(json.dumps(res))
