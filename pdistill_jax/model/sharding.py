"""Device mesh, logical-axis rules, and placement of model state and batches.

The mesh has three axes: "data" (pure data parallelism: replicas of every weight), "fsdp"
(data parallel too, but weights are split along their "embed" axis and all-gathered when used)
and "tensor" (weights split along heads / mlp / vocab). Placements are derived from the logical
axis names every model weight carries (`axes` metadata), never hand-written per weight.

Also the cluster itself: joining it (`initialize_distributed`), and the share of work, barriers
and failure notices of the commands whose processes sample independently (generate, answer).
"""
from __future__ import annotations

import contextlib
import contextvars
import os
import threading
import time
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # the batch is split over both data-parallel axes

# Logical axis name -> mesh axis (None = replicated).
LOGICAL_RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": BATCH_AXES,
    "embed": "fsdp",
    "mlp": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,  # per-head weights (Qwen3's q/k norms): small, and every head needs all
    "vocab": "tensor",
    "lora": None,  # rank dimension: small, and splitting it would add a reduction per LoRA matmul
}


def make_mesh(shape: Sequence[int] = (-1, 1, 1), devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh; one entry may be -1 for "all remaining devices"."""
    devices = list(jax.devices() if devices is None else devices)
    shape = [int(s) for s in shape]
    if len(shape) != 3:
        raise ValueError(f"mesh shape {tuple(shape)} must have 3 entries (data, fsdp, tensor)")
    if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
        raise ValueError(f"mesh shape {tuple(shape)}: entries must be positive, at most one may be -1")
    known = int(np.prod([s for s in shape if s != -1]))
    if len(devices) % known:
        raise ValueError(f"mesh shape {tuple(shape)} (product {known}) does not divide the "
                         f"{len(devices)} available devices; choose sizes whose product divides it")
    shape = [len(devices) // known if s == -1 else s for s in shape]
    # A mesh smaller than the device count (e.g. tests on a subset) uses the first devices.
    # jax.make_mesh orders devices by the physical topology (TPU ICI rings); "Auto" axes let
    # XLA propagate shardings from the inputs we place.
    return jax.make_mesh(tuple(shape), MESH_AXES, axis_types=(AxisType.Auto,) * 3,
                         devices=devices[: int(np.prod(shape))])


def parse_mesh(text: str) -> tuple[int, int, int]:
    """`data=2,fsdp=2,tensor=2` (missing axes = 1, one may be -1) -> (2, 2, 2)."""
    sizes = {"data": 1, "fsdp": 1, "tensor": 1}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, value = part.partition("=")
        if name.strip() not in sizes or not value.strip().lstrip("-").isdigit():
            raise ValueError(f"--mesh {text!r}: expected data=N,fsdp=N,tensor=N (N an integer or -1)")
        sizes[name.strip()] = int(value)
    return sizes["data"], sizes["fsdp"], sizes["tensor"]


def _spec_for(shape: tuple[int, ...], axes: tuple[str | None, ...] | None, mesh: Mesh) -> P:
    """PartitionSpec for one weight; leading dims not named in `axes` (stacked layers) replicate."""
    axes = tuple(axes or ())
    names: list[Any] = [None] * (len(shape) - len(axes)) + [LOGICAL_RULES.get(a) for a in axes]
    used: set[str] = set()
    for i, (dim, name) in enumerate(zip(shape, names)):
        if name is None:
            continue
        mesh_axes = (name,) if isinstance(name, str) else tuple(name)
        size = int(np.prod([mesh.shape[m] for m in mesh_axes]))
        # jit arguments must split evenly (JAX rejects uneven NamedShardings), and a mesh axis may
        # appear once per spec: otherwise keep this dimension whole (replicated) rather than fail.
        if size == 1 or dim % size or used & set(mesh_axes):
            names[i] = None
        else:
            used |= set(mesh_axes)
    return P(*names)


def is_variable(x) -> bool:
    """An nnx.Variable (Param, LoRAParam, ...): the leaves of a state tree that carry metadata."""
    return isinstance(x, nnx.Variable)


def state_shardings(state: Any, mesh: Mesh) -> Any:
    """A tree like `state` (an nnx.State, or any pytree of Variables) holding a NamedSharding
    where each array is, derived from the Variables' `axes` metadata."""
    def one(v):
        if is_variable(v):
            return v.replace(NamedSharding(mesh, _spec_for(v.shape, v.get_metadata().get("axes"), mesh)))
        return NamedSharding(mesh, P())  # plain arrays (counters, ...) are replicated
    return jax.tree.map(one, state, is_leaf=is_variable)


def shard_state(state: Any, mesh: Mesh) -> Any:
    """`state` with every array placed according to `state_shardings`."""
    return jax.device_put(state, state_shardings(state, mesh))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (example) axis split over data x fsdp, the rest whole."""
    return NamedSharding(mesh, P(BATCH_AXES))


# The mesh a traced training program splits its activations over (None: not set; nothing is
# constrained, as when sampling on one device). Set while a step is traced (`activations_on`).
_activation_mesh: contextvars.ContextVar[Mesh | None] = contextvars.ContextVar(
    "activation_mesh", default=None)


@contextlib.contextmanager
def activations_on(mesh: Mesh):
    """Within it, `split_batch` keeps activations split along their batch axis over the mesh's
    data x fsdp devices. Used while a step is traced."""
    token = _activation_mesh.set(mesh)
    try:
        yield
    finally:
        _activation_mesh.reset(token)


def split_batch(x: jax.Array) -> jax.Array:
    """x, constrained to stay split along its leading (batch) axis over data x fsdp.

    Without it XLA's partitioner, given a batch split over fsdp and a weight split over fsdp
    along `embed`, may keep the weight split and all-gather the whole fsdp group's activations
    instead: each device then holds the activations of the whole batch (measured with `pdistill
    plan` on a Llama-3-8B shape, fsdp=8: the step's temporaries were those of data=1). FSDP means
    the opposite: gather a layer's weights, keep the batch split."""
    mesh = _activation_mesh.get()
    if mesh is None:
        return x
    shards = data_shards(mesh)
    if shards == 1 or x.shape[0] % shards:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(BATCH_AXES)))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def data_shards(mesh: Mesh) -> int:
    """How many parts the batch axis is split into (data x fsdp)."""
    return int(np.prod([mesh.shape[axis] for axis in BATCH_AXES]))


def check_batch_splits(batch_size: int, mesh: Mesh) -> None:
    """Refuses a batch size the batch axis cannot split into equal parts over the mesh."""
    shards = data_shards(mesh)
    if batch_size % shards:
        raise ValueError(f"batch_size {batch_size} does not split over the mesh's data x fsdp "
                         f"= {shards} devices; use a multiple of {shards} or a smaller --mesh "
                         "(e.g. data=1,fsdp=1,tensor=1)")


_MULTI_PROCESS_ENV = ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS")


def _launched_multi_process() -> bool:
    env = os.environ
    if any(env.get(k) for k in _MULTI_PROCESS_ENV):
        return True
    for key in ("JAX_NUM_PROCESSES", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
        if env.get(key, "1").isdigit() and int(env.get(key, "1")) > 1:
            return True
    # TPU pod slices: every host sees the other workers' hostnames; JAX auto-detects the rest.
    hosts = env.get("TPU_WORKER_HOSTNAMES", "")
    return len([h for h in hosts.split(",") if h.strip()]) > 1


def initialize_distributed() -> bool:
    """Joins the multi-process JAX cluster when launched as one (returns True), else no-op.

    Must run before any other JAX call. With JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
    JAX_PROCESS_ID set those are used; on TPU pods, SLURM and Open MPI JAX detects them itself.
    """
    if not _launched_multi_process():
        return False
    if jax.distributed.is_initialized():
        return True
    env = os.environ
    kwargs: dict[str, Any] = {}
    if env.get("JAX_COORDINATOR_ADDRESS"):
        kwargs["coordinator_address"] = env["JAX_COORDINATOR_ADDRESS"]
    if env.get("JAX_NUM_PROCESSES"):
        kwargs["num_processes"] = int(env["JAX_NUM_PROCESSES"])
    if env.get("JAX_PROCESS_ID"):
        kwargs["process_id"] = int(env["JAX_PROCESS_ID"])
    jax.distributed.initialize(**kwargs)
    return True


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Global arrays from this process's rows (all of them on one process), split over data x fsdp.

    Each process passes the consecutive slice of the global batch that its devices hold; the
    global leading size is local size x process count.
    """
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in local_batch.items()}



# ---------------------------------------------------------------- a share of the work per process
# Generation and answering run one independent sampler per process; the processes meet only at
# barriers (after reading the progress on disk, after their shares). Those are kept in the
# distributed runtime's key-value store, not in device collectives: an all-gather that one
# process reaches 30 s after another fails on CPU (gloo; jax 0.10.2: "Gloo context
# initialization failed: DEADLINE_EXCEEDED"), and a share can take hours longer than another.
# Nor its wait_at_barrier: with a peer killed it waited on (over 290 s measured, no error).
# So every process beats a counter in the store, a failing one posts its error there, and a
# waiting process checks both: a peer that failed or went silent ends the wait with one line.
_PREFIX = "pdistill/"
HEARTBEAT_S = 1.0
SILENT_S = 30.0  # a peer whose counter stood still this long is dead
BARRIER_POLL_S = 0.5  # two reads of the store a waiting process, on a pod of hundreds of hosts
_peers_seen: dict[int, tuple[str, float]] = {}  # process -> (its counter, when it last moved)
_heartbeat_started = False


def _client():
    from jax._src import distributed  # the client jax.distributed.initialize() connected

    return distributed.global_state.client


def work_share() -> tuple[int, int]:
    """(this process's index, the process count), (0, 1) outside a cluster; on a cluster starts
    this process's heartbeat, which `check_peers` and `barrier` watch. Call it right after
    initialize_distributed, before the slow loading."""
    global _heartbeat_started
    index, count = jax.process_index(), jax.process_count()
    if count > 1 and not _heartbeat_started:
        client = _client()

        def beat():
            while True:
                try:
                    client.key_value_increment(f"{_PREFIX}alive/{index}", 1)
                except Exception:  # the coordinator is gone: the waits report it
                    return
                time.sleep(HEARTBEAT_S)

        threading.Thread(target=beat, name="pdistill-heartbeat", daemon=True).start()
        _heartbeat_started = True
        _peers_seen.clear()
    return index, count


def report_failure(message: str) -> None:
    """Tells the cluster's other processes why this one ends (their next check_peers raises it)."""
    try:
        _client().key_value_set(f"{_PREFIX}failed/{jax.process_index()}", message[:2000],
                                allow_overwrite=True)
    except Exception:  # the coordinator is gone too: nothing to tell
        pass


def check_peers() -> None:
    """Raises RuntimeError when another process of the cluster failed or went silent."""
    index, count = jax.process_index(), jax.process_count()
    if count == 1:
        return
    client = _client()
    try:
        failed = client.key_value_dir_get(f"{_PREFIX}failed/")
        alive = dict(client.key_value_dir_get(f"{_PREFIX}alive/"))
    except Exception as e:
        raise RuntimeError(f"process {index} of {count} lost the coordinator (process 0 died?): "
                           f"{str(e).splitlines()[0][:200]}") from None
    for key, message in failed:
        raise RuntimeError(f"process {key.rsplit('/', 1)[-1]} failed ({message})")
    now = time.monotonic()
    for peer in range(count):
        counter = alive.get(f"{_PREFIX}alive/{peer}", "")
        last, since = _peers_seen.get(peer, (None, now))
        if counter != last:
            _peers_seen[peer] = (counter, now)
        elif peer != index and now - since > SILENT_S:
            raise RuntimeError(f"process {peer} of {count} has been silent for {now - since:.0f} s "
                               "(killed, or its machine is gone)")


def barrier(name: str) -> None:
    """Waits until every process of the cluster has reached the barrier `name` (at once on one
    process), raising RuntimeError if a process failed or went silent meanwhile. `name` must be
    new to the run: each barrier is passed once."""
    index, count = jax.process_index(), jax.process_count()
    if count == 1:
        return
    client = _client()
    client.key_value_set(f"{_PREFIX}barrier/{name}/{index}", "1")
    while True:
        check_peers()
        if len(client.key_value_dir_get(f"{_PREFIX}barrier/{name}/")) == count:
            return
        time.sleep(BARRIER_POLL_S)
