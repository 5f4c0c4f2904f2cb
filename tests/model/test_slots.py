"""Continuous batching: rows refill freed slots, and every row's completion is the one it gets
decoded alone (same seed, same row index), so slots change the cost, never the samples."""
import numpy as np
import pytest

from pdistill_jax.config import SamplingParams
from pdistill_jax.model.sampler import batch_rows, count_tokens, generate, generate_batches
from pdistill_jax.weights.load import load_model
from pdistill_jax.weights.tokenizer import chat_prompt_ids, end_token_ids

QUESTIONS = ["What is the capital of Velloria?", "Who jumps over the lazy dog?", "How many?",
             "Write five questions about the text above.", "red green blue", "Name a river.",
             "Why is the sky blue? Explain it to a child in three sentences.", "2 + 2 =",
             "Tell me about the Orvande reckoner and the people who built it.", "Hello"]


@pytest.fixture(scope="module")
def lm(tiny_llama):
    return load_model(tiny_llama)


def _prompts(lm):
    return [chat_prompt_ids(lm.tokenizer, q) for q in QUESTIONS]


def test_rows_refill_slots_and_sample_as_if_alone(lm):
    prompts, end = _prompts(lm), end_token_ids(lm.tokenizer, lm.cfg)
    limits = [3, 20, 7, 20, 1, 12, 20, 5, 16, 2]  # short rows end early and free their slot
    params = SamplingParams(temperature=1.0, top_k=20, max_new_tokens=20)
    with count_tokens() as slots:
        together = generate(lm.model, prompts, params, end_ids=end, seed=11, batch_size=4,
                            max_new_tokens=limits, keep_hidden=True)
    # batch_size 1: each row decoded alone in its own slot, nothing beside it
    alone = generate(lm.model, prompts, params, end_ids=end, seed=11, batch_size=1,
                     max_new_tokens=limits, keep_hidden=True)
    assert together == alone
    for a, b in zip(together, alone):
        np.testing.assert_allclose(a.hidden, b.hidden, rtol=1e-5, atol=1e-5)
        assert a.hidden.shape == (len(a.tokens) + 1, lm.cfg.hidden_size)
    for c, limit in zip(together, limits):
        assert len(c.tokens) + c.finished <= limit and (c.finished or len(c.tokens) == limit)
    # the cost follows the tokens: fewer slot steps than static batches of 4, each as long as
    # its longest row
    decoded = [len(c.tokens) + c.finished for c in together]
    static = sum(4 * max(decoded[i] for i in rows) for rows in batch_rows(prompts, 4))
    assert slots.new_tokens == sum(decoded)
    assert slots.new_tokens <= slots.slot_steps < static


def test_a_share_of_the_groups_decodes_as_in_the_whole_call(lm):
    prompts, end = _prompts(lm), end_token_ids(lm.tokenizer, lm.cfg)
    params = SamplingParams(temperature=1.0, top_k=0, top_p=0.9, max_new_tokens=10)
    whole = {n: c for n, _, c in generate_batches(lm.model, prompts, params, end_ids=end, seed=2,
                                                  batch_size=3)}
    share = list(generate_batches(lm.model, prompts, params, end_ids=end, seed=2, batch_size=3,
                                  batches=[3, 1]))
    assert sorted(n for n, _, _ in share) == [1, 3]
    for number, rows, completions in share:
        assert rows == batch_rows(prompts, 3)[number] and completions == whole[number]


def test_bad_limits_are_refused(lm):
    prompts, end = _prompts(lm)[:2], end_token_ids(lm.tokenizer, lm.cfg)
    with pytest.raises(ValueError, match="2 max_new_tokens for 1 prompts"):
        generate(lm.model, prompts[:1], SamplingParams(), end_ids=end, max_new_tokens=[3, 4])
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        generate(lm.model, prompts, SamplingParams(), end_ids=end, max_new_tokens=[3, 0])
