"""The compiled train and eval steps: pure functions of the train state and a batch.

`train_step(state, batch, task_mask) -> (state, metrics)` is one optimizer step:
forward in train mode (dropout from `state.rng`, BatchNorm batch statistics), the
original per-task BCE losses, a loss weighting (`mtjax.mtl.weightings`), optionally a
gradient aggregator over per-task gradients (`mtjax.mtl.aggregators`), then the optax
optimizer. `task_mask` (T,) switches tasks off for this step (round robin, DSG, ...)
without changing any shape, so schedules never recompile the step.

A step whose loss or gradients are not finite changes nothing (parameters, optimizer,
BatchNorm statistics, strategy states) and reports `finite = 0`; the host counts those
and stops the run after too many in a row.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import optax

from mtjax import packed_params
from mtjax.config import ModelConfig
from mtjax.losses import l2_norm_sum, masked_bce
from mtjax.models.hiccap import MODEL_INPUTS, HICCAP

L2_MODES = ("none", "reported_constant", "real")
AGGREGATE_ON = ("parameters", "features")
# GradNorm's reference: the last shared layer, i.e. the LayerNorms producing the pooled
# features every head reads (their scales; their biases have no gradient through the
# heads' train-mode BatchNorm).
GRADNORM_REFERENCE = ("attention_drop_norm", "attention_audio_drop_norm", "attention_image_drop_norm")


class TrainState(NamedTuple):
    step: jax.Array
    params: Any               # model parameters
    weight_params: Any        # learnable loss-weight parameters ({} for fixed weightings)
    batch_stats: Any
    opt_state: Any            # over {"model": params, "weighting": weight_params}
    weighting_state: Any
    aggregator_state: Any
    rng: jax.Array


def make_optimizer(name: str = "adam", *, lr: float, b1: float = 0.9, b2: float = 0.999,
                   eps: float = 1e-8, weight_decay: float = 0.0,
                   clip_norm: float | None = None, mu_dtype=None) -> optax.GradientTransformation:
    """PyTorch-equivalent Adam / AdamW (decoupled decay) with an injectable learning rate,
    inside `skip_nonfinite` so a non-finite gradient skips the update. `mu_dtype` (optax's)
    stores the first moment in that dtype (None or 'float32': the parameters' float32, as PyTorch)."""
    if mu_dtype == "float32":
        mu_dtype = None  # optax's own default: the state keeps the parameters' dtype
    if name == "adam":
        if weight_decay:
            raise ValueError("Adam with weight_decay: use 'adamw' (decoupled decay)")
        opt = optax.inject_hyperparams(optax.adam, static_args=("mu_dtype",))(
            learning_rate=lr, b1=b1, b2=b2, eps=eps, mu_dtype=mu_dtype)
    elif name == "adamw":
        opt = optax.inject_hyperparams(optax.adamw, static_args=("mu_dtype",))(
            learning_rate=lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mu_dtype=mu_dtype)
    else:
        raise ValueError(f"optimizer must be 'adam' or 'adamw', got {name!r}")
    chain = optax.chain(clip_by_global_norm(clip_norm), opt) if clip_norm else opt
    return skip_nonfinite(chain)


def global_norm(tree) -> jax.Array:
    """`optax.tree.norm(tree)`: √ of the sum of every leaf's squares, summed so that a GPU
    runs about one kernel per large array instead of two. optax sums each array whole, which
    XLA splits into two reductions (and two kernels) per large array. Here each array's
    squares are summed along its last axis (a row reduction, one kernel, which XLA can fuse
    with the gradient's conversion to float32), and the row sums of all arrays, with the small arrays'
    squares, are concatenated and summed once. Only the order of the additions differs from
    optax's."""
    parts = []
    for leaf in jax.tree_util.tree_leaves(tree):
        squares = jnp.square(leaf.astype(jnp.float32))
        rows = leaf.ndim >= 2 and leaf.size > 0
        parts.append(jnp.sum(squares.reshape(-1, leaf.shape[-1]), axis=1) if rows else squares.ravel())
    if not parts:
        return jnp.zeros((), jnp.float32)
    # The barrier keeps XLA's simplifier from splitting the sum of the concatenation back
    # into one sum per part (and merging each with its row sums): two kernels per array again.
    return jnp.sqrt(jnp.sum(jax.lax.optimization_barrier(jnp.concatenate(parts))))


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
    """`optax.clip_by_global_norm` (same arithmetic, same empty state) over `global_norm`, so
    that clipping, the finiteness check and the grad-norm metric share one norm: XLA merges
    identical sums, not optax's per-array form with ours."""

    def update(updates, state, params=None):
        del params
        g_norm = global_norm(updates)
        trigger = g_norm < max_norm
        return jax.tree_util.tree_map(
            lambda t: jax.lax.select(trigger, t, (t / g_norm.astype(t.dtype)) * max_norm), updates), state

    return optax.GradientTransformation(optax.init_empty_state, update)


def skip_nonfinite(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """`optax.apply_if_finite` without a limit on consecutive skips (the host stops a run
    after its own), with the same state, so checkpoints carry over, and cheaper on a GPU:
    - the updates count as finite when their global norm is: `global_norm`'s sums of squares,
      shared (XLA merges them) with the grad-norm metric and with clipping, instead of a
      separate isfinite pass over ~200 arrays;
    - a skip is a select, not a `lax.cond`, whose predicate a GPU would hand to the host.
    Measured on an H100 (b32 train step): the two checks cost ~1.4 ms of 39.5.
    A finite gradient whose norm overflows float32 (above ~1.8e19) is skipped too."""

    def init(params):
        return optax.ApplyIfFiniteState(
            notfinite_count=jnp.zeros([], jnp.int32), last_finite=jnp.array(True, jnp.bool_),
            total_notfinite=jnp.zeros([], jnp.int32), inner_state=inner.init(params))

    def update(updates, state, params=None):
        finite = jnp.isfinite(global_norm(updates))
        new_updates, inner_state = inner.update(updates, state.inner_state, params)
        return _select(finite, new_updates, optax.tree.zeros_like(updates)), optax.ApplyIfFiniteState(
            notfinite_count=jnp.where(finite, jnp.zeros([], jnp.int32), optax.safe_increment(state.notfinite_count)),
            last_finite=finite,
            total_notfinite=jnp.where(finite, state.total_notfinite, optax.safe_increment(state.total_notfinite)),
            inner_state=_select(finite, inner_state, state.inner_state))

    return optax.GradientTransformation(init, update)


def learning_rate(opt_state) -> jax.Array:
    return optax.tree_utils.tree_get(opt_state, "learning_rate")


def set_learning_rate(opt_state, lr: float):
    return optax.tree_utils.tree_set(opt_state, learning_rate=jnp.asarray(lr, jnp.float32))


def is_task_specific(name: str) -> bool:
    return name.startswith("heads_")


def split_shared(tree: Mapping[str, Any]) -> tuple[dict, dict]:
    """(shared, task-specific) halves of a parameter-keyed dict (heads are `heads_<task>`)."""
    return ({k: v for k, v in tree.items() if not is_task_specific(k)},
            {k: v for k, v in tree.items() if is_task_specific(k)})


def _sum_tasks(per_task_tree):
    """Σ over the leading task axis: each head's gradient is nonzero for its own task only."""
    return jax.tree_util.tree_map(lambda x: jnp.sum(x, axis=0), per_task_tree)


def init_train_state(variables: Mapping[str, Any], optimizer: optax.GradientTransformation,
                     weighting, aggregator: optax.GradientTransformation | None, *,
                     num_tasks: int, rng: jax.Array, pack_small_arrays: bool = False) -> TrainState:
    """`pack_small_arrays`: the optimizer state over the packed parameters (mtjax.packed_params);
    the train step must be made with the same setting."""
    rng, w_key = jax.random.split(rng)
    weighting_state = weighting.init(num_tasks, w_key)
    # A copy: the weighting state holds the same arrays, and a donated state must not
    # hold one buffer twice.
    weight_params = jax.tree_util.tree_map(jnp.copy, weighting.params(weighting_state))
    params = variables["params"]
    aggregator_state = aggregator.init(split_shared(params)[0]) if aggregator is not None else ()
    return TrainState(
        step=jnp.zeros((), jnp.int32), params=params, weight_params=weight_params,
        batch_stats=variables.get("batch_stats", {}),
        opt_state=optimizer.init({"model": packed_params.pack(params) if pack_small_arrays else params,
                                  "weighting": weight_params}),
        weighting_state=weighting_state, aggregator_state=aggregator_state, rng=rng)


def _select(pred, new, old):
    return jax.tree_util.tree_map(lambda a, b: jnp.where(pred, a, b), new, old)


def make_train_step(config: ModelConfig, optimizer: optax.GradientTransformation, weighting,
                    aggregator: optax.GradientTransformation | None = None, *,
                    aggregate_on: str = "parameters",
                    l2: str = "none", l2_coef: float = 0.1,
                    deterministic: bool = False, pack_small_arrays: bool = False) -> Callable:
    """Builds the (un-jitted) step; jit it with `jax.jit(step, donate_argnums=0)`.

    With an aggregator, `aggregate_on` says what its per-task gradients are:
    - "parameters": the gradients of every shared parameter (exact; one forward, then a
      backward per task through the whole trunk, batched);
    - "features": the gradients of the shared features the heads read (B, 3d), as
      MGDA-UB (Sener & Koltun, 2018) and LibMTL's `rep_grad` do: the per-task backward
      stops at the heads, the aggregated feature gradient goes through the trunk once, so
      the step costs about one single-loss step whatever the number of tasks.

    `deterministic=True` turns dropout off while BatchNorm stays in training mode (the
    mode of the train-step parity tests).

    `pack_small_arrays=True` runs the optimizer on the parameters with their small arrays
    packed into one vector (mtjax.packed_params: fewer, larger GPU kernels; the same
    parameter values); the state must come from `init_train_state` with the same setting."""
    if l2 not in L2_MODES:
        raise ValueError(f"l2 must be one of {L2_MODES}, got {l2!r}")
    if aggregate_on not in AGGREGATE_ON:
        raise ValueError(f"aggregate_on must be one of {AGGREGATE_ON}, got {aggregate_on!r}")
    if aggregator is not None and weighting.learnable:
        raise ValueError(f"weighting {weighting.name!r} learns its weights from the summed loss; "
                         f"it cannot be combined with a gradient aggregator")
    model = HICCAP(config)
    tasks = config.tasks

    def model_inputs(batch):
        inputs = {k: batch[k] for k in MODEL_INPUTS}
        if "example_mask" in batch:
            inputs["example_mask"] = batch["example_mask"]
        return inputs

    def losses_of(probs, batch):
        return jnp.stack([masked_bce(probs[t], batch["labels"][t], batch["label_mask"][t]) for t in tasks])

    def task_losses(params, batch_stats, batch, dropout_key):
        probs, updates = model.apply({"params": params, "batch_stats": batch_stats}, model_inputs(batch),
                                     train=True, deterministic=deterministic,
                                     rngs={"dropout": dropout_key}, mutable=["batch_stats"])
        return losses_of(probs, batch), updates["batch_stats"]

    def parameter_level_grads(params, batch_stats, batch, dropout_key, weights_of, aggregator_state):
        """Aggregates per-task gradients of every shared parameter (exact)."""
        losses, vjp_fn, new_stats = jax.vjp(lambda p: task_losses(p, batch_stats, batch, dropout_key),
                                            params, has_aux=True)
        weights = weights_of(losses)
        # One forward, then a batched backward: the VJP of the (T,) loss vector applied to
        # the T one-hot cotangents gives every task's gradient in one vmapped pass.
        (per_task,) = jax.vmap(vjp_fn)(jnp.diag(weights))
        per_task_shared, per_task_heads = split_shared(per_task)
        combined, aggregator_state = aggregator.update(per_task_shared, aggregator_state, split_shared(params)[0])
        return losses, weights, {**combined, **_sum_tasks(per_task_heads)}, new_stats, aggregator_state

    def feature_level_grads(params, batch_stats, batch, dropout_key, weights_of, aggregator_state):
        """Aggregates per-task gradients of the shared features, then one trunk backward."""
        shared_params, head_params = split_shared(params)
        inputs = model_inputs(batch)
        features, trunk_vjp = jax.vjp(
            lambda p: model.apply({"params": p}, inputs, deterministic=deterministic,
                                  rngs={"dropout": dropout_key}, method="shared_features"),
            shared_params)

        def head_losses(hp, f):
            probs, updates = model.apply({"params": hp, "batch_stats": batch_stats}, f, inputs.get("example_mask"),
                                         train=True, deterministic=deterministic, rngs={"dropout": dropout_key},
                                         mutable=["batch_stats"], method="task_probs")
            return losses_of(probs, batch), updates["batch_stats"]

        losses, heads_vjp, new_stats = jax.vjp(head_losses, head_params, features, has_aux=True)
        weights = weights_of(losses)
        per_task_heads, per_task_features = jax.vmap(heads_vjp)(jnp.diag(weights))
        combined, aggregator_state = aggregator.update({"features": per_task_features}, aggregator_state)
        (g_shared,) = trunk_vjp(combined["features"].astype(features.dtype))
        return losses, weights, {**g_shared, **_sum_tasks(per_task_heads)}, new_stats, aggregator_state

    def train_step(state: TrainState, batch: Mapping[str, Any], task_mask: jax.Array):
        rng, dropout_key = jax.random.split(state.rng)
        task_mask = task_mask.astype(jnp.float32)
        metrics = {}

        if aggregator is None:
            def objective(params, weight_params):
                losses, new_stats = task_losses(params, state.batch_stats, batch, dropout_key)
                total = weighting.loss(weight_params, state.weighting_state, losses * task_mask)
                if l2 == "real":
                    total = total + l2_coef * l2_norm_sum(params)
                return total, (losses, new_stats)

            (total, (losses, new_stats)), (g_model, g_weight) = jax.value_and_grad(
                objective, argnums=(0, 1), has_aux=True)(state.params, state.weight_params)
            aggregator_state = state.aggregator_state
        else:
            weights_of = lambda losses: (jax.lax.stop_gradient(weighting.weights(state.weighting_state, losses))
                                         * task_mask)
            level_grads = feature_level_grads if aggregate_on == "features" else parameter_level_grads
            losses, weights, g_model, new_stats, aggregator_state = level_grads(
                state.params, state.batch_stats, batch, dropout_key, weights_of, state.aggregator_state)
            if l2 == "real":
                g_l2 = jax.grad(lambda p: l2_coef * l2_norm_sum(p))(state.params)
                g_model = jax.tree_util.tree_map(jnp.add, g_model, g_l2)
            g_weight = jax.tree_util.tree_map(jnp.zeros_like, state.weight_params)
            total = jnp.sum(weights * losses)
            if l2 == "real":
                total = total + l2_coef * l2_norm_sum(state.params)

        def pack(tree):
            return packed_params.pack(tree) if pack_small_arrays else tree

        def unpack(packed):
            return packed_params.unpack(packed, state.params) if pack_small_arrays else packed

        grads = {"model": pack(g_model), "weighting": g_weight}
        params = {"model": pack(state.params), "weighting": state.weight_params}
        # The global norm, as `skip_nonfinite` tests it (the same sums of squares).
        finite = jnp.isfinite(total) & jnp.isfinite(global_norm(grads))
        updates, opt_state = optimizer.update(grads, state.opt_state, params)
        new = optax.apply_updates(params, updates)

        weighting_state = weighting.set_params(state.weighting_state, new["weighting"])
        extra = {}
        if weighting.needs_ref_grads:
            ref = {k: state.params[k] for k in GRADNORM_REFERENCE}

            def ref_losses(ref_params):
                return task_losses({**state.params, **ref_params}, state.batch_stats, batch, dropout_key)[0]

            extra["ref_grads"] = jax.jacrev(ref_losses)(ref)
        if weighting.needs_new_losses:
            extra["new_losses"] = task_losses(unpack(new["model"]), state.batch_stats, batch, dropout_key)[0]
        weighting_state = weighting.update(weighting_state, losses=losses, **extra)

        reported = total
        if l2 == "reported_constant":
            # SPEC §2.8: the binary original adds 0.1·Σ‖w‖₂ as a Python float: no gradient.
            reported = total + l2_coef * jax.lax.stop_gradient(l2_norm_sum(state.params))
        metrics.update(
            loss=reported, task_losses=losses, loss_weights=weighting.weights(state.weighting_state, losses),
            grad_norm=global_norm(grads["model"]), finite=finite.astype(jnp.int32),
            learning_rate=learning_rate(state.opt_state))
        new_state = TrainState(
            step=state.step + 1,
            # Selected before unpacking: one select over the packed arrays.
            params=unpack(_select(finite, new["model"], params["model"])),
            weight_params=_select(finite, new["weighting"], state.weight_params),
            batch_stats=_select(finite, new_stats, state.batch_stats),
            # skip_nonfinite already skipped non-finite gradients (and counts them); this
            # also covers a non-finite loss whose gradients happen to be finite.
            opt_state=_select(finite, opt_state, state.opt_state),
            weighting_state=_select(finite, weighting_state, state.weighting_state),
            aggregator_state=_select(finite, aggregator_state, state.aggregator_state),
            rng=rng)
        return new_state, metrics

    return train_step


def make_eval_step(config: ModelConfig) -> Callable:
    """(params, batch_stats, batch) → {task: probs}, eval mode."""
    model = HICCAP(config)

    def eval_step(params, batch_stats, batch):
        inputs = {k: batch[k] for k in MODEL_INPUTS}
        return model.apply({"params": params, "batch_stats": batch_stats}, inputs, train=False)

    return eval_step
