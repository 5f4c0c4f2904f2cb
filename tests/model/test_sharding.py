"""Mesh construction, placements derived from logical axes, and sharded == single-device training.

conftest sets XLA_FLAGS=--xla_force_host_platform_device_count=8 before JAX starts, so these run
on 8 fake CPU devices.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from pdistill_jax.model import sharding
from pdistill_jax.config import LoraConfig
from pdistill_jax.weights.load import load_model
from pdistill_jax.model.sharding import make_mesh, state_shardings
from pdistill_jax.train.step import init_train_state, make_train_step
from test_step import random_batch, train_config, with_student_prefix

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices")


def test_make_mesh_shapes_and_errors():
    mesh = make_mesh((-1, 2, 1))
    assert mesh.axis_names == ("data", "fsdp", "tensor")
    assert dict(mesh.shape) == {"data": 4, "fsdp": 2, "tensor": 1}
    assert dict(make_mesh((1, 1, 1)).shape) == {"data": 1, "fsdp": 1, "tensor": 1}
    with pytest.raises(ValueError, match="does not divide the 8 available devices"):
        make_mesh((3, 1, 1))
    with pytest.raises(ValueError, match="at most one may be -1"):
        make_mesh((-1, -1, 1))
    assert sharding.parse_mesh("data=2,fsdp=2,tensor=2") == (2, 2, 2)
    assert sharding.parse_mesh("fsdp=-1") == (1, -1, 1)
    with pytest.raises(ValueError, match="expected data=N"):
        sharding.parse_mesh("model=2")


def test_state_shardings_follow_logical_axes(tiny_llama):
    model = load_model(tiny_llama, LoraConfig(rank=8, alpha=16), with_tokenizer=False).model
    _, lora, base = nnx.split(model, nnx.LoRAParam, nnx.Param)
    mesh = make_mesh((1, 2, 4))
    specs = {jax.tree_util.keystr(p): s.spec for p, s in
             jax.tree_util.tree_leaves_with_path(state_shardings((lora, base), mesh))}
    find = lambda suffix: next(v for k, v in specs.items() if k.endswith(suffix))
    # Stacked layer weights: the leading layer axis (not in `axes`) stays whole.
    assert find("['attn']['q']['kernel'].value") == P(None, "fsdp", "tensor")
    assert find("['attn']['o']['kernel'].value") == P(None, "tensor", "fsdp")
    assert find("['mlp']['down']['kernel'].value") == P(None, "tensor", "fsdp")
    assert find("['attn_norm']['weight'].value") == P(None, "fsdp")
    assert find("['embed'].value") == P("tensor", "fsdp")
    assert find("['lm_head']['kernel'].value") == P("fsdp", "tensor")
    # LoRA: the rank axis is never split.
    assert find("['attn']['q']['lora_a'].value") == P(None, "fsdp", None)
    assert find("['attn']['q']['lora_b'].value") == P(None, None, "tensor")

    placed = sharding.shard_state(lora, mesh)
    q_a = placed["layers"]["attn"]["q"]["lora_a"][...]
    assert q_a.sharding.spec == P(None, "fsdp", None)
    assert q_a.addressable_shards[0].data.shape == (2, 32, 8)


def test_indivisible_axes_are_replicated():
    mesh = make_mesh((1, 2, 4))
    state = nnx.State({"odd": nnx.Param(jnp.zeros((3, 6)), axes=("embed", "mlp")),
                       "even": nnx.Param(jnp.zeros((4, 8)), axes=("embed", "mlp"))})
    shard = state_shardings(state, mesh)
    assert shard["odd"].get_value().spec == P(None, None)  # 3 % 2 and 6 % 4 are not 0
    assert shard["even"].get_value().spec == P("fsdp", "tensor")


def test_global_batch_and_single_process_distributed(monkeypatch):
    for key in ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "SLURM_NTASKS",
                "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "TPU_WORKER_HOSTNAMES"):
        monkeypatch.delenv(key, raising=False)
    assert sharding.initialize_distributed() is False  # one process: nothing to join
    monkeypatch.setenv("JAX_NUM_PROCESSES", "4")
    assert sharding._launched_multi_process()
    monkeypatch.setenv("JAX_NUM_PROCESSES", "1")
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "10.0.0.1,10.0.0.2")
    assert sharding._launched_multi_process()

    mesh = make_mesh((2, 2, 2))
    local = {"student_tokens": np.arange(8 * 5, dtype=np.int32).reshape(8, 5),
             "target_mask": np.ones((8, 3), bool)}
    batch = sharding.global_batch(local, mesh)
    np.testing.assert_array_equal(np.asarray(batch["student_tokens"]), local["student_tokens"])
    assert batch["student_tokens"].sharding.spec == P(("data", "fsdp"))
    assert batch["student_tokens"].addressable_shards[0].data.shape == (2, 5)


def _train(tiny_llama, mesh_shape, batch, steps=2, student_prefix=()):
    # lr 1e-4: Adam divides by |g| + 1e-8, which amplifies float noise in near-zero gradients
    # into update differences of up to ~lr; 1e-5 then still catches any real mismatch.
    cfg = train_config(batch_size=8, lr=1e-4, weight_decay=0.1)
    model = load_model(tiny_llama, cfg.lora, with_tokenizer=False).model
    mesh = make_mesh(mesh_shape)
    graphdef, base, state, opt = init_train_state(model, cfg, 10, mesh)
    step = make_train_step(graphdef, opt, cfg, mesh, student_prefix=student_prefix)
    hist = []
    for _ in range(steps):
        state, metrics = step(state, base, sharding.global_batch(batch, mesh))
        hist.append({k: float(v) for k, v in metrics.items()})
    q_a = state.lora["layers"]["attn"]["q"]["lora_a"][...]
    expect = sharding._spec_for(q_a.shape, ("embed", "lora"), mesh)
    assert q_a.sharding.spec == expect  # the step keeps the LoRA where the rules put it
    return hist, jax.tree.map(np.asarray, state.lora)


def test_sharded_training_matches_single_device(tiny_llama):
    batch = random_batch(11, 384, 8, doc=(4, 10), question=(2, 5), answer=(2, 5))
    want_hist, want_lora = _train(tiny_llama, (1, 1, 1), batch)
    assert want_hist[1]["loss"] < want_hist[0]["loss"]
    for shape in ((8, 1, 1), (2, 2, 2), (1, 2, 4)):
        hist, lora = _train(tiny_llama, shape, batch)
        for got, want in zip(hist, want_hist):
            for k in ("loss", "grad_norm", "answer_tokens"):
                np.testing.assert_allclose(got[k], want[k], rtol=1e-4, err_msg=f"{shape} {k}")
        for x, y in zip(jax.tree.leaves(lora), jax.tree.leaves(want_lora)):
            np.testing.assert_allclose(x, y, atol=1e-5, err_msg=str(shape))


@pytest.mark.slow  # a long tiny-model check: CI's slow step runs it
def test_sharded_training_with_a_shared_student_prefix(tiny_llama):
    # The prefix runs once, replicated, and its keys/values are read by rows on every device.
    batch = random_batch(12, 384, 8, doc=(4, 10), question=(2, 5), answer=(2, 5))
    prefix = [5, 17, 200, 31, 8, 8, 64, 90, 11]
    want_hist, want_lora = _train(tiny_llama, (1, 1, 1), with_student_prefix(batch, prefix))
    for shape in ((8, 1, 1), (1, 2, 4)):
        hist, lora = _train(tiny_llama, shape, batch, student_prefix=prefix)
        for got, want in zip(hist, want_hist):
            for k in ("loss", "grad_norm", "answer_tokens"):
                np.testing.assert_allclose(got[k], want[k], rtol=1e-4, err_msg=f"{shape} {k}")
        for x, y in zip(jax.tree.leaves(lora), jax.tree.leaves(want_lora)):
            np.testing.assert_allclose(x, y, atol=1e-5, err_msg=str(shape))
