"""Training data for prompt distillation, resumably: documents -> model-written questions ->
teacher answers, one wave of documents at a time.

For a wave of documents (`docs_per_commit` at a time) the question prompts of all of them go
through the batched sampler together, round after round, until every document has its quota of
distinct questions or has used `max_calls_per_doc` calls (questions.py); then the teacher answers
every question at the PD and the SFT temperature (answers.py). With paraphrases_per_question > 0
the model first rewrites every accepted question that many ways (paraphrases.py) and the teacher
answers each rewrite too, in a sampler call of its own; with answers_per_question > 1 it answers
every question and rewrite that many more times, again in a call of its own (so that the first
answers are those of a run without); with restatements_per_doc > 0 the teacher also restates
each document (restatements.py), rows that follow the document's question rows and get further
answers like them. The wave's rows are then committed to the output folder
(dataset.py describes it).

Resume: a wave's rows are appended to qa.jsonl and fsync'ed before its documents' lines are
appended to done.jsonl, so a kill loses at most the wave in flight; on restart a torn last line
is dropped and qa rows of documents without a done line are removed. Every sampler call's seed
is derived from (seed, stage, the wave's document ids, round), and a resumed run rebuilds the
same waves, so it writes what the uninterrupted run would have written.

On a cluster of P processes every process builds the same waves and takes every P-th of them
(process i: waves i, i + P, ...), sampling on its own devices; it commits them to its own part,
parts/process-<i>/ (qa.jsonl and done.jsonl as above). Once every process has passed the barrier
after its share, process 0 folds the parts into qa.jsonl and done.jsonl in document order and
writes dataset/ and manifest.json. A wave's rows do not depend on which process samples it, so
the folder is the one-process folder (timings aside). A rerun first folds the parts of an
interrupted cluster run in, so each process keeps the waves it committed.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Iterable

import numpy as np

from pdistill_jax.config import GenerateConfig
from pdistill_jax.datagen.answers import AnswerCall, teacher_answers_many
from pdistill_jax.datagen.dataset import (DATASET_DIR, DOCUMENTS_FILE, DONE_FILE, MANIFEST_FILE,
                                          OUTPUT_FILES, QA_FILE, TEST_QUESTIONS_FILE, check_settings,
                                          has_committed, load_progress, run_settings, save_dataset)
from pdistill_jax.datagen.documents import Document, chunk_document, load_documents, topic_of
from pdistill_jax.datagen.manifest import GenerationJob, Progress, write_manifest
from pdistill_jax.datagen.paraphrases import paraphrase_questions
from pdistill_jax.datagen.questions import DocQuestions, ask_questions, with_subject
from pdistill_jax.datagen.restatements import (recited_rows, restated_rows, restatement_call,
                                               without_loops)
from pdistill_jax.datagen.seeds import derive_seed
from pdistill_jax.datagen.teacher_states import (TEACHER_STATES_DIR, model_fingerprint,
                                                 save_teacher_states, state_entry,
                                                 teacher_states_bytes)
from pdistill_jax.files import append_jsonl_durable, write_jsonl_atomic
from pdistill_jax.model.sharding import barrier, check_peers, work_share

PARTS_DIR = "parts"  # parts/process-<i>/: the waves process i of a cluster committed


def tests_for(tests: list[dict], sources: list[Document]) -> list[dict]:
    """Test questions whose documents (all of them, for multi-hop) are in the corpus used."""
    ids = {s.id for s in sources}
    return [t for t in tests if all(i in ids for i in t.get("doc_ids", [t["doc_id"]]))]


def generate_data(model_spec: str | Path, docs_spec: str | Path, out_dir: str | Path,
                  cfg: GenerateConfig = GenerateConfig(), *, max_docs: int | None = None,
                  show_progress: bool = True) -> dict:
    """Generates (or resumes) the Q&A training data of a corpus into `out_dir`; returns the manifest.

    A call that fails before committing its first document removes what it wrote (a fresh
    `out_dir` entirely), so that the fixed command can start again: a folder holding only
    run.json would refuse any other settings. A generation that yields no row at all raises
    ValueError and leaves nothing of itself in `out_dir`: with no questions parsed there is
    nothing to train on, whatever comes next.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; generate writes a folder")
    if Path(docs_spec).is_file():
        for name in OUTPUT_FILES:
            if (out / name).exists() and os.path.samefile(docs_spec, out / name):
                raise ValueError(f"--docs {docs_spec} is {out / name}, which generate writes; "
                                 "move the documents or choose another --out")
    before = set(os.listdir(out)) if out.is_dir() else None
    try:
        return _generate(model_spec, docs_spec, out, cfg, max_docs, show_progress)
    except BaseException:
        # else a run to resume: kept; on a cluster process 0 alone cleans up
        if out.is_dir() and not _committed(out) and work_share()[0] == 0:
            _discard(out, None if before is None else set(os.listdir(out)) - before)
        raise


def _committed(out: Path) -> bool:
    parts = out / PARTS_DIR
    return has_committed(out) or parts.is_dir() and any(has_committed(p) for p in parts.iterdir())


def _discard(out: Path, names: Iterable[str] | None, *, drop_if_empty: bool = False) -> None:
    """Deletes those entries of `out` (None: `out` itself); with drop_if_empty, `out` too when
    that leaves it empty."""
    if names is None:
        shutil.rmtree(out, ignore_errors=True)
        return
    for name in names:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    if drop_if_empty and not any(out.iterdir()):
        out.rmdir()


class _ProgressBar:
    """The documents bar on stderr, its postfix naming the stage and the questions per second."""

    def __init__(self, total: int, done: int, show: bool):
        from tqdm import tqdm

        self.bar = tqdm(total=total, initial=done, unit="doc", desc="generate", file=sys.stderr,
                        disable=not show, dynamic_ncols=True)
        self.start = time.perf_counter()
        self.questions = 0

    def on_batch(self, stage: str, done_rows: int, total: int) -> None:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        self.bar.set_postfix_str(f"{stage} {done_rows}/{total} | {self.questions} questions, "
                                 f"{self.questions / elapsed:.2f} q/s", refresh=True)


@dataclasses.dataclass(frozen=True)
class Wave:
    """One wave's questions and answers, ready to commit."""

    docs: list[Document]
    seed: int  # every sampler call of the wave derives its seed from this
    asked: dict[str, DocQuestions]
    rows: list[dict]
    questions_s: float
    answers_s: float
    paraphrased: dict[str, list[DocQuestions]] | None = None  # paraphrases_per_question > 0

    def done_records(self, source_of: dict[str, str], cfg: GenerateConfig) -> list[dict]:
        """The done.jsonl lines of the wave's documents."""
        rows = {d.id: 0 for d in self.docs}
        for r in self.rows:
            rows[r["doc_id"]] += 1
        records = []
        for d in self.docs:
            asked = self.asked[d.id]
            record = {
                "doc_id": d.id, "source_id": source_of[d.id], "rows": rows[d.id],
                "questions": len(asked.questions), "calls": asked.calls,
                "parsed_per_call": asked.parsed_per_call, "new_per_call": asked.new_per_call,
                "gave_up": asked.gave_up, "wave": self.seed,
                "wave_questions_s": round(self.questions_s, 3),
                "wave_answers_s": round(self.answers_s, 3),
            }
            if asked.span_questions is not None:
                record.update(quota=asked.quota, span_questions=asked.span_questions)
            if self.paraphrased is not None:
                kept = self.paraphrased[d.id]
                record.update(paraphrase_calls=sum(p.calls for p in kept),
                              paraphrases_parsed=sum(sum(p.parsed_per_call) for p in kept),
                              paraphrases=sum(len(p.questions) for p in kept))
            if cfg.restatements_per_doc:
                record["restatements"] = sum(  # first answers: each request once
                    r["doc_id"] == d.id and "restatement" in r and "answer_index" not in r
                    for r in self.rows)
            if cfg.recitations_per_doc:
                record["recitations"] = sum(r["doc_id"] == d.id and "recitation" in r
                                            for r in self.rows)
            records.append(record)
        return records


def _run_wave(lm, docs: list[Document], cfg: GenerateConfig, states_dir: Path, fingerprint: str,
              bar: _ProgressBar) -> Wave:
    """Questions for the wave's documents (and their paraphrases), then the teacher's answers;
    the teacher's states go to `states_dir` (before the rows are committed: a committed row's
    states are on disk) while it holds less than teacher_states_gb."""
    seed = derive_seed(cfg.seed, [d.id for d in docs])
    t0 = time.perf_counter()
    asked = ask_questions(lm, docs, cfg, seed, bar.on_batch)
    if cfg.name_the_subject:
        for d in docs:
            _name_the_subject(asked[d.id], d)
    items = [(d, q) for d in docs for q in asked[d.id].questions]
    paraphrased = None
    if cfg.paraphrases_per_question:
        paraphrased = paraphrase_questions(lm, docs, asked, cfg, seed, bar.on_batch)
        if cfg.name_the_subject:
            for d in docs:
                for kept in paraphrased[d.id]:
                    _name_the_subject(kept, d)
        rewrites = [(d, p) for d in docs for kept in paraphrased[d.id] for p in kept.questions]
    t1 = time.perf_counter()
    bar.questions += len(items)
    states: dict[str, np.ndarray] = {}
    keep = teacher_states_bytes(states_dir) < cfg.teacher_states_gb * 2**30

    def on_teacher_state(ids, hidden):
        states.update([state_entry(fingerprint, ids, hidden)])

    # Every teacher call of the wave shares one set of decode slots; each keeps its own seed, so
    # that the first answers are those of a run without paraphrases, further answers or
    # restatements (and a row's answer that of a call of its own).
    more = cfg.answers_per_question - 1
    order = _row_questions(docs, asked, paraphrased)
    calls = {"answers": AnswerCall(items, seed)}
    if paraphrased is not None:
        calls["rewrites"] = AnswerCall(rewrites, derive_seed(seed, "paraphrase answers"))
    if more:
        calls["more"] = AnswerCall([(d, q) for d, q in order for _ in range(more)],
                                   derive_seed(seed, "more answers"))
    if cfg.restatements_per_doc:
        restate_seed = derive_seed(seed, "restatements")
        calls["restatements"] = restatement_call(docs, cfg, restate_seed)
        if more:
            calls["more restatements"] = AnswerCall(
                [item for item in calls["restatements"].items for _ in range(more)],
                derive_seed(restate_seed, "more answers"), cfg.max_restatement_tokens,
                questions=False)
    bar.questions += sum(len(c.items) for name, c in calls.items() if name != "answers")
    answered = dict(zip(calls, teacher_answers_many(lm, list(calls.values()), cfg, bar.on_batch,
                                                    on_teacher_state if keep else None)))
    rows = answered["answers"]
    if paraphrased is not None:
        rows = _with_paraphrases(docs, asked, paraphrased, rows, answered["rewrites"])
    if more:
        rows = _with_more_answers(rows, answered["more"], more)
    after = {d.id: [] for d in docs}  # rows that follow a document's question rows
    if cfg.restatements_per_doc:
        restated = restated_rows(docs, answered["restatements"])
        if more:
            further = iter(without_loops(r) for r in answered["more restatements"])
            restated = {d: _with_more_answers(mine, [next(further) for _ in range(more * len(mine))],
                                              more) for d, mine in restated.items()}
        for d, mine in restated.items():
            after[d] += mine
    if cfg.recitations_per_doc:
        for d, mine in recited_rows(docs, cfg.recitations_per_doc).items():
            after[d] += mine
    if any(after.values()):
        rows = [r for d in docs for r in [*(r for r in rows if r["doc_id"] == d.id), *after[d.id]]]
    if states:
        save_teacher_states(states_dir / f"wave-{seed}.npz", states)
    return Wave(docs, seed, asked, rows, t1 - t0, time.perf_counter() - t1, paraphrased)


def _name_the_subject(state: DocQuestions, doc: Document) -> None:
    """Every question of `state` names the document's subject (`with_subject`)."""
    subject = topic_of(doc)
    state.questions = [with_subject(q, subject) for q in state.questions]


def _row_questions(docs: list[Document], asked: dict[str, DocQuestions],
                   paraphrased: dict[str, list[DocQuestions]] | None
                   ) -> list[tuple[Document, str]]:
    """(document, question) of every question row in the order `_with_paraphrases` gives them:
    each original question, then its rewrites."""
    out = []
    for d in docs:
        for n, question in enumerate(asked[d.id].questions):
            out.append((d, question))
            if paraphrased is not None:
                out += [(d, p) for p in paraphrased[d.id][n].questions]
    return out


def _with_paraphrases(docs: list[Document], asked: dict[str, DocQuestions],
                      paraphrased: dict[str, list[DocQuestions]], rows: list[dict],
                      extra: list[dict]) -> list[dict]:
    """The rows of the original questions, each followed by its rewrites' rows (marked with
    "paraphrase_of"): grouped per document as ever (training shuffles rows across batches)."""
    rows, extra = iter(rows), iter(extra)
    out = []
    for d in docs:
        for question, kept in zip(asked[d.id].questions, paraphrased[d.id]):
            out.append(next(rows))
            out += [{**next(extra), "paraphrase_of": question} for _ in kept.questions]
    return out


def _with_more_answers(rows: list[dict], extra: list[dict], more: int) -> list[dict]:
    """Every row followed by its `more` further answers to the same question (`extra`, in
    row order), each marked "answer_index"."""
    extra = iter(extra)
    out = []
    for r in rows:
        out.append(r)
        keep = {k: r[k] for k in ("paraphrase_of", "restatement") if k in r}
        out += [{**next(extra), **keep, "answer_index": i} for i in range(1, more + 1)]
    return out


def _generate(model_spec, docs_spec, out: Path, cfg: GenerateConfig, max_docs: int | None,
              show_progress: bool) -> dict:
    from pdistill_jax.model.transformer import resolve_dtype
    from pdistill_jax.weights.load import decode_options, load_model

    t_start = time.perf_counter()
    # "auto" as the dtype it is here: run.json and the manifest name it, and a resume on a
    # backend where it means another dtype is refused
    cfg = dataclasses.replace(cfg, decode_dtype=resolve_dtype(cfg.decode_dtype))
    sources, tests, problems = load_documents(docs_spec)  # bad input refused before any write
    out.mkdir(parents=True, exist_ok=True)
    if max_docs is not None:
        sources = sources[:max_docs]
    if not sources:
        raise ValueError(f"--docs {docs_spec}: no usable documents"
                         + (f" ({len(problems)} problem(s), first: {problems[0]})" if problems else ""))
    check_settings(out, run_settings(str(model_spec), str(docs_spec), cfg))
    lm = load_model(model_spec, None, seed=cfg.seed, **decode_options(cfg.decode_dtype))
    docs, source_of = [], {}
    for src in sources:
        for chunk in chunk_document(src, lm.tokenizer, cfg.chunk_tokens, cfg.chunk_overlap):
            docs.append(chunk)
            source_of[chunk.id] = src.id
    if tests is not None:
        tests = tests_for(tests, sources)
    index, count = work_share()
    if index == 0:
        write_jsonl_atomic(out / DOCUMENTS_FILE, [
            {"id": d.id, "text": d.text, "title": d.title, "source_id": source_of[d.id]} for d in docs])
        if tests is not None:
            write_jsonl_atomic(out / TEST_QUESTIONS_FILE, tests)
        rows, done, _ = fold_parts(out, docs)  # an interrupted cluster run's waves, and repairs
    barrier("pdistill generate: progress repaired")
    if index != 0:
        rows, done = load_progress(out)  # repaired by process 0: only read
    fingerprint = model_fingerprint(lm.path)
    job = GenerationJob(model_spec, lm.path, docs_spec, max_docs, cfg, sources, docs, tests, problems)
    progress = Progress(rows, done, {"load_s": time.perf_counter() - t_start, "questions_s": 0.0,
                                     "answers_s": 0.0}, t_start)

    todo = [d for d in docs if d.id not in done]
    waves = [todo[w:w + cfg.docs_per_commit] for w in range(0, len(todo), cfg.docs_per_commit)]
    mine = waves[index::count]
    commit_to = out if count == 1 else out / PARTS_DIR / f"process-{index}"
    commit_to.mkdir(parents=True, exist_ok=True)
    bar = _ProgressBar(len(docs), len(docs) - len(todo), show_progress) if count == 1 else \
        _ProgressBar(sum(map(len, mine)), 0, show_progress)
    for wave_docs in mine:
        wave = _run_wave(lm, wave_docs, cfg, out / TEACHER_STATES_DIR, fingerprint, bar)
        progress.timings["questions_s"] += wave.questions_s
        progress.timings["answers_s"] += wave.answers_s
        records = wave.done_records(source_of, cfg)
        append_jsonl_durable(commit_to / QA_FILE, wave.rows)  # rows first, then the done records
        append_jsonl_durable(commit_to / DONE_FILE, records)
        bar.bar.update(len(wave.docs))
        if count == 1:
            rows += wave.rows
            done.update((r["doc_id"], r) for r in records)
            write_manifest(out, job, progress)
        else:
            check_peers()  # a failed peer ends this process after its wave, not after its share
    bar.bar.close()
    barrier("pdistill generate: waves done")
    if index != 0:
        barrier("pdistill generate: merged")  # the others end once process 0 has written it all
        manifest = out / MANIFEST_FILE
        if not manifest.exists() or not json.loads(manifest.read_text(encoding="utf-8"))["complete"]:
            raise ValueError(f"{out}: process 0 of {count} did not complete the data; its log "
                             "names why")
        return json.loads(manifest.read_text(encoding="utf-8"))
    if count > 1:
        rows, done, folded = fold_parts(out, docs)
        progress = Progress(rows, done, {
            "load_s": progress.timings["load_s"],  # the sampling seconds of every process:
            "questions_s": sum(r["wave_questions_s"] for r in _waves(folded)),
            "answers_s": sum(r["wave_answers_s"] for r in _waves(folded))}, t_start)
    try:
        if not rows:
            calls = sum(r["calls"] for r in done.values())
            _discard(out, (*OUTPUT_FILES, DATASET_DIR, TEACHER_STATES_DIR), drop_if_empty=True)
            raise ValueError(f"{docs_spec}: generation yielded 0 Q&A rows: {calls} question calls "
                             f"on {len(docs)} document(s) wrote no question the parser accepts; try "
                             f"a larger max_question_tokens (now {cfg.max_question_tokens}) or "
                             f"another q_temperature (now {cfg.q_temperature:g})")
        save_dataset(out / DATASET_DIR, rows)
        return write_manifest(out, job, progress)
    finally:
        barrier("pdistill generate: merged")


def _waves(records: list[dict]) -> list[dict]:
    """One done record per wave (a wave's timings are on each of its documents' records)."""
    return list({r["wave"]: r for r in records}.values())


def fold_parts(out: Path, docs: list[Document]) -> tuple[list[dict], dict[str, dict], list[dict]]:
    """Folds the parts of a cluster run into `out`'s qa.jsonl and done.jsonl (rows in document
    order, as one process writes them), repairing torn lines first; returns (every qa row, every
    done record by document id, the records folded in). Killed midway, a rerun folds again: a
    part's document already in done.jsonl is skipped."""
    rows, done = load_progress(out)
    parts = out / PARTS_DIR
    if not parts.is_dir():
        return rows, done, []
    position = {d.id: i for i, d in enumerate(docs)}
    new_rows, new_records = [], []
    for part in sorted(p for p in parts.iterdir() if p.is_dir()):
        part_rows, part_done = load_progress(part)
        new_rows += [r for r in part_rows if r["doc_id"] not in done]
        new_records += [r for r in part_done.values() if r["doc_id"] not in done]
    # A document of no wave of this run (a smaller --max-docs than the interrupted run's) last.
    order = lambda r: position.get(r["doc_id"], len(position))  # noqa: E731
    new_rows.sort(key=order)  # stable: a document's rows keep their order
    new_records.sort(key=order)
    append_jsonl_durable(out / QA_FILE, new_rows)  # rows first, then the done records
    append_jsonl_durable(out / DONE_FILE, new_records)
    shutil.rmtree(parts)
    return rows + new_rows, {**done, **{r["doc_id"]: r for r in new_records}}, new_records
