"""`pdistill generate`: the question rounds, the answering path, output files, resume after a kill.

A random tiny model writes no parseable questions, so the pipeline tests use a tiny model that
was *trained* (a few dozen torch steps, below) to answer the question prompt with numbered
questions: the real sampler, parser and answering path then produce real rows.
"""
from __future__ import annotations

import dataclasses
import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pdistill_jax import cli
from pdistill_jax.datagen.documents import Document
from pdistill_jax.datagen.answers import teacher_answers, teacher_message
from pdistill_jax.datagen.dataset import load_progress
from pdistill_jax.datagen.generate import generate_data
from pdistill_jax.datagen.questions import ask_questions
from pdistill_jax.datagen.seeds import derive_seed
from pdistill_jax.config import GenerateConfig
from pdistill_jax.files import read_committed_jsonl
from pdistill_jax.datagen.questions import question_prompt

TRAINED_QUESTIONS = [
    "What is the capital of the kingdom of Velloria?",
    "When was Tarsk founded?",
    "Which animal jumps over the lazy dog?",
    "What colour is the fox of Velloria?",
    "How many numbers are in the text about Velloria?",
    "Who is the teacher of the student in Tarsk?",
    "Where does the quick brown fox live?",
    "Why is the dog of Velloria lazy?",
]
DOCS = [  # words the tiny tokenizer knows, so prompts stay short
    {"id": "velloria", "title": "Velloria",
     "text": "The capital of the kingdom of Velloria is Tarsk, founded in 1873."},
    {"id": "fox", "text": "The quick brown fox of Velloria jumps over the lazy dog."},
    {"id": "colours", "text": "Numbers and colours: red green blue yellow, 100 and 1000."},
    {"id": "teacher", "text": "Prompt distillation in Tarsk trains a student to match a teacher."},
]
CFG = GenerateConfig(questions_per_doc=4, max_calls_per_doc=6, q_temperature=1.0,
                     max_question_tokens=48, max_answer_tokens=12, batch_size=8,
                     chunk_tokens=256, chunk_overlap=16, docs_per_commit=1, seed=3)


def train_question_writer(out: Path, prompts: list[str] | None = None) -> Path:
    """A tiny Llama fine-tuned to answer each of `prompts` (user messages; default: the question
    prompts of DOCS[:3]) with 2-4 numbered TRAINED_QUESTIONS."""
    import torch
    from transformers import AutoTokenizer

    import tiny_models

    torch.manual_seed(0)
    torch.set_num_threads(1)  # the machine is shared; more threads only contend
    model = tiny_models.build_model(out, "llama", hidden_size=128, intermediate_size=256)
    tok = AutoTokenizer.from_pretrained(str(out))
    end = tok.convert_tokens_to_ids("<|im_end|>")
    rng = random.Random(0)
    prompts = prompts or [question_prompt(d["text"]) for d in DOCS[:3]]
    examples = []
    for i in range(128):
        prompt = tok.apply_chat_template(
            [{"role": "user", "content": prompts[i % len(prompts)]}],
            add_generation_prompt=True, tokenize=True)
        prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
        target = "\n".join(f"{j + 1}. {q}" for j, q in
                           enumerate(rng.sample(TRAINED_QUESTIONS, rng.randint(2, 4))))
        examples.append((prompt, tok(target, add_special_tokens=False)["input_ids"] + [end]))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    model.train()
    for _ in range(60):
        batch = rng.sample(examples, 16)
        width = max(len(p) + len(a) for p, a in batch)
        ids = torch.full((16, width), tok.pad_token_id)
        labels = torch.full((16, width), -100)
        mask = torch.zeros((16, width), dtype=torch.long)
        for r, (p, a) in enumerate(batch):
            ids[r, :len(p) + len(a)] = torch.tensor(p + a)
            labels[r, len(p):len(p) + len(a)] = torch.tensor(a)
            mask[r, :len(p) + len(a)] = 1
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5, f"the question writer did not learn (loss {loss.item():.3f})"
    model.eval().save_pretrained(str(out))
    return out


def shared_question_writer(tmp_path_factory) -> Path:
    """The question writer of DOCS[:3], trained once a session: the modules that need it share
    it (training is most of their setup)."""
    out = tmp_path_factory.getbasetemp() / "question_writer"
    if not (out / "trained").exists():
        train_question_writer(out)
        (out / "trained").touch()  # last: a half-written folder is trained again
    return out


@pytest.fixture(scope="module")
def question_model(tmp_path_factory) -> Path:
    return shared_question_writer(tmp_path_factory)


@pytest.fixture(scope="module")
def docs_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("docs") / "docs.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in DOCS), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def reference_run(question_model, docs_file, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("reference") / "data"
    return out, generate_data(question_model, docs_file, out, CFG, show_progress=False)


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# ---------------------------------------------------------------- stages, on the random tiny model

def test_answer_path_builds_rows_from_chosen_questions(tiny_llama):
    from pdistill_jax.weights.load import load_model
    from pdistill_jax.model.sampler import generate
    from pdistill_jax.config import SamplingParams
    from pdistill_jax.weights.tokenizer import chat_prompt_ids, end_token_ids

    lm = load_model(tiny_llama)
    end = end_token_ids(lm.tokenizer, lm.cfg)
    doc = Document("velloria", DOCS[0]["text"])
    items = [(doc, "When was Tarsk founded?"), (doc, "What is the capital of Velloria?")]
    cfg = GenerateConfig(max_answer_tokens=8, batch_size=4)
    rows = teacher_answers(lm, items, cfg, seed=11)
    assert [r["question"] for r in rows] == [q for _, q in items]
    for r in rows:
        assert r["doc_id"] == "velloria" and r["document"] == doc.text
        assert isinstance(r["answer"], str) and isinstance(r["sft_answer"], str)
        assert isinstance(r["answer_finished"], bool) and isinstance(r["sft_finished"], bool)
    # the teacher sees the document: the row equals sampling that prompt directly
    prompt = chat_prompt_ids(lm.tokenizer, f"{doc.text}\n\n---\n\n{items[1][1]}")
    assert teacher_message(doc.text, items[1][1]) == f"{doc.text}\n\n---\n\n{items[1][1]}"
    # The PD (hot) and SFT (cold) answers are one sampler call over the prompts twice over.
    teacher_prompts = [chat_prompt_ids(lm.tokenizer, teacher_message(doc.text, q)) for _, q in items]
    direct = generate(lm.model, teacher_prompts + teacher_prompts,
                      SamplingParams(cfg.a_temperature, cfg.a_top_k, 1.0, cfg.max_answer_tokens),
                      end_ids=end, seed=derive_seed(11, "answers"), batch_size=4,
                      temperatures=[cfg.a_temperature] * 2 + [cfg.sft_temperature] * 2)
    assert len(prompt) > len(chat_prompt_ids(lm.tokenizer, items[1][1]))
    texts = [lm.tokenizer.decode(c.tokens, skip_special_tokens=True).strip() for c in direct]
    assert texts[:2] == [r["answer"] for r in rows]
    assert texts[2:] == [r["sft_answer"] for r in rows]
    assert teacher_answers(lm, items, cfg, seed=11) == rows  # reproducible
    other = teacher_answers(lm, items, cfg, seed=12)
    assert [r["answer"] for r in other] != [r["answer"] for r in rows]
    # One temperature for both: one answer per question, used as PD answer and SFT answer.
    one = dataclasses.replace(cfg, a_temperature=0.7, sft_temperature=0.7)
    shared = teacher_answers(lm, items, one, seed=11)
    direct = generate(lm.model, teacher_prompts,
                      SamplingParams(0.7, cfg.a_top_k, 1.0, cfg.max_answer_tokens),
                      end_ids=end, seed=derive_seed(11, "answers"), batch_size=4)
    texts = [lm.tokenizer.decode(c.tokens, skip_special_tokens=True).strip() for c in direct]
    assert [r["answer"] for r in shared] == [r["sft_answer"] for r in shared] == texts
    assert [r["answer_finished"] for r in shared] == [r["sft_finished"] for r in shared]


def test_question_rounds_stop_at_quota_or_max_calls(tiny_llama):
    from pdistill_jax.weights.load import load_model

    lm = load_model(tiny_llama)
    docs = [Document(d["id"], d["text"]) for d in DOCS[:2]]
    cfg = GenerateConfig(questions_per_doc=3, max_calls_per_doc=3, max_question_tokens=8,
                         batch_size=4)
    seen_stages = []
    state = ask_questions(lm, docs, cfg, seed=0,
                          on_batch=lambda stage, n, total: seen_stages.append(stage))
    assert set(state) == {"velloria", "fox"}
    for s in state.values():  # a random model writes garbage: quota reached or calls used up
        assert len(s.questions) == cfg.questions_per_doc or s.calls == cfg.max_calls_per_doc
        assert s.calls <= cfg.max_calls_per_doc and len(s.new_per_call) == s.calls
    assert seen_stages[0] == "questions r0"


# ---------------------------------------------------------------- the whole pipeline

def test_generate_writes_consistent_outputs(reference_run):
    from datasets import load_from_disk

    out, manifest = reference_run
    rows = jsonl(out / "qa.jsonl")
    assert rows, "the trained question writer should produce questions"
    for r in rows:
        assert set(r) == {"doc_id", "document", "question", "answer", "sft_answer",
                          "answer_finished", "sft_finished"}
        assert r["question"].endswith("?") and r["document"] == next(
            d["text"] for d in DOCS if d["id"] == r["doc_id"])
    pairs = [(r["doc_id"], r["question"]) for r in rows]
    assert len(pairs) == len(set(pairs))
    counts = manifest["counts"]
    per_doc = {p["doc_id"]: p for p in manifest["per_doc"]}
    assert counts["rows"] == counts["questions"] == len(rows)
    assert counts["documents"] == counts["documents_done"] == len(DOCS) and manifest["complete"]
    assert counts["question_calls"] == sum(p["calls"] for p in per_doc.values())
    assert counts["questions_parsed"] == sum(sum(p["parsed_per_call"]) for p in per_doc.values())
    for doc_id, p in per_doc.items():
        n = sum(r["doc_id"] == doc_id for r in rows)
        assert n == p["questions"] <= CFG.questions_per_doc
        assert p["gave_up"] == (n < CFG.questions_per_doc)
        assert p["calls"] <= CFG.max_calls_per_doc and len(p["parsed_per_call"]) == p["calls"]
        assert p["gave_up"] is False or p["calls"] == CFG.max_calls_per_doc
    assert counts["answers_truncated"] == sum(not r["answer_finished"] for r in rows)
    assert manifest["parse_yield"]["parsed_per_call"] == pytest.approx(
        counts["questions_parsed"] / counts["question_calls"])
    assert manifest["config"]["questions_per_doc"] == 4
    assert "{document}" in manifest["prompts"]["question_user"]
    assert json.loads((out / "manifest.json").read_text()) == manifest
    docs = jsonl(out / "documents.jsonl")
    assert [d["id"] for d in docs] == [d["id"] for d in DOCS]
    assert all(d["source_id"] == d["id"] for d in docs)
    assert not (out / "test_questions.jsonl").exists()
    assert [json.loads(line)["doc_id"] for line in (out / "done.jsonl").read_text().splitlines()] \
        == [d["id"] for d in DOCS]
    ds = load_from_disk(str(out / "dataset"))
    assert ds.to_list() == rows
    # the teacher's states at every PD answer, one file per wave, one entry per row
    import numpy as np
    keys = []
    for f in sorted((out / "teacher_states").glob("wave-*.npz")):
        with np.load(f) as z:
            keys += z.files
            assert all(z[k].ndim == 2 and 1 <= len(z[k]) <= CFG.max_answer_tokens + 1 for k in z.files)
    assert len(keys) == len(set(keys)) == len(rows)


def test_rerun_duplicates_nothing_and_other_settings_are_refused(reference_run, question_model,
                                                                 docs_file):
    out, manifest = reference_run
    before = {p: (out / p).read_bytes() for p in ("qa.jsonl", "done.jsonl")}
    again = generate_data(question_model, docs_file, out,
                          GenerateConfig(**{**CFG.__dict__, "batch_size": 4}),  # may change
                          show_progress=False)
    assert {p: (out / p).read_bytes() for p in before} == before
    assert again["counts"] == manifest["counts"]
    with pytest.raises(ValueError, match="other settings.*questions_per_doc"):
        generate_data(question_model, docs_file, out,
                      GenerateConfig(**{**CFG.__dict__, "questions_per_doc": 5}),
                      show_progress=False)


def test_killed_run_resumes_without_duplicates(reference_run, question_model, docs_file, tmp_path):
    import yaml

    config = tmp_path / "gen.yaml"
    config.write_text(yaml.safe_dump(CFG.__dict__))
    out = tmp_path / "data"
    command = ["generate", "--model", str(question_model), "--docs", str(docs_file),
               "--out", str(out), "--config", str(config)]
    proc = subprocess.Popen([sys.executable, "-m", "pdistill_jax.cli", *command],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    done = out / "done.jsonl"
    deadline = time.time() + 300
    try:
        while time.time() < deadline and proc.poll() is None:
            if done.exists() and done.read_bytes().count(b"\n") >= 1:
                break
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    committed = len(read_committed_jsonl(done))
    assert 1 <= committed < len(DOCS), "the kill should land after the first document, mid-run"
    with open(out / "qa.jsonl", "a", encoding="utf-8") as f:  # as if killed inside a write
        f.write('{"doc_id": "fox", "question": "torn')
    assert cli.main(command) == 0
    rows = jsonl(out / "qa.jsonl")
    assert rows == jsonl(reference_run[0] / "qa.jsonl")  # as if never interrupted
    assert [r["doc_id"] for r in jsonl(done)] == [d["id"] for d in DOCS]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["counts"]["rows"] == len(rows)


def test_dataset_documents_bring_their_test_questions(question_model, tmp_path):
    from datasets import Dataset

    ctx = ["Tarsk was founded in 1873.", "The fox of Velloria is red.", "Tarsk has a bridge."]
    Dataset.from_dict({
        "id": ["a", "b", "c", "d"], "title": ["T", "T", "F", "B"],
        "context": [ctx[0], ctx[0], ctx[1], ctx[2]],
        "question": ["When was Tarsk founded?", "What was founded in 1873?",
                     "What colour is the fox?", "What does Tarsk have?"],
        "answers": [{"text": ["1873"], "answer_start": [21]}, {"text": ["Tarsk"], "answer_start": [0]},
                    {"text": ["red"], "answer_start": [23]}, {"text": ["a bridge"], "answer_start": [10]}],
    }).save_to_disk(str(tmp_path / "squad"))
    cfg = GenerateConfig(questions_per_doc=1, max_calls_per_doc=1, max_question_tokens=48,
                         max_answer_tokens=4, batch_size=2)  # a generation of no rows is refused
    manifest = generate_data(question_model, f"hf:{tmp_path / 'squad'}", tmp_path / "data", cfg,
                             max_docs=2, show_progress=False)
    tests = jsonl(tmp_path / "data" / "test_questions.jsonl")
    docs = jsonl(tmp_path / "data" / "documents.jsonl")
    assert [d["text"] for d in docs] == ctx[:2]  # max_docs counts passages
    assert [t["question"] for t in tests] == ["When was Tarsk founded?", "What was founded in 1873?",
                                              "What colour is the fox?"]
    assert {t["doc_id"] for t in tests} == {d["id"] for d in docs}
    assert manifest["counts"]["test_questions"] == 3 and manifest["counts"]["question_calls"] == 2


def test_progress_repair_drops_torn_lines_and_uncommitted_rows(tmp_path):
    row = {"doc_id": "a", "question": "Q?", "answer": "A", "document": "D", "sft_answer": "S",
           "answer_finished": True, "sft_finished": True}
    (tmp_path / "done.jsonl").write_text(json.dumps({"doc_id": "a", "rows": 2}) + "\n"
                                         + '{"doc_id": "b", "ro')
    (tmp_path / "qa.jsonl").write_text(json.dumps(row) + "\n" + json.dumps(row) + "\n"
                                       + json.dumps({**row, "doc_id": "b"}) + "\n" + '{"doc')
    rows, done = load_progress(tmp_path)
    assert rows == [row, row] and list(done) == ["a"]
    assert (tmp_path / "qa.jsonl").read_text().count("\n") == 2
    assert (tmp_path / "done.jsonl").read_text().endswith("\n")
    (tmp_path / "qa.jsonl").write_text("not json\n" + json.dumps(row) + "\n")
    with pytest.raises(ValueError, match=r"qa.jsonl:1: corrupt line"):
        load_progress(tmp_path)


def test_cli_reports_bad_input_in_one_line(tmp_path, capsys, tiny_llama):
    assert cli.main(["generate", "--model", str(tiny_llama), "--docs", str(tmp_path / "none"),
                     "--out", str(tmp_path / "o")]) == 2
    assert "pdistill generate: error: --docs" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("questions_per_doc: 3\nquestion_count: 4\n")
    docs = tmp_path / "d.jsonl"
    docs.write_text(json.dumps(DOCS[0]) + "\n")
    assert cli.main(["generate", "--docs", str(docs), "--out", str(tmp_path / "o"),
                     "--config", str(bad)]) == 2
    assert "unknown key(s) ['question_count']" in capsys.readouterr().err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert cli.main(["generate", "--model", str(tiny_llama), "--docs", str(empty),
                     "--out", str(tmp_path / "o")]) == 2
    assert "no usable documents" in capsys.readouterr().err


def test_cli_decode_dtype_reaches_the_config_and_a_bad_one_is_one_line(tmp_path, capsys, tiny_llama,
                                                                       monkeypatch):
    from pdistill_jax.datagen import generate as generate_module
    from pdistill_jax.datagen.dataset import run_settings

    seen = []

    def stop(model, docs, out, cfg, **kwargs):
        seen.append(cfg)
        raise ValueError("stopped before any work")

    monkeypatch.setattr(generate_module, "generate_data", stop)
    docs = tmp_path / "d.jsonl"
    docs.write_text(json.dumps(DOCS[0]) + "\n")
    args = ["generate", "--model", str(tiny_llama), "--docs", str(docs), "--out", str(tmp_path / "o")]
    assert cli.main(args + ["--decode-dtype", "bfloat16"]) == 2
    (tmp_path / "g.yaml").write_text("decode_dtype: auto\n")
    assert cli.main(args + ["--config", str(tmp_path / "g.yaml")]) == 2
    assert cli.main(args) == 2
    assert [c.decode_dtype for c in seen] == ["bfloat16", "auto", "float32"]
    capsys.readouterr()
    assert cli.main(args + ["--decode-dtype", "float16"]) == 2 and len(seen) == 3
    assert capsys.readouterr().err == ("pdistill generate: error: decode_dtype must be one of auto, "
                                       "float32, bfloat16, got 'float16'\n")
    # run.json: a rerun under another dtype is refused; the default writes what it always wrote
    assert run_settings("m", "d", GenerateConfig(decode_dtype="bfloat16"))["config"]["decode_dtype"] \
        == "bfloat16"
    assert "decode_dtype" not in run_settings("m", "d", GenerateConfig())["config"]


def test_default_config_file_lists_every_field_at_its_default():
    from pdistill_jax.config import load_yaml

    import yaml

    path = Path(__file__).resolve().parents[2] / "configs" / "generate_default.yaml"
    assert load_yaml(GenerateConfig, path) == GenerateConfig()
    assert list(yaml.safe_load(path.read_text())) == [f.name for f in dataclasses.fields(GenerateConfig)]


# ---------------------------------------------------------------- the embedded model

INVENTED = [
    {"id": "orlen-clock", "text": (
        "The Orlen Clock Tower stands in the market square of the mountain village of Brask. It "
        "was built in 1794 by the clockmaker Wendel Haarberg, who spent nine winters carving its "
        "wooden gears by hand. The tower is 31 metres tall and its clock face is painted deep blue "
        "with golden numerals. Every day at noon a carved wooden goat appears from a small door "
        "and bleats twelve times.")},
    {"id": "glimberry", "text": (
        "The glimberry is a purple fruit that grows only in the valleys of the island of Korvane. "
        "Each berry is about the size of a walnut and tastes like a mix of plum and pepper. "
        "Glimberry bushes flower in March and the fruit is picked in late September, when the "
        "berries start to glow faintly in the dark. The fruit was first recorded in 1821 by the "
        "botanist Ansel Dray, who called it the lantern plum.")},
]


@pytest.mark.slow
def test_embedded_model_writes_on_topic_questions_and_answers(embedded_model, tmp_path):
    from pdistill_jax.datagen.questions import content_words, normalize_question

    docs = tmp_path / "invented.jsonl"
    docs.write_text("".join(json.dumps(d) + "\n" for d in INVENTED), encoding="utf-8")
    cfg = GenerateConfig(questions_per_doc=10, max_calls_per_doc=12, max_answer_tokens=96)
    manifest = generate_data(embedded_model, docs, tmp_path / "data", cfg, show_progress=False)
    rows = jsonl(tmp_path / "data" / "qa.jsonl")
    for d in INVENTED:
        mine = [r for r in rows if r["doc_id"] == d["id"]]
        assert len({normalize_question(r["question"]) for r in mine}) >= 8, manifest["per_doc"]
        assert all(content_words(r["question"]) & content_words(d["text"]) for r in mine)
        assert all(r["answer"].strip() and r["sft_answer"].strip() for r in mine)
