"""The sampler: greedy equals transformers, batching/padding is invisible, seeds reproduce."""
import numpy as np
import pytest
import torch

from pdistill_jax.weights.load import load_model
from pdistill_jax.model.prefill import PROMPT_MIN_WIDTH, bucket_length as ladder
from pdistill_jax.model.sampler import count_tokens, generate
from pdistill_jax.config import SamplingParams
from pdistill_jax.weights.tokenizer import chat_prompt_ids, end_token_ids

QUESTIONS = ["What is the capital of Velloria?", "Who jumps over the lazy dog?",
             "Write five questions about the text above.", "How many?", "red green blue"]


@pytest.fixture(scope="module", params=["tiny_llama", "tiny_qwen2"])
def setup(request):
    lm = load_model(request.getfixturevalue(request.param))
    prompts = [chat_prompt_ids(lm.tokenizer, q) for q in QUESTIONS]
    return request.getfixturevalue(request.param), lm, prompts, end_token_ids(lm.tokenizer, lm.cfg)


def test_greedy_matches_transformers_generate(setup):
    _check_greedy_matches_transformers(*setup)


@pytest.mark.parametrize("fixture", ["tiny_qwen3", "tiny_phi3", "tiny_gemma3"])
def test_greedy_matches_transformers_generate_other_families(fixture, request):
    # One test per family rather than the whole module again: the sampler is architecture-blind.
    # tiny_phi3's sliding window (6), and tiny_gemma3's on its local layers, is shorter than
    # every prompt.
    path = request.getfixturevalue(fixture)
    lm = load_model(path)
    prompts = [chat_prompt_ids(lm.tokenizer, q) for q in QUESTIONS]
    _check_greedy_matches_transformers(path, lm, prompts, end_token_ids(lm.tokenizer, lm.cfg))


def _check_greedy_matches_transformers(path, lm, prompts, end):
    from transformers import AutoModelForCausalLM

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
    with count_tokens() as batched:
        together = generate(lm.model, prompts, params, end_ids=end, batch_size=8)
    with count_tokens() as alone:
        for i, p in enumerate(prompts):
            with count_tokens() as inner:  # the innermost counter counts
                assert generate(lm.model, [p], params, end_ids=end, batch_size=1)[0] == together[i]
            assert inner.prompt_tokens == len(p)
    # the counts (per-stage throughput): an end token was decoded too; a static batch of 8 runs
    # 8 slots for as many steps as its longest row
    decoded = [len(c.tokens) + c.finished for c in together]
    assert batched.as_dict() == {"prompt_tokens": sum(map(len, prompts)),
                                 "new_tokens": sum(decoded), "slot_steps": 8 * max(decoded)}
    assert alone.as_dict() == {"prompt_tokens": 0, "new_tokens": 0, "slot_steps": 0}


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


def bucket_length(n):  # the sampler's ladder
    return ladder(n, PROMPT_MIN_WIDTH)


def test_bucket_lengths_bound_compiled_shapes():
    assert [bucket_length(n) for n in (1, 16, 17, 100, 260, 512, 513, 900)] == \
        [16, 16, 32, 128, 384, 512, 768, 1024]


def test_bad_requests(setup):
    _, lm, prompts, end = setup
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        generate(lm.model, prompts, SamplingParams(max_new_tokens=0), end_ids=end)
    with pytest.raises(ValueError, match="empty prompt"):
        generate(lm.model, [[]], SamplingParams(), end_ids=end)


@pytest.mark.parametrize("layout", ["fan_out", "one_row_each"])
def test_shared_prefill_equals_separate_rows(setup, layout):
    # Repeated prompts are prefilled once and fanned out; each row must still be exactly what it
    # is when generated alone (batch_size=1 never shares), hot and cold rows alike. With 5
    # distinct prompts in a batch of 8 there is nothing to save and rows keep their own prompt.
    _, lm, prompts, end = setup
    if layout == "fan_out":  # 4 distinct prompts in the first batch of 8: prefilled 4 times
        repeated = [prompts[0]] * 3 + [prompts[1]] * 2 + prompts[2:] + [prompts[0]]
    else:
        repeated = [prompts[0]] * 2 + prompts[1:] + [prompts[3], prompts[0]]
    temps = [1.5, 0.0, 1.0, 1.5, 0.25, 0.0, 1.2, 0.7, 1.5][:len(repeated)]
    params = SamplingParams(temperature=1.0, top_k=50, max_new_tokens=12)
    shared = generate(lm.model, repeated, params, end_ids=end, seed=5, batch_size=8, temperatures=temps)
    alone = generate(lm.model, repeated, params, end_ids=end, seed=5, batch_size=1, temperatures=temps)
    assert shared == alone
    assert shared[0] != shared[1]  # a hot and a greedy continuation of the same prompt differ
    greedy = generate(lm.model, [prompts[0]], SamplingParams(max_new_tokens=12), end_ids=end)
    assert shared[1] == greedy[0]  # temperature 0 in a sampled batch = the argmax-only program


def test_documents_shared_by_prompts_are_prefilled_once_and_rows_are_unchanged(setup):
    # RAG-style prompts: two documents, several questions each. The document prefix is prefilled
    # once per document and each question continues it; greedy and sampled rows must be exactly
    # what they are alone.
    from pdistill_jax.model.prefill import plan_prefill

    _, lm, _, end = setup
    docs = ["The kingdom of Velloria was founded in 1873 by Ottilie Marrowgate, an engineer. " * 2,
            "Bram Quill sold cheese in Hesk and paid for the glass bridge repairs in 1921. " * 2]
    questions = ["Who founded it?", "When?", "What did Bram sell, and where did he sell it?"]
    prompts = [chat_prompt_ids(lm.tokenizer, f"{d}\n\n{q}") for d in docs for q in questions]
    prefixes, src, suffixes = plan_prefill(sorted(tuple(p) for p in prompts), 8)
    assert len(prefixes) == 2 and sorted(src.tolist()) == [0, 0, 0, 1, 1, 1]
    assert all(0 < len(sfx) < min(map(len, prefixes)) for sfx in suffixes)  # the questions only
    for params, temps in [(SamplingParams(max_new_tokens=10), None),
                          (SamplingParams(temperature=1.0, top_k=50, max_new_tokens=10),
                           [1.5, 0.0, 1.0, 0.7, 0.0, 1.2])]:
        shared = generate(lm.model, prompts, params, end_ids=end, seed=4, batch_size=8,
                          temperatures=temps)
        alone = generate(lm.model, prompts, params, end_ids=end, seed=4, batch_size=1,
                         temperatures=temps)
        assert shared == alone


def test_split_prefill_with_as_many_prefix_rows_as_rows(setup):
    # 3 prefixes in a batch of 4 rows pad to 4 prefix rows: the rows must still be fanned out
    # to their own prefix, not taken as one prefix row each.
    from pdistill_jax.model.prefill import plan_prefill

    _, lm, _, end = setup
    shared = list(range(10, 110))
    prompts = [shared + list(range(160, 190)), shared + list(range(161, 191)),
               list(range(5, 35)), list(range(6, 36))]
    prefixes, src, _ = plan_prefill(sorted(tuple(p) for p in prompts), 4)
    assert len(prefixes) == 3 and len(set(src.tolist())) == 3
    params = SamplingParams(max_new_tokens=8)
    assert generate(lm.model, prompts, params, end_ids=end, batch_size=4) == \
        generate(lm.model, prompts, params, end_ids=end, batch_size=1)


def test_prefill_plan_shares_only_when_it_saves():
    from pdistill_jax.model.prefill import plan_prefill

    template = tuple(range(1, 21))  # a 20-token chat template opening every prompt
    unrelated = [template + tuple(range(100 + 100 * i, 200 + 100 * i)) for i in range(4)]
    prefixes, src, suffixes = plan_prefill(unrelated, 4)  # 20 of 120 tokens shared: no saving
    assert prefixes == unrelated and src.tolist() == [0, 1, 2, 3] and suffixes == [()] * 4
    shorter = [p[:70] for p in unrelated]  # 20 of 70: 1 x 32 + 4 x 64 padded tokens < 4 x 128
    prefixes, src, suffixes = plan_prefill(shorter, 4)
    assert prefixes == [template] and src.tolist() == [0] * 4 and len(suffixes[0]) == 50
    same = [template + tuple(range(30, 230))] * 4  # one prompt sampled 4 times
    prefixes, src, suffixes = plan_prefill(same, 4)
    assert prefixes == [same[0][:-1]] and src.tolist() == [0] * 4
    assert suffixes == [same[0][-1:]] * 4  # each row's logits come from its own last token
    short = [(5,), (5,)]  # a one-token prompt keeps its token as the suffix
    assert plan_prefill(short, 2)[0] == list(short)  # nothing to save


def test_prefill_rows_are_few_shapes():
    from pdistill_jax.model.prefill import prefill_rows

    assert [prefill_rows(n, 16) for n in (1, 2, 3, 5, 8, 9, 16)] == [1, 2, 4, 8, 8, 16, 16]
    assert prefill_rows(3, 2) == 2


def test_temperatures_must_match_prompts(setup):
    _, lm, prompts, end = setup
    with pytest.raises(ValueError, match="2 temperatures for 5 prompts"):
        generate(lm.model, prompts, SamplingParams(), end_ids=end, temperatures=[0.0, 1.0])


@pytest.mark.parametrize("temperature,top_k,top_p,expected", [
    (1.0, 3, 1.0, [0.4, 0.25, 0.15, 0, 0, 0]),  # top-k renormalises the k best
    (1.0, 4, 0.6, [0.4, 0.25, 0, 0, 0, 0]),  # then top-p: the smallest prefix reaching 0.6
    (1.0, 0, 0.6, [0.4, 0.25, 0, 0, 0, 0]),  # top-p alone, over the whole vocabulary
    (2.0, 2, 1.0, [0.4 ** 0.5, 0.25 ** 0.5, 0, 0, 0, 0]),  # temperature flattens before the cut
    (1.0, 0, 1.0, [0.4, 0.25, 0.15, 0.1, 0.06, 0.04]),  # plain sampling
])
def test_sampling_distribution(temperature, top_k, top_p, expected):
    import jax
    import jax.numpy as jnp

    from pdistill_jax.model.token_choice import choose_token

    perm = np.array([3, 0, 5, 1, 4, 2])  # token i has probability p[perm[i]]: no sorted input
    logits = jnp.log(jnp.array([0.4, 0.25, 0.15, 0.1, 0.06, 0.04]))[perm]
    n = 20000
    draw = jax.jit(jax.vmap(lambda k: choose_token(logits, k, temperature, top_k, top_p < 1.0, top_p)))
    freq = np.bincount(np.asarray(draw(jax.random.split(jax.random.key(0), n))), minlength=6) / n
    want = np.array(expected) / np.sum(expected)
    assert np.abs(freq[np.argsort(perm)] - want).max() < 0.015


@pytest.mark.slow  # a long tiny-model check: CI's slow step runs it
def test_bfloat16_decoding_keeps_most_greedy_answers(setup):
    # `answer --decode-dtype bfloat16`: base weights held in bfloat16 (half the bytes a decode
    # step reads), the adapter in float32, logits in float32; on these tiny models the greedy
    # answers agree with float32's on most rows (the demo's count is a benchmark, not a test).
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from pdistill_jax.config import LoraConfig
    from pdistill_jax.weights.load import decode_options

    path, lm, _, end = setup
    prompts = [chat_prompt_ids(lm.tokenizer, q) for q in QUESTIONS + tiny_models_corpus()]
    lora = LoraConfig(rank=4, targets=("q", "v", "down"))
    lm32 = load_model(path, lora, seed=1, **decode_options("float32"))
    lm16 = load_model(path, lora, seed=1, **decode_options("bfloat16"))
    _, adapter, base = nnx.split(lm16.model, nnx.LoRAParam, nnx.Param)
    assert {leaf.dtype for leaf in jax.tree.leaves(base)} == {np.dtype(jnp.bfloat16)}
    assert {leaf.dtype for leaf in jax.tree.leaves(adapter)} == {np.dtype(np.float32)}
    hidden = jnp.zeros((1, lm16.cfg.hidden_size), jnp.bfloat16)
    assert lm16.model.logits(hidden, True, jnp.float32).dtype == jnp.float32
    # the adapter on (B away from zero), so that its float32 weights take part
    nudged = jax.tree.map(lambda a: a + 0.02, nnx.state(lm32.model, nnx.LoRAParam))
    nnx.update(lm32.model, nudged)
    nnx.update(lm16.model, nudged)
    params = SamplingParams(max_new_tokens=12)
    full = generate(lm32.model, prompts, params, end_ids=end, batch_size=4)
    light = generate(lm16.model, prompts, params, end_ids=end, batch_size=4)
    assert sum(a.tokens == b.tokens for a, b in zip(full, light)) >= 0.8 * len(prompts)
    assert sum(a.tokens[:1] == b.tokens[:1] for a, b in zip(full, light)) >= 0.9 * len(prompts)


def tiny_models_corpus() -> list[str]:
    import tiny_models

    return sorted(set(tiny_models.CORPUS))
