"""manifest.json of a generation: model, prompts, settings, counts, parse yield, per-document
statistics and timings, rewritten after every committed wave."""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from pdistill_jax.config import GenerateConfig, to_dict
from pdistill_jax.datagen.answers import teacher_message
from pdistill_jax.datagen.dataset import MANIFEST_FILE
from pdistill_jax.datagen.documents import Document
from pdistill_jax.datagen.paraphrases import paraphrase_prompt
from pdistill_jax.datagen.restatements import RECITATION_REQUESTS, RESTATEMENT_REQUESTS
from pdistill_jax.datagen.questions import QUESTION_INSTRUCTION, SPAN_INSTRUCTIONS, question_prompt
from pdistill_jax.files import write_text_atomic


@dataclasses.dataclass(frozen=True)
class GenerationJob:
    """What a generation was asked to do, as the manifest reports it."""

    model_spec: str
    model_path: Path  # the resolved weights
    docs_spec: str
    max_docs: int | None
    cfg: GenerateConfig
    sources: list[Document]  # the documents loaded
    docs: list[Document]  # ... after chunking: what questions are asked about
    tests: list[dict] | None  # test questions that came with the documents
    problems: list[str]  # rows of the documents' source that were skipped


@dataclasses.dataclass
class Progress:
    """What a generation has made so far."""

    rows: list[dict]  # qa rows committed
    done: dict[str, dict]  # done.jsonl records by document id
    timings: dict[str, float]  # this call's seconds: load_s, questions_s, answers_s
    t_start: float  # time.perf_counter() when this call started


def write_manifest(out: Path, job: GenerationJob, progress: Progress) -> dict:
    """Writes `out`/manifest.json; returns it."""
    cfg, docs, rows, done = job.cfg, job.docs, progress.rows, progress.done
    per_doc = [done[d.id] for d in docs if d.id in done]
    parsed = [n for r in per_doc for n in r["parsed_per_call"]]
    new = [n for r in per_doc for n in r["new_per_call"]]
    waves = {r["wave"]: r for r in per_doc}.values()
    all_q = sum(r["wave_questions_s"] for r in waves)
    all_a = sum(r["wave_answers_s"] for r in waves)
    manifest = {
        "model": str(job.model_spec), "model_path": str(job.model_path),
        "docs": str(job.docs_spec), "max_docs": job.max_docs,
        "config": to_dict(cfg),
        "prompts": {
            "system": cfg.system,
            "question_user": question_prompt("{document}"),
            "question_instruction": QUESTION_INSTRUCTION,
            "answer_user": teacher_message(
                "{document}\n\n{the question's best-matching sentences}"
                if cfg.relevant_sentences else "{document}", "{question}"),
        },
        "complete": len(per_doc) == len(docs),
        "counts": {
            "source_documents": len(job.sources), "documents": len(docs),
            "documents_done": len(per_doc),
            "documents_with_questions": sum(r["questions"] > 0 for r in per_doc),
            "documents_short_of_quota": sum(r["gave_up"] for r in per_doc),
            "question_calls": len(parsed), "questions_parsed": sum(parsed),
            "questions": sum(r["questions"] for r in per_doc), "rows": len(rows),
            "answers_truncated": sum(not r["answer_finished"] for r in rows),
            "sft_answers_truncated": sum(not r["sft_finished"] for r in rows),
            "test_questions": None if job.tests is None else len(job.tests),
            "load_problems": len(job.problems),
        },
        "parse_yield": {
            "parsed_per_call": sum(parsed) / len(parsed) if parsed else 0.0,
            "new_per_call": sum(new) / len(new) if new else 0.0,
            "calls_without_question": sum(n == 0 for n in parsed) / len(parsed) if parsed else 0.0,
        },
        "timings": {
            "this_run": {**{k: round(v, 3) for k, v in progress.timings.items()},
                         "total_s": round(time.perf_counter() - progress.t_start, 3)},
            "all_runs": {"questions_s": round(all_q, 3), "answers_s": round(all_a, 3),
                         "rows_per_minute": round(60 * len(rows) / (all_q + all_a), 2)
                         if all_q + all_a > 0 else None},
        },
        "per_doc": [{k: r[k] for k in ("doc_id", "source_id", "questions", "calls",
                                       "parsed_per_call", "new_per_call", "gave_up",
                                       *LEVER_RECORD_FIELDS) if k in r}
                    for r in per_doc],
        "problems": job.problems,
    }
    _add_levers(manifest, cfg, per_doc)
    write_text_atomic(out / MANIFEST_FILE, json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    return manifest


# What done.jsonl records of a document only when a lever is on, copied into per_doc.
LEVER_RECORD_FIELDS = ("quota", "span_questions", "paraphrase_calls", "paraphrases_parsed",
                       "paraphrases", "restatements", "recitations")


def _add_levers(manifest: dict, cfg: GenerateConfig, per_doc: list[dict]) -> None:
    """The prompts and counts of the levers that are on (none: the manifest of before)."""
    prompts, counts = manifest["prompts"], manifest["counts"]
    if cfg.question_mode == "sentences":
        prompts["span_user"] = {direction: "{document}\n\n" + ask
                                for direction, ask in SPAN_INSTRUCTIONS.items()}
        counts["spans"] = sum(len(r["span_questions"]) for r in per_doc)
        counts["spans_without_question"] = sum(n == 0 for r in per_doc for n in r["span_questions"])
        counts["question_quota"] = sum(r["quota"] for r in per_doc)
    if cfg.restatements_per_doc:
        prompts["restatement_user"] = list(RESTATEMENT_REQUESTS[:cfg.restatements_per_doc])
        counts["restatements"] = sum(r["restatements"] for r in per_doc)
    if cfg.recitations_per_doc:
        prompts["recitation_user"] = list(RECITATION_REQUESTS[:cfg.recitations_per_doc])
        counts["recitations"] = sum(r["recitations"] for r in per_doc)
    if cfg.answers_per_question > 1:
        counts["further_answers"] = counts["rows"] - counts["rows"] // cfg.answers_per_question
    if cfg.paraphrases_per_question:
        prompts["paraphrase_user"] = paraphrase_prompt("{question}", cfg.paraphrases_per_question)
        counts["paraphrases_asked"] = cfg.paraphrases_per_question * counts["questions"]
        counts["paraphrase_calls"] = sum(r["paraphrase_calls"] for r in per_doc)
        counts["paraphrases_parsed"] = sum(r["paraphrases_parsed"] for r in per_doc)
        counts["paraphrases_kept"] = sum(r["paraphrases"] for r in per_doc)
