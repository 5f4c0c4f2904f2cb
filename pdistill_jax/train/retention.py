"""The retention regulariser's data: general prompts, the base model's own answers, batches.

The term (TrainConfig.retention_weight) is the authors' KL-to-base on general prompts: the
prompt goes to the base model (adapter off) and to the student (adapter on), and the loss adds
forward KL(base || student) over the answer positions (`step.retention_sums`). The answer the
positions belong to is the base model's own greedy answer to the prompt, generated once before
the first step (`base_answers`, RETENTION_ANSWER_TOKENS at most) and kept in RUN/retention.jsonl (run_folder.RETENTION_FILE),
so a resumed run reads the answers it started with instead of generating them again. A
retention row is then a PD row whose teacher prompt is the student prompt: one sequence, chat
prompt (no document) + answer ids + end-of-turn, read by both.

Every step takes the next retention_batch_size * grad_accum rows of an endless stream: the
rows in an order drawn from (seed, pass), pass after pass. A pure function of (seed, step), so
a resumed run sees the rows the uninterrupted run saw.

The base model's side of every row never changes, and neither do the frozen layers below an
adapter on the upper layers only: the trainer computes both once per run (`RetentionBatches.hidden`
and `.lower`, filled by train/loop.py), as it does for the distillation teacher and the
student's lower layers, so that a step runs only the student's adapter layers over its
retention rows.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

import numpy as np

from pdistill_jax.config import asset_path
from pdistill_jax.files import Field, Schema, read_jsonl, write_jsonl_atomic
from pdistill_jax.train.batches import Example, collate, round_up
from pdistill_jax.weights.tokenizer import chat_prompt_ids, end_of_turn_id

RETENTION_ANSWER_TOKENS = 32  # the base's answers: enough for a general-knowledge reply
PROMPTS_SCHEMA = Schema('{"question"} objects, one a line (other fields are ignored)',
                        {"question": Field()})
ANSWERS_SCHEMA = Schema('{"question", "answer", "answer_ids", "finished"} objects, one a line',
                        {"question": Field(), "answer": Field(blank_ok=True),
                         "answer_ids": Field((list,)), "finished": Field((bool,))})
_STREAM = 0x72657421  # keeps the retention order's random stream apart from the epochs'


def read_prompts(spec: str) -> list[str]:
    path = asset_path(spec)  # builtin:NAME is a file of the package's assets
    if not path.is_file():
        raise ValueError(f"retention_prompts: {spec} is not a file")
    questions = [row["question"] for row in read_jsonl(path, PROMPTS_SCHEMA)]
    if not questions:
        raise ValueError(f"retention_prompts: {spec} holds no questions")
    return questions


def base_answers(model, tokenizer, questions: Sequence[str], system: str | None, end_ids,
                 batch_size: int = 16) -> list[dict]:
    """The base model's (adapter off) greedy answer to each question under `system`."""
    from pdistill_jax.config import SamplingParams
    from pdistill_jax.model.sampler import generate

    prompts = [chat_prompt_ids(tokenizer, q, system) for q in questions]
    outs = generate(model, prompts, SamplingParams(max_new_tokens=RETENTION_ANSWER_TOKENS),
                    end_ids=end_ids, batch_size=batch_size, use_lora=False)
    return [{"question": q, "answer": tokenizer.decode(c.tokens), "answer_ids": list(c.tokens),
             "finished": c.finished} for q, c in zip(questions, outs)]


def load_or_make_answers(path: Path, questions: Sequence[str], make, write: bool = True
                         ) -> tuple[list[dict], bool]:
    """(rows, made): the answers kept in `path` when they answer exactly `questions`, else
    make() written there (by process 0 only: `write`)."""
    if path.exists():
        rows = read_jsonl(path, ANSWERS_SCHEMA)
        if [r["question"] for r in rows] != list(questions):
            raise ValueError(f"{path} answers other retention prompts than retention_prompts "
                             "holds now; train into a new --out")
        return rows, False
    rows = make()
    if write:
        write_jsonl_atomic(path, rows)
    return rows, True


def retention_examples(rows: Sequence[dict], tokenizer, system: str | None) -> list[Example]:
    """One Example per answer row, teacher sequence == student sequence (no document)."""
    eot = end_of_turn_id(tokenizer)
    out = []
    for row in rows:
        prompt = chat_prompt_ids(tokenizer, row["question"], system)
        seq = np.asarray(prompt + [int(i) for i in row["answer_ids"]] + [eot], np.int32)
        out.append(Example(teacher=seq, student=seq, teacher_prompt_len=len(prompt),
                           student_prompt_len=len(prompt), answer_finished=bool(row["finished"])))
    return out


@dataclasses.dataclass
class RetentionBatches:
    """The retention rows of every step: `rows_per_step` of them, at one padded width (one
    compiled shape for the whole run)."""

    examples: list[Example]
    rows_per_step: int  # retention_batch_size * grad_accum
    seed: int
    pad_id: int = 0
    # Ids every row starts with (the chat template's system preamble), left out of the batches
    # and run once a step (`collate(student_prefix=)`); `shared_prefix` picks them.
    prefix: tuple[int, ...] = ()
    # Per row, computed once by the trainer (None: the step computes them): the base model's
    # final hidden states at the answer positions (answer tokens, D), and the states entering
    # lora.first_layer over the sequence (tokens, D).
    hidden: list[np.ndarray] | None = None
    lower: list[np.ndarray] | None = None

    def __post_init__(self):
        if not self.examples:
            raise ValueError("no retention rows")
        p = len(self.prefix)
        if not all(_starts_with(e, self.prefix) for e in self.examples):
            raise ValueError("every retention row must start with the prefix and keep a prompt "
                             "token after it (shared_prefix)")
        self.width = round_up(max(len(e.student) for e in self.examples) - p)
        self.answer_width = round_up(max(len(e.targets) for e in self.examples))

    def indices(self, step: int) -> np.ndarray:
        """Row indices for global step `step` (from 0)."""
        n = len(self.examples)
        ks = np.arange(step * self.rows_per_step, (step + 1) * self.rows_per_step)
        order = {p: np.random.default_rng([self.seed, _STREAM, p]).permutation(n)
                 for p in np.unique(ks // n)}
        return np.asarray([order[k // n][k % n] for k in ks])

    def cache_bytes(self, hidden_size: int, dtype, lower: bool) -> int:
        """What `hidden` (and with `lower`, `lower`) take for every row."""
        own = lambda e: len(e.student) - len(self.prefix)  # noqa: E731
        tokens = sum(len(e.targets) + (own(e) if lower else 0) for e in self.examples)
        return tokens * hidden_size * np.dtype(dtype).itemsize

    def batch(self, step: int) -> dict[str, np.ndarray]:
        """The retention keys of step `step`'s batch (step.RETENTION_KEYS, and the cached
        step.RETENTION_HIDDEN / RETENTION_LOWER when the trainer computed them)."""
        from pdistill_jax.train.step import RETENTION_HIDDEN, RETENTION_LOWER

        indices = self.indices(step)
        b = collate(self.examples, indices, self.rows_per_step, self.pad_id,
                    student_prefix=len(self.prefix), student_widths=[self.width],
                    answer_widths=[self.answer_width])
        out = {"retention_tokens": b["student_tokens"], "retention_valid": b["student_valid"],
               "retention_mask": b["target_mask"], "retention_pos": b["student_pos"]}
        if self.hidden is not None:
            out[RETENTION_HIDDEN] = _stacked(self.hidden, indices, self.answer_width)
        if self.lower is not None:
            out[RETENTION_LOWER] = _stacked(self.lower, indices, self.width)
        return out


def shared_prefix(examples: Sequence[Example], prefix: Sequence[int]) -> tuple[int, ...]:
    """`prefix` (the main rows' shared ids) when every retention row starts with it and keeps a
    prompt token after it, else (): the retention rows then run whole."""
    p = tuple(int(i) for i in prefix)
    return p if all(_starts_with(e, p) for e in examples) else ()


def _starts_with(example: Example, prefix: Sequence[int]) -> bool:
    """Whether the row's ids start with `prefix` and keep a prompt token after it."""
    p = len(prefix)
    return example.student_prompt_len - 1 >= p and tuple(example.student[:p]) == tuple(prefix)


def _stacked(states: Sequence[np.ndarray], indices: Sequence[int], width: int) -> np.ndarray:
    """(rows, width, D): row r holds states[indices[r]] from position 0, zeros after it (the
    batch's padding: masked as keys, never read as an answer position)."""
    first = states[indices[0]]
    out = np.zeros((len(indices), width, first.shape[-1]), first.dtype)
    for r, i in enumerate(indices):
        out[r, :len(states[i])] = states[i]
    return out
