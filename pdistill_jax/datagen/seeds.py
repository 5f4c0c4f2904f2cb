"""The seed of every sampler call of generation, derived from what the call is for."""
from __future__ import annotations

import hashlib
import json


def derive_seed(*parts) -> int:
    """A 31-bit seed from any JSON-able parts (stable across runs and machines)."""
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True).encode("utf-8")).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF
