"""`skip_nonfinite`: optax.apply_if_finite's behaviour and state, with the finiteness test on
the global norm (the cheaper form the train step uses on GPUs)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mtjax.train_step import make_optimizer, skip_nonfinite

PARAMS = {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.array([0.5, -1.0])}


def _updates(scale, bad=None):
    g = {"w": scale * jnp.ones((2, 3)), "b": jnp.array([0.1, -0.2])}
    if bad is not None:
        g["w"] = g["w"].at[1, 2].set(bad)
    return g


def test_same_steps_and_state_as_optax_apply_if_finite():
    inner = optax.adam(1e-2)
    ours, theirs = skip_nonfinite(inner), optax.apply_if_finite(inner, max_consecutive_errors=2**31 - 1)
    s_ours, s_theirs = ours.init(PARAMS), theirs.init(PARAMS)
    # Checkpoints carry over: the same state structure and leaves.
    assert jax.tree.structure(s_ours) == jax.tree.structure(s_theirs)
    sequence = [_updates(1.0), _updates(2.0, jnp.nan), _updates(0.5, jnp.inf), _updates(-1.0),
                _updates(3.0, -jnp.inf), _updates(0.3)]
    for i, g in enumerate(sequence):
        u_ours, s_ours = ours.update(g, s_ours, PARAMS)
        u_theirs, s_theirs = theirs.update(g, s_theirs, PARAMS)
        for a, b in zip(jax.tree.leaves((u_ours, s_ours)), jax.tree.leaves((u_theirs, s_theirs))):
            # 1 ulp apart at most: optax's branch (a lax.cond) rounds Adam's arithmetic in
            # another order; the counters and flags are exact.
            np.testing.assert_allclose(a, b, rtol=2e-7, err_msg=f"step {i}")
    assert int(s_ours.total_notfinite) == 3 and int(s_ours.notfinite_count) == 0
    # A skipped step leaves Adam's moments and count as they were and moves nothing.
    _, skipped = ours.update(_updates(1.0, jnp.nan), s_ours, PARAMS)
    assert not bool(skipped.last_finite) and int(skipped.notfinite_count) == 1
    for a, b in zip(jax.tree.leaves(skipped.inner_state), jax.tree.leaves(s_ours.inner_state)):
        np.testing.assert_array_equal(a, b)


def test_a_norm_that_overflows_float32_counts_as_non_finite():
    ours = skip_nonfinite(optax.sgd(1.0))
    state = ours.init(PARAMS)
    # Every element finite, but Σ g² overflows float32: skipped (the documented difference).
    updates, state = ours.update(_updates(1e20), state, PARAMS)
    assert not bool(state.last_finite)
    assert all(float(jnp.max(jnp.abs(u))) == 0.0 for u in jax.tree.leaves(updates))
    updates, state = ours.update(_updates(1e18), state, PARAMS)
    assert bool(state.last_finite) and float(updates["w"][0, 0]) == float(jnp.float32(-1e18))


@pytest.mark.parametrize("clip_norm", [None, 1.0])
def test_make_optimizer_skips_a_nan_gradient(clip_norm):
    opt = make_optimizer("adamw", lr=1e-2, weight_decay=0.01, clip_norm=clip_norm)
    state = opt.init(PARAMS)
    updates, new_state = opt.update(_updates(1.0, jnp.nan), state, PARAMS)
    assert all(bool(jnp.all(u == 0)) for u in jax.tree.leaves(updates))
    assert int(new_state.total_notfinite) == 1
    updates, new_state = opt.update(_updates(1.0), new_state, PARAMS)
    assert all(bool(jnp.all(jnp.isfinite(u))) and bool(jnp.any(u != 0)) for u in jax.tree.leaves(updates))
