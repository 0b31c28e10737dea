"""Outputs appear whole or not at all: build in a temporary sibling, rename when complete."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

from surgery.errors import SurgeryError


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike, overwrite: bool = False):
    """Yield a fresh temporary folder next to `out`; on success it becomes `out`, on any error it is removed."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise SurgeryError(f"{out}: already exists (choose another path or pass --overwrite)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        publish_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def publish_dir(work: Path, out: Path) -> None:
    """Make the finished folder `work` become `out`; an existing `out` is swapped out first and removed after,
    so `out` is never missing or partial."""
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
        os.replace(work, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(work, out)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike):
    """Yield a temporary sibling path to write `path`'s content to; on success it replaces `path`, on any error
    it is removed (a reader never sees a half-written file)."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, data, indent: int = 2) -> None:
    """`data` as indented JSON at `path` (parent folders made), written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(data, indent=indent) + "\n")
