"""The distillation objectives against straightforward NumPy references, direction included."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pdistill_jax.model import losses


def _np_softmax(x, tau):
    z = x / tau
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def _np_kl(p, q):  # KL(p || q) over the last axis
    return np.sum(p * (np.log(p) - np.log(q)), -1)


def _np_reduce(per_token, mask):
    """Mean over masked tokens per sequence, then over sequences that have any."""
    means = [per_token[i][mask[i]].mean() for i in range(len(mask)) if mask[i].any()]
    return float(np.mean(means)) if means else 0.0


@pytest.fixture
def case():
    rng = np.random.default_rng(0)
    b, a, v = 4, 6, 11
    teacher = rng.normal(size=(b, a, v)).astype(np.float32) * 3
    student = rng.normal(size=(b, a, v)).astype(np.float32) * 3
    mask = rng.random((b, a)) < 0.7
    mask[0, :] = False  # a sequence without answer tokens is excluded, not averaged in as 0
    mask[1, :] = True
    targets = rng.integers(0, v, (b, a))
    return teacher, student, mask, targets


def test_forward_kl_is_kl_teacher_to_student(case):
    t, s, mask, _ = case
    for tau in (1.0, 2.0):
        want = _np_reduce(_np_kl(_np_softmax(t.astype(np.float64), tau), _np_softmax(s.astype(np.float64), tau)), mask)
        got = float(losses.sequence_mean(losses.forward_kl_per_token(t, s, tau), mask))
        np.testing.assert_allclose(got, want, rtol=1e-5)


def test_reverse_kl_is_kl_student_to_teacher(case):
    t, s, mask, _ = case
    want = _np_reduce(_np_kl(_np_softmax(s.astype(np.float64), 2.0), _np_softmax(t.astype(np.float64), 2.0)), mask)
    np.testing.assert_allclose(float(losses.sequence_mean(losses.reverse_kl_per_token(t, s, 2.0), mask)), want, rtol=1e-5)


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_jsd_matches_reference(case, beta):
    t, s, mask, _ = case
    p, q = _np_softmax(t.astype(np.float64), 2.0), _np_softmax(s.astype(np.float64), 2.0)
    m = beta * p + (1 - beta) * q
    want = _np_reduce(beta * _np_kl(p, m) + (1 - beta) * _np_kl(q, m), mask)
    np.testing.assert_allclose(float(losses.sequence_mean(losses.jsd_per_token(t, s, 2.0, beta), mask)), want, rtol=1e-5)


def test_cross_entropy_matches_reference(case):
    _, s, mask, targets = case
    p = _np_softmax(s.astype(np.float64), 1.0)
    nll = -np.log(np.take_along_axis(p, targets[..., None], -1)[..., 0])
    np.testing.assert_allclose(float(losses.sequence_mean(
        losses.cross_entropy_per_token(s, targets), mask)), _np_reduce(nll, mask),
                               rtol=1e-5)


def test_sequence_mean_weights_sequences_equally():
    per_token = jnp.array([[1.0, 1.0, 1.0, 1.0], [5.0, 0.0, 0.0, 0.0], [7.0, 7.0, 7.0, 7.0]])
    mask = jnp.array([[1, 1, 1, 1], [1, 0, 0, 0], [0, 0, 0, 0]], bool)
    assert float(losses.sequence_mean(per_token, mask)) == pytest.approx(3.0)  # (1 + 5) / 2
    assert float(losses.sequence_mean(per_token, jnp.zeros_like(mask))) == 0.0


def test_divergences_nonnegative_and_zero_when_equal(case):
    t, s, mask, _ = case
    for per_token_fn in (losses.forward_kl_per_token, losses.reverse_kl_per_token,
                         losses.jsd_per_token):
        assert float(losses.sequence_mean(per_token_fn(t, s, 2.0), mask)) > 0
        assert abs(float(losses.sequence_mean(per_token_fn(t, t, 2.0), mask))) < 1e-6
    per_token = losses.forward_kl_per_token(t, s, 1.0)
    assert float(jnp.min(per_token)) >= -1e-6


def test_forward_and_reverse_kl_differ_in_the_expected_direction():
    # Teacher spreads its mass over two tokens; the student puts almost all of it on one.
    # Forward KL(T||S) punishes the student for missing the teacher's second mode (large);
    # reverse KL(S||T) only asks the student's mode to be plausible under the teacher (small).
    teacher = jnp.log(jnp.array([[[0.5, 0.5, 1e-6]]]))
    student = jnp.log(jnp.array([[[0.999, 1e-3, 1e-6]]]))
    mask = jnp.ones((1, 1), bool)
    fwd = float(losses.sequence_mean(losses.forward_kl_per_token(teacher, student, 1.0), mask))
    rev = float(losses.sequence_mean(losses.reverse_kl_per_token(teacher, student, 1.0), mask))
    p, q = np.array([0.5, 0.5, 1e-6]), np.array([0.999, 1e-3, 1e-6])
    p, q = p / p.sum(), q / q.sum()
    np.testing.assert_allclose(fwd, _np_kl(p, q), rtol=1e-4)
    np.testing.assert_allclose(rev, _np_kl(q, p), rtol=1e-4)
    assert fwd > 2.0 and rev < 0.7 and fwd > 3 * rev


def test_loss_math_is_float32_for_bfloat16_logits(case):
    t, s, mask, _ = case
    got = losses.sequence_mean(
        losses.forward_kl_per_token(t.astype(jnp.bfloat16), s.astype(jnp.bfloat16), 2.0), mask)
    assert got.dtype == jnp.float32


@pytest.mark.parametrize("chunk", [1, 4, 5, 16])
def test_chunked_equals_unchunked_with_gradients(chunk):
    rng = np.random.default_rng(1)
    b, a, d, v = 3, 13, 8, 50
    h_t = jnp.asarray(rng.normal(size=(b, a, d)), jnp.float32)
    h_s = jnp.asarray(rng.normal(size=(b, a, d)), jnp.float32)
    head = jnp.asarray(rng.normal(size=(d, v)), jnp.float32)
    mask = jnp.asarray(rng.random((b, a)) < 0.8)

    def loss(head, chunk):
        per_token = losses.chunked_token_losses(
            lambda x, y: losses.forward_kl_per_token(x @ head, y @ head, 2.0), (h_t, h_s), chunk)
        return losses.sequence_mean(per_token, mask)

    full, g_full = jax.value_and_grad(loss)(head, 0)
    chunked, g_chunked = jax.jit(jax.value_and_grad(loss), static_argnums=1)(head, chunk)
    np.testing.assert_allclose(float(chunked), float(full), atol=1e-6)
    np.testing.assert_allclose(np.asarray(g_chunked), np.asarray(g_full), atol=1e-6)


def test_chunking_bounds_logits_memory():
    # Loss + gradient through a (D, V) head: unchunked, XLA keeps several (B, A, V) buffers alive;
    # chunked, only a chunk's worth (checked on the compiled program's scratch memory).
    b, a, d, v = 4, 64, 32, 8192
    h = jnp.ones((b, a, d))
    mask = jnp.ones((b, a), bool)

    def loss(head, chunk):
        per_token = losses.chunked_token_losses(
            lambda x, y: losses.forward_kl_per_token(x @ head, y @ head, 2.0), (h, 2 * h), chunk)
        return losses.sequence_mean(per_token, mask)

    def scratch_bytes(chunk):
        compiled = jax.jit(jax.grad(loss), static_argnums=1).lower(jnp.ones((d, v)), chunk).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    full_logits = b * a * v * 4
    assert scratch_bytes(0) > 2 * full_logits
    assert scratch_bytes(8) < full_logits


def test_relative_l1_is_the_l1_distance_over_the_teachers_l1_norm():
    t = jnp.asarray([[[1.0, -2.0, 1.0], [0.0, 0.0, 0.0]]])  # (1, 2, 3); a zero teacher row too
    s = jnp.asarray([[[2.0, -2.0, 0.0], [0.5, 0.0, 0.0]]])
    got = np.asarray(losses.relative_l1_per_token(t, s))
    np.testing.assert_allclose(got[0, 0], 2.0 / 4.0)  # |1| + 0 + |-1| over 1 + 2 + 1
    assert np.isfinite(got[0, 1])  # the floor on the norm: no division by zero
    assert float(losses.relative_l1_per_token(t, t).sum()) == 0.0
    # the same whatever the scale both share (the norm's gain, the hidden size's magnitude)
    np.testing.assert_allclose(np.asarray(losses.relative_l1_per_token(7 * t, 7 * s))[0, 0], 0.5)
