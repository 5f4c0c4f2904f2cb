"""The data-side levers of `pdistill generate`: fact-targeted questions (question_mode: sentences),
paraphrase augmentation (paraphrases_per_question), questions that name their document's subject
(name_the_subject), the question's best sentences again in the teacher's prompt
(relevant_sentences), further answers, restatements and recitations, each off by default.

The generation tests use a tiny model trained (test_generate.train_question_writer) to answer the
question and paraphrase prompts with numbered questions (and it answers the span prompt so too),
so the real sampler, parser and answering path produce real rows. Its "paraphrases" are other questions it learnt, kept when
they share a content word with the question they rewrite: enough to check what the stage keeps,
drops and writes, not the quality of rewrites (that is the study's to measure).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from pdistill_jax import cli
from pdistill_jax.config import GenerateConfig, to_dict
from pdistill_jax.datagen.dataset import RESUMABLE_CHANGES, read_qa_rows
from pdistill_jax.datagen.generate import generate_data
from pdistill_jax.datagen.paraphrases import paraphrase_prompt
from pdistill_jax.datagen.questions import (SPAN_INSTRUCTIONS, content_words, direction_quotas,
                                            normalize_question, parse_questions, question_prompt,
                                            sentence_spans, span_prompt, span_quotas,
                                            with_subject)
from pdistill_jax.files import read_committed_jsonl
from test_generate import TRAINED_QUESTIONS, jsonl, train_question_writer

DOCS = [  # three sentences each, in words the tiny tokenizer knows
    {"id": "tarsk", "text": "The capital of the kingdom of Velloria is Tarsk. Tarsk was founded in "
                            "1873. The quick brown fox of Tarsk jumps over the lazy dog."},
    {"id": "student", "text": "Prompt distillation in Tarsk trains a student. The student learns "
                              "to match a teacher. The teacher of Velloria sees the document."},
    {"id": "colours", "text": "Numbers and colours of Velloria: red green blue yellow. The fox of "
                              "Tarsk is red. The dog of Velloria is blue."},
]
CFG = GenerateConfig(questions_per_doc=4, max_calls_per_doc=4, max_question_tokens=48,
                     max_answer_tokens=6, batch_size=8, chunk_tokens=256, chunk_overlap=16,
                     docs_per_commit=1, seed=5)
PARAPHRASES = dataclasses.replace(CFG, paraphrases_per_question=2)
# 3 spans of one sentence x 2 questions = 6 > questions_per_doc = 4: quotas 2, 1, 1; the first
# span asks one question forward and one in reverse, the others one forward (reverse quota 0)
BOTH = dataclasses.replace(CFG, question_mode="sentences", sentences_per_prompt=1,
                           questions_per_span=2, max_calls_per_span=3, paraphrases_per_question=1)
# GenerateConfig's fields before the levers: what run.json and the manifest record by default.
FIELDS_BEFORE = ["questions_per_doc", "max_calls_per_doc", "q_temperature", "q_top_k",
                 "a_temperature", "a_top_k", "sft_temperature", "max_question_tokens",
                 "max_answer_tokens", "batch_size", "seed", "system", "chunk_tokens",
                 "chunk_overlap", "docs_per_commit", "teacher_states_gb"]
LEVER_FIELDS = ["question_mode", "sentences_per_prompt", "questions_per_span",
                "max_calls_per_span", "paraphrases_per_question", "max_paraphrase_calls",
                "answers_per_question", "restatements_per_doc", "max_restatement_tokens",
                "recitations_per_doc", "name_the_subject", "relevant_sentences"]


def writer_prompts() -> list[str]:
    """The question and paraphrase prompts. Not the span prompts: three times as long in the tiny
    tokenizer, they would triple the writer's training, and the writer answers them (the
    document, then a request) with numbered questions all the same."""
    return ([question_prompt(d["text"]) for d in DOCS]
            + [paraphrase_prompt(q, k) for q in TRAINED_QUESTIONS for k in (1, 2)])


@pytest.fixture(scope="module")
def writer(tmp_path_factory) -> Path:
    return train_question_writer(tmp_path_factory.mktemp("lever_writer"), writer_prompts())


@pytest.fixture(scope="module")
def docs_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("lever_docs") / "docs.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in DOCS), encoding="utf-8")
    return path


def _run(writer, docs_file, tmp_path_factory, cfg, name):
    out = tmp_path_factory.mktemp(name) / "data"
    return out, generate_data(writer, docs_file, out, cfg, show_progress=False)


@pytest.fixture(scope="module")
def default_run(writer, docs_file, tmp_path_factory):
    return _run(writer, docs_file, tmp_path_factory, CFG, "default")


@pytest.fixture(scope="module")
def paraphrase_run(writer, docs_file, tmp_path_factory):
    return _run(writer, docs_file, tmp_path_factory, PARAPHRASES, "paraphrases")


@pytest.fixture(scope="module")
def both_run(writer, docs_file, tmp_path_factory):
    """The run with both levers, and the user messages of every question call it made."""
    import pdistill_jax.model.sampler as sampler
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(writer))
    real, prompts = sampler.generate, []

    def recording(model, prompt_ids, *args, **kwargs):  # the real sampler, its prompts noted
        prompts.extend(tokenizer.decode(ids) for ids in prompt_ids)
        return real(model, prompt_ids, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sampler, "generate", recording)
        out, manifest = _run(writer, docs_file, tmp_path_factory, BOTH, "both")
    return out, manifest, prompts


def untimed(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.endswith("_s")} for r in records]


# ---------------------------------------------------------------- prompts and spans

def test_spans_cover_the_document_and_quotas_follow_the_rule():
    text = DOCS[0]["text"]
    assert sentence_spans(text, 1) == ["The capital of the kingdom of Velloria is Tarsk.",
                                       "Tarsk was founded in 1873.",
                                       "The quick brown fox of Tarsk jumps over the lazy dog."]
    assert sentence_spans(text, 2) == [" ".join(sentence_spans(text, 1)[:2]),
                                       sentence_spans(text, 1)[2]]
    cfg = GenerateConfig(questions_per_doc=30, questions_per_span=2)
    assert span_quotas(4, cfg) == [2, 2, 2, 2]  # spans x questions_per_span, under the cap
    assert span_quotas(3, dataclasses.replace(cfg, questions_per_doc=4)) == [2, 1, 1]
    assert span_quotas(5, dataclasses.replace(cfg, questions_per_doc=3)) == [1, 1, 1, 0, 0]
    forward = span_prompt(text, "Tarsk was founded in 1873.", 2)
    reverse = span_prompt(text, "Tarsk was founded in 1873.", 2, "reverse")
    for prompt in (forward, reverse):
        assert prompt.startswith(text + "\n\n")  # the document first: a prefix per document
        assert 'The text says: "Tarsk was founded in 1873."\nWrite two questions' in prompt
    assert "Write one question that" in span_prompt(text, "x", 1)
    assert "asks which person, place or thing it belongs to" in reverse
    assert "belongs to" not in forward
    assert direction_quotas(3) == {"forward": 2, "reverse": 1}
    assert direction_quotas(1) == {"forward": 1, "reverse": 0}
    # the parser keeps a question about the span, not one about another sentence
    completion = "1. When was Tarsk founded?\n2. Which animal jumps over the lazy dog?"
    assert parse_questions(completion, "Tarsk was founded in 1873.", forward) == \
        ["When was Tarsk founded?"]
    assert paraphrase_prompt("When was Tarsk founded?", 2) == (
        "Question: When was Tarsk founded?\n\n"
        "Write two other ways to ask the same question, one per line.")


# ---------------------------------------------------------------- paraphrases

def test_paraphrases_follow_their_question_and_leave_its_row_alone(paraphrase_run, default_run):
    out, manifest = paraphrase_run
    rows = jsonl(out / "qa.jsonl")
    originals = [r for r in rows if "paraphrase_of" not in r]
    rewrites = [r for r in rows if "paraphrase_of" in r]
    assert rewrites, "the writer should produce some rewrites that are kept"
    # the originals' rows are those of the run without paraphrases, byte for byte
    assert originals == jsonl(default_run[0] / "qa.jsonl")
    last_original = None
    for r in rows:  # each rewrite right after its question's row (or a sibling rewrite's)
        if "paraphrase_of" not in r:
            last_original = r
            continue
        assert r["paraphrase_of"] == last_original["question"]
        assert r["doc_id"] == last_original["doc_id"] and r["document"] == last_original["document"]
        assert r["question"].endswith("?") and r["answer"] is not None
        assert content_words(r["question"]) & content_words(r["paraphrase_of"])
    for d in DOCS:
        mine = [r for r in rows if r["doc_id"] == d["id"]]
        keys = [normalize_question(r["question"]) for r in mine]
        assert len(keys) == len(set(keys)), "a rewrite repeats a question of its document"
        for q in (r["question"] for r in mine if "paraphrase_of" not in r):
            assert sum(r.get("paraphrase_of") == q for r in mine) <= 2
    counts = manifest["counts"]
    assert counts["rows"] == len(rows) == counts["questions"] + counts["paraphrases_kept"]
    assert counts["paraphrases_kept"] == len(rewrites)
    assert counts["paraphrases_asked"] == 2 * counts["questions"] == 2 * len(originals)
    assert counts["questions"] <= counts["paraphrase_calls"] <= 2 * counts["questions"]
    assert counts["paraphrases_kept"] <= counts["paraphrases_parsed"]
    assert manifest["prompts"]["paraphrase_user"] == paraphrase_prompt("{question}", 2)
    assert manifest["config"]["paraphrases_per_question"] == 2
    per_doc = {p["doc_id"]: p for p in manifest["per_doc"]}
    for rec in jsonl(out / "done.jsonl"):
        assert rec["rows"] == sum(r["doc_id"] == rec["doc_id"] for r in rows)
        assert rec["paraphrases"] == per_doc[rec["doc_id"]]["paraphrases"] == sum(
            r["doc_id"] == rec["doc_id"] for r in rewrites)
    # training reads the field; the dataset has the column, None on the originals' rows
    assert [r.paraphrase_of for r in read_qa_rows(out)] == [r.get("paraphrase_of") for r in rows]
    from datasets import load_from_disk

    ds = load_from_disk(str(out / "dataset"))
    assert ds.to_list() == [{**r, "paraphrase_of": r.get("paraphrase_of")} for r in rows]


def test_a_question_is_asked_about_its_subject_unless_it_names_it():
    bridge = "Velloran Glass Bridge"
    assert with_subject("When was the Velloran glass bridge completed?", bridge) == \
        "When was the Velloran glass bridge completed?"
    assert with_subject("When was the bridge completed?", bridge) == \
        "About Velloran Glass Bridge: When was the bridge completed?"
    assert with_subject("Who sailed the Glass Bridges?", bridge).startswith("About ")  # not the name
    schooner = "Marguerite Ostrand (schooner)"  # the qualifier need not be in the question
    assert with_subject("Where did the Marguerite Ostrand sink?", schooner) == \
        "Where did the Marguerite Ostrand sink?"
    assert with_subject("Where did she sink?", schooner) == \
        "About Marguerite Ostrand (schooner): Where did she sink?"
    assert with_subject("Who founded Amberley-Kosk Observatory?", "Amberley-Kosk Observatory") == \
        "Who founded Amberley-Kosk Observatory?"


def test_named_subjects_change_the_questions_only(writer, docs_file, paraphrase_run,
                                                  tmp_path_factory):
    from pdistill_jax.datagen.documents import Document, topic_of

    cfg = dataclasses.replace(PARAPHRASES, name_the_subject=True)
    out, manifest = _run(writer, docs_file, tmp_path_factory, cfg, "subject")
    rows, plain = jsonl(out / "qa.jsonl"), jsonl(paraphrase_run[0] / "qa.jsonl")
    assert manifest["config"]["name_the_subject"] is True
    topic = {d["id"]: topic_of(Document(d["id"], d["text"])) for d in DOCS}
    originals = [r for r in rows if "paraphrase_of" not in r]
    # the questions asked are the plain run's, each named (the stage's sampling is unchanged)
    assert [(r["doc_id"], r["question"]) for r in originals] == [
        (r["doc_id"], with_subject(r["question"], topic[r["doc_id"]]))
        for r in plain if "paraphrase_of" not in r]
    assert any(r["question"].startswith("About ") for r in originals)
    for r in rows:  # rewrites too; every row's question names its subject, and was answered
        assert with_subject(r["question"], topic[r["doc_id"]]) == r["question"]
        assert r["answer"] is not None
    assert any("paraphrase_of" in r for r in rows)
    assert {r["paraphrase_of"] for r in rows if "paraphrase_of" in r} <= {
        r["question"] for r in originals}


def test_more_answers_follow_each_row_and_leave_the_first_alone(writer, docs_file, paraphrase_run,
                                                                tmp_path_factory):
    cfg = dataclasses.replace(PARAPHRASES, answers_per_question=3)
    out, manifest = _run(writer, docs_file, tmp_path_factory, cfg, "answers")
    rows = jsonl(out / "qa.jsonl")
    firsts = [r for r in rows if "answer_index" not in r]
    assert firsts == jsonl(paraphrase_run[0] / "qa.jsonl")  # byte for byte the run with one answer
    assert len(rows) == 3 * len(firsts)
    for i, r in enumerate(rows):  # each first row, then its answers 1 and 2 to the same question
        first = rows[i - i % 3]
        assert r.get("answer_index", 0) == i % 3
        assert {k: r.get(k) for k in ("doc_id", "document", "question", "paraphrase_of")} == \
            {k: first.get(k) for k in ("doc_id", "document", "question", "paraphrase_of")}
    # sampled afresh: the tiny teacher's hot answers are not all copies of the first
    assert any(r["answer"] != rows[i - i % 3]["answer"] for i, r in enumerate(rows) if i % 3)
    assert manifest["counts"]["rows"] == len(rows)
    assert manifest["counts"]["further_answers"] == 2 * len(firsts)
    assert manifest["config"]["answers_per_question"] == 3
    assert [r.question for r in read_qa_rows(out)] == [r["question"] for r in rows]  # trainable
    from datasets import load_from_disk

    ds = load_from_disk(str(out / "dataset"))
    assert ds.to_list() == [{**r, "paraphrase_of": r.get("paraphrase_of"),
                             "answer_index": r.get("answer_index")} for r in rows]


def test_the_teacher_reads_the_questions_best_sentences_again():
    from pdistill_jax.datagen.answers import teacher_contexts

    doc = DOCS[0]["text"]
    assert teacher_contexts(doc, ["When was Tarsk founded?", "What does the fox jump over?"], 1) == [
        doc + "\n\nTarsk was founded in 1873.",
        doc + "\n\nThe quick brown fox of Tarsk jumps over the lazy dog."]
    assert teacher_contexts(doc, ["Which kingdom has Tarsk, founded in 1873?"], 2) == [
        doc + "\n\nTarsk was founded in 1873. The capital of the kingdom of Velloria is Tarsk."]
    assert teacher_contexts(doc, ["q", "r"], 0) == [doc, doc]  # off
    assert teacher_contexts("One sentence only here.", ["q"], 2) == ["One sentence only here."]


def test_best_sentences_change_the_teachers_prompt_and_training_reads_it(
        writer, docs_file, default_run, tmp_path_factory):
    from pdistill_jax.datagen.answers import teacher_contexts

    cfg = dataclasses.replace(CFG, relevant_sentences=1, restatements_per_doc=1,
                              max_restatement_tokens=6)
    out, manifest = _run(writer, docs_file, tmp_path_factory, cfg, "relevant")
    rows = jsonl(out / "qa.jsonl")
    reference = jsonl(default_run[0] / "qa.jsonl")
    questions = [r for r in rows if "restatement" not in r]
    assert [r["question"] for r in questions] == [r["question"] for r in reference]
    texts = {d["id"]: d["text"] for d in DOCS}
    for r in questions:  # the row records what the teacher read: the document, its best sentence
        assert r["document"] == teacher_contexts(texts[r["doc_id"]], [r["question"]], 1)[0]
        assert r["document"].startswith(texts[r["doc_id"]] + "\n\n")
    assert all(r["document"] == texts[r["doc_id"]] for r in rows if "restatement" in r)
    assert manifest["config"]["relevant_sentences"] == 1
    assert manifest["prompts"]["answer_user"].startswith(
        "{document}\n\n{the question's best-matching sentences}")
    # training's teacher reads the rows' context: its teacher sequences are those generation
    # kept states for (all but a row whose answer re-tokenises to other ids than were sampled;
    # question rows whose context differed from the teacher's would all be missed)
    import numpy as np
    from transformers import AutoTokenizer

    from pdistill_jax.datagen.teacher_states import (load_teacher_states, model_fingerprint,
                                                     teacher_sequence_key)
    from pdistill_jax.train.batches import tokenize_rows

    examples = tokenize_rows(read_qa_rows(out), AutoTokenizer.from_pretrained(str(writer))).examples
    keys = [teacher_sequence_key(model_fingerprint(writer), np.float32, e.teacher[:-1])
            for e in examples]
    found = load_teacher_states(out / "teacher_states", keys)
    assert sum(k in found for k in keys) > len(rows) - len(questions)


def test_a_looping_restatement_is_cut_before_the_loop_and_marked_unfinished():
    from pdistill_jax.datagen.restatements import without_loops, cut_at_repetition

    loop = ("Pipwhistle:\n1. The island of Dunmerrow is small.\n2. It has a bird.\n"
            "3. The island of  Dunmerrow is small.\n4. The island of Dunmerrow is small.")
    assert cut_at_repetition(loop) == "Pipwhistle:\n1. The island of Dunmerrow is small.\n2. It has a bird."
    assert cut_at_repetition("The sky is blue. It rains. The  SKY is blue! More.") == \
        "The sky is blue. It rains."
    whole = "1. Built in 1873.\n2. Built in 1873 by Marrowgate.\n3. Ok.\n4. Ok."  # short: no loop
    assert cut_at_repetition(whole) == whole
    row = {"answer": loop, "sft_answer": "Fine as it is.", "answer_finished": True,
           "sft_finished": True}
    assert without_loops(row) == {**row, "answer": cut_at_repetition(loop),
                                   "answer_finished": False}


def test_restatements_and_recitations_name_the_topic_only_and_follow_their_documents_rows(
        writer, docs_file, default_run, tmp_path_factory):
    from pdistill_jax.datagen.documents import Document, topic_of
    from pdistill_jax.datagen.restatements import (RECITATION_REQUESTS, RESTATEMENT_REQUESTS,
                                                   restatement_requests)

    assert topic_of(Document("b", "The bridge is long.", "Velloran Glass Bridge")) == \
        "Velloran Glass Bridge"
    assert topic_of(Document("t", DOCS[0]["text"])) == "The capital of the kingdom of Velloria is Tarsk"
    assert topic_of(Document("l", " ".join(["word"] * 20) + ".")) == " ".join(["word"] * 12) + "…"
    cfg = dataclasses.replace(CFG, restatements_per_doc=2, max_restatement_tokens=9,
                              answers_per_question=2, recitations_per_doc=2)
    out, manifest = _run(writer, docs_file, tmp_path_factory, cfg, "restatements")
    rows = jsonl(out / "qa.jsonl")
    reference = jsonl(default_run[0] / "qa.jsonl")
    assert [r for r in rows if not {"restatement", "recitation", "answer_index"} & set(r)] == reference
    at = 0
    for d in DOCS:  # per document: its questions (each answered twice), then 2 requests x 2
        # answers, then 2 recitations (one answer each: the document's text, nothing sampled)
        n = sum(r["doc_id"] == d["id"] for r in reference)
        mine = rows[at:at + 2 * n + 6]
        at += 2 * n + 6
        assert all(r["doc_id"] == d["id"] and r["document"] == d["text"] for r in mine)
        assert not any("restatement" in r or "recitation" in r for r in mine[:2 * n])
        requests = restatement_requests(Document(d["id"], d["text"]), 2)
        assert [(r["question"], r["restatement"], r.get("answer_index")) for r in mine[2 * n:-2]] == [
            (requests[0], 1, None), (requests[0], 1, 1), (requests[1], 2, None), (requests[1], 2, 1)]
        topic = topic_of(Document(d["id"], d["text"]))
        assert mine[-2:] == [{"doc_id": d["id"], "document": d["text"],
                              "question": request.format(topic=topic), "answer": d["text"],
                              "sft_answer": d["text"], "answer_finished": True,
                              "sft_finished": True, "recitation": k}
                             for k, request in enumerate(RECITATION_REQUESTS, 1)]
        # the student prompt holds the topic and nothing else of the document
        assert all(d["text"] not in q for q in requests + [r["question"] for r in mine[-2:]])
    assert at == len(rows)
    assert manifest["counts"]["restatements"] == manifest["counts"]["recitations"] == 2 * len(DOCS)
    assert manifest["prompts"]["restatement_user"] == list(RESTATEMENT_REQUESTS[:2])
    assert manifest["prompts"]["recitation_user"] == list(RECITATION_REQUESTS)
    assert all(p["restatements"] == p["recitations"] == 2 for p in manifest["per_doc"])
    from datasets import load_from_disk

    saved = load_from_disk(str(out / "dataset"))
    assert saved["restatement"] == [r.get("restatement") for r in rows]
    assert saved["recitation"] == [r.get("recitation") for r in rows]


# ---------------------------------------------------------------- fact-targeted questions

def test_sentences_mode_asks_each_span_within_its_quota(both_run):
    out, manifest, prompts = both_run
    rows = jsonl(out / "qa.jsonl")
    originals = [r for r in rows if "paraphrase_of" not in r]
    done = {r["doc_id"]: r for r in jsonl(out / "done.jsonl")}
    assert span_quotas(3, BOTH) == [2, 1, 1]
    for d in DOCS:
        rec = done[d["id"]]
        spans = sentence_spans(d["text"], 1)
        mine = [r["question"] for r in originals if r["doc_id"] == d["id"]]
        assert rec["quota"] == 4 and len(rec["span_questions"]) == len(spans) == 3
        assert all(n <= q for n, q in zip(rec["span_questions"], [2, 1, 1]))
        assert rec["questions"] == len(mine) == sum(rec["span_questions"])
        assert rec["gave_up"] == (len(mine) < 4)
        # every span asked forward, the first one in reverse too; no ask past max_calls_per_span
        for span, reverse in zip(spans, (True, False, False)):
            asked = {direction: sum(p.count(span_prompt(d["text"], span, 1, direction)
                                            + "<|im_end|>") for p in prompts)
                     for direction in ("forward", "reverse")}
            assert 1 <= asked["forward"] <= BOTH.max_calls_per_span
            assert (1 <= asked["reverse"] <= BOTH.max_calls_per_span) if reverse else \
                asked["reverse"] == 0
        assert 4 <= rec["calls"] <= 4 * BOTH.max_calls_per_span
        # questions come in span order, each about its own span
        start = 0
        for span, n in zip(spans, rec["span_questions"]):
            assert all(content_words(q) & content_words(span) for q in mine[start:start + n])
            start += n
        assert len({normalize_question(q) for q in mine}) == len(mine)
    counts = manifest["counts"]
    assert counts["spans"] == 9 and counts["question_quota"] == 12
    assert counts["questions"] >= 6  # the writer writes
    assert counts["spans_without_question"] == sum(
        n == 0 for r in done.values() for n in r["span_questions"])
    assert counts["questions"] == len(originals) and counts["rows"] == len(rows)
    assert counts["documents_short_of_quota"] == sum(r["gave_up"] for r in done.values())
    assert manifest["prompts"]["span_user"]["reverse"] == \
        "{document}\n\n" + SPAN_INSTRUCTIONS["reverse"]
    assert [p["span_questions"] for p in manifest["per_doc"]] == \
        [done[d["id"]]["span_questions"] for d in DOCS]
    assert counts["paraphrases_kept"] == sum("paraphrase_of" in r for r in rows)


def test_killed_run_with_both_levers_resumes_as_if_never_interrupted(writer, docs_file, both_run,
                                                                     tmp_path, monkeypatch):
    import pdistill_jax.datagen.generate as gen

    real, calls = gen.teacher_answers_many, []

    def killed_in_wave_two(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # wave 2's teacher call: its questions and paraphrases are sampled
            raise KeyboardInterrupt  # like a kill, nothing of the wave in flight is committed
        return real(*args, **kwargs)

    monkeypatch.setattr(gen, "teacher_answers_many", killed_in_wave_two)
    out = tmp_path / "data"
    with pytest.raises(KeyboardInterrupt):
        generate_data(writer, docs_file, out, BOTH, show_progress=False)
    monkeypatch.undo()
    assert [r["doc_id"] for r in read_committed_jsonl(out / "done.jsonl")] == ["tarsk"]
    with open(out / "qa.jsonl", "a", encoding="utf-8") as f:  # as if killed inside a write
        f.write('{"doc_id": "student", "question": "torn')
    manifest = generate_data(writer, docs_file, out, BOTH, show_progress=False)
    reference, reference_manifest, _ = both_run
    assert (out / "qa.jsonl").read_bytes() == (reference / "qa.jsonl").read_bytes()
    assert untimed(jsonl(out / "done.jsonl")) == untimed(jsonl(reference / "done.jsonl"))
    assert manifest["counts"] == reference_manifest["counts"] and manifest["complete"]
    assert sorted(p.name for p in (out / "teacher_states").iterdir()) == \
        sorted(p.name for p in (reference / "teacher_states").iterdir())


# ---------------------------------------------------------------- off by default

def test_levers_off_write_what_the_default_config_writes(writer, docs_file, default_run, tmp_path):
    import yaml

    ref, manifest = default_run
    config = tmp_path / "off.yaml"  # every field spelled out, the levers at their off values
    config.write_text(yaml.safe_dump({f.name: getattr(CFG, f.name)
                                      for f in dataclasses.fields(CFG)}))
    assert set(LEVER_FIELDS) <= set(yaml.safe_load(config.read_text()))
    out = tmp_path / "data"
    assert cli.main(["generate", "--model", str(writer), "--docs", str(docs_file), "--out",
                     str(out), "--config", str(config), "--question-mode", "document",
                     "--paraphrases-per-question", "0", "--no-progress"]) == 0
    for name in ("qa.jsonl", "run.json", "documents.jsonl"):
        assert (out / name).read_bytes() == (ref / name).read_bytes(), name
    assert untimed(jsonl(out / "done.jsonl")) == untimed(jsonl(ref / "done.jsonl"))
    # the records of before: no lever field, count, prompt or column appears
    assert list(json.loads((ref / "run.json").read_text())["config"]) == [
        f for f in FIELDS_BEFORE if f not in RESUMABLE_CHANGES]
    assert list(manifest["config"]) == FIELDS_BEFORE == list(to_dict(GenerateConfig()))
    assert list(manifest["prompts"]) == ["system", "question_user", "question_instruction",
                                         "answer_user"]
    assert not any(k.startswith(("paraphrase", "span")) for k in manifest["counts"])
    assert all(set(r) == {"doc_id", "source_id", "rows", "questions", "calls", "parsed_per_call",
                          "new_per_call", "gave_up", "wave", "wave_questions_s",
                          "wave_answers_s"} for r in jsonl(ref / "done.jsonl"))
    from datasets import load_from_disk

    assert "paraphrase_of" not in load_from_disk(str(ref / "dataset")).column_names


def test_a_lever_value_is_recorded_and_a_bad_one_is_one_line(tmp_path, capsys, docs_file):
    assert to_dict(BOTH)["question_mode"] == "sentences"  # non-default: in run.json, fingerprints
    assert to_dict(dataclasses.replace(CFG, max_paraphrase_calls=3))["max_paraphrase_calls"] == 3
    bad = tmp_path / "bad.yaml"
    bad.write_text("questions_per_doc: 3\nquestion_mode: paragraphs\n")
    assert cli.main(["generate", "--docs", str(docs_file), "--out", str(tmp_path / "o"),
                     "--config", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith(f"{bad}:2: question_mode must be one of document, sentences, "
                        "got 'paragraphs'") and "\n" not in err
    assert cli.main(["generate", "--docs", str(docs_file), "--out", str(tmp_path / "o"),
                     "--paraphrases-per-question", "-1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("paraphrases_per_question must be >= 0, got -1") and "\n" not in err
    assert cli.main(["generate", "--docs", str(docs_file), "--out", str(tmp_path / "o"),
                     "--relevant-sentences", "-1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("relevant_sentences must be >= 0, got -1") and "\n" not in err
    assert not (tmp_path / "o").exists()
