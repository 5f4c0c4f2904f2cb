"""Seconds for the training steps of one epoch of a Q&A file, with the batches `pdistill train`
builds (the students' shared prefix run once per step, widths fitted to the run) and with whole
student sequences on the fixed 64/96/128 ladder.

The objective is `ce` (the SFT step: the student forward and backward, as in the cached-teacher
PD step, without the teacher's LM head). Every shape is compiled first; then the epoch runs
twice per layout, interleaved (A B B A), so that a drifting machine speed cancels. Also reports
the padded student positions and answer (loss) positions per row of both layouts; with
--layout-only, only those counts (no model run). Prints one JSON line.

    python scripts/bench_train_batches.py runs/demo/data [--epochs 3 --batch 8 --rank 32]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("data", help="a `pdistill generate` folder or a Q&A JSONL file")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--epochs", type=int, default=3, help="epochs the widths are fitted to")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--answers", choices=("sft", "teacher"), default="sft",
                    help="the answers the batches hold: SFT's, or the teacher's (PD's targets)")
    ap.add_argument("--layout-only", action="store_true",
                    help="count padded positions only: no compilation, no timing")
    a = ap.parse_args()

    import jax

    from pdistill_jax.config import LoraConfig, TrainConfig
    from pdistill_jax.datagen.dataset import read_qa_rows
    from pdistill_jax.train.batches import DataPosition, collate, make_train_data
    from pdistill_jax.weights.load import load_model
    from pdistill_jax.model.sharding import make_mesh
    from pdistill_jax.train.step import init_train_state, make_train_step

    cfg = TrainConfig(objective="ce", lora=LoraConfig(rank=a.rank, alpha=2.0 * a.rank), lr=1e-4,
                      batch_size=a.batch)
    lm = load_model(a.model, cfg.lora)
    data = make_train_data(read_qa_rows(a.data), lm.tokenizer,
                           objective="ce" if a.answers == "sft" else "kl",
                           max_seq_len=cfg.max_seq_len, system=None, rows_per_step=a.batch, seed=0)
    layouts = {"whole_ladder": dataclasses.replace(data, order_by="student"),
               "prefix_fitted": dataclasses.replace(data, order_by="student",
                                                    share_student_prefix=True)}
    mesh = make_mesh((1, 1, 1), jax.devices()[:1])
    graphdef, base, state, opt = init_train_state(lm.model, cfg, 10_000, mesh)
    result = {"data": a.data, "rows": len(data.examples), "answers": a.answers, "batch": a.batch,
              "epochs": a.epochs, "rank": a.rank,
              "jax": jax.__version__, "platform": jax.devices()[0].platform}
    runs = {}
    for name, d in layouts.items():
        step = make_train_step(graphdef, opt, cfg, mesh, student_prefix=d.student_prefix)
        if d.share_student_prefix:  # epoch 0 of a run of --epochs epochs (widths fit the run)
            batches = [b for pos, _, b in d.batches(DataPosition(), a.epochs) if pos.epoch == 0]
        else:  # the same rows per batch, whole sequences, the bucket ladder
            batches = [collate(d.examples, idx, a.batch, d.pad_id) for idx in d.plan(0)]
        shapes = sorted({(b["student_tokens"].shape[1], b["targets"].shape[1]) for b in batches})
        compiled = set()
        for b in batches if not a.layout_only else ():
            key = (b["student_tokens"].shape, b["targets"].shape)
            if key not in compiled:
                compiled.add(key)
                state, metrics = step(state, base, b)
                jax.block_until_ready(metrics)
        runs[name] = (step, batches)
        result[name] = {"shared_prefix": len(d.student_prefix),
                        "student_answer_widths": shapes,
                        "padded_positions_per_row": sum(b["student_tokens"].shape[1] for b in batches)
                        + len(d.student_prefix) / a.batch * len(batches),
                        "answer_positions_per_row": sum(b["targets"].shape[1] for b in batches),
                        "answer_tokens_per_row": sum(int(b["target_mask"].sum()) for b in batches)
                        / a.batch,
                        "epoch_s": []}
    for name in ("whole_ladder", "prefix_fitted", "prefix_fitted", "whole_ladder") * (not a.layout_only):
        step, batches = runs[name]
        t = time.perf_counter()
        for b in batches:
            state, metrics = step(state, base, b)
        jax.block_until_ready(metrics)
        result[name]["epoch_s"].append(round(time.perf_counter() - t, 1))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
