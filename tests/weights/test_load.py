"""load_model and the in-process reuse of checkpoints that `pdistill run` relies on."""
from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from pdistill_jax.weights import load
from pdistill_jax.config import LoraConfig


def _counting_reads(monkeypatch) -> list:
    reads = []
    real = load.load_checkpoint

    def counted(path, dtype):
        reads.append(path)
        return real(path, dtype)

    monkeypatch.setattr(load, "load_checkpoint", counted)
    return reads


def _split(model):
    _, lora, base = nnx.split(model, nnx.LoRAParam, nnx.Param)
    return jax.tree.leaves(lora), [np.asarray(x) for x in jax.tree.leaves(base)]


def test_reuse_reads_each_checkpoint_once_inside_the_block_only(tiny_llama, monkeypatch):
    reads = _counting_reads(monkeypatch)
    plain = load.load_model(tiny_llama)
    with load.reuse_loaded_checkpoints():
        first = load.load_model(tiny_llama)
        with load.reuse_loaded_checkpoints():  # nested blocks share the outer one's reads
            adapted = load.load_model(tiny_llama, LoraConfig(rank=4, alpha=8.0), seed=3)
        assert adapted.tokenizer is first.tokenizer
    again = load.load_model(tiny_llama)
    assert len(reads) == 3  # plain, once inside the block, again: nothing is kept after it
    (_, want), (no_lora, got), (lora, got_adapted) = map(_split, (plain.model, first.model,
                                                                  adapted.model))
    assert len(want) == len(got) == len(got_adapted) > 0
    for a, b, c in zip(want, got, got_adapted):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)
    assert lora and not no_lora
    assert again.tokenizer is not first.tokenizer
    assert load._reused is None
