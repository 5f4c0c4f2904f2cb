"""The teacher's final hidden states at every PD answer position, as generation keeps them.

While it samples the PD answers, the teacher (the base model with the document in its prompt)
computes exactly the hidden states that PD training's teacher would compute again. Generation
keeps them beside qa.jsonl (TEACHER_STATES_DIR, one .npz per wave, at most teacher_states_gb),
keyed by a hash of the model, the dtype they were computed in and the whole teacher sequence;
training takes every row whose re-tokenised teacher sequence hashes the same in its own compute
dtype (train/teacher_cache.py) and runs the teacher only for the rest. States decoded from
bfloat16 weights (decode_dtype bfloat16) thus serve a bfloat16 training only, never a float32 one.
"""
from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from pdistill_jax.files import atomic_writer
from pdistill_jax.log import logger

TEACHER_STATES_DIR = "teacher_states"  # beside qa.jsonl
_log = logger("train")  # the states are read by training


def model_fingerprint(path: str | Path) -> str:
    """Names a checkpoint cheaply: its files' resolved paths, sizes and modification times (a
    re-fetched or edited checkpoint gets a new name, so no stale state is ever matched)."""
    path = Path(path).resolve()
    files = sorted(f for f in path.iterdir() if f.is_file()) if path.is_dir() else [path]
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def teacher_sequence_key(fingerprint: str, dtype, ids: Sequence[int]) -> str:
    """The key of one teacher sequence's states: (model, compute dtype, prompt + answer ids)."""
    h = hashlib.sha256(f"{fingerprint}:{np.dtype(dtype).name}:".encode())
    h.update(np.asarray(ids, "<i4").tobytes())
    return h.hexdigest()


def state_entry(fingerprint: str, ids: Sequence[int], hidden: np.ndarray
                ) -> tuple[str, np.ndarray]:
    """(key, array) of the states `hidden` the teacher computed for the sequence `ids`. The key
    names the dtype they were computed in (the generation's decode_dtype), so a training in
    another compute dtype never takes them: it runs the teacher itself for those rows. The array
    is float32, which holds bfloat16 values exactly (an .npz cannot hold bfloat16 itself);
    training casts it to its own compute dtype."""
    return teacher_sequence_key(fingerprint, hidden.dtype, ids), np.asarray(hidden, np.float32)


def save_teacher_states(path: str | Path, states: dict[str, np.ndarray]) -> None:
    """states (key -> (answer tokens + 1, D)) as one .npz, written atomically."""
    with atomic_writer(path, "wb") as f:
        np.savez(f, **states)


def teacher_states_bytes(folder: Path) -> int:
    """The disk the stored states take (what teacher_states_gb bounds)."""
    return sum(f.stat().st_size for f in folder.glob("*.npz"))


def load_teacher_states(folder: str | Path, keys: Iterable[str]) -> dict[str, np.ndarray]:
    """The stored states of those keys found in folder's .npz files. They only save time, so an
    unreadable file is reported and skipped (its rows are recomputed), never fatal."""
    wanted, found = set(keys), {}
    for file in sorted(Path(folder).glob("*.npz")):
        try:
            with np.load(file) as z:
                for key in wanted.intersection(z.files).difference(found):
                    found[key] = z[key]
        except (OSError, ValueError, zipfile.BadZipFile) as e:
            _log.warning(f"{file}: unreadable ({e}); its teacher states are recomputed")
    return found
