"""Plans for a model config on a mesh, compiled without weights: per-device memory and FLOPs.

The model is built abstractly (`nnx.eval_shape`: no weight is ever allocated) exactly as the
trainer builds it (param dtype = compute dtype, the LoRA config, remat), placed by the project's
own rules (`sharding.state_shardings`), and the trainer's own jitted step
(`make_train_step(...).lower`) and the sampler's generate program (`lower_generate_batch`) are
lowered for those abstract arguments and compiled. XLA's memory analysis of each compiled
program is reported beside the arithmetic (array sizes / shards), and FLOPs are counted from the
compiled HLO's dot ops with every loop body multiplied by its trip count: XLA's own cost
analysis counts a while loop's body once, so for a model whose layers are a `lax.scan` it gives
about one layer's FLOPs, not a step's.

Compiled on whatever devices are given (in `pdistill plan`, fake CPU devices): the memory
figures are XLA:CPU's buffer assignment for the partitioned program, a guide to a TPU's but not
its compiler's plan (TPU XLA fuses, pads to (8, 128) tiles and schedules differently).
"""
from __future__ import annotations

import dataclasses
import math
import re
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pdistill_jax.config import ModelConfig, SamplingParams, TrainConfig
from pdistill_jax.model.prefill import bucket_length
from pdistill_jax.model.sampler import lower_generate_batch
from pdistill_jax.model.sharding import (batch_sharding, check_batch_splits, make_mesh,
                                         replicated, state_shardings)
from pdistill_jax.model.transformer import Transformer, compute_dtype, resolve_dtype
from pdistill_jax.train.batches import round_up
from pdistill_jax.train.step import (CE_MASK, TEACHER_HIDDEN, TrainState, configure_model,
                                     make_optimizer, make_train_step)

GIB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class PlanShapes:
    """The longest rows a plan is for, in tokens; padded to the widths the trainer and the
    sampler pad them to (`collate`, `left_padded`). The plan is the upper bound of a run with
    such rows: every student row carries all its tokens (a run shares the chat template's
    prefix once, `student_prefix`), and with lora.first_layer > 0 the frozen lower layers run
    in the step (a run caches their states when they fit teacher_cache_gb). With the retention
    regulariser on (TrainConfig.retention_weight) its rows run whole in the step too: the base
    model's pass over them included (a run caches it, `RetentionBatches.hidden`)."""

    teacher_len: int = 1024  # document + question + answer (the trainer's max_seq_len)
    student_len: int = 256  # question + answer, with the chat template
    answer_len: int = 128  # answer tokens + end of turn
    teacher_cached: bool = False  # the teacher's states come from the cache instead of the step
    sample_batch: int = 16  # prompts the sampler decodes at once (0: no sampler plan)
    prompt_len: int = 1024
    max_new_tokens: int = 128
    retention_len: int = 256  # general prompt + the base model's answer, with the chat template
    retention_answer_len: int = 128  # that answer's tokens + end of turn

    def __post_init__(self):
        for name in ("teacher_len", "student_len", "answer_len", "prompt_len", "max_new_tokens",
                     "retention_len", "retention_answer_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.sample_batch < 0:
            raise ValueError(f"sample_batch must be >= 0 (0: no sampler plan), got {self.sample_batch}")
        if self.answer_len >= self.student_len:
            raise ValueError(f"answer_len {self.answer_len} must be below student_len "
                             f"{self.student_len} (the student row holds the question too)")
        if self.retention_answer_len >= self.retention_len:
            raise ValueError(f"retention_answer_len {self.retention_answer_len} must be below "
                             f"retention_len {self.retention_len} (the row holds the prompt too)")


@dataclasses.dataclass(frozen=True)
class Weight:
    name: str  # dotted path, e.g. layers.attn.q.kernel
    shape: tuple[int, ...]
    dtype: str
    spec: str  # the PartitionSpec, mesh axes per dimension
    device_bytes: int


@dataclasses.dataclass(frozen=True)
class Program:
    """One compiled program: XLA's memory analysis (bytes per device) and its FLOPs."""

    name: str
    argument_bytes: int
    output_bytes: int
    alias_bytes: int  # outputs written into donated arguments' buffers
    temp_bytes: int
    xla_flops: float  # XLA's cost analysis: every loop body counted once
    flops: float  # dot FLOPs per device, loop bodies x their trip counts
    compile_s: float

    @property
    def peak_bytes(self) -> int:
        """Arguments + outputs not written in place + XLA's temporaries: what the device holds
        at once, by XLA's buffer assignment."""
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes


@dataclasses.dataclass(frozen=True)
class Plan:
    model: ModelConfig
    train: TrainConfig
    shapes: PlanShapes
    mesh: dict[str, int]
    weights: list[Weight]
    arithmetic: dict[str, int]  # bytes per device, from array sizes and their shardings
    train_step: Program
    sampler: Program | None
    hbm_gib: float | None = None

    def to_dict(self) -> dict:
        out = {
            "model": dataclasses.asdict(self.model),
            "devices": int(np.prod(list(self.mesh.values()))), "mesh": self.mesh,
            "dtypes": dtypes(self.train),
            "train": {"batch_size": self.train.batch_size, "grad_accum": self.train.grad_accum,
                      "objective": self.train.objective, "remat": self.train.remat,
                      "lora": dataclasses.asdict(self.train.lora),
                      "retention_weight": self.train.retention_weight,
                      "retention_batch_size": self.train.retention_batch_size},
            "shapes": dataclasses.asdict(self.shapes),
            "weights": [dataclasses.asdict(w) for w in self.weights],
            "arithmetic_bytes_per_device": self.arithmetic,
            "programs": {p.name: {**dataclasses.asdict(p), "peak_bytes": p.peak_bytes}
                         for p in (self.train_step, self.sampler) if p is not None},
        }
        if self.hbm_gib is not None:
            out["hbm_gib"] = self.hbm_gib
            out["fits"] = {p.name: p.peak_bytes <= self.hbm_gib * GIB
                           for p in (self.train_step, self.sampler) if p is not None}
        return out


def dtypes(cfg: TrainConfig) -> dict[str, str]:
    """What the trainer stores and computes in: the base in the compute dtype, LoRA and Adam in
    float32 (`train/loop.py`)."""
    return {"base": cfg.compute_dtype, "compute": cfg.compute_dtype, "lora": "float32",
            "adam": "float32"}


def abstract_model(model_cfg: ModelConfig, cfg: TrainConfig
                   ) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """(graphdef, LoRA state, base state) of the model the trainer builds for cfg, as
    ShapeDtypeStructs: nothing is allocated."""
    dtype = compute_dtype(cfg.compute_dtype)

    def make():
        return Transformer(model_cfg, cfg.lora, dtype=dtype, param_dtype=dtype, remat=cfg.remat,
                           rngs=nnx.Rngs(params=0, lora=cfg.seed))

    model = nnx.eval_shape(make)
    configure_model(model, cfg)
    return nnx.split(model, nnx.LoRAParam, nnx.Param)


def batch_shapes(cfg: TrainConfig, shapes: PlanShapes, hidden_size: int) -> dict:
    """The training batch the step reads, padded as `collate` pads rows of these lengths."""
    rows = cfg.batch_size * cfg.grad_accum
    tt = bucket_length(shapes.teacher_len, 32)
    ts = bucket_length(shapes.student_len, 32)
    a = bucket_length(shapes.answer_len, 16)
    i32, b8 = jnp.int32, jnp.bool_
    out = {"student_tokens": ((rows, ts), i32), "student_valid": ((rows, ts), b8),
           "targets": ((rows, a), i32), "target_mask": ((rows, a), b8),
           "student_pos": ((rows, a), i32)}
    if cfg.objective != "ce":
        if shapes.teacher_cached:
            out[TEACHER_HIDDEN] = ((rows, a, hidden_size), compute_dtype(cfg.compute_dtype))
        else:
            out.update({"teacher_tokens": ((rows, tt), i32), "teacher_valid": ((rows, tt), b8),
                        "teacher_pos": ((rows, a), i32)})
    if cfg.ce_weight:
        out[CE_MASK] = ((rows, a), b8)
    if cfg.retention_weight:  # padded as RetentionBatches pads them
        r = cfg.retention_batch_size * cfg.grad_accum
        rt, ra = round_up(shapes.retention_len), round_up(shapes.retention_answer_len)
        out.update({"retention_tokens": ((r, rt), i32), "retention_valid": ((r, rt), b8),
                    "retention_mask": ((r, ra), b8), "retention_pos": ((r, ra), i32)})
    return {k: jax.ShapeDtypeStruct(s, d) for k, (s, d) in out.items()}


def _dotted(path) -> str:
    parts = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
    return ".".join(p for p in parts if p != "value")  # a Variable's own field


def placements(state: Any, mesh) -> list[tuple[str, Any, Any]]:
    """(dotted name, abstract array, NamedSharding) of every array of `state`."""
    shardings = state_shardings(state, mesh)
    arrays = jax.tree_util.tree_leaves_with_path(state)
    return [(_dotted(p), a, s) for (p, a), s in zip(arrays, jax.tree.leaves(shardings))]


def device_bytes(array, sharding) -> int:
    """Bytes of one device's shard of `array` under `sharding`."""
    return int(np.prod(sharding.shard_shape(tuple(array.shape)), dtype=np.int64)) * \
        jnp.dtype(array.dtype).itemsize


def _spec_text(sharding) -> str:
    return "(" + ", ".join("-" if s is None else "+".join(s) if isinstance(s, tuple) else s
                           for s in sharding.spec) + ")"


# ---------------------------------------------------------------- FLOPs from the compiled HLO

_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) \((.*)\) -> .*\{$")
_PARAM = re.compile(r"([\w.\-]+): ([a-z0-9]+)\[([0-9,]*)\]")
# `%name = f32[8,256]{1,0} op(%a, %b), attributes`: an instruction with an array shape
_INSTRUCTION = re.compile(
    r"^\s*(?:ROOT )?%([\w.\-]+) = ([a-z0-9]+)\[([0-9,]*)\]\S* (\S+?)\((.*?)\)(.*)$")
_CALLEE = re.compile(r"(calls|to_apply|body|true_computation|false_computation)=%([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIPS = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_CONTRACTING = re.compile(r"lhs_contracting_dims=\{([0-9,]*)\}")


def hlo_dot_flops(hlo_text: str, unknown_trips: int = 1) -> float:
    """FLOPs of the dot ops of a compiled HLO module (2 x output elements x contracted size),
    each computation counted as often as it runs: loop bodies x their known trip count (a loop
    without one, e.g. a decode loop that may stop early, x `unknown_trips`), the larger branch
    of a conditional."""
    shapes: dict[str, tuple[int, ...]] = {}
    own: dict[str, float] = {}
    calls: dict[str, list[tuple[list[str], int]]] = {}
    entry, current = None, None
    for line in hlo_text.splitlines():
        head = _COMPUTATION.match(line)
        if head:
            current = head.group(1)
            entry = current if line.startswith("ENTRY") else entry
            own[current], calls[current] = 0.0, []
            for name, _, dims in _PARAM.findall(head.group(2)):
                shapes[name] = tuple(int(d) for d in dims.split(",") if d)
            continue
        if current is None or not line.strip().startswith(("%", "ROOT")):
            continue
        inst = _INSTRUCTION.match(line)
        if inst:
            name, _, dims, op, operands, rest = inst.groups()
            shapes[name] = tuple(int(d) for d in dims.split(",") if d)
            if op == "dot":
                lhs = operands.split(",")[0].strip().lstrip("%")
                contracting = _CONTRACTING.search(rest)
                k = math.prod(shapes[lhs][int(i)] for i in contracting.group(1).split(",") if i) \
                    if contracting and lhs in shapes else 1
                own[current] += 2.0 * math.prod(shapes[name]) * k
        trips = _TRIPS.search(line)
        for kind, callee in _CALLEE.findall(line):
            n = (int(trips.group(1)) if trips else unknown_trips) if kind == "body" else 1
            calls[current].append(([callee], n))
        branches = _BRANCHES.search(line)
        if branches:
            calls[current].append(([b.strip().lstrip("%") for b in branches.group(1).split(",")], 1))
    memo: dict[str, float] = {}

    def total(comp: str) -> float:
        if comp not in memo:
            memo[comp] = own.get(comp, 0.0) + sum(
                n * max(total(c) for c in group) for group, n in calls.get(comp, []))
        return memo[comp]

    return total(entry) if entry else 0.0


# The planned programs are never run, so LLVM's optimisation of their machine code, much of
# XLA:CPU's compile time, is skipped. The HLO passes and the buffer assignment that the memory
# and FLOPs figures come from do not change (same temp, argument bytes and FLOPs on the
# Llama-3-8B-shaped plan either way).
PLAN_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0,
                         "xla_llvm_disable_expensive_passes": True}


def compile_program(name: str, lowered, unknown_trips: int = 1) -> Program:
    start = time.perf_counter()
    compiled = lowered.compile(compiler_options=PLAN_COMPILER_OPTIONS)
    seconds = time.perf_counter() - start
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return Program(name, int(memory.argument_size_in_bytes), int(memory.output_size_in_bytes),
                   int(memory.alias_size_in_bytes), int(memory.temp_size_in_bytes),
                   float((cost or {}).get("flops", 0.0)),
                   hlo_dot_flops(compiled.as_text(), unknown_trips), seconds)


# ---------------------------------------------------------------- the plan

def plan(model_cfg: ModelConfig, cfg: TrainConfig, shapes: PlanShapes = PlanShapes(),
         devices: Sequence[jax.Device] | None = None, hbm_gib: float | None = None) -> Plan:
    """Compiles the training step (and, with shapes.sample_batch, the sampler) for `model_cfg`
    on the mesh cfg.mesh over `devices`, without allocating a weight. The devices stand for
    accelerator chips, so compute_dtype "auto" is planned as bfloat16, as it would run there."""
    cfg = dataclasses.replace(cfg, compute_dtype=resolve_dtype(cfg.compute_dtype, accelerator=True))
    mesh = make_mesh(cfg.mesh, devices)
    check_batch_splits(cfg.batch_size, mesh)
    if cfg.retention_weight:
        check_batch_splits(cfg.retention_batch_size, mesh)
    graphdef, lora, base = abstract_model(model_cfg, cfg)
    if not jax.tree.leaves(lora):
        raise ValueError("the plan needs a LoRA adapter; give it at least one target")
    optimizer = make_optimizer(cfg, total_steps=1)  # the schedule's length changes no shape
    opt_state = jax.eval_shape(optimizer.init, (lora, base))
    state = TrainState(lora, opt_state, jax.ShapeDtypeStruct((), jnp.int32))
    batch = batch_shapes(cfg, shapes, model_cfg.hidden_size)

    weights, arithmetic = [], {}
    for group, tree in (("base", base), ("lora", lora)):
        placed = placements(tree, mesh)
        arithmetic[group] = sum(device_bytes(a, s) for _, a, s in placed)
        weights += [Weight(n, tuple(a.shape), str(a.dtype), _spec_text(s), device_bytes(a, s))
                    for n, a, s in placed]
    opt_placed = placements(opt_state, mesh)
    arithmetic["adam"] = sum(device_bytes(a, s) for _, a, s in opt_placed if a.ndim)
    arithmetic["counters"] = sum(device_bytes(a, s) for _, a, s in opt_placed if not a.ndim) + 4
    arithmetic["batch"] = sum(device_bytes(a, batch_sharding(mesh)) for a in batch.values())
    arithmetic["arguments"] = sum(arithmetic.values())

    step = make_train_step(graphdef, optimizer, cfg, mesh)
    train_program = compile_program("train_step", step.lower(state, base, batch))

    sampler = None
    if shapes.sample_batch:
        whole = nnx.merge_state(lora, base)
        placed = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                              whole, state_shardings(whole, mesh))
        params = SamplingParams(max_new_tokens=shapes.max_new_tokens)
        lowered = lower_generate_batch(nnx.graphdef(nnx.merge(graphdef, lora, base)), placed,
                                       params, cfg=model_cfg, dtype=compute_dtype(cfg.compute_dtype),
                                       batch_size=shapes.sample_batch,
                                       prompt_len=shapes.prompt_len,
                                       input_sharding=replicated(mesh))
        sampler = compile_program("sampler", lowered, unknown_trips=shapes.max_new_tokens)
    return Plan(model_cfg, cfg, shapes, dict(mesh.shape), weights, arithmetic, train_program,
                sampler, hbm_gib)


# ---------------------------------------------------------------- printing

def _gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB"


def _size(n: int) -> str:
    """Bytes in the largest unit that keeps them at least 1 (B, KiB, MiB, GiB)."""
    for unit, scale in (("GiB", GIB), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def format_plan(p: Plan) -> str:
    """The plan as a readable report: what was planned, the placement of every weight, the
    arithmetic beside XLA's memory analysis, FLOPs per step."""
    m, cfg, s = p.model, p.train, p.shapes
    devices = int(np.prod(list(p.mesh.values())))
    mesh = ",".join(f"{k}={v}" for k, v in p.mesh.items())
    d = dtypes(cfg)
    rows = cfg.batch_size * cfg.grad_accum
    lines = [
        f"plan: {m.model_type} hidden={m.hidden_size} layers={m.num_layers} heads={m.num_heads}/"
        f"{m.num_kv_heads} mlp={m.intermediate_size} vocab={m.vocab_size} on {devices} devices, "
        f"mesh {mesh}",
        f"dtypes: base {d['base']}, compute {d['compute']}, LoRA and Adam float32; LoRA rank "
        f"{cfg.lora.rank} on {','.join(cfg.lora.targets)} from layer {cfg.lora.first_layer}; "
        f"remat {'on' if cfg.remat else 'off'}",
        f"training batch: {cfg.batch_size} rows x grad_accum {cfg.grad_accum} = {rows} rows "
        f"({rows // data_shards_of(p.mesh)} per data x fsdp shard); teacher "
        f"{'states cached' if s.teacher_cached else f'{s.teacher_len} tokens, run in the step'}"
        f"{' (objective ce: no teacher)' if cfg.objective == 'ce' else ''}; student "
        f"{s.student_len} tokens; answer {s.answer_len} tokens (padded as the trainer pads)"
        + (f"; retention regulariser: {cfg.retention_batch_size} x grad_accum {cfg.grad_accum} "
           f"general prompts of {s.retention_len} tokens ({s.retention_answer_len} answer "
           "tokens), the base model's pass over them in the step" if cfg.retention_weight else ""),
        "",
        "weights (one row per name; layer weights stacked along a leading, unsplit layer axis):",
        f"  {'name':34} {'shape':24} {'dtype':9} {'sharding':24} {'per device':>12}",
    ]
    for w in p.weights:
        lines.append(f"  {w.name:34} {str(w.shape):24} {w.dtype:9} {w.spec:24} "
                     f"{_size(w.device_bytes):>12}")
    a = p.arithmetic
    lines += [
        "",
        "per device, arithmetic (array bytes / shards):",
        f"  base weights {_gib(a['base'])}, LoRA {_gib(a['lora'])}, Adam moments "
        f"{_gib(a['adam'])}, counters {_size(a['counters'])}, batch {_size(a['batch'])}",
        f"  = parameters + optimizer {_gib(a['base'] + a['lora'] + a['adam'] + a['counters'])}; "
        f"all step arguments {_gib(a['arguments'])} ({a['arguments']} B)",
        "",
        "per device, XLA's memory analysis (XLA:CPU's buffer assignment on these devices; a TPU "
        "compiler's differs):",
        f"  {'program':11} {'arguments':>11} {'outputs':>11} {'aliased':>11} {'temp':>11} "
        f"{'peak':>11}   FLOPs/device  all devices  compile",
    ]
    for prog in (p.train_step, p.sampler):
        if prog is None:
            continue
        lines.append(
            f"  {prog.name:11} {_gib(prog.argument_bytes):>11} {_gib(prog.output_bytes):>11} "
            f"{_gib(prog.alias_bytes):>11} {_gib(prog.temp_bytes):>11} {_gib(prog.peak_bytes):>11}"
            f"   {prog.flops:12.3e} {prog.flops * devices:12.3e}  {prog.compile_s:5.1f} s")
    unread = a["arguments"] - p.train_step.argument_bytes
    lines += [
        "  peak = arguments + outputs - aliased + temp. FLOPs: the compiled dot ops, loop bodies x "
        "trip counts (XLA's cost analysis counts each loop body once: "
        f"{p.train_step.xla_flops:.3e} for the step); all devices = the sum over devices, "
        "replicated work counted on each. compile: seconds, short when JAX's persistent "
        "compilation cache held the program.",
        f"  step arguments: XLA {p.train_step.argument_bytes} B, arithmetic {a['arguments']} B"
        + (f"; the {unread} B apart are inputs the compiled step never reads (jit leaves unused "
           "arguments out)" if unread else " (equal)")]
    if p.sampler is not None:
        lines.append(f"  sampler: {s.sample_batch} prompts of {s.prompt_len} tokens, "
                     f"{s.max_new_tokens} new tokens each (FLOPs with every token decoded)")
    if p.hbm_gib is not None:
        for prog in (p.train_step, p.sampler):
            if prog is not None:
                fits = prog.peak_bytes <= p.hbm_gib * GIB
                lines.append(f"  {prog.name}: {'fits' if fits else 'does NOT fit'} in "
                             f"{p.hbm_gib:g} GiB per device")
    return "\n".join(lines)


def data_shards_of(mesh: dict[str, int]) -> int:
    return mesh["data"] * mesh["fsdp"]
