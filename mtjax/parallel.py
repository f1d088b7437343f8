"""Data parallelism with `jax.sharding`: one mesh over the devices, the batch split on the
'data' axis, the train state replicated (or FSDP-sharded), the SAME `train_step` jitted
with input/output shardings. XLA's SPMD partitioner inserts the collectives:

- gradients: the loss is a mean over the global batch, so the partitioned backward ends in
  an all-reduce — the update equals the single-device one;
- BatchNorm statistics: `jnp.sum` over the sharded batch axis becomes a global reduction,
  so the heads normalise with the statistics of the whole batch, exactly as on one device
  (checked by tests/test_parallel.py);
- dropout: JAX's partitionable threefry (the default) draws the same bits whatever the
  sharding, so even a dropout-on step matches the single-device step.

Usage (one host, all its GPUs):

    pcfg = ParallelConfig(enabled=True)
    initialize(pcfg)                                 # multi-host only; no-op otherwise
    mesh = make_mesh(pcfg)
    shardings = state_shardings(state, mesh, pcfg)
    state = jax.device_put(state, shardings)
    step = parallel_train_step(make_train_step(...), mesh, shardings, pcfg)
    state, metrics = step(state, shard_batch(batch, mesh, pcfg), task_mask)

Multi-host: set `multi_host=True` (and the coordinator fields, or none of them on a cluster
JAX auto-detects, e.g. SLURM). `initialize` must run before anything touches a device; then
`jax.devices()` lists every host's devices, the mesh spans them all, and each process passes
ITS OWN slice of the global batch to `shard_batch` (global batch = per-process batch x
process count). Not exercised here (one host only); the single-host path is what
tests/test_parallel.py checks, with 4 simulated CPU devices.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mtjax.config import reject_unknown_keys


@dataclasses.dataclass(frozen=True)
class ParallelConfig:
    """How a run is spread over devices.

    enabled: shard the batch over all devices of the mesh (False: plain single device).
    axis: the mesh axis name the batch (and FSDP parameters) are split on.
    fsdp: also shard every parameter/optimizer leaf of at least `fsdp_min_size` elements
      along its largest dimension divisible by the device count (ZeRO-3 style: memory per
      device falls, XLA all-gathers the weights where they are used); smaller leaves stay
      replicated.
    multi_host: call `jax.distributed.initialize` (with the fields below; None lets JAX
      auto-detect them on managed clusters).
    """

    enabled: bool = False
    axis: str = "data"
    fsdp: bool = False
    fsdp_min_size: int = 2**18
    multi_host: bool = False
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    local_device_ids: tuple[int, ...] | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ParallelConfig":
        reject_unknown_keys(cls, data, "parallel config")  # a ConfigError, i.e. a ValueError
        return cls(**data)


def initialize(config: ParallelConfig) -> None:
    """Joins the multi-process run when `config.multi_host`; a no-op otherwise."""
    if not config.multi_host:
        return
    kwargs = {k: getattr(config, k) for k in ("coordinator_address", "num_processes", "process_id",
                                              "local_device_ids") if getattr(config, k) is not None}
    jax.distributed.initialize(**kwargs)


def make_mesh(config: ParallelConfig = ParallelConfig(enabled=True), devices=None) -> Mesh:
    """A 1-D mesh over `devices` (default: every device of every process)."""
    devices = jax.devices() if devices is None else list(devices)
    return Mesh(np.asarray(devices), (config.axis,))


def _leaf_spec(x, n: int, config: ParallelConfig) -> P:
    shape = np.shape(x)
    if not config.fsdp or n == 1 or math.prod(shape) < config.fsdp_min_size:
        return P()
    # Largest dimension the device count divides: the most even split.
    dims = sorted((d for d in range(len(shape)) if shape[d] % n == 0), key=lambda d: -shape[d])
    if not dims:
        return P()
    spec = [None] * len(shape)
    spec[dims[0]] = config.axis
    return P(*spec)


def state_shardings(state, mesh: Mesh, config: ParallelConfig):
    """A NamedSharding per leaf of `state` (any pytree): replicated, or FSDP-split."""
    n = mesh.shape[config.axis]
    return jax.tree_util.tree_map(lambda x: NamedSharding(mesh, _leaf_spec(x, n, config)), state)


def batch_sharding(mesh: Mesh, config: ParallelConfig) -> NamedSharding:
    """Leading (batch) axis split over the mesh; applies to every leaf of a batch."""
    return NamedSharding(mesh, P(config.axis))


def shard_batch(batch, mesh: Mesh, config: ParallelConfig):
    """Places a host batch on the mesh, split along axis 0.

    One process: `batch` is the global batch (its size divisible by the device count).
    Several processes: `batch` is this process's slice; the global array is assembled with
    `jax.make_array_from_process_local_data`."""
    sharding = batch_sharding(mesh, config)
    n = mesh.shape[config.axis]
    sizes = {np.shape(x)[0] for x in jax.tree_util.tree_leaves(batch)}
    if len(sizes) != 1:
        raise ValueError(f"batch leaves disagree on the batch size: {sorted(sizes)}")
    (size,) = sizes
    if jax.process_count() == 1:
        if size % n:
            raise ValueError(f"batch size {size} is not divisible by the {n} devices of the mesh")
        return jax.device_put(batch, sharding)
    local = len(mesh.local_devices)
    if size % local:
        raise ValueError(f"per-process batch size {size} is not divisible by its {local} local devices")
    return jax.tree_util.tree_map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
                                  batch)


def parallel_train_step(train_step: Callable, mesh: Mesh, shardings, config: ParallelConfig, *,
                        donate: bool = True) -> Callable:
    """`train_step(state, batch, task_mask) -> (state, metrics)` jitted over the mesh: the
    state keeps `shardings`, the batch is split on the data axis, the task mask and the
    metrics are replicated."""
    replicated = NamedSharding(mesh, P())
    return jax.jit(train_step,
                   in_shardings=(shardings, batch_sharding(mesh, config), replicated),
                   out_shardings=(shardings, replicated),
                   donate_argnums=(0,) if donate else ())


def parallel_eval_step(eval_step: Callable, mesh: Mesh, param_shardings, stats_shardings,
                       config: ParallelConfig) -> Callable:
    """`eval_step(params, batch_stats, batch) -> probs` with the batch (and the output
    probabilities) split on the data axis."""
    split = batch_sharding(mesh, config)
    return jax.jit(eval_step, in_shardings=(param_shardings, stats_shardings, split), out_shardings=split)
