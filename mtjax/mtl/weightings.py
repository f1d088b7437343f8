"""Loss weightings: small state machines over the T task losses.

Every weighting is a ``Weighting`` (a NamedTuple of pure functions plus flags), so a
training loop uses any of them without special cases. All functions are jit-safe
(close over the ``Weighting`` and jit the step).

The contract for the training loop
----------------------------------
``losses`` is always the (T,) vector of *unweighted* task losses of the current batch,
in ``config.tasks`` order. ::

    wt = WEIGHTINGS[name](**opts)
    wstate = wt.init(T, key)
    wparams = wt.params(wstate)                 # {} unless wt.learnable

    def objective(model_params, wparams):       # inside the jitted train step
        losses = task_losses(model_params, batch)           # (T,)
        return wt.loss(wparams, wstate, losses), losses     # scalar, differentiable

    (loss, losses), (g_model, g_w) = jax.value_and_grad(objective, (0, 1), has_aux=True)(...)
    # learnable weightings: update wparams with the model's optimizer (same step),
    # then write them back:  wstate = wt.set_params(wstate, new_wparams)
    kw = {}
    if wt.needs_ref_grads:   # per-task grads of the *unweighted* losses w.r.t. the
        kw["ref_grads"] = jax.jacrev(task_losses_fn)(ref_layer_params)  # reference
        #                 layer, at the pre-step parameters: leaves (T, ...)
    if wt.needs_new_losses:  # the same batch's losses after the parameter update
        kw["new_losses"] = task_losses(new_model_params, batch)
    wstate = wt.update(wstate, losses=losses, **kw)        # every step
    ...
    wstate = wt.end_epoch(wstate)                         # at the end of every epoch
    log(wt.weights(wstate, losses))                       # (T,) effective weights

* ``loss(wparams, state, losses)``: the scalar to differentiate. For fixed/adaptive
  weightings it is ``sum_t stop_gradient(w_t) L_t``; for learnable ones the weight
  parameters are *not* stopped, so the same ``jax.grad`` gives their gradient.
* ``weights(state, losses=None)``: the (T,) weights multiplying each task loss in
  ``loss`` (for logging, or to scale per-task gradients before an aggregator). Only
  FAMO uses ``losses`` (its weights are ``c z_t / L_t``; without losses it returns
  ``z``).
* ``update(state, *, losses, ref_grads=None, new_losses=None)``: advance one step;
  arguments a weighting does not need are ignored.
* ``end_epoch(state)``: close an epoch (DWA rolls its epoch averages; no-op otherwise).
* ``params(state)`` / ``set_params(state, p)``: the learnable weight parameters
  (naive: ``{"w": (T,)}``; uncertainty: ``{"log_var": (T,)}``; everything else ``{}``).
  Train them with the model's optimizer, e.g. as an extra entry of the params pytree.
* Flags: ``needs_ref_grads`` (GradNorm), ``needs_new_losses`` (FAMO), ``per_epoch``
  (DWA: the weights change only at ``end_epoch``), ``learnable`` (naive, uncertainty).

With a gradient aggregator (``mtjax.mtl.aggregators``) the loop differentiates the
per-task losses separately; scale task t's gradient by ``weights(state, losses)[t]``
first if a weighting is combined with an aggregator.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import optax

Array = jax.Array

__all__ = [
    "Weighting", "unweighted", "predefined", "naive_learnable", "uncertainty", "gradnorm",
    "dwa", "rlw", "famo",
    "StaticState", "NaiveState", "UncertaintyState", "GradNormState", "DWAState", "RLWState",
    "FAMOState",
    "uncertainty_loss", "uncertainty_grad", "uncertainty_optimum", "gradnorm_loss",
    "gradnorm_weight_grad", "dwa_weights", "famo_task_weights", "famo_logit_grad",
    "ref_grad_norms",
]


class Weighting(NamedTuple):
    """A loss weighting: pure functions plus what the loop must provide (see module doc)."""

    name: str
    init: Callable[..., Any]  # init(num_tasks, key=None) -> state
    weights: Callable[..., Array]  # weights(state, losses=None) -> (T,)
    loss: Callable[[Any, Any, Array], Array]  # loss(wparams, state, losses) -> scalar
    update: Callable[..., Any]  # update(state, *, losses, ref_grads=None, new_losses=None)
    end_epoch: Callable[[Any], Any]
    params: Callable[[Any], Any]
    set_params: Callable[[Any, Any], Any]
    needs_ref_grads: bool = False
    needs_new_losses: bool = False
    per_epoch: bool = False
    learnable: bool = False


def _identity(state):
    return state


def _no_update(state, *, losses=None, ref_grads=None, new_losses=None):
    # Weightings whose state only changes through their parameters (or never).
    del losses, ref_grads, new_losses
    return state


def _no_params(state):
    del state
    return {}


def _keep_state(state, params):
    del params
    return state


def _fixed_loss(weights_fn):
    # For non-learnable weightings: weights are constants of the model's gradient.
    def loss(wparams, state, losses):
        del wparams
        w = jax.lax.stop_gradient(weights_fn(state, losses))
        return jnp.sum(w * losses)

    return loss


def _as_key(key, seed):
    return jax.random.PRNGKey(seed) if key is None else key


def _check_losses(losses, t=None):
    losses = jnp.asarray(losses)
    if losses.ndim != 1 or (t is not None and losses.shape[0] != t):
        raise ValueError(f"expected task losses of shape ({t if t else 'T'},), got {losses.shape}")
    return losses


# --------------------------------------------------------------------------- #
# Unweighted and predefined
# --------------------------------------------------------------------------- #


class StaticState(NamedTuple):
    """Fixed weights (unweighted, predefined)."""

    weights: Array
    params: dict


def _static_weighting(name: str, make: Callable[[int], Array]) -> Weighting:
    def init(num_tasks, key=None):
        del key
        return StaticState(weights=make(num_tasks), params={})

    def weights(state, losses=None):
        del losses
        return state.weights

    return Weighting(name, init, weights, _fixed_loss(weights), _no_update, _identity, _no_params,
                     _keep_state)


def unweighted() -> Weighting:
    """All weights 1: ``L = sum_t L_t``. Needs losses only."""
    return _static_weighting("unweighted", lambda t: jnp.ones((t,), jnp.float32))


def predefined(weights: Sequence[float] = (0.1, 0.4, 0.2, 0.2)) -> Weighting:
    """Fixed weights ``L = sum_t w_t L_t``; default = the original multi-task recipe
    (mature 0.1, gory 0.4, slapstick 0.2, sarcasm 0.2). Needs losses only."""
    w = tuple(float(x) for x in weights)

    def make(t):
        if len(w) != t:
            raise ValueError(f"predefined weights {w} have {len(w)} entries for {t} tasks")
        return jnp.asarray(w, jnp.float32)

    return _static_weighting("predefined", make)


# --------------------------------------------------------------------------- #
# Naive learnable weights
# --------------------------------------------------------------------------- #


class NaiveState(NamedTuple):
    params: dict  # {"w": (T,)}


def naive_learnable(init_value: float = 1.0) -> Weighting:
    """Learnable weights trained on the same objective ``L = sum_t w_t L_t``.

    Baseline only: ``dL/dw_t = L_t >= 0``, so gradient descent drives every ``w_t``
    down without bound (through 0 and negative) -- the model "wins" by switching the
    losses off. Kept because the research compared against it. The loop trains
    ``params(state)["w"]`` with the model's optimizer. Needs losses only.
    """

    def init(num_tasks, key=None):
        del key
        return NaiveState(params={"w": jnp.full((num_tasks,), init_value, jnp.float32)})

    def weights(state, losses=None):
        del losses
        return state.params["w"]

    def loss(wparams, state, losses):
        del state
        return jnp.sum(wparams["w"] * losses)

    return Weighting("naive_learnable", init, weights, loss, _no_update, _identity,
                     lambda s: s.params, lambda s, p: s._replace(params=p), learnable=True)


# --------------------------------------------------------------------------- #
# Uncertainty weighting (Kendall, Gal, Cipolla)
# --------------------------------------------------------------------------- #


class UncertaintyState(NamedTuple):
    params: dict  # {"log_var": (T,)}  s_t = log sigma_t^2


def uncertainty_loss(log_var: Array, losses: Array) -> Array:
    """``sum_t exp(-s_t) L_t + s_t`` with ``s_t = log sigma_t^2``."""
    return jnp.sum(jnp.exp(-log_var) * losses + log_var)


def uncertainty_grad(log_var: Array, losses: Array) -> Array:
    """d/ds_t of ``uncertainty_loss``: ``1 - exp(-s_t) L_t``."""
    return 1.0 - jnp.exp(-log_var) * losses


def uncertainty_optimum(losses: Array) -> Array:
    """For fixed losses the loss is minimised (gradient zero) at ``s_t = log L_t``."""
    return jnp.log(losses)


def uncertainty(init_log_var: float = 0.0) -> Weighting:
    """Uncertainty weighting -- Kendall, Gal, Cipolla, "Multi-Task Learning Using
    Uncertainty to Weigh Losses for Scene Geometry and Semantics", CVPR 2018.

    Rule: ``L = sum_t exp(-s_t) L_t + s_t`` with learnable ``s_t = log sigma_t^2``
    (the common form for all task types; the paper's regression case has factors
    1/2, the classification case ``1/sigma^2``). ``weights`` reports ``exp(-s_t)``;
    the optimum for fixed losses is ``s_t = log L_t`` (``uncertainty_optimum``). The
    loop trains ``params(state)["log_var"]`` with the model's optimizer. Needs losses
    only.
    """

    def init(num_tasks, key=None):
        del key
        return UncertaintyState(params={"log_var": jnp.full((num_tasks,), init_log_var,
                                                            jnp.float32)})

    def weights(state, losses=None):
        del losses
        return jnp.exp(-state.params["log_var"])

    def loss(wparams, state, losses):
        del state
        return uncertainty_loss(wparams["log_var"], losses)

    return Weighting("uncertainty", init, weights, loss, _no_update, _identity,
                     lambda s: s.params, lambda s, p: s._replace(params=p), learnable=True)


# --------------------------------------------------------------------------- #
# GradNorm (Chen et al.)
# --------------------------------------------------------------------------- #


class GradNormState(NamedTuple):
    weights: Array  # (T,), sum T
    initial_losses: Array  # (T,) L_t(0), set at the first update
    count: Array  # int32 number of updates done
    opt_state: Any  # the weights' own optimizer state
    params: dict


def ref_grad_norms(ref_grads: Any) -> Array:
    """Per-task L2 norms of a per-task gradient pytree (leaves with leading axis T)."""
    leaves = jax.tree.leaves(ref_grads)
    if not leaves:
        raise ValueError("gradnorm: ref_grads is empty")
    t = leaves[0].shape[0]
    sq = sum(jnp.sum(jnp.reshape(x, (t, -1)).astype(jnp.float32) ** 2, axis=1) for x in leaves)
    return jnp.sqrt(sq)


def gradnorm_loss(weights: Array, grad_norms: Array, losses: Array, initial_losses: Array,
                  alpha: float) -> Array:
    """GradNorm's ``L_grad = sum_t |G_W^(t) - stop_grad(Gbar_W r_t^alpha)|``.

    ``G_W^(t) = ||grad_W (w_t L_t)|| = w_t ||grad_W L_t||`` (``grad_norms`` are the
    unweighted norms), ``Gbar_W = mean_t G_W^(t)``, ``r_t = Ltilde_t / mean(Ltilde)``
    with ``Ltilde_t = L_t / L_t(0)``. The whole target is a constant: only the
    ``G_W^(t)`` terms carry gradient to the weights.
    """
    g_w = weights * grad_norms
    ratio = losses / initial_losses
    r = ratio / jnp.maximum(jnp.mean(ratio), jnp.finfo(ratio.dtype).tiny)
    target = jax.lax.stop_gradient(jnp.mean(g_w) * r**alpha)
    return jnp.sum(jnp.abs(g_w - target))


def gradnorm_weight_grad(weights, grad_norms, losses, initial_losses, alpha):
    """Gradient of ``gradnorm_loss`` w.r.t. the weights only."""
    return jax.grad(gradnorm_loss)(weights, jax.lax.stop_gradient(grad_norms),
                                   jax.lax.stop_gradient(losses),
                                   jax.lax.stop_gradient(initial_losses), alpha)


def gradnorm(alpha: float = 1.5, lr: float = 0.025,
             optimizer: Optional[optax.GradientTransformation] = None,
             min_weight: float = 1e-6) -> Weighting:
    """GradNorm -- Chen, Badrinarayanan, Lee, Rabinovich, "GradNorm: Gradient
    Normalization for Adaptive Loss Balancing in Deep Multitask Networks", ICML 2018.

    Step t: the model is trained on ``sum_t w_t L_t`` with the current weights
    (constants for the model). Then, from the *unweighted* per-task gradients of the
    reference layer W (the last shared layer; the loop passes them as ``ref_grads``,
    leaves with leading axis T), the weights take one step of their own optimizer
    (``optax.adam(lr)`` unless ``optimizer`` is given) on ``gradnorm_loss`` (see
    there), are clipped at ``min_weight`` (keeps them positive) and renormalised to
    sum T. ``L_t(0)`` = the losses passed at the first update.

    Why this is correct where the research version was not: here the weights' loss
    is an explicit function of (w, ||grad_W L_t||, L_t) with the target under
    ``stop_gradient``; the gradient norms come from the unweighted losses and are
    scaled by w analytically, so no autodiff graph is shared between the model loss
    and the weights' loss (the model's gradient never sees GradNorm's loss, and the
    weights' gradient is exactly ``sign(G_t - target_t) ||grad_W L_t||``).
    Needs losses and ``ref_grads``.
    """
    opt = optax.adam(lr) if optimizer is None else optimizer

    def init(num_tasks, key=None):
        del key
        w = jnp.ones((num_tasks,), jnp.float32)
        return GradNormState(weights=w, initial_losses=jnp.ones((num_tasks,), jnp.float32),
                             count=jnp.zeros((), jnp.int32), opt_state=opt.init(w), params={})

    def weights(state, losses=None):
        del losses
        return state.weights

    def update(state, *, losses, ref_grads=None, new_losses=None):
        del new_losses
        if ref_grads is None:
            raise ValueError("gradnorm.update needs ref_grads: per-task gradients of the "
                             "unweighted losses w.r.t. the reference (last shared) layer")
        t = state.weights.shape[0]
        losses = _check_losses(losses, t).astype(jnp.float32)
        norms = ref_grad_norms(ref_grads)
        if norms.shape != (t,):
            raise ValueError(f"gradnorm: ref_grads leading axis {norms.shape} != ({t},)")
        first = state.count == 0
        init_losses = jnp.where(first, losses, state.initial_losses)
        # A zero initial loss would make the ratio undefined; treat it as no progress.
        safe_init = jnp.where(init_losses > 0, init_losses, 1.0)
        grad = gradnorm_weight_grad(state.weights, norms, losses, safe_init, alpha)
        upd, opt_state = opt.update(grad, state.opt_state, state.weights)
        w = jnp.maximum(optax.apply_updates(state.weights, upd), min_weight)
        w = t * w / jnp.sum(w)
        return GradNormState(weights=w, initial_losses=init_losses, count=state.count + 1,
                             opt_state=opt_state, params={})

    return Weighting("gradnorm", init, weights, _fixed_loss(weights), update, _identity,
                     _no_params, _keep_state, needs_ref_grads=True)


# --------------------------------------------------------------------------- #
# DWA (Liu, Johns, Davison)
# --------------------------------------------------------------------------- #


class DWAState(NamedTuple):
    epoch_sum: Array  # (T,) running sum of this epoch's losses
    epoch_count: Array  # () number of steps in this epoch
    history: Array  # (2, T): [L(k-2), L(k-1)] epoch-average losses
    epochs: Array  # int32, completed epochs
    params: dict


def dwa_weights(prev2: Array, prev1: Array, temperature: float = 2.0) -> Array:
    """``w_t = T softmax(r / temperature)_t`` with ``r_t = L_t(k-1) / L_t(k-2)``."""
    r = prev1 / prev2
    return prev1.shape[0] * jax.nn.softmax(r / temperature)


def dwa(temperature: float = 2.0) -> Weighting:
    """Dynamic Weight Average -- Liu, Johns, Davison, "End-to-End Multi-Task Learning
    with Attention", CVPR 2019.

    Rule: for epoch k >= 3 (1-based), ``w_t(k) = T exp(r_t/temp) / sum_i exp(r_i/temp)``
    with ``r_t = L_t(k-1)/L_t(k-2)`` where ``L(k)`` is the average task loss over
    epoch k; ``w = 1`` for the first two epochs; temp = 2. ``update`` accumulates the
    step losses, ``end_epoch`` closes the epoch average (``per_epoch``). Needs losses
    only (every step) and an ``end_epoch`` call per epoch.
    """

    def init(num_tasks, key=None):
        del key
        return DWAState(epoch_sum=jnp.zeros((num_tasks,), jnp.float32),
                        epoch_count=jnp.zeros((), jnp.float32),
                        history=jnp.ones((2, num_tasks), jnp.float32),
                        epochs=jnp.zeros((), jnp.int32), params={})

    def weights(state, losses=None):
        del losses
        w = dwa_weights(state.history[0], state.history[1], temperature)
        return jnp.where(state.epochs >= 2, w, jnp.ones_like(w))

    def update(state, *, losses, ref_grads=None, new_losses=None):
        del ref_grads, new_losses
        losses = _check_losses(losses, state.epoch_sum.shape[0]).astype(jnp.float32)
        return state._replace(epoch_sum=state.epoch_sum + losses,
                              epoch_count=state.epoch_count + 1.0)

    def end_epoch(state):
        has = state.epoch_count > 0
        mean = state.epoch_sum / jnp.maximum(state.epoch_count, 1.0)
        history = jnp.where(has, jnp.stack([state.history[1], mean]), state.history)
        return state._replace(epoch_sum=jnp.zeros_like(state.epoch_sum),
                              epoch_count=jnp.zeros_like(state.epoch_count), history=history,
                              epochs=state.epochs + has.astype(jnp.int32))

    return Weighting("dwa", init, weights, _fixed_loss(weights), update, end_epoch, _no_params,
                     _keep_state, per_epoch=True)


# --------------------------------------------------------------------------- #
# Random loss weighting (Lin et al.)
# --------------------------------------------------------------------------- #


class RLWState(NamedTuple):
    key: Array
    weights: Array
    params: dict


def rlw(seed: int = 0, sum_to_num_tasks: bool = False) -> Weighting:
    """Random Loss Weighting -- Lin, Ye, Xu, Shi, Zhang, "Reasonable Effectiveness of
    Random Weighting: A Litmus Test for Multi-Task Learning", TMLR 2022 (arXiv 2021).

    Rule: at every step ``w = softmax(z)``, ``z ~ N(0, I_T)``, drawn from the state's
    key (split per step), so weights sum to 1 as in the paper; ``sum_to_num_tasks``
    multiplies them by T (the scale of ``unweighted``). ``init`` draws the first
    step's weights, each ``update`` draws the next step's. Needs losses only (ignored).
    """
    scale = (lambda t: float(t)) if sum_to_num_tasks else (lambda t: 1.0)

    def draw(key, t):
        key, sub = jax.random.split(key)
        return key, scale(t) * jax.nn.softmax(jax.random.normal(sub, (t,), jnp.float32))

    def init(num_tasks, key=None):
        key, w = draw(_as_key(key, seed), num_tasks)
        return RLWState(key=key, weights=w, params={})

    def weights(state, losses=None):
        del losses
        return state.weights

    def update(state, *, losses=None, ref_grads=None, new_losses=None):
        del losses, ref_grads, new_losses
        key, w = draw(state.key, state.weights.shape[0])
        return RLWState(key=key, weights=w, params={})

    return Weighting("rlw", init, weights, _fixed_loss(weights), update, _identity, _no_params,
                     _keep_state)


# --------------------------------------------------------------------------- #
# FAMO (Liu et al.)
# --------------------------------------------------------------------------- #


class FAMOState(NamedTuple):
    logits: Array  # xi, (T,)
    opt_state: Any
    params: dict


def famo_task_weights(logits: Array, losses: Array, eps: float = 1e-8) -> Array:
    """Per-loss weights of FAMO's update: ``c z_t / L_t``, ``c = 1/sum_i(z_i/L_i)``.

    ``sum_t w_t grad L_t`` is then FAMO's direction ``c sum_t z_t grad log L_t``.
    """
    z = jax.nn.softmax(logits)
    inv = z / jnp.maximum(losses, eps)
    return inv / jnp.sum(inv)


def famo_logit_grad(logits: Array, losses: Array, new_losses: Array, eps: float = 1e-8) -> Array:
    """``d/dxi (z^T delta)`` with ``delta_t = log L_t(before) - log L_t(after)``.

    (Softmax Jacobian transposed: ``z * (delta - z.delta)``.) Descending it raises the
    logits of the tasks whose log loss fell least.
    """
    z = jax.nn.softmax(logits)
    delta = jnp.log(jnp.maximum(losses, eps)) - jnp.log(jnp.maximum(new_losses, eps))
    return z * (delta - jnp.dot(z, delta))


def famo(lr: float = 0.025, gamma: float = 1e-3, optimizer: str = "adam",
         eps: float = 1e-8) -> Weighting:
    """FAMO -- Liu, Liu, Jin, Stone, Liu, "FAMO: Fast Adaptive Multitask Optimization",
    NeurIPS 2023.

    Rule: logits ``xi`` (start 0), ``z = softmax(xi)``. The model step uses the
    direction ``c sum_t z_t grad log L_t`` (``c = 1/sum_t z_t/L_t``), i.e. loss weights
    ``c z_t / L_t`` (``famo_task_weights``; the loss must be positive). After the step,
    with ``delta = log L(before) - log L(after)`` on the same batch,
    ``xi <- xi - lr (grad_xi z^T delta + gamma xi)`` (``famo_logit_grad``).
    ``optimizer="adam"`` (default) applies that gradient plus ``gamma xi`` with Adam
    (lr 0.025, the authors' released setting: torch Adam with weight_decay=gamma);
    ``"sgd"`` is the paper's plain update. Needs losses and ``new_losses``.
    """
    if optimizer == "adam":
        opt = optax.chain(optax.add_decayed_weights(gamma), optax.adam(lr))
    elif optimizer == "sgd":
        opt = optax.chain(optax.add_decayed_weights(gamma), optax.sgd(lr))
    else:
        raise ValueError(f"famo: optimizer must be 'adam' or 'sgd', got {optimizer!r}")

    def init(num_tasks, key=None):
        del key
        xi = jnp.zeros((num_tasks,), jnp.float32)
        return FAMOState(logits=xi, opt_state=opt.init(xi), params={})

    def weights(state, losses=None):
        if losses is None:
            return jax.nn.softmax(state.logits)
        return famo_task_weights(state.logits, losses, eps)

    def update(state, *, losses, ref_grads=None, new_losses=None):
        del ref_grads
        if new_losses is None:
            raise ValueError("famo.update needs new_losses: the same batch's task losses "
                             "after the parameter update")
        t = state.logits.shape[0]
        losses = _check_losses(losses, t).astype(jnp.float32)
        new_losses = _check_losses(new_losses, t).astype(jnp.float32)
        grad = famo_logit_grad(state.logits, losses, new_losses, eps)
        upd, opt_state = opt.update(grad, state.opt_state, state.logits)
        return FAMOState(logits=optax.apply_updates(state.logits, upd), opt_state=opt_state,
                         params={})

    return Weighting("famo", init, weights, _fixed_loss(weights), update, _identity, _no_params,
                     _keep_state, needs_new_losses=True)
