"""The teacher's hidden states computed once per run give the same training as the teacher run
in every step: the same step losses and the same adapter. Those the sampler keeps while writing
the answers are the teacher's, and training takes them only for the sequences they belong to."""
import dataclasses
import json
import shutil

import jax
import numpy as np
import pytest

from pdistill_jax.config import LoraConfig, TrainConfig
from pdistill_jax.train.batches import make_train_data
from pdistill_jax.datagen.dataset import read_qa_rows
from pdistill_jax.model.prefill import plan_prefill
from pdistill_jax.model.sharding import global_batch
from pdistill_jax.train.step import TEACHER_HIDDEN, TEACHER_KEYS, make_teacher_hidden, make_train_step
from pdistill_jax.train.teacher_cache import (attach_teacher_hidden, compute_teacher_cache,
                                        compute_teacher_cache_shared)
from pdistill_jax.weights.tokenizer import load_tokenizer
from pdistill_jax.train.loop import train

from test_step import random_batch, setup, tiny_lora, train_config  # noqa: F401 (fixture)
from test_loop import metrics, write_qa


# kl is also checked end to end by test_training_with_the_teacher_cache_equals_training_without
@pytest.mark.parametrize("objective", [pytest.param("kl", marks=pytest.mark.slow), "jsd"])
def test_step_with_cached_teacher_hidden_equals_step_with_teacher(tiny_lora, objective):  # noqa: F811
    cfg = train_config(objective=objective, batch_size=4)
    _, mesh, graphdef, base, state, optimizer = setup(tiny_lora, cfg, mesh_shape=(2, 1, 1))
    batch = random_batch(0, tiny_lora.cfg.vocab_size, 4)
    hidden = np.asarray(make_teacher_hidden(graphdef, mesh)(state.lora, base, batch))
    assert hidden.shape == batch["targets"].shape + (tiny_lora.cfg.hidden_size,)
    cache = [hidden[r, :batch["target_mask"][r].sum()] for r in range(4)]
    cached = attach_teacher_hidden(batch, list(range(4)), cache)
    assert TEACHER_HIDDEN in cached and not set(TEACHER_KEYS) & set(cached)

    results = []
    for b in (batch, cached):  # a fresh state each time: the step donates it
        _, _, graphdef, base, state, optimizer = setup(tiny_lora, cfg, mesh_shape=(2, 1, 1))
        step = make_train_step(graphdef, optimizer, cfg, mesh)
        for _ in range(3):
            state, m = step(state, base, b)
        results.append((float(m["loss"]),
                        np.concatenate([np.ravel(x) for x in jax.tree.leaves(state.lora)])))
    assert results[0][0] > 0
    np.testing.assert_allclose(results[1][0], results[0][0], rtol=1e-5)
    np.testing.assert_allclose(results[1][1], results[0][1], rtol=1e-4, atol=1e-6)


def cached_and_plain_runs(model, tmp_path, monkeypatch, cfg: TrainConfig):
    """The same training twice, with the frozen states cached (teacher_cache_gb 4) and without
    (0): ((summary, run folder) cached, (summary, run folder) plain), and their step losses.

    A cached run groups rows by student length, a plain one by teacher length; the two are
    compared on the same batches by planning the plain run by student length too."""
    import pdistill_jax.train.loop as train_module

    def by_student(*args, **kwargs):
        return dataclasses.replace(make_train_data(*args, **kwargs), order_by="student")
    monkeypatch.setattr(train_module, "make_train_data", by_student)
    qa = write_qa(tmp_path / "qa.jsonl")
    runs = {}
    for gb in (4.0, 0.0):
        out = tmp_path / f"run_{gb}"
        runs[gb] = train(str(model), qa, out, dataclasses.replace(cfg, teacher_cache_gb=gb),
                         progress=False), out
    losses = [[r["loss"] for r in metrics(runs[gb][1])] for gb in (4.0, 0.0)]
    return runs[4.0], runs[0.0], losses


def test_training_with_the_teacher_cache_equals_training_without(tiny_llama, tmp_path, monkeypatch):
    cfg = TrainConfig(lora=LoraConfig(rank=8, alpha=16), lr=2e-2, batch_size=4, epochs=2,
                      mesh=(2, 1, 1), system="Answer briefly.")
    (cached, _), (plain, _), (got, want) = cached_and_plain_runs(tiny_llama, tmp_path, monkeypatch, cfg)
    assert cached["teacher_cache_s"] is not None and plain["teacher_cache_s"] is None
    assert len(got) == len(want) == 8
    np.testing.assert_allclose(got, want, rtol=1e-4)
    assert cached["finished"] and plain["finished"]


def test_documents_prefilled_once_give_the_same_teacher_states(tiny_lora, tiny_llama, tmp_path):  # noqa: F811
    # 16 rows over 4 documents, plus a repeated question with another answer (the rows then
    # share their whole prompt): the prefix-shared teacher equals the plain batched teacher.
    rows = read_qa_rows(write_qa(tmp_path / "qa.jsonl"))
    rows.append(dataclasses.replace(rows[0], answer="Nobody knows, sadly."))
    data = make_train_data(rows, load_tokenizer(tiny_llama), objective="kl", max_seq_len=256,
                           system=None, rows_per_step=4, seed=0)
    prompts = sorted(tuple(e.teacher[:e.teacher_prompt_len]) for e in data.examples)
    assert len(plan_prefill(prompts[:4], 4)[0]) == 1  # one document's rows: one shared prefix
    cfg = train_config(batch_size=4)
    _, mesh, graphdef, base, state, _ = setup(tiny_lora, cfg, mesh_shape=(2, 1, 1))
    hidden_fn = make_teacher_hidden(graphdef, mesh)
    plain = compute_teacher_cache(data.examples, 4, lambda b: hidden_fn(state.lora, base, b),
                                  lambda b: global_batch(b, mesh))
    shared = compute_teacher_cache_shared(data.examples, 4, graphdef, state.lora, base)
    assert len(shared) == len(plain) == 17
    for got, want, e in zip(shared, plain, data.examples):
        assert got.shape == want.shape == (len(e.targets), tiny_lora.cfg.hidden_size)
        np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5)


# ---------------------------------------------------------------- the states generation keeps

def _teacher_rows(tiny_llama, decode_dtype: str = "float32"):
    """The tiny model answering questions about one document, keeping the teacher's states as
    generation does."""
    from pdistill_jax.datagen.documents import Document
    from pdistill_jax.datagen.answers import teacher_answers
    from pdistill_jax.config import GenerateConfig
    from pdistill_jax.weights.load import decode_options, load_model
    from pdistill_jax.datagen.teacher_states import model_fingerprint, state_entry

    lm = load_model(tiny_llama, **decode_options(decode_dtype))
    doc = Document("velloria", "The capital of the kingdom of Velloria is Tarsk, founded in 1873.")
    questions = ["When was Tarsk founded?", "What is the capital of Velloria?", "Who is the fox?",
                 "Where is Tarsk?", "Why is the dog lazy?", "What colour is the fox?",
                 "How many numbers are there?", "Who is the teacher?"]
    cfg = GenerateConfig(max_answer_tokens=6, batch_size=4, a_temperature=0.8, sft_temperature=0.8)
    fingerprint = model_fingerprint(lm.path)
    states, sampled = {}, []

    def keep(ids, hidden):
        states.update([state_entry(fingerprint, ids, hidden)])
        sampled.append(ids)

    rows = teacher_answers(lm, [(doc, q) for q in questions], cfg, seed=5, on_teacher_state=keep)
    return lm, rows, states, sampled


def test_sampler_keeps_the_teachers_hidden_states_at_the_answer_positions(tiny_llama):
    from flax import nnx

    from pdistill_jax.train.batches import Example
    from pdistill_jax.weights.load import load_model
    from pdistill_jax.model.sampler import generate
    from pdistill_jax.config import SamplingParams
    from pdistill_jax.weights.tokenizer import DOC_SEPARATOR, chat_prompt_ids, end_of_turn_id

    lm = load_model(tiny_llama)
    tok = lm.tokenizer
    doc = "The quick brown fox of Velloria jumps over the lazy dog."
    prompts = [chat_prompt_ids(tok, doc + DOC_SEPARATOR + q) for q in
               ("Which animal jumps?", "Who is lazy?", "Where does the fox live?")]
    prompts.append(chat_prompt_ids(tok, "What is red?"))  # no shared prefix with the others
    params = SamplingParams(temperature=0.0, max_new_tokens=6)
    temps = [0.0, 0.0, 0.9, 0.0]  # one sampled row: the sampling path keeps states too
    graphdef, lora, base = nnx.split(lm.model, nnx.LoRAParam, nnx.Param)
    eot = end_of_turn_id(tok)
    first = generate(lm.model, prompts, params, end_ids=[], batch_size=4, temperatures=temps)
    # No end token: every answer is cut at 6 tokens. Then row 0's third token ends it early.
    for end in ([], [first[0].tokens[2]]):
        outs = generate(lm.model, prompts, params, end_ids=end, batch_size=4, temperatures=temps,
                        keep_hidden=True)
        assert outs[0].finished == bool(end) and len(outs[0].tokens) <= (2 if end else 6)
        examples = [Example(teacher=np.asarray(p + c.tokens + [eot], np.int32),
                            student=np.asarray([0] + c.tokens + [eot], np.int32),
                            teacher_prompt_len=len(p), student_prompt_len=1)
                    for p, c in zip(prompts, outs)]
        want = compute_teacher_cache_shared(examples, 4, graphdef, lora, base)
        for c, w in zip(outs, want):
            assert c.hidden.shape == w.shape == (len(c.tokens) + 1, lm.cfg.hidden_size)
            np.testing.assert_allclose(c.hidden, w, rtol=2e-4, atol=2e-5)
        plain = generate(lm.model, prompts, params, end_ids=end, batch_size=4, temperatures=temps)
        assert [c.tokens for c in plain] == [c.tokens for c in outs]
        assert all(c.hidden is None for c in plain)


def test_training_takes_the_teacher_states_generation_kept(tiny_llama, tmp_path, capsys):
    from pdistill_jax.train.batches import _encode
    from pdistill_jax.datagen.teacher_states import TEACHER_STATES_DIR, save_teacher_states
    from pdistill_jax.weights.tokenizer import DOC_SEPARATOR, chat_prompt_ids

    lm, rows, states, sampled = _teacher_rows(tiny_llama)
    assert len(states) == len(rows) == 8
    rows[0]["answer"] += " Indeed."  # edited after generation: its stored states are not its own
    # Training re-tokenises the answer text: a row's states match when that gives the ids sampled.
    prompts = [chat_prompt_ids(lm.tokenizer, r["document"] + DOC_SEPARATOR + r["question"])
               for r in rows]
    assert all(ids[:len(p)] == p for ids, p in zip(sampled, prompts))
    round_trip = sum(_encode(lm.tokenizer, r["answer"]) == ids[len(p):]
                     for r, ids, p in zip(rows, sampled, prompts))
    assert 0 < round_trip < len(rows)
    data = tmp_path / "data"
    data.mkdir()
    (data / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    save_teacher_states(data / TEACHER_STATES_DIR / "wave-1.npz", states)
    (data / TEACHER_STATES_DIR / "wave-2.npz").write_bytes(b"not a zip file")  # a damaged file
    cfg = TrainConfig(lora=LoraConfig(rank=8, alpha=16), lr=2e-2, batch_size=4, epochs=2,
                      mesh=(2, 1, 1))
    with_states = train(str(tiny_llama), data, tmp_path / "with", cfg, progress=False)
    assert "wave-2.npz: unreadable" in capsys.readouterr().err
    shutil.rmtree(data / TEACHER_STATES_DIR)
    without = train(str(tiny_llama), data, tmp_path / "without", cfg, progress=False)
    assert with_states["teacher_rows_from_generation"] == round_trip
    assert without["teacher_rows_from_generation"] == 0
    np.testing.assert_allclose([r["loss"] for r in metrics(tmp_path / "with")],
                               [r["loss"] for r in metrics(tmp_path / "without")], rtol=1e-4)


@pytest.mark.slow  # a long tiny-model check: CI's slow step runs it
def test_states_decoded_from_bfloat16_weights_serve_a_bfloat16_training_only(tiny_llama, tmp_path):
    # generate --decode-dtype bfloat16 keeps states computed in bfloat16: a float32 training
    # (compute_dtype auto on CPU) runs its own teacher for every row, a bfloat16 one takes them.
    import jax.numpy as jnp
    import yaml

    from pdistill_jax.datagen.teacher_states import TEACHER_STATES_DIR, save_teacher_states
    from pdistill_jax.train.batches import _encode
    from pdistill_jax.weights.tokenizer import DOC_SEPARATOR, chat_prompt_ids

    lm, rows, states, sampled = _teacher_rows(tiny_llama, "bfloat16")
    assert lm.model.dtype == jnp.bfloat16 and len(states) == len(rows) == 8
    assert {a.dtype for a in states.values()} == {np.dtype(np.float32)}  # bfloat16 values, exactly
    prompts = [chat_prompt_ids(lm.tokenizer, r["document"] + DOC_SEPARATOR + r["question"])
               for r in rows]
    round_trip = sum(_encode(lm.tokenizer, r["answer"]) == ids[len(p):]
                     for r, ids, p in zip(rows, sampled, prompts))
    assert round_trip > 0
    data = tmp_path / "data"
    data.mkdir()
    (data / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    save_teacher_states(data / TEACHER_STATES_DIR / "wave-1.npz", states)
    cfg = TrainConfig(lora=LoraConfig(rank=4, alpha=8), batch_size=4, epochs=1, mesh=(1, 1, 1))
    auto = train(str(tiny_llama), data, tmp_path / "auto", cfg, progress=False)
    assert auto["teacher_rows_from_generation"] == 0
    saved = yaml.safe_load((tmp_path / "auto" / "config.yaml").read_text())
    assert saved["train"]["compute_dtype"] == "float32"  # auto, as this backend resolved it
    bf16 = train(str(tiny_llama), data, tmp_path / "bf16",
                 dataclasses.replace(cfg, compute_dtype="bfloat16"), progress=False)
    assert bf16["teacher_rows_from_generation"] == round_trip
    assert all(np.isfinite(r["loss"]) for r in metrics(tmp_path / "bf16"))


def test_teacher_state_keys_name_the_checkpoint_the_dtype_and_the_ids(tmp_path):
    import os

    import jax.numpy as jnp

    from pdistill_jax.datagen.teacher_states import (load_teacher_states, model_fingerprint,
                                                     save_teacher_states, teacher_sequence_key)

    ckpt = tmp_path / "model"
    ckpt.mkdir()
    (ckpt / "model.safetensors").write_bytes(b"weights")
    before = model_fingerprint(ckpt)
    key = teacher_sequence_key(before, np.float32, [1, 2, 3])
    assert key == teacher_sequence_key(before, jnp.float32, np.array([1, 2, 3], np.int64))
    assert key != teacher_sequence_key(before, jnp.bfloat16, [1, 2, 3])
    assert key != teacher_sequence_key(before, np.float32, [1, 2, 4])
    os.utime(ckpt / "model.safetensors", ns=(1, 1))  # a re-fetched or edited checkpoint
    assert model_fingerprint(ckpt) != before
    state = np.arange(6, dtype=np.float32).reshape(3, 2)
    save_teacher_states(tmp_path / "states" / "wave-1.npz", {key: state})
    assert not [f for f in (tmp_path / "states").iterdir() if f.name.startswith(".")]  # no temp left
    found = load_teacher_states(tmp_path / "states", [key, "another"])
    assert list(found) == [key] and np.array_equal(found[key], state)


def test_an_interrupted_atomic_write_leaves_the_old_file_and_no_temporary(tmp_path):
    from pdistill_jax.files import atomic_writer

    target = tmp_path / "wave-1.npz"
    target.write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_writer(target, "wb") as f:
            f.write(b"half of the new")
            raise KeyboardInterrupt
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["wave-1.npz"]
