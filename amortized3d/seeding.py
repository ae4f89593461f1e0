"""Seeds derived from integers, independent of Python's hash randomization (shared by training and data loading)."""

from __future__ import annotations

import hashlib


def derived_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers."""
    digest = hashlib.sha256(",".join(str(int(p)) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)
