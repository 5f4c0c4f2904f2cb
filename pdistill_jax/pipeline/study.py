"""A study of training variants on one generation's data (`scripts/study_injection.py`).

VARIANTS.yaml holds `base:` (a StudyConfig: the model, the generated data, the questions, the
system message, answering, and each variant's default `train:` and `rows:`) and `variants:`, a
list of {name, train: {TrainConfig fields}, rows: {RowsConfig fields}} laid over the base's.
With `base.seeds` each variant runs once per seed, as <name>-seed<k>.

Each variant trains into OUT/<name>/run on its rows (study_data.py), then answers the test
questions closed-book with its adapter and the retention questions; one row per variant goes
into OUT/results.jsonl and the table OUT/results.md (study_table.py). The base model closed-book
and with the gold document (RAG) answer once per question set, kept in OUT/_baselines/<key>/.

Every step is a `stages.Stage` with its record beside its output, so a rerun skips a variant
whose settings, data and questions made its row, continues a training that was interrupted
(resuming from its checkpoints), and redoes a variant whose settings changed, replacing its row.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
from pathlib import Path

from pdistill_jax.config import (AnswerConfig, SamplingParams, StudyConfig, TrainConfig,
                                 VariantConfig, from_dict, read_yaml, to_dict)
from pdistill_jax.files import read_jsonl, read_jsonl_lines, write_jsonl_atomic
from pdistill_jax.log import logger
from pdistill_jax.pipeline.experiment import TRAIN_NEUTRAL, stage_fields
from pdistill_jax.pipeline.stages import CONTINUE, DONE, REDO, Stage, clear, execute, plan, read_record
from pdistill_jax.pipeline.study_data import (GeneratedData, document_order, read_generated,
                                              select_rows, taught_rows, write_rows)
from pdistill_jax.pipeline.study_table import write_table

_log = logger("study")
RESULTS_FILE = "results.jsonl"
BASELINES = {  # name -> (context, question set)
    "base_closed_book": ("none", "test"), "rag_gold": ("gold", "test"),
    "base_retention": ("none", "retention")}
# A variant's answers: predictions/<name>.jsonl -> (question set, context)
ANSWERS = {"test": ("test", "none"), "retention": ("retention", "none"),
           "test_gold": ("test", "gold")}


@dataclasses.dataclass(frozen=True)
class Study:
    base: StudyConfig
    variants: list[VariantConfig]
    source: Path  # the YAML file (relative paths in it may be relative to its folder)


# ---------------------------------------------------------------- reading VARIANTS.yaml

def load_study(path: str | Path) -> Study:
    """VARIANTS.yaml, every variant resolved and checked; a bad value is one `file:line:` error."""
    path = Path(path)
    data, lines = read_yaml(path)

    def where(key: str) -> str:
        return f"{path}:{lines[key]}: " if key in lines else f"{path}: "

    unknown = [k for k in data if k not in ("base", "variants")]
    if unknown:
        raise ValueError(f"{where(unknown[0])}unknown key {unknown[0]!r}: a study has `base:` "
                         "(the shared settings) and `variants:` (a list)")
    raw_base = data.get("base") or {}
    base = from_dict(StudyConfig, raw_base, str(path), lines=lines, prefix="base.")
    raw_variants = data.get("variants")
    if not isinstance(raw_variants, list) or not raw_variants:
        raise ValueError(f"{where('variants')}variants must be a non-empty list of "
                         "{name, train, rows} mappings")
    variants, names = [], {}
    for i, raw in enumerate(raw_variants):
        label, key = f"variants[{i}]", f"variants.{i}"
        if not isinstance(raw, dict) or "name" not in raw:
            raise ValueError(f"{where(key if key in lines else 'variants')}{label} must be a "
                             f"mapping with a name, got {raw!r}")
        # A value the variant takes from the base is reported at the base's line.
        vlines = {f"{label}.{k[len('base.'):]}": n for k, n in lines.items()
                  if k.startswith(("base.train.", "base.rows."))}
        vlines.update({f"{label}.{k[len(key) + 1:]}": n for k, n in lines.items()
                       if k.startswith(key + ".")})
        merged = {**raw, **{part: _overlay(raw_base.get(part) or {}, raw[part])
                            for part in ("train", "rows") if part in raw}}
        for part in ("train", "rows"):
            merged.setdefault(part, raw_base.get(part) or {})
        variant = from_dict(VariantConfig, merged, str(path), lines=vlines, prefix=f"{label}.")
        if variant.name in names:
            raise ValueError(f"{where(key + '.name')}{label}.name {variant.name!r} is taken by "
                             f"variants[{names[variant.name]}]; each variant needs its own name")
        names[variant.name] = i
        if base.seeds and "seed" in merged["train"]:
            at = f"{key}.train.seed" if f"{key}.train.seed" in lines else "base.train.seed"
            raise ValueError(f"{where(at)}train.seed is set while base.seeds is "
                             f"{list(base.seeds)}; set one of them")
        variants.append(variant)
    return Study(base, with_seeds(variants, base.seeds), path)


def with_seeds(variants: list[VariantConfig], seeds: tuple[int, ...]) -> list[VariantConfig]:
    """Each variant once per seed, as <name>-seed<k> with train.seed k (seed-major order, so an
    interrupted study has every variant at its first seeds); the variants as they are without."""
    if not seeds:
        return variants
    out = [dataclasses.replace(v, name=f"{v.name}-seed{k}", train=dataclasses.replace(v.train, seed=k))
           for k in seeds for v in variants]
    taken = {v.name for v in variants} & {v.name for v in out}
    if taken:
        raise ValueError(f"variant name {sorted(taken)[0]!r} is also one of another variant's "
                         "seeds (<name>-seed<k>); rename it")
    return out


def _overlay(base, override):
    """`override` laid over `base`, mapping by mapping (a variant's lora: {rank: 64} keeps the
    base's other lora fields); anything but two mappings is the override itself."""
    if not isinstance(base, dict) or not isinstance(override, dict):
        return override
    return {**base, **{k: _overlay(base.get(k), v) for k, v in override.items()}}


# ---------------------------------------------------------------- running a study

@dataclasses.dataclass
class _Inputs:
    """What every variant of one study call reads."""

    base: StudyConfig
    out: Path
    data: GeneratedData
    docs_n: int | None  # --docs N as given
    documents: list[str] | None  # --docs N: the first N documents; None: all
    docs: list[dict]  # the documents RAG(gold) reads
    questions: dict[str, list[dict]]  # "test", "retention" (possibly empty)
    system: str | None
    common: dict  # the settings every stage records: model, its weights, system
    question_ids: dict  # "questions.sha256", "retention.sha256"
    progress: bool
    models: "_Models"


class _Models:
    """The model answering now (the base, or a variant's adapter): one in memory at a time."""

    def __init__(self, spec: str):
        self.spec, self.key, self.lm = spec, None, None

    def get(self, adapter: Path | None):
        from pdistill_jax.weights.load import load_model

        if self.lm is None or self.key != adapter:
            self.lm = None
            self.lm = load_model(self.spec) if adapter is None else load_model(self.spec, adapter=adapter)
            self.key = adapter
        return self.lm

    def drop(self) -> None:  # before a training rewrites the adapter a loaded model holds
        self.key, self.lm = None, None


def run_study(study: Study, *, data: str | Path | None = None, out: str | Path = "runs/study",
              docs: int | None = None, progress: bool = True) -> list[dict]:
    """Runs every variant not yet in OUT/results.jsonl (see the module docstring); returns the
    rows of results.jsonl. data: the generation folder (default: base.data); docs: train and
    test on the first N documents only (the retention questions stay whole)."""
    from pdistill_jax.weights.load import reuse_loaded_checkpoints

    with reuse_loaded_checkpoints():  # every variant and baseline reads the same base weights
        inputs = _resolve(study, data, Path(out), docs, progress)
        baselines = _baselines(inputs)
        results = {row["name"]: row for row in read_jsonl(inputs.out / RESULTS_FILE)} \
            if (inputs.out / RESULTS_FILE).exists() else {}
        for variant in study.variants:
            row = _variant(inputs, variant, results.get(variant.name), baselines)
            if row is not None:
                results[variant.name] = row  # a replaced row keeps its place in the table
                write_jsonl_atomic(inputs.out / RESULTS_FILE, results.values())
                write_table(inputs.out / "results.md", list(results.values()))
        write_table(inputs.out / "results.md", list(results.values()))
    _log.info(f"results: {inputs.out / 'results.md'}")
    return list(results.values())


def _resolve(study: Study, data: str | Path | None, out: Path, docs: int | None,
             progress: bool) -> _Inputs:
    """The study's inputs read and checked, before any model is loaded."""
    from pdistill_jax.datagen.dataset import generation_system_message
    from pdistill_jax.datagen.documents import DOCS_SCHEMA
    from pdistill_jax.datagen.teacher_states import model_fingerprint
    from pdistill_jax.pipeline.run import resolve_path
    from pdistill_jax.train.run_folder import file_sha256
    from pdistill_jax.weights.registry import resolve_model

    base, here = study.base, study.source.parent
    generated = read_generated(Path(data) if data is not None else resolve_path(base.data, here))
    tests = _read_questions(resolve_path(base.questions, here), "questions", need_doc=True)
    retention = (_read_questions(resolve_path(base.retention_questions, here),
                                 "retention_questions", need_doc=False)
                 if base.retention_questions else [])
    docs_path = resolve_path(base.documents, here)
    documents = None
    if docs is not None:
        if docs < 1:
            raise ValueError(f"--docs must be >= 1, got {docs}")
        order = document_order(generated)
        documents = order[:docs]
        if docs > len(order):
            _log.info(f"--docs {docs}: the data has {len(order)} documents; using all of them")
        tests = [q for q in tests if str(q["doc_id"]) in set(documents)]
        if not tests:
            raise ValueError(f"--docs {docs}: no test question is about the first {docs} "
                             f"document(s) of {generated.folder} ({', '.join(documents)})")
    system = base.system if base.system is not None else generation_system_message(generated.folder)
    if base.system is None and system is not None:
        _log.info(f"system message: {system!r}, the one {generated.folder} was generated under")
    common = {"model": base.model, "model.weights": model_fingerprint(resolve_model(base.model)),
              "system": system}
    question_ids = {"questions.sha256": _sha(tests), "documents.sha256": file_sha256(docs_path),
                    "retention.sha256": _sha(retention) if retention else None}
    return _Inputs(base, out, generated, docs, documents, read_jsonl(docs_path, DOCS_SCHEMA, flag="documents"),
                   {"test": tests, "retention": retention}, system, common, question_ids,
                   progress, _Models(base.model))


def _read_questions(path: Path, what: str, need_doc: bool) -> list[dict]:
    from pdistill_jax.infer.answer import QUESTIONS_SCHEMA

    numbered = read_jsonl_lines(path, QUESTIONS_SCHEMA, flag=what)
    for n, q in numbered:
        answers = q.get("answers")
        if not answers or not all(isinstance(a, str) for a in answers):
            raise ValueError(f"{path}:{n}: a study's {what} need \"answers\", a non-empty list of "
                             "strings (they are scored)")
        if need_doc and "doc_id" not in q:
            raise ValueError(f"{path}:{n}: a study's test questions need a \"doc_id\" (the "
                             "document whose rows teach them)")
    if not numbered and need_doc:
        raise ValueError(f"{path} holds no questions")
    return [q for _, q in numbered]


def _sha(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def _run_stages(inputs: _Inputs, stages: list[Stage], work: dict, status: dict) -> None:
    for stage in stages:
        if status[stage.name] == REDO:
            clear(stage)
    for stage in stages:
        if status[stage.name] == DONE:
            continue
        _log.info(f"{stage.name}: " + ("interrupted before, continuing it"
                                       if status[stage.name] == CONTINUE else "running"))
        seconds = execute(stage, work[stage.name])
        _log.info(f"{stage.name}: finished in {seconds} s")


def _answer(inputs: _Inputs, adapter: Path | None, qset: str, context: str, output: Path,
            name: str) -> None:
    from tqdm import tqdm

    from pdistill_jax.infer.answer import answer_questions

    questions, base = inputs.questions[qset], inputs.base
    answering = AnswerConfig(context=context, system=inputs.system, batch_size=base.answer_batch_size,
                             sampling=SamplingParams(max_new_tokens=base.max_new_tokens))
    with tqdm(total=len(questions), desc=name, unit="q", file=sys.stderr,
              disable=not inputs.progress, dynamic_ncols=True) as bar:
        rows = answer_questions(inputs.models.get(adapter), questions, answering, docs=inputs.docs,
                                use_lora=adapter is not None, progress=bar.update, source=name)
    write_jsonl_atomic(output, rows)


def _score(inputs: _Inputs, qset: str, predictions: Path, out_dir: Path) -> float:
    """Match accuracy of a predictions file (its per-question scores written to out_dir)."""
    from pdistill_jax.infer.evaluate import evaluate, write_results

    summary, rows = evaluate(inputs.questions[qset], read_jsonl(predictions))
    write_results(out_dir, summary, rows)
    return summary["match_accuracy"]


def _baselines(inputs: _Inputs) -> dict:
    """The base model's accuracies for this question set, answered once and kept under
    OUT/_baselines/<key of model, questions and answering settings>/."""
    settings = {**inputs.common, **inputs.question_ids, "max_new_tokens": inputs.base.max_new_tokens}
    key = _sha(settings)[:16]
    folder = inputs.out / "_baselines" / key
    names = [n for n, (_, qset) in BASELINES.items() if inputs.questions[qset]]
    stages = [Stage(f"baseline {n}", folder / f"{n}.jsonl", settings) for n in names]
    status, _ = plan(stages, inputs.out)
    work = {f"baseline {n}": (lambda n=n: _answer(inputs, None, BASELINES[n][1], BASELINES[n][0],
                                                  folder / f"{n}.jsonl", n)) for n in names}
    _run_stages(inputs, stages, work, status)
    scores = {n: None for n in BASELINES}
    scores.update({n: _score(inputs, BASELINES[n][1], folder / f"{n}.jsonl", folder / "eval" / n)
                   for n in names})
    return {"key": key, **scores}


def _variant_stages(inputs: _Inputs, variant: VariantConfig, cfg: TrainConfig,
                    data_sha: str) -> list[Stage]:
    """Train, then answer the test (and retention) questions, with what decides each result."""
    folder = inputs.out / variant.name
    train = Stage(f"{variant.name} train", folder / "run", {
        **inputs.common, **stage_fields("train", cfg, [f"train.{n}" for n in TRAIN_NEUTRAL]),
        **stage_fields("rows", variant.rows, ()), "docs": inputs.documents, "data.sha256": data_sha})
    answering = {**inputs.common, "max_new_tokens": inputs.base.max_new_tokens}
    stages = [train, Stage(f"{variant.name} answer test", folder / "predictions" / "test.jsonl",
                           {**answering, "questions.sha256": inputs.question_ids["questions.sha256"]},
                           {train.name: train.fingerprint})]
    if inputs.questions["retention"]:
        stages.append(Stage(f"{variant.name} answer retention",
                            folder / "predictions" / "retention.jsonl",
                            {**answering, "retention.sha256": inputs.question_ids["retention.sha256"]},
                            {train.name: train.fingerprint}))
    if inputs.base.with_document:
        stages.append(Stage(f"{variant.name} answer test with its document",
                            folder / "predictions" / "test_gold.jsonl",
                            {**answering, "context": "gold",
                             "questions.sha256": inputs.question_ids["questions.sha256"],
                             "documents.sha256": inputs.question_ids["documents.sha256"]},
                            {train.name: train.fingerprint}))
    return stages


def _train(inputs: _Inputs, qa_file: Path, cfg, stage: Stage, resume: bool) -> None:
    from pdistill_jax.train.loop import train
    from pdistill_jax.train.run_folder import SUMMARY_FILE

    summary = stage.output / SUMMARY_FILE
    if resume and summary.exists() and json.loads(summary.read_text()).get("finished"):
        return  # finished, killed before its record said so: nothing left to train
    inputs.models.drop()
    train(inputs.base.model, qa_file, stage.output, cfg, resume=resume, progress=inputs.progress)


def _variant(inputs: _Inputs, variant: VariantConfig, old: dict | None, baselines: dict) -> dict | None:
    """The variant's row, trained and answered as needed; None when its row stands as it is."""
    from pdistill_jax.model.transformer import resolve_dtype

    # the study's system message for every variant; "auto" as the dtype it is here, so that the
    # records name it (a CPU run records float32, as before "auto" existed)
    cfg = dataclasses.replace(variant.train, system=inputs.system,
                              compute_dtype=resolve_dtype(variant.train.compute_dtype))
    rows = select_rows(inputs.data, None if inputs.documents is None else set(inputs.documents),
                       variant.rows, cfg.objective)
    if not rows:
        raise ValueError(f"variant {variant.name}: its rows options {to_dict(variant.rows)} keep no "
                         f"row of {inputs.data.folder}")
    qa_file, data_sha = write_rows(rows, inputs.out, inputs.data)
    stages = _variant_stages(inputs, variant, cfg, data_sha)
    fingerprint = _sha([s.fingerprint for s in stages])
    status, changes = plan(stages, inputs.out)
    if all(s == DONE for s in status.values()) and old is not None and old.get("fingerprint") == fingerprint \
            and old.get("baselines") == baselines["key"]:
        _log.info(f"{variant.name}: done already, skipped")
        return None
    if changes:  # the first is the most upstream stage redone; the others follow from it
        _log.info(changes[0] + ("; its row in results.jsonl is replaced" if old else ""))
    elif old is not None and old.get("fingerprint") != fingerprint:
        _log.info(f"{variant.name}: its row in results.jsonl was made from other settings, data "
                  "or questions; replacing it")
    train_stage, *answer_stages = stages
    work = {train_stage.name: lambda: _train(inputs, qa_file, cfg, train_stage,
                                             status[train_stage.name] == CONTINUE)}
    for stage in answer_stages:
        qset, context = ANSWERS[stage.output.stem]
        work[stage.name] = (lambda stage=stage, qset=qset, context=context: _answer(
            inputs, train_stage.output, qset, context, stage.output, stage.name))
    _run_stages(inputs, stages, work, status)
    return _row(inputs, variant, cfg, stages, fingerprint, qa_file, data_sha, rows, baselines)


def _row(inputs: _Inputs, variant: VariantConfig, cfg: TrainConfig, stages: list[Stage],
         fingerprint: str, qa_file: Path, data_sha: str, rows: list[dict], baselines: dict) -> dict:
    from pdistill_jax.infer.evaluate import exposures
    from pdistill_jax.train.run_folder import SUMMARY_FILE

    folder = inputs.out / variant.name
    train_stage, *answer_stages = stages
    summary = json.loads((train_stage.output / SUMMARY_FILE).read_text())
    scores = {s.output.stem: _score(inputs, ANSWERS[s.output.stem][0], s.output,
                                    folder / "eval" / s.output.stem) for s in answer_stages}
    if cfg.dev_share:  # the rows the dev set held out taught nothing
        from pdistill_jax.datagen.dataset import read_qa_rows
        from pdistill_jax.train.dev_set import split_dev_rows

        qa = read_qa_rows(qa_file)
        trained = {id(r) for r in split_dev_rows(qa, cfg.dev_share, cfg.seed)[0]}
        rows = [d for d, r in zip(rows, qa, strict=True) if id(r) in trained]
    # the passes the kept adapter saw: with a dev set, up to its lowest dev loss
    dev = summary.get("dev")
    passes = dev["best_step"] / summary["steps_per_epoch"] if dev else cfg.epochs
    exposed = exposures(inputs.questions["test"], taught_rows(inputs.data, rows, cfg.objective),
                        passes)
    seconds = {s.name: (read_record(s) or {}).get("seconds") for s in stages}
    return {
        "name": variant.name, "seed": cfg.seed, "fingerprint": fingerprint,
        "baselines": baselines["key"],
        "objective": cfg.objective, "changes": _changes(inputs.base, variant),
        "docs": inputs.docs_n,
        "rows": summary["rows"], "rows_skipped": summary.get("rows_skipped"),
        "steps": summary["steps"], "epochs": cfg.epochs,
        "dev": None if dev is None else {k: dev[k] for k in (
            "questions", "rows", "best_step", "best_loss", "stopped_early", "losses")},
        "exposures_per_fact": exposed["mean"], "covered": exposed["covered"],
        "coverage": exposed["fraction"],
        "train_wall_s": seconds[train_stage.name], "train_elapsed_s": summary.get("elapsed_s"),
        "answer_wall_s": round(sum(seconds[s.name] or 0.0 for s in answer_stages), 1),
        "closed_book": scores["test"], "n_questions": len(inputs.questions["test"]),
        "with_document": scores.get("test_gold"),
        "retention": scores.get("retention"), "n_retention": len(inputs.questions["retention"]),
        "base_closed_book": baselines["base_closed_book"], "rag_gold": baselines["rag_gold"],
        "base_retention": baselines["base_retention"],
        "first_loss": summary.get("first_loss"), "final_loss": summary.get("final_loss"),
        "teacher_rows_from_generation": summary.get("teacher_rows_from_generation"),
        "model": inputs.base.model, "system": inputs.system,
        "data": str(qa_file), "data_sha256": data_sha, "source_data": str(inputs.data.folder),
        "questions_sha256": inputs.question_ids["questions.sha256"],
        "train": to_dict(cfg), "rows_options": to_dict(variant.rows),
    }


def _changes(base: StudyConfig, variant: VariantConfig) -> dict:
    """The variant's settings that differ from the base's, flat ({"epochs": 10, "lora.rank": 64})."""
    changed = {}
    for prefix, mine, theirs in (("train", variant.train, base.train), ("rows", variant.rows, base.rows)):
        a, b = stage_fields(prefix, mine, ()), stage_fields(prefix, theirs, ())
        label = (lambda k: k[len("train."):]) if prefix == "train" else (lambda k: k)
        changed.update({label(k): v for k, v in a.items() if b.get(k) != v})
    return changed
