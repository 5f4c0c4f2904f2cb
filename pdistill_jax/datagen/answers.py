"""The teacher's answers: the base model with the document in its prompt answers every question
twice, at `a_temperature` (`answer`, the prefix on which prompt distillation compares teacher and
student) and at `sft_temperature` (`sft_answer`, the target of the SFT baseline)."""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from pdistill_jax.config import GenerateConfig, SamplingParams
from pdistill_jax.datagen.documents import Document
from pdistill_jax.datagen.seeds import derive_seed
from pdistill_jax.weights.tokenizer import DOC_SEPARATOR, chat_prompt_ids, end_token_ids


def teacher_message(document: str, question: str) -> str:
    """The teacher's user message: the document, a separator, the question (the paper's layout)."""
    return f"{document}{DOC_SEPARATOR}{question}"


def teacher_answers(lm, items: Sequence[tuple[Document, str]], cfg: GenerateConfig, seed: int,
                    on_batch: Callable[[str, int, int], None] | None = None,
                    on_teacher_state: Callable[[list[int], np.ndarray], None] | None = None
                    ) -> list[dict]:
    """qa rows: the teacher's answers to (document, question) pairs, at the PD and SFT temperatures.

    lm: the LoadedModel. on_teacher_state(teacher ids, hidden states) is called for every PD
    answer with the whole teacher sequence (prompt + answer ids, no end token) and the final
    hidden states the answer and its end were predicted from, (answer ids + 1, D): what PD
    training's teacher computes.
    """
    from pdistill_jax.model.sampler import generate

    if not items:
        return []
    tokenizer = lm.tokenizer
    prompts = [chat_prompt_ids(tokenizer, teacher_message(d.text, q), cfg.system) for d, q in items]
    n = len(prompts)
    # At one temperature a single answer serves both objectives (PD and SFT then train on the
    # same text); otherwise the PD answer (hot) and the SFT answer (cold) continue the same
    # teacher prompt, asked together so that the sampler prefills the prompt once for both.
    shared = cfg.a_temperature == cfg.sft_temperature
    temperatures = [cfg.a_temperature] * n + ([] if shared else [cfg.sft_temperature] * n)
    done_rows = 0

    def progress(rows):
        nonlocal done_rows
        done_rows += rows
        if on_batch:
            on_batch("answers", done_rows, len(temperatures))

    outs = generate(lm.model, prompts if shared else prompts + prompts,
                    SamplingParams(cfg.a_temperature, cfg.a_top_k, 1.0, cfg.max_answer_tokens),
                    end_ids=end_token_ids(tokenizer, lm.cfg), seed=derive_seed(seed, "answers"),
                    batch_size=cfg.batch_size, temperatures=temperatures,
                    keep_hidden=on_teacher_state is not None, progress=progress)
    if on_teacher_state is not None:
        for prompt, pd in zip(prompts, outs[:n]):
            on_teacher_state(prompt + pd.tokens, pd.hidden)
    rows = []
    for (doc, question), pd, sft in zip(items, outs[:n], outs[n:] if not shared else outs):
        rows.append({
            "doc_id": doc.id, "document": doc.text, "question": question,
            "answer": tokenizer.decode(pd.tokens, skip_special_tokens=True).strip(),
            "sft_answer": tokenizer.decode(sft.tokens, skip_special_tokens=True).strip(),
            "answer_finished": pd.finished, "sft_finished": sft.finished,
        })
    return rows
