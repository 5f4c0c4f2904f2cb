"""Answering questions: closed-book, with the gold document, or with BM25-retrieved documents.

With a document the prompt is the teacher's layout, `{document}\\n\\n---\\n\\n{question}`, so RAG,
PD+RAG and the distillation teacher all read context the same way.

`answer_to_file` is `pdistill answer`: resumable, and split over the processes of a cluster.
Every finished batch of the sampler is appended to a part file of its process under
`<out>.parts/` (process-<i>.jsonl: a first line of the settings, then one line per batch);
a rerun with the same settings skips the batches done, a rerun with other settings is refused.
The batches (`sampler.batch_rows`: the prompts sorted by content, batch_size at a time) are those
of a one-process run; the ones not yet done are dealt out, process i taking the i-th, the
(i + P)-th, ...; a row's completion depends on its batch and its row index only, so the merged
file is the one-process file. Process 0 merges the parts in question order into `out`
(atomically) once every process has passed the barrier after its share.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from pdistill_jax.config import CONTEXTS, AnswerConfig, differences, to_dict
from pdistill_jax.files import Field, Schema, append_jsonl_durable, read_committed_jsonl, write_jsonl_atomic
from pdistill_jax.retrieval import BM25Index
from pdistill_jax.model.sampler import batch_rows, generate, generate_batches
from pdistill_jax.model.sharding import barrier, check_peers, work_share
from pdistill_jax.weights.load import LoadedModel
from pdistill_jax.weights.tokenizer import DOC_SEPARATOR, chat_prompt_ids, end_token_ids, raw_prompt_ids

QUESTIONS_SCHEMA = Schema('{"question", "answers"?, "doc_id"?, "id"?} objects, one a line',
                          {"question": Field(), "answers": Field((list,), required=False),
                           "doc_id": Field((str, int), required=False),
                           "id": Field((str, int), required=False)}, unique="id")


def check_contexts(questions: Sequence[dict], docs: Sequence[dict] | None, context: str,
                   source: str = "questions", lines: Sequence[int] | None = None) -> None:
    """Refuses what `question_contexts` could not serve (cheap: run it before loading a model).
    lines: each question's line in `source`, for the messages (default: its 1-based index)."""
    if context not in CONTEXTS:
        raise ValueError(f"--context {context!r}: choose one of {', '.join(CONTEXTS)}")
    if context == "none":
        return
    if not docs:
        raise ValueError(f"--context {context} needs --docs (a .jsonl of {{\"id\", \"text\"}} rows, "
                         "a folder of .txt/.md files or an hf: dataset)")
    if context == "gold":
        ids = {str(d["id"]) for d in docs}
        for n, q in zip(lines or range(1, len(questions) + 1), questions):
            doc_id = q.get("doc_id")
            if doc_id is None:
                raise ValueError(f"{source}:{n}: --context gold needs a \"doc_id\" field")
            if str(doc_id) not in ids:
                raise ValueError(f"{source}:{n}: doc_id {doc_id!r} is not in --docs")


def question_contexts(questions: Sequence[dict], docs: Sequence[dict] | None, context: str,
                      top_k: int = 3, source: str = "questions") -> list[str | None]:
    """The context text placed before each question (None for closed-book)."""
    check_contexts(questions, docs, context, source)
    if context == "none":
        return [None] * len(questions)
    if context == "gold":
        by_id = {str(d["id"]): d["text"] for d in docs}
        return [by_id[str(q["doc_id"])] for q in questions]
    index = BM25Index([d["text"] for d in docs])
    hits = index.search([q["question"] for q in questions], top_k)
    return ["\n\n".join(docs[i]["text"] for i in row) for row in hits]


def build_prompt(tokenizer, question: str, context: str | None, prompt_format: str = "chat",
                 system: str | None = None) -> list[int]:
    user = question if context is None else context + DOC_SEPARATOR + question
    if prompt_format == "raw":
        return raw_prompt_ids(tokenizer, user)
    if prompt_format != "chat":
        raise ValueError(f"--prompt-format {prompt_format!r}: choose chat or raw")
    return chat_prompt_ids(tokenizer, user, system)


def answer_prompts(lm: LoadedModel, questions: Sequence[dict], cfg: AnswerConfig,
                   docs: Sequence[dict] | None, source: str) -> tuple[list[list[int]], list[int]]:
    """(the prompt ids of every question, the end token ids) of answering `questions`."""
    for n, q in enumerate(questions, 1):
        if not isinstance(q.get("question"), str) or not q["question"].strip():
            raise ValueError(f"{source}:{n}: missing or empty field \"question\"")
    contexts = question_contexts(questions, docs, cfg.context, cfg.top_k, source)
    prompts = [build_prompt(lm.tokenizer, q["question"], c, cfg.prompt_format, cfg.system)
               for q, c in zip(questions, contexts)]
    end = end_token_ids(lm.tokenizer, lm.cfg) if cfg.prompt_format == "chat" else \
        [lm.tokenizer.eos_token_id] if lm.tokenizer.eos_token_id is not None else []
    return prompts, end


def prediction_row(lm: LoadedModel, question: dict, tokens: Sequence[int]) -> dict:
    row = {"question": question["question"],
           "prediction": lm.tokenizer.decode(tokens, skip_special_tokens=True).strip()}
    if "doc_id" in question:
        row["doc_id"] = question["doc_id"]
    return row


def answer_questions(lm: LoadedModel, questions: Sequence[dict], cfg: AnswerConfig = AnswerConfig(),
                     *, docs: Sequence[dict] | None = None, use_lora: bool = True,
                     progress: Callable[[int], None] | None = None,
                     source: str = "questions") -> list[dict]:
    """Prediction rows {"question", "prediction", "doc_id"?} in input order. `source` names the
    questions in error messages."""
    prompts, end = answer_prompts(lm, questions, cfg, docs, source)
    completions = generate(lm.model, prompts, cfg.sampling, end_ids=end, seed=cfg.seed,
                           batch_size=cfg.batch_size, use_lora=use_lora, progress=progress)
    return [prediction_row(lm, q, c.tokens) for q, c in zip(questions, completions)]


# ---------------------------------------------------------------- resumable, over a cluster

def parts_dir(out: str | Path) -> Path:
    """Where `answer_to_file` keeps the finished batches of an unfinished `out`."""
    return Path(f"{out}.parts")


def answer_to_file(lm: LoadedModel, questions: Sequence[dict], cfg: AnswerConfig, out: str | Path,
                   *, run: dict, docs: Sequence[dict] | None = None, use_lora: bool = True,
                   show_progress: bool = True, source: str = "questions") -> int:
    """Answers `questions` into the JSONL file `out` (module doc), on this process's share of the
    batches; returns the rows this process answered. run: what else the settings must record
    (the model, the adapter named on the command line)."""
    from tqdm import tqdm

    from pdistill_jax.model.transformer import compute_dtype

    if np.dtype(lm.model.dtype) != np.dtype(compute_dtype(cfg.decode_dtype)):  # what parts record
        raise ValueError(f"decode_dtype={cfg.decode_dtype}, but the model computes in "
                         f"{np.dtype(lm.model.dtype).name}: load it with that dtype")
    index, count = work_share()
    prompts, end = answer_prompts(lm, questions, cfg, docs, source)
    plan = batch_rows(prompts, cfg.batch_size)
    settings = _settings(lm, questions, cfg, prompts, end, use_lora, run)
    parts = parts_dir(out)
    done = _read_parts(parts, settings, plan)
    barrier("pdistill answer: parts read")  # before any process appends to its part
    todo = [b for b in range(len(plan)) if b not in done]
    mine = todo[index::count]
    own = parts / f"process-{index}.jsonl"
    _open_part(own, settings)
    total = sum(len(plan[b]) for b in mine)
    where = "" if count == 1 else f" (process {index} of {count})"
    with tqdm(total=total, desc=f"answering{where}", unit="q", file=sys.stderr,
              disable=not show_progress) as bar:
        for number, rows, completions in generate_batches(
                lm.model, prompts, cfg.sampling, end_ids=end, seed=cfg.seed,
                batch_size=cfg.batch_size, use_lora=use_lora, batches=mine):
            append_jsonl_durable(own, [{"batch": number, "rows": rows, "predictions": [
                prediction_row(lm, questions[i], c.tokens) for i, c in zip(rows, completions)]}])
            bar.update(len(rows))
            check_peers()  # a failed peer ends this process after its batch, not after its share
    barrier("pdistill answer: answered")
    if index == 0:
        done = _read_parts(parts, settings, plan)
        missing = [b for b in range(len(plan)) if b not in done]
        if missing:
            raise RuntimeError(f"{parts}: batches {missing[:5]} of {len(plan)} were not written "
                               "by any process; rerun the same command to answer them")
        by_row: dict[int, dict] = {}
        for rows, predictions in done.values():
            by_row.update(zip(rows, predictions))
        write_jsonl_atomic(out, [by_row[i] for i in range(len(questions))])
        shutil.rmtree(parts)
    barrier("pdistill answer: merged")  # the others end once `out` exists
    return total


def _settings(lm: LoadedModel, questions: Sequence[dict], cfg: AnswerConfig,
              prompts: Sequence[Sequence[int]], end: Sequence[int], use_lora: bool,
              run: dict) -> dict:
    """What the answers of a part file were made with: a rerun must match it to reuse them."""
    digest = hashlib.sha256(json.dumps(
        [prompts, [[q["question"], q.get("doc_id")] for q in questions], sorted(end)]).encode())
    options = to_dict(cfg)  # flat, so that a refusal names the one option that changed
    sampling = options.pop("sampling")
    settings = {**run, "model_path": str(lm.path), **options, **sampling,
                "use_lora": use_lora, "questions": len(questions),
                "prompts_sha256": digest.hexdigest()}
    settings = json.loads(json.dumps(settings))  # as a part file's first line reads back
    if use_lora:  # the adapter's weights: a run folder trained further answers differently
        import jax
        from flax import nnx

        lora = hashlib.sha256()
        for leaf in jax.tree.leaves(nnx.state(lm.model, nnx.LoRAParam)):
            lora.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
        settings["lora_sha256"] = lora.hexdigest()
    return settings


def _read_parts(parts: Path, settings: dict, plan: list[list[int]]
                ) -> dict[int, tuple[list[int], list[dict]]]:
    """{batch number: (its rows, their predictions)} of every part file, read-only (another
    process may be appending to its own: a line after the last newline is not yet written)."""
    done: dict[int, tuple[list[int], list[dict]]] = {}
    if not parts.is_dir():
        return done
    for path in sorted(parts.glob("process-*.jsonl")):
        data = path.read_bytes()
        lines = [line for line in data[:data.rfind(b"\n") + 1].split(b"\n") if line.strip()]
        for lineno, line in enumerate(lines, 1):
            try:
                record = json.loads(line)
            except ValueError:
                raise ValueError(f"{path}:{lineno}: corrupt line; delete {parts} to answer "
                                 "every question afresh") from None
            if lineno == 1:
                if record.get("settings") != settings:
                    changed = differences(record.get("settings") or {}, settings)
                    raise ValueError(f"{parts} holds answers made with other settings "
                                     f"({'; '.join(changed)}); rerun with those to resume, or "
                                     f"delete {parts} to answer afresh")
                continue
            number, rows = record["batch"], record["rows"]
            if not 0 <= number < len(plan) or plan[number] != rows:
                raise ValueError(f"{path}:{lineno}: batch {number} does not hold the rows this "
                                 f"run gives it; delete {parts} to answer afresh")
            done[number] = (rows, record["predictions"])
    return done


def _open_part(path: Path, settings: dict) -> None:
    """This process's part file, ready for appending: a new one starts with the settings; an
    old one loses a torn last line (only its own process ever writes to it)."""
    if not (path.exists() and read_committed_jsonl(path)):
        write_jsonl_atomic(path, [{"settings": settings}])
