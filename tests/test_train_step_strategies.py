"""Every weighting and aggregator runs in the compiled, state-donating train step."""

from __future__ import annotations

import functools

import jax
import numpy as np
import optax
import pytest

from mtjax.config import tiny_model_config
from mtjax.models.hiccap import init_variables
from mtjax.mtl.registry import AGGREGATORS, WEIGHTINGS, make_aggregator, make_weighting
from mtjax.train_step import init_train_state, make_optimizer, make_train_step
from tests._support import random_batch

CONFIG = tiny_model_config()
T = len(CONFIG.tasks)


@functools.lru_cache(maxsize=1)
def _initial_variables():
    return init_variables(CONFIG, jax.random.PRNGKey(0))


def _run_two_steps(weighting_name, aggregator_name=None):
    opts = {"weights": (0.1, 0.4, 0.2, 0.2)} if weighting_name == "predefined" else {}
    weighting = make_weighting(weighting_name, **opts)
    aggregator = make_aggregator(aggregator_name, num_tasks=T) if aggregator_name else None
    optimizer = make_optimizer("adam", lr=1e-3)
    step = jax.jit(make_train_step(CONFIG, optimizer, weighting, aggregator), donate_argnums=0)
    # The step donates its state: it gets its own copy of the shared initial weights.
    variables = jax.tree_util.tree_map(lambda x: x.copy(), _initial_variables())
    state = init_train_state(variables, optimizer, weighting, aggregator, num_tasks=T,
                             rng=jax.random.PRNGKey(1))
    before = jax.tree_util.tree_map(np.asarray, state.params)
    for i in range(2):
        state, metrics = step(state, random_batch(CONFIG, 4, seed=i), np.ones(T, np.float32))
        assert int(metrics["finite"]) == 1
        assert np.isfinite(float(metrics["loss"]))
    moved = jax.tree_util.tree_map(lambda a, b: float(np.max(np.abs(np.asarray(a) - b))), state.params, before)
    # Shared layers and every head moved: each task's gradient reached its own head.
    assert moved["att1"]["attention"]["query"]["kernel"] > 0
    for task in CONFIG.tasks:
        assert moved[f"heads_{task}"]["linear3"]["kernel"] > 0, task
    return state


# The weightings whose step differs from a fixed weighted sum: learnable parameters
# (naive, uncertainty), reference-layer gradients (gradnorm), losses after the update
# (famo), per-epoch state (dwa). Each case compiles a step, so the fixed ones are left out.
@pytest.mark.parametrize("name", ["naive_learnable", "uncertainty", "gradnorm", "famo", "dwa"])
def test_weighting_in_donated_step(name):
    assert name in WEIGHTINGS
    # Learnable weightings keep their parameters both in the optimizer's tree and in the
    # weighting state: a donated state must not hold one buffer twice.
    _run_two_steps(name)


@pytest.mark.parametrize("name", ["pcgrad", "upgrad"])
def test_aggregator_in_donated_step(name):
    assert name in AGGREGATORS
    _run_two_steps("unweighted", name)


def _one_step(aggregator_name, aggregate_on, *, deterministic):
    weighting = make_weighting("predefined", weights=(0.1, 0.4, 0.2, 0.2))
    aggregator = make_aggregator(aggregator_name, num_tasks=T)
    # Plain SGD with lr 1: the update is minus the gradient (Adam would blow the ~1e-9
    # round-off of parameters whose exact gradient is 0 up to lr-sized steps).
    optimizer = optax.inject_hyperparams(optax.sgd)(learning_rate=1.0)
    step = jax.jit(make_train_step(CONFIG, optimizer, weighting, aggregator, aggregate_on=aggregate_on,
                                   deterministic=deterministic))
    variables = jax.tree_util.tree_map(lambda x: x.copy(), _initial_variables())
    state = init_train_state(variables, optimizer, weighting, aggregator, num_tasks=T, rng=jax.random.PRNGKey(1))
    mask = np.array([1, 1, 0, 1], np.float32)  # a switched-off task must stay off in both modes
    return step(state, random_batch(CONFIG, 4, seed=0), mask)


def test_feature_level_sum_is_the_summed_loss_step():
    """With `sum`, aggregating feature gradients and aggregating parameter gradients are
    both the gradient of the weighted loss: the two modes make the same update (dropout on,
    so the trunk and heads must draw the same masks in both)."""
    a_state, a_metrics = _one_step("sum", "parameters", deterministic=False)
    b_state, b_metrics = _one_step("sum", "features", deterministic=False)
    np.testing.assert_allclose(a_metrics["task_losses"], b_metrics["task_losses"], rtol=1e-6)
    np.testing.assert_allclose(a_metrics["grad_norm"], b_metrics["grad_norm"], rtol=1e-5)
    # Compare the updates (new - old = -gradient). Each new parameter is p0 - g rounded to
    # float32, so near |p0| ~ 1 two equal gradients can land one float32 ulp (1.2e-7) apart:
    # hence atol 3e-7; rtol 1e-4 covers the two modes' different summation orders.
    start = _initial_variables()["params"]
    jax.tree_util.tree_map(lambda x, y, p0: np.testing.assert_allclose(
        np.asarray(x, np.float64) - p0, np.asarray(y, np.float64) - p0, rtol=1e-4, atol=3e-7),
        a_state.params, b_state.params, start)
    jax.tree_util.tree_map(np.testing.assert_array_equal, a_state.batch_stats, b_state.batch_stats)


def test_feature_level_pcgrad_projects_feature_gradients():
    """PCGrad on features differs from PCGrad on parameters (other vectors are projected),
    still moves the shared trunk, and keeps the heads' own gradients."""
    p_state, p_metrics = _one_step("pcgrad", "parameters", deterministic=True)
    f_state, f_metrics = _one_step("pcgrad", "features", deterministic=True)
    assert int(f_metrics["finite"]) == 1
    np.testing.assert_allclose(p_metrics["task_losses"], f_metrics["task_losses"], rtol=1e-6)
    trunk = lambda s: np.asarray(s.params["att1"]["attention"]["query"]["kernel"])
    start = np.asarray(_initial_variables()["params"]["att1"]["attention"]["query"]["kernel"])
    assert np.max(np.abs(trunk(f_state) - start)) > 0
    assert not np.allclose(trunk(f_state), trunk(p_state), rtol=1e-6, atol=0)
    head = lambda s, t: np.asarray(s.params[f"heads_{t}"]["linear3"]["bias"])
    for t in CONFIG.tasks:  # heads take only their own (weighted) gradient in both modes
        np.testing.assert_allclose(head(f_state, t), head(p_state, t), rtol=1e-5, atol=1e-7)
