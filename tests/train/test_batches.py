"""Training data: token layout of teacher/student/targets, truncation, bucketing, epoch order."""
import dataclasses
import itertools
import json

import numpy as np
import pytest

from pdistill_jax.model.prefill import bucket_length as prefill_bucket_length
from pdistill_jax.train.batches import (MIN_SHARED_PREFIX, DataPosition, Example, TrainData,
                               WIDTH_MULTIPLE, collate, epoch_plan, fitted_widths,
                               make_train_data, open_book_twins, shared_student_prefix,
                               tokenize_rows)
from pdistill_jax.datagen.dataset import QARow, read_qa_rows
from pdistill_jax.weights.tokenizer import DOC_SEPARATOR, chat_prompt_ids, end_of_turn_id, load_tokenizer


def bucket_length(n, minimum=32):  # the training batches' ladder
    return prefill_bucket_length(n, minimum)


DOC = "The capital of the kingdom of Velloria is Tarsk, founded in 1873."


@pytest.fixture(scope="module")
def tok(tiny_llama):
    return load_tokenizer(tiny_llama)


def _rows(n, seed=0):
    rng = np.random.default_rng(seed)
    return [QARow(document=DOC + " The fox is red." * int(rng.integers(0, 12)),
                  question=f"What happened in year {1800 + i}?",
                  answer="It was founded in 1873 by the quick brown fox." * int(rng.integers(1, 4)),
                  sft_answer=f"Tarsk {i}.", doc_id=str(i % 3))
            for i in range(n)]


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_teacher_and_student_share_answer_ids_and_positions_point_before_targets(tok):
    rows = _rows(6)
    data = tokenize_rows(rows, tok, max_seq_len=1024)
    eot = end_of_turn_id(tok)
    assert (data.truncated, data.skipped) == (0, 0)
    for row, ex in zip(rows, data.examples):
        answer = tok(row.answer, add_special_tokens=False)["input_ids"]
        n = len(answer) + 1
        assert ex.teacher[-n:].tolist() == answer + [eot] == ex.student[-n:].tolist()
        assert ex.teacher[:-n].tolist() == chat_prompt_ids(tok, row.document + DOC_SEPARATOR + row.question)
        assert ex.student[:-n].tolist() == chat_prompt_ids(tok, row.question)

    batch = collate(data.examples, [0, 3, 5], rows=4)
    for r, i in enumerate([0, 3, 5]):
        m = batch["target_mask"][r]
        targets = batch["targets"][r][m]
        assert tok.decode(targets) == rows[i].answer + "<|im_end|>"
        for side in ("teacher", "student"):
            tokens, pos = batch[f"{side}_tokens"][r], batch[f"{side}_pos"][r][m]
            # The logits at pos[j] predict targets[j]: the next token in the sequence is the target.
            assert tokens[pos + 1].tolist() == targets.tolist()
            # The first prediction is made at the end of the prompt, where the assistant begins.
            assert tok.decode(tokens[:pos[0] + 1]).endswith("<|im_start|>assistant\n")
            assert batch[f"{side}_valid"][r].sum() == pos[-1] + 2
        assert tok.decode(batch["teacher_tokens"][r][:batch["teacher_pos"][r][0] + 1]).count(
            rows[i].question) == 1
    # The fourth row is filler for a partial batch: no valid token, no target.
    assert not batch["target_mask"][3].any() and not batch["student_valid"][3].any()
    assert not batch["teacher_pos"][3].any()
    for key, dtype in [("teacher_tokens", np.int32), ("teacher_valid", bool), ("targets", np.int32),
                       ("target_mask", bool), ("teacher_pos", np.int32), ("student_pos", np.int32)]:
        assert batch[key].dtype == dtype and batch[key].shape[0] == 4


def test_ce_student_uses_sft_answer(tok):
    rows = _rows(2)
    ex = tokenize_rows(rows, tok, objective="ce").examples[0]
    assert tok.decode(ex.targets) == rows[0].sft_answer + "<|im_end|>"
    assert tok.decode(ex.teacher).endswith(rows[0].answer + "<|im_end|>")  # teacher keeps `answer`
    batch = collate([ex], [0], rows=1)
    assert batch["teacher_pos"].max() < batch["teacher_valid"].sum()
    no_sft = [QARow(r.document, r.question, r.answer) for r in rows]
    assert tok.decode(tokenize_rows(no_sft, tok, objective="ce").examples[0].targets) == \
        rows[0].answer + "<|im_end|>"


def test_open_book_twins_give_the_student_the_teachers_prompt_before_the_same_answer(tok):
    rows = _rows(12)
    for objective in ("kl", "ce"):
        examples = tokenize_rows(rows, tok, objective=objective).examples
        twins = open_book_twins(examples, 0.25, seed=3, max_seq_len=1024)
        assert len(twins) == 3
        by_student_answer = {}
        for twin in twins:
            original = next(e for e in examples if np.array_equal(e.teacher, twin.teacher)
                            and np.array_equal(e.targets, twin.targets))
            # the student reads the document: its prompt is the teacher's, token for token
            assert twin.student_prompt_len == twin.teacher_prompt_len == original.teacher_prompt_len
            assert twin.student[:twin.student_prompt_len].tolist() == \
                original.teacher[:original.teacher_prompt_len].tolist()
            assert DOC in tok.decode(twin.student[:twin.student_prompt_len])
            by_student_answer[tok.decode(twin.targets)] = twin
        if objective == "ce":  # SFT's twin keeps the SFT answer
            assert all(a.startswith("Tarsk ") for a in by_student_answer)
        batch = collate(twins, [0, 1, 2], rows=3)
        for r in range(3):
            m = batch["target_mask"][r]
            assert batch["student_tokens"][r][batch["student_pos"][r][m] + 1].tolist() == \
                batch["targets"][r][m].tolist()
            if objective == "kl":  # the same prompt and answer: the same positions on both sides
                assert batch["student_pos"][r].tolist() == batch["teacher_pos"][r].tolist()
    examples = tokenize_rows(rows, tok).examples

    def drawn(seed):
        return [t.student.tolist() for t in open_book_twins(examples, 0.25, seed, 1024)]

    assert drawn(3) == drawn(3) != drawn(4)  # the seed draws the rows, reproducibly
    assert open_book_twins(examples, 0.0, seed=3, max_seq_len=1024) == []
    assert len(open_book_twins(examples, 1.0, seed=3, max_seq_len=1024)) == len(examples)
    # a twin that would not fit max_seq_len is left out; the question-only row stays
    longest = max(len(e.teacher) for e in examples)
    assert len(open_book_twins(examples, 1.0, seed=3, max_seq_len=longest - 1)) < len(examples)
    data = make_train_data(rows, tok, objective="kl", max_seq_len=1024, system=None,
                           rows_per_step=4, seed=3, open_book_share=0.5)
    assert len(data.examples) == 18 and data.steps_per_epoch == 5


def test_a_cut_answer_has_no_end_target_for_ce_but_keeps_it_for_kl(tok, tmp_path):
    row = {"document": DOC, "question": "When was Tarsk founded?", "answer": "In 1873, by",
           "sft_answer": "Tarsk was founded in", "answer_finished": False, "sft_finished": False}
    rows = read_qa_rows(_write(tmp_path / "qa.jsonl", [row]))
    assert not rows[0].answer_finished and not rows[0].sft_finished
    ce = tokenize_rows(rows, tok, objective="ce").examples[0]
    assert tok.decode(ce.targets) == "Tarsk was founded in"  # no end-of-turn to learn
    kl = tokenize_rows(rows, tok, objective="kl").examples[0]
    assert tok.decode(kl.targets) == "In 1873, by<|im_end|>"  # the KL compares distributions there
    finished = read_qa_rows(_write(tmp_path / "done.jsonl", [{**row, "sft_finished": True}]))
    assert tok.decode(tokenize_rows(finished, tok, objective="ce").examples[0].targets) == \
        "Tarsk was founded in<|im_end|>"
    with pytest.raises(ValueError, match=r':1: field "sft_finished" is "no", not true or false'):
        read_qa_rows(_write(tmp_path / "bad.jsonl", [{**row, "sft_finished": "no"}]))


def test_long_documents_are_truncated_and_hopeless_rows_skipped(tok):
    question, answer = "What is the capital?", "The capital is Tarsk."
    short = QARow(DOC, question, answer)
    long = QARow(DOC * 40, question, answer)
    hopeless = QARow(DOC, question, "The quick brown fox jumps over the lazy dog. " * 30)
    limit = 160
    data = tokenize_rows([short, long, hopeless], tok, max_seq_len=limit)
    assert (data.truncated, data.skipped, len(data.examples)) == (1, 1, 2)
    cut = data.examples[1]
    assert len(cut.teacher) <= limit
    assert len(cut.teacher) > limit - 12  # filled up to the limit, not cut far below it
    text = tok.decode(cut.teacher)
    assert question in text and text.endswith(answer + "<|im_end|>")
    user = text.split("<|im_start|>user\n")[1].split(DOC_SEPARATOR)[0]
    assert len(user) > len(DOC) and (DOC * 40).startswith(user)  # a prefix of the document
    assert cut.targets.tolist() == data.examples[0].targets.tolist()


def _plan_stats(data, window_steps, epochs=3):
    shapes, waste, real = set(), 0, 0
    for epoch in range(epochs):
        for idx in epoch_plan(data.lengths, data.rows_per_step, data.seed, epoch, window_steps):
            batch = collate(data.examples, idx, data.rows_per_step)
            shapes.add((batch["teacher_tokens"].shape[1], batch["student_tokens"].shape[1],
                        batch["targets"].shape[1]))
            waste += (~batch["teacher_valid"]).sum()
            real += batch["teacher_valid"].sum()
    return shapes, waste / (waste + real)


def test_bucketing_bounds_the_number_of_shapes(tok):
    rows = _rows(96, seed=1)
    data = TrainData(tokenize_rows(rows, tok).examples, rows_per_step=4, seed=0)
    shapes, waste = _plan_stats(data, window_steps=16)
    ladder = {bucket_length(n) for n in range(1, 2048)} | {bucket_length(n, 16) for n in range(1, 2048)}
    assert all(d in ladder for s in shapes for d in s)
    assert all(d % 32 == 0 or d & (d - 1) == 0 for s in shapes for d in s)
    # 72 batches over 3 epochs, but only a handful of compiled shapes: lengths range over ~2
    # octaves, so ~4 teacher buckets, with student/answer buckets that follow them.
    teacher_buckets = {bucket_length(len(e.teacher)) for e in data.examples}
    assert len({s[0] for s in shapes}) <= len(teacher_buckets) <= 5
    assert len(shapes) <= 10
    # Sorting within windows of 16 batches pads far less than batching in plain random order
    # (which needs fewer shapes only because nearly every batch pads to the longest bucket).
    random_shapes, random_waste = _plan_stats(data, window_steps=1)
    assert waste < 0.75 * random_waste
    assert [bucket_length(n) for n in (1, 33, 65, 97, 129, 200, 300, 600)] == \
        [32, 64, 96, 128, 192, 256, 384, 768]
    print(f"shapes {len(shapes)} vs {len(random_shapes)}, padding {waste:.3f} vs {random_waste:.3f}")


def _padding(data, side, epochs=3):
    waste = real = 0
    for epoch in range(epochs):
        for idx in data.plan(epoch):
            valid = collate(data.examples, idx, data.rows_per_step)[f"{side}_valid"]
            waste, real = waste + (~valid).sum(), real + valid.sum()
    return waste / (waste + real)


def test_batches_group_rows_by_the_sequence_the_step_runs(tok):
    # Document and answer lengths vary independently, so teacher and student lengths disagree.
    examples = tokenize_rows(_rows(96, seed=2), tok).examples
    by_teacher = TrainData(examples, rows_per_step=4, seed=0)
    by_student = TrainData(examples, rows_per_step=4, seed=0, order_by="student")
    assert by_student.lengths.tolist() == [len(e.student) for e in examples]
    assert _padding(by_student, "student") < 0.75 * _padding(by_teacher, "student")
    assert _padding(by_teacher, "teacher") < _padding(by_student, "teacher")
    with pytest.raises(ValueError, match="order_by='answer'; choose teacher or student"):
        TrainData(examples, rows_per_step=4, seed=0, order_by="answer")


def test_batches_leave_out_the_student_prefix_every_row_shares(tok):
    examples = tokenize_rows(_rows(12), tok).examples
    data = TrainData(examples, rows_per_step=4, seed=0, order_by="student", share_student_prefix=True)
    prefix = data.student_prefix.tolist()
    # The system preamble and the questions' common start ("What happened in year 18").
    assert tok.decode(prefix).startswith("<|im_start|>system\nYou are a helpful assistant.")
    assert tok.decode(prefix).endswith("What happened in year 18")
    assert all(e.student[:len(prefix)].tolist() == prefix for e in examples)
    whole = TrainData(examples, rows_per_step=4, seed=0, order_by="student")
    assert whole.student_prefix.size == 0
    for (_, idx, got), (_, _, full) in zip(data.batches(DataPosition(), 1),
                                           whole.batches(DataPosition(), 1)):
        for r, i in enumerate(idx):
            own = examples[i].student[len(prefix):]
            assert got["student_tokens"][r][got["student_valid"][r]].tolist() == own.tolist()
            m = got["target_mask"][r]
            # Positions are counted after the prefix and still point before each target.
            assert got["student_tokens"][r][got["student_pos"][r][m] + 1].tolist() == \
                got["targets"][r][m].tolist()
            np.testing.assert_array_equal(got["student_pos"][r][m] + len(prefix), full["student_pos"][r][m])
        for key in ("targets", "target_mask", "teacher_tokens", "teacher_pos"):
            np.testing.assert_array_equal(got[key], full[key])
        assert got["student_tokens"].shape[1] <= full["student_tokens"].shape[1]


def test_fitted_widths_are_the_cheapest_set_of_widths():
    rng = np.random.default_rng(0)
    for trial in range(40):
        needed = rng.integers(1, 130, rng.integers(1, 30)).tolist()
        cost = int(rng.choice([0, 16, 64, 256]))
        widths = fitted_widths(needed, 8, cost)
        assert widths == sorted(widths) and all(w % 8 == 0 for w in widths)
        assert widths[-1] == -(-max(needed) // 8) * 8
        total = lambda ws: sum(next(w for w in ws if w >= n) for n in needed) + cost * len(ws)
        candidates = sorted({-(-n // 8) * 8 for n in needed})
        brute = min(total(c) for k in range(1, len(candidates) + 1)
                    for c in itertools.combinations(candidates, k) if c[-1] == candidates[-1])
        assert total(widths) == brute, (needed, cost)
    assert fitted_widths([]) == []
    assert fitted_widths([70] * 50 + [100], 8, 256) == [72, 104]  # 50 rows save 1600 > 256
    assert fitted_widths([70, 100], 8, 256) == [104]  # one row would save 32 < 256


def test_student_batches_pad_to_widths_fitted_to_the_run(tok):
    examples = tokenize_rows(_rows(40, seed=3), tok).examples
    data = TrainData(examples, rows_per_step=4, seed=1, order_by="student", share_student_prefix=True)
    student_widths, answer_widths = data.widths(2)
    longest = max(len(e.targets) for e in examples)
    assert max(answer_widths) == -(-longest // WIDTH_MULTIPLE) * WIDTH_MULTIPLE
    assert all(a % WIDTH_MULTIPLE == 0 for a in answer_widths)
    batches = list(data.batches(DataPosition(), 2))
    # Each student width comes with one answer width: no more shapes than student widths.
    assert {b["targets"].shape[1:] + b["student_tokens"].shape[1:] for _, _, b in batches} \
        <= {(a, s) for s, a in zip(student_widths, answer_widths)}
    again = TrainData(examples, rows_per_step=4, seed=1, order_by="student", share_student_prefix=True)
    fitted_cols = sum(b["student_tokens"].shape[1] for _, _, b in batches)
    ladder_cols = sum(bucket_length(int(b["student_valid"].sum(1).max())) for _, _, b in batches)
    assert fitted_cols <= ladder_cols
    # A resumed run (from epoch 1, batch 2) gets the very batches the whole run had there.
    resumed = list(again.batches(DataPosition(1, 2), 2))
    for (pos, idx, got), (pos0, idx0, want) in zip(resumed, batches[len(batches) - len(resumed):]):
        assert pos == pos0 and idx.tolist() == idx0.tolist()
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])
    # Batches grouped by the teacher (the step runs it) keep the ladder.
    assert TrainData(examples, rows_per_step=4, seed=1).widths(2) == (None, None)


def test_long_answers_widen_only_the_batches_that_hold_them(tok):
    # Restatement-like rows (long answers) among short Q&A: the short batches' loss positions
    # stay short instead of padding to the longest answer of the run.
    rows = _rows(40, seed=3)
    rows[:4] = [dataclasses.replace(r, answer=" ".join(["The island has a long history."] * 12))
                for r in rows[:4]]
    examples = tokenize_rows(rows, tok).examples
    data = TrainData(examples, rows_per_step=4, seed=1, order_by="student", share_student_prefix=True)
    batches = list(data.batches(DataPosition(), 1))
    longest = max(len(e.targets) for e in examples)
    short = [b for _, idx, b in batches if max(len(examples[i].targets) for i in idx) < longest // 2]
    assert short and all(b["targets"].shape[1] < longest for b in short)
    for _, idx, b in batches:
        assert b["target_mask"].sum() == sum(len(examples[i].targets) for i in idx)


def test_shared_student_prefix_keeps_each_rows_last_prompt_token_and_a_minimum_length():
    def example(student, prompt_len):
        return Example(np.asarray(student, np.int32), np.asarray(student, np.int32), prompt_len, prompt_len)

    same = [example(list(range(20)) + [99, 5], 20), example(list(range(20)) + [98], 20)]
    # Identical prompts: the prefix stops one short, so every row keeps the token that
    # predicts its first answer token.
    assert shared_student_prefix(same).tolist() == list(range(19))
    short = [example([1] * (MIN_SHARED_PREFIX - 1) + [2, 3, 4], 9),
             example([1] * (MIN_SHARED_PREFIX - 1) + [5, 6], 8)]
    assert shared_student_prefix(short).size == 0  # not worth a pass of its own
    assert shared_student_prefix([]).size == 0


def test_epoch_order_differs_per_epoch_is_reproducible_and_resumable(tok):
    examples = tokenize_rows(_rows(30), tok).examples
    data = TrainData(examples, rows_per_step=4, seed=7)
    plans = [data.plan(e) for e in range(3)]
    for plan in plans:  # every row exactly once per epoch; only the last batch may be partial
        assert sorted(np.concatenate(plan).tolist()) == list(range(30))
        assert [len(b) for b in plan].count(4) == len(plan) - 1 == data.steps_per_epoch - 1
    orders = [np.concatenate(p).tolist() for p in plans]
    assert orders[0] != orders[1] != orders[2] != orders[0]
    again = TrainData(tokenize_rows(_rows(30), tok).examples, rows_per_step=4, seed=7)
    assert [b.tolist() for b in again.plan(1)] == [b.tolist() for b in plans[1]]
    other_seed = TrainData(examples, rows_per_step=4, seed=8)
    assert np.concatenate(other_seed.plan(0)).tolist() != orders[0]

    full = list(data.batches(DataPosition(), 3))
    assert len(full) == 3 * data.steps_per_epoch
    start = DataPosition(1, 3)
    tail = list(data.batches(start, 3))
    k = start.global_step(data.steps_per_epoch)
    assert len(tail) == len(full) - k
    for (pa, ia, ba), (pb, ib, bb) in zip(full[k:], tail):
        assert pa == pb and ia.tolist() == ib.tolist()
        assert all(np.array_equal(ba[key], bb[key]) for key in ba)
    pos = DataPosition()
    for p, _, _ in full:
        assert p == pos
        pos = pos.advance(data.steps_per_epoch)
    assert pos == DataPosition(3, 0)
    window = epoch_plan(np.arange(30), 4, seed=7, epoch=0, window_steps=2)
    assert all(np.all(np.diff(b) >= 0) for b in window)  # sorted by length inside each batch


def test_reads_generate_folder_and_reports_bad_rows(tmp_path, tok):
    good = {"document": DOC, "question": "Capital?", "answer": "Tarsk.", "doc_id": "d1"}
    folder = tmp_path / "gen"
    folder.mkdir()
    _write(folder / "qa.jsonl", [good, {**good, "sft_answer": "Tarsk"}])
    rows = read_qa_rows(folder)
    assert [r.sft_answer for r in rows] == [None, "Tarsk"] and rows[0].doc_id == "d1"
    data = make_train_data(read_qa_rows(folder), tok, objective="kl", max_seq_len=512,
                           system="Be brief.", rows_per_step=2, seed=0)
    assert tok.decode(data.examples[0].student).startswith("<|im_start|>system\nBe brief.")

    cases = [
        ([good, {"document": DOC, "answer": "x"}], ":2: field \"question\" is missing"),
        ([good, good, {**good, "answer": "  "}], ":3: field \"answer\" is empty"),
        ([{**good, "document": 5}], ":1: field \"document\" is 5, not a string"),
        ([good, {**good, "sft_answer": ""}], ":2: field \"sft_answer\" is empty"),
        ([good, "{not json"], ":2: invalid JSON"),
    ]
    for i, (rows, message) in enumerate(cases):
        path = _write(tmp_path / f"bad{i}.jsonl", rows)
        with pytest.raises(ValueError, match=f"{path}.*") as err:
            read_qa_rows(path)
        assert str(path) in str(err.value) and message in str(err.value), str(err.value)
    with pytest.raises(FileNotFoundError, match="qa.jsonl"):
        read_qa_rows(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_qa_rows(tmp_path / "missing.jsonl")
