"""Custom kernels (Pallas calls) as operations that stay batch-parallel under sharding and vmap.

XLA's SPMD partitioner cannot look into a Pallas custom call: left alone, it gathers the
operands and runs the whole batch on every device. `batch_parallel` wraps a kernel call in
`custom_partitioning` so each device runs it on its own batch shard, and gives it the
batching rule `custom_partitioning` lacks. The kernels' dropout masks are drawn from
per-example seeds or indices that are operands themselves, so a shard computes exactly
what one device would for those examples.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.custom_batching import custom_vmap
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec as P


def _batch_only(mesh, like, shapes):
    """Shardings for `shapes` (a pytree): the batch (leading) dimension split as in `like`,
    every other dimension replicated — the kernels need whole rows, heads and depth."""
    spec = getattr(like, "spec", ())  # NamedSharding on jit's mesh; no sharding: replicated
    batch_axes = spec[0] if len(spec) else None
    return jax.tree.map(lambda s: NamedSharding(mesh, P(batch_axes, *(None,) * (len(s.shape) - 1))), shapes)


def batch_parallel(call, rule: str, replicated: tuple[str, ...]):
    """`call` (batch-first operands -> tuple of batch-first results, each example on its own)
    as one operation that batch sharding and vmap both keep batch-parallel. `rule` is the
    Shardy rule (factor `b` the batch; `infer` is GSPMD's), `replicated` its factors that
    must not be split. Under vmap (the per-task backward of train_step) the vmapped axis is
    folded into the batch: (T, B, ...) -> (B·T, ...), batch-major so that a sharded batch
    stays sharded; operands carry their example's seed, so folding changes nothing. On one
    device `call` is lowered as is."""

    # The shardings follow operand 1 (operand 0 may be a small per-example array).
    def infer(mesh, arg_shapes, result_shape):
        return _batch_only(mesh, arg_shapes[1].sharding, result_shape)

    def partition(mesh, arg_shapes, result_shape):
        lead_sharding = arg_shapes[1].sharding
        return (mesh, call, _batch_only(mesh, lead_sharding, result_shape),
                _batch_only(mesh, lead_sharding, arg_shapes))

    partitioned = custom_partitioning(call)
    partitioned.def_partition(partition, infer_sharding_from_operands=infer, sharding_rule=rule,
                              need_replication_factors=replicated)

    @custom_vmap
    def op(*operands):
        return partitioned(*operands)

    @op.def_vmap
    def _(axis_size, in_batched, *operands):
        def fold(x, batched):
            x = x if batched else jnp.broadcast_to(x, (axis_size, *x.shape))
            return jnp.moveaxis(x, 0, 1).reshape(-1, *x.shape[2:])

        def unfold(y):
            return jnp.moveaxis(y.reshape(-1, axis_size, *y.shape[1:]), 1, 0)

        outs = op(*map(fold, operands, in_batched))
        return tuple(map(unfold, outs)), (True,) * len(outs)

    return op
