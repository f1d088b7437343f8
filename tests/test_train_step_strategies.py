"""Every weighting and aggregator runs in the compiled, state-donating train step."""

from __future__ import annotations

import functools

import jax
import numpy as np
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
