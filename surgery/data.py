"""Text for calibration and evaluation: plain text or JSONL files, tokenized into one long id stream."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from surgery.errors import SurgeryError

def _shared_data() -> Path:
    """The corpora folder: $SURGERY_DATA, else ../shared/data beside the working directory (the project root)
    or beside this source tree."""
    if os.environ.get("SURGERY_DATA"):
        return Path(os.environ["SURGERY_DATA"])
    for root in (Path.cwd(), Path(__file__).resolve().parent.parent):
        if (root.parent / "shared" / "data").is_dir():
            return root.parent / "shared" / "data"
    return Path.cwd().parent / "shared" / "data"


SHARED_DATA = _shared_data()
DEFAULT_CALIBRATION = SHARED_DATA / "wikitext-2" / "valid.txt"
DEFAULT_EVAL = SHARED_DATA / "wikitext-2-raw" / "wiki.test.raw"


def read_text(path) -> str:
    """A .jsonl file contributes its records' "text" fields; anything else is read as UTF-8 text."""
    p = Path(path)
    if not p.is_file():
        raise SurgeryError(f"{p}: no such file (--data expects a text or JSONL file)")
    if p.suffix == ".jsonl":
        texts = []
        for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                texts.append(json.loads(line)["text"])
            except (json.JSONDecodeError, KeyError, TypeError):
                raise SurgeryError(f"{p}:{i}: expected a JSON object with a \"text\" field") from None
        return "\n\n".join(texts)
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise SurgeryError(f"{p}: not UTF-8 text") from None


def tokenize_file(tokenizer, path, max_tokens: int | None = None) -> torch.Tensor:
    """The first `max_tokens` token ids of the file, as a 1-D LongTensor (no special tokens added)."""
    text = read_text(path)
    if max_tokens is not None:
        # Tokenizing megabytes is slow; ~6 characters per token is generous for English and code.
        text = text[: max(max_tokens * 8, 4096)]
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    ids = torch.tensor(ids, dtype=torch.long)
    return ids[:max_tokens] if max_tokens is not None else ids


def windows_of(ids: torch.Tensor, ctx: int, short_ok: bool = False) -> torch.Tensor:
    """Non-overlapping full windows [W, ctx] of a 1-D id stream; the tail shorter than ctx is dropped. A stream
    shorter than one window is an error, or with short_ok one short window (of at least 2 tokens)."""
    n = ids.numel() // ctx
    if n > 0:
        return ids[: n * ctx].reshape(n, ctx)
    if not short_ok:
        raise SurgeryError(f"calibration text has {ids.numel()} tokens, fewer than one window of {ctx}")
    if ids.numel() < 2:
        raise SurgeryError("calibration text has fewer than 2 tokens")
    return ids[None]


def stdlib_source_text(max_chars: int = 2_000_000) -> str:
    """A second evaluation domain every machine has: Python standard-library source, deterministic.

    The top-level .py files of sysconfig's stdlib folder (no subpackages, no tests), sorted by name, each
    preceded by a `# file: NAME` line and joined by blank lines, cut at `max_chars` characters. The same
    Python version gives the same text byte for byte."""
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py") if p.is_file() and not p.name.startswith("test"))
    if not files:
        raise SurgeryError(f"{root}: no standard-library .py files found")
    parts, size = [], 0
    for p in files:
        try:
            text = p.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        parts.append(f"# file: {p.name}\n{text}")
        size += len(parts[-1]) + 2
        if size >= max_chars:
            break
    return "\n\n".join(parts)[:max_chars]


STDLIB_PARTS = ("train", "eval")


def stdlib_split_part(name: str) -> str:
    """Which part of the module-level stdlib split a file belongs to: "eval" when the SHA-256 of its module
    name (file stem) is 0 mod 5 (27 of 168 modules, 1.3 MB, on Python 3.11), else "train". Whole modules go
    one way, so no evaluated line was ever trained on, and the split does not depend on file order."""
    import hashlib

    return "eval" if int(hashlib.sha256(name.encode()).hexdigest(), 16) % 5 == 0 else "train"


def stdlib_split_text(part: str) -> str:
    """The stdlib domain split by module for training on it (issue: extend/prune): every top-level .py file
    of the part, sorted by name, each after a `# file: NAME` line, joined by blank lines (no cut)."""
    import sysconfig

    if part not in STDLIB_PARTS:
        raise SurgeryError(f"stdlib part {part!r}: choose one of {', '.join(STDLIB_PARTS)}")
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py") if p.is_file() and not p.name.startswith("test"))
    parts = []
    for p in files:
        if stdlib_split_part(p.stem) != part:
            continue
        try:
            parts.append(f"# file: {p.name}\n{p.read_text(encoding='utf-8')}")
        except (UnicodeDecodeError, OSError):
            continue
    if not parts:
        raise SurgeryError(f"{root}: no standard-library .py files in the {part} part")
    return "\n\n".join(parts)


def stdlib_eval_file(folder=None, part: str | None = None) -> Path:
    """Write stdlib_source_text() (or, with `part`, one side of the module split) once to a file named by its
    hash, so it is reused, and return its path, so that every text-file consumer reads the second domain."""
    import hashlib
    import sys
    import tempfile

    text = stdlib_source_text() if part is None else stdlib_split_text(part)
    digest = hashlib.sha256(text.encode()).hexdigest()[:12]
    folder = Path(folder) if folder else Path(tempfile.gettempdir()) / "surgery-data"
    folder.mkdir(parents=True, exist_ok=True)
    tag = "stdlib" if part is None else f"stdlib-{part}"
    path = folder / f"python{sys.version_info.major}.{sys.version_info.minor}-{tag}-{digest}.txt"
    if not path.is_file():
        from surgery.atomic import atomic_write_text

        atomic_write_text(path, text)
    return path


def resolve_data(name) -> Path:
    """A data argument: a file path, or one of the names `wikitext-valid` (calibration default),
    `wikitext-test` (held-out evaluation), `stdlib` (Python standard-library source, the recipes' second
    evaluation domain) and `stdlib-train` / `stdlib-eval` (the same source split by module, disjoint)."""
    if name in (None, "", "default", "wikitext-valid"):
        return DEFAULT_CALIBRATION
    if name == "wikitext-test":
        return DEFAULT_EVAL
    if name == "stdlib":
        return stdlib_eval_file()
    if name in ("stdlib-train", "stdlib-eval"):
        return stdlib_eval_file(part=name.split("-")[1])
    return Path(name)


def sampling_spec(data) -> tuple[str, list[str] | None] | None:
    """How a data name samples from the model: ("sample" | "mix", seed prompts or None), or None for a file.
    "sample" / "mix": sequences from BOS, the whole corpus or half of it (half WikiText-2 valid);
    "prompted" / "mix-prompted": the model's answers to surgery/prompts.py's seed prompts, every category,
    or only those named after a colon ("mix-prompted:math,science,history")."""
    if not isinstance(data, str):
        return None
    if data in ("sample", "mix"):
        return data, None
    name, _, cats = data.partition(":")
    if name not in ("prompted", "mix-prompted"):
        return None
    from surgery.prompts import seed_prompts

    try:
        prompts = seed_prompts([c.strip() for c in cats.split(",")] if cats else None)
    except ValueError as e:
        raise SurgeryError(f"data {data!r}: {e}") from None
    return ("sample" if name == "prompted" else "mix"), prompts


def sampled_tokens(tokens: int, mode: str) -> int:
    """How many of a stage's `tokens` come from the model under sampling_spec's mode: all of them for "sample",
    the second half (the larger one when odd) for "mix"."""
    return tokens if mode == "sample" else tokens - tokens // 2


def interleave(a: torch.Tensor, b: torch.Tensor, block: int) -> torch.Tensor:
    """Blocks of `block` ids taken in turn from a and b (the longer one's rest at the end)."""
    out = []
    for i in range(0, max(a.numel(), b.numel()), block):
        out += [a[i:i + block], b[i:i + block]]
    return torch.cat(out)


FIRST_CANDIDATES = 128  # _draw looks at this many most likely tokens first, at `candidates` only where needed


def _draw(logits_NV: torch.Tensor, g: torch.Generator, temperature: float, top_p: float,
          candidates: int) -> torch.Tensor:
    """One nucleus-sampled token per row [N, 1] (on the CPU), among the `candidates` most likely: the top-k and
    the normaliser are computed where the logits are (on a GPU only [N, candidates] crosses to the host, not
    [N, vocab]: the whole-vocabulary copy held an H200 to ~3,300 sampled tokens/s); drawn on the CPU with `g`,
    so a seed gives the same text on every device up to ties."""
    logits = logits_NV.float()
    if temperature != 1.0:
        logits = logits / max(temperature, 1e-5)
    k = min(candidates, logits.shape[-1])
    top, si = logits.topk(min(k, FIRST_CANDIDATES), -1)  # sorted, largest first
    lse = torch.logsumexp(logits, -1, keepdim=True)
    sp = torch.exp(top - lse)  # full-vocabulary probabilities
    if top.shape[-1] < k:
        # The nucleus of every other row ends inside its first FIRST_CANDIDATES tokens (a top-1,024 cost 3x a
        # top-128 over a 49k vocabulary, at batch 128 12% of a sampling step): those rows give the same
        # draw as from all k candidates, the rest take all k.
        sp = torch.cat([sp, sp.new_zeros(sp.shape[0], k - sp.shape[-1])], 1)
        si = torch.cat([si, si.new_zeros(si.shape[0], k - si.shape[-1])], 1)
        wide = (sp.sum(-1) < top_p).nonzero().squeeze(1)  # rows whose nucleus may reach past the first ones
        if wide.numel():
            wtop, wsi = logits[wide].topk(k, -1)
            sp[wide], si[wide] = torch.exp(wtop - lse[wide]), wsi
    sp, si = sp.cpu(), si.cpu()
    keep = sp.cumsum(-1) - sp < top_p
    sp = sp * keep
    return si.gather(1, torch.multinomial(sp / sp.sum(-1, keepdim=True), 1, generator=g))


def _prompt_ids(tokenizer, prompt: str) -> list[int]:
    """A seed prompt as the model is asked things: through its chat template where it has one (ending where the
    assistant's answer starts), else the bare text and a blank line."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=True,
                                            add_generation_prompt=True)
        ids = ids["input_ids"] if hasattr(ids, "keys") else ids
        return list(ids)
    return tokenizer(prompt + "\n\n", add_special_tokens=True).input_ids


@torch.no_grad()
def sample_corpus(model, tokenizer, tokens: int, seq_len: int = 256, batch_size: int = 8, seed: int = 0,
                  temperature: float = 1.0, top_p: float = 0.95, progress: bool = True,
                  candidates: int = 1024, bf16: bool | None = None, prompts: list[str] | None = None,
                  deadline: float | None = None) -> torch.Tensor:
    """A data-free calibration corpus: `tokens` token ids sampled from the (dense) model itself. Without
    `prompts` each sequence starts from BOS (or a random vocabulary token when the tokenizer has none) and
    keeps it; with them, each sequence is the model's `seq_len`-token answer to one prompt (surgery/prompts.py;
    the prompts cycle in a seeded order, left-padded in a batch; the prompt itself is not kept). Deterministic
    with `seed`.

    Nucleus sampling among the `candidates` most likely tokens (a top-k of the logits instead of sorting the
    whole vocabulary at every step); batches shrink to what is still needed, so no sequence is wasted.
    bf16: sample from a bfloat16 copy of a float32 model on a CPU (None: where bf16 matmuls are fast,
    precision.fast_bf16; the draws then differ from float32's where the rounding moves a probability).
    deadline (time.time() seconds): stop there with fewer tokens than asked; after the first batch, each batch
    shrinks to the sequences the measured rate fits before it."""
    import copy
    import time

    from tqdm import tqdm

    from surgery.kvcache import growing_cache, with_cache
    from surgery.precision import fast_bf16

    device = next(model.parameters()).device
    if bf16 is None:
        bf16 = device.type == "cpu" and fast_bf16(device)
    if bf16 and next(model.parameters()).dtype == torch.float32:
        model = copy.deepcopy(model).to(torch.bfloat16)
    g = torch.Generator().manual_seed(seed)
    bos = tokenizer.bos_token_id
    vocab = model.config.vocab_size
    if prompts:
        seeds = [_prompt_ids(tokenizer, p) for p in prompts]
        order = torch.randperm(len(seeds), generator=g).tolist()
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out, have, used = [], 0, 0
    bar = tqdm(total=tokens, desc="sampling corpus", unit="tok", disable=not progress)
    t0 = time.time()
    while have < tokens:
        n = min(batch_size, -(-(tokens - have) // seq_len))
        if deadline is not None and have:
            fit = int((deadline - time.time()) * have / max(time.time() - t0, 1e-9)) // seq_len
            if fit < 1:
                break
            n = min(n, fit)
        kw = {}
        if prompts:  # left-padded prompts, masked out; positions count only real tokens
            rows = [seeds[order[(used + i) % len(order)]] for i in range(n)]
            used += n
            P = max(len(r) for r in rows)
            step_ids = torch.full((n, P), pad, dtype=torch.long)
            mask = torch.zeros(n, P, dtype=torch.long)
            for i, r in enumerate(rows):
                step_ids[i, P - len(r):] = torch.tensor(r)
                mask[i, P - len(r):] = 1
            step_ids, mask = step_ids.to(device), mask.to(device)
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            kw = {"attention_mask": mask, "position_ids": pos}
            ids = step_ids.new_empty(n, 0)
            steps = seq_len
        else:
            if bos is not None:
                ids = torch.full((n, 1), bos, dtype=torch.long)
            else:
                ids = torch.randint(0, vocab, (n, 1), generator=g)
            ids = ids.to(device)
            step_ids = ids
            steps = seq_len - 1
        # A KV cache allocated for the batch's final length: the default dynamic cache concatenates every layer's
        # keys and values at every step (at batch 128 x 64 steps that was 16% of the time, and it grows with
        # the sequence); decode steps write in place and attend only the positions written so far.
        cache = growing_cache(model, n, step_ids.shape[1] + steps, device, next(model.parameters()).dtype)
        at = torch.arange(step_ids.shape[1], device=device)
        for _ in range(steps):
            res = model(input_ids=step_ids, use_cache=True, cache_position=at, **kw, **with_cache(model, cache))
            step_ids = _draw(res.logits[:, -1], g, temperature, top_p, candidates).to(device)
            ids = torch.cat([ids, step_ids], 1)
            at = at[-1:] + 1
            if prompts:
                kw["attention_mask"] = torch.cat([kw["attention_mask"], kw["attention_mask"].new_ones(n, 1)], 1)
                kw["position_ids"] = kw["position_ids"][:, -1:] + 1
        out.append(ids.reshape(-1).cpu())
        have += ids.numel()
        bar.update(ids.numel())
    bar.close()
    return torch.cat(out)[:tokens]
