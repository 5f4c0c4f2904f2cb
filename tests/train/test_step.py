"""The jit training step on the tiny random Llama: objectives, frozen base, accumulation, gathering."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pdistill_jax.model import losses
from pdistill_jax.config import LoraConfig, TrainConfig
from pdistill_jax.weights.load import load_model
from pdistill_jax.model.transformer import causal_inputs
from pdistill_jax.model.sharding import make_mesh
from pdistill_jax.train.step import (init_train_state, make_loss_sums, make_train_step,
                               loss_chunk_for, lr_schedule)

END_ID = 2  # stands in for the end-of-turn id; any id works for the step


def random_batch(seed: int, vocab: int, rows: int, *, same_prompt: bool = False,
                 doc=(8, 20), question=(3, 8), answer=(2, 7)) -> dict[str, np.ndarray]:
    """A batch in the shared format from random ids: teacher = doc + question + answer + end,
    student = question + answer + end (or the teacher's sequence when same_prompt), right-padded."""
    rng = np.random.default_rng(seed)
    ids = lambda lo_hi: list(rng.integers(3, vocab, rng.integers(*lo_hi)))
    rows_t, rows_s, answers = [], [], []
    for _ in range(rows):
        d, q, a = ids(doc), ids(question), ids(answer) + [END_ID]
        rows_t.append(d + q + a)
        rows_s.append(rows_t[-1] if same_prompt else q + a)
        answers.append(a)
    pad_to = lambda n, m: -(-n // m) * m
    tt, ts = pad_to(max(map(len, rows_t)), 8), pad_to(max(map(len, rows_s)), 8)
    a_len = max(map(len, answers))
    out = {k: np.zeros((rows, n), np.int32) for k, n in (("teacher_tokens", tt), ("student_tokens", ts),
           ("targets", a_len), ("teacher_pos", a_len), ("student_pos", a_len))}
    out.update(teacher_valid=np.zeros((rows, tt), bool), student_valid=np.zeros((rows, ts), bool),
               target_mask=np.zeros((rows, a_len), bool))
    for i, (t, s, a) in enumerate(zip(rows_t, rows_s, answers)):
        out["teacher_tokens"][i, :len(t)], out["teacher_valid"][i, :len(t)] = t, True
        out["student_tokens"][i, :len(s)], out["student_valid"][i, :len(s)] = s, True
        out["targets"][i, :len(a)], out["target_mask"][i, :len(a)] = a, True
        # logits at position p predict token p + 1: the answer's first token is predicted one
        # position before it starts.
        out["teacher_pos"][i, :len(a)] = np.arange(len(t) - len(a) - 1, len(t) - 1)
        out["student_pos"][i, :len(a)] = np.arange(len(s) - len(a) - 1, len(s) - 1)
    return out


def with_student_prefix(batch: dict[str, np.ndarray], prefix: list[int]) -> dict[str, np.ndarray]:
    """The batch with `prefix` put before every student sequence (what `collate` leaves out
    when the step is built with student_prefix=prefix)."""
    p = len(prefix)
    out = dict(batch)
    rows, ts = batch["student_tokens"].shape
    out["student_tokens"] = np.concatenate([np.tile(np.asarray(prefix, np.int32), (rows, 1)),
                                            batch["student_tokens"]], axis=1)
    out["student_valid"] = np.concatenate([np.ones((rows, p), bool), batch["student_valid"]], axis=1)
    out["student_pos"] = np.where(batch["target_mask"], batch["student_pos"] + p, 0).astype(np.int32)
    return out


def train_config(**kw) -> TrainConfig:
    base = dict(lora=LoraConfig(rank=8, alpha=16), lr=1e-2, warmup_ratio=0.0, weight_decay=0.0,
                batch_size=4, tau=2.0)
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def tiny_lora(tiny_llama):
    """The tiny Llama with a rank-8 adapter, loaded once; each test splits off fresh state."""
    return load_model(tiny_llama, LoraConfig(rank=8, alpha=16), with_tokenizer=False)


def setup(loaded, cfg: TrainConfig, mesh_shape=(1, 1, 1), total_steps: int = 100):
    assert cfg.lora == loaded.model.lora_config
    n = int(np.prod(mesh_shape))
    mesh = make_mesh(mesh_shape, jax.devices()[:n])
    graphdef, base, state, optimizer = init_train_state(loaded.model, cfg, total_steps, mesh)
    return loaded, mesh, graphdef, base, state, optimizer


def run_steps(step, state, base, batch, n):
    out = []
    for _ in range(n):
        state, metrics = step(state, base, batch)
        out.append({k: float(v) for k, v in metrics.items()})
    return state, out


def test_identical_prompts_give_zero_loss_and_gradient(tiny_lora):
    # LoRA B starts at 0, so the student IS the teacher: on identical prompts KL = 0 exactly.
    cfg = train_config()
    loaded, mesh, graphdef, base, state, opt = setup(tiny_lora, cfg)
    same = random_batch(0, loaded.cfg.vocab_size, 4, same_prompt=True)
    _, metrics = make_train_step(graphdef, opt, cfg, mesh)(state, base, same)
    assert float(metrics["loss"]) == pytest.approx(0.0, abs=1e-6)
    assert float(metrics["grad_norm"]) == pytest.approx(0.0, abs=1e-6)
    assert float(metrics["answer_tokens"]) == same["target_mask"].sum()


@pytest.fixture(scope="module")
def tiny_qwen3_lora(tiny_qwen3):
    return load_model(tiny_qwen3, LoraConfig(rank=8, alpha=16), with_tokenizer=False)


@pytest.fixture(scope="module")
def tiny_phi3_lora(tiny_phi3):
    return load_model(tiny_phi3, LoraConfig(rank=8, alpha=16), with_tokenizer=False)


@pytest.fixture(scope="module")
def tiny_gemma3_lora(tiny_gemma3):
    return load_model(tiny_gemma3, LoraConfig(rank=8, alpha=16), with_tokenizer=False)


# The first KL must show something to learn; tiny_phi3's random teacher/student gap starts lower.
@pytest.mark.parametrize("loaded, first_kl", [("tiny_lora", 0.01), ("tiny_qwen3_lora", 0.01),
                                              ("tiny_phi3_lora", 0.005),
                                              ("tiny_gemma3_lora", 0.01)])
def test_kl_falls_base_frozen_lora_trained_opt_state_lora_only(loaded, first_kl, request):
    cfg = train_config(weight_decay=0.1)
    loaded, mesh, graphdef, base, state, opt = setup(request.getfixturevalue(loaded), cfg)
    base_before = jax.tree.map(np.array, base)
    lora_before = jax.tree.map(np.array, state.lora)
    step = make_train_step(graphdef, opt, cfg, mesh)
    state, hist = run_steps(step, state, base, random_batch(1, loaded.cfg.vocab_size, 4), 8)
    assert hist[0]["loss"] > first_kl
    assert hist[-1]["loss"] < 0.5 * hist[0]["loss"], [h["loss"] for h in hist]
    assert int(state.step) == 8 and hist[0]["lr"] == pytest.approx(cfg.lr)

    for before, after in zip(jax.tree.leaves(base_before), jax.tree.leaves(base)):
        np.testing.assert_array_equal(before, np.asarray(after))  # bitwise
    changed = [not np.array_equal(b, np.asarray(a))
               for b, a in zip(jax.tree.leaves(lora_before), jax.tree.leaves(state.lora))]
    assert all(changed)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.lora))

    # Optimizer state: Adam's mu and nu for each LoRA leaf, nothing shaped like a base weight.
    lora_paths = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(state.lora)}
    arrays = [(jax.tree_util.keystr(p), x) for p, x in jax.tree_util.tree_leaves_with_path(state.opt_state)
              if x.ndim > 0]
    assert len(arrays) == 2 * len(lora_paths)
    for path, x in arrays:
        assert any(path.endswith(lp) for lp in lora_paths), path
        assert x.dtype == jnp.float32


def test_grad_accum_equals_full_batch(tiny_lora):
    batch = random_batch(3, 384, 4)
    results = []
    for bs, accum in ((4, 1), (2, 2)):
        cfg = train_config(batch_size=bs, grad_accum=accum, lr=1e-4)  # see test_sharding
        loaded, mesh, graphdef, base, state, opt = setup(tiny_lora, cfg)
        assert loaded.cfg.vocab_size == 384
        step = make_train_step(graphdef, opt, cfg, mesh)
        state, hist = run_steps(step, state, base, batch, 2)
        results.append((jax.tree.map(np.asarray, state.lora), hist))
    (lora_a, hist_a), (lora_b, hist_b) = results
    for h_a, h_b in zip(hist_a, hist_b):
        for k in ("loss", "grad_norm", "answer_tokens", "lr"):
            np.testing.assert_allclose(h_a[k], h_b[k], rtol=1e-5, atol=1e-7)
    for x, y in zip(jax.tree.leaves(lora_a), jax.tree.leaves(lora_b)):
        np.testing.assert_allclose(x, y, atol=1e-5)


def test_lora_b_lr_ratio_scales_the_b_updates_only(tiny_lora):
    # B starts at zero, so the first step moves B only (A's gradient is zero there): with the
    # ratio, that step's B is `ratio` times the plain run's, and A stays where it started.
    batch = random_batch(4, 384, 4)
    paths = lambda tree: {jax.tree_util.keystr(p): np.array(x)
                          for p, x in jax.tree_util.tree_leaves_with_path(tree)}
    runs = {}
    for ratio in (1.0, 4.0):
        cfg = train_config(lr=1e-3, max_grad_norm=1e9, lora_b_lr_ratio=ratio)
        loaded, mesh, graphdef, base, state, opt = setup(tiny_lora, cfg)
        start = paths(state.lora)  # before the step, which donates the state's buffers
        state, _ = make_train_step(graphdef, opt, cfg, mesh)(state, base, batch)
        runs[ratio] = paths(state.lora)
    plain, plus = runs[1.0], runs[4.0]
    b_paths = [p for p in start if "lora_b" in p]
    assert b_paths and len(b_paths) == len(start) // 2
    for p in start:
        if "lora_b" in p:
            assert np.abs(plain[p]).max() > 0
            np.testing.assert_allclose(plus[p], 4.0 * plain[p], rtol=1e-5, atol=1e-9)
        else:
            np.testing.assert_array_equal(plain[p], start[p])
            np.testing.assert_array_equal(plus[p], start[p])


@pytest.mark.parametrize("objective", ["kl", pytest.param("ce", marks=pytest.mark.slow)])
def test_a_shared_student_prefix_run_once_trains_as_in_every_row(tiny_lora, objective):
    # The prefix's keys/values are computed for one row and read by all: same losses, same
    # gradients (into the prefix too), same adapter after the updates; with gradient
    # accumulation each micro-batch runs the prefix once.
    batch = random_batch(5, 384, 4)
    prefix = [7, 300, 12, 45, 45, 9, 101, 3, 250, 77]
    results = []
    for student_prefix, b, accum in (((), with_student_prefix(batch, prefix), 1), (prefix, batch, 1),
                                     (prefix, batch, 2)):
        cfg = train_config(objective=objective, lr=1e-4, batch_size=4 // accum,
                           grad_accum=accum)  # lr: see test_sharding
        loaded, mesh, graphdef, base, state, opt = setup(tiny_lora, cfg)
        step = make_train_step(graphdef, opt, cfg, mesh, student_prefix=student_prefix)
        state, hist = run_steps(step, state, base, b, 3)
        results.append((jax.tree.map(np.asarray, state.lora), hist))
    (want_lora, want), *others = results
    assert want[0]["loss"] > 0.01 and want[-1]["loss"] < want[0]["loss"]
    for got_lora, got in others:
        for g, w in zip(got, want):
            for k in ("loss", "grad_norm", "answer_tokens"):
                np.testing.assert_allclose(g[k], w[k], rtol=1e-5, err_msg=k)
        for x, y in zip(jax.tree.leaves(got_lora), jax.tree.leaves(want_lora)):
            np.testing.assert_allclose(x, y, atol=1e-6)


@pytest.mark.slow  # a long tiny-model check (25–30 s), run by CI's slow step
def test_gather_before_head_equals_full_logits(tiny_lora):
    cfg = train_config()
    loaded, mesh, graphdef, base, state, _ = setup(tiny_lora, cfg)
    batch = random_batch(4, loaded.cfg.vocab_size, 4, answer=(5, 20))
    # A non-zero adapter, so that a mix-up of the teacher's and student's use_lora shows.
    keys = iter(jax.random.split(jax.random.key(0), 64))
    lora = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(next(keys), x.shape), state.lora)
    b = {k: jnp.asarray(v) for k, v in batch.items()}

    @jax.jit
    def gathered_full_logits(lora, base, b):
        model = nnx.merge(graphdef, lora, base)

        def full_logits(tokens, valid, use_lora):
            hidden, _ = model(tokens, *causal_inputs(tokens, valid), use_lora=use_lora)
            return model.logits(hidden, use_lora)  # every position projected, then gathered

        take = lambda logits, pos: logits[jnp.arange(pos.shape[0])[:, None], pos]  # (B, A, V)
        return (take(full_logits(b["teacher_tokens"], b["teacher_valid"], False), b["teacher_pos"]),
                take(full_logits(b["student_tokens"], b["student_valid"], True), b["student_pos"]))

    t, s = gathered_full_logits(lora, base, b)
    mask = b["target_mask"]
    refs = {"kl": losses.sequence_mean(losses.forward_kl_per_token(t, s, cfg.tau), mask),
            "reverse_kl": losses.sequence_mean(losses.reverse_kl_per_token(t, s, cfg.tau), mask),
            "jsd": losses.sequence_mean(losses.jsd_per_token(t, s, cfg.tau, cfg.jsd_beta), mask),
            "ce": losses.sequence_mean(losses.cross_entropy_per_token(s, b["targets"]), mask)}
    for objective, want in refs.items():
        ocfg = train_config(objective=objective)
        for chunk in (4, None):  # 4: several chunks under jax.checkpoint; None: one (they fit)
            # The loss the train step differentiates, without an update.
            total, (count, tokens) = jax.jit(make_loss_sums(graphdef, ocfg, chunk))(lora, base, b)
            assert float(want) > 1e-3
            np.testing.assert_allclose(float(total / jnp.maximum(count, 1.0)), float(want),
                                       rtol=1e-5, err_msg=f"{objective}, chunk {chunk}")
            assert float(tokens) == batch["target_mask"].sum()


def test_loss_chunk_for_keeps_logits_within_the_budget():
    assert loss_chunk_for(8, 48, 49152) == 48  # the demo: 18.9M logits, one chunk
    assert loss_chunk_for(8, 100, 152064) == 25  # 27 fit: 4 chunks of 25, not 27+27+27+19
    for rows, positions, vocab in [(8, 512, 152064), (64, 100, 32000), (1, 7, 10), (3, 1, 2**30)]:
        chunk = loss_chunk_for(rows, positions, vocab)
        assert 1 <= chunk <= positions
        n = -(-positions // chunk)
        assert rows * chunk * vocab <= max(1 << 25, rows * vocab)  # one position always goes
        assert n * chunk - positions < n  # equal chunks: less than one position of padding each


@pytest.mark.parametrize("objective", ["ce", "reverse_kl", "jsd"])
def test_other_objectives_decrease(tiny_lora, objective):
    cfg = train_config(objective=objective)
    loaded, mesh, graphdef, base, state, opt = setup(tiny_lora, cfg)
    batch = random_batch(5, loaded.cfg.vocab_size, 4)
    if objective == "ce":  # the teacher is unused: garbage there must not matter
        batch["teacher_tokens"][:] = 0
    _, hist = run_steps(make_train_step(graphdef, opt, cfg, mesh), state, base, batch, 6)
    losses_seen = [h["loss"] for h in hist]
    assert losses_seen[0] > 0 and losses_seen[-1] < 0.7 * losses_seen[0], losses_seen


def test_bfloat16_compute_keeps_lora_and_adam_float32(tiny_lora):
    cfg = train_config(compute_dtype="bfloat16", remat=True)
    loaded, mesh, graphdef, base, state, opt = setup(tiny_lora, cfg)
    assert loaded.model.dtype == jnp.bfloat16 and loaded.model.remat
    batch = random_batch(6, loaded.cfg.vocab_size, 4)
    state, hist = run_steps(make_train_step(graphdef, opt, cfg, mesh), state, base, batch, 4)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves((state.lora, state.opt_state))
               if jnp.issubdtype(x.dtype, jnp.floating))
    assert np.isfinite([h["loss"] for h in hist]).all()
    assert hist[-1]["loss"] < hist[0]["loss"]


def test_schedule_warmup_then_linear_decay():
    cfg = train_config(lr=1.0, warmup_ratio=0.1)
    sched = lr_schedule(cfg, 100)
    assert float(sched(0)) == 0.0
    assert float(sched(5)) == pytest.approx(0.5)
    assert float(sched(10)) == pytest.approx(1.0)
    assert float(sched(55)) == pytest.approx(0.5)
    assert float(sched(100)) == pytest.approx(0.0, abs=1e-7)


def test_bad_batch_is_rejected_with_a_clear_message(tiny_lora):
    cfg = train_config()
    loaded, mesh, graphdef, base, state, opt = setup(tiny_lora, cfg)
    step = make_train_step(graphdef, opt, cfg, mesh)
    batch = random_batch(7, loaded.cfg.vocab_size, 3)
    with pytest.raises(ValueError, match="batch_size \\* grad_accum"):
        step(state, base, batch)
    del batch["targets"]
    with pytest.raises(ValueError, match="lacks \\[.targets.\\]"):
        step(state, base, batch)


def test_lora_custom_backward_matches_autodiff():
    # model._lora_delta has a hand-written backward (for operand layouts); it must be exact.
    from pdistill_jax.model.transformer import _lora_delta

    k = iter(jax.random.split(jax.random.key(1), 4))
    x, a, b = (jax.random.normal(next(k), s) for s in ((2, 5, 6), (6, 3), (3, 7)))
    g = jax.random.normal(next(k), (2, 5, 7))
    got_y, got_vjp = jax.vjp(_lora_delta, x, a, b)
    want_y, want_vjp = jax.vjp(lambda x, a, b: (x @ a) @ b, x, a, b)
    np.testing.assert_allclose(got_y, want_y, rtol=1e-6)
    for got, want in zip(jax.jit(got_vjp)(g), want_vjp(g)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
