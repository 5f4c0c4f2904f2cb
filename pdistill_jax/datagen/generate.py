"""Training data for prompt distillation: documents -> model-written questions -> teacher answers.

For a wave of documents (`docs_per_commit` at a time) the question prompts of all of them go
through the batched sampler together, round after round, until every document has its quota of
distinct questions or has used `max_calls_per_doc` calls; then the teacher (the base model with
the document in its prompt) answers every question twice: at `a_temperature` (`answer`, the
prefix on which prompt distillation compares teacher and student) and at `sft_temperature`
(`sft_answer`, the target of the SFT baseline). The wave's rows are then committed.

Output folder:
  qa.jsonl              {"doc_id", "document", "question", "answer", "sft_answer",
                         "answer_finished", "sft_finished"} (finished=False: cut at max tokens)
  done.jsonl            one line per finished document: its question statistics (resume record)
  dataset/              the same rows as a `datasets` Dataset (save_to_disk), rebuilt every run
  documents.jsonl       the documents used, after chunking (with their source document id)
  test_questions.jsonl  when the documents came with test questions (hf: datasets)
  manifest.json         model, prompts, settings, counts, parse yield, per-document stats, timings
  run.json              the settings the folder was started with (a rerun must match them)
  teacher_states/       per wave, the teacher's final hidden states at every PD answer position
                        (computed while sampling the answers; PD training reuses them instead of
                        running the teacher again; at most teacher_states_gb)

Resume: a wave's rows are appended to qa.jsonl and fsync'ed before its documents' lines are
appended to done.jsonl, so a kill loses at most the wave in flight; on restart a torn last line
is dropped and qa rows of documents without a done line are removed. Every sampler call's seed
is derived from (seed, stage, the wave's document ids, round), and a resumed run rebuilds the
same waves, so it writes what the uninterrupted run would have written.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from pdistill_jax.config import GenerateConfig, to_dict
from pdistill_jax.train.batches import resolve_data_file
from pdistill_jax.datagen.documents import Document, chunk_document, load_documents
from pdistill_jax.files import append_jsonl_durable, read_committed_jsonl, write_jsonl_atomic, write_text_atomic
from pdistill_jax.datagen.questions import QUESTION_INSTRUCTION, normalize_question, parse_questions, question_prompt
from pdistill_jax.weights.tokenizer import DOC_SEPARATOR, chat_prompt_ids, end_token_ids

QA_FIELDS = ("doc_id", "document", "question", "answer", "sft_answer", "answer_finished",
             "sft_finished")
# Sizes a document's first round of calls; SmolLM2-135M at T=1.0 parsed 2.3-2.9 questions a call.
EXPECTED_QUESTIONS_PER_CALL = 2.5


# Settings that may differ between a run and its resumption (they do not change the data's meaning).
_RESUMABLE_CHANGES = ("batch_size", "teacher_states_gb")


def teacher_message(document: str, question: str) -> str:
    """The teacher's user message: the document, a separator, the question (the paper's layout)."""
    return f"{document}{DOC_SEPARATOR}{question}"


def derive_seed(*parts) -> int:
    """A 31-bit seed from any JSON-able parts (stable across runs and machines)."""
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True).encode("utf-8")).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


@dataclasses.dataclass
class DocQuestions:
    """Question-stage state and statistics of one document."""

    doc_id: str
    questions: list[str] = dataclasses.field(default_factory=list)
    seen: set[str] = dataclasses.field(default_factory=set)
    parsed_per_call: list[int] = dataclasses.field(default_factory=list)  # what the parser kept
    new_per_call: list[int] = dataclasses.field(default_factory=list)  # ... and was not a repeat

    @property
    def calls(self) -> int:
        return len(self.parsed_per_call)

    def add(self, questions: list[str]) -> None:
        new = [q for q in questions if normalize_question(q) not in self.seen]
        self.seen.update(normalize_question(q) for q in new)
        self.questions.extend(new)
        self.parsed_per_call.append(len(questions))
        self.new_per_call.append(len(new))


def ask_questions(model, tokenizer, end_ids: Sequence[int], docs: Sequence[Document],
                  cfg: GenerateConfig, seed: int,
                  on_batch: Callable[[str, int, int], None] | None = None) -> dict[str, DocQuestions]:
    """Distinct questions for each document, written by the model itself.

    Each round asks every unfinished document for about as many calls as its yield so far says
    it still needs; the calls of all documents share the sampler's batches.
    """
    from pdistill_jax.model.sampler import generate
    from pdistill_jax.config import SamplingParams

    state = {d.id: DocQuestions(d.id) for d in docs}
    prompt_text = {d.id: question_prompt(d.text) for d in docs}
    prompt_ids = {d.id: chat_prompt_ids(tokenizer, prompt_text[d.id], cfg.system) for d in docs}
    params = SamplingParams(cfg.q_temperature, cfg.q_top_k, 1.0, cfg.max_question_tokens)
    active = list(docs)
    rnd = 0
    while active:
        calls: list[Document] = []
        for d in active:
            s = state[d.id]
            need = cfg.questions_per_doc - len(s.questions)
            per_call = max(0.5, sum(s.new_per_call) / s.calls) if s.calls else EXPECTED_QUESTIONS_PER_CALL
            calls += [d] * min(cfg.max_calls_per_doc - s.calls, max(1, math.ceil(need / per_call)))
        calls = _fill_last_batch(calls, active, state, cfg)
        done_rows = 0

        def progress(n, total=len(calls)):
            nonlocal done_rows
            done_rows += n
            if on_batch:
                on_batch(f"questions r{rnd}", done_rows, total)

        outs = generate(model, [prompt_ids[d.id] for d in calls], params, end_ids=end_ids,
                        seed=derive_seed(seed, "questions", rnd), batch_size=cfg.batch_size,
                        progress=progress)
        for d, out in zip(calls, outs):
            text = tokenizer.decode(out.tokens, skip_special_tokens=True)
            state[d.id].add(parse_questions(text, d.text, prompt_text[d.id]))
        active = [d for d in active if len(state[d.id].questions) < cfg.questions_per_doc
                  and state[d.id].calls < cfg.max_calls_per_doc]
        rnd += 1
    for s in state.values():  # a round may overshoot the quota; keep the earliest questions
        del s.questions[cfg.questions_per_doc:]
    return state


def _fill_last_batch(calls: list[Document], active: list[Document],
                     state: dict[str, DocQuestions], cfg: GenerateConfig) -> list[Document]:
    """Extra calls for the active documents, round-robin, up to a whole number of batches.

    The sampler runs fixed-shape batches, so the empty rows of a last partial batch cost as much
    as real ones: spending them on more calls makes a further round less likely, for free.
    """
    count = {d.id: 0 for d in active}
    for d in calls:
        count[d.id] += 1
    room = -len(calls) % cfg.batch_size
    extra: list[Document] = []
    while room:
        added = False
        for d in active:
            if room and state[d.id].calls + count[d.id] < cfg.max_calls_per_doc:
                count[d.id] += 1
                extra.append(d)
                room -= 1
                added = True
        if not added:
            break
    order = {d.id: i for i, d in enumerate(active)}
    return sorted(calls + extra, key=lambda d: order[d.id])  # a document's calls stay together


def answer_questions(model, tokenizer, end_ids: Sequence[int],
                     items: Sequence[tuple[Document, str]], cfg: GenerateConfig, seed: int,
                     on_batch: Callable[[str, int, int], None] | None = None,
                     on_teacher_state: Callable[[list[int], np.ndarray], None] | None = None
                     ) -> list[dict]:
    """qa rows: the teacher's answers to (document, question) pairs, at the PD and SFT temperatures.

    on_teacher_state(teacher ids, hidden states) is called for every PD answer with the whole
    teacher sequence (prompt + answer ids, no end token) and the final hidden states the answer
    and its end were predicted from, (answer ids + 1, D): what PD training's teacher computes.
    """
    from pdistill_jax.model.sampler import generate
    from pdistill_jax.config import SamplingParams

    if not items:
        return []
    prompts = [chat_prompt_ids(tokenizer, teacher_message(d.text, q), cfg.system) for d, q in items]
    n = len(prompts)
    # At one temperature a single answer serves both objectives (PD and SFT then train on the
    # same text); otherwise the PD answer (hot) and the SFT answer (cold) continue the same
    # teacher prompt, asked together so that the sampler prefills the prompt once for both.
    shared = cfg.a_temperature == cfg.sft_temperature
    temperatures = [cfg.a_temperature] * n + ([] if shared else [cfg.sft_temperature] * n)
    done_rows = 0

    def progress(rows):
        nonlocal done_rows
        done_rows += rows
        if on_batch:
            on_batch("answers", done_rows, len(temperatures))

    outs = generate(model, prompts if shared else prompts + prompts,
                    SamplingParams(cfg.a_temperature, cfg.a_top_k, 1.0, cfg.max_answer_tokens),
                    end_ids=end_ids, seed=derive_seed(seed, "answers"), batch_size=cfg.batch_size,
                    temperatures=temperatures, keep_hidden=on_teacher_state is not None,
                    progress=progress)
    if on_teacher_state is not None:
        for prompt, pd in zip(prompts, outs[:n]):
            on_teacher_state(prompt + pd.tokens, pd.hidden)
    rows = []
    for (doc, question), pd, sft in zip(items, outs[:n], outs[n:] if not shared else outs):
        rows.append({
            "doc_id": doc.id, "document": doc.text, "question": question,
            "answer": tokenizer.decode(pd.tokens, skip_special_tokens=True).strip(),
            "sft_answer": tokenizer.decode(sft.tokens, skip_special_tokens=True).strip(),
            "answer_finished": pd.finished, "sft_finished": sft.finished,
        })
    return rows


# ---------------------------------------------------------------- the committed state of a run

def load_progress(out: Path) -> tuple[list[dict], dict[str, dict]]:
    """(qa rows, done records by doc id) of an output folder, repaired after a kill."""
    done = {r["doc_id"]: r for r in read_committed_jsonl(out / "done.jsonl")}
    qa_path = out / "qa.jsonl"
    rows = read_committed_jsonl(qa_path)
    kept = [r for r in rows if r.get("doc_id") in done]
    if len(kept) != len(rows):  # rows of a wave whose done lines never landed: redo that wave
        write_jsonl_atomic(qa_path, kept)
    counts: dict[str, int] = {}
    for r in kept:
        counts[r["doc_id"]] = counts.get(r["doc_id"], 0) + 1
    for doc_id, rec in done.items():
        if counts.get(doc_id, 0) != rec["rows"]:
            raise ValueError(f"{qa_path}: document {doc_id!r} has {counts.get(doc_id, 0)} rows but "
                             f"done.jsonl records {rec['rows']}; the folder was edited by hand — "
                             f"use a new --out")
    return kept, done


def check_settings(out: Path, settings: dict) -> None:
    """A rerun must use the settings the folder was started with (batch size excepted)."""
    path = out / "run.json"
    if not path.exists():
        write_text_atomic(path, json.dumps(settings, indent=2, ensure_ascii=False) + "\n")
        return
    old = json.loads(path.read_text(encoding="utf-8"))
    keys = sorted(set(old) | set(settings))
    diff = [k for k in keys if old.get(k) != settings.get(k)]
    if diff:
        details = "; ".join(f"{k}: {old.get(k)!r} -> {settings.get(k)!r}" for k in diff)
        raise ValueError(f"{out} was generated with other settings ({details}); rerun with the "
                         f"same settings to resume, or choose a new --out")


def _settings(model_spec: str, docs_spec: str, cfg: GenerateConfig) -> dict:
    config = {k: v for k, v in to_dict(cfg).items() if k not in _RESUMABLE_CHANGES}
    return {"model": str(model_spec), "docs": str(docs_spec), "config": config}


def save_dataset(path: Path, rows: list[dict]) -> None:
    """rows as a `datasets` Dataset at `path`, replacing any previous one."""
    from datasets import Dataset, Features, Value

    features = Features({k: Value("bool" if k.endswith("_finished") else "string") for k in QA_FIELDS})
    ds = Dataset.from_dict({k: [r[k] for r in rows] for k in QA_FIELDS}, features=features)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.new."))
    ds.save_to_disk(str(tmp))
    old = path.parent / f".{path.name}.old"
    if old.exists():
        shutil.rmtree(old)
    if path.exists():
        path.rename(old)  # directories cannot be replaced in one rename; this is two, then cleanup
    tmp.rename(path)
    shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------- the pipeline

def tests_for(tests: list[dict], sources: list[Document]) -> list[dict]:
    """Test questions whose documents (all of them, for multi-hop) are in the corpus used."""
    ids = {s.id for s in sources}
    return [t for t in tests if all(i in ids for i in t.get("doc_ids", [t["doc_id"]]))]


# What generate writes at the top of its output folder (a --docs input there must not be one).
OUTPUT_FILES = ("qa.jsonl", "done.jsonl", "documents.jsonl", "test_questions.jsonl",
                "manifest.json", "run.json")


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
        return _generate_data(model_spec, docs_spec, out, cfg, max_docs, show_progress)
    except BaseException:
        _remove_unstarted(out, before)
        raise


def _remove_unstarted(out: Path, before: set[str] | None) -> None:
    """Removes what a failed call created in `out`, unless `out` holds a committed document
    (then it is a run to resume). before: the names `out` held when the call started, None if
    it did not exist."""
    done = out / "done.jsonl"
    if not out.is_dir() or (done.exists() and done.stat().st_size > 0):
        return
    if before is None:
        shutil.rmtree(out, ignore_errors=True)
        return
    for name in set(os.listdir(out)) - before:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def _generate_data(model_spec, docs_spec, out: Path, cfg: GenerateConfig, max_docs: int | None,
                   show_progress: bool) -> dict:
    from tqdm import tqdm

    from pdistill_jax.weights.load import load_model
    from pdistill_jax.train.teacher_cache import (TEACHER_STATES_DIR, model_fingerprint, save_teacher_states,
                                teacher_sequence_key)

    t_start = time.perf_counter()
    sources, tests, problems = load_documents(docs_spec)  # bad input refused before any write
    out.mkdir(parents=True, exist_ok=True)
    if max_docs is not None:
        sources = sources[:max_docs]
    if not sources:
        raise ValueError(f"--docs {docs_spec}: no usable documents"
                         + (f" ({len(problems)} problem(s), first: {problems[0]})" if problems else ""))
    check_settings(out, _settings(str(model_spec), str(docs_spec), cfg))
    lm = load_model(model_spec, None, seed=cfg.seed)
    tok, end_ids = lm.tokenizer, end_token_ids(lm.tokenizer, lm.cfg)
    docs, source_of = [], {}
    for src in sources:
        for chunk in chunk_document(src, tok, cfg.chunk_tokens, cfg.chunk_overlap):
            docs.append(chunk)
            source_of[chunk.id] = src.id
    write_jsonl_atomic(out / "documents.jsonl", [
        {"id": d.id, "text": d.text, "title": d.title, "source_id": source_of[d.id]} for d in docs])
    if tests is not None:
        tests = tests_for(tests, sources)
        write_jsonl_atomic(out / "test_questions.jsonl", tests)
    rows, done = load_progress(out)
    fingerprint = model_fingerprint(lm.path)
    t_loaded = time.perf_counter()

    todo = [d for d in docs if d.id not in done]
    timings = {"load_s": t_loaded - t_start, "questions_s": 0.0, "answers_s": 0.0}
    new_questions = 0
    bar = tqdm(total=len(docs), initial=len(docs) - len(todo), unit="doc", desc="generate",
               file=sys.stderr, disable=not show_progress, dynamic_ncols=True)

    def on_batch(stage: str, done_rows: int, total: int) -> None:
        elapsed = max(time.perf_counter() - t_loaded, 1e-9)
        bar.set_postfix_str(f"{stage} {done_rows}/{total} | {new_questions} questions, "
                            f"{new_questions / elapsed:.2f} q/s", refresh=True)

    for w in range(0, len(todo), cfg.docs_per_commit):
        wave = todo[w:w + cfg.docs_per_commit]
        wave_seed = derive_seed(cfg.seed, [d.id for d in wave])
        t0 = time.perf_counter()
        asked = ask_questions(lm.model, tok, end_ids, wave, cfg, wave_seed, on_batch)
        t1 = time.perf_counter()
        items = [(d, q) for d in wave for q in asked[d.id].questions]
        new_questions += len(items)
        states: dict[str, np.ndarray] = {}
        keep = _states_bytes(out / TEACHER_STATES_DIR) < cfg.teacher_states_gb * 2**30

        def on_teacher_state(ids, hidden):
            states[teacher_sequence_key(fingerprint, hidden.dtype, ids)] = hidden

        wave_rows = answer_questions(lm.model, tok, end_ids, items, cfg, wave_seed, on_batch,
                                     on_teacher_state if keep else None)
        if states:  # before the rows: a committed row's states are on disk
            save_teacher_states(out / TEACHER_STATES_DIR / f"wave-{wave_seed}.npz", states)
        t2 = time.perf_counter()
        timings["questions_s"] += t1 - t0
        timings["answers_s"] += t2 - t1
        records = [{
            "doc_id": d.id, "source_id": source_of[d.id], "rows": len(asked[d.id].questions),
            "questions": len(asked[d.id].questions), "calls": asked[d.id].calls,
            "parsed_per_call": asked[d.id].parsed_per_call,
            "new_per_call": asked[d.id].new_per_call,
            "gave_up": len(asked[d.id].questions) < cfg.questions_per_doc,
            "wave": wave_seed, "wave_questions_s": round(t1 - t0, 3),
            "wave_answers_s": round(t2 - t1, 3),
        } for d in wave]
        append_jsonl_durable(out / "qa.jsonl", wave_rows)  # rows first, then the done records
        append_jsonl_durable(out / "done.jsonl", records)
        rows += wave_rows
        done.update((r["doc_id"], r) for r in records)
        bar.update(len(wave))
        write_manifest(out, model_spec, lm.path, docs_spec, max_docs, cfg, docs, sources, tests,
                       problems, done, rows, timings, t_start)
    bar.close()
    if not rows:
        calls = sum(r["calls"] for r in done.values())
        _discard_generation(out)
        raise ValueError(f"{docs_spec}: generation yielded 0 Q&A rows: {calls} question calls on "
                         f"{len(docs)} document(s) wrote no question the parser accepts; try a "
                         f"larger max_question_tokens (now {cfg.max_question_tokens}) or another "
                         f"q_temperature (now {cfg.q_temperature:g})")
    save_dataset(out / "dataset", rows)
    return write_manifest(out, model_spec, lm.path, docs_spec, max_docs, cfg, docs, sources, tests,
                          problems, done, rows, timings, t_start)


def _discard_generation(out: Path) -> None:
    """Deletes what generation wrote into `out` (and `out` if that leaves it empty): a folder of
    0 rows would only pass for finished data, or block a retry with other settings."""
    from pdistill_jax.train.teacher_cache import TEACHER_STATES_DIR

    for name in ("qa.jsonl", "done.jsonl", "manifest.json", "run.json", "documents.jsonl",
                 "test_questions.jsonl"):
        (out / name).unlink(missing_ok=True)
    for name in ("dataset", TEACHER_STATES_DIR):
        shutil.rmtree(out / name, ignore_errors=True)
    if not any(out.iterdir()):
        out.rmdir()


def _states_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.npz"))


def generation_system_message(data) -> str | None:
    """The system message training data was generated under (the manifest beside its qa.jsonl,
    found as training finds the teacher's states), None for the chat template's default or for
    data that `pdistill generate` did not write."""
    manifest = resolve_data_file(data).parent / "manifest.json"
    if not manifest.is_file():
        return None
    return (json.loads(manifest.read_text()).get("config") or {}).get("system")


def write_manifest(out: Path, model_spec, model_path, docs_spec, max_docs, cfg: GenerateConfig,
                   docs: list[Document], sources: list[Document], tests: list[dict] | None,
                   problems: list[str], done: dict[str, dict], rows: list[dict],
                   timings: dict, t_start: float) -> dict:
    per_doc = [done[d.id] for d in docs if d.id in done]
    parsed = [n for r in per_doc for n in r["parsed_per_call"]]
    new = [n for r in per_doc for n in r["new_per_call"]]
    waves = {r["wave"]: r for r in per_doc}.values()
    all_q = sum(r["wave_questions_s"] for r in waves)
    all_a = sum(r["wave_answers_s"] for r in waves)
    manifest = {
        "model": str(model_spec), "model_path": str(model_path),
        "docs": str(docs_spec), "max_docs": max_docs,
        "config": to_dict(cfg),
        "prompts": {
            "system": cfg.system,
            "question_user": question_prompt("{document}"),
            "question_instruction": QUESTION_INSTRUCTION,
            "answer_user": teacher_message("{document}", "{question}"),
        },
        "complete": len(per_doc) == len(docs),
        "counts": {
            "source_documents": len(sources), "documents": len(docs),
            "documents_done": len(per_doc),
            "documents_with_questions": sum(r["questions"] > 0 for r in per_doc),
            "documents_short_of_quota": sum(r["gave_up"] for r in per_doc),
            "question_calls": len(parsed), "questions_parsed": sum(parsed),
            "questions": sum(r["questions"] for r in per_doc), "rows": len(rows),
            "answers_truncated": sum(not r["answer_finished"] for r in rows),
            "sft_answers_truncated": sum(not r["sft_finished"] for r in rows),
            "test_questions": None if tests is None else len(tests),
            "load_problems": len(problems),
        },
        "parse_yield": {
            "parsed_per_call": sum(parsed) / len(parsed) if parsed else 0.0,
            "new_per_call": sum(new) / len(new) if new else 0.0,
            "calls_without_question": sum(n == 0 for n in parsed) / len(parsed) if parsed else 0.0,
        },
        "timings": {
            "this_run": {**{k: round(v, 3) for k, v in timings.items()},
                         "total_s": round(time.perf_counter() - t_start, 3)},
            "all_runs": {"questions_s": round(all_q, 3), "answers_s": round(all_a, 3),
                         "rows_per_minute": round(60 * len(rows) / (all_q + all_a), 2)
                         if all_q + all_a > 0 else None},
        },
        "per_doc": [{k: r[k] for k in ("doc_id", "source_id", "questions", "calls",
                                       "parsed_per_call", "new_per_call", "gave_up")}
                    for r in per_doc],
        "problems": problems,
    }
    write_text_atomic(out / "manifest.json", json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    return manifest
