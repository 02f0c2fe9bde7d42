"""Seeded randomness: every random choice derives from (config seed, stream name, item id, k)."""

from __future__ import annotations

import hashlib

import numpy as np


def derive_seed(seed: int, *keys: object) -> int:
    """A 64-bit seed from the config seed and any keys; independent of call order and process."""
    text = "\x1f".join([str(int(seed)), *(str(k) for k in keys)])
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big")


def rng_for(seed: int, *keys: object) -> np.random.Generator:
    """A numpy Generator for one random decision, e.g. rng_for(seed, "augment", item_id, k)."""
    return np.random.default_rng(derive_seed(seed, *keys))
