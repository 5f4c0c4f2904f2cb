"""Document loading (JSONL, folders, saved Hugging Face datasets) and chunking."""
from __future__ import annotations

import json

import pytest

from pdistill_jax.datagen.documents import (Document, chunk_document, join_sentences, load_documents,
                                            split_sentences)


def write_lines(path, lines: list[bytes]) -> None:
    path.write_bytes(b"\n".join(lines) + b"\n")


# ---------------------------------------------------------------- JSONL

GOOD = json.dumps({"id": "a", "text": "  Alpha text.  ", "title": "Alpha"}).encode()


def test_jsonl_loads_good_rows(tmp_path, capsys):
    path = tmp_path / "docs.jsonl"
    write_lines(path, [
        GOOD, b"",
        json.dumps({"id": 7, "text": "Seven.", "title": ""}).encode(),  # int id, blank title
        json.dumps({"id": "f", "text": "Zoë wrote this in UTF-8."}, ensure_ascii=False).encode(),
    ])
    docs, tests, problems = load_documents(path)
    assert tests is None and problems == []
    assert docs == [Document("a", "Alpha text.", "Alpha"), Document("7", "Seven.", None),
                    Document("f", "Zoë wrote this in UTF-8.", None)]
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("bad,message", [
    (b'{"id": "b", "text": "broken', "invalid JSON at column 21 (Unterminated string"),
    (json.dumps({"id": "c"}).encode(), 'field "text" is missing'),
    (json.dumps({"id": "d", "text": "   \n "}).encode(), 'field "text" is empty'),
    (json.dumps({"id": "a", "text": "Second alpha."}).encode(), "duplicate id 'a' (also on line 1)"),
    (b"[1, 2]", "expected a JSON object, got list"),
    ('{"id": "e", "text": "caf\xe9"}'.encode("latin-1"), "not valid UTF-8"),
    (json.dumps({"id": 7, "text": "Seven.", "title": 3}).encode(), 'field "title" is 3, not a string'),
    (json.dumps({"id": True, "text": "T."}).encode(), 'field "id" is true, not a string or an integer'),
])
def test_jsonl_bad_row_refuses_the_file_naming_line_and_field(tmp_path, bad, message):
    path = tmp_path / "docs.jsonl"
    write_lines(path, [GOOD, b"", bad])
    with pytest.raises(ValueError) as err:
        load_documents(path)
    assert str(err.value).startswith(f"{path}:3: ")
    assert message in str(err.value), str(err.value)


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        load_documents(tmp_path / "nope.jsonl")
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        load_documents("builtin:demo/nope.jsonl")


def test_builtin_names_a_file_the_package_ships():
    docs, tests, problems = load_documents("builtin:demo/documents.jsonl")
    assert len(docs) == 24 and docs[0].id == "velloran-bridge" and tests is None and not problems


# ---------------------------------------------------------------- folders

def test_folder_is_recursive_and_sorted(tmp_path):
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    (tmp_path / ".hidden").mkdir()
    (tmp_path / "b.txt").write_text("Bee text.\n", encoding="utf-8")
    (tmp_path / "a.md").write_text("# A\n\nAy text.", encoding="utf-8")
    (tmp_path / "sub" / "deeper" / "c.txt").write_text("Sea text.", encoding="utf-8")
    (tmp_path / "notes.json").write_text('{"id": "x"}', encoding="utf-8")  # not a document type
    (tmp_path / ".hidden" / "secret.txt").write_text("hidden", encoding="utf-8")
    docs, tests, problems = load_documents(tmp_path)
    assert [d.id for d in docs] == ["a.md", "b.txt", "sub/deeper/c.txt"]
    assert docs[0] == Document("a.md", "# A\n\nAy text.", "a")
    assert tests is None and problems == []


@pytest.mark.parametrize("name,content,message", [
    ("empty.txt", " \n\n".encode(), "empty.txt: empty document; add its text or remove the file"),
    ("latin1.txt", "Line one.\nCaf\xe9 cr\xe8me".encode("latin-1"),
     "latin1.txt:2: not valid UTF-8 (invalid continuation byte at byte 4 of the line); re-save the file as UTF-8"),
])
def test_folder_with_a_bad_file_is_refused_naming_it(tmp_path, name, content, message):
    (tmp_path / "sub").mkdir()
    (tmp_path / "good.txt").write_text("Good text.", encoding="utf-8")
    (tmp_path / "sub" / name).write_bytes(content)
    with pytest.raises(ValueError) as err:
        load_documents(tmp_path)
    assert str(err.value) == f"{tmp_path / 'sub'}/{message}"


def test_folder_without_documents_and_single_text_file_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"no \.txt or \.md files in this folder"):
        load_documents(tmp_path)
    (tmp_path / "one.txt").write_text("Text.", encoding="utf-8")
    with pytest.raises(ValueError, match=r"one\.txt is one text file; pass the folder that holds it"):
        load_documents(tmp_path / "one.txt")


# ---------------------------------------------------------------- saved Hugging Face datasets

def _squad_rows():
    ctx1 = "The Velloran Glass Bridge crosses the Quenna River. It was completed in 1873."
    ctx2 = "Tarsk is a town on the Quenna River. Its guild maintains the bridge."
    return {
        "id": ["q1", "q2", "q3", "q4"],
        "title": ["Bridge", "Bridge", "Tarsk", "Tarsk"],
        "context": [ctx1, ctx1, ctx2, ctx2],
        "question": ["When was the bridge completed?", "What does the bridge cross?",
                     "Who maintains the bridge?", "Where is Tarsk?"],
        "answers": [{"text": ["1873"], "answer_start": [70]},
                    {"text": ["the Quenna River", "Quenna River"], "answer_start": [34, 38]},
                    {"text": ["Its guild"], "answer_start": [37]},
                    {"text": ["on the Quenna River"], "answer_start": [15]}],
    }


def test_saved_squadshifts_dataset(tmp_path):
    from datasets import Dataset, DatasetDict

    path = tmp_path / "squad"
    DatasetDict({"test": Dataset.from_dict(_squad_rows())}).save_to_disk(str(path))
    docs, tests, problems = load_documents(f"hf:{path}")  # format inferred from the columns
    assert problems == []
    assert len(docs) == 2 and docs[0].title == "Bridge" and docs[0].text.startswith("The Velloran")
    assert all(d.id.startswith("sq-") for d in docs) and docs[0].id != docs[1].id
    assert [t["question"] for t in tests] == _squad_rows()["question"]
    assert tests[1]["answers"] == ["the Quenna River", "Quenna River"]
    assert [t["doc_id"] for t in tests] == [docs[0].id, docs[0].id, docs[1].id, docs[1].id]
    # n limits the questions, and with them the passages; ids do not depend on n
    docs2, tests2, _ = load_documents(f"hf:{path}?n=2&format=squadshifts&split=test")
    assert [d.id for d in docs2] == [docs[0].id] and len(tests2) == 2


def test_saved_hotpot_dataset(tmp_path):
    from datasets import Dataset, DatasetDict

    rows = {
        "id": ["h1", "h2"],
        "question": ["Which river does the bridge designed by Marrowgate cross?",
                     "In which town is the Hesk Foundry?"],
        "answer": ["Quenna", "Tarsk"],
        "type": ["bridge", "comparison"],
        "level": ["hard", "easy"],
        "supporting_facts": [{"title": ["Marrowgate", "Velloran Bridge"], "sent_id": [0, 1]},
                             {"title": ["Hesk Foundry"], "sent_id": [0]}],
        "context": [
            {"title": ["Velloran Bridge", "Marrowgate"],
             "sentences": [["The Velloran Bridge is in Tarsk.", " It crosses the Quenna."],
                           ["Ottilie Marrowgate was an engineer.", " She designed the bridge."]]},
            {"title": ["Hesk Foundry", "Marrowgate"],
             "sentences": [["The Hesk Foundry is in Tarsk."],
                           ["Marrowgate was a different person.", "No leading space here."]]},
        ],
    }
    path = tmp_path / "hotpot"
    DatasetDict({"validation": Dataset.from_dict(rows)}).save_to_disk(str(path))
    docs, tests, problems = load_documents(f"hf:{path}")
    assert problems == []
    assert [d.id for d in docs] == ["Velloran Bridge", "Marrowgate", "Hesk Foundry", "Marrowgate~2"]
    assert docs[0].text == "The Velloran Bridge is in Tarsk. It crosses the Quenna."
    assert docs[3].text == "Marrowgate was a different person. No leading space here."
    assert tests[0]["doc_ids"] == ["Marrowgate", "Velloran Bridge"]
    assert tests[0]["doc_id"] == "Marrowgate" and tests[0]["answers"] == ["Quenna"]
    assert tests[1]["doc_ids"] == ["Hesk Foundry"]


def test_bad_hf_specs(tmp_path):
    from datasets import Dataset

    path = tmp_path / "other"
    Dataset.from_dict({"a": [1], "b": ["x"]}).save_to_disk(str(path))
    with pytest.raises(ValueError, match="match neither"):
        load_documents(f"hf:{path}")
    with pytest.raises(ValueError, match="unknown option"):
        load_documents(f"hf:{path}?limit=3")
    with pytest.raises(ValueError, match="format='csv'"):
        load_documents(f"hf:{path}?format=csv")
    with pytest.raises(FileNotFoundError, match="no saved dataset"):
        load_documents(f"hf:{tmp_path / 'missing'}")
    with pytest.raises(ValueError, match="cannot tell the format"):
        load_documents("hf:someone/unknown_set/default")


def test_join_sentences_adds_spaces_only_where_missing():
    assert join_sentences(["A.", " B.", "C."]) == "A. B. C."
    assert join_sentences([" A.", ""]) == "A."


# ---------------------------------------------------------------- chunking

@pytest.fixture(scope="module")
def tokenizer(tiny_llama):
    from pdistill_jax.weights.tokenizer import load_tokenizer

    return load_tokenizer(tiny_llama)


def _locate(text: str, chunks: list[Document]) -> list[tuple[int, int]]:
    spans, at = [], 0
    for c in chunks:
        start = text.find(c.text, at)
        assert start >= 0, f"chunk {c.id} is not a piece of the document"
        spans.append((start, start + len(c.text)))
        at = start + 1
    return spans


def test_chunks_fit_overlap_and_cover_the_document(tokenizer):
    sentences = [f"Fact {i}: the capital of the kingdom number {i} is Tarsk, founded in 18{i:02d}."
                 for i in range(24)]
    text = " ".join(sentences[:8]) + "\n\n" + " ".join(sentences[8:16]) + "\n\n" + \
        " ".join(sentences[16:])
    doc = Document("kingdoms", text, "Kingdoms")
    chunks = chunk_document(doc, tokenizer, max_tokens=64, overlap=16)
    assert len(chunks) > 3
    assert [c.id for c in chunks] == [f"kingdoms#{i}" for i in range(len(chunks))]
    assert all(c.title == "Kingdoms" for c in chunks)
    for c in chunks:
        assert len(tokenizer(c.text, add_special_tokens=False)["input_ids"]) <= 64
    spans = _locate(text, chunks)
    assert spans[0][0] == 0 and spans[-1][1] == len(text)
    for (s0, e0), (s1, e1) in zip(spans, spans[1:]):
        assert s1 < e0, "consecutive chunks overlap"
        assert s1 > s0
    # cut at sentence boundaries when there is one in the window
    assert all(c.text.endswith(".") for c in chunks)


def test_chunking_hard_cuts_text_without_boundaries(tokenizer):
    doc = Document("blob", "x" * 3000)
    chunks = chunk_document(doc, tokenizer, max_tokens=50, overlap=0)
    assert len(chunks) > 1
    assert "".join(c.text for c in chunks) == doc.text  # no overlap: pieces concatenate exactly
    assert all(len(tokenizer(c.text, add_special_tokens=False)["input_ids"]) <= 50 for c in chunks)


def test_short_document_is_returned_as_is_and_bad_settings_are_refused(tokenizer):
    doc = Document("short", "A short text.", "T")
    assert chunk_document(doc, tokenizer, max_tokens=64, overlap=8) == [doc]
    with pytest.raises(ValueError, match="overlap"):
        chunk_document(doc, tokenizer, max_tokens=64, overlap=40)
    with pytest.raises(ValueError, match="too small"):
        chunk_document(doc, tokenizer, max_tokens=4)


def test_sentences_split_at_their_ends_not_at_abbreviations_or_numbers():
    text = ("History\nThe tower stands in Brask. It was built in 1794 by J. R. Haarberg for "
            "St. Mark's church! Is it 31.5 m tall? \"Yes.\" It is, e.g. the tallest.\n"
            "Two words.")
    assert split_sentences(text) == [
        "History The tower stands in Brask.",  # a heading joins the sentence after it
        "It was built in 1794 by J. R. Haarberg for St. Mark's church!",
        "Is it 31.5 m tall?",
        "\"Yes.\" It is, e.g. the tallest. Two words.",  # short pieces join a neighbour
    ]
    assert split_sentences("One line only") == ["One line only"]
    assert " ".join(split_sentences(text)).split() == text.split()  # nothing lost
