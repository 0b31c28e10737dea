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
