"""The sampler: greedy equals transformers, batching/padding is invisible, seeds reproduce."""
import numpy as np
import pytest
import torch

from pdistill_jax.load import load_model
from pdistill_jax.sample import SamplingParams, bucket_length, generate
from pdistill_jax.tokenizer import chat_prompt_ids, end_token_ids

QUESTIONS = ["What is the capital of Velloria?", "Who jumps over the lazy dog?",
             "Write five questions about the text above.", "How many?", "red green blue"]


@pytest.fixture(scope="module", params=["tiny_llama", "tiny_qwen2"])
def setup(request):
    lm = load_model(request.getfixturevalue(request.param))
    prompts = [chat_prompt_ids(lm.tokenizer, q) for q in QUESTIONS]
    return request.getfixturevalue(request.param), lm, prompts, end_token_ids(lm.tokenizer, lm.cfg)


def test_greedy_matches_transformers_generate(setup):
    from transformers import AutoModelForCausalLM

    path, lm, prompts, end = setup
    ours = generate(lm.model, prompts, SamplingParams(max_new_tokens=24), end_ids=end, batch_size=4)
    ref_model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    for prompt, got in zip(prompts, ours):
        with torch.no_grad():
            out = ref_model.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False,
                                     eos_token_id=end, pad_token_id=end[0])
        ref = out[0, len(prompt):].tolist()
        if ref and ref[-1] in end:
            assert got.finished and got.tokens == ref[:-1]
        else:
            assert not got.finished and got.tokens == ref


def test_batched_padded_equals_one_by_one(setup):
    _, lm, prompts, end = setup
    params = SamplingParams(max_new_tokens=16)
    together = generate(lm.model, prompts, params, end_ids=end, batch_size=8)
    for i, p in enumerate(prompts):
        assert generate(lm.model, [p], params, end_ids=end, batch_size=1)[0] == together[i]


def test_sampling_is_seeded_and_row_independent(setup):
    _, lm, prompts, end = setup
    params = SamplingParams(temperature=1.5, top_k=50, top_p=0.95, max_new_tokens=12)
    a = generate(lm.model, prompts, params, end_ids=end, seed=7, batch_size=2)
    b = generate(lm.model, prompts, params, end_ids=end, seed=7, batch_size=4)
    c = generate(lm.model, prompts, params, end_ids=end, seed=8, batch_size=2)
    assert a == b  # a row's sample depends on (seed, row index), not on its batch-mates
    assert a != c


def test_top_k_one_is_greedy(setup):
    _, lm, prompts, end = setup
    greedy = generate(lm.model, prompts, SamplingParams(max_new_tokens=10), end_ids=end)
    topk1 = generate(lm.model, prompts, SamplingParams(temperature=1.0, top_k=1, max_new_tokens=10),
                     end_ids=end, seed=3)
    assert greedy == topk1


def test_bucket_lengths_bound_compiled_shapes():
    assert [bucket_length(n) for n in (1, 16, 17, 100, 512, 513, 900)] == [16, 16, 32, 128, 512, 768, 1024]


def test_bad_requests(setup):
    _, lm, prompts, end = setup
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        generate(lm.model, prompts, SamplingParams(max_new_tokens=0), end_ids=end)
    with pytest.raises(ValueError, match="empty prompt"):
        generate(lm.model, [[]], SamplingParams(), end_ids=end)
