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


def _batch_only(mesh, like, shapes, per_example=None):
    """Shardings for `shapes` (a sequence): the batch (leading) dimension split as in `like`,
    every other dimension replicated — the kernels need whole rows, heads and depth. Where
    `per_example` is False, the operand has no batch dimension and is replicated whole."""
    spec = getattr(like, "spec", ())  # NamedSharding on jit's mesh; no sharding: replicated
    batch_axes = spec[0] if len(spec) else None
    per_example = per_example or (True,) * len(shapes)
    return tuple(NamedSharding(mesh, P(batch_axes, *(None,) * (len(s.shape) - 1)) if batched else P())
                 for s, batched in zip(shapes, per_example))


def _per_example_operands(rule: str) -> tuple[bool, ...]:
    """Which operands of a Shardy rule (`"b, b l d, d -> b l d"`) lead with the batch factor b."""
    operands = rule.split("->")[0].split(",")
    return tuple(o.split()[:1] == ["b"] for o in operands)


def _factors_after_batch(rule: str) -> tuple[str, ...]:
    """Every factor of `rule` but the batch's, in order of first appearance (as Shardy wants
    `need_replication_factors`)."""
    factors = dict.fromkeys(f for f in rule.replace("->", ",").replace(",", " ").split() if f != "b")
    return tuple(factors)


def batch_parallel(call, rule: str):
    """`call` (operands -> tuple of batch-first results, each example on its own) as one
    operation that batch sharding and vmap both keep batch-parallel. `rule` is the Shardy
    rule (factor `b` the batch; `infer` is GSPMD's); every other factor of it must not be
    split (`need_replication_factors`). Operands whose rule does not begin with `b`
    (per-feature parameters) are the same for every example: replicated, and passed as they
    are. Under vmap (the per-task backward of train_step) the vmapped axis is folded into the
    batch: (T, B, ...) -> (B·T, ...), batch-major so that a sharded batch stays sharded;
    operands carry their example's seed, so folding changes nothing. On one device `call` is
    lowered as is."""
    per_example = _per_example_operands(rule)
    # The shardings follow operand 1 (operand 0 may be a small per-example array).
    lead = per_example.index(True, 1)

    def infer(mesh, arg_shapes, result_shape):
        return _batch_only(mesh, arg_shapes[lead].sharding, result_shape)

    def partition(mesh, arg_shapes, result_shape):
        lead_sharding = arg_shapes[lead].sharding
        return (mesh, call, _batch_only(mesh, lead_sharding, result_shape),
                _batch_only(mesh, lead_sharding, arg_shapes, per_example))

    partitioned = custom_partitioning(call)
    partitioned.def_partition(partition, infer_sharding_from_operands=infer, sharding_rule=rule,
                              need_replication_factors=_factors_after_batch(rule))

    @custom_vmap
    def op(*operands):
        return partitioned(*operands)

    @op.def_vmap
    def _(axis_size, in_batched, *operands):
        if any(batched and not example for batched, example in zip(in_batched, per_example)):
            # A per-feature operand that differs along the vmapped axis cannot be folded into
            # the batch: one call per slice.
            slices = [op(*(x[i] if batched else x for x, batched in zip(operands, in_batched)))
                      for i in range(axis_size)]
            return tuple(jnp.stack(outs) for outs in zip(*slices)), (True,) * len(slices[0])

        def fold(x, batched, example):
            if not example:
                return x
            x = x if batched else jnp.broadcast_to(x, (axis_size, *x.shape))
            return jnp.moveaxis(x, 0, 1).reshape(-1, *x.shape[2:])

        def unfold(y):
            return jnp.moveaxis(y.reshape(-1, axis_size, *y.shape[1:]), 1, 0)

        outs = op(*map(fold, operands, in_batched, per_example))
        return tuple(map(unfold, outs)), (True,) * len(outs)

    return op
