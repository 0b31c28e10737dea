"""evals/quick_ablation.py on a tiny model: the spec drives convert + calibrate, the conversion is cached, and
--save writes the calibrated student as a native folder that loads to the same model. (The 8k-token evaluations
need the real data and demo model; they are replaced here by a stand-in that records what it was given.)"""

import json
import subprocess
import sys

import torch

import surgery
from surgery_evals import quick_ablation

from helpers import make_llama


def test_save_writes_the_calibrated_student_and_the_conversion_is_cached(tmp_path, text_file, monkeypatch):
    src = make_llama(tmp_path / "dense", ffn=96, layers=2)
    seen = {}

    def evaluate(model, tok, res, out):
        seen["model"], seen["res"] = model, res
        return res

    monkeypatch.setattr(quick_ablation, "_evaluate", evaluate)
    spec = {"convert": {"experts": 4, "top_k": 1, "method": "random", "router_init": "centroid"},
            "e2e": {"tokens": 512, "ctx": 32, "batch_size": 2, "lr": 1e-3, "autocast": "off", "compile": "off"},
            "data": str(text_file)}
    cache = tmp_path / "cache"
    res = quick_ablation.main(json.dumps(spec), out=str(tmp_path / "ab.jsonl"), cache_dir=str(cache), source=str(src),
                              save=str(tmp_path / "saved"))
    assert res["saved"] == str(tmp_path / "saved") and res["e2e_tokens_per_s"] > 0
    assert len(list(cache.glob("convert-*.pt"))) == 1 and (cache / "profile.pt").exists()
    student = seen["model"]
    converted = torch.load(next(cache.glob("convert-*.pt")), weights_only=False)["state"]
    assert any(not torch.equal(p, converted[k]) for k, p in student.state_dict().items()
               if ".mlp." in k)  # calibration trained the experts
    loaded = surgery.load(tmp_path / "saved")
    ids = torch.randint(1, 64, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = student(input_ids=ids).logits
        got = loaded(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # "profile_data": its own profile and its own conversion in the cache, beside the default ones
    other = {"convert": spec["convert"], "profile_data": str(text_file)}
    quick_ablation.main(json.dumps(other), out=str(tmp_path / "ab.jsonl"), cache_dir=str(cache), source=str(src))
    assert len(list(cache.glob("profile*.pt"))) == 2 and len(list(cache.glob("convert-*.pt"))) == 2


def test_a_malformed_command_line_exits_2():
    for argv in ([], ["{}", "--keep", "x"], ["{}", "--save"]):
        r = subprocess.run([sys.executable, "-m", "surgery_evals.quick_ablation", *argv], capture_output=True,
                           text=True)
        assert r.returncode == 2 and "usage:" in r.stderr, argv
