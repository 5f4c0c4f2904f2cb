"""The embedded default model (SmolLM2-135M-Instruct GGUF): parity with transformers' GGUF loader."""
import numpy as np
import pytest
import torch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def both(embedded_model):
    from transformers import AutoModelForCausalLM

    from pdistill_jax.weights.load import load_model

    ours = load_model(embedded_model)
    ref = AutoModelForCausalLM.from_pretrained(str(embedded_model.parent), gguf_file=embedded_model.name,
                                               dtype=torch.float32).eval()
    return ours, ref


def test_gguf_logits_match_transformers_gguf_loader(both):
    import jax.numpy as jnp

    from pdistill_jax.model.transformer import causal_inputs
    from pdistill_jax.weights.tokenizer import chat_prompt_ids

    lm, ref = both
    ids = np.array([chat_prompt_ids(lm.tokenizer, "What is the tallest mountain on Earth?")])
    with torch.no_grad():
        expected = ref(torch.tensor(ids)).logits.numpy()
    pos, valid = causal_inputs(jnp.asarray(ids), jnp.ones(ids.shape, bool))
    hidden, _ = lm.model(jnp.asarray(ids), pos, valid, use_lora=False)
    got = np.asarray(lm.model.logits(hidden, use_lora=False))
    # 30 float32 layers: a relative error ~1e-6 of logits that reach ~40.
    assert np.abs(got - expected).max() < 5e-4


def test_gguf_greedy_answers_match_token_for_token(both):
    from pdistill_jax.model.sampler import generate
    from pdistill_jax.config import SamplingParams
    from pdistill_jax.weights.tokenizer import chat_prompt_ids, end_token_ids

    lm, ref = both
    questions = ["What is the capital of France?", "Name a primary colour.",
                 "The Brindlemoor Lighthouse is 38 metres tall.\n\n---\n\nHow tall is the Brindlemoor Lighthouse?"]
    prompts = [chat_prompt_ids(lm.tokenizer, q) for q in questions]
    end = end_token_ids(lm.tokenizer, lm.cfg)
    ours = generate(lm.model, prompts, SamplingParams(max_new_tokens=32), end_ids=end, batch_size=4,
                    use_lora=False)
    for prompt, got in zip(prompts, ours):
        with torch.no_grad():
            out = ref.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False,
                               eos_token_id=end, pad_token_id=end[0])[0, len(prompt):].tolist()
        assert got.tokens == [t for t in out if t not in end]
    assert "38" in lm.tokenizer.decode(ours[2].tokens)
