"""The step's extra loss terms on the tiny Llama: KL + alpha * CE, the hidden-state term, the
retention KL-to-base."""
from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

from pdistill_jax.config import FieldError, LoraConfig, TrainConfig
from pdistill_jax.model import losses
from pdistill_jax.train.batches import Example
from pdistill_jax.train.retention import RetentionBatches
from pdistill_jax.train.step import (RETENTION_HIDDEN, TEACHER_HIDDEN, TEACHER_KEYS,
                                    boosted_target, closed_book_hidden, make_train_step,
                                    retention_sums, student_hidden, teacher_hidden)
from pdistill_jax.weights.load import load_model
from test_step import random_batch, run_steps, setup, train_config

ALPHA, WEIGHT = 0.3, 0.5
BASE_KEYS = {"loss", "grad_norm", "lr", "answer_tokens"}


@pytest.fixture(scope="module")
def tiny_lora(tiny_llama):
    """The tiny Llama with test_step's rank-8 adapter (train_config's), loaded once."""
    return load_model(tiny_llama, LoraConfig(rank=8, alpha=16), with_tokenizer=False)


def with_ce_mask(batch: dict) -> dict:
    """The batch with a ce_mask; row 0 stands for an answer cut at its token limit (its last
    target, the end token, is left out of the CE)."""
    out = dict(batch, ce_mask=batch["target_mask"].copy())
    out["ce_mask"][0, batch["target_mask"][0].sum() - 1] = False
    return out


def hand_losses(graphdef, base, lora, batch, tau):
    """(mean forward KL, CE sum over rows of their mean over ce_mask, rows) from the per-token
    functions, on full logits (no chunks, no shared prefix)."""
    model = nnx.merge(graphdef, lora, base)
    h_t = teacher_hidden(model, batch)
    h_s = take(student_hidden(model, batch), batch["student_pos"])
    student = model.logits(h_s, True)
    kl = losses.forward_kl_per_token(model.logits(h_t, False), student, tau)
    ce = losses.cross_entropy_per_token(student, batch["targets"])
    ce_sum, _ = losses.sequence_sums(ce, batch["ce_mask"])
    kl_sum, rows = losses.sequence_sums(kl, batch["target_mask"])
    return float(kl_sum / rows), float(ce_sum / rows)


def take(hidden, positions):
    return np.take_along_axis(np.asarray(hidden), np.asarray(positions)[..., None], axis=1)


def test_ce_weight_adds_alpha_times_the_answer_cross_entropy(tiny_lora):
    cfg = train_config(ce_weight=ALPHA)
    loaded, mesh, graphdef, base, state, opt = setup(tiny_lora, cfg)
    batch = with_ce_mask(random_batch(11, loaded.cfg.vocab_size, 4))
    lora = jax.tree.map(np.array, state.lora)
    kl, ce = hand_losses(graphdef, base, lora, batch, cfg.tau)
    _, (m,) = run_steps(make_train_step(graphdef, opt, cfg, mesh), state, base, batch, 1)
    assert m["loss"] == pytest.approx(kl + ALPHA * ce, abs=1e-5)
    assert (m["distill_loss"], m["ce_loss"]) == (pytest.approx(kl, abs=1e-5), pytest.approx(ce, abs=1e-5))
    assert ce > 1.0  # a random model: the CE term is far from zero and moved the loss

    # ce_weight = 0: the plain objective's loss and metrics, the ce_mask ignored
    cfg0 = train_config()
    _, mesh, graphdef, base, state, opt = setup(tiny_lora, cfg0)
    _, (m0,) = run_steps(make_train_step(graphdef, opt, cfg0, mesh), state, base, batch, 1)
    assert set(m0) == BASE_KEYS
    assert m0["loss"] == pytest.approx(kl, abs=1e-6)


@pytest.mark.slow  # 20-25 s; the plain objective's accumulation is test_step's, in the default run
def test_ce_weight_accumulates_exactly(tiny_lora):
    batch = with_ce_mask(random_batch(12, tiny_lora.cfg.vocab_size, 4))
    batch["target_mask"][3] = False  # a filler row, as collate pads an epoch's last batch
    batch["ce_mask"][3] = False
    hists, loras = [], []
    for bs, ga in ((4, 1), (2, 2)):
        cfg = train_config(ce_weight=ALPHA, batch_size=bs, grad_accum=ga, lr=1e-4)  # see test_step
        _, mesh, graphdef, base, state, opt = setup(tiny_lora, cfg)
        state, hist = run_steps(make_train_step(graphdef, opt, cfg, mesh), state, base, batch, 3)
        hists.append(hist)
        loras.append(jax.tree.leaves(jax.tree.map(np.array, state.lora)))
    for a, b in zip(*hists):
        for k in ("loss", "ce_loss", "grad_norm"):
            np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-7)
    for a, b in zip(*loras):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_hidden_weight_adds_the_relative_l1_of_the_final_states_cached_or_not(tiny_lora):
    """loss = KL + w * mean over rows of the per-token ||h_S - h_T||_1 / ||h_T||_1 on the answer
    positions, the teacher's states computed in the step or brought by the batch (the cache)."""
    weight = 0.7
    cfg = train_config(hidden_weight=weight)
    loaded, mesh, graphdef, base, state, opt = setup(tiny_lora, cfg)
    batch = random_batch(15, loaded.cfg.vocab_size, 4)
    batch["target_mask"][2] = False  # a filler row counts in neither term
    model = nnx.merge(graphdef, jax.tree.map(np.array, state.lora), base)
    h_t = teacher_hidden(model, batch)
    h_s = take(student_hidden(model, batch), batch["student_pos"])
    kl_sum, rows = losses.sequence_sums(
        losses.forward_kl_per_token(model.logits(h_t, False), model.logits(h_s, True), cfg.tau),
        batch["target_mask"])
    l1_sum, _ = losses.sequence_sums(losses.relative_l1_per_token(h_t, h_s), batch["target_mask"])
    kl, l1 = float(kl_sum / rows), float(l1_sum / rows)
    assert l1 > 0.05  # the document moves the teacher's states: the term is not zero at step 0

    cached = {k: v for k, v in batch.items() if k not in TEACHER_KEYS}
    cached[TEACHER_HIDDEN] = np.asarray(h_t)
    for b in (batch, cached):
        _, mesh, graphdef, base, state, opt = setup(tiny_lora, cfg)
        _, (m,) = run_steps(make_train_step(graphdef, opt, cfg, mesh), state, base, b, 1)
        assert set(m) == BASE_KEYS | {"distill_loss", "hidden_loss"}
        assert m["distill_loss"] == pytest.approx(kl, abs=1e-5)
        assert m["hidden_loss"] == pytest.approx(l1, rel=1e-5)
        assert m["loss"] == pytest.approx(kl + weight * l1, rel=1e-5)


def test_hidden_weight_alone_pulls_the_student_states_towards_the_teachers(tiny_lora):
    cfg = train_config(hidden_weight=1.0, lr=3e-2)
    loaded, mesh, graphdef, base, state, opt = setup(tiny_lora, cfg)
    batch = random_batch(16, loaded.cfg.vocab_size, 4)
    _, hist = run_steps(make_train_step(graphdef, opt, cfg, mesh), state, base, batch, 5)
    assert hist[-1]["hidden_loss"] < 0.8 * hist[0]["hidden_loss"]


def test_context_boost_distils_towards_the_mixed_logits_cached_or_not(tiny_lora):
    """The target is softmax((1 + a) z_teacher - a z_base(question alone)): computed here on full
    logits, in logit space, against the step's mix of hidden states (one LM head, linear), with
    the teacher computed in the step or the mixed states brought by the batch (the cache)."""
    boost = 0.5
    cfg = train_config(context_boost=boost)
    loaded, mesh, graphdef, base, state, opt = setup(tiny_lora, cfg)
    batch = random_batch(17, loaded.cfg.vocab_size, 4)
    batch["target_mask"][1] = False  # a filler row
    model = nnx.merge(graphdef, jax.tree.map(np.array, state.lora), base)
    h_t, h_b = teacher_hidden(model, batch), closed_book_hidden(model, batch)
    np.testing.assert_allclose(  # the base without the document = the student at step 0 (B = 0)
        np.asarray(h_b), take(student_hidden(model, batch), batch["student_pos"]), atol=1e-5)
    target = (1 + boost) * model.logits(h_t, False) - boost * model.logits(h_b, False)
    student = model.logits(h_b, True)
    kl_sum, rows = losses.sequence_sums(losses.forward_kl_per_token(target, student, cfg.tau),
                                        batch["target_mask"])
    plain_sum, _ = losses.sequence_sums(
        losses.forward_kl_per_token(model.logits(h_t, False), student, cfg.tau), batch["target_mask"])
    kl, plain = float(kl_sum / rows), float(plain_sum / rows)
    assert kl > 1.5 * plain > 0  # the boost moves the target further from the student

    cached = {k: v for k, v in batch.items() if k not in TEACHER_KEYS}
    cached[TEACHER_HIDDEN] = np.asarray(boosted_target(h_t, h_b, boost))
    for b in (batch, cached):
        _, mesh, graphdef, base, state, opt = setup(tiny_lora, cfg)
        _, (m,) = run_steps(make_train_step(graphdef, opt, cfg, mesh), state, base, b, 1)
        assert set(m) == BASE_KEYS
        assert m["loss"] == pytest.approx(kl, rel=1e-4)


def retention_rows(vocab: int, n: int = 6, seed: int = 3) -> list[Example]:
    """Examples whose teacher sequence is the student sequence (prompt + answer + end)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        prompt = list(rng.integers(3, vocab, rng.integers(3, 9)))
        seq = np.asarray(prompt + list(rng.integers(3, vocab, rng.integers(2, 6))) + [2], np.int32)
        out.append(Example(seq, seq, len(prompt), len(prompt)))
    return out


def test_retention_is_zero_at_step_0_then_grows_and_adds_weight_times_it(tiny_lora):
    cfg = train_config(retention_weight=WEIGHT, retention_prompts="unused here",
                       retention_batch_size=4)
    loaded, mesh, graphdef, base, state, opt = setup(tiny_lora, cfg)
    ret = RetentionBatches(retention_rows(loaded.cfg.vocab_size), 4, seed=0)
    batch = random_batch(13, loaded.cfg.vocab_size, 4)
    step = make_train_step(graphdef, opt, cfg, mesh)
    hist = []
    for i in range(6):
        state, m = step(state, base, {**batch, **ret.batch(i)})
        hist.append({k: float(v) for k, v in m.items()})
    assert set(hist[0]) == BASE_KEYS | {"distill_loss", "retention_loss"}
    assert hist[0]["retention_loss"] == pytest.approx(0.0, abs=1e-7)  # B = 0: student == base
    assert hist[0]["loss"] == pytest.approx(hist[0]["distill_loss"], abs=1e-7)
    assert hist[-1]["retention_loss"] > 1e-4
    for m in hist:
        assert m["loss"] == pytest.approx(m["distill_loss"] + WEIGHT * m["retention_loss"], abs=1e-6)


def perturbed(lora):
    """The adapter with small random weights everywhere (B too), the same on every call."""
    leaves, tree = jax.tree.flatten(lora)
    keys = jax.random.split(jax.random.key(0), len(leaves))
    return jax.tree.unflatten(tree, [x + 0.05 * jax.random.normal(k, x.shape, x.dtype)
                                     for x, k in zip(leaves, keys)])


@pytest.mark.slow  # a long tiny-model check (25–30 s), run by CI's slow step
def test_retention_is_a_mean_over_its_rows_however_accumulated(tiny_lora):
    """Main batch with a filler row (3 sequences), retention rows a fixed 4 a step: one batch of 4
    or two micro-batches of 2 give the same losses and weights (the scale main/retention rows)."""
    batch = random_batch(14, tiny_lora.cfg.vocab_size, 4)
    batch["target_mask"][1] = False
    hists, loras = [], []
    for bs, ga in ((4, 1), (2, 2)):
        cfg = train_config(retention_weight=WEIGHT, retention_prompts="x", batch_size=bs,
                           grad_accum=ga, retention_batch_size=4 // ga, lr=1e-4)
        loaded, mesh, graphdef, base, state, opt = setup(tiny_lora, cfg)
        state = state._replace(lora=perturbed(state.lora))  # student != base: retention pulls
        ret = RetentionBatches(retention_rows(loaded.cfg.vocab_size), 4, seed=0)
        step = make_train_step(graphdef, opt, cfg, mesh)
        hist = []
        for i in range(4):
            state, m = step(state, base, {**batch, **ret.batch(i)})
            hist.append({k: float(v) for k, v in m.items()})
        hists.append(hist)
        loras.append(jax.tree.leaves(jax.tree.map(np.array, state.lora)))
    assert hists[0][0]["retention_loss"] > 1e-3
    for a, b in zip(*hists):
        for k in ("loss", "retention_loss", "distill_loss", "grad_norm"):
            np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-7, err_msg=k)
    for a, b in zip(*loras):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_retention_rows_cycle_deterministically_from_seed_and_step():
    rows = retention_rows(50, n=5)
    ret, again = RetentionBatches(rows, 4, seed=7), RetentionBatches(rows, 4, seed=7)
    stream = np.concatenate([ret.indices(s) for s in range(5)])  # 20 rows = 4 passes
    for p in range(4):
        assert sorted(stream[5 * p:5 * p + 5]) == list(range(5))  # every row once a pass
    assert [list(again.indices(s)) for s in (3, 1)] == [list(ret.indices(s)) for s in (3, 1)]
    assert list(RetentionBatches(rows, 4, seed=8).indices(0)) != list(ret.indices(0)) or \
        list(RetentionBatches(rows, 4, seed=8).indices(1)) != list(ret.indices(1))
    b = ret.batch(2)
    assert b["retention_tokens"].shape == (4, ret.width) and ret.width % 8 == 0
    assert b["retention_mask"].sum() == sum(len(rows[i].targets) for i in ret.indices(2))


@pytest.mark.parametrize("kw, field", [
    (dict(ce_weight=-0.1), "ce_weight must be >= 0"),
    (dict(ce_weight=float("nan")), "ce_weight must be a finite number"),
    (dict(objective="ce", ce_weight=0.5), "ce_weight must be 0 with objective ce"),
    (dict(hidden_weight=-1.0), "hidden_weight must be >= 0"),
    (dict(objective="ce", hidden_weight=0.5), "hidden_weight must be 0 with objective ce"),
    (dict(context_boost=-0.5), "context_boost must be >= 0"),
    (dict(objective="ce", context_boost=0.5), "context_boost must be 0 with objective ce"),
    (dict(retention_weight=-1.0, retention_prompts="x"), "retention_weight must be >= 0"),
    (dict(retention_weight=0.5), "retention_prompts must be a JSONL"),
    (dict(retention_batch_size=0), "retention_batch_size must be >= 1"),
])
def test_bad_values_are_one_line_naming_the_field(kw, field):
    with pytest.raises(FieldError) as e:
        TrainConfig(**kw)
    assert str(e.value).startswith(field) and "\n" not in str(e.value)


def test_retention_rows_sharing_a_prefix_run_it_once_with_the_same_loss(tiny_lora):
    """Retention rows that all start with the same ids: run once (`prefix`) or in every row, the
    retention sum is the same, with the base computed in the step or given as the trainer caches
    it. (The prefix's gradient path is the main rows', tested in test_step.)"""
    head = [5, 9, 11, 7, 13]
    rows = [Example(np.concatenate([head, e.student]).astype(np.int32),
                    np.concatenate([head, e.student]).astype(np.int32),
                    e.teacher_prompt_len + len(head), e.student_prompt_len + len(head))
            for e in retention_rows(tiny_lora.cfg.vocab_size)]
    graphdef, lora, rest = nnx.split(tiny_lora.model, nnx.LoRAParam, ...)
    model = nnx.merge(graphdef, perturbed(lora), rest)  # student != base
    whole = RetentionBatches(rows, 4, seed=0).batch(0)
    base = teacher_hidden(model, {"teacher_tokens": whole["retention_tokens"],
                                  "teacher_valid": whole["retention_valid"],
                                  "teacher_pos": whole["retention_pos"]})

    def retention(prefix, cached):
        batch = RetentionBatches(rows, 4, seed=0, prefix=prefix).batch(0)
        if cached:
            batch[RETENTION_HIDDEN] = base
        return float(jax.jit(lambda b: retention_sums(model, b, 1.0, prefix=prefix)[0])(batch))

    want = retention((), False)
    assert want > 1e-3
    for prefix, cached in (((), True), (tuple(head), False), (tuple(head), True)):
        assert retention(prefix, cached) == pytest.approx(want, rel=1e-5), (prefix, cached)


def test_retention_prefix_is_taken_only_when_every_row_starts_with_it():
    from pdistill_jax.train.retention import shared_prefix

    rows = retention_rows(50, n=4)
    head = tuple(int(i) for i in rows[0].student[:2])
    assert shared_prefix(rows, ()) == ()
    assert shared_prefix(rows[:1], head) == head
    same = [Example(np.asarray(head + tuple(e.student), np.int32),
                    np.asarray(head + tuple(e.student), np.int32),
                    e.teacher_prompt_len + 2, e.student_prompt_len + 2) for e in rows]
    assert shared_prefix(same, head) == head
    off = np.asarray((head[0] + 1,) + tuple(rows[1].student), np.int32)  # starts elsewhere
    assert shared_prefix(same + [Example(off, off, rows[1].teacher_prompt_len + 1,
                                         rows[1].student_prompt_len + 1)], head) == ()
    short = Example(np.asarray(head + (3, 4), np.int32), np.asarray(head + (3, 4), np.int32), 2, 2)
    assert shared_prefix(same + [short], head) == ()  # no prompt token left after the prefix
    with pytest.raises(ValueError, match="must start with the prefix"):
        RetentionBatches(rows, 2, seed=0, prefix=(49, 49, 49))
