"""`pdistill run CONFIG`: the whole experiment, resumable stage by stage.

generate -> train PD -> train SFT -> answer (closed-book base/SFT/PD, RAG gold/BM25, PD+RAG)
-> evaluate (-> judge) -> report.md + results.png.

Every stage records, beside its output, the settings and inputs it was made from (`stages.py`;
which settings count: `experiment.py`). A rerun skips a stage whose record matches, continues one
that was interrupted, and redoes one whose settings changed together with every stage after it,
deleting the old output first so that results of two configs are never mixed; outputs without a
record (an older pdistill) are refused. `run_config.yaml` is written after those checks, so it
always describes the outputs beside it, and the report is rebuilt from the stages' results at the
end (`report.py`).
"""
from __future__ import annotations

import dataclasses
import functools
import sys
from pathlib import Path

from pdistill_jax.config import (BUILTIN, AnswerConfig, RunConfig, SamplingParams, asset_path,
                                 load_yaml, to_dict)
from pdistill_jax.files import read_jsonl, write_jsonl_atomic, write_yaml_atomic
from pdistill_jax.log import logger
from pdistill_jax.pipeline.experiment import CONDITIONS, build_stages
from pdistill_jax.pipeline.report import REPORT_FILES, write_reports
from pdistill_jax.pipeline.stages import CONTINUE, DONE, REDO, Stage, clear, execute, plan

_log = logger("run")


def resolve_path(spec: str, config_dir: Path | None = None) -> Path:
    path = asset_path(spec)
    if spec.startswith(BUILTIN):
        return path
    if not path.is_absolute() and config_dir is not None and not path.exists():
        path = config_dir / path
    return path


def load_run_config(path: str | Path) -> RunConfig:
    return load_yaml(RunConfig, path)


def run(cfg: RunConfig, config_dir: Path | None = None, *, progress: bool = True) -> dict:
    """Runs (or continues) the experiment into cfg.out; returns the summary. progress: tqdm bars
    on stderr for generation, training and every answering stage."""
    from pdistill_jax.weights.load import reuse_loaded_checkpoints

    with reuse_loaded_checkpoints():  # every stage loads the same base model: read it once
        return _run(resolve_dtypes(cfg), config_dir, progress)


def resolve_dtypes(cfg: RunConfig) -> RunConfig:
    """cfg with every "auto" dtype (both trainings' compute_dtype, generation's and answering's
    decode_dtype) as the dtype it is on this backend: the stage records and run_config.yaml
    name what was used, a CPU run records float32 as before "auto" existed, and a run continued
    on another backend redoes the stages whose dtype changed."""
    from pdistill_jax.model.transformer import resolve_dtype

    def train(t):
        return dataclasses.replace(t, compute_dtype=resolve_dtype(t.compute_dtype))

    return dataclasses.replace(
        cfg, decode_dtype=resolve_dtype(cfg.decode_dtype), pd=train(cfg.pd), sft=train(cfg.sft),
        generate=dataclasses.replace(cfg.generate,
                                     decode_dtype=resolve_dtype(cfg.generate.decode_dtype)))


def _input_ids(cfg: RunConfig, docs: Path, questions: Path | None, retention: Path | None) -> dict:
    """What build_stages needs to know of the inputs: the identity of the model's weights and the
    sha256 of each file read (a question set without questions: None, no stages)."""
    from pdistill_jax.weights.registry import resolve_model
    from pdistill_jax.datagen.teacher_states import model_fingerprint
    from pdistill_jax.train.run_folder import file_sha256

    ids = {"model.weights": model_fingerprint(resolve_model(cfg.model)),
           "documents.sha256": file_sha256(docs)}
    if questions is not None:
        ids["questions.sha256"] = file_sha256(questions)
    if retention is not None:
        ids["retention_questions.sha256"] = file_sha256(retention)
    if cfg.judge:
        ids["judge.weights"] = model_fingerprint(resolve_model(cfg.judge))
    return ids


class _Models:
    """The model the stage at hand needs (the base, an adapter's, the judge): one in memory at a
    time, kept while the next stage needs the same."""

    def __init__(self, cfg: RunConfig, out: Path):
        self.cfg, self.out = cfg, out
        self.loaded: dict = {}
        self.judges: list = []

    def answerer(self, adapter: str | None):
        from pdistill_jax.weights.load import decode_options, load_model

        cfg, out = self.cfg, self.out
        if adapter not in self.loaded:
            self.loaded.clear()
            self.loaded[adapter] = load_model(
                cfg.model, adapter=None if adapter is None else out / f"train_{adapter}",
                **decode_options(cfg.decode_dtype))
        return self.loaded[adapter]

    def judge(self):
        from pdistill_jax.infer.judge import local_judge

        if not self.judges:
            self.loaded.clear()
            self.judges.append(local_judge(self.cfg.judge))
        return self.judges[0]


@dataclasses.dataclass
class _Inputs:
    """What the stages of one run read."""

    cfg: RunConfig
    out: Path
    docs_path: Path
    docs: list[dict]
    question_sets: dict[str, list[dict]]  # "test", "retention"
    models: _Models
    progress: bool  # tqdm bars on stderr


def _generate(run: _Inputs, stage: Stage) -> None:
    from pdistill_jax.datagen.generate import generate_data

    generate_data(run.cfg.model, run.docs_path, run.out / "data", run.cfg.generate,
                  show_progress=run.progress)


def _train(run: _Inputs, stage: Stage, kind: str) -> None:
    from pdistill_jax.train.loop import train

    train(run.cfg.model, run.out / "data", stage.output, getattr(run.cfg, kind),
          resume=stage.output.exists(), progress=run.progress)


def _answer(run: _Inputs, stage: Stage, name: str) -> None:
    from tqdm import tqdm

    from pdistill_jax.infer.answer import answer_questions

    cfg = run.cfg
    adapter, context, qset = CONDITIONS[name]
    questions = run.question_sets[qset]
    with tqdm(total=len(questions), desc=stage.name, unit="q", file=sys.stderr,
              disable=not run.progress, dynamic_ncols=True) as bar:
        answering = AnswerConfig(context=context, top_k=cfg.bm25_top_k, system=cfg.system,
                                 sampling=SamplingParams(max_new_tokens=cfg.max_new_tokens),
                                 batch_size=cfg.answer_batch_size, decode_dtype=cfg.decode_dtype)
        rows = answer_questions(run.models.answerer(adapter), questions, answering, docs=run.docs,
                                use_lora=adapter is not None, progress=bar.update, source=name)
    write_jsonl_atomic(run.out / "predictions" / f"{name}.jsonl", rows)


def _evaluate(run: _Inputs, stage: Stage, name: str, judged: bool) -> None:
    from pdistill_jax.infer.evaluate import evaluate, write_results

    questions = run.question_sets[CONDITIONS[name][2]]
    judge = run.models.judge() if judged else None
    predictions = read_jsonl(run.out / "predictions" / f"{name}.jsonl")
    write_results(stage.output, *evaluate(questions, predictions, judge))


def _do(run: _Inputs, stage: Stage) -> dict | None:
    """The work of one stage, by its name ("generate", "train_pd", "answer NAME", ...); returns
    the tokens its sampling read and generated, for the report's throughput table."""
    from pdistill_jax.model.sampler import count_tokens

    kind, _, name = stage.name.partition(" ")
    with count_tokens() as counts:
        if kind == "generate":
            _generate(run, stage)
        elif kind.startswith("train_"):
            _train(run, stage, kind[len("train_"):])
        elif kind == "answer":
            _answer(run, stage, name)
        else:
            _evaluate(run, stage, name, judged=kind == "judge")
    return counts.as_dict() if counts.new_tokens else None


def _prepare(cfg: RunConfig, stages: list[Stage], out: Path) -> dict[str, str]:
    """Each stage's status; clears what is to be redone (and a report that would outlive the
    outputs it describes), then writes run_config.yaml."""
    status, changes = plan(stages, out)  # refuses outputs it cannot check, before any change
    for line in changes:
        _log.info(line)
    for stage in stages:
        if status[stage.name] == REDO:
            clear(stage)
    if any(s != DONE for s in status.values()):
        for name in REPORT_FILES:
            (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    # Only now: every output left in `out` was made with these settings or is about to be redone.
    write_yaml_atomic(out / "run_config.yaml", to_dict(cfg))
    return status


def _run(cfg: RunConfig, config_dir: Path | None, progress: bool) -> dict:
    out = Path(cfg.out)
    docs_path = resolve_path(cfg.documents, config_dir)
    questions_path = resolve_path(cfg.questions, config_dir)
    retention_path = (resolve_path(cfg.retention_questions, config_dir)
                      if cfg.retention_questions else None)
    tests = read_jsonl(questions_path)
    retention = read_jsonl(retention_path) if retention_path else []
    docs = read_jsonl(docs_path)
    stages = build_stages(cfg, out, _input_ids(cfg, docs_path, questions_path if tests else None,
                                               retention_path if retention else None))
    status = _prepare(cfg, stages, out)
    inputs = _Inputs(cfg, out, docs_path, docs, {"test": tests, "retention": retention},
                     _Models(cfg, out), progress)
    for stage in stages:
        if status[stage.name] == DONE:
            _log.info(f"{stage.name}: done already, skipped")
            continue
        _log.info(f"{stage.name}: " + ("interrupted before, continuing it"
                                       if status[stage.name] == CONTINUE else "running"))
        seconds = execute(stage, functools.partial(_do, inputs, stage))
        _log.info(f"{stage.name}: finished in {seconds} s")
    summary = write_reports(out, cfg, stages, inputs.question_sets)
    _log.info(f"report: {out / 'report.md'}")
    return summary
