"""What a run config asks for: the conditions compared, and the stages that make them with the
settings and inputs that decide each stage's result (stages.py keeps and checks those records).

Results-neutral settings (RESULTS_NEUTRAL), left out of the records so that changing them redoes
nothing:
- `answer_batch_size`: answers are greedy, and a row's answer does not depend on the other rows
  of its batch (padding is masked; the sampler keys are per row);
- `generate.teacher_states_gb`: how many of the teacher's hidden states generation keeps for
  training to reuse; training computes the others itself (equal to float rounding);
- `pd.*` / `sft.*` `mesh`, `remat`, `teacher_cache_gb`, `save_every`, `keep_checkpoints`,
  `log_every`: the device layout, recomputation, caching of the teacher's states and
  bookkeeping; the same optimisation to float rounding (a resumed training may change them too).
  `compute_dtype` does change results and is not among them.
`out` is where the results go, not what they are. Every other field counts.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from pdistill_jax.config import RunConfig, to_dict
from pdistill_jax.pipeline.stages import Stage

# name -> (adapter: None | "pd" | "sft", context, question set)
CONDITIONS = {
    "base_closed_book": (None, "none", "test"),
    "rag_gold": (None, "gold", "test"),
    "rag_bm25": (None, "bm25", "test"),
    "sft_closed_book": ("sft", "none", "test"),
    "pd_closed_book": ("pd", "none", "test"),
    "pd_rag_gold": ("pd", "gold", "test"),
    "pd_rag_bm25": ("pd", "bm25", "test"),
    "retention_base": (None, "none", "retention"),
    "retention_pd": ("pd", "none", "retention"),
    "retention_sft": ("sft", "none", "retention"),
}

TRAIN_NEUTRAL = ("mesh", "remat", "teacher_cache_gb", "save_every", "keep_checkpoints", "log_every")
RESULTS_NEUTRAL = ("answer_batch_size", "generate.teacher_states_gb",
                   *(f"{kind}.{name}" for kind in ("pd", "sft") for name in TRAIN_NEUTRAL))


def stage_fields(prefix: str, cfg, neutral: Sequence[str] = RESULTS_NEUTRAL) -> dict:
    """A stage config's fields that decide results, flat ("pd.lora.rank": 32): all but the
    `neutral` ones (flat names, the prefix included). `system` is left out: it is the run's,
    recorded once per stage as `system`."""
    flat = {}

    def walk(path: str, value) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                walk(f"{path}.{key}", item)
        else:
            flat[path] = value

    walk(prefix, {k: v for k, v in to_dict(cfg).items() if k != "system"})
    return {k: v for k, v in flat.items() if k not in neutral}


def conditions(cfg: RunConfig) -> dict[str, tuple]:
    """The CONDITIONS a run compares: all, or without the BM25 ones when bm25_top_k is 0."""
    return {name: c for name, c in CONDITIONS.items() if cfg.bm25_top_k or c[1] != "bm25"}


def answer_order(cfg: RunConfig) -> list[tuple[str, tuple]]:
    """The run's conditions grouped by model (stable), so each model is built once."""
    return sorted(conditions(cfg).items(), key=lambda item: (None, "sft", "pd").index(item[1][0]))


def build_stages(cfg: RunConfig, out: Path, ids: dict[str, str]) -> list[Stage]:
    """Every stage in the order it runs, with the settings and inputs that decide its result.

    ids: "model.weights", "documents.sha256" and, for each question set that has questions,
    "questions.sha256" / "retention_questions.sha256"; "judge.weights" with a judge.
    """
    model = {"model": cfg.model, "model.weights": ids["model.weights"], "system": cfg.system}
    generate = Stage("generate", out / "data", {**model, "documents.sha256": ids["documents.sha256"],
                                                **stage_fields("generate", cfg.generate)})
    stages = [generate]
    trained = {}
    for kind in ("pd", "sft"):
        trained[kind] = Stage(f"train_{kind}", out / f"train_{kind}",
                              {**model, **stage_fields(kind, getattr(cfg, kind))},
                              {generate.name: generate.fingerprint})
        stages.append(trained[kind])
    answers = []
    for name, (adapter, context, qset) in answer_order(cfg):
        qkey = "questions.sha256" if qset == "test" else "retention_questions.sha256"
        if qkey not in ids:
            continue
        settings = {**model, "max_new_tokens": cfg.max_new_tokens, qkey: ids[qkey]}
        if cfg.decode_dtype != "float32":  # recorded only when set (as config.added_option
            settings["decode_dtype"] = cfg.decode_dtype  # does): older records still match
        if context != "none":
            settings["documents.sha256"] = ids["documents.sha256"]
        if context == "bm25":
            settings["bm25_top_k"] = cfg.bm25_top_k
        inputs = {} if adapter is None else {trained[adapter].name: trained[adapter].fingerprint}
        answer = Stage(f"answer {name}", out / "predictions" / f"{name}.jsonl", settings, inputs)
        answers.append((name, answer, qkey))
        stages += [answer, Stage(f"evaluate {name}", out / "eval" / name, {qkey: ids[qkey]},
                                 {answer.name: answer.fingerprint})]
    if cfg.judge:
        judge = {"judge": cfg.judge, "judge.weights": ids["judge.weights"]}
        stages += [Stage(f"judge {name}", out / "eval_judge" / name, {**judge, qkey: ids[qkey]},
                         {answer.name: answer.fingerprint}) for name, answer, qkey in answers]
    return stages
