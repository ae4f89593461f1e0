"""Files written whole or not at all, and their digests: the one way every writer in amortized3d does it.

    atomic_path(path)          a temporary name beside ``path``; renamed onto it on success, removed on error
    write_text_atomic(path, s) text written through atomic_path
    sha256_file(path)          (hex digest, size in bytes), read in blocks

A killed process can leave a temporary file (``.NAME.PID.tmp.SUFFIX``), never a half-written file under
the final name.
"""

from __future__ import annotations

import hashlib
import os
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path beside ``path`` (same suffix, so writers that choose a format by it still do); on
    success it replaces ``path`` in one rename, on any error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` through atomic_path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def sha256_file(path: str | Path) -> tuple[str, int]:
    """(sha256 hex digest, size in bytes) of a file, read in 8 MB blocks."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while block := f.read(8 * 2**20):
            digest.update(block)
            size += len(block)
    return digest.hexdigest(), size
