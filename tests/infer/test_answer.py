"""`pdistill answer`: prompt layouts, contexts, input order, and bad-input messages."""
import json

import pytest

from pdistill_jax.infer.answer import build_prompt, question_contexts
from pdistill_jax.cli import main
from pdistill_jax.weights.load import load_model
from pdistill_jax.weights.tokenizer import DOC_SEPARATOR

DOCS = [{"id": "d1", "text": "The capital of Velloria is Tarsk, founded in 1873."},
        {"id": "d2", "text": "The quick brown fox jumps over the lazy dog."}]
QUESTIONS = [{"question": "What is the capital of Velloria?", "answers": ["Tarsk"], "doc_id": "d1"},
             {"question": "Who jumps over the lazy dog?", "answers": ["fox"], "doc_id": "d2"},
             {"question": "When was Tarsk founded?", "answers": ["1873"], "doc_id": "d1"}]


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_contexts_gold_and_bm25():
    assert question_contexts(QUESTIONS, None, "none") == [None] * 3
    assert question_contexts(QUESTIONS, DOCS, "gold") == [DOCS[0]["text"], DOCS[1]["text"], DOCS[0]["text"]]
    bm25 = question_contexts(QUESTIONS, DOCS, "bm25", top_k=1)
    assert bm25 == [DOCS[0]["text"], DOCS[1]["text"], DOCS[0]["text"]]


def test_prompt_layouts(tiny_llama):
    tok = load_model(tiny_llama).tokenizer
    chat = tok.decode(build_prompt(tok, "Q?", "DOC", "chat"))
    assert "DOC" + DOC_SEPARATOR + "Q?" in chat and chat.rstrip().endswith("assistant")
    assert tok.decode(build_prompt(tok, "Q?", None, "raw")) == "Q?"


def test_answer_cli_writes_rows_in_input_order(tiny_llama, tmp_path):
    q = _write(tmp_path / "q.jsonl", QUESTIONS)
    d = _write(tmp_path / "d.jsonl", DOCS)
    out = tmp_path / "p.jsonl"
    assert main(["answer", "--model", str(tiny_llama), "--questions", str(q), "--docs", str(d),
                 "--context", "gold", "--out", str(out), "--max-new-tokens", "5",
                 "--batch-size", "2"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["question"] for r in rows] == [x["question"] for x in QUESTIONS]
    assert [r["doc_id"] for r in rows] == ["d1", "d2", "d1"]
    assert all(isinstance(r["prediction"], str) for r in rows)


@pytest.mark.parametrize("rows,args,message", [
    ([{"question": "x?"}], ["--context", "gold", "--docs", "DOCS"], 'q.jsonl:1: --context gold needs a "doc_id"'),
    ([{"question": "x?", "doc_id": "zz"}], ["--context", "gold", "--docs", "DOCS"], "q.jsonl:1: doc_id 'zz' is not in --docs"),
    ([{"question": "x?"}], ["--context", "bm25"], "needs --docs"),
    ([{"question": ""}], [], 'q.jsonl:1: field "question" is empty'),
])
def test_answer_cli_bad_input(tiny_llama, tmp_path, capsys, rows, args, message):
    q = _write(tmp_path / "q.jsonl", rows)
    d = _write(tmp_path / "d.jsonl", DOCS)
    args = [str(d) if a == "DOCS" else a for a in args]
    out = tmp_path / "p.jsonl"
    assert main(["answer", "--model", str(tiny_llama), "--questions", str(q), "--out", str(out)] + args) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_answer_cli_invalid_json_names_file_and_line(tiny_llama, tmp_path, capsys):
    q = tmp_path / "q.jsonl"
    q.write_text('{"question": "ok?"}\n{"question": oops}\n')
    assert main(["answer", "--model", str(tiny_llama), "--questions", str(q),
                 "--out", str(tmp_path / "p.jsonl")]) == 2
    assert f"{q}:2: invalid JSON" in capsys.readouterr().err


def test_answer_docs_take_the_same_sources_as_generate(tiny_llama, tmp_path, capsys):
    from pdistill_jax.commands.answer import load_docs

    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "velloria.txt").write_text(DOCS[0]["text"] + "\n")
    (folder / "fox.md").write_text(DOCS[1]["text"])
    assert load_docs(str(folder)) == [{"id": "fox.md", "text": DOCS[1]["text"], "title": "fox"},
                                      {"id": "velloria.txt", "text": DOCS[0]["text"], "title": "velloria"}]
    q = _write(tmp_path / "q.jsonl", [{"question": "What is the capital of Velloria?",
                                       "doc_id": "velloria.txt"}])
    out = tmp_path / "p.jsonl"
    assert main(["answer", "--model", str(tiny_llama), "--questions", str(q), "--docs", str(folder),
                 "--context", "gold", "--out", str(out), "--max-new-tokens", "2",
                 "--no-progress"]) == 0
    assert json.loads(out.read_text())["doc_id"] == "velloria.txt"
    assert "answering" not in capsys.readouterr().err  # --no-progress: no bar

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=f"^--docs {empty}: no .txt or .md files in this folder$"):
        load_docs(str(empty))


def test_answer_cli_decode_dtype(tiny_llama, tmp_path, capsys, monkeypatch):
    # --decode-dtype bfloat16 answers from bfloat16 base weights; its unfinished batches are
    # never mixed with float32's on a rerun; a bad value is one line before any model is loaded.
    from pdistill_jax.infer import answer as answer_module

    q = _write(tmp_path / "q.jsonl", QUESTIONS)
    out = tmp_path / "p.jsonl"
    args = ["answer", "--model", str(tiny_llama), "--questions", str(q), "--out", str(out),
            "--max-new-tokens", "4", "--batch-size", "1", "--no-progress"]
    assert main(args + ["--decode-dtype", "float16"]) == 2
    err = capsys.readouterr().err
    assert err == ("pdistill answer: error: decode_dtype must be one of auto, float32, bfloat16, "
                   "got 'float16'\n") and not out.exists()

    def stop_after_one_batch():
        raise RuntimeError("killed after one batch")

    with monkeypatch.context() as m:
        m.setattr(answer_module, "check_peers", stop_after_one_batch)
        assert main(args + ["--decode-dtype", "bfloat16"]) == 2
    assert "killed after one batch" in capsys.readouterr().err
    assert main(args) == 2  # float32, over the bfloat16 batches
    assert "holds answers made with other settings (decode_dtype: 'bfloat16' -> None)" in \
        capsys.readouterr().err
    assert main(args + ["--decode-dtype", "auto"]) == 2  # auto is float32 on this CPU
    capsys.readouterr()
    assert main(args + ["--decode-dtype", "bfloat16"]) == 0  # resumes its own
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["question"] for r in rows] == [x["question"] for x in QUESTIONS]
