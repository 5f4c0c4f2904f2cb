"""A local LLM judge: our sampler, greedy, on the judge prompts of `evaluate.judge_prompt`."""
from __future__ import annotations

from typing import Callable

from pdistill_jax.weights.load import load_model
from pdistill_jax.model.sampler import generate
from pdistill_jax.config import SamplingParams
from pdistill_jax.weights.tokenizer import chat_prompt_ids, end_token_ids


def local_judge(model_spec: str, *, max_new_tokens: int = 96, batch_size: int = 16,
                progress: Callable[[int], None] | None = None) -> Callable[[list[str]], list[str]]:
    """A judge callable: prompts in, completions out (reasoning then a <grade> tag)."""
    lm = load_model(model_spec)
    end = end_token_ids(lm.tokenizer, lm.cfg)

    def judge(prompts: list[str]) -> list[str]:
        ids = [chat_prompt_ids(lm.tokenizer, p) for p in prompts]
        outs = generate(lm.model, ids, SamplingParams(max_new_tokens=max_new_tokens), end_ids=end,
                        batch_size=batch_size, use_lora=False, progress=progress)
        return [lm.tokenizer.decode(o.tokens, skip_special_tokens=True) for o in outs]

    return judge
