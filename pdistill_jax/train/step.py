"""The jit-compiled prompt-distillation training step: objectives, optimizer, gradient accumulation.

One `jax.jit` per step does all of it: the teacher forward (base model, adapter off, document in
the prompt, no gradient) unless the batch brings the teacher's cached hidden states (the teacher
is frozen, so they are the same every epoch: teacher_cache.py), the student forward (adapter on,
question only; with an adapter on the upper layers only, from the cached states entering them:
student_cache.py), the hidden states
gathered at the answer positions *before* the LM head, the loss chunked over answer positions,
the LoRA gradients, and one AdamW update. One copy of the base weights serves both roles and is
never an output of the step, so it is never copied; only the TrainState (LoRA + optimizer state
+ step) is donated and returned.

Three optional terms, each a trace-time branch (off: the computation is the plain objective's):
TrainConfig.ce_weight adds the student's CE on the answer tokens, hidden_weight the distance
between the student's and the teacher's final hidden states there, and retention_weight the
KL(base || student) on general prompts the batch brings as RETENTION_KEYS (retention.py).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from pdistill_jax.model import losses
from pdistill_jax.config import TrainConfig
from pdistill_jax.model.transformer import (KVCache, Transformer, causal_inputs, compute_dtype,
                                            init_cache)
from pdistill_jax.model.sharding import (activations_on, batch_sharding, check_batch_splits,
                                         is_variable, replicated, shard_state, state_shardings)

STUDENT_KEYS = ("student_tokens", "student_valid", "targets", "target_mask", "student_pos")
TEACHER_KEYS = ("teacher_tokens", "teacher_valid", "teacher_pos")
BATCH_KEYS = TEACHER_KEYS[:2] + STUDENT_KEYS[:4] + TEACHER_KEYS[2:] + STUDENT_KEYS[4:]
# Instead of TEACHER_KEYS a batch may carry the teacher's final hidden states at the answer
# positions, (B, A, D), computed once per run by `make_teacher_hidden` (see teacher_cache.py).
TEACHER_HIDDEN = "teacher_hidden"
# With lora.first_layer > 0 a batch may also carry the states entering that layer over its
# student tokens, (B, Ts, D), computed once per run by `make_student_lower` (student_cache.py):
# the frozen layers below the adapter then do not run in the step.
STUDENT_LOWER = "student_lower"
# With ce_weight > 0: the answer positions the cross-entropy term reads (`collate(ce_mask=True)`).
CE_MASK = "ce_mask"
# With retention_weight > 0: a batch of retention rows (train/retention.py), one sequence each
# (prompt without a document + the base model's own answer), read by both base and student.
RETENTION_KEYS = ("retention_tokens", "retention_valid", "retention_mask", "retention_pos")
# Beside them a batch may carry the retention rows' two fixed parts, computed once per run
# (`RetentionBatches.hidden` and `.lower`, filled by train/loop.py): the base model's final
# hidden states at their answer positions, (R, A, D), and with lora.first_layer > 0 the states
# entering that layer, (R, T, D). The step then runs only the student's adapter layers over the
# retention rows.
RETENTION_HIDDEN = "retention_hidden"
RETENTION_LOWER = "retention_lower"
# Elements of one (B, c, V) LM-head chunk of logits (128 MiB in float32): the loss runs over the
# answer positions in as few chunks as stay within it. Chunked logits are recomputed in the
# backward pass (each chunk runs under jax.checkpoint), so one chunk is faster when it fits.
LOGITS_PER_CHUNK = 1 << 25


class TrainState(NamedTuple):
    lora: nnx.State  # the trainable adapter (float32)
    opt_state: optax.OptState  # AdamW moments for the LoRA leaves only
    step: jax.Array  # optimizer steps taken (int32 scalar)


def lora_labels(params_state: Any) -> Any:
    """"lora" for every nnx.LoRAParam, "frozen" for every other Variable (a prefix tree of params)."""
    return jax.tree.map(lambda v: "lora" if isinstance(v, nnx.LoRAParam) else "frozen",
                        params_state, is_leaf=is_variable)


def lr_schedule(cfg: TrainConfig, total_steps: int) -> optax.Schedule:
    """Linear warm-up from 0 over warmup_ratio * total_steps, then linear decay to 0 at total_steps."""
    total = max(int(total_steps), 1)
    warmup = int(round(cfg.warmup_ratio * total))
    if warmup == 0:
        return optax.linear_schedule(cfg.lr, 0.0, total)
    return optax.join_schedules(
        [optax.linear_schedule(0.0, cfg.lr, warmup),
         optax.linear_schedule(cfg.lr, 0.0, max(total - warmup, 1))], [warmup])


def scale_lora_b(ratio: float) -> optax.GradientTransformation:
    """Multiplies the updates of every LoRA B leaf (`lora_b`, `lm_head_lora_b`) by `ratio`: after
    AdamW this is a learning rate `ratio` times larger for B than for A (LoRA+)."""
    def update(updates, state, params=None):
        del params
        return jax.tree_util.tree_map_with_path(
            lambda path, u: u * ratio if "lora_b" in jax.tree_util.keystr(path) else u,
            updates), state
    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(cfg: TrainConfig, total_steps: int) -> optax.GradientTransformation:
    """AdamW with clipping on the LoRA leaves, B's updates scaled by lora_b_lr_ratio (LoRA+);
    every other leaf gets a zero update (frozen)."""
    adamw = optax.inject_hyperparams(optax.adamw)(  # injected: the lr in use is read back as a metric
        learning_rate=lr_schedule(cfg, total_steps), weight_decay=cfg.weight_decay)
    lora = [optax.clip_by_global_norm(cfg.max_grad_norm), adamw]
    if cfg.lora_b_lr_ratio != 1.0:
        lora.append(scale_lora_b(cfg.lora_b_lr_ratio))
    return optax.multi_transform({"lora": optax.chain(*lora), "frozen": optax.set_to_zero()},
                                 lora_labels)


def current_lr(opt_state: optax.OptState) -> jax.Array:
    """The learning rate of the last update (inject_hyperparams stores it in the state)."""
    for path, leaf in jax.tree_util.tree_leaves_with_path(opt_state):
        if jax.tree_util.keystr(path).endswith("hyperparams['learning_rate']"):
            return leaf
    raise ValueError("optimizer state has no injected learning_rate; build it with make_optimizer")


def configure_model(model: Transformer, cfg: TrainConfig) -> None:
    """Sets the model's compute dtype and rematerialisation from cfg (both are static attributes
    read at trace time; the weights keep their storage dtype, LoRA stays float32)."""
    dtype = compute_dtype(cfg.compute_dtype)
    for _, module in nnx.iter_modules(model):
        if hasattr(module, "dtype"):
            module.dtype = dtype
    model.remat = cfg.remat


def train_state_shardings(state: TrainState, mesh: Mesh) -> TrainState:
    """Shardings of a TrainState: LoRA leaves and their Adam moments (which keep the LoRAParam
    wrappers and hence the `axes` metadata) from the logical rules; counters replicated."""
    return TrainState(state_shardings(state.lora, mesh), state_shardings(state.opt_state, mesh),
                      replicated(mesh))


def init_train_state(model: Transformer, cfg: TrainConfig, total_steps: int, mesh: Mesh
                     ) -> tuple[nnx.GraphDef, nnx.State, TrainState, optax.GradientTransformation]:
    """Splits `model` into (graphdef, frozen base, trainable TrainState), all placed on `mesh`.

    Also sets the model's compute dtype and remat from cfg (see `configure_model`); build the model
    with its LoRA adapter (LoraConfig) before calling this.
    """
    configure_model(model, cfg)
    graphdef, lora, base = nnx.split(model, nnx.LoRAParam, nnx.Param)
    if not jax.tree.leaves(lora):
        raise ValueError("the model has no LoRA parameters; build it with a LoraConfig")
    # The TrainState is donated to the step, so it gets its own LoRA buffers: the caller's model
    # keeps working (for sampling, export) after training starts. The base is shared, never donated.
    lora = shard_state(jax.tree.map(jnp.copy, lora), mesh)
    base = shard_state(base, mesh)
    optimizer = make_optimizer(cfg, total_steps)
    abstract = jax.eval_shape(optimizer.init, (lora, base))
    opt_state = jax.jit(optimizer.init, out_shardings=state_shardings(abstract, mesh))((lora, base))
    step = jax.device_put(jnp.zeros((), jnp.int32), replicated(mesh))
    return graphdef, base, TrainState(lora, opt_state, step), optimizer


def _gather(hidden: jax.Array, positions: jax.Array) -> jax.Array:
    """hidden (B, T, D) at positions (B, A) -> (B, A, D)."""
    return jnp.take_along_axis(hidden, positions[..., None].astype(jnp.int32), axis=1)


def teacher_hidden(model: Transformer, batch: dict) -> jax.Array:
    """The teacher's (base model, adapter off) final hidden states at the answer positions, (B, A, D)."""
    t_pos, t_valid = causal_inputs(batch["teacher_tokens"], batch["teacher_valid"])
    hidden_t, _ = model(batch["teacher_tokens"], t_pos, t_valid, use_lora=False)
    return _gather(hidden_t, batch["teacher_pos"])


def student_hidden(model: Transformer, batch: dict, prefix: tuple[int, ...] = ()) -> jax.Array:
    """The student's (adapter on) final hidden states over batch["student_tokens"], (B, T, D).

    With `prefix` (the ids every student sequence starts with, left out of student_tokens by
    `collate`), the prefix runs once, as one row, and every row attends to its keys and values:
    the same states as running it in every row, for 1/B of its cost. Its gradient is the sum
    over the rows that read it.
    """
    lower = batch.get(STUDENT_LOWER)

    def run(tokens, positions, key_valid, kv):
        return model(tokens, positions, key_valid, prefix=kv, use_lora=True, lower=lower)[0]

    return _with_prefix(run, model, batch, prefix)


def closed_book_hidden(model: Transformer, batch: dict, prefix: tuple[int, ...] = ()) -> jax.Array:
    """The base model's (adapter off) final hidden states over the student's prompt at the
    answer positions, (B, A, D): what the model says without the document, which context_boost
    contrasts with the teacher."""
    lower = batch.get(STUDENT_LOWER)  # the frozen lower layers are adapter-free either way

    def run(tokens, positions, key_valid, kv):
        return model(tokens, positions, key_valid, prefix=kv, use_lora=False, lower=lower)[0]

    return _gather(_with_prefix(run, model, batch, prefix, use_lora=False), batch["student_pos"])


def boosted_target(teacher: jax.Array, closed_book: jax.Array, boost: float) -> jax.Array:
    """(1 + boost) x teacher - boost x closed_book: final hidden states whose logits are the same
    mix of the two models' logits, since the LM head is linear (with a bias, the weights still
    sum to one). The extrapolation runs in float32 whatever the compute dtype."""
    mixed = (1.0 + boost) * teacher.astype(jnp.float32) - boost * closed_book.astype(jnp.float32)
    return mixed.astype(teacher.dtype)


def student_lower(model: Transformer, batch: dict, prefix: tuple[int, ...] = ()) -> jax.Array:
    """The states entering layer lora.first_layer over batch["student_tokens"], (B, T, D): what
    the frozen layers below the adapter compute, the same in every step."""
    def run(tokens, positions, key_valid, kv):
        return model.lower_states(tokens, positions, key_valid, prefix=kv)

    return _with_prefix(run, model, batch, prefix)


def _with_prefix(run, model: Transformer, batch: dict, prefix: tuple[int, ...],
                 use_lora: bool = True):
    """`run(tokens, positions, key_valid, kv)` over the batch's student rows, after the shared
    `prefix` (if any) has run once (adapter on or off: `use_lora`) and its keys and values are
    broadcast to every row."""
    tokens, valid = batch["student_tokens"], batch["student_valid"]
    if not prefix:
        return run(tokens, *causal_inputs(tokens, valid), None)
    p, b = len(prefix), tokens.shape[0]
    ids = jnp.asarray(prefix, jnp.int32)[None]
    # One row of P tokens: cheap next to the batch, so it runs whole even when the lower layers'
    # states of the rows come from the cache.
    _, kv = model(ids, jnp.arange(p)[None], jnp.ones((1, p), bool),
                  cache=init_cache(model.cfg, 1, p, model.dtype), cache_index=0, use_lora=use_lora)
    kv = KVCache(*(jnp.broadcast_to(c, (c.shape[0], b) + c.shape[2:]) for c in kv))
    positions = p + causal_inputs(tokens, valid)[0]
    key_valid = jnp.concatenate([jnp.ones((b, p), bool), valid.astype(bool)], axis=1)
    return run(tokens, positions, key_valid, kv)


def loss_chunk_for(rows: int, positions: int, vocab: int, budget: int = LOGITS_PER_CHUNK) -> int:
    """Answer positions per LM-head chunk: all of them if their logits fit the budget, else the
    fewest equal chunks that do (at least one position each)."""
    fits = max(1, budget // max(rows * vocab, 1))
    if positions <= fits:
        return positions
    n = -(-positions // fits)
    return -(-positions // n)


def retention_sums(model: Transformer, batch: dict, tau: float, loss_chunk: int | None = None,
                   prefix: tuple[int, ...] = ()) -> tuple[jax.Array, jax.Array]:
    """(sum over retention rows of their mean forward KL(base || student), rows with answers).

    Each retention row is one sequence (general prompt + the base model's own answer + end),
    run with the adapter off (the base: the teacher, no gradient) and on (the student); the KL
    is over its answer positions at temperature `tau`. Zero while the adapter's B is zero. The
    base's states and the frozen layers below the adapter come from the batch when it carries
    them (RETENTION_HIDDEN, RETENTION_LOWER). `prefix`: the ids every retention row starts with,
    left out of its tokens and run once (`RetentionBatches.prefix`), as for the main rows.
    """
    rows = {"student_tokens": batch["retention_tokens"], "student_valid": batch["retention_valid"]}
    if RETENTION_LOWER in batch:
        rows[STUDENT_LOWER] = batch[RETENTION_LOWER]
    h_s = _gather(student_hidden(model, rows, prefix), batch["retention_pos"])
    h_b = batch.get(RETENTION_HIDDEN)
    if h_b is None:
        def run_base(tokens, positions, key_valid, kv):
            return model(tokens, positions, key_valid, prefix=kv, use_lora=False)[0]

        h_b = _gather(_with_prefix(run_base, model, rows, prefix, use_lora=False),
                      batch["retention_pos"])
    h_b = h_b.astype(model.dtype)
    mask = batch["retention_mask"]
    chunk = loss_chunk or loss_chunk_for(*mask.shape, model.cfg.vocab_size)
    per_token = losses.chunked_token_losses(
        lambda hb, hs: losses.forward_kl_per_token(jax.lax.stop_gradient(model.logits(hb, False)),
                                                   model.logits(hs, True), tau),
        (jax.lax.stop_gradient(h_b), h_s), chunk)
    return losses.sequence_sums(per_token, mask)


def make_loss_sums(graphdef: nnx.GraphDef, cfg: TrainConfig, loss_chunk: int | None = None,
                   student_prefix: Sequence[int] = (), retention_prefix: Sequence[int] = ()
                   ) -> Callable[..., tuple[jax.Array, tuple]]:
    """(lora, base, batch) -> (sum of per-sequence mean losses, (sequences with answers, answer tokens)).

    Sums rather than means so that micro-batches add up to exactly the full-batch loss.
    `loss_chunk` answer positions go through the LM head at a time (None: `loss_chunk_for`).
    `student_prefix`: the ids the batches' student sequences share and leave out
    (`TrainData.student_prefix`; empty when they carry whole sequences). `retention_prefix`:
    the same for the retention rows (`RetentionBatches.prefix`).

    With cfg.ce_weight, hidden_weight or retention_weight (`has_parts`) the aux gains a third
    entry, the sums of the loss's parts ("distill_loss" and any of "ce_loss", "hidden_loss",
    {"retention_loss", "retention_rows"}), and the function takes a 4th argument,
    `retention_scale` (see `make_train_step`): the retention sum enters the total as
    retention_weight * retention_scale * sum. Each term is a trace-time branch: with them off
    the computation is exactly the plain objective's.
    """
    objective, tau, alpha, weight = cfg.objective, cfg.tau, cfg.ce_weight, cfg.retention_weight
    hidden_weight, boost = cfg.hidden_weight, cfg.context_boost
    prefix = tuple(int(i) for i in student_prefix)
    retention_ids = tuple(int(i) for i in retention_prefix)

    def loss_sums(lora, base, batch, retention_scale=None):
        model: Transformer = nnx.merge(graphdef, lora, base)
        chunk = loss_chunk or loss_chunk_for(*batch["targets"].shape, model.cfg.vocab_size)
        h_s = _gather(student_hidden(model, batch, prefix), batch["student_pos"])
        mask = batch["target_mask"]
        parts = {}
        if objective == "ce":  # config.py refuses ce_weight > 0 here
            per_token = losses.chunked_token_losses(
                lambda h, t: losses.cross_entropy_per_token(model.logits(h, True), t),
                (h_s, batch["targets"]), chunk)
        else:
            if TEACHER_HIDDEN in batch:  # the cache holds the boosted target already
                h_t = batch[TEACHER_HIDDEN]
            else:
                h_t = teacher_hidden(model, batch)
                if boost:
                    h_t = boosted_target(h_t, closed_book_hidden(model, batch, prefix), boost)
            h_t = jax.lax.stop_gradient(h_t.astype(model.dtype))
            token_loss = _distill_token_loss(cfg)
            if alpha:
                def both(ht, hs, t):  # one chunk of student logits serves both terms
                    student = model.logits(hs, True)
                    return jnp.stack([
                        token_loss(jax.lax.stop_gradient(model.logits(ht, False)), student, tau),
                        losses.cross_entropy_per_token(student, t)], axis=-1)

                per_token = losses.chunked_token_losses(both, (h_t, h_s, batch["targets"]), chunk)
                # Each row's CE is its mean over its own CE positions (CE_MASK: the answer ids,
                # and the end token only when the answer finished), as for the ce objective,
                # and shares the distillation term's sequence count.
                ce, _ = losses.sequence_sums(per_token[..., 1], batch[CE_MASK])
                per_token = per_token[..., 0]
            else:
                per_token = losses.chunked_token_losses(
                    lambda ht, hs: token_loss(jax.lax.stop_gradient(model.logits(ht, False)),
                                              model.logits(hs, True), tau),
                    (h_t, h_s), chunk)
        total, count = losses.sequence_sums(per_token, mask)
        aux = (count, jnp.sum(mask.astype(jnp.float32)))
        if objective != "ce" and has_parts(cfg):
            parts.update(distill_loss=total)
        if alpha:
            parts.update(ce_loss=ce)
            total = total + alpha * ce
        if hidden_weight:  # the states the KL reads, already gathered: no extra forward
            hidden, _ = losses.sequence_sums(losses.relative_l1_per_token(h_t, h_s), mask)
            parts.update(hidden_loss=hidden)
            total = total + hidden_weight * hidden
        if weight:
            retention, rows = retention_sums(model, batch, tau, loss_chunk, retention_ids)
            parts.update(retention_loss=retention, retention_rows=rows)
            total = total + weight * retention_scale * retention
        return total, (aux + (parts,) if has_parts(cfg) else aux)

    return loss_sums


def has_parts(cfg: TrainConfig) -> bool:
    """Whether the loss has terms beyond the objective (then the step logs each part)."""
    return bool(cfg.ce_weight or cfg.hidden_weight or cfg.retention_weight)


def _distill_token_loss(cfg: TrainConfig) -> Callable[[jax.Array, jax.Array, float], jax.Array]:
    beta = cfg.jsd_beta
    return {
        "kl": losses.forward_kl_per_token,
        "reverse_kl": losses.reverse_kl_per_token,
        "jsd": lambda t, s, tau_: losses.jsd_per_token(t, s, tau_, beta),
    }[cfg.objective]


def _micro_batches(batch: dict, grad_accum: int) -> dict:
    """(G*B, ...) -> (G, B, ...) with micro-batch g = rows g, G+g, 2G+g, ...: each device's
    contiguous shard of the batch axis then holds whole groups, so the split moves no data."""
    def split(x):
        x = x.reshape(x.shape[0] // grad_accum, grad_accum, *x.shape[1:])
        return jnp.swapaxes(x, 0, 1)
    return {k: split(v) for k, v in batch.items()}


def _step_inputs(batch: dict, cfg: TrainConfig) -> dict:
    """The arrays the step reads: the student keys and either the teacher's tokens or its cached
    hidden states (then the teacher tokens are not sent to the devices at all), plus the CE
    mask and the retention rows when cfg turns those terms on."""
    teacher = (TEACHER_HIDDEN,) if TEACHER_HIDDEN in batch else TEACHER_KEYS
    extra = ((CE_MASK,) if cfg.ce_weight else ()) + (RETENTION_KEYS if cfg.retention_weight else ())
    if cfg.retention_weight:
        extra += tuple(k for k in (RETENTION_HIDDEN, RETENTION_LOWER) if k in batch)
    extra += (STUDENT_LOWER,) if STUDENT_LOWER in batch else ()
    missing = [k for k in STUDENT_KEYS + teacher + extra if k not in batch]
    if missing:
        raise ValueError(f"batch lacks {missing}; expected the keys {list(BATCH_KEYS + extra)} (or "
                         f"{TEACHER_HIDDEN!r} in place of {list(TEACHER_KEYS)})")
    return {k: batch[k] for k in STUDENT_KEYS + teacher + extra}


def _check_batch(batch: dict, cfg: TrainConfig, mesh: Mesh) -> None:
    rows = batch["student_tokens"].shape[0]
    if rows != cfg.batch_size * cfg.grad_accum:
        raise ValueError(f"training batch has {rows} rows; expected batch_size * grad_accum = "
                         f"{cfg.batch_size} * {cfg.grad_accum}")
    check_batch_splits(cfg.batch_size, mesh)
    if cfg.retention_weight:
        rows = batch["retention_tokens"].shape[0]
        if rows != cfg.retention_batch_size * cfg.grad_accum:
            raise ValueError(f"retention batch has {rows} rows; expected retention_batch_size * "
                             f"grad_accum = {cfg.retention_batch_size} * {cfg.grad_accum}")
        check_batch_splits(cfg.retention_batch_size, mesh)


def make_train_step(graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation,
                    cfg: TrainConfig, mesh: Mesh, *, loss_chunk: int | None = None,
                    student_prefix: Sequence[int] = (), retention_prefix: Sequence[int] = ()
                    ) -> Callable[[TrainState, nnx.State, dict], tuple[TrainState, dict]]:
    """(state, base, batch) -> (new state, metrics {loss, grad_norm, lr, answer_tokens}).

    `state` is donated (do not reuse the one passed in); `base` is read only. The batch's leading
    size is cfg.batch_size * cfg.grad_accum; gradients of grad_accum micro-batches are summed in a
    `lax.scan` and applied in one update. `student_prefix`, `retention_prefix`: as for
    `make_loss_sums`.
    `train_step.lower(state, base, batch)` lowers the same jitted program without running it
    (arguments may be jax.ShapeDtypeStruct trees): train/plan.py reads its memory and FLOPs.
    """
    loss_sums = make_loss_sums(graphdef, cfg, loss_chunk, student_prefix, retention_prefix)
    parts_on = has_parts(cfg)
    # Retention rows are a fixed number per step (retention_batch_size * grad_accum, each with
    # an answer); the main rows' count varies (an epoch's last batch is partial) and divides the
    # summed gradient. Scaling the retention sums by main count / retention rows, read from the
    # mask before the forward pass, makes the loss exactly main mean + retention_weight *
    # retention mean, however it is accumulated.
    retention_rows = float(cfg.retention_batch_size * cfg.grad_accum)
    # The gradient is taken with respect to the merged (LoRA, base) tree and the optimizer's
    # set_to_zero branch freezes the base. Only the LoRA update is returned, so the base weight
    # gradients are dead code and XLA removes them, across the accumulation scan too (see
    # docs/distributed.md, "What the step computes").
    if parts_on:
        grad_fn = jax.value_and_grad(
            lambda params, micro, scale: loss_sums(params[0], params[1], micro, scale), has_aux=True)
    else:
        grad_fn = jax.value_and_grad(lambda params, micro: loss_sums(params[0], params[1], micro),
                                     has_aux=True)

    def micro_step(params, micro, *scale):
        (total, aux), grads = grad_fn(params, micro, *scale)
        return (grads, total) + tuple(aux)

    def step(state: TrainState, base: nnx.State, batch: dict):
        params = (state.lora, base)
        scale = ()
        if cfg.retention_weight:
            sequences = jnp.sum(jnp.any(batch["target_mask"], axis=-1).astype(jnp.float32))
            scale = (jnp.maximum(sequences, 1.0) / retention_rows,)
        elif parts_on:
            scale = (None,)
        if cfg.grad_accum == 1:
            grads, total, count, tokens, *parts = micro_step(params, batch, *scale)
        else:
            def body(acc, micro):
                return jax.tree.map(jnp.add, acc, micro_step(params, micro, *scale)), None

            if parts_on:  # the carry's shapes, parts included, from one micro-batch's
                first = {k: jax.ShapeDtypeStruct((v.shape[0] // cfg.grad_accum,) + v.shape[1:],
                                                 v.dtype) for k, v in batch.items()}
                zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                                     jax.eval_shape(micro_step, params, first, *scale))
            else:
                zeros = (jax.tree.map(jnp.zeros_like, params),) + (jnp.zeros((), jnp.float32),) * 3
            (grads, total, count, tokens, *parts), _ = jax.lax.scan(
                body, zeros, _micro_batches(batch, cfg.grad_accum))
        denom = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: g / denom, grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, params)
        lora = optax.apply_updates(state.lora, updates[0])  # updates[1] (base) is zero and unused
        metrics = {"loss": total / denom, "grad_norm": optax.tree.norm(grads[0]),
                   "lr": current_lr(opt_state), "answer_tokens": tokens}
        if parts_on:
            metrics.update(_part_metrics(parts[0], denom))
        return TrainState(lora, opt_state, state.step + 1), metrics

    jitted = None

    def jit_for(state: TrainState, base: nnx.State):
        nonlocal jitted
        if jitted is None:  # shardings come from the state's metadata, known at the first call
            state_sh = train_state_shardings(state, mesh)
            jitted = jax.jit(traced_on_mesh(step, mesh), donate_argnums=0,
                             in_shardings=(state_sh, state_shardings(base, mesh), batch_sharding(mesh)),
                             out_shardings=(state_sh, replicated(mesh)))
        return jitted

    def train_step(state: TrainState, base: nnx.State, batch: dict):
        batch = _step_inputs(batch, cfg)
        _check_batch(batch, cfg, mesh)
        return jit_for(state, base)(state, base, batch)

    def lower(state: TrainState, base: nnx.State, batch: dict):
        # The same jitted program, lowered for (possibly abstract) arguments: `pdistill plan`
        # compiles it without weights to read its memory and FLOPs.
        batch = _step_inputs(batch, cfg)
        _check_batch(batch, cfg, mesh)
        return jit_for(state, base).lower(state, base, batch)

    train_step.lower = lower
    return train_step


def _part_metrics(parts: dict, sequences: jax.Array) -> dict:
    """The loss's parts as means: distillation, CE and the hidden-state term over the step's
    sequences (loss = distill_loss + ce_weight * ce_loss + hidden_weight * hidden_loss +
    retention_weight * retention_loss), retention over its own rows."""
    out = {name: parts[name] / sequences for name in ("distill_loss", "ce_loss", "hidden_loss")
           if name in parts}
    if "retention_loss" in parts:
        out["retention_loss"] = parts["retention_loss"] / jnp.maximum(parts["retention_rows"], 1.0)
    return out


def traced_on_mesh(fn: Callable, mesh: Mesh) -> Callable:
    """fn, traced with its activations kept split over the mesh's batch axes (`split_batch`)."""
    def traced(*args):
        with activations_on(mesh):
            return fn(*args)

    return traced


def _jit_on_mesh(fn: Callable, mesh: Mesh, out_sharding) -> Callable:
    """fn(lora, base, batch) jitted at its first call, with the state shardings read from the
    states' metadata then and the batch split over data x fsdp."""
    jitted = None

    def call(lora, base, batch):
        nonlocal jitted
        if jitted is None:
            jitted = jax.jit(traced_on_mesh(fn, mesh), in_shardings=(state_shardings(lora, mesh),
                                               state_shardings(base, mesh), batch_sharding(mesh)),
                             out_shardings=out_sharding)
        return jitted(lora, base, batch)

    return call


def make_student_lower(graphdef: nnx.GraphDef, mesh: Mesh, student_prefix: Sequence[int] = ()
                       ) -> Callable[[nnx.State, nnx.State, dict], jax.Array]:
    """(lora, base, batch) -> `student_lower` states (B, Ts, D), sharded over the batch like it;
    `student_prefix` as for `make_loss_sums`."""
    prefix = tuple(int(i) for i in student_prefix)

    def lower(lora, base, batch):
        return student_lower(nnx.merge(graphdef, lora, base), batch, prefix)

    jitted = _jit_on_mesh(lower, mesh, batch_sharding(mesh))
    keys = ("student_tokens", "student_valid")
    return lambda lora, base, batch: jitted(lora, base, {k: batch[k] for k in keys})


def make_closed_book_hidden(graphdef: nnx.GraphDef, mesh: Mesh, student_prefix: Sequence[int] = ()
                            ) -> Callable[[nnx.State, nnx.State, dict], jax.Array]:
    """(lora, base, batch) -> `closed_book_hidden` states (B, A, D), sharded over the batch like
    it; `student_prefix` as for `make_loss_sums`."""
    prefix = tuple(int(i) for i in student_prefix)

    def hidden(lora, base, batch):
        return closed_book_hidden(nnx.merge(graphdef, lora, base), batch, prefix)

    jitted = _jit_on_mesh(hidden, mesh, batch_sharding(mesh))
    keys = ("student_tokens", "student_valid", "student_pos")
    return lambda lora, base, batch: jitted(lora, base, {k: batch[k] for k in keys})


def make_teacher_hidden(graphdef: nnx.GraphDef, mesh: Mesh
                        ) -> Callable[[nnx.State, nnx.State, dict], jax.Array]:
    """(lora, base, batch) -> the teacher's hidden states at the answer positions, (B, A, D),
    sharded over the batch like the batch. The adapter is off, so `lora` is read for its
    structure only; any number of rows that splits over data x fsdp."""
    def hidden(lora, base, batch):
        return teacher_hidden(nnx.merge(graphdef, lora, base), batch)

    jitted = _jit_on_mesh(hidden, mesh, batch_sharding(mesh))
    return lambda lora, base, batch: jitted(lora, base, {k: batch[k] for k in TEACHER_KEYS})


def make_dev_loss(graphdef: nnx.GraphDef, cfg: TrainConfig, mesh: Mesh,
                  student_prefix: Sequence[int] = ()
                  ) -> Callable[[nnx.State, nnx.State, dict], tuple[jax.Array, jax.Array]]:
    """(lora, base, batch) -> (sum of per-row mean losses, rows with answers): the objective
    alone (no CE or retention term) on a batch of dev rows, forward only. `student_prefix` as
    for `make_loss_sums`; any number of rows that splits over data x fsdp."""
    plain = dataclasses.replace(cfg, ce_weight=0.0, hidden_weight=0.0, retention_weight=0.0)
    loss_sums = make_loss_sums(graphdef, plain, student_prefix=student_prefix)

    def dev_sums(lora, base, batch):
        total, (count, _tokens) = loss_sums(lora, base, batch)
        return total, count

    jitted = _jit_on_mesh(dev_sums, mesh, replicated(mesh))
    return lambda lora, base, batch: jitted(lora, base, _step_inputs(batch, plain))
