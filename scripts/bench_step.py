"""Throughput of the real prompt-distillation train step, comparable with
/work/shared/bench/torch_reference.py (same flags, same computation, same JSON fields).

Computation per step (as in the reference): random ids (B, doc + qa); teacher forward on all of
them with the adapter off; student forward + backward on the last `qa` ids with LoRA on
q,k,v,o,gate,up,down (rank r, alpha 2r); KL at tau on the positions predicting the last
`answer` ids; one AdamW update. The warm-up (compiling) step is excluded; median over --steps.

Model FLOPs counted per step (stated, not measured; the usual "6N" convention):
  forward(tokens, heads) = 2 * N_layers * tokens + 4 * L * H * hd * sum_rows(T^2) + 2 * D * V * heads
  with N_layers the matmul weights of the blocks (q,k,v,o,gate,up,down), T the row length (full
  T x T attention scores, as computed), heads the LM-head positions (answer positions only).
  step = forward(teacher) + 3 * forward(student)   (backward ~ 2x forward)
LoRA matmuls are left out (< 2% at rank 16). Because base weights are frozen, the backward pass
really does only ~1x forward (no weight gradients), so the hardware does ~2/3 of the counted
student work; the reported model FLOP/s is therefore a convention, not hardware utilisation.
What the hardware computes is counted apart: computed = forward(teacher) + 2 * forward(student)
(the backward through frozen weights needs the input gradients only; with --first-layer F it stops
at layer F, so the second student forward counts layers F.. only). The same run measures this
machine's f32 matmul peak (as --matmul-peak) and reports computed FLOP/s as a fraction of it.

Usage:
  python scripts/bench_step.py [--batch 8 --doc-tokens 256 --qa-tokens 64 --answer-tokens 32
                               --rank 16 --first-layer 0 --steps 5 --dtype float32 --remat
                               --attention auto|einsum|dot_product]
  python scripts/bench_step.py --matmul-peak [--matmul-size 2048]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np


def matmul_peak(n: int, repeats: int = 5) -> dict:
    """This machine's f32 matmul throughput: a jitted (n, n) @ (n, n), median of `repeats`."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    dot = jax.jit(jnp.dot)
    dot(a, b).block_until_ready()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        dot(a, b).block_until_ready()
        times.append(time.perf_counter() - t)
    med = statistics.median(times)
    return {"mode": "matmul_peak", "n": n, "dtype": "float32", "devices": jax.device_count(),
            "platform": jax.devices()[0].platform, "matmul_s_median": round(med, 4),
            "flops_per_s": 2 * n ** 3 / med}


def _forward_flops(cfg, batch: int, t: int, answer: int, layers: int | None = None) -> float:
    """One forward pass of `batch` rows of t tokens through `layers` blocks (all by default) and
    the LM head at `answer` positions."""
    d, f, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    qd, kd = cfg.num_heads * hd, cfg.num_kv_heads * hd
    layers = cfg.num_layers if layers is None else layers
    block = d * qd + 2 * d * kd + qd * d + 3 * d * f
    return batch * layers * (2 * block * t + 4 * cfg.num_heads * hd * t * t) \
        + batch * 2 * d * cfg.vocab_size * answer


def model_flops(cfg, batch: int, teacher_len: int, student_len: int, answer: int) -> float:
    """The "6N" convention: teacher forward + 3 x student forward."""
    return (_forward_flops(cfg, batch, teacher_len, answer)
            + 3 * _forward_flops(cfg, batch, student_len, answer))


def computed_flops(cfg, batch: int, teacher_len: int, student_len: int, answer: int,
                   first_layer: int = 0) -> float:
    """What the step computes with frozen base weights: the teacher's forward, the student's, and
    the student's input-gradient backward (about one more forward, from the adapter's first
    layer up)."""
    return (_forward_flops(cfg, batch, teacher_len, answer)
            + _forward_flops(cfg, batch, student_len, answer)
            + _forward_flops(cfg, batch, student_len, answer, cfg.num_layers - first_layer))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--doc-tokens", type=int, default=256)
    ap.add_argument("--qa-tokens", type=int, default=64)
    ap.add_argument("--answer-tokens", type=int, default=32)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    ap.add_argument("--remat", action="store_true")
    ap.add_argument("--attention", choices=("auto", "einsum", "dot_product"), default="auto",
                    help="attention kernel (auto: einsum on CPU, dot_product_attention elsewhere)")
    ap.add_argument("--first-layer", type=int, default=0,
                    help="the adapter on layers first-layer.. only (the backward stops there)")
    ap.add_argument("--tau", type=float, default=2.0)
    ap.add_argument("--loss-chunk", type=int, default=0, help="answer positions per LM-head chunk (0: as the trainer picks)")
    ap.add_argument("--matmul-peak", action="store_true", help="only measure the f32 matmul peak")
    ap.add_argument("--matmul-size", type=int, default=2048)
    a = ap.parse_args()
    if a.matmul_peak:
        print(json.dumps(matmul_peak(a.matmul_size)))
        return

    from pdistill_jax.config import LoraConfig, TrainConfig
    from pdistill_jax.weights.load import load_model
    from pdistill_jax.model.sharding import global_batch, make_mesh
    from pdistill_jax.model.transformer import attention_kernel
    from pdistill_jax.train.step import init_train_state, make_train_step

    if a.answer_tokens >= a.qa_tokens:
        raise SystemExit("--answer-tokens must be smaller than --qa-tokens")
    dtype = jnp.bfloat16 if a.dtype == "bfloat16" else jnp.float32
    cfg = TrainConfig(lora=LoraConfig(rank=a.rank, alpha=2 * a.rank, first_layer=a.first_layer), lr=1e-4, warmup_ratio=0.0,
                      weight_decay=0.01, batch_size=a.batch, tau=a.tau, compute_dtype=a.dtype,
                      remat=a.remat)
    loaded = load_model(a.model, cfg.lora, dtype=dtype, param_dtype=dtype, remat=a.remat,
                        attention=a.attention, with_tokenizer=False)
    mcfg = loaded.cfg
    mesh = make_mesh((-1, 1, 1))
    graphdef, base, state, opt = init_train_state(loaded.model, cfg, 1000, mesh)
    step = make_train_step(graphdef, opt, cfg, mesh, loss_chunk=a.loss_chunk or None)

    b, d, q, n_ans = a.batch, a.doc_tokens, a.qa_tokens, a.answer_tokens
    rng = np.random.default_rng(0)
    teacher = rng.integers(100, mcfg.vocab_size, (b, d + q)).astype(np.int32)
    rows = lambda start: np.tile(np.arange(start, start + n_ans, dtype=np.int32), (b, 1))
    batch = global_batch({
        "teacher_tokens": teacher, "teacher_valid": np.ones((b, d + q), bool),
        "student_tokens": teacher[:, d:], "student_valid": np.ones((b, q), bool),
        "targets": teacher[:, -n_ans:], "target_mask": np.ones((b, n_ans), bool),
        # logits at position p predict token p + 1, as the reference's logits[:, -A-1:-1]
        "teacher_pos": rows(d + q - n_ans - 1), "student_pos": rows(q - n_ans - 1),
    }, mesh)

    t0 = time.perf_counter()
    state, metrics = step(state, base, batch)  # compiles
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - t0
    times, losses = [], []
    for _ in range(a.steps):
        t = time.perf_counter()
        state, metrics = step(state, base, batch)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - t)
        losses.append(float(metrics["loss"]))
    med = statistics.median(times)
    flops = model_flops(mcfg, b, d + q, q, n_ans)
    computed = computed_flops(mcfg, b, d + q, q, n_ans, a.first_layer)
    peak = matmul_peak(a.matmul_size)["flops_per_s"]
    print(json.dumps({
        "impl": "pdistill_jax", "jax": jax.__version__, "platform": jax.devices()[0].platform,
        "devices": jax.device_count(), "model": a.model, "dtype": a.dtype, "remat": a.remat,
        "attention": attention_kernel(a.attention),
        "batch": b, "doc_tokens": d, "qa_tokens": q, "answer_tokens": n_ans, "rank": a.rank,
        "first_layer": a.first_layer,
        "first_step_s": round(compile_s, 2), "step_s_median": round(med, 3),
        "step_s_min": round(min(times), 3), "examples_per_s": round(b / med, 3),
        "answer_tokens_per_s": round(b * n_ans / med, 1), "model_flops_per_step": flops,
        "model_flops_per_s": flops / med, "computed_flops_per_step": computed,
        "computed_flops_per_s": computed / med, "matmul_peak_flops_per_s": peak,
        "fraction_of_matmul_peak": round(computed / med / peak, 3),
        "losses": [round(x, 5) for x in losses]}))


if __name__ == "__main__":
    main()
