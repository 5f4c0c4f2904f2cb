"""Training data: Q&A rows -> token sequences -> length-bucketed batches in a resumable order.

Data flows one way: `read_qa_rows` (a `pdistill generate` folder or a JSONL file) ->
`tokenize_rows` (teacher and student sequences sharing the same answer ids) -> `TrainData`
(a deterministic, per-epoch-reshuffled, length-bucketed batch plan) -> `collate` (the numpy batch
dict agreed with the train step; see the batch format in `collate`'s docstring).

A batch position is `DataPosition(epoch, index)`: the plan of every epoch is a pure function of
(seed, epoch, lengths), so a resumed run that restores the position sees exactly the batches the
uninterrupted run would have seen.
"""
from __future__ import annotations

import dataclasses
import math
from collections import Counter
from typing import Iterator, Sequence

import numpy as np

from pdistill_jax.datagen.dataset import QARow
from pdistill_jax.model.prefill import bucket_length
from pdistill_jax.weights.tokenizer import DOC_SEPARATOR, chat_prompt_ids, end_of_turn_id

WINDOW_STEPS = 16  # rows are sorted by length within windows of this many steps' worth of rows
# Student widths chosen from the data (`fitted_widths`): multiples of this, and a width is only
# added when it saves more padded positions per row, over the run, than this many (about what
# one more compiled step shape costs).
WIDTH_MULTIPLE = 8
WIDTH_COST = 256
# A student prefix shorter than this is not shared: its own forward pass would cost more than
# the padded tokens it saves.
MIN_SHARED_PREFIX = 8


@dataclasses.dataclass(frozen=True)
class Example:
    """One tokenised row. Both sequences end with their targets: answer ids + end-of-turn (no
    end-of-turn for a `ce` answer that generation cut at its token limit)."""

    teacher: np.ndarray  # int32: teacher prompt + answer ids + eot
    student: np.ndarray  # int32: student prompt + answer ids (sft ids for `ce`) + eot
    teacher_prompt_len: int
    student_prompt_len: int
    # False when generation cut the answer at its token limit. The distillation objectives
    # still end with the end-of-turn target (they match distributions there); a CE term
    # (TrainConfig.ce_weight) leaves that position out, as the ce objective does.
    answer_finished: bool = True

    @property
    def targets(self) -> np.ndarray:
        return self.student[self.student_prompt_len:]


@dataclasses.dataclass(frozen=True)
class TokenizedData:
    examples: list[Example]
    truncated: int  # rows whose document was cut (token level) to fit max_seq_len
    skipped: int  # rows that could not fit even with the document cut to nothing


def tokenize_rows(rows: Sequence[QARow], tokenizer, *, objective: str = "kl",
                  max_seq_len: int = 1024, system: str | None = None) -> TokenizedData:
    """Teacher/student token sequences. The answer is tokenised ONCE and the same ids are appended
    to both prompts, so the two sequences cannot disagree on the answer's tokenisation."""
    eot = end_of_turn_id(tokenizer)
    examples, truncated, skipped = [], 0, 0
    for row in rows:
        answer = _encode(tokenizer, row.answer)
        student_answer, end = answer, [eot]
        if objective == "ce":
            finished = row.answer_finished
            if row.sft_answer is not None:
                student_answer, finished = _encode(tokenizer, row.sft_answer), row.sft_finished
            # The distillation objectives match whole distributions at the end position, cut
            # answer or not; cross-entropy would make the end token a target.
            end = [eot] if finished else []
        prompt_budget = max_seq_len - len(answer) - 1
        fitted = _teacher_prompt(tokenizer, row.document, row.question, system, prompt_budget)
        student_prompt = chat_prompt_ids(tokenizer, row.question, system)
        if fitted is None or len(student_prompt) + len(student_answer) + 1 > max_seq_len:
            skipped += 1
            continue
        teacher_prompt, was_cut = fitted
        truncated += was_cut
        examples.append(Example(
            teacher=np.asarray(teacher_prompt + answer + [eot], np.int32),
            student=np.asarray(student_prompt + student_answer + end, np.int32),
            teacher_prompt_len=len(teacher_prompt), student_prompt_len=len(student_prompt),
            answer_finished=bool(row.answer_finished)))
    return TokenizedData(examples, truncated, skipped)


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _teacher_prompt(tokenizer, document: str, question: str, system: str | None,
                    budget: int) -> tuple[list[int], bool] | None:
    """The teacher prompt within `budget` tokens, cutting the document's tail token by token.

    The question, the template and the answer are never cut: without them the row teaches
    nothing. Returns None when not even one document token fits.
    """
    ids = chat_prompt_ids(tokenizer, document + DOC_SEPARATOR + question, system)
    if len(ids) <= budget:
        return ids, False
    doc_ids = _encode(tokenizer, document)
    keep = budget - (len(ids) - len(doc_ids))
    while keep > 0:
        # Decoding a prefix can end inside a multi-byte character; drop the replacement char.
        text = tokenizer.decode(doc_ids[:keep]).rstrip("\ufffd")
        ids = chat_prompt_ids(tokenizer, text + DOC_SEPARATOR + question, system)
        if len(ids) <= budget:
            return ids, True
        keep -= len(ids) - budget  # re-tokenisation can merge differently: shrink and retry
    return None


@dataclasses.dataclass(frozen=True)
class DataPosition:
    """The next batch to train on: batch `index` of epoch `epoch` (both from 0)."""

    epoch: int = 0
    index: int = 0

    def advance(self, steps_per_epoch: int) -> "DataPosition":
        if self.index + 1 >= steps_per_epoch:
            return DataPosition(self.epoch + 1, 0)
        return DataPosition(self.epoch, self.index + 1)

    def global_step(self, steps_per_epoch: int) -> int:
        return self.epoch * steps_per_epoch + self.index


def epoch_plan(lengths: np.ndarray, rows_per_step: int, seed: int, epoch: int,
               window_steps: int = WINDOW_STEPS) -> list[np.ndarray]:
    """Row indices of every batch of one epoch.

    A permutation drawn from (seed, epoch) -- a different order every epoch, the same on every
    rerun -- is cut into windows of `window_steps` batches; each window is sorted by length and cut
    into batches (so rows in a batch have similar lengths and little padding); finally the batch
    order is shuffled so that long and short batches are interleaved through the epoch. Only the
    very last batch can be partial (it is padded with masked rows by `collate`).
    """
    rng = np.random.default_rng([seed, epoch])
    perm = rng.permutation(len(lengths))
    window = rows_per_step * window_steps
    batches = []
    for start in range(0, len(perm), window):
        chunk = perm[start:start + window]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches += [chunk[i:i + rows_per_step] for i in range(0, len(chunk), rows_per_step)]
    return [batches[i] for i in rng.permutation(len(batches))]


def shared_student_prefix(examples: Sequence[Example]) -> np.ndarray:
    """The ids every student sequence starts with (a chat template's system preamble), at most up to each prompt's second-to-last token so that every row
    keeps the token that predicts its first answer token. Empty when shorter than
    MIN_SHARED_PREFIX. The train step runs it once per batch instead of once per row."""
    if not examples:
        return np.zeros(0, np.int32)
    first = examples[0].student
    n = min(e.student_prompt_len for e in examples) - 1
    for e in examples[1:]:
        differ = np.flatnonzero(e.student[:n] != first[:n])
        n = int(differ[0]) if differ.size else n
    return np.asarray(first[:n] if n >= MIN_SHARED_PREFIX else [], np.int32)


def fitted_widths(needed: Sequence[int], multiple: int = WIDTH_MULTIPLE,
                  width_cost: int = WIDTH_COST) -> list[int]:
    """Padded widths for batches that need `needed` positions each: the set of widths (multiples
    of `multiple`, the largest fitting every batch) that minimises the positions every batch pads
    to plus `width_cost` per width (each width is one more compiled shape).

    The batch plan is known before training, so the widths fit the data instead of a fixed
    ladder, with fewer padded positions for as many shapes. Exact (dynamic programming over the
    distinct needs).
    """
    if not needed:
        return []
    tally = Counter(round_up(int(n), multiple) for n in needed)
    values = sorted(tally)
    counts = [tally[v] for v in values]
    n = len(values)
    # best[j] = (cost, widths) covering values[:j+1] with values[j] as the largest width
    best: list[tuple[int, list[int]]] = []
    for j in range(n):
        options = []
        for i in range(-1, j):  # values[i+1..j] pad to values[j]; values[..i] covered before
            below = (0, []) if i < 0 else best[i]
            cost = below[0] + values[j] * sum(counts[i + 1:j + 1]) + width_cost
            options.append((cost, below[1] + [values[j]]))
        best.append(min(options))
    return best[-1][1]


def round_up(n: int, multiple: int = WIDTH_MULTIPLE) -> int:
    """`n` rounded up to a multiple of `multiple` (a padded width)."""
    return -(-n // multiple) * multiple


def _fit(n: int, widths: Sequence[int] | None, minimum: int = 32) -> int:
    """The smallest of `widths` that holds n, or the bucket ladder's size without widths."""
    return next((w for w in widths or () if w >= n), None) or bucket_length(n, minimum)


def states_per_row(examples: Sequence[Example], rows: int, length, keys: Sequence[str],
                   states_fn, to_global, keep, pad_id: int = 0, student_prefix: int = 0
                   ) -> list[np.ndarray]:
    """What a frozen pass computes for each example, computed once: `states_fn` over batches of
    `rows` examples of similar `length(example)` (little padding), each batch `collate`d, cut
    to `keys` and made global by `to_global`; row r of its (rows, N, D) result, gathered from
    every process, keeps its first `keep(example)` entries. The caches of the teacher's states,
    the frozen lower layers' and the closed-book states are all this loop."""
    import jax

    order = np.argsort([length(e) for e in examples], kind="stable")
    out: list[np.ndarray | None] = [None] * len(examples)
    for start in range(0, len(order), rows):
        idx = order[start:start + rows]
        batch = collate(examples, idx, rows, pad_id, student_prefix=student_prefix)
        states = states_fn(to_global({k: batch[k] for k in keys}))
        if jax.process_count() > 1:
            from jax.experimental.multihost_utils import process_allgather
            states = process_allgather(states, tiled=True)
        states = np.asarray(states)
        for r, i in enumerate(idx):
            out[i] = states[r, :keep(examples[i])].copy()
    return out  # type: ignore[return-value]


def collate(examples: Sequence[Example], indices: Sequence[int], rows: int,
            pad_id: int = 0, student_prefix: int = 0,
            student_widths: Sequence[int] | None = None,
            answer_widths: Sequence[int] | None = None,
            ce_mask: bool = False) -> dict[str, np.ndarray]:
    """The batch dict of the shared format, right-padded, with `rows` rows.

    teacher_tokens/_valid (rows, Tt), student_tokens/_valid (rows, Ts), targets/target_mask
    (rows, A): answer ids + end-of-turn; teacher_pos/student_pos (rows, A): index of the token
    whose logits predict targets[:, j] (the one just before it); padded entries are 0 and masked.
    Rows beyond len(indices) are all-masked filler: they carry no answer token, and the loss
    (mean per sequence, then over sequences that have answer tokens) ignores them.

    student_prefix: the length of a prefix every student sequence shares (`shared_student_prefix`),
    left out of student_tokens, with student_pos counted after it; a step built with that prefix
    (`make_train_step(..., student_prefix=ids)`) runs it once for all rows.
    student_widths, answer_widths: the widths to pad student sequences to (the smallest that fits;
    `fitted_widths`), in place of the `bucket_length` ladder, and the answer width that goes with
    each (answer_widths[i] with student_widths[i]; `TrainData.widths`), so that a batch's shape
    is one of len(student_widths) pairs.
    ce_mask: also "ce_mask" (rows, A), the positions a CE term on the answer reads
    (TrainConfig.ce_weight): target_mask without the end-of-turn target of an answer that
    generation cut at its token limit (`Example.answer_finished`).
    """
    chosen = [examples[i] for i in indices]
    tt = bucket_length(max(len(e.teacher) for e in chosen), 32)
    ts = _fit(max(len(e.student) for e in chosen) - student_prefix, student_widths)
    a = max(len(e.targets) for e in chosen)
    if answer_widths is None:
        a = bucket_length(a, 16)
    else:
        paired = answer_widths[list(student_widths).index(ts)]
        if paired < a:
            raise ValueError(f"answers of {a} tokens do not fit the answer width {paired} paired "
                             f"with student width {ts}")
        a = paired
    out = {
        "teacher_tokens": np.full((rows, tt), pad_id, np.int32),
        "teacher_valid": np.zeros((rows, tt), bool),
        "student_tokens": np.full((rows, ts), pad_id, np.int32),
        "student_valid": np.zeros((rows, ts), bool),
        "targets": np.full((rows, a), pad_id, np.int32),
        "target_mask": np.zeros((rows, a), bool),
        "teacher_pos": np.zeros((rows, a), np.int32),
        "student_pos": np.zeros((rows, a), np.int32),
    }
    if ce_mask:
        out["ce_mask"] = np.zeros((rows, a), bool)
    for r, e in enumerate(chosen):
        n = len(e.targets)
        out["teacher_tokens"][r, :len(e.teacher)] = e.teacher
        out["teacher_valid"][r, :len(e.teacher)] = True
        own = e.student[student_prefix:]
        out["student_tokens"][r, :len(own)] = own
        out["student_valid"][r, :len(own)] = True
        out["targets"][r, :n] = e.targets
        out["target_mask"][r, :n] = True
        if ce_mask:
            out["ce_mask"][r, :n - (not e.answer_finished)] = True
        out["student_pos"][r, :n] = e.student_prompt_len - student_prefix - 1 + np.arange(n)
        # For `ce` the teacher may hold a different (unused) answer: clip into its sequence.
        out["teacher_pos"][r, :n] = np.minimum(e.teacher_prompt_len - 1 + np.arange(n),
                                               len(e.teacher) - 1)
    return out


Batch = dict[str, np.ndarray]


@dataclasses.dataclass
class TrainData:
    """Tokenised examples plus the batch plan: what the training loop iterates over.

    An epoch has ceil(rows / rows_per_step) steps: the last partial batch is padded with masked
    rows rather than dropped. Prompt-distillation sets are small (about 30 questions a document),
    so dropping would lose up to a batch of facts every epoch; masked rows cost no loss and no
    extra compilation (the batch shape is unchanged), and every step keeps the same row count.
    """

    examples: list[Example]
    rows_per_step: int  # batch_size * grad_accum
    seed: int
    pad_id: int = 0
    truncated: int = 0
    skipped: int = 0
    # Which sequence's length groups rows into batches: the one that dominates the step's compute.
    # "teacher" when the step runs the teacher (its sequence holds the document); "student" when
    # it does not (ce, or the teacher's hidden states cached once per run).
    order_by: str = "teacher"
    # Leave the prefix all student sequences share out of the batches (`shared_student_prefix`);
    # the step must then be built with `student_prefix=data.student_prefix`.
    share_student_prefix: bool = False
    # Batches also carry "ce_mask" (collate), for a step with TrainConfig.ce_weight > 0.
    ce_mask: bool = False

    def __post_init__(self):
        if not self.examples:
            raise ValueError("no training rows left after tokenisation (all were skipped as "
                             "longer than max_seq_len); raise max_seq_len")
        if self.order_by not in ("teacher", "student"):
            raise ValueError(f"order_by={self.order_by!r}; choose teacher or student")
        self.lengths = np.asarray([len(getattr(e, self.order_by)) for e in self.examples])
        self.student_prefix = (shared_student_prefix(self.examples) if self.share_student_prefix
                               else np.zeros(0, np.int32))

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.examples) / self.rows_per_step)

    def plan(self, epoch: int) -> list[np.ndarray]:
        return epoch_plan(self.lengths, self.rows_per_step, self.seed, epoch)

    def widths(self, epochs: int) -> tuple[list[int] | None, list[int] | None]:
        """(student widths, answer widths) of a run of `epochs` epochs when its batches are
        grouped by student length (the step runs no teacher sequence); (None, None), the bucket
        ladder, otherwise. Student widths are fitted to the batches (`fitted_widths`); each comes
        with one answer width, the longest answer of the batches padded to that student width,
        rounded up to WIDTH_MULTIPLE. Pairing adds no compiled shape, and since a student
        sequence holds its answer, long answers (restatements) sit in the wide batches instead of
        widening every batch's loss. A pure function of the plan, so a resumed run pads its
        batches as the uninterrupted run did."""
        if self.order_by != "student":
            return None, None
        p = len(self.student_prefix)
        plans = [b for epoch in range(epochs) for b in self.plan(epoch)]
        needs = [(max(len(self.examples[i].student) for i in b) - p,
                  max(len(self.examples[i].targets) for i in b)) for b in plans]
        student = fitted_widths([s for s, _ in needs])
        answer = [0] * len(student)
        for s, a in needs:
            k = next(k for k, w in enumerate(student) if w >= s)
            answer[k] = max(answer[k], round_up(a, WIDTH_MULTIPLE))
        return student, answer

    def batches(self, start: DataPosition, epochs: int
                ) -> Iterator[tuple[DataPosition, np.ndarray, Batch]]:
        """(position, row indices, batch) from `start` to the end of epoch `epochs - 1`."""
        student_widths, answer_widths = self.widths(epochs)
        for epoch in range(start.epoch, epochs):
            plan = self.plan(epoch)
            first = start.index if epoch == start.epoch else 0
            for index in range(first, len(plan)):
                yield DataPosition(epoch, index), plan[index], \
                    collate(self.examples, plan[index], self.rows_per_step, self.pad_id,
                            len(self.student_prefix), student_widths, answer_widths,
                            self.ce_mask)


def open_book_twins(examples: Sequence[Example], share: float, seed: int,
                    max_seq_len: int) -> list[Example]:
    """Copies of round(share * len(examples)) examples, drawn by `seed`, whose student sees the
    teacher's prompt (document and question) before the same answer ids.

    A student trained only on questions learns to answer from its adapter, and with a document
    in its prompt (PD + RAG) it can speak over the document. On a twin the teacher and student
    prompts are the same, so the distillation target is the base model reading the document:
    the adapter learns to leave the answer to a document in context. Under `ce` the twin
    carries the row's SFT answer. A twin longer than max_seq_len is left out."""
    if share <= 0 or not examples:
        return []
    rng = np.random.default_rng([seed, 0x0B00C])
    chosen = np.sort(rng.permutation(len(examples))[:round(share * len(examples))])
    twins = []
    for e in (examples[i] for i in chosen):
        student = np.concatenate([e.teacher[:e.teacher_prompt_len], e.targets])
        if len(student) <= max_seq_len:
            twins.append(dataclasses.replace(e, student=student,
                                             student_prompt_len=e.teacher_prompt_len))
    return twins


def make_train_data(rows: Sequence[QARow], tokenizer, *, objective: str, max_seq_len: int,
                    system: str | None, rows_per_step: int, seed: int,
                    open_book_share: float = 0.0) -> TrainData:
    tokenized = tokenize_rows(rows, tokenizer, objective=objective, max_seq_len=max_seq_len,
                              system=system)
    examples = tokenized.examples
    examples = examples + open_book_twins(examples, open_book_share, seed, max_seq_len)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return TrainData(examples, rows_per_step, seed, int(pad), tokenized.truncated,
                     tokenized.skipped)

