"""Diagnostic: how far calibration moved each MoE block's router from where conversion left it.

    python -m surgery_evals.router_drift CALIBRATED START [--json F]

CALIBRATED and START are native model folders (`surgery.load`) or quick_ablation's cached conversions
(runs/ablation-cache/convert-*.pt: {"state": ...}). Per block: ||W - W0|| / ||W0|| of the router weights, and
the share of entries that changed at all. (Round 20: the 25% quick model's routers, top-1 renormalised, moved by
2e-7 of their norm in 96k end-to-end tokens, rounding noise: that routing gives its router no gradient.)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from surgery.atomic import write_json

KEY = "mlp.router.weight"


def _fail(message: str):
    print(f"router_drift: {message}", file=sys.stderr)
    sys.exit(2)


def router_weights(path) -> dict[str, torch.Tensor]:
    """Every MoE router's weights in a native model folder or a quick_ablation conversion cache file."""
    p = Path(path)
    if not p.exists():
        _fail(f"{path}: no such model folder or conversion file")
    if p.is_file():
        state = torch.load(p, weights_only=False, map_location="cpu")["state"]
    else:
        import surgery

        state = surgery.load(p).state_dict()
    out = {k: v.detach().float() for k, v in state.items() if k.endswith(KEY)}
    if not out:
        _fail(f"{path}: no MoE router weights (is it a converted model?)")
    return out


def drift(calibrated: dict, start: dict) -> list[dict]:
    rows = []
    for k, w0 in start.items():
        if k not in calibrated or calibrated[k].shape != w0.shape:
            _fail(f"{k}: missing or of another shape in the calibrated model")
        w = calibrated[k]
        rows.append({"router": k, "relative_change": float((w - w0).norm() / w0.norm().clamp_min(1e-12)),
                     "changed_fraction": float((w != w0).float().mean())})
    return rows


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("calibrated")
    ap.add_argument("start")
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    rows = drift(router_weights(a.calibrated), router_weights(a.start))
    rel = [r["relative_change"] for r in rows]
    res = {"calibrated": a.calibrated, "start": a.start, "blocks": len(rows),
           "relative_change_mean": sum(rel) / len(rel), "relative_change_max": max(rel),
           "changed_fraction_mean": sum(r["changed_fraction"] for r in rows) / len(rows), "per_block": rows}
    if a.json:
        write_json(a.json, res, indent=1)
    print(json.dumps({k: v for k, v in res.items() if k != "per_block"}))
    return res


if __name__ == "__main__":
    main(sys.argv[1:])
