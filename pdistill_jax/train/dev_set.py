"""A dev set held out of the training rows, and the rule that stops a run by it.

The test questions must never steer training, so a run that wants to know when more passes stop
helping needs questions of its own that it does not train on. `split_dev_rows` holds out a share
of each document's generated questions. A question leaves together with its rewrites and its
further answers (they share the question or `paraphrase_of`), so the dev loss measures answers
to phrasings the student never saw. Restatements and recitations ask about the whole document,
not a fact, and always train. The loop measures the training objective on the dev rows
(`make_dev_loss` in step.py) and keeps the adapter of the lowest dev loss.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from pdistill_jax.datagen.dataset import QARow

# A dev loss counts as lower than the best so far only below best * (1 - this): float noise
# between evaluations of a stalled adapter is not progress.
MIN_RELATIVE_GAIN = 1e-4


def split_dev_rows(rows: Sequence[QARow], share: float, seed: int
                   ) -> tuple[list[QARow], list[QARow]]:
    """(training rows, dev rows), each in the input order.

    Per document (doc_id, or the document text without one), round(share * its questions)
    questions are held out, at least one when share > 0 and the document has two or more; a
    document with one question keeps it for training. Drawn from `seed` and the document's
    position among the documents, so the same rows give the same split.
    """
    if share <= 0:
        return list(rows), []
    questions: dict[object, dict[str, None]] = {}  # document -> its questions, first-seen order
    for row in rows:
        if not row.about_document:
            questions.setdefault(_document(row), {}).setdefault(question_key(row)[1], None)
    held: set[tuple[object, str]] = set()
    for k, (doc, qs) in enumerate(questions.items()):
        names = list(qs)
        n = max(1, round(share * len(names))) if len(names) >= 2 else 0
        rng = np.random.default_rng([seed, 0xDE5E7, k])
        held.update((doc, names[i]) for i in rng.permutation(len(names))[:n])
    dev = [r for r in rows if not r.about_document and question_key(r) in held]
    train = [r for r in rows if r.about_document or question_key(r) not in held]
    return train, dev


def question_key(row: QARow) -> tuple[object, str]:
    """(document, question): what a row's rewrites and further answers share with it."""
    return _document(row), row.paraphrase_of if row.paraphrase_of is not None else row.question


def _document(row: QARow) -> object:
    return row.doc_id if row.doc_id is not None else row.document


@dataclasses.dataclass
class DevHistory:
    """The dev losses measured so far and what they decide; kept in every checkpoint's meta so
    that a resumed run stops where the uninterrupted one would."""

    losses: list[tuple[int, float]] = dataclasses.field(default_factory=list)  # (step, loss)
    best_step: int | None = None
    best_loss: float | None = None
    stopped_early: bool = False

    def add(self, step: int, loss: float) -> bool:
        """Records one measurement; True when it is the new best."""
        self.losses.append((step, loss))
        if self.best_loss is None or loss < self.best_loss * (1 - MIN_RELATIVE_GAIN):
            self.best_step, self.best_loss = step, loss
            return True
        return False

    def since_best(self) -> int:
        """Measurements after the best one."""
        return sum(step > self.best_step for step, _ in self.losses) if self.losses else 0

    def to_dict(self) -> dict:
        return {"losses": [[s, v] for s, v in self.losses], "best_step": self.best_step,
                "best_loss": self.best_loss, "stopped_early": self.stopped_early}

    @classmethod
    def from_dict(cls, d: dict | None) -> "DevHistory":
        if not d:
            return cls()
        return cls([(int(s), float(v)) for s, v in d["losses"]], d["best_step"], d["best_loss"],
                   bool(d["stopped_early"]))


def measures_at(step: int, eval_every: int, steps_per_epoch: int, total_steps: int) -> bool:
    """Whether the dev loss is measured after `step`: every eval_every steps (0: at each epoch's
    end), and always after the last step."""
    every = eval_every or steps_per_epoch
    return step % every == 0 or step == total_steps


def dev_batches(examples: Sequence, rows: int, pad_id: int, student_prefix: np.ndarray
                ) -> list[tuple[np.ndarray, dict[str, np.ndarray]]]:
    """(row indices, batch) covering every dev example once, `rows` rows a batch, grouped by
    student length so that little is padded. The batches leave out the training data's shared
    student prefix, which the dev rows begin with too (the same chat template and system)."""
    from pdistill_jax.train.batches import collate

    p = len(student_prefix)
    for e in examples:
        if len(e.student) <= p or not np.array_equal(e.student[:p], student_prefix):
            raise ValueError("a dev row's student prompt does not begin with the training rows' "
                             "shared prefix (the chat template and system message)")
    order = np.argsort([len(e.student) for e in examples], kind="stable")
    chunks = [order[i:i + rows] for i in range(0, len(order), rows)]
    return [(c, collate(examples, c, rows, pad_id, p)) for c in chunks]
