"""`pdistill plan`: the real training step and sampler compiled for a Llama-3-8B-shaped config on
8 fake CPU devices without weights, its per-device parameter and optimizer bytes checked against
the arithmetic from the config, the HLO FLOP count against loops of known size, bad input."""
import json

import jax
import jax.numpy as jnp
import pytest

from pdistill_jax.cli import main
from pdistill_jax.config import LoraConfig, ModelConfig, TrainConfig
from pdistill_jax.train.plan import PlanShapes, format_plan, hlo_dot_flops, plan

LLAMA3_8B = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 4096,
             "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
             "num_key_value_heads": 8, "vocab_size": 128256, "rope_theta": 500000.0,
             "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "hidden_act": "silu",
             "max_position_embeddings": 8192}
RANK = 16


def _config(tmp_path, hf=LLAMA3_8B):
    (tmp_path / "config.json").write_text(json.dumps(hf))
    return tmp_path


def _expected_bytes(hf: dict, fsdp: int, base_itemsize: int) -> dict:
    """Per-device bytes from the config alone: every base weight has an `embed` dimension
    (hidden_size, a multiple of fsdp here), split over fsdp; a LoRA factor is split over fsdp
    only on its `embed` side (A of q/k/v/gate/up, B of o/down), its other side and the rank
    stay whole; Adam keeps two float32 moments per LoRA value."""
    d, f, layers = hf["hidden_size"], hf["intermediate_size"], hf["num_hidden_layers"]
    hd = d // hf["num_attention_heads"]
    q, kv = hf["num_attention_heads"] * hd, hf["num_key_value_heads"] * hd
    per_layer = d * q + 2 * d * kv + q * d + 3 * d * f + 2 * d
    base = 2 * hf["vocab_size"] * d + d + layers * per_layer
    # (in, out, whether the embed side is `in`) per target
    targets = {"q": (d, q, True), "k": (d, kv, True), "v": (d, kv, True), "o": (q, d, False),
               "gate": (d, f, True), "up": (d, f, True), "down": (f, d, False)}
    lora = 0
    for i, o, embed_in in targets.values():
        lora += RANK * (i // fsdp if embed_in else i) + RANK * (o if embed_in else o // fsdp)
    lora *= layers
    assert base % fsdp == 0
    return {"base": base // fsdp * base_itemsize, "lora": lora * 4, "adam": 2 * lora * 4}


def _check_plan(out: dict, fsdp: int, dtype: str, sample: int) -> None:
    """A plan's JSON against the arithmetic from the config alone."""
    assert out["devices"] == 8 and out["dtypes"]["base"] == dtype and out["dtypes"]["adam"] == "float32"
    expected = _expected_bytes(LLAMA3_8B, fsdp, jnp.dtype(dtype).itemsize)
    got = out["arithmetic_bytes_per_device"]
    assert {k: got[k] for k in expected} == expected
    params_and_optimizer = sum(expected.values())

    step = out["programs"]["train_step"]
    assert step["flops"] > 0 and step["temp_bytes"] > 0
    # XLA's arguments are the per-device shards of the base, the train state and the batch.
    # jit leaves out the inputs the step never reads (the answer ids under the KL objective),
    # so they lie between parameters + optimizer and the arithmetic's total with the batch.
    assert params_and_optimizer <= step["argument_bytes"] <= got["arguments"]
    assert got["arguments"] - step["argument_bytes"] <= got["batch"] + got["counters"]
    # The LoRA and Adam state is donated: its outputs are written into the arguments' buffers.
    assert step["alias_bytes"] >= expected["lora"] + expected["adam"]
    weights = {w["name"]: w for w in out["weights"]}
    assert weights["layers.mlp.gate.kernel"]["spec"] == "(-, fsdp, -)"
    assert weights["layers.mlp.down.lora_a"]["spec"] == "(-, -, -)"  # the mlp side: tensor=1
    assert weights["embed"]["device_bytes"] == LLAMA3_8B["vocab_size"] * 4096 // fsdp * \
        jnp.dtype(dtype).itemsize
    if sample:
        sampler = out["programs"]["sampler"]
        # The decode program reads the base and the adapter, and the slots' state: each slot's
        # KV cache (the bucketed 256-token prompt, then 16 new tokens) and a few small arrays.
        weights_bytes = expected["base"] + expected["lora"]
        cfg = ModelConfig.from_hf(LLAMA3_8B)
        cache = 2 * cfg.num_layers * sample * cfg.num_kv_heads * (256 + 16) * cfg.head_dim * \
            jnp.dtype(dtype).itemsize
        assert weights_bytes + cache <= sampler["argument_bytes"] <= weights_bytes + cache + 2 ** 20
        assert sampler["flops"] > 0
    else:
        assert "sampler" not in out["programs"]


def test_llama3_8b_on_fsdp8_in_float32_with_the_sampler():
    # The library call behind `pdistill plan` (the command's own path is the next test's): one
    # compile serves the table and the numbers.
    cfg = TrainConfig(mesh=(1, 8, 1), batch_size=8, compute_dtype="float32",
                      lora=LoraConfig(rank=RANK))
    shapes = PlanShapes(teacher_len=512, student_len=128, answer_len=64, sample_batch=4,
                        prompt_len=256, max_new_tokens=16)
    result = plan(ModelConfig.from_hf(LLAMA3_8B), cfg, shapes, jax.devices("cpu")[:8], hbm_gib=16)
    text = format_plan(result)
    for wanted in ("mesh data=1,fsdp=8,tensor=1", "dtypes: base float32", "layers.attn.q.kernel",
                   "(-, fsdp, -)", "train_step", "sampler", "16 GiB per device", "XLA:CPU"):
        assert wanted in text, wanted
    _check_plan(json.loads(json.dumps(result.to_dict())), 8, "float32", 4)


def test_llama3_8b_on_data2_fsdp4_in_bfloat16(tmp_path, capsys):
    assert main(["plan", "--model", str(_config(tmp_path) / "config.json"), "--mesh", "data=2,fsdp=4",
                 "--devices", "8", "--rank", str(RANK), "--batch-size", "8", "--teacher-len",
                 "512", "--student-len", "128", "--answer-len", "64", "--hbm-gib", "16",
                 "--compute-dtype", "bfloat16", "--sample-batch", "0", "--json"]) == 0
    _check_plan(json.loads(capsys.readouterr().out), 4, "bfloat16", 0)


def test_hlo_flops_count_every_loop_iteration():
    # XLA's cost analysis counts a while loop's body once; the HLO count multiplies it by the
    # loop's trip count, so it grows with the scanned layers.
    def f(x, ws):
        return jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, ws)[0].sum()

    for layers in (2, 6):
        compiled = jax.jit(jax.grad(f)).lower(
            jax.ShapeDtypeStruct((64, 256), jnp.float32),
            jax.ShapeDtypeStruct((layers, 256, 256), jnp.float32)).compile()
        # per layer: h @ w forward and the gradient's g @ w^T, 2 x 64 x 256 x 256 each
        assert hlo_dot_flops(compiled.as_text()) == layers * 2 * (2 * 64 * 256 * 256)


@pytest.mark.parametrize("flags,says", [
    (["--mesh", "data=3"], "does not divide the 8 available devices"),
    (["--mesh", "fsdp=8", "--batch-size", "4"], "batch_size 4 does not split"),
    (["--mesh", "fsdp=16"], "does not divide the 8 available devices"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, flags, says):
    folder = _config(tmp_path)
    assert main(["plan", "--model", str(folder), "--devices", "8", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and says in err and err.startswith("pdistill plan: error:")


def test_a_folder_without_config_json_is_refused(tmp_path, capsys):
    assert main(["plan", "--model", str(tmp_path), "--devices", "8"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no config.json" in err


def test_more_devices_than_jax_started_with_is_one_line(tmp_path, capsys):
    started = len(jax.devices("cpu"))  # starts JAX's CPU backend if no test has yet
    assert main(["plan", "--model", str(_config(tmp_path)), "--devices", str(2 * started)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "fresh process" in err


SMALL = {**LLAMA3_8B, "hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 4,
         "num_attention_heads": 8, "num_key_value_heads": 4, "vocab_size": 8192}


def test_fsdp_splits_the_activations_over_the_batch_as_data_parallelism_does():
    # fsdp splits the batch as data does; only the weights are gathered. Left to itself XLA's
    # partitioner kept the weights split and all-gathered the whole fsdp group's activations
    # instead, so that every device held the temporaries of the whole batch (the 8B step's:
    # 24.8 GiB a device on fsdp=8); `sharding.split_batch` in every layer pins the batch split.
    shapes = PlanShapes(teacher_len=512, student_len=128, answer_len=64, sample_batch=0)
    temp, flops = {}, {}
    for mesh in ((1, 1, 1), (8, 1, 1), (1, 8, 1)):
        cfg = TrainConfig(mesh=mesh, batch_size=8, compute_dtype="float32",
                          lora=LoraConfig(rank=RANK))
        devices = jax.devices("cpu")[:mesh[0] * mesh[1]]
        step = plan(ModelConfig.from_hf(SMALL), cfg, shapes, devices).train_step
        temp[mesh], flops[mesh] = step.temp_bytes, step.flops
    # Measured (jax 0.10.2): temporaries of 490 MiB on one device, 72 MiB a device on data=8,
    # 87 MiB on fsdp=8 (268 MiB without split_batch), and the per-device FLOPs of data=8 exactly
    # (6.6% more without: the gathered rows computed on every device of the group).
    assert temp[(1, 8, 1)] < 0.5 * temp[(1, 1, 1)]
    assert temp[(1, 8, 1)] <= 1.5 * temp[(8, 1, 1)]
    assert flops[(1, 8, 1)] == flops[(8, 1, 1)] == pytest.approx(flops[(1, 1, 1)] / 8, rel=0.01)


@pytest.mark.slow  # three compiled plans (25 s): a long tiny-model check, run by CI's slow step
def test_the_retention_regulariser_is_planned_with_its_rows():
    # The regulariser's rows run in the step (the student's pass and the base model's): its
    # FLOPs grow by the same amount for every 4 more rows, and its arguments by their arrays.
    shapes = PlanShapes(teacher_len=256, student_len=128, answer_len=64, sample_batch=0,
                        retention_len=96, retention_answer_len=48)
    steps = {}
    for rows in (0, 4, 8):
        cfg = TrainConfig(batch_size=4, compute_dtype="float32", lora=LoraConfig(rank=RANK),
                          retention_weight=float(rows > 0), retention_batch_size=max(rows, 1),
                          retention_prompts="builtin:general_prompts.jsonl" if rows else None)
        result = plan(ModelConfig.from_hf(SMALL), cfg, shapes, jax.devices("cpu")[:1])
        steps[rows] = result.train_step
        if rows:
            assert "retention regulariser: " + str(rows) in format_plan(result)
            assert result.to_dict()["train"]["retention_batch_size"] == rows
    first, second = (steps[4].flops - steps[0].flops), (steps[8].flops - steps[4].flops)
    assert first > 0 and second == pytest.approx(first, rel=0.02)
    # tokens and positions (int32) + their masks (bool): 4 rows of 96 and of 48
    assert steps[8].argument_bytes - steps[4].argument_bytes == 4 * (96 + 48) * (4 + 1)
