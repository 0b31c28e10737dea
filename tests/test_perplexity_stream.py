"""`surgery eval perplexity --stream` (layer by layer, one layer's weights in memory) against the ordinary
evaluation of the loaded model: the same batches, mask, position embeddings, layers and loss in the same
order, so on CPU the NLL is equal bit for bit (asserted with ==)."""

import json

import pytest
from click.testing import CliRunner

import surgery
from surgery.cli import main
from surgery.modeling import load_tokenizer
from surgery_evals import perplexity_stream
from surgery_evals.perplexity import perplexity
from surgery_evals.perplexity_stream import perplexity_streaming

from helpers import make_llama


def _convert(src, out, *flags):
    r = CliRunner().invoke(main, ["convert", str(src), str(out), *flags])
    assert r.exit_code == 0, r.output
    return out


@pytest.fixture
def dense(tmp_path):
    # three layers, sharded into several files, untied head: the streamed reads cross shard boundaries
    return make_llama(tmp_path / "dense", layers=3, tied=False, max_shard_size="40KB")


@pytest.mark.parametrize("kind", ["dense", "moe", "moe-attention"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_streamed_equals_ordinary(tmp_path, dense, text_file, kind, dtype):
    path = {"dense": lambda: dense,
            "moe": lambda: _convert(dense, tmp_path / "moe", "-E", "4", "-K", "1", "-S", "1"),
            "moe-attention": lambda: _convert(dense, tmp_path / "att", "-E", "4", "-K", "2", "--attention-experts")}[kind]()
    tok = load_tokenizer(path)
    # 700 tokens in windows of 64 with batches of 3: stacked batches and a last short window alone
    ref = perplexity(surgery.load(path, dtype=dtype), tok, text_file, 700, 64, 3, progress=False)
    got = perplexity_streaming(path, tok, text_file, 700, 64, 3, dtype=dtype, progress=False)
    assert got["nll"] == ref["nll"] and got["predicted_tokens"] == ref["predicted_tokens"]
    assert got["dtype"] == ref["dtype"] == dtype and got["active_ffn_fraction"] == ref["active_ffn_fraction"]
    assert got["stream"]["layers"] == 3


def test_one_layer_in_memory_at_a_time(tmp_path, dense, text_file, monkeypatch):
    moe = _convert(dense, tmp_path / "moe", "-E", "4", "-K", "2")
    real_load, real_open, seen, layers = perplexity_stream._load, perplexity_stream._open, [], []

    def open_(path):
        model, moe_cfg, source = real_open(path)
        layers.extend(model.model.layers)
        return model, moe_cfg, source

    def load(*a, **kw):
        out = real_load(*a, **kw)
        seen.append(sum(any(not p.is_meta for p in layer.parameters()) for layer in layers))
        return out

    monkeypatch.setattr(perplexity_stream, "_load", load)
    monkeypatch.setattr(perplexity_stream, "_open", open_)
    perplexity_streaming(moe, load_tokenizer(moe), text_file, 300, 64, 1, progress=False)
    assert len(seen) == 3 + 3 and max(seen) == 1  # embeddings, 3 layers, norm, head; never two layers at once


def test_dense_routing_streamed_equals_dense(tmp_path, dense, text_file):
    moe = _convert(dense, tmp_path / "moe", "-E", "4", "-K", "1")
    runs = {}
    for name, path, extra in (("dense", dense, []), ("moe", moe, ["--dense-routing"])):
        r = CliRunner().invoke(main, ["eval", "perplexity", str(path), "--data", str(text_file), "--max-tokens", "300",
                                      "--ctx", "64", "--device", "cpu", "--stream", *extra])
        assert r.exit_code == 0, r.output
        runs[name] = json.loads(r.stdout)
        assert runs[name]["peak_rss_mb"] > 0
    assert runs["moe"]["perplexity"] == pytest.approx(runs["dense"]["perplexity"], rel=1e-5)  # the invariant


def test_stream_refuses_what_it_cannot_read(tmp_path, dense, text_file):
    moe = _convert(dense, tmp_path / "moe", "-E", "4", "-K", "2")
    exported = tmp_path / "mixtral"
    r = CliRunner().invoke(main, ["export", str(moe), str(exported), "--format", "mixtral"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["eval", "perplexity", str(exported), "--data", str(text_file), "--stream"])
    assert r.exit_code == 2 and "--stream reads a dense or converted" in r.output
    # a checkpoint missing a tensor: one line naming it, before any work
    cfg = json.loads((moe / "config.json").read_text())
    cfg["num_hidden_layers"] = 4
    (moe / "config.json").write_text(json.dumps(cfg))
    r = CliRunner().invoke(main, ["eval", "perplexity", str(moe), "--data", str(text_file), "--stream"])
    assert r.exit_code == 2 and "missing model.layers.3." in r.output and len(r.output.strip().splitlines()) == 1
