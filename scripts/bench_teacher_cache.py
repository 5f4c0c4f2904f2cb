"""Seconds to compute the teacher's hidden states at the answer positions for a Q&A file, with
each document prefilled once per batch (what `pdistill train` does) and with every row run whole.

Each is run twice in one process; the second run (compilation cached in memory) is reported
beside the first. Prints one JSON line.

    python scripts/bench_teacher_cache.py runs/demo/data [--rows 8]
"""
from __future__ import annotations

import argparse
import json
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("data", help="a `pdistill generate` folder or a Q&A JSONL file")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--rows", type=int, default=8, help="rows per teacher batch")
    a = ap.parse_args()

    import jax
    from flax import nnx

    from pdistill_jax.config import LoraConfig
    from pdistill_jax.datagen.dataset import read_qa_rows
    from pdistill_jax.train.batches import make_train_data
    from pdistill_jax.weights.load import load_model
    from pdistill_jax.model.sharding import global_batch, make_mesh
    from pdistill_jax.train.step import make_teacher_hidden
    from pdistill_jax.train.teacher_cache import compute_teacher_cache, compute_teacher_cache_shared

    lm = load_model(a.model, LoraConfig(rank=8, alpha=16))
    data = make_train_data(read_qa_rows(a.data), lm.tokenizer, objective="kl", max_seq_len=1024, system=None,
                           rows_per_step=a.rows, seed=0)
    mesh = make_mesh((1, 1, 1), jax.devices()[:1])
    graphdef, lora, base = nnx.split(lm.model, nnx.LoRAParam, nnx.Param)
    hidden_fn = make_teacher_hidden(graphdef, mesh)
    runs = {
        "shared_prefix": lambda: compute_teacher_cache_shared(data.examples, a.rows, graphdef, lora, base),
        "whole_rows": lambda: compute_teacher_cache(
            data.examples, a.rows, lambda b: hidden_fn(lora, base, b), lambda b: global_batch(b, mesh)),
    }
    out = {"rows": len(data.examples), "batch_rows": a.rows}
    for name, fn in runs.items():
        for attempt in ("first_s", "second_s"):
            t = time.perf_counter()
            fn()
            out[f"{name}_{attempt}"] = round(time.perf_counter() - t, 1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
