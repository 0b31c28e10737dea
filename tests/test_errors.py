"""Bad input: a one-line error naming what is wrong, exit status 2, no traceback, nothing left at OUT."""

import json

import pytest
from click.testing import CliRunner

from surgery.cli import main

from helpers import make_llama


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result


def assert_clean_error(result, *needles, out=None):
    assert result.exit_code == 2, result.output
    lines = [l for l in result.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in lines[0], lines[0]
    if out is not None:
        assert not out.exists()
        assert not any(p.name.startswith(f".{out.name}.tmp") for p in out.parent.iterdir())


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    return make_llama(tmp_path_factory.mktemp("dense") / "m")


def test_missing_path(tmp_path):
    out = tmp_path / "out"
    assert_clean_error(run("convert", tmp_path / "nope", out, "-E", 4, "-K", 2), "nope", "no such file", out=out)


def test_non_llama_config(tmp_path):
    src = tmp_path / "gpt2"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    out = tmp_path / "out"
    assert_clean_error(run("convert", src, out, "-E", 4, "-K", 2), "GPT2LMHeadModel", "not supported", out=out)


def test_pickled_weights_refused(tmp_path, dense):
    src = tmp_path / "pickled"
    src.mkdir()
    (src / "config.json").write_text((dense / "config.json").read_text())
    (src / "pytorch_model.bin").write_bytes(b"\x80\x02not really")
    out = tmp_path / "out"
    assert_clean_error(run("convert", src, out, "-E", 4, "-K", 2), "pickled", out=out)


def copy_with_weights(tmp_path, dense, mangle):
    src = tmp_path / "broken"
    src.mkdir()
    for f in dense.iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    st = src / "model.safetensors"
    st.write_bytes(mangle(st.read_bytes()))
    return src


def test_truncated_safetensors(tmp_path, dense):
    src = copy_with_weights(tmp_path, dense, lambda b: b[: len(b) - 1000])
    out = tmp_path / "out"
    assert_clean_error(run("convert", src, out, "-E", 4, "-K", 2), "model.safetensors", "truncated", out=out)


def test_corrupt_safetensors_header(tmp_path, dense):
    src = copy_with_weights(tmp_path, dense, lambda b: b[:8] + b"{garbage" + b[16:])
    out = tmp_path / "out"
    assert_clean_error(run("convert", src, out, "-E", 4, "-K", 2), "model.safetensors", "corrupt", out=out)


def test_not_safetensors_at_all(tmp_path, dense):
    src = copy_with_weights(tmp_path, dense, lambda b: b"hello")
    out = tmp_path / "out"
    assert_clean_error(run("convert", src, out, "-E", 4, "-K", 2), "model.safetensors", out=out)


@pytest.mark.parametrize("args,needle", [
    (["-E", 4, "-K", 5], "--top-k 5"),
    (["-E", 4, "-K", 0], "--top-k 0"),
    (["-E", 97, "-K", 2], "FFN width 96"),  # the tiny model's FFN has 96 neurons
    (["-E", 90, "-K", 2, "-S", 7], "FFN width 96"),
    (["-E", 0, "-K", 1], "--experts 0"),
    (["-E", 4, "-K", 2, "--method", "astrology"], "astrology"),
    (["-E", 4, "-K", 2, "--max-shard-size", "lots"], "--max-shard-size"),
])
def test_bad_flags(tmp_path, dense, args, needle):
    out = tmp_path / "out"
    assert_clean_error(run("convert", dense, out, *args), needle, out=out)


def test_existing_output_is_not_clobbered(tmp_path, dense):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert_clean_error(run("convert", dense, out, "-E", 4, "-K", 2), "already exists")
    assert (out / "keep.txt").read_text() == "mine"


def test_unequal_experts_are_supported(tmp_path, dense):
    """96 neurons into 7 experts: sizes 14 and 13, padded to 14, reported as such."""
    out = tmp_path / "out"
    result = run("convert", dense, out, "-E", 7, "-K", 2)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert sorted(set(summary["expert_sizes"])) == [13, 14] and sum(summary["expert_sizes"]) == 96


def test_eval_bad_data_path(tmp_path, dense):
    assert_clean_error(run("eval", "perplexity", dense, "--data", tmp_path / "missing.txt"), "missing.txt")


def test_info_missing_model(tmp_path):
    assert_clean_error(run("info", tmp_path / "ghost"), "ghost")
